"""`mdref live`: the API draws what `mdref generate` draws and what `mdref.explain` maps, pixel for pixel; queries
are bounded and refused with one line; the Host / cross-site guards; 1,000 malformed requests (seeded) leave the
server answering correctly and never reach the model; slow and excess connections are cut; the command's error path
and a clean stop on SIGTERM / SIGINT; and the page in headless Chromium: typing redraws the picture, the second
prompt draws beside it, a DNS-rebound name gets 403 (skipped without a browser, except under CI)."""

import base64
import http.client
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from PIL import Image

import mdref
from mdref import explain, live
from mdref.cli import main

from devtools import DevTools, chromium_or_skip

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PROMPT = "a large red circle on the left, blue background"


def _openblas_threads():
    """OpenBLAS's own count of this process (its get function), or None without OpenBLAS."""
    import ctypes

    with open("/proc/self/maps") as f:
        paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    for path in paths:
        lib = ctypes.CDLL(path)
        for symbol in ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                       "openblas_get_num_threads64_", "openblas_get_num_threads"):
            if hasattr(lib, symbol):
                return getattr(lib, symbol)()
    return None


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """These tests run the model as `mdref live` does, on one OpenBLAS thread (much faster on a busy machine); the
    count is restored afterwards for the other test modules."""
    before = _openblas_threads()
    if before is not None:
        live.set_blas_threads(1)
    yield
    if before is not None:
        live.set_blas_threads(before)


@pytest.fixture(scope="module")
def pipe():
    return mdref.Pipeline.from_pretrained()


def _start(pipe, **kw):
    server = live.make_server("127.0.0.1", 0, **kw)
    server.model = live.LiveModel(pipe)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


def _stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def server(pipe):
    server, thread = _start(pipe, request_seconds=1.0, socket_timeout=1.0)
    yield server
    _stop(server, thread)


