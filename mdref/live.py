"""`mdref live`: a local web page where the picture redraws while you type, two prompts side by side from the same
noise, with each picture's per-token cross-attention maps and the UNet's x0, and the full `mdref explain` page of
what is on screen one click away.

    mdref live                       # http://127.0.0.1:8765/ ; Ctrl-C stops it

The server is the standard library's (http.server, one thread per connection); the page is three package files
(live.html, live.css, live.js: plain JavaScript, no build step, nothing fetched from outside). Routes, GET and HEAD:

    /                                the page; /live.js, /live.css its script and style
    /api/info                        JSON: the model, the image size, the limits below
    /api/image?prompt=P&seed=N       PNG, pixel-identical to `mdref generate P --seed N` with the same model options
    /api/maps?prompt=P&seed=N        JSON: one cross-attention map per token (mdref.explain.cross_attention_maps)
                                     and x0, the UNet's clean latent
    /explain?prompt=P&seed=N         the `mdref explain` page of that prompt and seed (&download=1: as a file)

Bounded: a prompt of at most MAX_PROMPT_CHARS characters, a seed in [0, 2**64), one model run at a time (a lock),
a small LRU cache by (what, prompt, seed), at most MAX_CONNECTIONS connections, each request read in full within
REQUEST_SECONDS. A bad query gets 400 and one line saying why, an unknown path 404, a method other than GET / HEAD
405, and the server keeps serving.

Security (a local developer tool; docs/live.md): bound to 127.0.0.1 unless --host says otherwise; a request whose
Host header is not this server's address and port gets 403 (DNS rebinding), so does a cross-site fetch
(Sec-Fetch-Site, Origin); no part of a request ever names a file (the three page files are fixed names read once);
every response carries a restrictive Content-Security-Policy (no external source, no inline script), nosniff, no
CORS headers.
"""

from __future__ import annotations

import io
import ipaddress
import json
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import unquote_to_bytes

import numpy as np

from . import __version__
from .guards import SEED_LIMIT          # 0 <= seed < 2**64

__all__ = ["LiveModel", "LiveServer", "ServeError", "make_server", "serve", "parse_query", "BadRequest",
           "DEFAULT_PORT", "MAX_PROMPT_CHARS"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MAX_PROMPT_CHARS = 500            # characters; CLIP reads 77 tokens at most, and a long prompt is slower to check
MAX_TARGET = 8192                 # bytes of the request target (a 500-character prompt percent-encoded fits)
CACHE_ENTRIES = 256               # per kind: images (a few KB each), maps, explain pages (fewer: ~200 KB each)
EXPLAIN_ENTRIES = 8
MAX_CONNECTIONS = 32              # open connections at once; more are answered 503 and closed
REQUEST_SECONDS = 10.0            # a request line and its headers must arrive within this (slowloris)
MODEL_WAIT_SECONDS = 60.0         # a request waits this long for the model lock, then gets 503
PAGE_FILES = {"/": ("live.html", "text/html; charset=utf-8"),            # route -> (package file, Content-Type)
              "/live.js": ("live.js", "text/javascript; charset=utf-8"),
              "/live.css": ("live.css", "text/css; charset=utf-8")}

# Content-Security-Policy per kind of response: the page runs only its same-origin script, loads only its own
# style, pictures from this server or blob: URLs it made, and talks only to this server; the explain page (no
# script at all) carries its style and its images inline; everything else (PNG, JSON, errors) may load nothing.
CSP_PAGE = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
CSP_EXPLAIN = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
               "frame-ancestors 'none'")
CSP_DATA = "default-src 'none'; frame-ancestors 'none'; sandbox"


class ServeError(Exception):
    """The server cannot start (a bad --host, a port in use): one line for `mdref: error: ...`."""


