"""Refuse, don't collapse (issue #22): past [gateway] max_in_flight, or while its loop runs
more than max_queue_age_s behind, the gateway answers 503 `overloaded` with Retry-After at once,
and the requests it admitted complete. The gateway on a real uvicorn with the head's guarded
protocol, in front of engine stand-ins that hold their answers (test_gateway_cancel.py's)."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path
from typing import Any

import pytest

from garage_node.head.config import GatewaySection
from garage_node.head.gateway.admission import LAG_EVERY_S, Admission
from garage_node.head.gateway.gateway import Gateway
from tests.unit.test_gateway_cancel import HoldingEngine, regions, wait_for  # noqa: F401 (regions: a fixture)

ROOT = Path(__file__).resolve().parents[2]


def refused_count(gw: Gateway, reason: str) -> float:
    return gw.metrics.registry.get_sample_value("garage_gateway_refused_total", {"reason": reason}) or 0.0


def test_beyond_max_in_flight_refused_at_once_while_admitted_complete(regions: Any) -> None:  # noqa: F811 (the imported fixture)
    engine = HoldingEngine("a", hold_s=2.0)
    region = regions({"a": engine}, max_in_flight=2)
    admitted = [region.in_background({"max_tokens": 4}, 30) for _ in range(2)]
    assert wait_for(lambda: region.inflight() == 2, 10), "the two requests never reached the engine"

    over = region.post({"max_tokens": 4}, 30)
    assert not engine.finished.is_set(), "the refusal waited for the admitted requests"
    assert over.status_code == 503
    assert over.headers["retry-after"] == "1"
    assert over.json()["error"]["code"] == "overloaded"
    assert engine.calls == 2  # the refused one never reached a PC

    for result in admitted:
        r = result()
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "from a"
    assert refused_count(region.gw, "in_flight") == 1
    # Back to normal as soon as the load is gone: the next one is admitted.
    engine.hold_s = 0.0
    assert region.post({"max_tokens": 4}, 30).status_code == 200


def test_models_listing_is_not_counted(regions: Any) -> None:  # noqa: F811
    region = regions({"a": HoldingEngine("a", hold_s=2.0)}, max_in_flight=1)
    held = region.in_background({"max_tokens": 4}, 30)
    assert wait_for(lambda: region.inflight() == 1, 10)
    import httpx

    listing = httpx.get(f"http://127.0.0.1:{region.port}/v1/models",
                        headers={"authorization": f"Bearer {region.secret}"}, timeout=10)
    assert listing.status_code == 200
    assert held().status_code == 200


class _Inner:
    """The app behind the limit: answers 200 (what it is does not matter to the limit)."""

    def __init__(self) -> None:
        self.called = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.called += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def _status(app: Admission) -> int:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    await app({"type": "http", "path": "/v1/completions", "method": "POST"}, receive, send)
    return int(sent[0]["status"])


def _starve(seconds: float) -> None:
    """The loop's CPU spent elsewhere (a busy loop, or the OS not scheduling the process): its
    timers run late."""
    time.sleep(seconds)


def test_a_loop_running_behind_refuses_new_requests_then_recovers() -> None:
    inner = _Inner()
    reasons: list[str] = []
    app = Admission(inner, max_in_flight=100, max_queue_age_s=0.1, refused=reasons.append,
                    paths=("/v1/completions",))

    async def scenario() -> list[int]:
        statuses = [await _status(app)]  # arms the lag timer
        _starve(LAG_EVERY_S + 0.3)
        statuses.append(await _status(app))  # one late timer: a blip, not an overload
        await asyncio.sleep(0.001)  # the late timer fires (and is re-armed)
        _starve(LAG_EVERY_S + 0.3)
        statuses.append(await _status(app))  # late twice in a row: refused
        await asyncio.sleep(LAG_EVERY_S * 3)  # the loop catches up: its timers fire on time again
        statuses.append(await _status(app))
        return statuses

    assert asyncio.run(scenario()) == [200, 200, 503, 200]
    assert reasons == ["queue_age"]
    assert inner.called == 3


def test_settle_heap_freezes_start_up_objects() -> None:
    from garage_node.head.service import settle_heap

    try:
        gc.unfreeze()
        assert gc.get_freeze_count() == 0
        settle_heap()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_engine_pool_is_bounded_by_the_config(tmp_path: Any) -> None:
    async def pool(section: GatewaySection) -> tuple[int, float, bool]:
        gw = Gateway(section, tmp_path, lambda: {})
        try:
            c = gw.proxy.client.connector
            assert c is not None
            return c.limit, c._keepalive_timeout, c.force_close  # type: ignore[attr-defined]
        finally:
            await gw.proxy.close()
            gw.stop()

    section = GatewaySection(max_in_flight=10, max_attempts=3, engine_keepalive_connections=5,
                             engine_keepalive_s=2.5)
    assert asyncio.run(pool(section)) == (30, 2.5, False)
    # 0 kept: every engine connection is closed after its request.
    limit, _, force_close = asyncio.run(pool(GatewaySection(engine_keepalive_connections=0)))
    assert force_close and limit == GatewaySection().max_in_flight * GatewaySection().max_attempts


@pytest.mark.parametrize("line,bad", [("max_in_flight = 1024", "max_in_flight = 0"),
                                      ("max_queue_age_s = 0.25", "max_queue_age_s = -1.0")])
def test_bad_admission_settings_are_refused(tmp_path: Any, line: str, bad: str) -> None:
    from garage_node.core.settings import ConfigError
    from garage_node.head.config import load_head_config

    example = (ROOT / "configs/head.example.toml").read_text()
    assert line in example  # the example names the key with its default
    path = tmp_path / "head.toml"
    path.write_text(example.replace(line, bad))
    with pytest.raises(ConfigError) as e:
        load_head_config(path)
    assert "gateway." + bad.split()[0] in str(e.value)
