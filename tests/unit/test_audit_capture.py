"""The gateway's side of the audits: a PC cannot tell an audited request from another (the
bytes its engine receives are the same), and what an audited request's answer was is kept
whole, for streams and whole answers, chat and text completions."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import httpx
import pytest

from garage_node.core.wire import EngineReport, EngineState
from garage_node.head.config import AuditSection, GatewaySection
from garage_node.head.gateway.app import create_gateway_app
from garage_node.head.gateway.gateway import Gateway
from testing.fakes import sample_report
from tests.unit.test_audit_engine import MODEL, ToyEngine, engines  # noqa: F401 (a fixture)


def report(url: str):
    return replace(sample_report(), engine=EngineReport(state=EngineState.HEALTHY, model=MODEL, endpoint=url))


def gateway(tmp_path: Any, name: str, rate: float, pcs: dict[str, ToyEngine]) -> tuple[Gateway, str]:
    audit = AuditSection(rate=rate, new_rate=rate, suspect_rate=rate, canary_rate=0.0)
    gw = Gateway(GatewaySection(), tmp_path / name, lambda: {n: n for n in pcs}, audit=audit)
    for n, e in pcs.items():
        gw.on_report(n, report(e.url))
    _, secret = gw.keys.create("tester", now=time.time())
    return gw, secret


def post(gw: Gateway, secret: str, path: str, body: dict[str, Any]) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_gateway_app(gw))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            r = await client.post(path, json=body, headers={"authorization": f"Bearer {secret}"}, timeout=20)
            await r.aread()
            await gw.proxy.close()
            return r
    import asyncio
    return asyncio.run(go())


def client_text(r: httpx.Response, stream: bool, chat: bool) -> tuple[str, str | None]:
    if not stream:
        c = r.json()["choices"][0]
        return (c["message"]["content"] if chat else c["text"]), c["finish_reason"]
    text, finish = "", None
    for line in r.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for c in json.loads(line[6:]).get("choices", []):
            text += (c.get("delta") or {}).get("content") or "" if chat else c.get("text") or ""
            finish = c.get("finish_reason") or finish
    return text, finish


CASES = [("/v1/completions", False), ("/v1/completions", True), ("/v1/chat/completions", False),
         ("/v1/chat/completions", True)]


@pytest.mark.parametrize("path,stream", CASES)
def test_the_pc_receives_the_same_bytes_audited_or_not(tmp_path, engines, path, stream) -> None:  # noqa: F811
    pc = engines(seed=1)
    audited, secret_a = gateway(tmp_path, "a", 1.0, {"n1": pc})
    plain, secret_p = gateway(tmp_path, "p", 0.0, {"n1": pc})
    chat = "chat" in path
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 30, "temperature": 0, "stream": stream}
    body.update({"messages": [{"role": "user", "content": "hello there"}]} if chat else {"prompt": "hello there"})
    ra = post(audited, secret_a, path, body)
    rp = post(plain, secret_p, path, body)
    assert ra.status_code == rp.status_code == 200
    assert len(pc.bodies) == 2 and pc.bodies[0] == pc.bodies[1]  # byte for byte
    assert ra.content == rp.content  # and the client gets the same answer
    # What the audited gateway kept is the answer the client got, whole.
    assert audited.auditor is not None and plain.auditor is not None
    assert len(plain.auditor.pending) == 0 and len(audited.auditor.pending) == 1
    s = audited.auditor.pending[0]
    text, finish = client_text(ra, stream, chat)
    assert text and (s.text, s.finish_reason) == (text, finish)
    assert s.node_id == "n1" and s.model == MODEL and s.path == path and s.kind == "customer"
    assert s.completion_tokens == len(text) and s.request["max_tokens"] == 30
    assert s.engine == sample_report().versions.agent


def test_ineligible_and_failed_requests_are_not_kept(tmp_path, engines) -> None:  # noqa: F811
    pc = engines(seed=1)
    gw, secret = gateway(tmp_path, "a", 1.0, {"n1": pc})
    assert post(gw, secret, "/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2}).status_code == 200
    assert post(gw, secret, "/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 1.0}).status_code == 200
    assert gw.auditor is not None and len(gw.auditor.pending) == 0
    assert gw.auditor.sampler.seen == {"n1": 2}  # counted all the same


def test_the_queue_is_bounded_oldest_dropped(tmp_path, engines) -> None:  # noqa: F811
    pc = engines(seed=1)
    gw, secret = gateway(tmp_path, "a", 1.0, {"n1": pc})
    assert gw.auditor is not None
    gw.auditor.cfg = replace(gw.auditor.cfg, max_pending=2)
    for word in ("one", "two", "three"):
        post(gw, secret, "/v1/completions", {"model": MODEL, "prompt": word, "temperature": 0, "max_tokens": 5})
    assert [s.request["prompt"] for s in gw.auditor.pending] == ["two", "three"]
    assert gw.auditor.counters.dropped == 1


def test_audits_off(tmp_path, engines) -> None:  # noqa: F811
    gw = Gateway(GatewaySection(), tmp_path, lambda: {}, audit=AuditSection(enabled=False))
    assert gw.auditor is None and gw.proxy.audit is None
    assert Gateway(GatewaySection(), tmp_path / "b", lambda: {}).auditor is None