class BadRequest(Exception):
    """A request refused before any work: an HTTP status and a one-line reason."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status, self.reason = status, reason


# ---- the query ------------------------------------------------------------------------------------------------
PARAMS = {"/api/image": ("prompt", "seed"), "/api/maps": ("prompt", "seed"),
          "/explain": ("prompt", "seed", "download")}
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _decode(part, what):
    """One percent-encoded query part ('+' is a space) -> str; bad escapes and non-UTF-8 bytes are refused."""
    if _BAD_ESCAPE.search(part):
        raise BadRequest(400, f"{what}: bad percent-encoding (a '%' must be followed by two hex digits)")
    try:
        return unquote_to_bytes(part.replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(400, f"{what}: not UTF-8 after percent-decoding ({e.reason} at byte {e.start})") from None


def parse_query(query, allowed):
    """'prompt=a+red+circle&seed=3' -> {'prompt': 'a red circle', 'seed': 3}. Every parameter at most once and
    named in `allowed`; prompt required (at most MAX_PROMPT_CHARS characters, no control characters but tab and
    newline); seed optional (default 0), decimal digits, 0 <= seed < 2**64; download optional, 0 or 1.
    Raises BadRequest(400, reason)."""
    values = {}
    for part in query.split("&") if query else []:
        if "=" not in part:
            raise BadRequest(400, f"query part {part[:40]!r} is not name=value")
        raw_name, raw_value = part.split("=", 1)
        name = _decode(raw_name, "a parameter name")
        if name not in allowed:
            raise BadRequest(400, f"unknown parameter {name[:40]!r}; this route takes {', '.join(allowed)}")
        if name in values:
            raise BadRequest(400, f"parameter {name!r} given twice")
        values[name] = _decode(raw_value, name)
    if "prompt" not in values:
        raise BadRequest(400, "missing parameter 'prompt'")
    prompt = values["prompt"]
    if len(prompt) > MAX_PROMPT_CHARS:
        raise BadRequest(400, f"prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    bad = _CONTROL.search(prompt)
    if bad:
        raise BadRequest(400, f"prompt holds the control character U+{ord(bad.group()):04X}")
    seed = values.get("seed", "0")
    if not re.fullmatch(r"[0-9]{1,20}", seed) or int(seed) >= SEED_LIMIT:
        raise BadRequest(400, f"seed must be an integer in [0, 2**64), found {seed[:40]!r}")
    out = {"prompt": prompt, "seed": int(seed)}
    if "download" in values:
        if values["download"] not in ("0", "1"):
            raise BadRequest(400, f"download must be 0 or 1, found {values['download'][:40]!r}")
        out["download"] = values["download"] == "1"
    return out


# ---- the model: one run at a time, results cached -------------------------------------------------------------
class _LRU:
    """A small least-recently-used cache, safe to share between the connection threads."""

    def __init__(self, size):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            return None

    def put(self, key, value):
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


def _png(pixels, text):
    """uint8 [H, W, 3] -> PNG bytes with text metadata."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _cell(maps):
    """The largest (fh, fw) dividing the maps' height and width such that every map [n, H, W] is constant on fh x fw
    cells: the maps are nearest-upsampled attention grids, so sending one value per cell loses nothing."""
    def largest(axis):
        size = maps.shape[axis]
        for f in range(size, 0, -1):
            if size % f == 0 and np.array_equal(maps, np.repeat(np.take(maps, range(0, size, f), axis), f, axis)):
                return f
    return largest(1), largest(2)