def get(server, target, headers=None, method="GET"):
    """(status, headers, body) of one request on a new connection; Host is this server's unless given."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, target, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def image_target(prompt, seed, route="/api/image"):
    return f"{route}?{urlencode({'prompt': prompt, 'seed': seed})}"


def pixels(png_bytes):
    return np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB"))


_GENERATED = {}


def generated(prompt, seed, tmp_path):
    """The pixels `mdref generate PROMPT --seed N` writes (the command itself, run once per prompt and seed)."""
    if (prompt, seed) not in _GENERATED:
        out = tmp_path / f"generate-{len(_GENERATED)}.png"
        assert main(["generate", prompt, "--seed", str(seed), "-o", str(out)]) == 0
        _GENERATED[prompt, seed] = np.asarray(Image.open(out).convert("RGB"))
    return _GENERATED[prompt, seed]


def assert_guarded(headers):
    """The headers every response carries, whatever its status."""
    assert headers["x-content-type-options"] == "nosniff"
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "unsafe-eval" not in csp
    assert not [k for k in headers if k.startswith("access-control-")], headers


# ---- the API -----------------------------------------------------------------------------------------------------
def test_the_image_is_what_mdref_generate_draws(server, tmp_path):
    status, headers, body = get(server, image_target(PROMPT, 7))
    assert status == 200 and headers["content-type"] == "image/png"
    assert_guarded(headers)
    assert np.array_equal(pixels(body), generated(PROMPT, 7, tmp_path))
    png = Image.open(io.BytesIO(body))
    assert png.text["prompt"] == PROMPT and png.text["seed"] == "7" and png.text["model"] == "mdref:default"
    # another seed, another picture; the same request again comes from the cache without a model run
    assert not np.array_equal(pixels(get(server, image_target(PROMPT, 8))[2]), pixels(body))
    runs = server.model.runs
    status, headers, again = get(server, image_target(PROMPT, 7))
    assert again == body and server.model.runs == runs and "cache" in headers["server-timing"]


def test_the_maps_are_cross_attention_maps_exactly(server, pipe):
    status, headers, body = get(server, image_target("a small green square at the top", 3, "/api/maps"))
    assert status == 200 and headers["content-type"] == "application/json"
    assert_guarded(headers)
    answer = json.loads(body)
    pairs = explain.cross_attention_maps(pipe, "a small green square at the top", seed=3)
    assert answer["tokens"] == [t for t, _ in pairs]
    assert len(answer["maps"]) == len(pairs)                       # one map per token
    fh, fw = answer["cell"]
    for (_, expected), got in zip(pairs, answer["maps"]):
        full = np.repeat(np.repeat(np.array(got), fh, axis=0), fw, axis=1)     # one value per cell -> pixels
        assert np.array_equal(full, expected)                                 # exact: JSON floats round-trip
    x0 = pipe.run("a small green square at the top", seed=3).x0[0]
    assert np.array_equal(np.array(answer["x0"], dtype=x0.dtype), x0)


def test_the_maps_are_sent_at_their_cells_without_loss():
    rng = np.random.default_rng(0)
    grid = rng.uniform(size=(3, 4, 2))
    maps = np.repeat(np.repeat(grid, 8, axis=1), 16, axis=2)                # [3, 32, 32], cells 8 x 16
    assert live._cell(maps) == (8, 16)
    maps[1, 5, 7] += 1e-12                                                  # one pixel off its cell: no compaction
    assert live._cell(maps) == (1, 1)


def _concurrently(calls):
    """Run the calls in threads at once; their results in order."""
    results = [None] * len(calls)
    threads = [threading.Thread(target=lambda i=i, f=f: results.__setitem__(i, f())) for i, f in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_one_model_run_at_a_time_and_one_run_per_key(server, pipe, monkeypatch):
    """Eight concurrent requests for one new key: the model runs once (the cache is asked again under the lock),
    and never two runs overlap."""
    active, most, lock = [0], [0], threading.Lock()
    real = pipe.run

    def counting(*a, **k):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.05)
            return real(*a, **k)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(pipe, "run", counting)
    runs = server.model.runs
    target = image_target("a small white triangle", 99)
    answers = _concurrently([lambda: get(server, target)] * 8)
    assert [a[0] for a in answers] == [200] * 8 and len({a[2] for a in answers}) == 1
    assert server.model.runs == runs + 1 and most[0] == 1
    other = _concurrently([lambda i=i: get(server, image_target(f"{i}", 99)) for i in range(3)])
    assert [a[0] for a in other] == [200] * 3 and most[0] == 1


def test_the_cache_is_bounded():
    cache = live._LRU(2)
    for k in "abc":
        cache.put(k, k.upper())
    assert cache.get("a") is None and cache.get("b") == "B" and cache.get("c") == "C"
    cache.get("b")
    cache.put("d", "D")                                   # c was used least recently
    assert list(cache.items) == ["b", "d"]


def test_the_explain_page_of_what_is_on_screen(server):
    status, headers, body = get(server, image_target(PROMPT, 7, "/explain"))
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert_guarded(headers)
    assert "script-src" not in headers["content-security-policy"]           # the page has no script at all
    text = body.decode()
    assert "<script" not in text and '<section id="attention">' in text and "a large red circle" in text
    assert "content-disposition" not in headers
    status, headers, _ = get(server, image_target(PROMPT, 7, "/explain") + "&download=1")
    assert status == 200 and headers["content-disposition"].startswith("attachment")


def test_the_page_and_its_files(server):
    status, headers, body = get(server, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in headers["content-security-policy"]
    text = body.decode()
    for needed in ('<textarea id="prompt"', '<textarea id="prompt-b"', '<img id="image"', '<img id="image-b"',
                   'src="/live.js"', 'href="/live.css"'):
        assert needed in text
    assert text.count(f'maxlength="{live.MAX_PROMPT_CHARS}"') == 2              # the page keeps to the limit
    assert "<script>" not in text and " on" + "input=" not in text and "http" not in text.replace("http-equiv", "")
    for route, kind in (("/live.js", "text/javascript"), ("/live.css", "text/css")):
        status, headers, body = get(server, route)
        assert status == 200 and headers["content-type"].startswith(kind) and body
        assert b"http://" not in body and b"https://" not in body      # nothing fetched from outside
    status, headers, body = get(server, "/api/info")
    assert status == 200 and json.loads(body)["model"] == "mdref:default"
    status, headers, _ = get(server, image_target(PROMPT, 7), method="HEAD")
    assert status == 200 and headers["content-type"] == "image/png" and int(headers["content-length"]) > 0


@pytest.mark.parametrize("target, status, reason", [
    ("/api/image?seed=1", 400, "missing parameter 'prompt'"),
    ("/api/image?prompt=a&seed=-1", 400, "seed must be an integer in [0, 2**64)"),
    (f"/api/image?prompt=a&seed={2 ** 64}", 400, "seed must be an integer"),
    ("/api/image?prompt=a&seed=1e3", 400, "seed must be an integer"),
    ("/api/image?prompt=a&prompt=b", 400, "given twice"),
    ("/api/image?prompt=a&size=9", 400, "unknown parameter 'size'"),
    ("/api/image?prompt=%zz", 400, "bad percent-encoding"),
    ("/api/image?prompt=%ff%fe", 400, "not UTF-8"),
    ("/api/image?prompt=a%00b", 400, "control character U+0000"),
    ("/api/image?prompt=" + "x" * 501, 400, "at most 500"),
    ("/api/image?prompt", 400, "not name=value"),
    ("/explain?prompt=a&download=yes", 400, "download must be 0 or 1"),
    ("/?x=1", 400, "takes no query"),
    ("/etc/passwd", 404, "no such page"),
    ("/../mdref/live.py", 404, "no such page"),
    ("/live.html", 404, "no such page"),
    ("/api/image/../../../etc/passwd?prompt=a", 404, "no such page"),
    ("/%2e%2e/%2e%2e/etc/passwd", 404, "no such page"),
    ("http://127.0.0.1/api/image?prompt=a", 400, "must be a path"),
])
def test_a_bad_query_gets_its_status_and_one_line(server, target, status, reason):
    runs = server.model.runs
    got, headers, body = get(server, target)
    assert got == status and headers["content-type"].startswith("text/plain")
    assert_guarded(headers)
    text = body.decode()
    assert reason in text and text.count("\n") == 1 and text.endswith("\n"), text
    assert server.model.runs == runs


@pytest.mark.filterwarnings("ignore:Tokenizer. prompt 0 has")
def test_a_query_at_the_limits_is_served(server, tmp_path):
    status, _, body = get(server, image_target("x" * 500, 2 ** 64 - 1))
    assert status == 200
    status, _, body = get(server, "/api/image?prompt=a+red+circle")            # seed defaults to 0, '+' a space
    assert status == 200 and np.array_equal(pixels(body), generated("a red circle", 0, tmp_path))


@pytest.mark.parametrize("headers, status, reason", [
    ({"Host": "evil.example:{port}"}, 403, "DNS rebinding"),
    ({"Host": "127.0.0.1:1"}, 403, "not this server's address and port"),
    ({"Host": "127.0.0.1"}, 403, "not this server's address"),
    ({"Host": "192.168.1.20:{port}"}, 403, "not this server's address"),
    ({"Host": "localhost:{port}", "Sec-Fetch-Site": "cross-site"}, 403, "cross-site request refused"),
    ({"Host": "localhost:{port}", "Origin": "http://evil.example"}, 403, "cross-origin request refused"),
    ({"Host": "localhost:{port}"}, 200, ""),
    ({"Host": "[::1]:{port}", "Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:{port}"}, 200, ""),
])
def test_the_host_and_cross_site_guards(server, headers, status, reason):
    headers = {k: v.format(port=server.port) for k, v in headers.items()}
    got, answer, body = get(server, image_target("a red circle", 0), headers=headers)
    assert got == status and reason in body.decode(errors="replace")
    assert_guarded(answer)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW"])
def test_other_methods_get_405(server, method):
    status, headers, body = get(server, "/api/image?prompt=a", method=method)
    assert status == 405 and headers["allow"] == "GET, HEAD" and body.count(b"\n") == 1
    assert_guarded(headers)


# ---- malformed requests --------------------------------------------------------------------------------------------
def raw(port, data, timeout=5.0, close_write=True):
    """Send bytes on a new connection; the status of the answer (None: closed without one) and its bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            if close_write:
                s.shutdown(socket.SHUT_WR)
        except OSError:                                  # the server closed first (a line too long): fine
            pass
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    answer = b"".join(chunks)
    if not answer:
        return None, answer
    line = answer.split(b"\r\n", 1)[0].split()
    assert line[0] == b"HTTP/1.1", answer[:200]
    return int(line[1]), answer


