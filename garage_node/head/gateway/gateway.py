"""The gateway put together: what `garage-node head run` builds when `[gateway] enabled`."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable

from garage_node.core.clock import SYSTEM, Clock, Refreshed
from garage_node.core.wire import HeartbeatExtras, NodeReport, TokensServed
from garage_node.head.audit.auditor import Auditor
from garage_node.head.audit.canaries import CanaryError
from garage_node.head.audit.metrics import AuditCollector
from garage_node.head.audit.trust import Trust, quarantine_status
from garage_node.head.gateway.demand import Demand
from garage_node.head.gateway.enginekeys import EngineKeys
from garage_node.head.gateway.errors import ClientGone, GatewayError
from garage_node.head.gateway.keys import ApiKey, KeyStore
from garage_node.head.gateway.keys import digest as keys_digest
from garage_node.head.gateway.ledger import Ledger
from garage_node.head.gateway.metrics import GatewayMetrics
from garage_node.head.gateway.proxy import Call, Proxy, Usage
from garage_node.head.gateway.ratelimit import RateLimits
from garage_node.head.gateway.router import Router
from garage_node.head.gateway.store import Store
from garage_node.head.gateway.table import EndpointTable

log = logging.getLogger(__name__)

NAMES_TTL_S = 5.0
# A PC silent this long is forgotten (its endpoint, last report and prefixes), as is a PC the
# registry no longer lists once it is stale. Not at stale_after_s: a PC back after a short
# outage keeps its count of open requests and its prefixes.
FORGET_AFTER_S = 600.0
KEY_CACHE_S = 2.0
TOTALS_TTL_S = 1.0
# How often a request held for a model being placed looks whether a PC serves it yet.
HOLD_POLL_S = 0.25


def database_path(state_dir: Path) -> Path:
    return state_dir / "gateway.db"


class Gateway:
    def __init__(self, cfg: Any, state_dir: Path, node_names: Callable[[], dict[str, str]], clock: Clock = SYSTEM,
                 audit: Any = None) -> None:
        """`cfg`: the head's [gateway] section; `node_names()`: node id -> name, from the registry;
        `audit`: the head's [audit] section (None or not enabled: no audits)."""
        self.cfg = cfg
        self.clock = clock
        self.state_dir = state_dir
        self.store = Store(database_path(state_dir))
        self.keys = KeyStore(self.store)
        self.ledger = Ledger(self.store, clock)
        self.engine_keys = EngineKeys(state_dir / "engine-key.secret")
        self.trust = Trust(self.store, clock)
        self.table = EndpointTable(cfg.stale_after_s, clock)
        self.table.excluded = self.trust.excluded  # quarantined PCs get no traffic
        self.router = Router(cfg.affinity_threshold, cfg.balance_abs, cfg.balance_rel, policy=cfg.policy)
        self.limits = RateLimits()
        self.max_body_bytes = cfg.max_body_bytes
        self.max_in_flight = cfg.max_in_flight
        self.max_queue_age_s = cfg.max_queue_age_s
        self.demand = Demand(clock=clock)
        # The models of the region's catalog (`head model add`): a request for one that no PC
        # serves yet is held while the head places it. Set by the head's placement loop.
        self.placed: Callable[[], frozenset[str]] = frozenset
        self._held = 0  # requests held now, all models (bounded by [gateway] hold_queue)
        self._key_cache: dict[str, tuple[float, ApiKey]] = {}
        self._totals = Refreshed(self.ledger.node_totals_all, TOTALS_TTL_S, clock)
        self._node_names = node_names
        self._names: dict[str, str] = {}
        self._names_at = float("-inf")
        self._names_lock = threading.Lock()
        self.metrics = GatewayMetrics(self.table, self.names,
                                      lambda: {n: t.total for n, t in self.ledger.node_totals_all().items()})
        self.proxy = Proxy(self.table, self.router, self.engine_keys.for_node, self.metrics, self.record_usage,
                           self.node_name, connect_timeout_s=cfg.connect_timeout_s,
                           first_byte_timeout_s=cfg.first_byte_timeout_s,
                           stream_idle_timeout_s=cfg.stream_idle_timeout_s, max_attempts=cfg.max_attempts,
                           silent_first_byte_s=cfg.silent_first_byte_s,
                           max_connections=cfg.max_in_flight * cfg.max_attempts,
                           keepalive_connections=cfg.engine_keepalive_connections,
                           keepalive_s=cfg.engine_keepalive_s)
        # Audits of what PCs answer (issue #20): the proxy's tap, a loop of their own.
        self.auditor: Auditor | None = None
        if audit is not None and audit.enabled:
            try:
                self.auditor = Auditor(audit, self.store, self.trust, self.table, self.router,
                                       self.engine_keys.for_node, self.proxy, clock)
            except CanaryError as e:  # `head run` says it and stops, as for any setup problem
                from garage_node.head.setup import SetupError
                raise SetupError(f"{e}; fix it or set [audit] canary_prompts = \"\" for the shipped prompts") from None
            self.proxy.audit = self.auditor
            # Each PC's earned, held and frozen tokens, for its heartbeat answer: one read of the
            # whole region a second, as for the totals.
            hold_s = audit.hold_days * 86400
            self._earnings = Refreshed(lambda: self.ledger.earnings(self.trust.snapshot(), hold_s), TOTALS_TTL_S, clock)
            self.metrics.registry.register(AuditCollector(self.auditor, self.names))

    # -- lifecycle

    def start(self) -> None:
        self.ledger.start()
        if self.auditor is not None:
            self.auditor.start()

    def stop(self) -> None:
        if self.auditor is not None:
            self.auditor.stop()
        self.ledger.stop()

    # -- what the control API asks

    def on_report(self, node_id: str, report: NodeReport) -> None:
        self.table.update(node_id, report)

    def on_heartbeat_s(self, seconds: float, status: int) -> None:
        self.metrics.heartbeats.labels(str(status)).observe(seconds)

    def node_extras(self, node_id: str) -> HeartbeatExtras:
        """The gateway's part of a heartbeat's answer: the PC's engine key, its tokens served,
        and why the audits quarantined it (if they did)."""
        totals = self._all_totals().get(node_id)
        served = TokensServed(today=totals.today, total=totals.total) if totals else TokensServed()
        if self.auditor is not None:  # earnings are held [audit] hold_days: what of it may be paid
            e = self._earnings.get().get(node_id)
            served = TokensServed(today=served.today, total=served.total, earned=e.earned if e else 0,
                                  held=e.held if e else 0, frozen=e.frozen if e else 0)
        return HeartbeatExtras(engine_api_key=self.engine_keys.for_node(node_id), tokens_served=served,
                               quarantine=quarantine_status(self.trust.snapshot().get(node_id)))

    def _all_totals(self) -> dict[str, Any]:
        """Every PC's totals, read at most once a second: one query for the whole region
        instead of two per heartbeat (a thousand PCs send 200 a second)."""
        return self._totals.get()

    # -- per request

    def names(self) -> dict[str, str]:
        with self._names_lock:
            now = self.clock.monotonic()
            if now - self._names_at > NAMES_TTL_S:
                try:
                    self._names = self._node_names()
                    self._names_at = now
                except Exception:  # the registry is busy: the last names do
                    log.exception("could not read node names")
                else:
                    self._forget_gone(self._names)
            return self._names

    def _forget_gone(self, registered: dict[str, str]) -> None:
        """Forget the PCs long silent, and those revoked or removed from the registry once they
        are stale (a PC newer than the last read of the registry is never stale)."""
        gone = self.table.forget_silent(FORGET_AFTER_S)
        gone += self.table.forget_silent(self.table.stale_after_s, only=lambda n: n not in registered)
        if gone:
            with self.table.lock:  # the router is used under the table's lock (proxy.py)
                for node_id in gone:
                    self.router.forget_node(node_id)
            log.info("gateway: forgot %d PC(s) silent or no longer registered", len(gone))

    def node_name(self, node_id: str) -> str:
        return self.names().get(node_id, node_id)

    def authenticate(self, authorization: str) -> ApiKey:
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise GatewayError(401, "missing_api_key", "no API key: send 'Authorization: Bearer <key>' with a key "
                               "from the region's operator (garage-node head key create)")
        key = self._lookup(secret.strip())
        if key is None:
            raise GatewayError(401, "invalid_api_key", "this API key is not known here: check it, or ask the "
                               "region's operator for one")
        state = key.state(self.clock.time())
        if state == "revoked":
            raise GatewayError(401, "revoked_api_key", f"the API key '{key.name}' was revoked: ask the region's "
                               "operator for a new one")
        if state == "expired":
            raise GatewayError(401, "expired_api_key", f"the API key '{key.name}' has expired: ask the region's "
                               "operator for a new one")
        return key

    def _lookup(self, secret: str) -> ApiKey | None:
        """The key, from a cache of KEY_CACHE_S (a revocation by `head key revoke`, another
        process, takes effect within that); unknown keys are not cached, so a flood of made-up
        keys cannot grow it."""
        digest_ = keys_digest(secret)
        now = self.clock.monotonic()
        hit = self._key_cache.get(digest_)
        if hit is not None and now - hit[0] < KEY_CACHE_S:
            return hit[1]
        key = self.keys.lookup(secret)
        if key is not None:
            if len(self._key_cache) > 10_000:
                self._key_cache.clear()
            self._key_cache[digest_] = (now, key)
        return key

    def forget_key(self, digest_: str) -> None:
        """Drop a key from the cache (federation: another region changed it; revoked at once)."""
        self._key_cache.pop(digest_, None)

    def known(self, model: str) -> bool:
        """Served by some PC (in any state) or in the region's catalog: demand counts only these."""
        return bool(self.table.pool(model)) or model in self.placed()

    async def hold(self, key: ApiKey, model: str, gone: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Wait while no PC takes requests for `model`, if the head is placing it (it is in the
        region's catalog): until one does, or past [gateway] hold_s (503, "loading"), or at
        once when hold_queue requests are held already (503). Returns at once for a model
        some PC serves, and for one outside the catalog (admit answers 404 for it). `gone`
        says whether the client has left: a held request whose client left (ClientGone) gives
        its place in the queue back at once instead of waiting out hold_s for nobody."""
        # The catalog first: with none (placement off, or nothing added) a request pays one
        # set lookup here, not a walk of the model's PCs under the table's lock.
        if model not in self.placed() or not key.allows(model) or self.table.serving(model):
            return
        loading = (f"{model} is loading: the region is starting it on a PC (a first start takes a minute or "
                   "two); retry shortly")
        self.demand.unserved(model)
        if self._held >= self.cfg.hold_queue:
            raise GatewayError(503, "model_loading", loading + f" ({self._held} requests wait already)",
                               retry_after_s=min(30.0, self.cfg.hold_s))
        self._held += 1  # the event loop's own count: only its tasks touch it
        self.demand.opened(model, held=True)
        try:
            deadline = self.clock.monotonic() + self.cfg.hold_s
            while not self.table.serving(model):
                if self.clock.monotonic() >= deadline:
                    raise GatewayError(503, "model_loading", loading, retry_after_s=min(30.0, self.cfg.hold_s))
                await asyncio.sleep(HOLD_POLL_S)
                if gone is not None and await gone():
                    raise ClientGone()
        finally:
            self._held -= 1
            self.demand.closed(model, held=True)

    @property
    def held(self) -> int:
        return self._held

    def admit(self, key: ApiKey, model: str) -> None:
        """Raises GatewayError when no PC of the region serves `model` (after any hold)."""
        if not self.table.pool(model):
            allowed = sorted(m.model for m in self.table.models() if key.allows(m.model))
            raise GatewayError(404, "model_not_found", f"no PC in this region serves {model} now; served now: "
                               f"{', '.join(allowed) or 'none'}", param="model")

    def admit_key(self, key: ApiKey, model: str) -> None:
        """Raises GatewayError when this key may not send this request now (the model, its
        quota, its limits): checked before a request is held, so a key over its limits never
        takes a place in the hold queue."""
        if not key.allows(model):
            raise GatewayError(404, "model_not_found", f"the API key '{key.name}' may not use {model}; it may use: "
                               f"{', '.join(key.models)}", param="model")
        if key.quota_tokens is not None and self.ledger.key_tokens(key.name) >= key.quota_tokens:
            raise GatewayError(429, "insufficient_quota", f"the API key '{key.name}' has used its quota of "
                               f"{key.quota_tokens} tokens: ask the region's operator for more")
        wait = self.limits.take_request(key)
        if wait is not None:
            raise GatewayError(429, "rate_limit_exceeded", f"the API key '{key.name}' is over its limit of "
                               f"{key.rpm} requests per minute", retry_after_s=wait)
        wait = self.limits.tokens_left(key)
        if wait is not None:
            raise GatewayError(429, "rate_limit_exceeded", f"the API key '{key.name}' is over its limit of "
                               f"{key.tpm} tokens per minute", retry_after_s=wait)

    def record_usage(self, call: Call, usage: Usage) -> None:
        self.ledger.add(call.key.name, usage.node_id, usage.model, usage.prompt_tokens, usage.completion_tokens)
        self.limits.spend_tokens(call.key, usage.prompt_tokens + usage.completion_tokens)
        self.metrics.tokens.labels(usage.node_id, usage.model, "prompt").inc(usage.prompt_tokens)
        self.metrics.tokens.labels(usage.node_id, usage.model, "completion").inc(usage.completion_tokens)
