"""What a starting engine is waiting for, read from its container's last log lines: the status
message while vLLM starts, instead of a bare "loading".

Why: an engine once took 262 s instead of ~40 s to answer /health after a power cut, and the
owner (and the head) saw only "starting" all that time. vLLM's start has stages that each log a
line when they begin; the latest stage seen, and how long the log has been silent, tell a person
whether it is loading weights, compiling, or stuck before its engine core came up.

Pure (no Docker): EngineManager hands in the lines and the clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from garage_node.core.wire import MESSAGE_MAX, clip

# vLLM's start, in order: each stage is named by the lines vLLM 0.32 logs while in it (measured
# on the CPU image, tests/integration/test_engine.py; GPU builds log the same stage lines). The
# furthest stage any line of this start reaches is where the engine is (its API server logs again
# once the engine core is up, so the newest line alone would read as going back).
STAGES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^\(APIServer|non-default args|Resolved architecture"), "waiting for its engine core to start"),
    (re.compile(r"^\(EngineCore|Initializing a V1 LLM engine|^\((Vllm)?Worker"), "starting its engine core's workers"),
    (re.compile(r"Loading weights|Loading safetensors|Starting to load model|Loading model", re.I), "loading weights"),
    (re.compile(r"for vLLM's torch\.compile|Dynamo bytecode transform|Compiling a graph|torch\.compile takes"),
     "compiling (torch.compile; a model's first start takes longest, later ones read the cache)"),
    (re.compile(r"KV cache|init engine \(profile", re.I), "allocating its KV cache and warming up"),
    (re.compile(r"Capturing CUDA graph", re.I), "capturing CUDA graphs"),
    (re.compile(r"Application startup complete|Starting vLLM (API )?server on|Available routes are"),
     "starting its API server"),
)
FIRST = "starting Python and vLLM"
# Past this much silence the message says so: a stage that logs nothing this long may be stuck.
QUIET_NOTE_S = 30.0
LINE_MAX = 160


def stage_of(lines: list[str]) -> str:
    """The furthest stage any of `lines` (one start's log) names; FIRST when none does."""
    furthest = -1
    for line in lines:
        text = line.strip()
        for i in range(len(STAGES) - 1, furthest, -1):
            if STAGES[i][0].search(text):
                furthest = i
                break
    return STAGES[furthest][1] if furthest >= 0 else FIRST


@dataclass
class StartupWatch:
    """Follows one start of the engine: the last log line and when it last changed (by the
    agent's clock: log timestamps come from the container, whose clock may differ)."""

    started_at: float
    last_line: str = ""
    line_since: float | None = None

    def message(self, model: str, lines: list[str], now: float, secret: str = "") -> str:
        """E.g. "engine starting Qwen/... (95 s): loading weights; its log has been silent for
        62 s (last: ...)". `secret` (the engine's API key) is never shown, should a line hold it."""
        meaningful = [ln for ln in lines if ln.strip()]
        newest = meaningful[-1].strip() if meaningful else ""
        if newest != self.last_line or self.line_since is None:
            self.last_line, self.line_since = newest, now
        age = now - self.started_at
        text = f"engine starting {model} ({age:.0f} s): {stage_of(meaningful)}"
        quiet = now - self.line_since
        if newest and quiet >= QUIET_NOTE_S:
            shown = newest.replace(secret, "[engine key]") if secret else newest
            text += f"; its log has been silent for {quiet:.0f} s (last: {clip(shown, LINE_MAX)})"
        return clip(text, MESSAGE_MAX)
