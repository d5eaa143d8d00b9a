"""Refuse, don't collapse (issue #22): past [gateway] max_in_flight, or over the rate its
governor admits while its loop runs more than max_queue_age_s behind, the gateway answers 503
`overloaded` with Retry-After at once, and the requests it admitted complete. The gateway on a real uvicorn with the head's guarded
protocol, in front of engine stand-ins that hold their answers (test_gateway_cancel.py's)."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest

from garage_node.head.config import GatewaySection
from garage_node.head.gateway.admission import LAG_EVERY_S, Governor
from garage_node.head.gateway.gateway import Gateway
from tests.unit.test_gateway_cancel import MODEL, HoldingEngine, regions, wait_for  # noqa: F401 (regions: a fixture)

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


class Served:
    """A gateway that completes at most `rps` requests a second: what it is handed waits in
    flight until then (the governor learns its capacity from what completes)."""

    def __init__(self, rps: float, in_flight: float) -> None:
        self.rps, self.held, self.at = rps, in_flight, 0.0

    def until(self, t: float) -> None:
        self.held = max(0.0, self.held - (t - self.at) * self.rps)
        self.at = t

    def in_flight(self) -> int:
        return round(self.held)


def feed(g: Governor, rps: float, seconds: float, lag_s: float | list[float], t: float,
         served: Served | None = None) -> tuple[float, int]:
    """`rps` requests a second for `seconds` from `t`, a lag sample every LAG_EVERY_S saying
    `lag_s` (a list: its lags in turn): the time reached and how many were admitted (handed to
    `served`, if given)."""
    lags = lag_s if isinstance(lag_s, list) else [lag_s]
    samples = 0
    admitted = 0
    start, next_sample = t, t + LAG_EVERY_S
    for i in range(round(rps * seconds)):
        t = start + i / rps
        while next_sample <= t:
            if served is not None:
                served.until(next_sample)
            g.sample(lags[samples % len(lags)], next_sample)
            samples += 1
            next_sample += LAG_EVERY_S
        if served is not None:
            served.until(t)
        ok = g.decide(t)
        admitted += ok
        if ok and served is not None:
            served.held += 1
    return start + seconds, admitted


def test_the_governor_limits_the_rate_while_the_loop_is_late_and_lifts_it_after() -> None:
    g = Governor(max_queue_age_s=0.05, in_flight=lambda: 50, floor_rps=50)  # in flight steady: nothing to learn
    t, n = feed(g, 1000, 1.0, 0.005, 0.0)  # on time: all in
    assert n == 1000 and not g.limiting
    t, n = feed(g, 1000, 0.06, 0.2, t)  # one late sample: a blip
    assert not g.limiting
    t, n = feed(g, 1000, 0.1, 0.2, t)  # twice in a row: limited below what got through
    assert g.limiting and g.rate <= 0.8 * 1000 + 1
    t, n = feed(g, 1000, 1.0, 0.2, t)  # still late: cut further, each sample
    assert n < 500 and g.rate < 200
    assert g.rate >= 50  # never under the floor
    t, n = feed(g, 1000, 0.2, 0.04, t)  # between half the bound and the bound: held
    held = g.rate
    assert g.limiting and n <= held * 0.2 + held * 0.1 + 1
    t, n = feed(g, 400, 3.0, 0.005, t)  # on time again: raised until it no longer binds
    assert not g.limiting and g.rate == float("inf")
    t, n = feed(g, 400, 1.0, 0.005, t)
    assert n == 400


def test_the_rate_climbs_back_quickly_to_near_what_completes_and_gently_past_it() -> None:
    """At twice its ceiling the governor used to climb 1.1x a sample to twice what the gateway
    could complete before the lag showed, then cut for half a second, and again."""
    served = Served(1000, in_flight=50)
    g = Governor(max_queue_age_s=0.05, in_flight=served.in_flight, floor_rps=50)
    t, _ = feed(g, 2000, 1.0, 0.2, 0.0, served)  # late, cut far below the 1,000 a second it completes
    assert g.limiting and g.capacity_rps == pytest.approx(1000, rel=0.15)
    assert g.rate < 200
    t, n = feed(g, 2000, 2.0, 0.005, t, served)  # on time, still twice what it completes
    assert 900 <= g.rate <= 1200, g.rate  # 1.1x a sample all the way: 1,331 (held only by the queue)
    assert n < 2000


def test_a_queue_building_on_time_holds_the_rate_at_what_completes() -> None:
    """The lag shows a queue only once it is hundreds of requests long; in flight shows it at once."""
    served = Served(1000, in_flight=50)
    g = Governor(max_queue_age_s=0.05, in_flight=served.in_flight, floor_rps=50)
    t, _ = feed(g, 3000, 0.2, 0.2, 0.0, served)  # limiting
    assert g.limiting
    g.rate = 2500.0  # say it had climbed far past what completes
    before = served.in_flight()
    t, _ = feed(g, 3000, 0.5, 0.005, t, served)  # on time, but in flight grows each window
    assert g.rate <= 1400, g.rate
    assert served.in_flight() < before + 250  # the queue hardly grew (held at 2,500/s: +750)


def test_half_late_with_a_queue_building_is_behind_and_without_one_is_not() -> None:
    """At an overload's onset the lag hovers near the bound while requests pile up in flight."""
    served = Served(1000, in_flight=20)
    g = Governor(max_queue_age_s=0.05, in_flight=served.in_flight, floor_rps=50)
    feed(g, 900, 1.0, 0.03, 0.0, served)  # half late, nothing piling up: a busy machine
    assert not g.limiting
    served = Served(1000, in_flight=20)
    g = Governor(max_queue_age_s=0.05, in_flight=served.in_flight, floor_rps=50)
    feed(g, 2000, 0.5, 0.03, 0.0, served)  # half late, +50 in flight a window
    assert g.limiting