class LiveModel:
    """A Pipeline behind a lock, with LRU caches of what the routes serve: the image's PNG and x0 by (prompt, seed),
    the maps' JSON, the explain pages. `runs` counts the model runs (tests check what the cache saved)."""

    def __init__(self, pipe, wait_seconds=MODEL_WAIT_SECONDS):
        self.pipe = pipe
        self.lock = threading.Lock()
        self.wait_seconds = wait_seconds
        self.cache = {"image": _LRU(CACHE_ENTRIES), "maps": _LRU(CACHE_ENTRIES), "explain": _LRU(EXPLAIN_ENTRIES)}
        self.runs = 0
        self.height, self.width = pipe.default_size()

    def info(self):
        d = self.pipe.describe()
        return {"mdref_version": __version__, "model": str(self.pipe.source), "untrained": self.pipe.untrained,
                "dtype": d["dtype"], "parameters": d["parameters"]["total"], "height": self.height,
                "width": self.width, "latent_shape": d["latent_shape"], "max_prompt_chars": MAX_PROMPT_CHARS,
                "seed_limit": str(SEED_LIMIT)}

    def _cached(self, kind, key, compute):
        """(value, model seconds or None when cached): the cache, else compute under the lock (one run at a time;
        the cache is asked again once the lock is held, so concurrent requests for one key run the model once).
        The pipeline's refusals (InputError) are 400, a non-finite run (NonFiniteError) 500, each one line."""
        from .pipeline import InputError, NonFiniteError

        hit = self.cache[kind].get(key)
        if hit is not None:
            return hit, None
        if not self.lock.acquire(timeout=self.wait_seconds):
            raise BadRequest(503, f"the model is busy (waited {self.wait_seconds:.0f} s for the run before)")
        try:
            hit = self.cache[kind].get(key)
            if hit is not None:
                return hit, None
            t0 = time.perf_counter()
            self.runs += 1
            try:
                value = compute()
            except InputError as e:
                raise BadRequest(400, str(e)) from None
            except NonFiniteError as e:
                raise BadRequest(500, str(e)) from None
            self.cache[kind].put(key, value)
            return value, time.perf_counter() - t0
        finally:
            self.lock.release()

    def image(self, prompt, seed):
        """(PNG bytes, x0 [C, h, w]) of one run, and the model seconds (None: cached)."""
        def compute():
            r = self.pipe.run(prompt, seed=seed)
            text = {"prompt": prompt, "seed": str(seed), "model": str(self.pipe.source),
                    "mdref_version": __version__, "software": "mdref live"}
            return _png(r.pixels[0], text), np.array(r.x0[0])
        return self._cached("image", (prompt, seed), compute)

    def maps(self, prompt, seed):
        """The /api/maps JSON (bytes): the tokens, one map per token at one value per cell of `cell` pixels (upsample
        nearest to get mdref.explain.cross_attention_maps exactly), and x0 [C][h][w]; and the model seconds."""
        from . import explain

        (_, x0), image_s = self.image(prompt, seed)

        def compute():
            pairs = explain.cross_attention_maps(self.pipe, prompt, seed=seed)
            maps = np.stack([m for _, m in pairs])                          # [n, H, W]
            fh, fw = _cell(maps)
            return json.dumps({
                "prompt": prompt, "seed": str(seed), "height": int(maps.shape[1]), "width": int(maps.shape[2]),
                "cell": [fh, fw], "tokens": [t for t, _ in pairs],
                "maps": maps[:, ::fh, ::fw].tolist(),                       # [n, H / fh, W / fw], float64 exactly
                "x0": x0.astype(np.float64).tolist(),                       # [C, h, w]
            }, allow_nan=False).encode("utf-8")
        body, maps_s = self._cached("maps", (prompt, seed), compute)
        spent = [s for s in (image_s, maps_s) if s is not None]
        return body, sum(spent) if spent else None

    def warm_up(self):
        """One run before the first request (the first run of a process pays for BLAS and PNG set-up)."""
        from . import explain  # noqa: F401  (imported now rather than on the first /api/maps)

        self.image("", 0)

    def explain_page(self, prompt, seed):
        from . import explain

        def compute():
            return explain.explain_page(self.pipe, prompt, seed=seed).encode("utf-8")
        return self._cached("explain", (prompt, seed), compute)


