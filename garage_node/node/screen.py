"""`garage-node screen`: the node's live status on the PC's own monitor (tty1, where a login
prompt would be; garage-screen.service runs it).

The PC owner looks at the monitor, not at a terminal: in large type the node's state, then its
name, each GPU's temperature, power, busyness and health, the model served and the requests
running, the tokens served (when the head says), and, when something is wrong, the problem and
what to do, in the words of `garage-node status` (the same Status document, from the agent's
local API; with the agent down, `status.offline_status`). `d` drains the PC before the owner
powers it off and the screen says when that is safe; `r` resumes. Alt+F2 is a login console.

`layout()` is a pure function from a Status to the lines of the screen (tested without a
terminal); `main()` draws them with curses and handles the keys. Standard library only besides
what `garage-node status` already imports: this runs on the PC beside the agent.
"""

from __future__ import annotations

import dataclasses
import subprocess
import textwrap
import time
from typing import Callable, NamedTuple

from garage_node.core.wire import EngineState, GPU, Status, WireError

# ---------------------------------------------------------------- the big letters
# 5x5 block letters, one character cell per pixel (two side by side where the screen is wide
# enough). Drawn as reverse-video spaces, not as a block glyph: a space exists in every console
# font, so the word is legible on any VGA console and a screenshot can be read back exactly
# (tests/image/screenshot.py). Every letter touches its left and right column and its top and
# bottom row, so the word's outline gives the cell size.
BIG_HEIGHT = 5
BIG_WIDTH = 5
_GLYPHS = """
A  ### |#   #|#####|#   #|#   #
B ####|#   #|####|#   #|####
C  ####|#    |#    |#    | ####
D ####|#   #|#   #|#   #|####
E #####|#    |#### |#    |#####
F #####|#    |#### |#    |#
G  ####|#    |#  ##|#   #| ####
H #   #|#   #|#####|#   #|#   #
I #####|  #  |  #  |  #  |#####
J #####|   # |   # |#  # | ##
K #   #|#  # |###  |#  # |#   #
L #    |#    |#    |#    |#####
M #   #|## ##|# # #|#   #|#   #
N #   #|##  #|# # #|#  ##|#   #
O  ### |#   #|#   #|#   #| ###
P #### |#   #|#### |#    |#
Q  ### |#   #|# # #|#  # | ## #
R #### |#   #|#### |#  # |#   #
S  ####|#    | ### |    #|####
T #####|  #  |  #  |  #  |  #
U #   #|#   #|#   #|#   #| ###
V #   #|#   #|#   #| # # |  #
W #   #|#   #|# # #|## ##|#   #
X #   #| # # |  #  | # # |#   #
Y #   #| # # |  #  |  #  |  #
Z #####|   # |  #  | #   |#####
- |     | ### |     |
"""
BIG_FONT: dict[str, tuple[str, ...]] = {
    line[0]: tuple(row.ljust(BIG_WIDTH).replace("#", "█") for row in line[2:].split("|"))
    for line in _GLYPHS.strip("\n").splitlines()
}
BIG_FONT[" "] = (" " * BIG_WIDTH,) * BIG_HEIGHT
BLOCK = "█"


def big_text(word: str, scale: int = 1) -> list[str]:
    """`word` in block letters: BIG_HEIGHT lines of '█' and ' ', one blank column between
    letters; `scale` repeats every column (2 makes the letters squarer on a 8x16 font)."""
    rows = [""] * BIG_HEIGHT
    for i, ch in enumerate(word.upper()):
        glyph = BIG_FONT.get(ch, BIG_FONT[" "])
        for r in range(BIG_HEIGHT):
            rows[r] += (" " if i else "") + glyph[r]
    return ["".join(c * scale for c in row).rstrip() for row in rows]


# ---------------------------------------------------------------- the layout


class Line(NamedTuple):
    """One line of the screen and how it is drawn: "" plain, "title", "big" (the state word:
    '█' cells painted in the state's colour), "alert", "ok" (a banner), "warn", "dim"."""

    text: str
    style: str = ""


# The colour of the state word: green when serving is possible, yellow on the way, red when a
# person has to act. Names are curses colours.
STATE_COLOUR = {
    "joined": "green", "starting": "yellow", "enrolling": "yellow", "joining": "yellow", "stopping": "yellow",
    "degraded": "yellow", "paused": "yellow", "needs-token": "red", "revoked": "red", "error": "red", "agent-down": "red",
    "quarantined": "red",
}

