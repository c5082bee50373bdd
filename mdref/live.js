// mdref live: the page's script. Plain JavaScript, no build step; it talks only to the server that sent it.
//
// Each side (prompt A, prompt B) redraws its picture DEBOUNCE_MS after the last keystroke, with at most one
// request in flight: a keystroke during a request is answered by one more request when it returns, for the text
// as it is then. After a longer pause (MAPS_DELAY_MS) the side asks for its cross-attention maps and x0, a second,
// recorded model run. window.mdrefLive.latencies holds, per picture drawn, the milliseconds from the keystroke it
// answers to the picture on screen; the events "mdref-drawn" and "mdref-maps" on window say a picture, or the maps,
// are on screen (the benchmark and the browser test wait on them).
"use strict";

const DEBOUNCE_MS = 50;
const MAPS_DELAY_MS = 250;
const MAP_PX = 64;                     // a token's map is drawn this many pixels a side (CSS scales it)
const X0_SCALE = 6;                    // x0 tiles: CSS pixels per latent pixel
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
const SEED_MAX = 18446744073709551615n;

const live = window.mdrefLive = {latencies: [], errors: []};

function byId(id) { return document.getElementById(id); }

function makeSide(name, suffix) {
  return {
    name, prompt: byId("prompt" + suffix), image: byId("image" + suffix), status: byId("status" + suffix),
    maps: byId("maps" + suffix), x0: byId("x0" + suffix), explain: byId("explain" + suffix),
    save: byId("explain-save" + suffix),
    timer: 0, mapsTimer: 0, busy: false, again: false, typedAt: performance.now(), shown: "", blobUrl: "",
  };
}

const sides = [makeSide("A", ""), makeSide("B", "-b")];
const seedBox = byId("seed");
const showMaps = byId("show-maps");

function currentSeed() {
  const text = seedBox.value.trim();
  const ok = /^[0-9]{1,20}$/.test(text) && BigInt(text) <= SEED_MAX;
  byId("seed-status").textContent = ok ? "" : "the seed is a whole number from 0 to 2^64 - 1";
  return ok ? BigInt(text).toString() : null;
}

function query(prompt, seed) {
  return new URLSearchParams({prompt, seed}).toString();
}

function say(side, text, isError) {
  side.status.textContent = text;
  side.status.classList.toggle("error", Boolean(isError));
  if (isError) live.errors.push({side: side.name, text});
}

function serverTiming(response) {
  const t = response.headers.get("Server-Timing") || "";
  const m = /model;dur=([0-9.]+)/.exec(t);
  return m ? `the model ran ${Math.round(Number(m[1]))} ms` : (t.includes("cache") ? "from the cache" : "");
}

// ---- the picture -----------------------------------------------------------------------------------------------
function schedule(side) {
  side.typedAt = performance.now();
  clearTimeout(side.timer);
  clearTimeout(side.mapsTimer);
  side.timer = setTimeout(() => draw(side), DEBOUNCE_MS);
}

async function draw(side) {
  clearTimeout(side.timer);
  const seed = currentSeed();
  if (seed === null) return;
  const prompt = side.prompt.value;
  const key = query(prompt, seed);
  if (key === side.shown) return;
  if (side.busy) { side.again = true; return; }
  side.busy = true;
  const typedAt = side.typedAt, sentAt = performance.now();
  try {
    const response = await fetch("/api/image?" + key);
    const answeredAt = performance.now();
    if (!response.ok) {
      say(side, `not drawn: ${(await response.text()).trim()}`, true);
      return;
    }
    const url = URL.createObjectURL(await response.blob());
    side.image.src = url;
    await side.image.decode();
    if (side.blobUrl) URL.revokeObjectURL(side.blobUrl);
    side.blobUrl = url;
    side.shown = key;
    Object.assign(side.image.dataset, {prompt, seed, api: "/api/image?" + key});
    const ms = performance.now() - typedAt;
    const how = serverTiming(response);
    // where the time went: the wait before the request (the debounce, or a request still in flight), the request
    // (model run included), reading and decoding the picture
    live.latencies.push({side: side.name, prompt, seed, ms, how, waited: sentAt - typedAt,
                         request: answeredAt - sentAt, decode: performance.now() - answeredAt});
    say(side, `drawn ${Math.round(ms)} ms after the last keystroke${how ? " (" + how + ")" : ""}`, false);
    window.dispatchEvent(new CustomEvent("mdref-drawn", {detail: {side: side.name, prompt, seed}}));
    side.explain.href = "/explain?" + key;
    side.save.href = "/explain?" + key + "&download=1";
    side.maps.classList.add("stale");
    side.x0.classList.add("stale");
    clearTimeout(side.mapsTimer);
    if (showMaps.checked) side.mapsTimer = setTimeout(() => drawMaps(side, key), MAPS_DELAY_MS);
  } catch (e) {
    say(side, `no answer from the server (${e.message}); is mdref live still running?`, true);
  } finally {
    side.busy = false;
    if (side.again) { side.again = false; draw(side); }
  }
}