# ---- HTTP -----------------------------------------------------------------------------------------------------
def _server_timing(seconds):
    """The Server-Timing header (the browser's DevTools show it): the model's time, or a cache hit (None)."""
    return 'cache;desc="hit"' if seconds is None else f"model;dur={seconds * 1000:.1f}"


def _page_file(name):
    return resources.files(__package__).joinpath(name).read_bytes()


class Handler(BaseHTTPRequestHandler):
    """One connection. Only GET and HEAD; every response goes through _send (security headers, Content-Length)."""

    protocol_version = "HTTP/1.1"                 # keep-alive: the page's requests reuse a connection
    server_version = "mdref-live"

    def version_string(self):
        return self.server_version                  # no Python version in the Server header

    def setup(self):
        self.timeout = self.server.socket_timeout  # each read and write on the socket (StreamRequestHandler)
        super().setup()

    def handle_one_request(self):
        """The request line and headers must arrive within the server's request_seconds; the reaper closes the
        socket otherwise (a trickle of bytes, each within the socket timeout, does not hold a thread forever)."""
        self.server.watch(self.connection)
        try:
            super().handle_one_request()
        except OSError:                             # the client went away, or the reaper cut it
            self.close_connection = True
        finally:
            self.server.unwatch(self.connection)

    # -- parsing
    def parse_request(self):
        if not super().parse_request():
            return False
        self.server.unwatch(self.connection)       # the headers are in: the request is read
        if self.request_version == "HTTP/0.9":
            self.send_error(400, "HTTP/0.9 requests are not served")
            return False
        if self.command not in ("GET", "HEAD"):
            self._error(405, f"method {self.command[:20]!r} not allowed; use GET or HEAD", close=True)
            return False
        return True

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (bad syntax, a line too long, too many headers, a bad version) in our
        form: one line of text/plain, the security headers, the connection closed."""
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"         # an answer with a status line, even to HTTP/0.9
        self._error(code, message or HTTPStatus(code).phrase, close=True)

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head=False):
        try:
            self._route(head)
        except BadRequest as e:
            self._error(e.status, e.reason)
        except Exception as e:                        # a bug: say so, keep serving
            traceback.print_exc(file=sys.stderr)
            self._error(500, f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    def _check_request(self):
        target = self.path
        if any(not 0x21 <= ord(c) <= 0x7E for c in target):
            raise BadRequest(400, "the request target must be printable ASCII (percent-encode the rest)")
        if len(target) > MAX_TARGET:
            raise BadRequest(414, f"request target over {MAX_TARGET} bytes")
        if not target.startswith("/"):
            raise BadRequest(400, "the request target must be a path starting with '/'")
        if "#" in target:
            raise BadRequest(400, "the request target holds a fragment ('#')")
        if self.headers.get("Content-Length", "0").strip() not in ("", "0") or "Transfer-Encoding" in self.headers:
            self.close_connection = True
            raise BadRequest(400, "a GET or HEAD request has no body")
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1:
            raise BadRequest(400, "missing Host header" if not hosts else "more than one Host header")
        if not self.server.host_allowed(hosts[0]):
            raise BadRequest(403, f"Host {hosts[0][:80]!r} is not this server's address and port (DNS rebinding "
                                  f"guard; open {self.server.url})")
        site = self.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            raise BadRequest(403, f"cross-site request refused (Sec-Fetch-Site: {site[:40]})")
        origin = self.headers.get("Origin")
        if origin is not None and not self.server.origin_allowed(origin):
            raise BadRequest(403, f"cross-origin request refused (Origin: {origin[:80]})")

    def _route(self, head):
        self._check_request()
        path, _, query = self.path.partition("?")
        if path in PAGE_FILES:
            if query:
                raise BadRequest(400, f"{path} takes no query")
            name, ctype = PAGE_FILES[path]
            return self._send(200, self.server.pages[name], ctype, CSP_PAGE, head)
        if path == "/favicon.ico":
            return self._send(204, b"", None, CSP_DATA, head)
        if path == "/api/info":
            return self._send(200, json.dumps(self.server.model.info()).encode(), "application/json", CSP_DATA, head)
        if path not in PARAMS:
            raise BadRequest(404, f"no such page: {path[:80]}")
        q = parse_query(query, PARAMS[path])
        model = self.server.model
        if path == "/api/image":
            (png, _), seconds = model.image(q["prompt"], q["seed"])
            return self._send(200, png, "image/png", CSP_DATA, head, _server_timing(seconds))
        if path == "/api/maps":
            body, seconds = model.maps(q["prompt"], q["seed"])
            return self._send(200, body, "application/json", CSP_DATA, head, _server_timing(seconds))
        body, seconds = model.explain_page(q["prompt"], q["seed"])
        extra = {"Content-Disposition": 'attachment; filename="mdref-explain.html"'} if q.get("download") else {}
        return self._send(200, body, "text/html; charset=utf-8", CSP_EXPLAIN, head, _server_timing(seconds), extra)

    # -- answering
    def _send(self, status, body, ctype, csp, head=False, timing=None, extra=()):
        self.send_response(status)
        if ctype is not None:
            self.send_header("Content-Type", ctype)
        if status != 204:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", csp)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cache-Control", "no-store")
        if timing is not None:
            self.send_header("Server-Timing", timing)
        for k, v in dict(extra).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head and status != 204:
            self.wfile.write(body)

    def _error(self, status, reason, close=False):
        if close:
            self.close_connection = True
        line = " ".join(str(reason).split()) + "\n"           # one line, whatever the reason held
        head = getattr(self, "command", None) == "HEAD"
        self._send(status, line.encode("utf-8", "replace"), "text/plain; charset=utf-8", CSP_DATA, head,
                   extra={"Allow": "GET, HEAD"} if status == 405 else {})


class LiveServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a bound on connections, a reaper for slow requests, and the Host rule."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address, *, max_connections=MAX_CONNECTIONS,
                 request_seconds=REQUEST_SECONDS, socket_timeout=REQUEST_SECONDS, verbose=False):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.model = None
        self.verbose = verbose
        self.socket_timeout = socket_timeout
        self.request_seconds = request_seconds
        self.pages = {name: _page_file(name) for name, _ in PAGE_FILES.values()}
        self.max_connections, self._open, self._count_lock = max_connections, 0, threading.Lock()
        self._deadlines, self._deadlines_lock = {}, threading.Lock()
        self._stop = threading.Event()
        super().__init__(address, Handler)                  # binds and listens (OSError: nothing is left open)
        host = ipaddress.ip_address(address[0])
        self.port = self.server_address[1]
        literal = f"[{host}]" if host.version == 6 else str(host)
        self.url = f"http://{literal}:{self.port}/"
        # Host names this server answers to: its address, and localhost / the loopback addresses; bound to every
        # interface (0.0.0.0, ::), any IP address literal (a DNS name other than localhost is what a rebinding
        # attack uses, an address literal is not).
        self._names = {"localhost", "127.0.0.1", "[::1]", literal}
        self._any_ip = host.is_unspecified
        threading.Thread(target=self._reap, name="mdref-live-reaper", daemon=True).start()

    def server_bind(self):
        """TCPServer's bind without HTTPServer's socket.getfqdn (a DNS lookup that can stall offline)."""
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    # -- the Host rule
    def host_allowed(self, value):
        value = value.strip().lower()
        m = re.fullmatch(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::([0-9]{1,5}))?", value)
        if not m:
            return False
        name, port = m.group(1), int(m.group(2)) if m.group(2) else 80
        if port != self.port:
            return False
        if name in self._names:
            return True
        if self._any_ip:
            try:
                ipaddress.ip_address(name.strip("[]"))
                return True
            except ValueError:
                return False
        return False

    def origin_allowed(self, origin):
        m = re.fullmatch(r"http://(.+)", origin.strip(), flags=re.IGNORECASE)
        return bool(m) and self.host_allowed(m.group(1))

    # -- connections: bounded, and none held open by a slow request
    def open_connections(self):
        """Connections being served now."""
        with self._count_lock:
            return self._open

    def process_request(self, request, client_address):
        with self._count_lock:
            full = self._open >= self.max_connections
            self._open += not full
        if full:
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                                b"Content-Length: 26\r\nConnection: close\r\n\r\ntoo many open connections\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._closed()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed()

    def _closed(self):
        with self._count_lock:
            self._open -= 1

    def watch(self, conn):
        with self._deadlines_lock:
            self._deadlines[conn] = time.monotonic() + self.request_seconds

    def unwatch(self, conn):
        with self._deadlines_lock:
            self._deadlines.pop(conn, None)

    def _reap(self):
        while not self._stop.wait(min(0.25, self.request_seconds / 4)):
            now = time.monotonic()
            with self._deadlines_lock:
                late = [c for c, t in self._deadlines.items() if t < now]
                for c in late:
                    del self._deadlines[c]
            for c in late:
                try:
                    c.shutdown(socket.SHUT_RDWR)       # the blocked read returns; the handler ends
                except OSError:
                    pass

    def handle_error(self, request, client_address):
        """A client that went away is no error of ours; anything else is printed and the server keeps serving."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def server_close(self):
        self._stop.set()
        super().server_close()


