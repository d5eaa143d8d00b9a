"""A PC fetching model weights from the head's model store, end to end over real HTTPS: the
control API (create_app with the store's routes, a real registry with one enrolled PC) on a real
uvicorn on loopback with the head's certificate and connection guard, and the agent's side
(node/weights.py) with its real HTTPS source pinned to the head's CA.

What the server saw (each request's path, Range header, status and the bytes it sent) is
recorded by an ASGI wrapper around the app, so a resumed download is proved by the Range it
asked for and the bytes that crossed the wire, not by trusting the client's account."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import httpx
import pytest
import uvicorn

from garage_node.core import modelfiles
from garage_node.core.wireguard import generate_private_key, public_key_of
from garage_node.head import pki
from garage_node.head.api import create_app
from garage_node.head.api import store as store_api
from garage_node.head.connguard import GuardLimits, guarded_loop_factory, guarded_protocol
from garage_node.head.modelstore import ModelStore
from garage_node.head.registry import Registry
from garage_node.node.identity import Identity
from garage_node.node.weights import HttpSource, Weights, WeightsError, head_source
from testing.fakes import region_facts

KIB = 1024
REQUEST_TIMEOUT_S = 1.0


def tiny_model(root: Path, name: str, weights_kib: int = 256) -> Path:
    """A small model directory: config, tokenizer and one weights file of bytes unique to `name`."""
    d = root / f"src-{name}"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text(f'{{"model_type": "llama", "name": "{name}"}}\n')
    (d / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (d / "sub" / "extra.txt").write_text(name)
    (d / "model.safetensors").write_bytes(os.urandom(weights_kib * KIB))
    return d


@dataclass
class Seen:
    path: str
    range: str | None
    status: int = 0
    sent: int = 0


@dataclass
class Head:
    url: str
    ca_pem: bytes
    registry: Registry
    store: ModelStore
    ident: Identity
    seen: list[Seen] = field(default_factory=list)
    opened: list[HttpSource] = field(default_factory=list)

    def source(self, ident: Identity | None = None) -> HttpSource:
        s = head_source(lambda: ident or self.ident, self.ca_pem)
        self.opened.append(s)  # closed after the test, so the server's shutdown waits for none
        return s

    def file_requests(self, name: str, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == f"/v1/store/{name}/files/{path}"]


class Recorder:
    """ASGI wrapper: what each request asked for and what the server sent back."""

    def __init__(self, app: Any, seen: list[Seen]) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        s = Seen(scope["path"], headers.get(b"range", b"").decode() or None)
        self.seen.append(s)

        async def counting(message) -> None:
            if message["type"] == "http.response.start":
                s.status = message["status"]
            elif message["type"] == "http.response.body":
                s.sent += len(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, counting)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Head]:
    tmp = tmp_path_factory.mktemp("head")
    paths = pki.PkiPaths(tmp / "pki")
    pki.create_ca(paths, "testland")
    pki.issue_server_cert(paths, "127.0.0.1")
    reg = Registry(tmp / "r.sqlite", ipaddress.IPv4Network("100.96.0.0/16"))
    reg.add_token("tok001", "s" * 43, 3600, uses=None)
    enrolled = reg.enroll("tok001", "s" * 43, "pc-1", "testland", public_key_of(generate_private_key()))
    store = ModelStore(tmp / "models")
    app = create_app(reg, region_facts(), paths.ca_cert.read_bytes())
    app.include_router(store_api.router(reg, store))
    seen: list[Seen] = []
    port = free_port()
    # As `head run` (request deadline, per-address cap), with a deadline far shorter than its
    # 10 s default: it bounds how long a request may take to arrive, never a download.
    limits = GuardLimits(request_timeout_s=REQUEST_TIMEOUT_S)
    srv = uvicorn.Server(uvicorn.Config(Recorder(app, seen), host="127.0.0.1", port=port, log_level="warning",
                                        ssl_certfile=str(paths.server_cert), ssl_keyfile=str(paths.server_key),
                                        http=guarded_protocol(limits), loop=guarded_loop_factory(limits),  # type: ignore[arg-type]
                                        lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    url = f"https://127.0.0.1:{port}"
    ident = Identity(node_id=enrolled.node.id, name="pc-1", region="testland", credential=enrolled.credential,
                     wg_private_key="", api_url=url)
    yield Head(url, paths.ca_cert.read_bytes(), reg, store, ident, seen)
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def head(server: Head, tmp_path: Path) -> Iterator[Head]:
    server.store.root = tmp_path / "head-models"  # a store of this test's own
    server.seen.clear()
    yield server
    while server.opened:
        server.opened.pop().close()


class CutAfter:
    """A Source that breaks the first download of a file off after `cut` bytes, as a PC that
    loses its link (or power) halfway; everything else goes through the real source."""

    def __init__(self, real: HttpSource, path_suffix: str, cut: int) -> None:
        self.real, self.suffix, self.cut, self.done = real, path_suffix, cut, False

    @contextmanager
    def get(self, path: str, headers: Mapping[str, str]) -> Iterator[httpx.Response]:
        with self.real.get(path, headers) as resp:
            if path.endswith(self.suffix) and not self.done:
                self.done = True
                real_iter = resp.iter_bytes

                def cut_iter(chunk_size: int | None = None) -> Iterator[bytes]:
                    left = self.cut
                    for chunk in real_iter(chunk_size):
                        if len(chunk) >= left:
                            yield chunk[:left]
                            raise httpx.ReadError("connection lost (test)")
                        left -= len(chunk)
                        yield chunk

                resp.iter_bytes = cut_iter  # type: ignore[method-assign]
            yield resp


def test_a_pc_fetches_a_model_and_holds_it_checked(head, tmp_path):
    src = tiny_model(tmp_path, "tiny-a")
    m = head.store.add("tiny-a", src)
    w = Weights(tmp_path / "pc", max_mib=None, reserve_mib=0)
    seen_pct: list[int] = []
    got = w.fetch("tiny-a", head.store.weights_path("tiny-a"), head.source(), progress=seen_pct.append)
    assert got == w.local_dir("tiny-a") == tmp_path / "pc" / "tiny-a" / "model"
    for f in m.files:  # every byte as the operator added it
        assert (got / f.path).read_bytes() == (src / f.path).read_bytes()
    assert w.held() == ["tiny-a"]
    assert seen_pct[-1] == 100 and seen_pct == sorted(seen_pct)
    assert not (tmp_path / "pc" / ".incoming" / "tiny-a").exists()
    # Held at the head's version: a second fetch asks for the manifest only.
    head.seen.clear()
    assert w.fetch("tiny-a", head.store.weights_path("tiny-a"), head.source()) == got
    assert [s.path for s in head.seen] == ["/v1/store/tiny-a/manifest"]


def test_a_download_may_take_longer_than_the_request_deadline(head, tmp_path):
    # 16 MiB: well over what the loopback's socket buffers hold, so the server is still sending
    # long after the deadline.
    head.store.add("tiny-a", tiny_model(tmp_path, "tiny-a", weights_kib=16 * 1024))
    w = Weights(tmp_path / "pc", reserve_mib=0)
    started = time.monotonic()
    # A slow link: the PC takes its time over every MiB (the server waits on TCP flow control).
    w.fetch("tiny-a", "/v1/store/tiny-a/", head.source(), progress=lambda pct: time.sleep(0.15))
    assert time.monotonic() - started > 2 * REQUEST_TIMEOUT_S
    (req,) = head.file_requests("tiny-a", "model.safetensors")
    assert req.range is None and req.sent == 16 * 1024 * KIB  # one request, not cut off and resumed
    assert w.held() == ["tiny-a"]


def test_an_interrupted_fetch_resumes_where_it_stopped(head, tmp_path):
    head.store.add("tiny-a", tiny_model(tmp_path, "tiny-a", weights_kib=512))
    size = 512 * KIB
    half = size // 2
    w = Weights(tmp_path / "pc", reserve_mib=0, attempts=1)  # one try: the break fails this fetch
    cut = CutAfter(head.source(), "model.safetensors", half)
    with pytest.raises(WeightsError) as e:
        w.fetch("tiny-a", head.store.weights_path("tiny-a"), cut)
    assert e.value.retry and "resumes" in str(e.value)
    assert w.held() == [] and w.local_dir("tiny-a") is None  # nothing half-fetched is used
    part = tmp_path / "pc" / ".incoming" / "tiny-a" / "parts" / "model.safetensors"
    assert part.stat().st_size == half
    # A new agent (the PC rebooted) resumes: the head is asked for the rest only.
    head.seen.clear()
    w2 = Weights(tmp_path / "pc", reserve_mib=0)
    w2.fetch("tiny-a", head.store.weights_path("tiny-a"), head.source())
    (resumed,) = head.file_requests("tiny-a", "model.safetensors")
    assert resumed.range == f"bytes={half}-" and resumed.status == 206
    assert resumed.sent == size - half
    assert w2.held() == ["tiny-a"]


def test_a_break_within_one_fetch_resumes_in_the_same_fetch(head, tmp_path):
    head.store.add("tiny-a", tiny_model(tmp_path, "tiny-a", weights_kib=512))
    w = Weights(tmp_path / "pc", reserve_mib=0)  # three tries
    cut = CutAfter(head.source(), "model.safetensors", 100 * KIB)
    w.fetch("tiny-a", head.store.weights_path("tiny-a"), cut)
    first, second = head.file_requests("tiny-a", "model.safetensors")
    assert first.range is None and second.range == f"bytes={100 * KIB}-"
    assert w.held() == ["tiny-a"]


def test_a_stopped_fetch_keeps_what_arrived_and_resumes(head, tmp_path):
    head.store.add("tiny-a", tiny_model(tmp_path, "tiny-a", weights_kib=4096))
    stop = threading.Event()
    w = Weights(tmp_path / "pc", reserve_mib=0)

    def progress(pct: int) -> None:
        if pct > 0:
            stop.set()  # the head assigned another model while this one downloads

    with pytest.raises(WeightsError, match="was stopped") as e:
        w.fetch("tiny-a", "/v1/store/tiny-a/", head.source(), progress=progress, stop=stop)
    assert e.value.retry and w.held() == []
    part = tmp_path / "pc" / ".incoming" / "tiny-a" / "parts" / "model.safetensors"
    kept = part.stat().st_size
    assert 0 < kept < 4096 * KIB
    head.seen.clear()
    w.fetch("tiny-a", "/v1/store/tiny-a/", head.source())
    (resumed,) = head.file_requests("tiny-a", "model.safetensors")
    assert resumed.range == f"bytes={kept}-"
    assert w.held() == ["tiny-a"]


def test_a_part_corrupted_at_the_pc_is_refused_and_fetched_again(head, tmp_path):
    src = tiny_model(tmp_path, "tiny-a", weights_kib=512)
    head.store.add("tiny-a", src)
    w = Weights(tmp_path / "pc", reserve_mib=0, attempts=1)
    with pytest.raises(WeightsError):
        w.fetch("tiny-a", head.store.weights_path("tiny-a"), CutAfter(head.source(), "model.safetensors", 200 * KIB))
    part = tmp_path / "pc" / ".incoming" / "tiny-a" / "parts" / "model.safetensors"
    data = bytearray(part.read_bytes())
    data[1000] ^= 0xFF  # the disk (or a bad write) changed a byte of what arrived
    part.write_bytes(bytes(data))
    head.seen.clear()
    got = Weights(tmp_path / "pc", reserve_mib=0).fetch("tiny-a", head.store.weights_path("tiny-a"), head.source())
    resumed, whole = head.file_requests("tiny-a", "model.safetensors")
    assert resumed.range == f"bytes={200 * KIB}-"  # resumed, then the sum did not match:
    assert whole.range is None and whole.sent == 512 * KIB  # deleted and fetched whole again
    assert (got / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_a_file_damaged_at_the_head_is_never_used(head, tmp_path):
    head.store.add("tiny-a", tiny_model(tmp_path, "tiny-a"))
    disk = head.store.root / "tiny-a" / "files" / "model.safetensors"
    data = bytearray(disk.read_bytes())
    data[5] ^= 0x01  # same size, one bit off: only the sum can tell
    disk.write_bytes(bytes(data))
    w = Weights(tmp_path / "pc", reserve_mib=0, attempts=2)
    with pytest.raises(WeightsError) as e:
        w.fetch("tiny-a", head.store.weights_path("tiny-a"), head.source())
    assert "does not match the SHA-256" in str(e.value) and "head weights add tiny-a" in str(e.value)
    assert len(head.file_requests("tiny-a", "model.safetensors")) == 2  # fetched again, then refused
    assert w.held() == [] and w.local_dir("tiny-a") is None
    assert not (tmp_path / "pc" / "tiny-a").exists()
    assert not list((tmp_path / "pc").rglob("model.safetensors"))  # not even kept as a part


def test_a_file_of_the_wrong_size_at_the_head_is_not_served(head, tmp_path):
    head.store.add("tiny-a", tiny_model(tmp_path, "tiny-a"))
    with open(head.store.root / "tiny-a" / "files" / "model.safetensors", "ab") as f:
        f.write(b"junk")
    w = Weights(tmp_path / "pc", reserve_mib=0)
    with pytest.raises(WeightsError, match="damaged") as e:
        w.fetch("tiny-a", head.store.weights_path("tiny-a"), head.source())
    assert e.value.retry  # a 500: the operator may mend it
    (req,) = head.file_requests("tiny-a", "model.safetensors")
    assert req.status == 500 and req.sent < 1000  # the error, not the file
    assert w.held() == []


def test_the_least_recently_used_model_makes_room(head, tmp_path):
    for name in ("tiny-a", "tiny-b", "tiny-c", "tiny-d"):
        head.store.add(name, tiny_model(tmp_path, name, weights_kib=400))
    now = [1000.0]
    # 1 MiB: two models of ~400 KiB fit, a third does not.
    w = Weights(tmp_path / "pc", max_mib=1, reserve_mib=0, clock=lambda: now[0])

    def fetch(name: str, keep: tuple[str, ...] = ()) -> None:
        now[0] += 10
        w.fetch(name, head.store.weights_path(name), head.source(), keep=keep)

    fetch("tiny-a")
    fetch("tiny-b")
    now[0] += 10
    w.touch("tiny-a")  # the engine started on A again: B is now the least recently used
    fetch("tiny-c")
    assert w.held() == ["tiny-a", "tiny-c"]
    # A is the older, but in use (keep): C goes.
    fetch("tiny-d", keep=("tiny-a",))
    assert w.held() == ["tiny-a", "tiny-d"]
    # Nothing may go and nothing fits: refused, with what to do.
    with pytest.raises(WeightsError, match="no room for tiny-b.*kept, in use: tiny-a, tiny-d.*raise the cap"):
        fetch("tiny-b", keep=("tiny-a", "tiny-d"))
    assert w.held() == ["tiny-a", "tiny-d"]


def test_a_damaged_copy_is_evicted_before_any_held_model(head, tmp_path):
    for name in ("tiny-a", "tiny-b", "tiny-c"):
        head.store.add(name, tiny_model(tmp_path, name, weights_kib=400))
    w = Weights(tmp_path / "pc", max_mib=1, reserve_mib=0)
    w.fetch("tiny-a", "/v1/store/tiny-a/", head.source())
    w.fetch("tiny-b", "/v1/store/tiny-b/", head.source())
    # A's weights damaged behind the agent's back: not held, yet its bytes count against the cap.
    with open(w.root / "tiny-a" / "model" / "model.safetensors", "ab") as f:
        f.write(b"x")
    assert w.held() == ["tiny-b"]
    w.fetch("tiny-c", "/v1/store/tiny-c/", head.source())
    assert w.held() == ["tiny-b", "tiny-c"] and not (w.root / "tiny-a").exists()


def test_a_readded_model_is_fetched_again_and_replaces_the_old(head, tmp_path):
    head.store.add("tiny-a", tiny_model(tmp_path / "v1", "tiny-a"))
    w = Weights(tmp_path / "pc", reserve_mib=0)
    w.fetch("tiny-a", head.store.weights_path("tiny-a"), head.source())
    v2 = tiny_model(tmp_path / "v2", "tiny-a")
    head.store.add("tiny-a", v2)
    got = w.fetch("tiny-a", head.store.weights_path("tiny-a"), head.source())
    assert (got / "model.safetensors").read_bytes() == (v2 / "model.safetensors").read_bytes()
    assert w.held() == ["tiny-a"]


class ReaddsFirst:
    """A Source before whose first request for `suffix` the operator adds the model again."""

    def __init__(self, real: HttpSource, suffix: str, readd: Any) -> None:
        self.real, self.suffix, self.readd = real, suffix, readd

    def get(self, path: str, headers: Mapping[str, str]) -> Any:
        if path.endswith(self.suffix) and self.readd is not None:
            self.readd()
            self.readd = None
        return self.real.get(path, headers)


def test_a_model_readded_during_a_download_is_fetched_anew_not_refused(head, tmp_path):
    head.store.add("tiny-a", tiny_model(tmp_path / "v1", "tiny-a"))
    v2 = tiny_model(tmp_path / "v2", "tiny-a")
    w = Weights(tmp_path / "pc", reserve_mib=0)
    source = ReaddsFirst(head.source(), "model.safetensors", lambda: head.store.add("tiny-a", v2))
    with pytest.raises(WeightsError, match="changed during the download") as e:
        w.fetch("tiny-a", "/v1/store/tiny-a/", source)
    assert e.value.retry  # not "damaged": the agent tries again rather than refusing the model
    got = w.fetch("tiny-a", "/v1/store/tiny-a/", source)
    assert (got / "model.safetensors").read_bytes() == (v2 / "model.safetensors").read_bytes()


def test_refusals_say_what_to_do_and_never_show_the_credential(head, tmp_path):
    w = Weights(tmp_path / "pc", reserve_mib=0)
    with pytest.raises(WeightsError, match="does not hold tiny-x.*head weights add tiny-x") as e:
        w.fetch("tiny-x", "/v1/store/tiny-x/", head.source())
    assert not e.value.retry
    head.store.add("tiny-a", tiny_model(tmp_path, "tiny-a"))
    wrong = Identity(node_id=head.ident.node_id, name="pc-1", region="testland", credential="x" * 43,
                     wg_private_key="", api_url=head.url)
    with pytest.raises(WeightsError, match="refused this node's request for tiny-a \\(401\\)") as e:
        w.fetch("tiny-a", "/v1/store/tiny-a/", head.source(wrong))
    assert "x" * 43 not in str(e.value) and head.ident.credential not in str(e.value)
    with pytest.raises(WeightsError, match="not a valid model name"):
        w.fetch("../etc", "/v1/store/x/", head.source())


def test_an_unreachable_head_leaves_a_held_model_in_use(head, tmp_path):
    head.store.add("tiny-a", tiny_model(tmp_path, "tiny-a"))
    w = Weights(tmp_path / "pc", reserve_mib=0)
    got = w.fetch("tiny-a", "/v1/store/tiny-a/", head.source())
    gone = Identity(node_id=head.ident.node_id, name="pc-1", region="testland", credential=head.ident.credential,
                    wg_private_key="", api_url=f"https://127.0.0.1:{free_port()}")
    assert w.fetch("tiny-a", "/v1/store/tiny-a/", head.source(gone)) == got
    with pytest.raises(WeightsError, match="unreachable") as e:
        w.fetch("tiny-b", "/v1/store/tiny-b/", head.source(gone))
    assert e.value.retry


def test_held_lists_only_whole_models(head, tmp_path):
    head.store.add("tiny-a", tiny_model(tmp_path, "tiny-a"))
    w = Weights(tmp_path / "pc", reserve_mib=0)
    got = w.fetch("tiny-a", "/v1/store/tiny-a/", head.source())
    (got / "model.safetensors").write_bytes(b"short")  # truncated behind the agent's back
    assert w.held() == [] and w.local_dir("tiny-a") is None


def test_a_hostile_manifest_cannot_name_a_path_outside_the_model():
    f = modelfiles.ModelFile("../../etc/passwd", 1, "0" * 64)
    bad = modelfiles.Manifest("tiny-a", [f], modelfiles.files_digest([f]))
    with pytest.raises(ValueError, match="not a file path inside a model"):
        bad.check()
    for path in ("/etc/passwd", "a//b", "./a", "a/../b", ".hidden", "a\\b", ""):
        with pytest.raises(ValueError):
            modelfiles.check_path(path)
    assert modelfiles.check_path("sub/model-00001-of-00002.safetensors")
