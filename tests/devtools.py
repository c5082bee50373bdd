"""Headless Chromium driven over the Chrome DevTools Protocol, standard library only (the browser tests of `mdref
explain` and `mdref live`, and benchmarks/live_latency.py). Without a browser a test skips, except under CI (env
CI set; .ci/run installs Debian's chromium), where a missing browser is a failure."""

import base64
import json
import os
import shutil
import subprocess
import time

import pytest


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def chromium_or_skip():
    exe = chromium()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but no chromium is installed (.ci/run installs Debian's chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium); CI=1 makes this a failure")
    return exe


class DevTools:
    """Chrome DevTools Protocol over --remote-debugging-pipe (fd 3 in, fd 4 out; JSON messages ended by NUL)."""

    def __init__(self, exe, profile, args=()):
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
               "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-pipe", *args, "about:blank"]
        # the shell puts the two pipe ends on fds 3 and 4, where the pipe transport expects them
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$@" 3<&{to_child} 4>&{from_child}', "bash", *cmd],
                                     pass_fds=(to_child, from_child), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buf, self._id, self.events = b"", 0, []

    def _read(self, deadline):
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method, session=None, timeout=60, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, method, session=None, timeout=60):
        """Read messages until an event `method` has come (from `session`, when given)."""
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method and session in (None, e.get("sessionId")) for e in self.events):
            self.events.append(self._read(deadline))

    def open(self, url, width, height):
        """A new tab at width x height CSS pixels with Page, Runtime, Log and Network events on, navigated to url
        and loaded; returns its session id."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session)
        self.call("Emulation.setDeviceMetricsOverride", session, width=width, height=height, deviceScaleFactor=1,
                  mobile=False)
        self.navigate(session, url)
        return session

    def navigate(self, session, url, timeout=60):
        """Load url in the tab and wait for its load event."""
        self.events = [e for e in self.events if not (e.get("method") == "Page.loadEventFired"
                                                      and e.get("sessionId") == session)]
        self.call("Page.navigate", session, url=url)
        self.wait_for("Page.loadEventFired", session, timeout)

    def evaluate(self, session, expression, timeout=60):
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        r = self.call("Runtime.evaluate", session, timeout=timeout, expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:60]}...: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_until(self, session, expression, timeout=30, event=None):
        """Until the JavaScript `expression` is truthy in the page; returns its value (TimeoutError after timeout
        s). With `event` (a name the page dispatches on window) the page checks again at each such event, nothing
        polls; without, the expression is polled every 20 ms."""
        if event is None:
            deadline = time.monotonic() + timeout
            while True:
                value = self.evaluate(session, expression)
                if value:
                    return value
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{expression} stayed {value!r} for {timeout} s")
                time.sleep(0.02)
        waiter = f"""new Promise((resolve, reject) => {{
          const check = () => {expression};
          if (check()) return resolve(check());
          const on = () => {{
            if (check()) {{ window.removeEventListener({json.dumps(event)}, on); resolve(check()); }}
          }};
          window.addEventListener({json.dumps(event)}, on);
          setTimeout(() => reject(new Error("timed out")), {int(timeout * 1000)});
        }})"""
        try:
            return self.evaluate(session, waiter, timeout=timeout + 10)
        except RuntimeError as e:
            raise TimeoutError(f"{expression} stayed false for {timeout} s ({e})") from None

    def press(self, session, key):
        """One key typed: keyDown with its text (the page sees keydown, keypress, input), then keyUp."""
        self.call("Input.dispatchKeyEvent", session, type="keyDown", text=key, key=key, unmodifiedText=key)
        self.call("Input.dispatchKeyEvent", session, type="keyUp", key=key)

    def clear(self, session, element_id):
        """Focus a text field, select its text and delete it with Backspace (the page sees an input event)."""
        self.evaluate(session, f"(() => {{ const e = document.getElementById({json.dumps(element_id)}); e.focus(); "
                               "e.select(); })()")
        for kind in ("rawKeyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", session, type=kind, key="Backspace", code="Backspace",
                      windowsVirtualKeyCode=8)

    def type(self, session, element_id, text, pause=0.0):
        """Clear a text field, then type `text` into it one key at a time, `pause` seconds apart."""
        self.clear(session, element_id)
        for ch in text:
            self.press(session, ch)
            time.sleep(pause)

    def screenshot(self, session, width, height):
        """PNG bytes of the page's top width x height CSS pixels (beyond the window if need be)."""
        shot = self.call("Page.captureScreenshot", session, format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
        return base64.b64decode(shot["data"])

    def errors(self):
        """Console errors, assertion failures, uncaught exceptions and error log entries seen so far."""
        return [e["params"] for e in self.events
                if (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") in ("error", "assert"))
                or e.get("method") == "Runtime.exceptionThrown"
                or (e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error")]

    def requested(self):
        """The URL of every request the pages made."""
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)
