"""Debian's headless Chromium, driven over the DevTools protocol on a pipe (no port, no extra
library): the fleet page's browser test (tests/integration/test_fleetpage.py) and the docs'
screenshots (testing/screenshots.py) both use it.

Run it inside a host's network namespace by giving `Browser` an argv prefix such as
`["ip", "netns", "exec", ns]`: it then reaches only that host's loopback and links.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from testing.region import wait_for

CHROMIUM = shutil.which("chromium")

# Chromium must not talk to anything but the page: no sync, updates, safe-browsing lists,
# metrics or crash uploads (inside the head's namespace it has no route out anyway).
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-default-apps", "--disable-extensions", "--disable-breakpad",
    "--disable-domain-reliability", "--disable-client-side-phishing-detection", "--metrics-recording-only",
    "--safebrowsing-disable-auto-update", "--no-pings", "--no-proxy-server", "--mute-audio", "--hide-scrollbars",
    "--window-size=1440,900", "--remote-debugging-pipe",
    # Off loopback the page is HTTPS with the head's certificate, signed by the head's own CA,
    # which this throwaway profile does not trust.
    "--ignore-certificate-errors",
]


class Browser:
    """Chromium over the DevTools protocol on a pipe: commands go in on its fd 3, answers and
    events come out on its fd 4, each message JSON ended by a NUL byte."""

    def __init__(self, argv_prefix: list[str], profile: Path, log: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def fds() -> None:  # in the child, before exec: the pipe ends Chromium expects
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        with log.open("ab") as out:
            self.proc = subprocess.Popen([*argv_prefix, CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                          "about:blank"], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         preexec_fn=fds, pass_fds=(3, 4), start_new_session=True)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next = 0
        self._answers: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session = ""

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_chrome, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._answers[-1] = {"error": {"message": "chromium closed the pipe"}}
                    self._cond.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._answers[msg["id"]] = msg
                        self._cond.notify_all()

    def call(self, method: str, timeout: float = 60, session: bool = True, **params: Any) -> dict[str, Any]:
        with self._cond:
            self._next += 1
            mid = self._next
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._answers or -1 in self._answers, timeout):
                raise TimeoutError(f"chromium did not answer {method} within {timeout:.0f} s")
            answer = self._answers.pop(mid, None) or self._answers[-1]
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error'].get('message')}")
        return answer.get("result", {})

    def open(self, url: str, width: int = 1440, height: int = 900) -> None:
        target = self.call("Target.createTarget", session=False, url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", session=False, targetId=target, flatten=True)["sessionId"]
        self.resize(width, height)
        self.goto(url)

    def resize(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails'].get('text')}: {expression[:200]}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float, what: str) -> Any:
        value: Any = None

        def true() -> bool:
            nonlocal value
            try:
                value = self.js(expression)
            except RuntimeError:
                return False
            return bool(value)
        wait_for(true, timeout, what, interval=0.25)
        return value

    def screenshot(self, path: Path, full_page: bool = False, height: int | None = None) -> Path:
        """The page as PNG: the viewport, the whole page (`full_page`), or the viewport's
        top `height` pixels."""
        params: dict[str, Any] = {"format": "png"}
        if height is not None:
            width = self.js("document.documentElement.clientWidth")
            params["clip"] = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
        elif full_page:
            size = self.js("({w: document.documentElement.scrollWidth, h: document.documentElement.scrollHeight})")
            params["clip"] = {"x": 0, "y": 0, "width": size["w"], "height": size["h"], "scale": 1}
            params["captureBeyondViewport"] = True
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))
        return path

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("Browser.close", timeout=10, session=False)
                self.proc.wait(timeout=10)
        except Exception:
            pass
        if self.proc.poll() is None:
            # Its renderers and helpers share the process group we gave it.
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass
