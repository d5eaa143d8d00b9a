"""The head-session part of the agent: enrollment, heartbeats, credential renewal, revocation.

It is the only part that talks to the head's control API, and it persists what the head grants
(identity.json, the head's CA, the pending keys of node/keys.py) in the order that survives a
crash. It never acts on the rest of the PC: each call returns the identity the agent should
adopt, and the agent derives what must be redone from the old and the new (agent.adopt).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import socket
from dataclasses import dataclass
from typing import Callable

from garage_node.core import token
from garage_node.core.backoff import Backoff
from garage_node.core.clock import Clock
from garage_node.core.errors import ErrorCode
from garage_node.core.fsutil import read_json, write_json
from garage_node.core.wire import Assignment, HeartbeatReply, NodeReport, NodeState, QuarantineStatus, TokensServed, WireError, decode, encode
from garage_node.core.wireguard import public_key_of
from garage_node.node import identity, keys
from garage_node.node.config import NodeConfig
from garage_node.node.headclient import BeatTimer, HeadApi, HeadClient, HeadError, Revoked
from garage_node.node.health import Health, Source
from garage_node.node.identity import Identity
from garage_node.node.paths import StatePaths

log = logging.getLogger(__name__)

Report = Callable[[], NodeReport]


@dataclass
class HeadLink:
    """The node's view of its head, from the last enrollment or heartbeat (monotonic times)."""

    reachable: bool | None = None  # None: not asked yet
    last_contact: float | None = None
    last_error: str | None = None
    next_call: float = 0.0


@dataclass(frozen=True)
class Answer:
    """What a heartbeat brought: the identity to adopt, and the head's reply (None: revoked)."""

    identity: Identity
    reply: HeartbeatReply | None


