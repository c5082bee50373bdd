"""Keystroke-to-picture latency of `mdref live`, measured in headless Chromium, and the cost of the maps.

    HF_HUB_OFFLINE=1 python benchmarks/live_latency.py [--rounds 3] [--json out.json] [--screenshot docs/images/live.png]

What is measured (results and what they say: benchmarks/live-latency.md):
- Servers: `python -m mdref live --port 0` as a user starts it, the default model, one server per BLAS setting
  (OPENBLAS_NUM_THREADS=1, and the machine's default), each in its own process; the browser (Debian's headless
  Chromium, driven over the DevTools pipe by tests/devtools.py) in another.
- "Pause after every key": the sentence is typed one key at a time into prompt A (DevTools Input.dispatchKeyEvent);
  after each key the next waits until the picture of that prefix is on screen, so every prefix is requested as a
  typist who stops there would request it. The latency of a prefix is the page's own figure
  (window.mdrefLive.latencies): performance.now() at the picture decoded on screen minus performance.now() at the
  input event of the key, so it holds the debounce (live.js DEBOUNCE_MS), the request, the model run, the PNG, the
  response and the image decode. Each round uses a seed no round used before, so every request runs the model
  (no cache hit). The servers take the keys in turn, prefix by prefix (interleaved), so both see the same load.
- "Steady typing": the sentence typed at a fixed pace (--pace, default 0.15 s per key, about 80 words a minute)
  without waiting: which prefixes were drawn, their latency, and the latency of the last key's picture.
- Maps: per prefix, GET /api/maps after its picture is cached, from Python: the model time the server reports
  (Server-Timing: one run under mdref.explain's recorder, the maps and the JSON) against the picture's own run.
- Without a browser: per prefix, sleep(DEBOUNCE_MS) then GET /api/image (cold) from Python, the same latency less
  the browser's part.
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
SETTINGS = {"1 BLAS thread": {"OPENBLAS_NUM_THREADS": "1"}, "default threads": {}}


def debounce_ms():
    text = (ROOT / "mdref" / "live.js").read_text()
    return int(re.search(r"const DEBOUNCE_MS = (\d+);", text).group(1))


def maps_delay_ms():
    text = (ROOT / "mdref" / "live.js").read_text()
    return int(re.search(r"const MAPS_DELAY_MS = (\d+);", text).group(1))


def start_server(env_extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", **env_extra)
    for k in ("OPENBLAS_NUM_THREADS",):
        if k not in env_extra:
            env.pop(k, None)
    p = subprocess.Popen([sys.executable, "-m", "mdref", "live", "--port", "0"], stderr=subprocess.PIPE, text=True,
                         env=env)
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


def fmt(s):
    if not s.get("n"):
        return "n/a"
    return f"{s['median']:.0f} / {s['p95']:.0f} (min {s['min']:.0f}, max {s['max']:.0f}, n={s['n']})"


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="typed sentences per setting and scenario (default 3)")
    ap.add_argument("--pace", type=float, default=0.15, help="seconds between keys when typing steadily")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--screenshot", help="also write a screenshot of the page (1240 px wide) here")
    args = ap.parse_args(argv)
    exe = chromium()
    if exe is None:
        raise SystemExit("no chromium on PATH (apt-get install chromium)")
    debounce = debounce_ms()
    load0 = os.getloadavg()
    servers = {name: start_server(env) for name, env in SETTINGS.items()}
    dwell_s = (maps_delay_ms() + 30) / 1000
    results = {name: {k: [] for k in ("pause", "pause_maps", "steady", "steady_last", "steady_drawn", "image_model",
                                      "maps_model", "maps_wall", "maps_bytes", "no_browser")} for name in SETTINGS}
    with tempfile.TemporaryDirectory() as profile:
        tools = DevTools(exe, profile)
        try:
            sessions = {name: tools.open(f"http://127.0.0.1:{port}/", 1240, 1000)
                        for name, (_, port) in servers.items()}
            for name, session in sessions.items():
                tools.wait_until(session, "document.getElementById('image-b').dataset.prompt !== undefined", 120)
            seed = 1000

            def pausing(seed, maps, dwell, key):
                """Type the sentence into prompt A of every page in turn, each key after the picture of the
                prefix before is on screen (and `dwell` seconds more); the latencies per prefix."""
                for name, session in sessions.items():
                    reset(tools, session, seed, maps)
                for i, ch in enumerate(SENTENCE):
                    for name, session in sessions.items():
                        tools.press(session, ch)
                        tools.wait_until(session, shown(SENTENCE[:i + 1], seed), 60, DRAWN)
                    time.sleep(dwell)
                for name, session in sessions.items():
                    lat = tools.evaluate(session, "window.mdrefLive.latencies.filter(d => d.side === 'A')")
                    got = {d["prompt"]: d["ms"] for d in lat if d["seed"] == str(seed)}
                    results[name][key] += [got[SENTENCE[:i + 1]] for i in range(len(SENTENCE))]

            for r in range(args.rounds):
                # pause after every key, the servers in turn: maps off, then maps on with a dwell that lets the
                # maps' run start before the next key (the worst case for the picture)
                seed += 1
                pausing(seed, False, 0.0, "pause")
                seed += 1
                pausing(seed, True, dwell_s, "pause_maps")
                # steady typing, one server at a time (the other is idle)
                for name, session in sessions.items():
                    seed += 1
                    reset(tools, session, seed, False)
                    for ch in SENTENCE:
                        tools.press(session, ch)
                        time.sleep(args.pace)
                    tools.wait_until(session, shown(SENTENCE, seed), 60, DRAWN)
                    lat = [d for d in tools.evaluate(session, "window.mdrefLive.latencies")
                           if d["side"] == "A" and d["seed"] == str(seed)]
                    results[name]["steady"] += [d["ms"] for d in lat]
                    results[name]["steady_last"].append(next(d["ms"] for d in lat if d["prompt"] == SENTENCE))
                    results[name]["steady_drawn"].append(len(lat))
                # the maps, and the latency without a browser, from Python (the pages idle)
                seed += 1
                for i in range(len(SENTENCE)):
                    for name, (_, port) in servers.items():
                        q = urlencode({"prompt": SENTENCE[:i + 1], "seed": seed})
                        time.sleep(debounce / 1000)
                        t0 = time.perf_counter()
                        status, _, _, image_ms = get(port, "/api/image?" + q)
                        assert status == 200
                        results[name]["no_browser"].append(debounce + (time.perf_counter() - t0) * 1000)
                        results[name]["image_model"].append(image_ms)
                        status, body, wall, maps_ms = get(port, "/api/maps?" + q)
                        assert status == 200
                        results[name]["maps_model"].append(maps_ms)
                        results[name]["maps_wall"].append(wall)
                        results[name]["maps_bytes"].append(len(body))
            if args.screenshot:
                session = sessions["1 BLAS thread"]
                tools.evaluate(session, "document.getElementById('show-maps').checked = true")
                tools.type(session, "seed", "0")
                tools.type(session, "prompt", SENTENCE)
                tools.wait_until(session, shown(SENTENCE, 0), 60, DRAWN)
                for side in ("", "-b"):
                    tools.wait_until(session, maps_shown(side), 60, MAPS)
                tools.evaluate(session, "document.activeElement.blur()")
                height = tools.evaluate(session, "document.querySelector('footer').getBoundingClientRect().bottom")
                Path(args.screenshot).write_bytes(tools.screenshot(session, 1240, int(height) + 12))
        finally:
            tools.close()
            for p, _ in servers.values():
                p.terminate()
                p.wait(20)
    load1 = os.getloadavg()
    report = {"sentence": SENTENCE, "debounce_ms": debounce, "rounds": args.rounds, "pace_s": args.pace,
              "load_before": load0, "load_after": load1, "cpus": os.cpu_count(), "settings": {}}
    print(f"sentence {SENTENCE!r} ({len(SENTENCE)} prefixes), {args.rounds} rounds, debounce {debounce} ms, "
          f"{os.cpu_count()} CPUs, load average {load0[0]:.1f} before, {load1[0]:.1f} after\n")
    print("| setting | pause after every key: median / p95 ms | the same, maps on, next key during the maps' run "
          "| steady typing: drawn pictures median / p95 ms "
          "| steady: last key's picture, median ms | pictures drawn of 47 | picture's model run median ms "
          "| maps' model run median ms (x picture) | /api/maps median ms, KB | no browser: debounce + GET, "
          "median / p95 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        s = {k: summary(v) for k, v in r.items()}
        report["settings"][name] = {"summary": s, "raw": r}
        ratio = s["maps_model"]["median"] / s["image_model"]["median"]
        print(f"| {name} | {fmt(s['pause'])} | {fmt(s['pause_maps'])} | {fmt(s['steady'])} | {s['steady_last']['median']:.0f} "
              f"| {statistics.median(r['steady_drawn']):.0f} | {s['image_model']['median']:.0f} "
              f"| {s['maps_model']['median']:.0f} ({ratio:.1f}x) | {s['maps_wall']['median']:.0f}, "
              f"{statistics.median(r['maps_bytes']) / 1024:.1f} | {fmt(s['no_browser'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
