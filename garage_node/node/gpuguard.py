"""Per-GPU faults and heat: which GPUs the node may use, decided from NVML's readings.

Pure decisions, no NVML: the agent hands in each fresh inventory and the Xid events NVML
queued, and gets back the inventory the rest of the node works with (the planner, Ray's
offer, status).

- A fault (an NVML error on that GPU, fallen off the bus, a critical Xid) quarantines the GPU
  until the agent restarts: it reads unhealthy with its reason, so the planner re-plans on the
  others and Ray stops offering it. Quarantine is sticky because a flaky card that comes and
  goes would replace the engine again and again, the reboot loop owners complain of in other
  projects; the PC itself is never rebooted for it.
- Heat has a hysteresis: above max_temp_c a GPU is hot until it reads below the resume point,
  so a card hovering at the limit does not start and stop the engine on every reading.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from garage_node.node.gpu import APPLICATION_XIDS, GPU, Inventory, describe_xid

log = logging.getLogger(__name__)

RESTART_HINT = "restart the agent (systemctl restart garage-node) or reboot once the card is checked"


class GpuGuard:
    def __init__(self, max_temp_c: int = 0, resume_below_c: int = 0) -> None:
        self.max_temp_c = max_temp_c  # 0: no limit
        self.resume_below_c = resume_below_c
        self.quarantined: dict[int, str] = {}  # GPU index -> why, for the agent's lifetime
        # GPU index -> the reading that made it hot. Kept, not updated, while it stays hot: the
        # state line then stays the same from one reading to the next (one log line, not one
        # per reading); the GPU's own line shows its temperature now.
        self.hot: dict[int, int] = {}

    def observe(self, inv: Inventory, xids: Sequence[tuple[int, int]] = ()) -> Inventory:
        """`inv` as the node should use it: faulted GPUs quarantined, hot GPUs flagged."""
        for index, xid in xids:
            if xid in APPLICATION_XIDS:
                log.info("GPU %s reported %s (caused by an application; the card stays in service)", index, describe_xid(xid))
                continue
            self._quarantine(index, f"{describe_xid(xid)} reported by the driver")
        for g in inv.gpus:
            if not g.healthy and g.index not in self.quarantined:
                self._quarantine(g.index, g.error or "NVML could not read it")
        gpus = tuple(self._judge(g) for g in inv.gpus)
        return dataclasses.replace(inv, gpus=gpus)

    def _quarantine(self, index: int, why: str) -> None:
        if index < 0:
            log.warning("NVML reported a fault on a device it did not name: %s", why)
            return
        if index in self.quarantined:
            return
        log.warning("GPU %s quarantined: %s", index, why)
        self.quarantined[index] = why

    def _judge(self, g: GPU) -> GPU:
        if g.index in self.quarantined:
            self.hot.pop(g.index, None)
            return dataclasses.replace(g, healthy=False, quarantined=True, hot=False,
                                       error=f"quarantined: {self.quarantined[g.index]}; {RESTART_HINT}")
        t = g.temperature_c
        if self.max_temp_c and t is not None:
            if t > self.max_temp_c and g.index not in self.hot:
                log.warning("GPU %s at %s °C, above max_temp_c %s °C", g.index, t, self.max_temp_c)
                self.hot[g.index] = t
            elif t < self.resume_below_c and g.index in self.hot:
                log.info("GPU %s cooled to %s °C (below %s °C)", g.index, t, self.resume_below_c)
                del self.hot[g.index]
        elif not self.max_temp_c:
            self.hot.clear()
        # A reading that is missing keeps the last judgement: no news is not a cool card.
        return dataclasses.replace(g, hot=g.index in self.hot)

    def heat_reason(self, used: tuple[int, ...]) -> str | None:
        """Why the engine on GPUs `used` must pause for heat; None when none of them is hot."""
        hot = [i for i in used if i in self.hot]
        if not hot:
            return None
        which = ", ".join(f"GPU {i} reached {self.hot[i]} °C" for i in hot)
        return (f"{which}, above max_temp_c {self.max_temp_c} °C: engine paused until "
                f"{'it cools' if len(hot) == 1 else 'they cool'} below {self.resume_below_c} °C")

    def notes(self) -> list[str]:
        """Short words for the node's state line: what is out and what is too hot."""
        out = [f"GPU {i} quarantined" for i in sorted(self.quarantined)]
        out += [f"GPU {i} too hot (reached {t} °C)" for i, t in sorted(self.hot.items())]
        return out