def _request(target, host, method="GET", version="HTTP/1.1", headers=()):
    lines = [f"{method} {target} {version}".encode("latin-1")]
    if host is not None:
        lines.append(b"Host: " + host.encode("latin-1"))
    lines += [h if isinstance(h, bytes) else h.encode("latin-1") for h in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def malformed(rng, host):
    """One malformed request: (kind, bytes, the statuses it may get; None = closed without an answer)."""
    kind = rng.choice(["garbage", "http/0.9", "bad-escape", "non-utf8", "raw-bytes", "bad-query", "host", "method",
                       "version", "huge-headers", "path", "body", "truncated", "control-chars"])
    seed = rng.choice(["-1", "abc", str(2 ** 64), "1.5", "0x10", "", "9" * 30, "%20"])
    if kind == "garbage":
        return kind, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) + b"\r\n\r\n", \
            {400, 405, 414, 505, None}
    if kind == "http/0.9":
        return kind, rng.choice([b"GET /\r\n", b"GET /api/image?prompt=a\r\n", b"POST /\r\n"]), {400}
    if kind == "bad-escape":
        q = rng.choice(["prompt=%zz", "prompt=%4", "prompt=%", "prompt=a%g1", "%zz=1", "prompt=%%41"])
        return kind, _request(f"/api/image?{q}", host), {400}
    if kind == "non-utf8":
        q = rng.choice(["%ff", "%c3%28", "%e0%a4", "%ed%a0%80", "%f8%88%80%80%80", "%80"])
        return kind, _request(f"/api/maps?prompt=a{q}b", host), {400}
    if kind == "raw-bytes":
        junk = bytes(rng.randrange(128, 256) for _ in range(rng.randrange(1, 20)))
        return kind, b"GET /api/image?prompt=" + junk + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n", {400}
    if kind == "bad-query":
        q = rng.choice([f"prompt=a&seed={seed}", "seed=1", "prompt=a&prompt=b", "prompt=a&x=1", "prompt",
                        "prompt=" + "y" * rng.randrange(501, 2000), "&&", "prompt=a&seed=1&seed=2", "=a"])
        return kind, _request(rng.choice(["/api/image", "/api/maps", "/explain"]) + "?" + q, host), {400, 414}
    if kind == "control-chars":
        c = rng.choice([0, 1, 8, 11, 12, 27, 31, 127])
        return kind, _request(f"/api/image?prompt=a%{c:02x}", host), {400}
    if kind == "host":
        port = host.rsplit(":", 1)[1]
        hosts = rng.choice([[], ["evil.example:" + port], ["127.0.0.1:1"], [host, host], ["127.0.0.1:" + port + "x"],
                            ["attacker.test"], ["127.0.0.2:" + port], [f"localhost.:{port}"]])
        data = _request("/api/image?prompt=a", None, headers=[f"Host: {h}" for h in hosts])
        return kind, data, {400, 403}
    if kind == "method":
        m = rng.choice(["POST", "PUT", "DELETE", "OPTIONS", "TRACE", "CONNECT", "PATCH", "BREW", "get"])
        extra = ["Content-Length: 5"] if rng.random() < 0.5 else []
        data = _request("/api/image?prompt=a", host, method=m, headers=extra) + (b"hello" if extra else b"")
        return kind, data, {405}
    if kind == "version":
        v = rng.choice(["HTTP/2.0", "HTTP/9.9", "HTTP/1.x", "FTP/1.0", "HTTP/1.1.1", "HTTP/" + "1" * 20 + ".0"])
        return kind, _request("/", host, version=v), {400, 505}
    if kind == "huge-headers":
        which = rng.choice(["line", "count", "target", "requestline"])
        if which == "line":
            return kind, _request("/", host, headers=["X-Big: " + "a" * 70000]), {431}
        if which == "count":
            return kind, _request("/", host, headers=[f"X-{i}: {i}" for i in range(120)]), {431}
        if which == "target":
            return kind, _request("/api/image?prompt=" + "a" * 9000, host), {414}
        return kind, _request("/" + "a" * 70000, host), {414}
    if kind == "path":
        p = rng.choice(["/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "//etc/passwd", "/live.js/../../x",
                        "/mdref/live.py", "/api", "/api/", "/api/image/", "/API/IMAGE?prompt=a", "/index.html",
                        "/.git/config", "/live.html", "/%00", "/favicon.ico/../live.py"])
        return kind, _request(p, host), {404}
    if kind == "body":
        extra = rng.choice([["Content-Length: 3"], ["Transfer-Encoding: chunked"], ["Content-Length: 99999999"]])
        return kind, _request("/api/image?prompt=a", host, headers=extra) + b"abc", {400}
    # truncated: a request cut before its Host header is complete, then the client stops sending
    full = _request(image_target("a red circle", 1), host)
    return kind, full[:rng.randrange(1, full.index(b"Host: ") + 8)], {400, 403, None}


