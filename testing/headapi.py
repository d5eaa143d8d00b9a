"""A control API in-process (FastAPI's TestClient over a real registry) with one PC enrolled,
for the unit tests of what a heartbeat's answer carries."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from garage_node.core.wire import HeartbeatReply, decode, encode
from garage_node.core.wireguard import generate_private_key, public_key_of
from garage_node.head.api import ApiHooks, create_app
from garage_node.head.registry import Registry
from testing.fakes import region_facts, sample_report


@dataclass
class EnrolledPc:
    registry: Registry
    client: TestClient
    enrollment: dict[str, Any]  # the enrollment's answer, as JSON

    @property
    def node_id(self) -> str:
        return self.enrollment["node_id"]

    def beat(self) -> HeartbeatReply:
        r = self.client.post(f"/v1/nodes/{self.node_id}/heartbeat", json={"report": encode(sample_report())},
                             headers={"Authorization": f"Bearer {self.enrollment['credential']}"})
        assert r.status_code == 200, r.text
        return decode(r.json(), HeartbeatReply)


def enrolled_pc(tmp_path: Path, hooks: ApiHooks | None = None) -> EnrolledPc:
    reg = Registry(tmp_path / "r.sqlite", ipaddress.IPv4Network("100.96.0.0/16"))
    reg.add_token("tok001", "s" * 43, 60, uses=1)
    client = TestClient(create_app(reg, region_facts(), b"PEM", hooks or ApiHooks()))
    body = client.post("/v1/enroll", json={"token_id": "tok001", "secret": "s" * 43, "name": "pc-1",
                                           "wg_public_key": public_key_of(generate_private_key())}).json()
    return EnrolledPc(reg, client, body)
