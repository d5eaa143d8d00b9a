"""`[federation]` in the head config: this region's NATS server and the other regions."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from garage_node.core.settings import nonnegative, positive, setting, tcp_port

# A region's name goes into NATS consumer names and subjects: letters, digits, '-' only.
REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}\Z")
REGION_RULE = "use 1-32 lower-case letters, digits or '-'"
_URL = re.compile(r"^(nats|tls)://[^\s/]+:\d+\Z")
_HTTP = re.compile(r"^https?://[^\s/]+(:\d+)?\Z")


@dataclass(frozen=True)
class PeerSection:
    """Another region's head: `[federation.peers.<region>]`."""

    # Its NATS server (nats://host:port): key records, usage and capacity summaries come from it.
    nats: str = setting(check=(lambda v: bool(_URL.match(v)), "a NATS address like nats://head-eu.example:4222"))
    # Its gateway (https://host:port): requests this region cannot serve are replayed there.
    gateway: str = setting(check=(lambda v: bool(_HTTP.match(v)), "a gateway address like https://head-eu.example:8080"))
    # Its head's CA certificate (its <state_dir>/pki/ca.pem, copied here): its NATS server is
    # trusted only with a certificate that CA signed (the CA is the region's, as a join token pins it).
    ca_file: str = ""


@dataclass(frozen=True)
class FederationSection:
    """Off by default: a single region behaves exactly as without federation."""

    enabled: bool = False
    # This region's NATS server, started and supervised by the head (like its Redis). The
    # other regions' heads connect to it with the federation secret.
    nats_listen_host: str = "0.0.0.0"
    nats_port: int = setting(4222, check=tcp_port())
    nats_command: str = ""  # empty: nats-server from PATH (Debian's package)
    # NATS between heads over TLS, with the head's own server certificate (head init's PKI);
    # false only where the heads talk over a network already private (WireGuard between them).
    tls: bool = True
    # The secret every region's head shares (one 0600 file, the same on every head: made once
    # with `garage-node head federation secret`, copied to the others): the NATS password of
    # the heads and the credential a head shows when it replays a request to another head.
    # Empty: <state_dir>/federation/secret.
    secret_file: str = ""
    # A request is spilled to another region only if its round trip plus that region's time to
    # first token (p50) fits this; past it the answer is a fast 429 with Retry-After.
    budget_ms: float = setting(500.0, check=positive())
    # The TTFT assumed for a region that has not measured one yet for a model.
    default_ttft_ms: float = setting(150.0, check=nonnegative())
    # How often this head publishes its per-model summary; a peer's summary older than
    # stale_after_s counts as missing (that region is not spilled to).
    summary_s: float = setting(1.5, check=positive())
    stale_after_s: float = setting(5.0, check=positive())
    # A PC counts as saturated with this many requests in flight from the gateway, or with any
    # waiting in its engine's queue (its last report).
    pc_slots: int = setting(16, check=positive())
    # Quotas (`head key create --quota N`) across regions: a region spends a key's tokens only
    # out of leases of this many tokens, granted by the key's home region (where it was made)
    # from what is left of its quota. Cut off from the home, a region spends what it holds and
    # then refuses (429); the network overshoots a quota by at most one request per region.
    lease_tokens: int = setting(10000, check=positive())
    peers: dict[str, PeerSection] = field(default_factory=dict)

    def problems(self):
        for name, peer in self.peers.items():
            if not REGION.match(name):
                yield f"peers.{name}", f"is not a usable region name: {REGION_RULE}."
            if self.enabled and self.tls and not peer.ca_file:
                yield (f"peers.{name}.ca_file", f"is missing: copy region {name}'s head CA (its <state_dir>/pki/ca.pem) "
                       "to this head and name the file here (or set [federation] tls = false on every head).")