KEYS = "Keys:  d  drain before you power off      r  resume serving"
LOGIN = "Alt+F2: login console (Alt+F1 comes back here)"
_SAFE_ENGINE = (EngineState.DRAINED, EngineState.STOPPED, EngineState.DISABLED)
# The console's font has the ASCII range and a few more (°, █); anything else is spelled out.
_PLAIN = str.maketrans({"—": "-", "–": "-", "…": "...", "●": "*", "✗": "x", "’": "'", "“": '"', "”": '"'})


def power_off_advice(s: Status) -> tuple[str, str] | None:
    """(banner, style) about powering off, or None when no drain was asked for.

    Safe only when the agent itself says the engine is drained (or stopped, or off): then no
    request is cut short. A drain the agent has not confirmed is not safe yet."""
    e = s.engine
    if not e.draining:
        return None
    if s.agent is None:
        return ("Drain set; the agent is not running, so it cannot confirm the engine stopped.", "warn")
    if e.state in _SAFE_ENGINE:
        return ("SAFE TO POWER OFF: drained, no work is running. Press r to serve again.", "ok")
    if e.state is EngineState.DRAINING:
        running = f" ({e.requests_running} running)" if e.requests_running is not None else ""
        return (f"DRAINING{running}: requests are finishing. Do not power off yet.", "warn")
    return (f"Draining: the engine is {e.state.value}. Do not power off yet.", "warn")


def layout(s: Status, width: int = 80, height: int = 25, now: float | None = None, note: str = "") -> list[Line]:
    """The screen for status `s`, at most `height` lines of at most `width` characters.

    `note` is the answer to the owner's last key press. Pure: the same status, size and time
    give the same lines."""
    from garage_node.node.status import STATE_WORDS  # the words of `garage-node status`

    width = max(width, 40)
    state = s.state.value
    scale = 2 if len(big_text(state, 2)[0]) <= width - 4 else 1
    big = big_text(state, scale)
    pad = max(0, (width - max(len(r) for r in big)) // 2)

    head = [Line(_fit(f"garage-node  {s.name or '?'}" + (f"  ({s.node_id})" if s.node_id else "")
                      + (f"  region {s.region}" if s.region else ""), width), "title"), Line("")]
    head += [Line(" " * pad + r, "big") for r in big]
    head += [Line("")]

    body: list[Line] = []

    def add(label: str, text: str, style: str = "", max_lines: int = 3) -> None:
        chunks = _wrap(text, width - 10) or [""]
        if len(chunks) > max_lines:
            chunks = chunks[:max_lines]
            chunks[-1] = _fit(chunks[-1] + " ...", width - 10)
        for i, chunk in enumerate(chunks):
            body.append(Line(f"{label if i == 0 else '':<10}{chunk}", style))

    add("State:", f"{STATE_WORDS.get(s.state, state)}: {s.message}", "alert" if STATE_COLOUR.get(state) == "red" else "",
        max_lines=2)
    # A quarantine by the region's audits, then the problem, right under the state: what the
    # owner must read when something is wrong; what does not fit the screen is cut from the end.
    from garage_node.node.status import quarantine_lines

    for label, text in quarantine_lines(s):
        add(label.strip(), text, "alert", max_lines=3)
    err = s.last_error
    if err:
        retry = f" (retrying in {err.retry_in_s:.0f} s)" if err.retry_in_s is not None else ""
        add("Problem:", err.message + retry, "alert", max_lines=4)
        if err.hint:
            add("To fix:", err.hint, "alert", max_lines=3)
    else:
        add("Problem:", "none")
    if s.gpus:
        for g in s.gpus:
            add(f"GPU {g.index}:", _gpu(g), "" if g.healthy else "alert")
    else:
        add("GPUs:", f"none - CPU node ({s.gpu_note or 'no NVIDIA GPU found'})")
    if getattr(s, "serving", None) is not None:  # serving hours, power and heat (newer agents)
        from garage_node.node import status as status_words

        for i, line in enumerate(getattr(status_words, "_serving", lambda _: [])(s)):
            add("Serving:" if i == 0 else "", line)
    add("Model:", _model(s))
    served = getattr(s, "tokens_served", None)  # from the head's ledger; absent from older agents
    if served is not None:
        add("Served:", f"{_count(served.today)} tokens today, {_count(served.total)} in total")
        from garage_node.node.status import earnings_line

        if (paid := earnings_line(served, _count)) is not None:
            add("", paid)
    add("Network:", _network(s))

    foot: list[Line] = []
    advice = power_off_advice(s)
    if advice:
        foot.append(Line(_fit(advice[0], width), advice[1]))
    if note and not (advice and advice[1] == "ok"):  # once safe, the banner has answered the key
        foot += [Line(t, "warn") for t in _wrap(note, width)[:2]]
    clock = time.strftime("%H:%M:%S", time.localtime(now if now is not None else time.time()))
    foot += [Line(_fit(KEYS, width), "dim"),
             Line(_fit(f"{LOGIN}   updated {clock}", width), "dim")]

    # What does not fit goes from the end of the body: the network line first, then the
    # model, the GPUs of a many-GPU PC; the state and the problem stay.
    room = max(0, height - len(head) - len(foot) - 1)
    if len(body) > room:
        body = body[:room]
    lines = head + body + [Line("")] * max(0, height - len(head) - len(body) - len(foot)) + foot
    return [Line(_fit(line.text.translate(_PLAIN), width), line.style) for line in lines[:height]]


def _gpu(g: GPU) -> str:
    name = g.name.removeprefix("NVIDIA ").removeprefix("GeForce ")
    if not g.healthy:
        return f"{name}  UNHEALTHY: {g.error}"
    parts = [name,
             f"{g.temperature_c}°C" if g.temperature_c is not None else "?°C",
             f"{g.power_w:.0f} W" if g.power_w is not None else "? W",
             f"{g.utilization_pct}% busy" if g.utilization_pct is not None else "?% busy",
             "ok"]
    return "  ".join(parts)


def _model(s: Status) -> str:
    e = s.engine
    # The engine's own message often starts with its state ("drained: no new work ..."): said once.
    what = e.message if e.message.startswith(e.state.value) else f"{e.state.value}: {e.message}".rstrip(": ")
    if e.state is EngineState.HEALTHY and e.model:
        load = ""
        if e.requests_running is not None:
            load = f"  {e.requests_running} requests running, {e.requests_waiting} waiting"
            if e.generation_tokens_per_s is not None:
                load += f", {e.generation_tokens_per_s:.1f} tokens/s"
        return f"{e.model}{load or '  serving'}"
    return f"{e.model}: {what}" if e.model else what


def _network(s: Status) -> str:
    o, h = s.overlay, s.head
    parts = [f"overlay {o.address} ({'up' if o.up else 'DOWN'})" if o.address else "not joined yet"]
    if h.api_url:
        parts.append("head reachable" if h.reachable else "head not contacted yet" if h.reachable is None
                     else "head UNREACHABLE")
    if s.ray.alive_at_head:
        parts.append("Ray worker alive")
    return ", ".join(parts)


def _count(n: int) -> str:
    return f"{n:,}"


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width=max(width, 10), break_long_words=True, break_on_hyphens=False)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------- the document and the keys


