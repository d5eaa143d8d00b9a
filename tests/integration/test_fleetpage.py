"""The fleet page in a real browser (Debian's headless Chromium) against a real region: a head
and PCs in network namespaces (testing/region.py).

Chromium runs inside the head's network namespace and opens the page on the head's loopback,
as an operator's SSH tunnel would; it is driven over the DevTools protocol on a pipe (no port,
no extra library). The page is loaded once: every later change it shows came from its own
polling. Screenshots are kept under the test's tmp dir (the path is printed);
GARAGE_FLEET_DOCS=1 also writes docs/fleet-problems.png, a picture in docs/operating.md
(docs/fleet.png, a fleet serving, is made by scripts/docs-screenshots).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest

from testing.browser import CHROMIUM, Browser
from testing.nvml_double import RTX_3060_12GB, RTX_4060, RTX_4060_TI_16GB, RTX_4090
from testing.region import Testbed, missing_prerequisite, wait_for

WHY_NOT = missing_prerequisite() or (None if CHROMIUM else "'chromium' is not installed (scripts/install-deps installs it)")
pytestmark = [pytest.mark.testbed, pytest.mark.skipif(bool(WHY_NOT), reason=str(WHY_NOT))]

FLEET_PORT = 8444
OFFLINE_AFTER_S = 8.0  # the testbed's heartbeat is 2 s: four missed heartbeats
HOT_4060_TI = replace(RTX_4060_TI_16GB, temp=91)
DOCS_PNG = Path(__file__).resolve().parents[2] / "docs" / "fleet-problems.png"

ROWS = """[...document.querySelectorAll('#pcs tbody tr')].map(tr => ({
    id: tr.dataset.id, status: tr.dataset.status, cls: tr.className,
    cells: [...tr.cells].map(td => td.textContent)}))"""


@pytest.fixture
def region(testbed: Testbed, tmp_path):
    # Function-scoped over the module's testbed: the file has one test, which this fixture is for.
    tb = testbed
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
    try:
        yield tb, head, nodes, ids, browser
    finally:
        browser.close()


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
