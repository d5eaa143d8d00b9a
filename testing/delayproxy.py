"""TCP relays that add a fixed one-way delay each way, and can be cut: the WAN between the
federation's regions (testing/fednet.py), because this machine's kernel has no `netem`
(CONFIG_NET_SCH_NETEM is not set: `tc qdisc add ... netem` answers "Specified qdisc kind is
unknown"). Each byte read is written to the other side `delay_ms` later, in order, so a round
trip through a relay costs 2 × delay_ms plus ~0.2 ms of relaying.

A cut (the routes of a group named in the control file, one name a line, read every 0.1 s)
holds everything: bytes are neither delivered nor refused and new connections wait, as across
a real partition where packets vanish; TCP's and the applications' own timeouts notice. When
healed, what was held is delivered (TCP would retransmit it).

    python -m testing.delayproxy ROUTES.json CONTROL_FILE
    ROUTES: [{"listen": ["10.80.0.1", 4001], "target": ["10.80.1.2", 4222], "delay_ms": 40, "group": "us-eu"}, ...]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any


class Cuts:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.groups: set[str] = set()
        self.changed = asyncio.Event()

    async def watch(self) -> None:
        while True:
            try:
                groups = {g.strip() for g in self.path.read_text().splitlines() if g.strip()}
            except OSError:
                groups = set()
            if groups != self.groups:
                self.groups = groups
                self.changed.set()
                self.changed = asyncio.Event()
            await asyncio.sleep(0.1)

    async def wait_open(self, group: str) -> None:
        while group in self.groups:
            await self.changed.wait()


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float, cuts: Cuts,
               group: str) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            at, data = await queue.get()
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await cuts.wait_open(group)
            if not data:
                writer.write_eof() if writer.can_write_eof() else writer.close()
                return
            writer.write(data)
            await writer.drain()

    task = asyncio.ensure_future(deliver())
    try:
        while True:
            data = await reader.read(65536)
            await cuts.wait_open(group)  # a cut also holds what is sent into it
            queue.put_nowait((time.monotonic() + delay_s, data))
            if not data:
                break
        await task
    except (ConnectionError, OSError):
        pass
    finally:
        task.cancel()
        writer.close()


async def serve(route: dict[str, Any], cuts: Cuts) -> asyncio.base_events.Server:
    delay_s, group = route["delay_ms"] / 1000.0, route["group"]
    host, port = route["target"]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await cuts.wait_open(group)
        await asyncio.sleep(delay_s)  # the SYN's way there (the handshake costs a round trip)
        try:
            up_r, up_w = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        await asyncio.sleep(delay_s)  # and back
        await asyncio.gather(pump(reader, up_w, delay_s, cuts, group), pump(up_r, writer, delay_s, cuts, group))

    return await asyncio.start_server(handle, route["listen"][0], route["listen"][1], reuse_address=True)


async def main(routes: list[dict[str, Any]], control: Path) -> None:
    cuts = Cuts(control)
    servers = [await serve(r, cuts) for r in routes]
    print("ready", flush=True)
    await asyncio.gather(cuts.watch(), *(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])))
