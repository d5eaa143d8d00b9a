"""The head's model store: adding a local model directory (manifest with SHA-256 per file,
written atomically, replacing), its routes on the control API (enrolled nodes only, manifest
files only, range requests), and `garage-node head weights add/list/remove`.

The routes run in-process (FastAPI's TestClient over a real registry with one PC enrolled,
testing/headapi.py); tests/unit/test_weights.py fetches over a real HTTPS server."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from garage_node.cli import main
from garage_node.core import modelfiles
from garage_node.head.api import store as store_api
from garage_node.head.modelstore import ModelStore, StoreError, store_root
from testing.headapi import EnrolledPc, enrolled_pc


def tiny_model(root: Path, name: str, weights: bytes | None = None) -> Path:
    d = root / f"src-{name}"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text(f'{{"model_type": "llama", "name": "{name}"}}\n')
    (d / "sub" / "extra.txt").write_text(name)
    (d / "model.safetensors").write_bytes(weights if weights is not None else os.urandom(64 * 1024))
    (d / ".cache").mkdir()  # what a download tool leaves: not part of the model
    (d / ".cache" / "x.lock").write_text("")
    (d / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    return d


def test_add_writes_a_manifest_with_every_files_sum(tmp_path):
    src = tiny_model(tmp_path, "tiny-a")
    store = ModelStore(tmp_path / "models")
    m = store.add("tiny-a", src)
    assert [f.path for f in m.files] == ["config.json", "model.safetensors", "sub/extra.txt"]
    for f in m.files:
        data = (src / f.path).read_bytes()
        assert f.size == len(data) and f.sha256 == hashlib.sha256(data).hexdigest()
    assert store.names() == ["tiny-a"]
    assert store.manifest("tiny-a") == m  # as written to disk, read back and checked
    assert m.digest == modelfiles.files_digest(m.files)
    assert store.weights_path("tiny-a") == "/v1/store/tiny-a/"
    # Nothing left beside the model: the temporary copy became the model by a rename.
    assert sorted(p.name for p in store.root.iterdir()) == ["tiny-a"]


def test_readding_replaces_and_changes_the_digest(tmp_path):
    store = ModelStore(tmp_path / "models")
    first = store.add("tiny-a", tiny_model(tmp_path / "1", "tiny-a", b"one"))
    second = store.add("tiny-a", tiny_model(tmp_path / "2", "tiny-a", b"two"))
    assert first.digest != second.digest
    assert store.manifest("tiny-a") == second
    assert (store.root / "tiny-a" / "files" / "model.safetensors").read_bytes() == b"two"
    assert sorted(p.name for p in store.root.iterdir()) == ["tiny-a"]


def test_a_failed_add_leaves_the_store_as_it_was(tmp_path):
    store = ModelStore(tmp_path / "models")
    store.add("tiny-a", tiny_model(tmp_path / "1", "tiny-a", b"one"))
    src = tiny_model(tmp_path / "2", "tiny-a", b"two")
    (src / "zz-broken").symlink_to(tmp_path / "nowhere")
    with pytest.raises(StoreError, match="not a regular file"):
        store.add("tiny-a", src)
    assert (store.root / "tiny-a" / "files" / "model.safetensors").read_bytes() == b"one"
    assert sorted(p.name for p in store.root.iterdir()) == ["tiny-a"]


def test_add_refuses_what_is_not_a_model_directory(tmp_path):
    store = ModelStore(tmp_path / "models")
    with pytest.raises(StoreError, match="does not exist"):
        store.add("tiny-a", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="is empty"):
        store.add("tiny-a", tmp_path / "empty")
    (tmp_path / "above" / "inner").mkdir(parents=True)
    (tmp_path / "above" / "inner" / "config.json").write_text("{}")
    with pytest.raises(StoreError, match="has no config.json.*the model's own directory"):
        store.add("tiny-a", tmp_path / "above")
    for bad in ("../x", "a/b", ".hidden", "", "x" * 81, "tiny a"):
        with pytest.raises(StoreError, match="not a valid model name"):
            store.add(bad, tiny_model(tmp_path / f"n{len(bad)}{bad.count('/')}", "ok"))
    assert store.names() == []


def test_remove(tmp_path):
    store = ModelStore(tmp_path / "models")
    store.add("tiny-a", tiny_model(tmp_path, "tiny-a"))
    assert store.remove("tiny-a") and store.names() == [] and store.manifest("tiny-a") is None
    assert not store.remove("tiny-a") and not store.remove("../etc")
    assert list(store.root.iterdir()) == []


def test_only_a_models_own_files_can_be_named(tmp_path):
    store = ModelStore(tmp_path / "models")
    store.add("tiny-a", tiny_model(tmp_path, "tiny-a"))
    assert store.file_path("tiny-a", "sub/extra.txt") is not None
    for path in ("../manifest.json", "sub/../config.json", "/etc/passwd", "sub", "missing.bin"):
        assert store.file_path("tiny-a", path) is None
    assert store.file_path("..", "tiny-a/manifest.json") is None


# -- the routes


@pytest.fixture
def pc(tmp_path) -> tuple[EnrolledPc, ModelStore]:
    pc = enrolled_pc(tmp_path)
    store = ModelStore(tmp_path / "models")
    pc.client.app.include_router(store_api.router(pc.registry, store))  # type: ignore[attr-defined]
    return pc, store


def auth(pc: EnrolledPc) -> dict[str, str]:
    return {"Authorization": f"Bearer {pc.enrollment['credential']}", modelfiles.NODE_HEADER: pc.node_id}


def test_an_enrolled_pc_gets_the_manifest_and_files_with_ranges(pc, tmp_path):
    pc_, store = pc
    weights = os.urandom(10_000)
    m = store.add("tiny-a", tiny_model(tmp_path, "tiny-a", weights))
    r = pc_.client.get("/v1/store/tiny-a/manifest", headers=auth(pc_))
    assert r.status_code == 200
    assert modelfiles.Manifest.parse(r.json()) == m
    r = pc_.client.get("/v1/store/tiny-a/files/model.safetensors", headers=auth(pc_))
    assert r.status_code == 200 and r.content == weights and r.headers["accept-ranges"] == "bytes"
    r = pc_.client.get("/v1/store/tiny-a/files/model.safetensors", headers={**auth(pc_), "Range": "bytes=4000-"})
    assert r.status_code == 206 and r.content == weights[4000:]
    assert r.headers["content-range"] == "bytes 4000-9999/10000"
    r = pc_.client.get("/v1/store/tiny-a/files/sub/extra.txt", headers=auth(pc_))
    assert r.status_code == 200 and r.content == b"tiny-a"


def test_only_enrolled_pcs_are_answered(pc, tmp_path):
    pc_, store = pc
    store.add("tiny-a", tiny_model(tmp_path, "tiny-a"))
    good = auth(pc_)
    for headers in ({}, {"Authorization": good["Authorization"]}, {modelfiles.NODE_HEADER: pc_.node_id},
                    {**good, "Authorization": "Bearer " + "x" * 43}, {**good, modelfiles.NODE_HEADER: "n0000000000"},
                    {**good, modelfiles.NODE_HEADER: "not-an-id"}):
        for path in ("/v1/store/tiny-a/manifest", "/v1/store/tiny-a/files/model.safetensors"):
            r = pc_.client.get(path, headers=headers)
            assert r.status_code == 401, (headers.keys(), path)
            assert r.json()["error"] == "unauthorized" and "enrolled nodes only" in r.json()["message"]
    # Unknown models answer the same 401 to a stranger: the store's contents are not probed.
    assert pc_.client.get("/v1/store/nothing/manifest").status_code == 401
    pc_.registry.revoke(pc_.node_id)
    r = pc_.client.get("/v1/store/tiny-a/manifest", headers=good)
    assert r.status_code == 403 and r.json()["error"] == "revoked"


def test_paths_outside_a_models_manifest_are_not_served(pc, tmp_path):
    pc_, store = pc
    store.add("tiny-a", tiny_model(tmp_path, "tiny-a"))
    (tmp_path / "secret.txt").write_text("TOP-SECRET-BYTES")
    for path in ("/v1/store/tiny-a/files/%2e%2e/manifest.json", "/v1/store/tiny-a/files/..%2fmanifest.json",
                 "/v1/store/tiny-a/files/%2e%2e/%2e%2e/%2e%2e/secret.txt", "/v1/store/tiny-a/files/sub",
                 "/v1/store/tiny-a/files/.cache/x.lock", "/v1/store/%2e%2e/files/tiny-a/manifest.json",
                 "/v1/store/tiny-a/files//etc/passwd", "/v1/store/tiny-a/files/"):
        r = pc_.client.get(path, headers=auth(pc_))
        assert r.status_code == 404, path
        assert b"TOP-SECRET" not in r.content and b"sha256" not in r.content


def test_the_routes_are_in_the_openapi_description(pc):
    pc_, _ = pc
    paths = pc_.client.get("/openapi.json").json()["paths"]
    assert {"/v1/store/{name}/manifest", "/v1/store/{name}/files/{path}"} <= set(paths)
    params = paths["/v1/store/{name}/manifest"]["get"]["parameters"]
    assert modelfiles.NODE_HEADER in {p["name"] for p in params}


def test_an_unknown_model_is_a_404_that_says_what_to_do(pc):
    pc_, _ = pc
    for path in ("/v1/store/qwen2.5-7b/manifest", "/v1/store/qwen2.5-7b/files/config.json"):
        r = pc_.client.get(path, headers=auth(pc_))
        assert r.status_code == 404
        assert "does not hold model 'qwen2.5-7b'" in r.json()["message"]
        assert "garage-node head weights add qwen2.5-7b DIR" in r.json()["message"]


# -- the commands


@pytest.fixture
def head_config(tmp_path) -> Path:
    p = tmp_path / "head.toml"
    p.write_text(f'[head]\nstate_dir = "{tmp_path / "state"}"\n[api]\nadvertise_host = "203.0.113.7"\n')
    return p


def test_head_weights_add_list_remove(head_config, tmp_path, capsys):
    src = tiny_model(tmp_path, "tiny-a")
    assert main(["head", "weights", "add", "tiny-a", str(src), "--config", str(head_config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("added tiny-a: 3 files,") and "/v1/store/tiny-a/" in out
    # Where the running head serves it from: the state directory.
    assert ModelStore(store_root(tmp_path / "state")).names() == ["tiny-a"]
    assert main(["head", "weights", "list", "--json", "--config", str(head_config)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "tiny-a" and row["files"] == 3 and row["weights_path"] == "/v1/store/tiny-a/"
    assert main(["head", "weights", "list", "--config", str(head_config)]) == 0
    assert "tiny-a" in capsys.readouterr().out
    assert main(["head", "weights", "remove", "tiny-a", "--config", str(head_config)]) == 0
    assert main(["head", "weights", "list", "--config", str(head_config)]) == 0
    assert "holds no model" in capsys.readouterr().out


def test_head_weights_verify_finds_a_damaged_file(head_config, tmp_path, capsys):
    assert main(["head", "weights", "add", "tiny-a", str(tiny_model(tmp_path, "tiny-a")), "--config",
                 str(head_config)]) == 0
    assert main(["head", "weights", "verify", "tiny-a", "--config", str(head_config)]) == 0
    assert "every file matches" in capsys.readouterr().out
    disk = store_root(tmp_path / "state") / "tiny-a" / "files" / "model.safetensors"
    data = bytearray(disk.read_bytes())
    data[0] ^= 1
    disk.write_bytes(bytes(data))
    assert main(["head", "weights", "verify", "tiny-a", "--config", str(head_config)]) == 1
    err = capsys.readouterr().err
    assert "tiny-a is damaged: model.safetensors" in err and "head weights add tiny-a DIR" in err


@pytest.mark.parametrize("argv, says", [
    (["add", "tiny-a", "/nonexistent/model"], "does not exist"),
    (["add", "tiny-a"], "give the model's directory"),
    (["add"], "name the model"),
    (["add", "bad/name", "."], "not a valid model name"),
    (["remove", "tiny-z"], "does not hold 'tiny-z'"),
    (["verify", "tiny-z"], "does not hold 'tiny-z'"),
])
def test_head_weights_errors_say_what_to_do(head_config, capsys, argv, says):
    assert main(["head", "weights", *argv, "--config", str(head_config)]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("name", ["qwen\n", "tiny-a\n"])
def test_a_model_name_ending_in_a_newline_is_refused(name: str) -> None:
    # "$" in a pattern used with re.match lets one final newline through; the name becomes a
    # directory on the head and every PC, and a segment of the weights path.
    with pytest.raises(ValueError):
        modelfiles.check_name(name)


def test_a_file_path_ending_in_a_newline_is_refused() -> None:
    with pytest.raises(ValueError):
        modelfiles.check_path("config.json\n")