def test_a_thousand_malformed_requests_leave_the_server_answering(server, pipe):
    rng = random.Random(30)
    host = f"127.0.0.1:{server.port}"
    runs = server.model.runs
    kinds = {}
    for i in range(1000):
        kind, data, allowed = malformed(rng, host)
        status, answer = raw(server.port, data)
        assert status in allowed, (i, kind, data[:120], answer[:300])
        if status is not None:
            head, _, body = answer.partition(b"\r\n\r\n")
            assert b"X-Content-Type-Options: nosniff" in head and b"Content-Security-Policy: default-src" in head
            assert b"Access-Control" not in head and body.count(b"\n") == 1, (kind, answer[:300])
        kinds[kind] = kinds.get(kind, 0) + 1
    assert len(kinds) == 14 and min(kinds.values()) > 30, kinds
    assert server.model.runs == runs                       # no malformed request reached the model
    status, _, body = get(server, image_target("a small purple square", 4))
    assert status == 200 and np.array_equal(pixels(body), pipe.run("a small purple square", seed=4).pixels[0])
    deadline = time.monotonic() + 5
    while server.open_connections() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.open_connections() == 0                  # every connection's thread ended


def test_slow_and_excess_connections_are_cut(pipe):
    """A request trickling in (each byte within the socket timeout) is cut after request_seconds; connections over
    the limit get 503 at once; afterwards the server answers."""
    server, thread = _start(pipe, request_seconds=0.5, socket_timeout=5.0, max_connections=3)
    try:
        slow = []
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n".encode())
            slow.append(s)
        time.sleep(0.1)
        assert raw(server.port, _request("/", f"127.0.0.1:{server.port}"))[0] == 503
        t0 = time.monotonic()
        cut = []
        for _ in range(30):                                    # trickle one header byte each 0.1 s
            for s in slow:
                if s in cut:
                    continue
                try:
                    s.sendall(b"X")
                    s.settimeout(0.001)
                    if s.recv(1) == b"":
                        cut.append(s)
                except (BlockingIOError, TimeoutError):
                    pass
                except OSError:
                    cut.append(s)
            if len(cut) == len(slow):
                break
            time.sleep(0.1)
        assert len(cut) == 3 and time.monotonic() - t0 < 2.5
        for s in slow:
            s.close()
        deadline = time.monotonic() + 3
        while server.open_connections() and time.monotonic() < deadline:
            time.sleep(0.05)
        status, _, body = get(server, "/api/info")
        assert status == 200 and json.loads(body)["width"] == 64
    finally:
        _stop(server, thread)


