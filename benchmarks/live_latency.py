"""Keystroke-to-picture latency of `mdref live`, measured in headless Chromium, and the cost of the maps.

    HF_HUB_OFFLINE=1 python benchmarks/live_latency.py [--rounds 3] [--json OUT.json] [--screenshot OUT.png]

What is measured (results and what they say: benchmarks/live-latency.md):
- Servers: `python -m mdref live --port 0` as a user starts it, the default model, one per BLAS setting
  (`--blas-threads 1`, the default, and `--blas-threads 0`: OpenBLAS's own count, the machine's cores); one server
  at a time (an idle server's BLAS threads may spin), the settings alternating round by round. The browser
  (Debian's headless Chromium, driven over the DevTools pipe by tests/devtools.py) runs beside it, as it would on a
  learner's laptop.
- "Pause after every key": the sentence is typed one key at a time into prompt A (DevTools Input.dispatchKeyEvent),
  each key once the picture of the prefix before is on screen, so every prefix is requested as a typist who stops
  there would request it. A prefix's latency is the page's own figure (window.mdrefLive.latencies):
  performance.now() once the picture is decoded on screen minus performance.now() at the key's input event, so it
  holds the debounce (live.js DEBOUNCE_MS), the request, the model run, the PNG, the response and the decode. Every
  scenario uses a seed no other used, so each request runs the model (no cache hit). Maps off; then again with
  maps on and each key typed MAPS_DELAY_MS + 30 ms after the picture, while the maps' run holds the model (the
  picture's worst case).
- "Steady typing": the sentence typed at a fixed pace (--pace, default 0.15 s per key, about 80 words a minute)
  without waiting: how many prefixes were drawn, their latency, and the latency of the last key's picture.
- Maps: per prefix, GET /api/maps once its picture is cached, from Python: the model time the server reports
  (Server-Timing: one run under mdref.explain's recorder, the maps and the JSON) against the picture's own run.
- Without a browser: per prefix, sleep(DEBOUNCE_MS) then GET /api/image (cold) from Python.
Timings vary with the machine's load: the script prints the load average before and after.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from devtools import DevTools, chromium  # noqa: E402

SENTENCE = "a large red circle on the left, blue background"
DRAWN, MAPS = "mdref-drawn", "mdref-maps"          # the events live.js dispatches when a picture / the maps are shown
SETTINGS = {"--blas-threads 1 (the default)": ["--blas-threads", "1"],
            "--blas-threads 0 (OpenBLAS's own count)": ["--blas-threads", "0"]}


def debounce_ms():
    text = (ROOT / "mdref" / "live.js").read_text()
    return int(re.search(r"const DEBOUNCE_MS = (\d+);", text).group(1))


def maps_delay_ms():
    text = (ROOT / "mdref" / "live.js").read_text()
    return int(re.search(r"const MAPS_DELAY_MS = (\d+);", text).group(1))


def start_server(options):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("OPENBLAS_NUM_THREADS", None)
    p = subprocess.Popen([sys.executable, "-m", "mdref", "live", "--port", "0", *options], stderr=subprocess.PIPE,
                         text=True, env=env)
    line = p.stderr.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not m:
        p.kill()
        raise SystemExit(f"mdref live did not start: {line}{p.stderr.read()}")
    return p, int(m.group(1))


def get(port, target):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        t0 = time.perf_counter()
        conn.request("GET", target)
        r = conn.getresponse()
        body = r.read()
        wall = time.perf_counter() - t0
        timing = r.getheader("Server-Timing") or ""
        m = re.search(r"model;dur=([0-9.]+)", timing)
        return r.status, body, wall * 1000, float(m.group(1)) if m else None
    finally:
        conn.close()


def summary(values):
    v = sorted(values)
    if not v:
        return {"n": 0}
    p95 = v[min(len(v) - 1, max(0, int(round(0.95 * len(v))) - 1))]
    return {"n": len(v), "median": statistics.median(v), "p95": p95, "min": v[0], "max": v[-1]}


def shown(prompt, seed, side=""):
    return (f"document.getElementById('image{side}').dataset.prompt === {json.dumps(prompt)} && "
            f"document.getElementById('image{side}').dataset.seed === '{seed}'")


def maps_shown(side=""):
    return (f"document.getElementById('maps{side}').dataset.key !== undefined && "
            f"document.getElementById('maps{side}').dataset.key === "
            f"document.getElementById('image{side}').dataset.api?.split('?')[1]")


def reset(tools, session, seed, maps):
    """Maps on or off, a new seed, prompt A empty; wait until both sides are drawn (and their maps, when on), so
    nothing of the set-up is still running when the first key is typed; then forget the latencies so far."""
    tools.evaluate(session, f"document.getElementById('show-maps').checked = {json.dumps(maps)}")
    tools.type(session, "seed", str(seed))
    tools.clear(session, "prompt")
    tools.wait_until(session, shown("", seed), 60, DRAWN)
    prompt_b = tools.evaluate(session, "document.getElementById('prompt-b').value")
    tools.wait_until(session, shown(prompt_b, seed, "-b"), 60, DRAWN)
    if maps:
        for side in ("", "-b"):
            tools.wait_until(session, maps_shown(side), 60, MAPS)
    tools.evaluate(session, "window.mdrefLive.latencies.length = 0")


MEASURES = {   # key: what the report's row says
    "pause": "pause after every key, maps off: keystroke to picture, median / p95 ms",
    "pause_waited": "  of which: before the request (the debounce), median ms",
    "pause_request": "  of which: the request (model run, PNG, HTTP), median ms",
    "pause_decode": "  of which: reading and decoding the picture, median ms",
    "pause_maps": "pause after every key, maps on, the key typed while the maps run: median / p95 ms",
    "steady": "steady typing (--pace): pictures drawn while typing, median / p95 ms",
    "steady_last": "steady typing: the last key's picture, median ms",
    "steady_drawn": "steady typing: pictures drawn of the 47 prefixes, median",
    "image_model": "a picture's model run (Server-Timing), median ms",
    "maps_model": "the maps' model run (Server-Timing), median ms",
    "maps_wall": "GET /api/maps (picture cached), median ms",
    "maps_bytes": "/api/maps answer, median bytes",
    "no_browser": "no browser: debounce + GET /api/image from Python, median / p95 ms",
}


def measure(tools, port, seed, results, pace, dwell_s, debounce):
    """Every scenario once against the server on `port`, in a new tab; appends to results (lists by MEASURES)."""
    session = tools.open(f"http://127.0.0.1:{port}/", 1240, 1000)

    def pausing(seed, maps, dwell, key):
        reset(tools, session, seed, maps)
        for i, ch in enumerate(SENTENCE):
            tools.press(session, ch)
            tools.wait_until(session, shown(SENTENCE[:i + 1], seed), 60, DRAWN)
            time.sleep(dwell)
        lat = {d["prompt"]: d for d in tools.evaluate(session, "window.mdrefLive.latencies")
               if d["side"] == "A" and d["seed"] == str(seed)}
        rows = [lat[SENTENCE[:i + 1]] for i in range(len(SENTENCE))]
        results[key] += [d["ms"] for d in rows]
        if key == "pause":
            for part in ("waited", "request", "decode"):
                results[f"pause_{part}"] += [d[part] for d in rows]

    pausing(seed, False, 0.0, "pause")
    pausing(seed + 1, True, dwell_s, "pause_maps")
    reset(tools, session, seed + 2, False)
    for ch in SENTENCE:
        tools.press(session, ch)
        time.sleep(pace)
    tools.wait_until(session, shown(SENTENCE, seed + 2), 60, DRAWN)
    lat = [d for d in tools.evaluate(session, "window.mdrefLive.latencies")
           if d["side"] == "A" and d["seed"] == str(seed + 2)]
    results["steady"] += [d["ms"] for d in lat]
    results["steady_last"].append(next(d["ms"] for d in lat if d["prompt"] == SENTENCE))
    results["steady_drawn"].append(len(lat))
    tools.evaluate(session, "document.getElementById('show-maps').checked = false")
    for i in range(len(SENTENCE)):                       # from Python, the page idle
        q = urlencode({"prompt": SENTENCE[:i + 1], "seed": seed + 3})
        time.sleep(debounce / 1000)
        t0 = time.perf_counter()
        status, _, _, image_ms = get(port, "/api/image?" + q)
        assert status == 200
        results["no_browser"].append(debounce + (time.perf_counter() - t0) * 1000)
        results["image_model"].append(image_ms)
        status, body, wall, maps_ms = get(port, "/api/maps?" + q)
        assert status == 200
        results["maps_model"].append(maps_ms)
        results["maps_wall"].append(wall)
        results["maps_bytes"].append(len(body))
    return session


def cell(key, values):
    s = summary(values)
    if not s.get("n"):
        return "n/a"
    if key in ("pause", "pause_maps", "steady", "no_browser"):
        return f"{s['median']:.0f} / {s['p95']:.0f}"
    return f"{s['median']:.0f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs every setting once (default 3)")
    ap.add_argument("--pace", type=float, default=0.15, help="seconds between keys when typing steadily")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--screenshot", help="also write a screenshot of the page (1240 px wide) here")
    args = ap.parse_args(argv)
    exe = chromium()
    if exe is None:
        raise SystemExit("no chromium on PATH (apt-get install chromium)")
    debounce, dwell_s = debounce_ms(), (maps_delay_ms() + 30) / 1000
    load0 = os.getloadavg()
    results = {name: {k: [] for k in MEASURES} for name in SETTINGS}
    with tempfile.TemporaryDirectory() as profile:
        tools = DevTools(exe, profile)
        try:
            seed = 1000
            for r in range(args.rounds):
                for name, options in SETTINGS.items():  # one server at a time: an idle one's BLAS threads may spin
                    server, port = start_server(options)
                    try:
                        session = measure(tools, port, seed, results[name], args.pace, dwell_s, debounce)
                        seed += 10
                        if args.screenshot and r == args.rounds - 1 and name == next(iter(SETTINGS)):
                            screenshot(tools, session, args.screenshot)
                    finally:
                        server.terminate()
                        server.wait(20)
        finally:
            tools.close()
    load1 = os.getloadavg()
    report = {"sentence": SENTENCE, "debounce_ms": debounce, "rounds": args.rounds, "pace_s": args.pace,
              "load_before": load0, "load_after": load1, "cpus": os.cpu_count(), "results": results}
    print(f"sentence {SENTENCE!r} ({len(SENTENCE)} prefixes), {args.rounds} rounds, debounce {debounce} ms, "
          f"steady pace {args.pace} s, {os.cpu_count()} CPUs, load average {load0[0]:.1f} before, "
          f"{load1[0]:.1f} after\n")
    print("| measure | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for key, label in MEASURES.items():
        print(f"| {label} | " + " | ".join(cell(key, results[name][key]) for name in SETTINGS) + " |")
    for name in SETTINGS:
        ratio = statistics.median(results[name]["maps_model"]) / statistics.median(results[name]["image_model"])
        print(f"{name}: the maps' run costs {ratio:.2f}x the picture's")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def screenshot(tools, session, path):
    """The page as a user first sees it: the default prompts at seed 0, maps on, every map drawn."""
    tools.evaluate(session, "document.getElementById('show-maps').checked = true")
    tools.type(session, "seed", "0")
    tools.type(session, "prompt", SENTENCE)
    tools.wait_until(session, shown(SENTENCE, 0), 60, DRAWN)
    for side in ("", "-b"):
        tools.wait_until(session, maps_shown(side), 60, MAPS)
    tools.evaluate(session, "document.activeElement.blur()")
    height = tools.evaluate(session, "document.querySelector('footer').getBoundingClientRect().bottom")
    Path(path).write_bytes(tools.screenshot(session, 1240, int(height) + 12))


if __name__ == "__main__":
    main()
