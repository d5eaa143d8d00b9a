"""`scripts/docs-screenshots` (`python -m testing.screenshots`): the pictures in docs/ made from
real parts.

It starts the demo's region (testing/demo.py: a head and two PCs in network namespaces with
wireguard-go, Ray, the agents and, per PC, the vLLM CPU image with the tiny model in a dockerd
of its own), waits until both PCs serve, sends a few chat completions through the head's
gateway and keeps a steady load on it, and while that runs:

- docs/fleet.png: the operator's fleet page, opened by Debian's headless Chromium inside the
  head's namespace on the head's loopback (testing/browser.py), as an SSH tunnel would;
- docs/screen.png: the PC's screen (`garage-node screen`) of one serving PC, drawn from that
  PC's real status document (`garage-node status --json` in its namespace) by the screen's own
  layout (`garage_node.node.screen.layout`, the lines and their styles curses draws) into an
  HTML page of character cells in the Linux console's VGA colours, photographed by the same
  Chromium. The console's own 8x16 font is not used: the page uses a monospace font.

Everything is removed at the end, as the demo does (testing/region.py's cleanup).
"""

from __future__ import annotations

import html
import json
import math
import sys
import time
from pathlib import Path

from garage_node.core.wire import Status, decode
from garage_node.node.screen import BLOCK, STATE_COLOUR, Line, layout
from testing.browser import CHROMIUM, Browser
from testing.demo import ask, say, start_region, wait_engines
from testing.dockerd import TINY_MODEL
from testing.region import PYTHON, Testbed, TestbedError, missing_prerequisite, wait_for

ROOT = Path(__file__).resolve().parents[1]
FLEET_URL = "http://127.0.0.1:8444/"  # the head's default [fleet] listener: loopback only
GATEWAY_URL = "http://127.0.0.1:8080"

# The Linux console's VGA palette: curses' colour N is the dim one; bold makes it bright.
VGA = {"black": "#000000", "red": "#aa0000", "green": "#00aa00", "yellow": "#aa5500", "blue": "#0000aa",
       "magenta": "#aa00aa", "cyan": "#00aaaa", "white": "#aaaaaa"}
BRIGHT = {"red": "#ff5555", "green": "#55ff55", "yellow": "#ffff55", "cyan": "#55ffff", "white": "#ffffff"}
# Line styles as screen._attributes() gives them to curses: (foreground, background).
STYLE = {"": (VGA["white"], None), "title": (BRIGHT["white"], None), "alert": (BRIGHT["red"], None),
         "warn": (BRIGHT["yellow"], None), "ok": (VGA["black"], VGA["green"]), "dim": (VGA["cyan"], None)}


def screen_html(doc: Status, cols: int = 100, rows: int = 30, now: float | None = None) -> str:
    """A page that shows what `garage-node screen` draws for `doc` on a `cols` x `rows` console:
    screen.layout()'s lines, each cell as screen._draw() paints it (the state word's cells as
    reverse-video spaces in the state's colour, the green banner across the whole line, nothing
    in the last column)."""
    big = VGA[STATE_COLOUR.get(doc.state.value, "white")]
    out = []
    for line in layout(doc, cols, rows, now=now):
        out.append(_line_html(line, cols, big))
    return f"""<!doctype html><meta charset="utf-8"><title>garage-node screen</title>
<style>
html, body {{ margin: 0; background: #000; }}
#screen {{ display: inline-block; padding: 8px; background: #000; width: {cols}ch; height: {rows * 20}px;
  font: 16px/20px "DejaVu Sans Mono", "Liberation Mono", monospace; white-space: pre; overflow: hidden; }}
#screen div {{ height: 20px; }}
</style>
<div id="screen">{"".join(out)}</div>
"""


def _line_html(line: Line, cols: int, big: str) -> str:
    if line.style == "big":
        runs, text = [], line.text[: cols - 1]
        i = 0
        while i < len(text):
            j = i
            while j < len(text) and (text[j] == BLOCK) == (text[i] == BLOCK):
                j += 1
            cells = " " * (j - i)
            runs.append(f'<span style="background:{big}">{cells}</span>' if text[i] == BLOCK else cells)
            i = j
        return f"<div>{''.join(runs)}</div>"
    fg, bg = STYLE.get(line.style, STYLE[""])
    text = line.text.ljust(cols - 1) if line.style == "ok" else line.text
    style = f"color:{fg}" + (f";background:{bg}" if bg else "")
    return f'<div><span style="{style}">{html.escape(text[: cols - 1])}</span></div>'


def photograph(browser: Browser, page: Path, png: Path) -> None:
    """`page` (screen_html's) as a PNG exactly the size of its console."""
    browser.goto(page.as_uri())
    size = browser.wait("(() => { const r = document.getElementById('screen'); "
                        "return r && r.textContent.length && {w: r.offsetWidth, h: r.offsetHeight}; })()",
                        30, "the screen page")
    browser.resize(math.ceil(size["w"]), math.ceil(size["h"]))
    time.sleep(0.3)
    browser.screenshot(png)


def serving(doc: dict) -> bool:
    e = doc["engine"]
    return (doc["state"] == "joined" and e["state"] == "healthy" and bool(e.get("requests_running"))
            and bool(e.get("generation_tokens_per_s")) and bool((doc.get("tokens_served") or {}).get("total")))