def test_an_idle_keep_alive_connection_is_closed(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/api/info")
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Connection") != "close"
    r.read()
    conn.request("GET", "/live.css")                        # the same connection serves a second request
    assert conn.getresponse().read()
    t0 = time.monotonic()
    assert conn.sock.recv(1) == b"" and time.monotonic() - t0 < 3      # closed after request_seconds idle
    conn.close()


# ---- the command ---------------------------------------------------------------------------------------------------
def _one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.startswith("mdref: error: ") and err.count("\n") == 1, err
    return err


def test_a_port_in_use_bad_host_and_bad_model_exit_2(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["live", "--port", str(port)]) == 2
        assert "address already in use" in _one_error_line(capsys)
    assert main(["live", "--host", "example.com"]) == 2
    assert "--host example.com: not an IP address" in _one_error_line(capsys)
    assert main(["live", "--host", "203.0.113.7", "--port", "0"]) == 2
    assert "cannot listen there" in _one_error_line(capsys)
    assert main(["live", "--port", "70000"]) == 2
    assert "--port 70000" in _one_error_line(capsys)
    assert main(["live", "--blas-threads", "-1"]) == 2
    assert "--blas-threads -1" in _one_error_line(capsys)
    with socket.socket() as probe:                          # the model's error path releases the port it bound
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["live", "--port", str(port), "--model", str(tmp_path / "missing")]) == 2
    assert "no such folder" in _one_error_line(capsys)
    assert main(["live", "--port", str(port), "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in _one_error_line(capsys)
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


def test_set_blas_threads_sets_openblas_own_count():
    before = _openblas_threads()
    if before is None:
        pytest.skip("numpy is not linked to OpenBLAS here")
    try:
        assert live.set_blas_threads(2) is not None and _openblas_threads() == 2
        assert live.set_blas_threads(1) is not None and _openblas_threads() == 1
    finally:
        live.set_blas_threads(before)
    assert _openblas_threads() == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_command_serves_and_stops_cleanly(sig):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # as a terminal starts a foreground command: SIGINT at its default (a shell without job control starts
    # background commands with SIGINT ignored, and Python then keeps it ignored)
    p = subprocess.Popen([sys.executable, "-m", "mdref", "live", "--port", "0"], stderr=subprocess.PIPE, text=True,
                         env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = p.stderr.readline()
        assert line.startswith("mdref live: serving mdref:default at http://127.0.0.1:"), line
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/image?prompt=a+red+circle")
        assert conn.getresponse().status == 200
        conn.close()
        p.send_signal(sig)
        assert p.wait(timeout=20) == 0
        rest = p.stderr.read()
        assert rest.strip() == "mdref live: stopped" and "Traceback" not in rest, rest
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
    with socket.socket() as again:                          # the port is free again
        again.bind(("127.0.0.1", port))


# ---- in a real browser -------------------------------------------------------------------------------------------
PROMPT_B = "a large red circle on the right, blue background"
SEED = 12


SHOWN = """(async () => {
  // the picture on screen: the pixels the browser decoded (drawn on a canvas), and the PNG of its API URL (the
  // server's cache: the bytes the page was sent)
  const img = document.getElementById(%s);
  const bytes = new Uint8Array(await (await fetch(img.dataset.api)).arrayBuffer());
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  const b64 = a => { let s = ""; for (const x of a) s += String.fromCharCode(x); return btoa(s); };
  return {png: b64(bytes), rgba: b64(rgba), w: canvas.width, h: canvas.height, prompt: img.dataset.prompt,
          seed: img.dataset.seed, shownWidth: img.getBoundingClientRect().width,
          left: img.getBoundingClientRect().left, top: img.getBoundingClientRect().top};
})()"""


def _shown(tools, session, element):
    s = tools.evaluate(session, SHOWN % json.dumps(element))
    rgba = np.frombuffer(base64.b64decode(s["rgba"]), np.uint8).reshape(s["h"], s["w"], 4)
    return s, pixels(base64.b64decode(s["png"])), rgba


def test_typing_in_headless_chromium_redraws_the_pictures(server, pipe, tmp_path):
    exe = chromium_or_skip()
    port = server.port
    tools = DevTools(exe, tmp_path / "profile", args=["--host-resolver-rules=MAP rebind.test 127.0.0.1"])
    try:
        session = tools.open(server.url, width=1240, height=1000)
        tools.wait_until(session, "document.getElementById('image-b').dataset.prompt !== undefined")
        tools.type(session, "seed", str(SEED))
        tools.type(session, "prompt", PROMPT, pause=0.02)
        tools.wait_until(session, f"document.getElementById('image').dataset.prompt === {json.dumps(PROMPT)} && "
                                  f"document.getElementById('image').dataset.seed === '{SEED}'", event="mdref-drawn")
        a, a_png, a_rgba = _shown(tools, session, "image")
        tools.type(session, "prompt-b", PROMPT_B)
        tools.wait_until(session, f"document.getElementById('image-b').dataset.prompt === {json.dumps(PROMPT_B)}",
                         event="mdref-drawn")
        b, b_png, b_rgba = _shown(tools, session, "image-b")
        tools.wait_until(session, "document.getElementById('maps').dataset.key === "
                                  "document.getElementById('image').dataset.api?.split('?')[1]", event="mdref-maps")
        maps = tools.evaluate(session, "[...document.querySelectorAll('#maps figcaption')].map(f => f.textContent)")
        x0_width = tools.evaluate(session, "document.getElementById('x0').width")
        latencies = tools.evaluate(session, "window.mdrefLive.latencies")
        errors_on_page = tools.evaluate(session, "window.mdrefLive.errors")
        explain_href = tools.evaluate(session, "document.getElementById('explain').getAttribute('href')")
        png = tools.screenshot(session, 1240, 1000)
        # new noise: both pictures redraw from the seed it chose
        tools.evaluate(session, "document.getElementById('new-noise').click()")
        new_seed = tools.wait_until(session, "(() => { const s = document.getElementById('seed').value, "
                                             "a = document.getElementById('image').dataset.seed, "
                                             "b = document.getElementById('image-b').dataset.seed; "
                                             f"return s !== '{SEED}' && a === s && b === s && s; }})()",
                                    event="mdref-drawn")
        # the explain page of what is on screen, under its own CSP: every picture shown, no CSP violation
        tools.navigate(session, server.url.rstrip("/") + explain_href)
        explained = tools.evaluate(session, "({maps: document.querySelectorAll('#attention img.token-map').length, "
                                            "broken: [...document.images].filter(i => !(i.complete && "
                                            "i.naturalWidth > 0)).length, title: document.title})")
        # a page of another name that resolves to 127.0.0.1 (DNS rebinding) is refused
        tools.navigate(session, f"http://rebind.test:{port}/")
        refused = tools.evaluate(session, "document.body.innerText")
    finally:
        tools.close()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "live-page.png").write_bytes(png)
    # the pictures are what `mdref generate` draws, as PNG bytes and as the pixels the browser shows
    assert (a["prompt"], a["seed"], b["seed"]) == (PROMPT, str(SEED), str(SEED))
    assert np.array_equal(a_png, generated(PROMPT, SEED, tmp_path))
    assert np.array_equal(a_rgba[..., :3], a_png) and (a_rgba[..., 3] == 255).all()
    assert np.array_equal(b_png, generated(PROMPT_B, SEED, tmp_path))
    assert np.array_equal(b_rgba[..., :3], b_png)
    assert not np.array_equal(a_png, b_png)
    assert a["shownWidth"] == b["shownWidth"] >= 256 and b["left"] > a["left"] + 256 and b["top"] == a["top"]
    # beside picture A: its maps, one per token, and x0's eight 8x8 channels
    assert maps == [t for t, _ in explain.cross_attention_maps(pipe, PROMPT, seed=SEED)]
    assert x0_width == 8 * 9 - 1
    assert explain_href == "/explain?" + urlencode({"prompt": PROMPT, "seed": SEED})
    assert [d for d in latencies if d["prompt"] == PROMPT and d["seed"] == str(SEED)]
    assert errors_on_page == []
    assert int(new_seed) < 2 ** 32
    assert explained == {"maps": len(maps), "broken": 0, "title": f"mdref explain: {PROMPT}"}
    assert f"Host 'rebind.test:{port}' is not this server's address and port" in refused
    errors = [e for e in tools.errors() if "rebind.test" not in json.dumps(e)]
    assert errors == []
    fetched = [u for u in tools.requested()
               if not u.startswith(("blob:", "data:", server.url, f"http://rebind.test:{port}/"))]
    assert fetched == []
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