def test_a_queue_building_twice_on_a_loop_a_little_late_starts_a_limit_early() -> None:
    """At an onset the lag swings 0-40 ms from one sample to the next while requests pile up in
    flight: the limit starts on the queue, with a hundred in flight rather than several hundred."""
    swinging = [0.001, 0.02]  # never late twice in a row, not even a tenth of the bound
    served = Served(1000, in_flight=20)
    g = Governor(max_queue_age_s=0.05, in_flight=served.in_flight, floor_rps=50)
    at_limit: list[int] = []
    limit = g._limit
    g._limit = lambda now: (at_limit.append(served.in_flight()), limit(now))  # type: ignore[method-assign]
    feed(g, 2000, 1.0, swinging, 0.0, served)  # +50 in flight a window
    assert g.limiting and at_limit[0] <= 150, at_limit
    served = Served(1000, in_flight=20)
    g = Governor(max_queue_age_s=0.05, in_flight=served.in_flight, floor_rps=50)
    feed(g, 900, 1.0, swinging, 0.0, served)  # as late, nothing piling up: a busy machine
    assert not g.limiting


def test_a_limit_starts_from_what_completed_not_from_what_got_through() -> None:
    """Detected early, the onset's window admitted 1,000-1,500 a second with a queue of a hundred
    waiting: 0.8x that only added to the queue. What completed is also the first estimate of
    what the gateway carries (a drain can be too short to learn from)."""
    served = Served(1000, in_flight=20)
    g = Governor(max_queue_age_s=0.05, in_flight=served.in_flight, floor_rps=50)
    at_limit: list[tuple[float, float]] = []
    limit = g._limit
    g._limit = lambda now: (limit(now), at_limit.append((g.rate, g.capacity_rps)))  # type: ignore[method-assign]
    feed(g, 3000, 0.5, 0.03, 0.0, served)
    rate, capacity = at_limit[0]
    assert rate <= 0.8 * 1000 * 1.1, rate  # from what got through: 2,400
    assert capacity == pytest.approx(1000, rel=0.3)


def test_requests_piling_up_on_a_loop_on_time_are_not_the_gateways_doing() -> None:
    """Slow engines (or streams opening) fill the gateway's in flight while its loop has time:
    refusing would free nothing the engines need."""
    served = Served(100, in_flight=20)
    g = Governor(max_queue_age_s=0.05, in_flight=served.in_flight, floor_rps=50)
    t, n = feed(g, 600, 2.0, 0.002, 0.0, served)  # +25 in flight a window
    assert n == 1200 and not g.limiting and served.in_flight() > 900


def test_once_the_onsets_queue_is_worked_off_the_rate_is_back_near_capacity_at_once() -> None:
    """It used to climb 1.1x a sample from the floor: 1.5 s at a third of what it could carry."""
    served = Served(1000, in_flight=20)
    g = Governor(max_queue_age_s=0.05, in_flight=served.in_flight, floor_rps=50)
    t, _ = feed(g, 2000, 0.3, 0.03, 0.0, served)  # the onset: limited, a queue to work off
    assert g.limiting
    g.rate = g.floor_rps  # as a window that completed nothing leaves it
    t, _ = feed(g, 2000, 0.25, 0.002, t, served)  # on time while it drains
    t, n = feed(g, 2000, 0.3, 0.002, t, served)
    assert n >= 0.8 * 1000 * 0.3, n  # near the 1,000 a second it completes
    assert served.in_flight() < 50


def test_a_backlog_that_stands_still_is_worked_off_before_the_rate_climbs() -> None:
    """Admitted as fast as it completes, the onset's queue neither grows nor shows in the lag:
    climbing on, it stood for good (160 in flight at 1,000 a second: 160 ms each)."""
    served = Served(1000, in_flight=20)
    g = Governor(max_queue_age_s=0.05, in_flight=served.in_flight, floor_rps=50)
    t, _ = feed(g, 3000, 0.3, 0.03, 0.0, served)
    assert g.limiting and served.in_flight() > 150
    t, _ = feed(g, 3000, 1.5, 0.002, t, served)
    assert served.in_flight() < 50, served.in_flight()


def test_streams_opened_during_an_overload_do_not_hold_the_limit_after_it() -> None:
    """Streams admitted while limiting stay in flight for as long as they last: no backlog of
    the gateway's, and the limit is lifted once the load is gone."""
    served = Served(1000, in_flight=20)
    streams = [0]
    g = Governor(max_queue_age_s=0.05, in_flight=lambda: served.in_flight() + streams[0], floor_rps=50)
    t, _ = feed(g, 3000, 0.3, 0.03, 0.0, served)
    assert g.limiting
    streams[0] = 200  # long streams, open from now on
    t, n = feed(g, 100, 3.0, 0.002, t, served)
    assert not g.limiting and n >= 290, n


def test_a_trickle_is_never_limited_however_late_the_loop() -> None:
    g = Governor(max_queue_age_s=0.05, in_flight=lambda: 50, floor_rps=50)
    t, n = feed(g, 20, 5.0, 1.0, 0.0)  # a busy shared machine: every sample a second late
    assert n == 100 and not g.limiting


def test_a_late_loop_with_few_requests_in_flight_is_not_the_gateways_doing() -> None:
    """CI's region test: 4 clients in a closed loop, many short requests a second, on a machine
    whose engines keep the loop late. The gateway is not what is behind: nothing is refused."""
    in_flight = [4]
    g = Governor(max_queue_age_s=0.05, in_flight=lambda: in_flight[0], floor_rps=50)
    t, n = feed(g, 200, 3.0, 0.3, 0.0)
    assert n == 600 and not g.limiting
    in_flight[0] = 50  # its own load: limited at once
    t, n = feed(g, 1000, 0.2, 0.3, t)
    assert g.limiting


def test_over_the_limit_the_protocol_answers_503_and_keeps_the_connection(regions: Any) -> None:  # noqa: F811
    """The head's listener: a refusal is written by the HTTP protocol (no app, no engine), the
    request's body is read and dropped, and the same connection serves the next request."""
    import httpx

    engine = HoldingEngine("a", hold_s=0.0)
    region = regions({"a": engine})
    governor = region.app.admission.governor
    with httpx.Client(base_url=f"http://127.0.0.1:{region.port}", timeout=10,
                      headers={"authorization": f"Bearer {region.secret}"}) as client:
        assert client.post("/v1/completions", json={"model": MODEL, "max_tokens": 4}).status_code == 200
        # Over capacity, as two late lag samples leave it, with an empty bucket and no rate.
        governor.limiting, governor.rate, governor.floor_rps = True, 0.0, 0.0
        governor.capacity_rps = 321.0
        sample = region.gw.metrics.registry.get_sample_value
        assert sample("garage_gateway_admission_limiting") == 1.0
        assert sample("garage_gateway_admission_capacity") == 321.0
        over = [client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 5000, "max_tokens": 4})
                for _ in range(3)]
        assert [r.status_code for r in over] == [503, 503, 503]
        assert over[0].headers["retry-after"] == "1" and over[0].json()["error"]["code"] == "overloaded"
        assert client.get("/v1/models").status_code == 200  # not a guarded endpoint
        governor.limiting, governor.rate = False, float("inf")
        assert sample("garage_gateway_admission_limiting") == 0.0 and sample("garage_gateway_admission_rate") == 0.0
        again = client.post("/v1/completions", json={"model": MODEL, "max_tokens": 4})
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == "from a"
        assert client.post("/v1/completions", json={"model": MODEL, "max_tokens": 4}).status_code == 200
    assert engine.calls == 3  # the refused ones never reached a PC
    assert refused_count(region.gw, "queue_age") == 3
    assert region.app.admission.in_flight == 0


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
                                      ("max_queue_age_s = 0.05", "max_queue_age_s = -1.0")])
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
