"""The fleet page in a real browser (Debian's headless Chromium) against a real region: a head
and PCs in network namespaces (testing/region.py).

Chromium runs inside the head's network namespace and opens the page on the head's loopback,
as an operator's SSH tunnel would; it is driven over the DevTools protocol on a pipe (no port,
no extra library). The page is loaded once: every later change it shows came from its own
polling. Screenshots are kept under the test's tmp dir (the path is printed);
GARAGE_FLEET_DOCS=1 also writes docs/fleet.png, the picture in docs/operating.md.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from testing.nvml_double import RTX_3060_12GB, RTX_4060, RTX_4060_TI_16GB, RTX_4090
from testing.region import Testbed, missing_prerequisite, wait_for

CHROMIUM = shutil.which("chromium")
WHY_NOT = missing_prerequisite() or (None if CHROMIUM else "'chromium' is not installed (scripts/install-deps installs it)")
pytestmark = [pytest.mark.testbed, pytest.mark.skipif(bool(WHY_NOT), reason=str(WHY_NOT))]

FLEET_PORT = 8444
OFFLINE_AFTER_S = 8.0  # the testbed's heartbeat is 2 s: four missed heartbeats
HOT_4060_TI = replace(RTX_4060_TI_16GB, temp=91)
DOCS_PNG = Path(__file__).resolve().parents[2] / "docs" / "fleet.png"

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

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", session=False, url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", session=False, targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=1440, height=900, deviceScaleFactor=1, mobile=False)
        self.goto(url)

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

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
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


ROWS = """[...document.querySelectorAll('#pcs tbody tr')].map(tr => ({
    id: tr.dataset.id, status: tr.dataset.status, cls: tr.className,
    cells: [...tr.cells].map(td => td.textContent)}))"""


@pytest.fixture
def region(tmp_path):
    tb = Testbed()
    tb.setup()
    browser = None
    try:
        head = tb.add_head()
        # A short offline_after_s, so a stopped PC turns offline in seconds, and the page on
        # the head's loopback (the default, said explicitly).
        text = head.config.read_text().replace("offline_after_s = 15.0", f"offline_after_s = {OFFLINE_AFTER_S}")
        assert f"offline_after_s = {OFFLINE_AFTER_S}" in text
        head.config.write_text(text + f'\n[fleet]\nlisten_host = "127.0.0.1"\nport = {FLEET_PORT}\n')
        head.init()
        head.start()
        pcs = {"alice-pc": [RTX_4090, RTX_4060], "bob-pc": [RTX_3060_12GB], "carol-pc": [HOT_4060_TI]}
        nodes = {}
        for name, gpus in pcs.items():
            node = tb.add_node(name, gpus)
            node.configure(head.token("--uses", "1"))
            node.start()
            nodes[name] = node
        for node in nodes.values():
            node.wait_state("joined", 180)
        ids = {n["name"]: n["node_id"] for n in head.nodes()}
        browser = Browser(["ip", "netns", "exec", head.ns], tmp_path / "chromium-profile", tmp_path / "chromium.log")
        yield tb, head, nodes, ids, browser
    finally:
        if browser is not None:
            browser.close()
        tb.cleanup()


def test_fleet_page_in_a_browser(region, tmp_path):
    tb, head, nodes, ids, browser = region
    artifacts = tmp_path / "screenshots"
    artifacts.mkdir()
    print(f"fleet page screenshots: {artifacts}")

    # The page is on the head's loopback only: a PC cannot reach it.
    probe = nodes["alice-pc"].run(["curl", "-s", "--max-time", "3", f"http://{head.ip}:{FLEET_PORT}/"], check=False)
    assert probe.returncode != 0

    browser.open(f"http://127.0.0.1:{FLEET_PORT}/")
    rows = browser.wait(f"(() => {{ const r = {ROWS}; return r.length === 3 && r.every(x => x.status === 'online') && r; }})()",
                        60, "the fleet page to list three PCs online")
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == set(ids.values())
    for name, node_id in ids.items():
        cells = by_id[node_id]["cells"]
        assert cells[0] == "online" and cells[1].startswith(name), cells
    # The hot GPU is a problem: carol first, with the reason; alice's two GPUs counted.
    assert rows[0]["id"] == ids["carol-pc"] and "attn" in rows[0]["cls"]
    assert rows[0]["cells"][2] == "GPU 0 (NVIDIA GeForce RTX 4060 Ti) at 91 °C"
    assert by_id[ids["alice-pc"]]["cells"][3] == "2" and by_id[ids["alice-pc"]]["cells"][2] == "joined"
    totals = browser.js("document.getElementById('totals').textContent")
    assert "3 / 3" in totals and "PCs online" in totals
    browser.screenshot(artifacts / "fleet-online.png")

    # Filtering and sorting happen in the page.
    browser.js("(() => { const f = document.getElementById('filter'); f.value = '4090'; f.dispatchEvent(new Event('input')); })()")
    assert [r["id"] for r in browser.js(ROWS)] == [ids["alice-pc"]]
    browser.js("(() => { const f = document.getElementById('filter'); f.value = ''; f.dispatchEvent(new Event('input')); })()")
    browser.js("document.querySelector('#pcs th[data-key=name]').click()")
    assert [r["id"] for r in browser.js(ROWS)] == [ids["alice-pc"], ids["bob-pc"], ids["carol-pc"]]
    browser.js("document.querySelector('#pcs th[data-key=name]').click()")
    browser.js("document.querySelector('#pcs th[data-key=name]').click()")  # back to problems first

    # bob-pc goes away; the page, never reloaded, shows it offline once the head says so.
    browser.js("window.loadedOnce = true")
    stopped = time.monotonic()
    nodes["bob-pc"].stop()
    bob = ids["bob-pc"]
    browser.wait(f"{ROWS}.some(r => r.id === '{bob}' && r.status === 'offline')", 90,
                 "the page to show bob-pc offline")
    print(f"bob-pc shown offline {time.monotonic() - stopped:.1f} s after its agent stopped "
          f"(head offline_after_s {OFFLINE_AFTER_S:.0f} s, page polls every 2 s)")
    assert browser.js("window.loadedOnce === true"), "the page reloaded instead of updating itself"
    rows = browser.js(ROWS)
    # Problems first (by name), then the healthy.
    assert [r["id"] for r in rows] == [bob, ids["carol-pc"], ids["alice-pc"]]
    assert rows[-1]["status"] == "online"
    assert next(r for r in rows if r["id"] == bob)["cells"][2] == "offline: no heartbeat"
    assert "2 / 3" in browser.js("document.getElementById('totals').textContent")
    browser.screenshot(artifacts / "fleet-bob-offline.png")
    if os.environ.get("GARAGE_FLEET_DOCS"):
        DOCS_PNG.parent.mkdir(exist_ok=True)
        shutil.copyfile(artifacts / "fleet-bob-offline.png", DOCS_PNG)

    # bob-pc's own page: its state changes end with offline, its temperature was recorded.
    browser.goto(f"http://127.0.0.1:{FLEET_PORT}/pc/{bob}")
    changes = browser.wait("(() => { const c = [...document.querySelectorAll('#pc-changes tbody tr')]"
                           ".map(tr => tr.cells[1].textContent); return c.length && c; })()", 30,
                           "bob-pc's page to list its state changes")
    assert changes[0] == "offline" and "joined · engine disabled" in changes
    assert browser.js("document.getElementById('pc-status').textContent") == "offline"
    assert browser.js("document.querySelectorAll('#c-temp svg polyline').length") >= 1
    gpus = browser.js("[...document.querySelectorAll('#pc-gpus tbody tr')].map(tr => tr.cells[1].textContent)")
    assert gpus == ["NVIDIA GeForce RTX 3060"]
    browser.screenshot(artifacts / "pc-bob-offline.png", full_page=True)

    # alice-pc's page: online, two GPUs, a temperature line.
    browser.goto(f"http://127.0.0.1:{FLEET_PORT}/pc/{ids['alice-pc']}")
    browser.wait("document.getElementById('pc-status').textContent === 'online'", 30, "alice-pc's page")
    browser.wait("document.querySelectorAll('#pc-gpus tbody tr').length === 2", 30, "alice-pc's two GPUs")
    browser.screenshot(artifacts / "pc-alice.png", full_page=True)

    # Off loopback: on the overlay address, which every PC reaches, the page asks for the
    # admin key. The head restarts with the new [fleet] address; the fleet listener must not
    # hold up its shutdown.
    assert head.stop() == 0
    text = head.config.read_text()
    assert 'listen_host = "127.0.0.1"' in text
    head.config.write_text(text.replace('listen_host = "127.0.0.1"', 'listen_host = "100.96.0.1"'))
    key = head.cli("head", "fleet-key", "--config", str(head.config)).stdout.strip()
    assert key.startswith("gfk1.")
    head.start()
    url = f"https://100.96.0.1:{FLEET_PORT}"
    alice = nodes["alice-pc"]

    def refused_without_key() -> bool:
        r = alice.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", f"{url}/api/fleet"],
                      check=False)
        return r.stdout.strip() == "401"
    wait_for(refused_without_key, 120, "a PC to reach the fleet page over the overlay and be refused without the key")
    plain = alice.run(["curl", "-s", "-o", "/dev/null", "--max-time", "3", f"http://100.96.0.1:{FLEET_PORT}/"], check=False)
    assert plain.returncode != 0  # HTTPS only off loopback

    browser.goto(f"{url}/")
    browser.wait("location.pathname === '/login' && !!document.getElementById('key')", 30, "the sign-in form")
    browser.js(f"document.getElementById('key').value = {json.dumps('gfk1.not-the-key')}; document.querySelector('form').submit()")
    browser.wait("location.search === '?error=wrong' && document.body.textContent.includes('not the admin key')", 30,
                 "the form to refuse a wrong key")
    browser.screenshot(artifacts / "login-refused.png")
    browser.js(f"document.getElementById('key').value = {json.dumps(key)}; document.querySelector('form').submit()")
    browser.wait(f"{ROWS}.length === 3", 60, "the fleet page after signing in with the admin key")
    assert browser.js("document.getElementById('logout').hidden") is False
    browser.screenshot(artifacts / "fleet-signed-in.png")
    assert key not in (head.dir / "head.log").read_text(errors="replace")

    for png in artifacts.iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, png