def read_status(cfg) -> Status:
    """The agent's status document; with the agent down, what can be read locally (as
    `garage-node status` does). While systemd is still starting the agent it is `starting`,
    not `agent-down`: on a slow first boot that takes a minute, and nothing is wrong."""
    from garage_node.node.localapi import AgentClient, AgentDown
    from garage_node.node.status import offline_status

    try:
        with AgentClient(cfg.socket_path, timeout=3) as c:
            return c.status()
    except (AgentDown, WireError) as e:
        doc = offline_status(cfg, str(e))
    if _agent_unit_state() == ("activating", "start"):
        from garage_node.core.wire import NodeState

        doc = dataclasses.replace(doc, state=NodeState.STARTING, last_error=None,
                                  message="the agent is starting; this takes a minute after power-on")
    return doc


def _agent_unit_state() -> tuple[str, str] | None:
    """(ActiveState, SubState) of garage-node.service, None without systemd. A unit waiting to be
    restarted after a crash is ("activating", "auto-restart"): that is the agent down."""
    try:
        out = subprocess.run(["systemctl", "show", "-p", "ActiveState,SubState", "--value", "garage-node.service"],
                             capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out[0], out[1]) if len(out) == 2 else None


def set_drain(cfg, on: bool) -> str:
    """Drain (or resume) through the agent; with the agent down, leave the drain file it reads
    when it starts (as `garage-node drain` does). Returns what to tell the owner."""
    from garage_node.node.localapi import AgentClient, AgentDown
    from garage_node.node.paths import StatePaths

    what = ("Drain asked: running requests finish, then the engine stops. Wait for SAFE TO POWER OFF."
            if on else "Resume asked: the engine starts serving again.")
    try:
        with AgentClient(cfg.socket_path, timeout=5) as c:
            c.drain() if on else c.resume()
        return what
    except AgentDown:
        pass
    flag = StatePaths(cfg.node.state_dir).drain_flag
    try:
        if on:
            flag.parent.mkdir(parents=True, exist_ok=True)
            flag.write_text("drained by garage-node screen\n")
        else:
            flag.unlink(missing_ok=True)
    except OSError as e:
        return f"Could not {'drain' if on else 'resume'}: {e}"
    return what + " (The agent is not running; it applies this when it starts.)"


