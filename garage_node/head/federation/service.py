"""The federation's part of a running head: its own NATS server (supervised), a connection to
it and one to each other region's, and the loops that carry keys, usage and capacity. All of
it runs on one thread with its own event loop, so nothing here can slow the gateway's loop or
the control API; the gateway's side (usage records, the key cache, spill-over) only touches
thread-safe hand-offs.

Degraded: this head cannot reach its own NATS, or a region it should reach. The region goes on
serving with the keys it knows and keeps its usage records to ship later; `head federation
status`, a log line, and the `x-garage-federation: degraded` header on every answer say so."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import nats
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamConfig
from nats.js.errors import Error as JsError

from garage_node.core.backoff import Backoff
from garage_node.core.fsutil import write_private
from garage_node.core.supervise import Supervised
from garage_node.head.federation import keysync
from garage_node.head.federation.capacity import PeerView, TtftWindow, local_capacity
from garage_node.head.federation.config import REGION, REGION_RULE, FederationSection
from garage_node.head.federation.fedstore import FedStore
from garage_node.head.federation.leases import BUCKET as LEASE_BUCKET
from garage_node.head.federation.leases import Leases
from garage_node.head.federation.natsd import (USER, FederationSetupError, NatsServer, client_tls, open_server,
                                               read_secret)
from garage_node.head.federation.records import Summary, UsageRecord, decode_key, decode_summary, decode_usage, encode
from garage_node.head.gateway.store import Store
from garage_node.head.gateway.table import EndpointTable

log = logging.getLogger(__name__)

USAGE_STREAM = "GN_USAGE"
KEYS_STREAM = f"KV_{keysync.BUCKET}"
KEY_SCAN_S = 0.25
USAGE_FLUSH_S = 0.2
FETCH_WAIT_S = 1.0
STATUS_EVERY_S = 1.0
RETRY_S = 1.0
# A record delivered but not acknowledged (its fetch's answer lost in a cut) comes again after
# this: short, so a healed partition converges in seconds; a record that comes twice is kept once.
ACK_WAIT_S = 5.0
# Usage records wait in the serving region's stream until every region read them: long enough
# for any partition an operator would sit out, bounded so a region gone for good cannot fill a disk.
USAGE_MAX_AGE_S = 30 * 86400


def usage_subject(region: str) -> str:
    return f"gn.usage.{region}"


def summary_subject(region: str) -> str:
    return f"gn.summary.{region}"


def state_dir(head_state_dir: Path) -> Path:
    return head_state_dir / "federation"


def secret_path(cfg: FederationSection, head_state_dir: Path) -> Path:
    return Path(cfg.secret_file) if cfg.secret_file else state_dir(head_state_dir) / "secret"


@dataclass
class Link:
    """This head's connection to one NATS server (its own, or another region's)."""

    region: str
    url: str
    nc: NATS | None = None
    up: bool = False
    since: float = field(default_factory=time.time)
    last_error: str = ""
    streams_ready: bool = False  # own server only: this region's bucket and stream exist
    was_up: bool = False


class Federation:
    def __init__(self, cfg: FederationSection, region: str, head_state_dir: Path, gateway_store: Store,
                 table: EndpointTable, node_name: Callable[[str], str] = lambda n: n) -> None:
        if not REGION.match(region):
            raise FederationSetupError(f"[head] region {region!r} cannot be used in a federation: {REGION_RULE}")
        if region in cfg.peers:
            raise FederationSetupError(f"[federation.peers.{region}] names this region itself: list only the others")
        self.cfg, self.region = cfg, region
        self.dir = state_dir(head_state_dir)
        self.secret = read_secret(secret_path(cfg, head_state_dir))
        pki = head_state_dir / "pki"  # head init's (head/setup.py)
        if cfg.tls and not (pki / "server.pem").exists():
            raise FederationSetupError(f"{pki / 'server.pem'} is missing: run `garage-node head init` (NATS between "
                                       "heads uses the head's certificate)")
        self.server: NatsServer = open_server(self.dir, cfg.nats_listen_host, cfg.nats_port, cfg.nats_command,
                                              f"garage-{region}", self.secret,
                                              *((pki / "server.pem", pki / "server.key") if cfg.tls else (None, None)))
        self._ca = {region: pki / "ca.pem", **{r: Path(p.ca_file) for r, p in cfg.peers.items()}}
        self.nats_child = Supervised("nats-server (federation)", self.server.paths.log, Backoff(1.0, 30.0),
                                     pid_file=self.server.paths.pid_file)
        self.store = FedStore(self.dir / "federation.db")
        self.keys = gateway_store
        self.table = table
        self.node_name = node_name
        self.peers = PeerView(cfg.stale_after_s, cfg.default_ttft_ms)
        self.ttft = TtftWindow()
        # Called with a key's hash when a record from another region changed it (the gateway
        # drops it from its key cache, so a revocation takes effect at once).
        self.on_key_changed: Callable[[str], None] = lambda _hash: None
        self.own = Link(region, self.server.client_url)
        self.links = {r: Link(r, p.nats) for r, p in cfg.peers.items()}
        self._pending: list[UsageRecord] = []
        self._pending_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._degraded_logged: bool | None = None
        self.leases = Leases(region, cfg.lease_tokens, self.store.spent(region),
                             lambda name: self.store.key_homes().get(name, region), self._client_of)

    # -- lifecycle

    def start(self) -> None:
        self.server.write_config()
        self.nats_child.ensure(self.server.argv())
        self._thread = threading.Thread(target=self._run, name="federation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._flush_pending()
        self.nats_child.stop()
        self.store.close()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        self.leases.loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(c) for c in (
            self._supervise(), self._keep_link(self.own, own=True), self._scan_keys(), self._ship_usage(),
            self._publish_summaries(), self._write_status(),
            *(self._keep_link(link) for link in self.links.values()),
            *(self._pull(link, KEYS_STREAM, f"gn-keys-{self.region}", self._apply_keys) for link in self.links.values()),
            *(self._pull(link, USAGE_STREAM, f"gn-usage-{self.region}", self._apply_usage) for link in self.links.values()),
            *(self._measure_rtt(link) for link in self.links.values()),
        )]
        await self._stopping.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in (self.own, *self.links.values()):
            if link.nc is not None and not link.nc.is_closed:
                try:
                    await asyncio.wait_for(link.nc.drain() if link is self.own else link.nc.close(), 3)
                except Exception:  # closing anyway
                    pass

    # -- what the gateway hands over (its loop's thread)

    def record_usage(self, key: str, node_id: str, model: str, prompt_tokens: int, completion_tokens: int) -> str:
        """One served request's usage, with a new id unique across the network; kept locally
        within USAGE_FLUSH_S and shipped when this region's NATS takes it."""
        rid = uuid.uuid4().hex
        rec = UsageRecord(id=rid, region=self.region, at=time.time(), key=key, node_id=node_id,
                          node_name=self.node_name(node_id), model=model, prompt_tokens=max(0, prompt_tokens),
                          completion_tokens=max(0, completion_tokens))
        with self._pending_lock:
            self._pending.append(rec)
        self.leases.spend(key, rec.prompt_tokens + rec.completion_tokens)
        return rid

    def _client_of(self, region: str) -> NATS | None:
        link = self.own if region == self.region else self.links.get(region)
        return link.nc if link is not None and link.up and link.nc is not None else None

    @property
    def degraded(self) -> bool:
        return not self.own.up or any(not link.up for link in self.links.values())

    # -- loops

    async def _supervise(self) -> None:
        """nats-server kept running (restarted with backoff when it dies)."""
        while True:
            if not self.nats_child.running:
                self.server.write_config()
            self.nats_child.ensure(self.server.argv())
            await asyncio.sleep(1.0)

    async def _keep_link(self, link: Link, own: bool = False) -> None:
        """A connection kept open (nats-py reconnects by itself once it has connected; the first
        connection is retried here). For its own server, the streams this region serves exist."""
        while True:
            if link.nc is None or link.nc.is_closed:
                try:
                    tls = {"tls": client_tls(self._ca[link.region])} if self.cfg.tls else {}
                    link.nc = await nats.connect(
                        link.url, user=USER, password=self.secret, name=f"garage-head-{self.region}", **tls,
                        connect_timeout=2, reconnect_time_wait=0.5, max_reconnect_attempts=-1,
                        ping_interval=2, max_outstanding_pings=2, allow_reconnect=True,
                        error_cb=self._quiet, disconnected_cb=self._quiet, reconnected_cb=self._quiet)
                except Exception as e:  # unreachable: try again
                    why = str(e) if isinstance(e, FederationSetupError) else type(e).__name__
                    self._set_up(link, False, f"cannot connect to {link.url} ({why})")
                    await asyncio.sleep(RETRY_S)
                    continue
            up = link.nc.is_connected
            if up and own and not link.streams_ready:
                try:
                    await self._ensure_streams(link.nc)
                    link.streams_ready = True
                except (TimeoutError, NatsError, JsError) as e:
                    up = False
                    link.last_error = f"JetStream not ready ({type(e).__name__})"
            self._set_up(link, up, "" if up else (link.last_error or f"{link.url} is not reachable"))
            await asyncio.sleep(0.25)

    async def _quiet(self, *_: Any) -> None:
        """nats-py's callbacks: the link loop says what matters, once."""

    def _set_up(self, link: Link, up: bool, why: str) -> None:
        if link.up != up:
            link.since = time.time()
            what = "this region's NATS" if link is self.own else f"region {link.region}"
            if up:
                log.info("federation: %s is reachable%s", what, " again" if link.was_up else "")
                link.was_up = True
            else:
                log.warning("federation: %s is not reachable (%s): this region serves on with the keys it knows "
                            "and keeps its usage to ship later", what, why)
        link.up, link.last_error = up, why

    async def _ensure_streams(self, nc: NATS) -> None:
        js = nc.jetstream(timeout=5)
        await js.create_key_value(bucket=keysync.BUCKET, history=1)
        await js.create_key_value(bucket=LEASE_BUCKET, history=1)  # grants for the keys made here
        cfg = StreamConfig(name=USAGE_STREAM, subjects=[usage_subject(self.region)], max_age=USAGE_MAX_AGE_S,
                           duplicate_window=120.0, max_bytes=1024 * 1024 * 1024)
        try:
            await js.add_stream(cfg)
        except JsError:
            await js.update_stream(cfg)

    async def _scan_keys(self) -> None:
        """This region's key table into its bucket: what changed since last published or applied."""
        while True:
            await asyncio.sleep(KEY_SCAN_S)
            nc = self.own.nc
            if nc is None or not self.own.up:
                continue
            try:
                todo = keysync.changed(keysync.local_records(self.keys), self.store.key_seen())
                if not todo:
                    continue
                kv = await nc.jetstream(timeout=5).key_value(keysync.BUCKET)
                homes = self.store.key_homes()
                for rec in todo:
                    # A key this head never heard of from another region was made here: its home.
                    out = replace(rec, origin=self.region, updated_at=time.time(), home=homes.get(rec.name, self.region))
                    await kv.put(keysync.bucket_key(rec.name), encode(out))
                    self.store.set_key_seen(rec.name, rec.fingerprint(), out.updated_at, self.region, out.home)
                    # `head key revoke` here: the gateway's cache lets go of it now, not in 2 s.
                    self.on_key_changed(rec.hash)
            except Exception as e:
                log.warning("federation: key records not published yet (%s); retrying", type(e).__name__)
                await asyncio.sleep(RETRY_S)

    def _apply_keys(self, payloads: list[bytes]) -> None:
        seen = self.store.key_seen()
        local = {r.name: r for r in keysync.local_records(self.keys)}
        for data in payloads:
            if not data:  # a deleted entry: keys are revoked, never deleted
                continue
            try:
                rec = decode_key(data)
            except Exception:
                log.warning("federation: a malformed key record was ignored")
                continue
            new = keysync.merge(local.get(rec.name), rec, seen.get(rec.name, ("", 0.0))[1])
            if new is None:
                continue
            keysync.apply(self.keys, new)
            self.store.set_key_seen(new.name, new.fingerprint(), new.updated_at, new.origin, rec.home)
            seen[new.name] = (new.fingerprint(), new.updated_at)
            local[new.name] = new
            self.on_key_changed(new.hash)
            if new.revoked_at is not None:
                log.info("federation: key '%s' revoked (record from region %s)", new.name, rec.origin)

    def _apply_usage(self, payloads: list[bytes]) -> None:
        records = []
        for data in payloads:
            try:
                records.append(decode_usage(data))
            except Exception:
                log.warning("federation: a malformed usage record was ignored")
        if records:
            self.store.add_usage(records)

    async def _pull(self, link: Link, stream: str, durable: str, apply: Callable[[list[bytes]], None]) -> None:
        """Read another region's stream through a durable consumer of this region's own: after a
        partition or a restart it goes on from the last record acknowledged, and a record is
        acknowledged only once it is in this head's database (at least once; the database keeps
        each id once, so exactly once in the table)."""
        sub = None
        while True:
            nc = link.nc
            if nc is None or not link.up:
                sub = None
                await asyncio.sleep(0.25)
                continue
            try:
                if sub is None:
                    js = nc.jetstream(timeout=5)
                    sub = await js.pull_subscribe_bind(durable=durable, stream=stream) if await _has_consumer(
                        js, stream, durable) else await js.pull_subscribe(
                        "", durable=durable, stream=stream,
                        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_wait=ACK_WAIT_S, max_ack_pending=20000))
                try:
                    msgs = await sub.fetch(256, timeout=FETCH_WAIT_S)
                except TimeoutError:
                    continue
                apply([m.data for m in msgs])
                for m in msgs:
                    await m.ack()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("federation: reading %s from %s: %s", stream, link.region, e)
                sub = None
                await asyncio.sleep(RETRY_S)

    async def _ship_usage(self) -> None:
        """This region's records into its database, then into its stream (Nats-Msg-Id: the
        request id, so a publish retried after a lost acknowledgement is stored once)."""
        while True:
            await asyncio.sleep(USAGE_FLUSH_S)
            self._flush_pending()
            nc = self.own.nc
            if nc is None or not self.own.up:
                continue
            try:
                js = nc.jetstream(timeout=5)
                while batch := self.store.own_unshipped(self.region):
                    for rowid, rec in batch:
                        await js.publish(usage_subject(self.region), encode(rec), headers={"Nats-Msg-Id": rec.id})
                        self.store.set_cursor("shipped", rowid)
            except Exception as e:
                log.debug("federation: usage not shipped yet (%s)", type(e).__name__)

    def _flush_pending(self) -> None:
        with self._pending_lock:
            batch, self._pending = self._pending, []
        if batch:
            self.store.add_usage(batch)

    async def _publish_summaries(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.summary_s)
            nc = self.own.nc
            if nc is None or not self.own.up:
                continue
            summary = Summary(region=self.region, at=time.time(),
                              models=local_capacity(self.table, self.cfg.pc_slots, self.ttft))
            try:
                await nc.publish(summary_subject(self.region), encode(summary))
            except NatsError:
                pass

    async def _measure_rtt(self, link: Link) -> None:
        """The round trip to a region's head (its NATS server runs beside it), and its summaries."""
        subscribed: NATS | None = None
        while True:
            await asyncio.sleep(self.cfg.summary_s)
            nc = link.nc
            if nc is None or not link.up:
                continue
            if subscribed is not nc:
                await nc.subscribe(summary_subject(link.region), cb=self._on_summary)
                subscribed = nc
            try:
                self.peers.rtt(link.region, await nc.rtt(timeout=2) * 1000.0)
            except Exception:
                pass

    async def _on_summary(self, msg: Any) -> None:
        try:
            s = decode_summary(msg.data)
        except Exception:
            return
        if s.region in self.links:
            self.peers.summary(s, time.monotonic())

    async def _write_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            degraded = self.degraded
            if degraded != self._degraded_logged:
                if degraded:
                    log.warning("federation: DEGRADED (see `garage-node head federation status`)")
                elif self._degraded_logged is not None:
                    log.info("federation: every region reachable again")
                self._degraded_logged = degraded
            try:
                write_private(self.dir / "status.json", json.dumps(self.status()).encode())
            except OSError:
                pass

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        views = self.peers.status(now)
        return {
            "region": self.region, "degraded": self.degraded, "written_at": time.time(),
            "nats": {"url": self.own.url, "up": self.own.up, "since": self.own.since, "problem": self.own.last_error},
            "peers": {r: {"nats": link.url, "up": link.up, "since": link.since, "problem": link.last_error,
                          **views.get(r, {})} for r, link in self.links.items()},
            "usage_records": self.store.counts(),
            "unshipped": self.store.own_unshipped_count(self.region),
        }


async def _has_consumer(js: Any, stream: str, durable: str) -> bool:
    try:
        await js.consumer_info(stream, durable)
        return True
    except JsError:
        return False