// ---- the maps and x0 -------------------------------------------------------------------------------------------
function viridis(v) {
  const x = Math.min(Math.max(v, 0), 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(x), VIRIDIS.length - 2), f = x - i;
  return VIRIDIS[i].map((c, k) => Math.round(c * (1 - f) + VIRIDIS[i + 1][k] * f));
}

function heat(map) {
  // one token's map [gh][gw] -> a canvas of gh x gw pixels: colour and opacity by value / the map's peak
  const gh = map.length, gw = map[0].length;
  const peak = Math.max(...map.flat());
  const canvas = document.createElement("canvas");
  canvas.width = gw; canvas.height = gh;
  const ctx = canvas.getContext("2d");
  const data = ctx.createImageData(gw, gh);
  map.flat().forEach((value, p) => {
    const v = peak > 0 ? value / peak : 0;
    data.data.set([...viridis(v), Math.round(210 * v)], 4 * p);
  });
  ctx.putImageData(data, 0, 0);
  return {canvas, peak};
}

function mapFigure(side, token, map, pixels) {
  const canvas = document.createElement("canvas");
  canvas.width = MAP_PX; canvas.height = MAP_PX;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(side.image, 0, 0, MAP_PX, MAP_PX);
  const {canvas: overlay, peak} = heat(map);
  ctx.drawImage(overlay, 0, 0, MAP_PX, MAP_PX);
  canvas.className = "token-map";
  canvas.title = `${token}: peak ${(peak * pixels).toFixed(1)} x a uniform map`;
  const figure = document.createElement("figure");
  const caption = document.createElement("figcaption");
  caption.textContent = token;
  figure.append(canvas, caption);
  return figure;
}

function drawX0(side, x0) {
  // x0 [C][h][w] -> C grey tiles side by side, each channel scaled to its own min..max
  const C = x0.length, h = x0[0].length, w = x0[0][0].length;
  const canvas = side.x0;
  canvas.width = C * (w + 1) - 1; canvas.height = h;
  canvas.style.width = `${canvas.width * X0_SCALE}px`;
  const ctx = canvas.getContext("2d");
  const data = ctx.createImageData(canvas.width, h);
  data.data.fill(255);
  x0.forEach((channel, c) => {
    const flat = channel.flat(), lo = Math.min(...flat), hi = Math.max(...flat);
    channel.forEach((row, y) => row.forEach((value, x) => {
      const g = hi > lo ? Math.round((value - lo) / (hi - lo) * 255) : 128;
      data.data.set([g, g, g, 255], 4 * (y * canvas.width + c * (w + 1) + x));
    }));
  });
  ctx.putImageData(data, 0, 0);
  canvas.classList.remove("stale");
}

async function drawMaps(side, key) {
  if (key !== side.shown) return;
  try {
    const response = await fetch("/api/maps?" + key);
    if (!response.ok) { say(side, `maps not drawn: ${(await response.text()).trim()}`, true); return; }
    const answer = await response.json();
    if (key !== side.shown) return;                       // the picture changed meanwhile
    const pixels = answer.height * answer.width;
    side.maps.replaceChildren(...answer.tokens.map((t, i) => mapFigure(side, t, answer.maps[i], pixels)));
    side.maps.classList.remove("stale");
    side.maps.dataset.key = key;
    drawX0(side, answer.x0);
    window.dispatchEvent(new CustomEvent("mdref-maps", {detail: {side: side.name, key}}));
  } catch (e) {
    say(side, `maps not drawn: no answer from the server (${e.message})`, true);
  }
}

// ---- wiring ----------------------------------------------------------------------------------------------------
for (const side of sides) side.prompt.addEventListener("input", () => schedule(side));
seedBox.addEventListener("input", () => { for (const side of sides) schedule(side); });
showMaps.addEventListener("change", () => {
  for (const side of sides) if (showMaps.checked && side.shown) drawMaps(side, side.shown);
});
byId("new-noise").addEventListener("click", () => {
  seedBox.value = String(crypto.getRandomValues(new Uint32Array(1))[0]);
  for (const side of sides) { side.typedAt = performance.now(); draw(side); }
});

fetch("/api/info").then(r => r.json()).then(info => {
  const untrained = info.untrained ? " (UNTRAINED seeded weights: it draws noise)" : "";
  byId("model").textContent = `model ${info.model}${untrained}`
    + `, ${info.parameters.toLocaleString("en")} parameters, ${info.dtype}, ${info.height}x${info.width} pixels`
    + ` from a ${info.latent_shape.slice(1).join("x")} latent in one UNet evaluation; mdref ${info.mdref_version}`;
}).catch(e => { byId("model").textContent = `no answer from the server (${e.message})`; });

for (const side of sides) draw(side);