# What the picture must show, read from the page itself (the table's cells: status, PC,
# problem/state, GPUs, temp, model, load, tokens/s, served today / total, last seen): both
# PCs online, serving the model, producing tokens now, with tokens served, and requests
# running somewhere.
FLEET_READY = """(() => {
  const rows = [...document.querySelectorAll('#pcs tbody tr')].map(tr => ({
    status: tr.dataset.status, cells: [...tr.cells].map(td => td.textContent)}));
  return rows.length === 2 && rows.every(r => r.status === 'online' && r.cells[5] === MODEL
    && parseFloat(r.cells[7]) > 0 && !/^0 \\//.test(r.cells[8])) && rows.some(r => parseInt(r.cells[6]) > 0);
})()""".replace("MODEL", json.dumps(TINY_MODEL))
WARM_UP_S = 15.0  # of load before the pictures: the engines' tokens/s is a rate over heartbeats


def run(out_dir: Path, pc: str, load_s: float) -> int:
    if why := missing_prerequisite():
        say(f"docs-screenshots: {why}. Run it as root: ./scripts/docs-screenshots")
        return 2
    if CHROMIUM is None:
        say("docs-screenshots: 'chromium' is not installed (scripts/install-deps installs it)")
        return 2
    start = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    with Testbed() as tb:
        browser = None
        try:
            head, nodes = start_region(tb, True, start)
            node = next((n for n in nodes if n.name == pc), None)
            if node is None:
                raise TestbedError(f"no PC named {pc!r} in the demo's region ({', '.join(n.name for n in nodes)})")
            say("Waiting for each PC's engine (vLLM on the CPU, a tiny model) ...")
            wait_engines(nodes, start)
            key = head.cli("head", "key", "create", "docs", "--config", str(head.config)).stdout.strip()
            for prompt in ("Hello! Who answers me?", "Tell me about gaming PCs.", "And again?"):
                answered, text, usage = ask(head, key, prompt, max_tokens=32)
                say(f"  chat completion answered by {answered}: {usage['completion_tokens']} tokens")
            # A steady load for the pictures: requests running, tokens/s, tokens served.
            say(f"Sending load through the gateway for up to {load_s:.0f} s (testing/loadgen.py) ...")
            head.spawn([PYTHON, str(ROOT / "testing" / "loadgen.py"), GATEWAY_URL, key, TINY_MODEL,
                        "--concurrency", "4", "--seconds", str(load_s), "--max-tokens", "200", "--unique",
                        "--prompt", "Tell me about gaming PCs."], "loadgen.log")
            browser = Browser(["ip", "netns", "exec", head.ns], tb.dir / "chromium-profile", tb.dir / "chromium.log")
            browser.open(FLEET_URL, 1440, 900)
            time.sleep(WARM_UP_S)
            browser.wait(FLEET_READY, 180, "the fleet page to show both PCs online, serving, with tokens/s and tokens served")
            bottom = browser.js("Math.ceil(document.getElementById('pcs').getBoundingClientRect().bottom)")
            browser.screenshot(out_dir / "fleet.png", height=min(900, int(bottom) + 24))
            say(f"  wrote {out_dir / 'fleet.png'} ({time.monotonic() - start:.0f} s)")

            doc: dict = {}

            def pc_serving() -> bool:
                nonlocal doc
                doc = node.status()
                return serving(doc)
            wait_for(pc_serving, 90, f"{pc}'s status to show requests running, tokens/s and tokens served")
            (tb.dir / "status.json").write_text(json.dumps(doc, indent=2))
            page = tb.dir / "screen.html"
            page.write_text(screen_html(decode(doc, Status)))
            photograph(browser, page, out_dir / "screen.png")
            say(f"  wrote {out_dir / 'screen.png'} ({pc}'s screen, {time.monotonic() - start:.0f} s)")
        except (TimeoutError, TestbedError, RuntimeError) as e:
            say(f"docs-screenshots failed: {e}")
            for host in tb.hosts:
                for log in ("head.log", "agent.log", "loadgen.log"):
                    tail = host.log_tail(log, 15)
                    if tail:
                        say(f"--- {host.name} {log}\n{tail}")
            return 1
        finally:
            if browser is not None:
                browser.close()
            say("Cleaning up (load, browser, agents, head, namespaces) ...")
    say(f"Done in {time.monotonic() - start:.0f} s.")
    return 0


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="scripts/docs-screenshots", description=(
        "Make docs/fleet.png and docs/screen.png from a real region: the demo's head and two PCs, each serving "
        "the tiny model with the vLLM CPU image, under a steady load through the gateway; the fleet page as "
        "headless Chromium shows it, and one PC's screen drawn from its real status document by the screen's "
        "own layout. Needs root, dockerd and the vLLM CPU image (scripts/docs-screenshots makes sure of both)."))
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="where to write the PNGs (default: docs/)")
    p.add_argument("--pc", default="alice-pc", choices=["alice-pc", "bob-pc"], help="whose screen (default: alice-pc)")
    p.add_argument("--load-seconds", type=float, default=240.0,
                   help="how long the load runs at most (it is stopped when the pictures are taken)")
    args = p.parse_args(argv)
    return run(args.out.resolve(), args.pc, args.load_seconds)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