class HeadSession:
    def __init__(self, cfg: NodeConfig, paths: StatePaths, clock: Clock, health: Health, head_api: HeadApi,
                 beats: BeatTimer, backoff: Callable[[], Backoff]) -> None:
        self.cfg = cfg
        self.paths = paths
        self.clock = clock
        self.health = health
        self.head_api = head_api
        # Heartbeats spread over time (headclient.py); a test gives a seeded one, so the number
        # of heartbeats in a stretch of its clock is the same on every run.
        self.beats = beats
        self.link = HeadLink()
        self.tokens_served: TokensServed | None = None  # as the head's last answer said
        self.update_target: str | None = None  # the OS version the head's rollout wants here (issue #19)
        # Why the region's audits quarantined this PC, as the head's last answer said (None: not).
        self.quarantine: QuarantineStatus | None = None
        # What the head wants this PC to serve (issue #18), as its last answer said; kept while
        # the head is unreachable (the PC goes on serving it). None: an older head, or placement
        # off: the PC plans for itself (node/assign.py carries it out). Kept in the state
        # directory too: until the head answers after a restart, the last one stays in effect
        # (an agent restarted while the head is down must not drop its assigned engine).
        self.assignment: Assignment | None = load_assignment(paths)
        # Before the first join, what the enrollment step last said (for node/state.py).
        self.enrollment: tuple[NodeState, str] | None = None
        self._backoff = backoff()
        self._renew_backoff = backoff()
        self._refused_token: str | None = None  # hash of a token the head refused for good
        self._renew_at: float | None = None  # when to renew the credential (monotonic); None: not known yet
        self._client: HeadClient | None = None  # the head client of the current identity

    def node_name(self) -> str:
        return self.cfg.node.name or socket.gethostname().split(".")[0]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- enrollment

    def _pending_token(self) -> tuple[str, str] | None:
        """(token text, where it came from): the one `garage-node join` stored wins over config."""
        if self.paths.join_token.exists():
            return self.paths.join_token.read_text().strip(), str(self.paths.join_token)
        if self.cfg.node.join_token:
            return self.cfg.node.join_token, "config [node] join_token"
        return None

    def enroll(self, current: Identity | None, report: Report) -> Identity | None:
        """Trade the pending join token for an identity; the new identity, stored, or None."""
        pending = self._pending_token()
        if pending is None:
            if current is None:
                self.enrollment = (NodeState.NEEDS_TOKEN, "waiting for a join token")
                self.health.fail(Source.ENROLL, "this PC has not joined a region yet",
                                 "put the join token in garage.toml ([node] join_token) or run `garage-node join TOKEN`")
            return None
        text, source = pending
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == self._refused_token or self.clock.monotonic() < self.link.next_call:
            return None
        if current is not None and digest == current.token_digest:
            return None  # revoked, and this is the token it joined with: wait for a new one
        try:
            tok = token.parse(text)
        except token.TokenError as e:
            self._refused_token = digest
            self.health.fail(Source.ENROLL, f"the join token in {source} is unusable: {e}")
            self.enrollment = (NodeState.ERROR, "the join token is unusable")
            return None
        self.enrollment = (NodeState.ENROLLING, f"enrolling with the head at {tok.api_url}")
        # The key is stored before the head hears of it: after a crash here, the same token and
        # key get the same identity back instead of spending the token again (node/keys.py).
        wg_key = keys.pending_key(self.paths.enroll_key, digest, avoid=current.wg_private_key if current else "")
        try:
            ident, ca_pem = self.head_api.enroll(tok, self.node_name(), report(), wg_key, self.cfg.node.region)
        except HeadError as e:
            if e.code == ErrorCode.KEY_IN_USE:
                keys.done(self.paths.enroll_key)  # a new token then comes with a new key
            self._enroll_failed(e, digest)
            return None
        ident = dataclasses.replace(ident, token_digest=digest)
        identity.save(self.paths, ident, ca_pem)
        keys.done(self.paths.enroll_key)
        self.paths.join_token.unlink(missing_ok=True)
        self._keep_assignment(None)  # a new identity: what the head assigned the old one is moot
        self.close()  # a client of the old identity, if any
        self._backoff.reset()
        self.link = HeadLink(reachable=True, last_contact=self.clock.monotonic())
        self.health.clear(Source.ENROLL, Source.HEAD)
        self.enrollment = None
        log.info("enrolled as node %s with overlay address %s", ident.node_id, ident.overlay_ip)
        return ident

    def _enroll_failed(self, e: HeadError, digest: str) -> None:
        self.link.reachable = e.code != "unreachable" if e.code else None
        if e.retry:
            delay = self._backoff.next_delay()
            self.link.next_call = self.clock.monotonic() + delay
            self.health.fail(Source.ENROLL, str(e), "check that the head is running and reachable from this PC",
                             retry_in=delay)
            self.enrollment = (NodeState.ENROLLING, str(e))
        else:
            self._refused_token = digest
            self.health.fail(Source.ENROLL, str(e), "get a new join token from the operator and run `garage-node join TOKEN`")
            self.enrollment = (NodeState.ERROR, str(e))

    # -- heartbeat

    def heartbeat_if_due(self, ident: Identity, report: Report) -> Answer | None:
        if self.clock.monotonic() < self.link.next_call:
            return None
        try:
            reply = self._head_client(ident).heartbeat(report())
        except Revoked as e:
            return Answer(self._revoked(ident, str(e)), None)
        except HeadError as e:
            self._unreachable(ident, str(e))
            return None
        return Answer(self._heartbeat_ok(ident, reply), reply)

    def beat_now(self) -> None:
        """The next pass sends a heartbeat whenever it was due (a switch tells the head first,
        node/assign.py). A head that is failing keeps its backoff."""
        if self.link.reachable is not False:
            self.link.next_call = 0.0

    def tell_now(self, ident: Identity, report: Report) -> None:
        """One last heartbeat on the way down, so the head knows at once (best effort)."""
        self.link.next_call = 0.0
        self.heartbeat_if_due(ident, report)

    def _heartbeat_ok(self, ident: Identity, reply: HeartbeatReply) -> Identity:
        now = self.clock.monotonic()
        self.link.reachable, self.link.last_contact, self.link.last_error = True, now, None
        self._backoff.reset()
        updated = updated_by(ident, reply)
        self.tokens_served = reply.tokens_served
        self.update_target = reply.update_target
        self.quarantine = reply.quarantine
        self._keep_assignment(reply.assignment)
        if updated != ident:
            identity.save(self.paths, updated)
        self.link.next_call = now + self.beats.next_in(updated.heartbeat_s)  # jittered: see BeatTimer
        self.health.clear(Source.HEAD)
        if reply.credential_expires_in_s is not None and reply.credential_lifetime_s:
            self._renew_at = now + renew_in(reply.credential_expires_in_s, reply.credential_lifetime_s)
        return updated

    def _keep_assignment(self, a: Assignment | None) -> None:
        """The head's newest word, kept for a restart; written only when it changes."""
        if a == self.assignment and (a is None) != self.paths.assignment.exists():
            return
        self.assignment = a
        try:
            if a is None:
                self.paths.assignment.unlink(missing_ok=True)
            else:
                write_json(self.paths.assignment, encode(a))  # atomic: the old word or the new
        except OSError as e:
            log.warning("cannot keep the head's assignment in %s (a restart while the head is down "
                        "would plan for itself): %s", self.paths.assignment, e)

    def _unreachable(self, ident: Identity, message: str) -> None:
        delay = min(self._backoff.next_delay(), ident.heartbeat_s)
        self.link.next_call = self.clock.monotonic() + delay
        self.link.reachable, self.link.last_error = False, message
        self.health.fail(Source.HEAD, message,
                         "check that the head is running; the node keeps its place and rejoins by itself", retry_in=delay)

    def _revoked(self, ident: Identity, message: str) -> Identity:
        log.warning("the head revoked this node: %s", message)
        revoked = dataclasses.replace(ident, revoked=True)
        identity.save(self.paths, revoked)
        self.link.reachable = True
        self.health.fail(Source.HEAD, f"revoked: {message}",
                         "ask the operator for a new join token and run `garage-node join TOKEN`")
        return revoked

    def _head_client(self, ident: Identity) -> HeadClient:
        if self._client is None:
            self._client = self.head_api.connect(ident, self.paths.head_ca.read_bytes())
        return self._client

    # -- credential renewal

    def renew_if_due(self, ident: Identity) -> Identity | None:
        """Renew the credential (and the WireGuard key with it) when a third of its lifetime is
        left, over the authenticated channel; also finish a rotation a crash interrupted.
        The renewed identity, stored, or None."""
        if ident.revoked or self.link.reachable is not True:
            return None
        now = self.clock.monotonic()
        interrupted = self.paths.rotate_key.exists()
        if not interrupted and (self._renew_at is None or now < self._renew_at):
            return None
        new_key = keys.pending_key(self.paths.rotate_key, ident.node_id, avoid=ident.wg_private_key)
        client = self._head_client(ident)
        try:
            reply = client.renew_credential(public_key_of(new_key))
        except Revoked as e:
            return self._revoked(ident, str(e))
        except HeadError as e:
            if e.code == ErrorCode.KEY_IN_USE:
                keys.done(self.paths.rotate_key)  # the next try makes another key
            delay = self._renew_backoff.next_delay()
            self._renew_at = now + delay
            log.warning("renewing this node's credential failed, trying again in %.0f s: %s", delay, e)
            return None
        updated = dataclasses.replace(ident, credential=reply.credential, wg_private_key=new_key)
        identity.save(self.paths, updated)
        keys.done(self.paths.rotate_key)
        client.ident = updated  # the same connection, the new credential
        self._renew_backoff.reset()
        self._renew_at = now + renew_in(reply.credential_expires_in_s, reply.credential_lifetime_s)
        log.info("renewed this node's credential and WireGuard key")
        return updated


def load_assignment(paths: StatePaths) -> Assignment | None:
    """The head's last assignment, as kept (None: none kept, or the file is unusable)."""
    try:
        return decode(read_json(paths.assignment), Assignment)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, WireError) as e:
        log.warning("ignoring %s (%s): this PC plans for itself until the head answers", paths.assignment, e)
        return None


def updated_by(ident: Identity, reply: HeartbeatReply) -> Identity:
    """The identity with what a heartbeat answer carries: the region's facts (the hub may have
    moved), a rotated Ray cluster token, a new engine key."""
    updated = ident.with_region(reply)
    if reply.ray_token:  # rotated at the head: the worker restarts with the new one
        updated = dataclasses.replace(updated, ray_token=reply.ray_token)
    if reply.engine_api_key:  # a new key replaces the engine container (its spec changes)
        updated = dataclasses.replace(updated, engine_api_key=reply.engine_api_key)
    return updated


def renew_in(expires_in_s: float, lifetime_s: float) -> float:
    """Seconds until a renewal is due: when a third of the credential's lifetime is left."""
    return max(0.0, expires_in_s - lifetime_s / 3)
