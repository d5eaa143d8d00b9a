"""Quotas across regions by leases: a region serves a key with a quota only out of the tokens
leased to it, and a lease comes from the key's home region (where it was made), which grants
at most what is left of the quota. The grants live in the home's `gn_leases` bucket, one entry
per key ({region: tokens granted in all}), changed only by compare-and-set, so two regions
asking at once never both get the last tokens.

A region asks for the next lease when a quarter of one is left, in the background; a request
waits for a lease (at most LEASE_WAIT_S) only when none is left. Cut off from the home, a
region spends what it holds, then refuses with 429: the network overshoots a quota by at most
the requests under way when the leases ran out (a request's tokens are known only after it),
never by a lease per region as without shared state."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from concurrent.futures import Future
from typing import Any, Callable

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from garage_node.head.federation import keysync
from garage_node.head.gateway.errors import GatewayError
from garage_node.head.gateway.keys import ApiKey

log = logging.getLogger(__name__)

BUCKET = "gn_leases"
LEASE_WAIT_S = 3.0
CAS_TRIES = 8


class Leases:
    def __init__(self, region: str, lease_tokens: int, spent: dict[str, int], home_of: Callable[[str], str],
                 link_to: Callable[[str], Any]) -> None:
        """`spent`: tokens this region served per key so far; `home_of(name)`: the key's home region;
        `link_to(region)`: a connected NATS client to that region's server, or None."""
        self.region, self.lease_tokens = region, lease_tokens
        self.home_of, self.link_to = home_of, link_to
        self._lock = threading.Lock()
        self._spent = dict(spent)
        self._held: dict[str, int] = {}
        self._asking: dict[str, Future[None]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # the federation's loop

    def spend(self, key: str, tokens: int) -> None:
        with self._lock:
            self._spent[key] = self._spent.get(key, 0) + tokens

    def left(self, key: str) -> int:
        with self._lock:
            return self._held.get(key, 0) - self._spent.get(key, 0)

    async def admit(self, key: ApiKey) -> None:
        """On the gateway's loop, before a request of a key with a quota: 429 when this region
        holds none of its quota and cannot get a lease now."""
        if key.quota_tokens is None:
            return
        left = self.left(key.name)
        if left > self.lease_tokens // 4:
            return
        asking = self._ask(key.name, key.quota_tokens)  # the next lease, in the background
        if left <= 0 and asking is not None:
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(asking)), LEASE_WAIT_S)
            except Exception:  # the home is away, or slow: what is held decides
                pass
        if self.left(key.name) <= 0:
            raise GatewayError(429, "insufficient_quota", f"the API key '{key.name}' has no quota left in this region "
                               "(its quota is used up, or its home region cannot be reached to lease more); ask "
                               "the operator for more, or retry later", retry_after_s=5)

    def _ask(self, name: str, quota: int) -> Future[None] | None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return None
        with self._lock:
            fut = self._asking.get(name)
            if fut is None or fut.done():
                fut = asyncio.run_coroutine_threadsafe(self._acquire(name, quota), loop)
                self._asking[name] = fut
            return fut

    async def _acquire(self, name: str, quota: int) -> None:
        """On the federation's loop: one more lease from the key's home, by compare-and-set."""
        home = self.home_of(name)
        nc = self.link_to(home)
        if nc is None:
            return
        kv = await nc.jetstream(timeout=5).key_value(BUCKET)
        bkey = keysync.bucket_key(name)
        for _ in range(CAS_TRIES):
            try:
                entry = await kv.get(bkey)
                granted = json.loads(entry.value or b"{}")
                revision: int | None = entry.revision
            except KeyNotFoundError:
                granted, revision = {}, None
            mine = int(granted.get(self.region, 0))
            with self._lock:
                spent = self._spent.get(name, 0)
            if mine - spent > self.lease_tokens // 4:  # held already (granted before a restart)
                break
            left = quota - sum(int(v) for v in granted.values())
            if left <= 0:
                break
            grant = min(self.lease_tokens, left)
            granted[self.region] = mine + grant
            data = json.dumps(granted).encode()
            try:
                if revision is None:
                    await kv.create(bkey, data)
                else:
                    await kv.update(bkey, data, last=revision)
            except KeyWrongLastSequenceError:
                continue  # another region took a lease meanwhile: read again
            except Exception as e:  # create() on an entry made meanwhile answers another error
                log.debug("lease for %s: %s; reading again", name, e)
                continue
            mine = granted[self.region]
            log.info("federation: leased %d more tokens of key '%s' from region %s (%d of its %d leased here)",
                     grant, name, home, mine, quota)
            break
        with self._lock:
            self._held[name] = max(self._held.get(name, 0), mine)