def config_error_status(message: str) -> Status:
    """The screen with a config the agent refuses too: the owner fixes garage.toml."""
    from garage_node.core.wire import (EngineStatus, HeadStatus, NodeState, OverlayStatus, ProblemStatus, RayState,
                                       RayStatus)

    return Status(state=NodeState.ERROR, message="the configuration is wrong", node_id=None, name=None, region=None,
                  gpus=[], gpu_note="not read", driver_version=None, cuda_version=None,
                  overlay=OverlayStatus(interface="garage0", up=False), head=HeadStatus(),
                  ray=RayStatus(state=RayState.UNKNOWN), engine=EngineStatus(state=EngineState.UNKNOWN),
                  versions=None, last_error=ProblemStatus(message=f"config error: {message}",
                                                          hint="fix garage.toml on the stick's GARAGE drive, then restart"),
                  agent=None)


# ---------------------------------------------------------------- drawing


REFRESH_S = 2.0
# Kernel messages and the boot summary are written to the console behind curses' back;
# a full repaint this often wipes them.
REPAINT_S = 10.0


def main(load_config: Callable[[], object], refresh_s: float = REFRESH_S) -> int:
    import curses
    import locale

    locale.setlocale(locale.LC_ALL, "")
    return curses.wrapper(_loop, load_config, refresh_s)


def _loop(scr, load_config: Callable[[], object], refresh_s: float) -> int:
    import curses

    from garage_node.core.settings import ConfigError

    try:
        curses.curs_set(0)
    except curses.error:
        pass
    attrs = _attributes(curses)
    scr.timeout(int(refresh_s * 1000))
    cfg, note, note_until, last_repaint = None, "", 0.0, 0.0
    while True:
        try:
            cfg = cfg or load_config()
            doc = read_status(cfg)
        except ConfigError as e:
            cfg, doc = None, config_error_status(str(e))
        now = time.time()
        if now > note_until:
            note = ""
        if time.monotonic() - last_repaint > REPAINT_S:
            scr.clearok(True)
            last_repaint = time.monotonic()
        h, w = scr.getmaxyx()
        _draw(scr, layout(doc, w, h, now=now, note=note), doc, attrs, w)
        key = scr.getch()
        if key in (ord("d"), ord("D"), ord("r"), ord("R")) and cfg is not None:
            note, note_until = set_drain(cfg, key in (ord("d"), ord("D"))), time.time() + 30
        elif key == curses.KEY_RESIZE:
            scr.clearok(True)


def _attributes(curses) -> dict[str, int]:
    colours = {"green": curses.COLOR_GREEN, "yellow": curses.COLOR_YELLOW, "red": curses.COLOR_RED,
               "white": curses.COLOR_WHITE, "cyan": curses.COLOR_CYAN}
    pairs: dict[str, int] = {}
    if curses.has_colors():
        curses.start_color()
        for i, (name, c) in enumerate(colours.items(), start=1):
            curses.init_pair(i, c, curses.COLOR_BLACK)
            pairs[name] = curses.color_pair(i)
        # The banner: black on green (reverse video of a bold colour reads grey on green).
        curses.init_pair(len(colours) + 1, curses.COLOR_BLACK, curses.COLOR_GREEN)
        pairs["banner"] = curses.color_pair(len(colours) + 1)
    pair = lambda name: pairs.get(name, 0)  # noqa: E731
    return {"": 0, "title": curses.A_BOLD, "alert": pair("red") | curses.A_BOLD, "warn": pair("yellow") | curses.A_BOLD,
            "ok": pairs["banner"] if "banner" in pairs else curses.A_REVERSE, "dim": pair("cyan"),
            **{f"big-{name}": pair(name) | curses.A_REVERSE for name in colours}}


def _draw(scr, lines: list[Line], doc: Status, attrs: dict[str, int], width: int) -> None:
    import curses

    big = attrs.get(f"big-{STATE_COLOUR.get(doc.state.value, 'white')}", 0)
    scr.erase()
    for y, line in enumerate(lines):
        try:
            if line.style == "big":
                # Each '█' is a reverse-video space: solid in any console font.
                for x, ch in enumerate(line.text[: width - 1]):
                    if ch == BLOCK:
                        scr.addstr(y, x, " ", big)
            else:
                # A banner is painted across the whole line, so it stands out (and a screenshot
                # tells it from text).
                txt = line.text.ljust(width - 1) if line.style == "ok" else line.text
                scr.addstr(y, 0, txt[: width - 1], attrs.get(line.style, 0))
        except curses.error:  # the last cell of the screen, or a screen resized under us
            pass
    scr.refresh()