def make_server(host=DEFAULT_HOST, port=DEFAULT_PORT, **kw):
    """A bound LiveServer (no model yet: set `server.model = LiveModel(pipe)`), or ServeError naming --host or
    --port. host must be an IP address literal or 'localhost'; port 0 picks a free port."""
    name = "127.0.0.1" if host == "localhost" else host
    try:
        ipaddress.ip_address(name)
    except ValueError:
        raise ServeError(f"--host {host}: not an IP address (127.0.0.1 is this machine only; 0.0.0.0 or :: is "
                         f"every interface)") from None
    if not (isinstance(port, int) and 0 <= port <= 65535):
        raise ServeError(f"--port {port}: expected an integer in [0, 65535] (0: any free port)")
    try:
        return LiveServer((name, port), **kw)
    except OSError as e:
        import errno

        if e.errno == errno.EADDRINUSE:
            raise ServeError(f"--port {port}: address already in use on {host} (another server listens there; "
                             f"choose another --port, or 0 for any free port)") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise ServeError(f"--port {port}: permission denied (ports below 1024 need privileges)") from None
        raise ServeError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def set_blas_threads(n):
    """Set this process's OpenBLAS thread count to n, the way threadpoolctl does: OpenBLAS's own
    openblas_set_num_threads (numpy's wheels carry it as scipy_openblas_set_num_threads64_), looked up in the
    libraries this process has loaded (/proc/self/maps). Returns the name of the library changed, or None when none
    was found (another BLAS, another OS): then nothing changes. For the default model's small matrices one thread is
    faster than several, and far faster on a busy machine (benchmarks/live-latency.md)."""
    import ctypes

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                       "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, symbol):
                getattr(lib, symbol)(ctypes.c_int(n))
                return path.rsplit("/", 1)[-1]
    return None


def serve(server, *, open_browser=False, out=sys.stderr):
    """Serve until Ctrl-C or SIGTERM, then close the socket; returns 0."""
    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()   # shutdown waits for serve_forever

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main else None
    print(f"mdref live: serving {server.model.pipe.source} at {server.url} (Ctrl-C stops)", file=out, flush=True)
    if not ipaddress.ip_address(server.server_address[0]).is_loopback:
        print(f"mdref live: warning: listening on {server.server_address[0]}: anyone who can reach this machine "
              "can use this page and its CPU", file=out, flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if main:
            signal.signal(signal.SIGTERM, previous)
    print("mdref live: stopped", file=out, flush=True)
    return 0
