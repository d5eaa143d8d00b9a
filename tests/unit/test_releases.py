"""The head's releases of the stick's OS (head/releases.py, head/gpg.py): the operator's public
key trusted, a signed release directory checked with the real gpg and stored once; a bad
signature, an untrusted key, a changed file, an unsigned file or other Ray/Python versions
refused with nothing stored; the files served to enrolled PCs with range requests; and
`garage-node head release trust-key/add/list/keys`.

The keys are throwaway ed25519 keys made by gpg in a temporary GNUPGHOME (testing/releases.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from garage_node.cli import main
from garage_node.core import modelfiles
from garage_node.core import releasefiles as rf
from garage_node.core.raycmd import local_versions
from garage_node.head.api import releases as releases_api
from garage_node.head.releases import ReleaseError, ReleaseStore
from testing.headapi import EnrolledPc, enrolled_pc
from testing.releases import make_release, write_sums


@pytest.fixture
def store(tmp_path, keys) -> ReleaseStore:
    s = ReleaseStore(tmp_path / "state" / "releases")
    s.trust_key(keys[0].public)
    return s


def nothing_stored(store: ReleaseStore) -> bool:
    return not store.versions_dir.exists() or list(store.versions_dir.iterdir()) == []


def test_a_signed_release_is_stored_once(store, keys, tmp_path):
    src = make_release(tmp_path / "r1", "2026.12.1", keys[0])
    r, new = store.add(src)
    assert new and r.version == "2026.12.1" and r.files == 3 and r.signer == keys[0].fingerprint
    assert (r.ray, r.python) == (local_versions().ray, local_versions().python)
    assert store.versions() == ["2026.12.1"] and r.path == "/v1/releases/2026.12.1/"
    for name in ("garage-node_2026.12.1.root.raw", "garage-node_2026.12.1.efi", rf.MANIFEST, rf.SUMS, rf.SIGNATURE):
        assert (store.versions_dir / "2026.12.1" / name).read_bytes() == (src / name).read_bytes()
    # Again with the same signed files: nothing to do.
    assert store.add(src) == (r, False)
    # The same version with other files: refused, the stored one untouched.
    other = make_release(tmp_path / "r1b", "2026.12.1", keys[0])
    with pytest.raises(ReleaseError, match="already stored, with other files.*new version"):
        store.add(other)
    assert (store.versions_dir / "2026.12.1" / rf.SUMS).read_bytes() == (src / rf.SUMS).read_bytes()
    assert sorted(p.name for p in store.versions_dir.iterdir()) == ["2026.12.1"]


def test_a_bad_signature_is_refused_and_nothing_stored(store, keys, tmp_path):
    src = make_release(tmp_path / "r", "2026.12.2", keys[0])
    # SHA256SUMS changed after signing (say, to match a tampered root).
    (src / "garage-node_2026.12.2.root.raw").write_bytes(b"tampered root")
    write_sums(src)
    with pytest.raises(ReleaseError, match="does not match SHA256SUMS.*changed after it was signed"):
        store.add(src)
    assert nothing_stored(store)


def test_a_file_changed_after_signing_is_refused_and_nothing_stored(store, keys, tmp_path):
    src = make_release(tmp_path / "r", "2026.12.3", keys[0])
    root = src / "garage-node_2026.12.3.root.raw"
    data = bytearray(root.read_bytes())
    data[1000] ^= 0xFF  # one flipped bit, same size
    root.write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match="root.raw: its SHA-256 is .* but SHA256SUMS says"):
        store.add(src)
    assert nothing_stored(store)
    # The manifest is signed too.
    src2 = make_release(tmp_path / "r2", "2026.12.4", keys[0])
    (src2 / rf.MANIFEST).write_text((src2 / rf.MANIFEST).read_text().replace('"base"', '"nvidia"'))
    with pytest.raises(ReleaseError, match="release.json: its SHA-256 differs"):
        store.add(src2)
    assert nothing_stored(store)


def test_an_untrusted_key_or_no_key_is_refused(store, keys, tmp_path):
    src = make_release(tmp_path / "r", "2026.12.5", keys[1])  # the stranger's signature
    with pytest.raises(ReleaseError, match="which the head does not trust.*trust-key"):
        store.add(src)
    assert nothing_stored(store)
    bare = ReleaseStore(tmp_path / "bare")
    with pytest.raises(ReleaseError, match="trusts no release signing key yet.*trust-key FILE"):
        bare.add(make_release(tmp_path / "r2", "2026.12.5", keys[0]))
    # Not a signature at all.
    src3 = make_release(tmp_path / "r3", "2026.12.6", keys[0])
    (src3 / rf.SIGNATURE).write_bytes(b"not a signature")
    with pytest.raises(ReleaseError, match="not a valid detached signature"):
        store.add(src3)
    assert nothing_stored(store)


def test_unsigned_or_missing_files_are_refused(store, keys, tmp_path):
    src = make_release(tmp_path / "r", "2026.12.7", keys[0])
    (src / "garage-node_2026.12.7.extra").write_bytes(b"slipped in")
    with pytest.raises(ReleaseError, match="which SHA256SUMS does not list: every file of a release must be signed"):
        store.add(src)
    src2 = make_release(tmp_path / "r2", "2026.12.8", keys[0])
    (src2 / "garage-node_2026.12.8.efi").unlink()
    with pytest.raises(ReleaseError, match="lists garage-node_2026.12.8.efi, which .* does not hold"):
        store.add(src2)
    with pytest.raises(ReleaseError, match="has no SHA256SUMS"):
        (tmp_path / "empty").mkdir()
        store.add(tmp_path / "empty")
    with pytest.raises(ReleaseError, match="is not a directory"):
        store.add(tmp_path / "missing")
    assert nothing_stored(store)


def test_other_ray_or_python_versions_are_refused_saying_why(store, keys, tmp_path):
    head = local_versions()
    src = make_release(tmp_path / "r", "2026.12.9", keys[0], ray="2.99.0")
    with pytest.raises(ReleaseError, match=f"carries Ray 2.99.0 but the head runs Ray {head.ray}.*same versions"):
        store.add(src)
    src2 = make_release(tmp_path / "r2", "2026.12.10", keys[0], python="3.9")
    with pytest.raises(ReleaseError, match=f"carries Python 3.9 but the head runs Python {head.python}"):
        store.add(src2)
    assert nothing_stored(store)


def test_trust_key_refuses_a_secret_key_and_junk(tmp_path, keys):
    s = ReleaseStore(tmp_path / "releases")
    with pytest.raises(ReleaseError, match="SECRET key: give the head only the public key"):
        s.trust_key(keys[0].secret)
    assert not s.keyring.exists()
    (tmp_path / "junk.asc").write_text("hello")
    with pytest.raises(ReleaseError, match="no OpenPGP public key"):
        s.trust_key(tmp_path / "junk.asc")
    s.trust_key(keys[0].public)
    s.trust_key(keys[1].public)
    assert {k.fingerprint for k in s.trusted_keys()} == {keys[0].fingerprint, keys[1].fingerprint}


def test_manifest_and_sums_rules():
    with pytest.raises(ValueError, match="not a release version"):
        rf.check_version("1_2")
    for bad in ("1+3", "", "../x", "a/b", "v" * 65, "1.0\n"):
        with pytest.raises(ValueError):
            rf.check_version(bad)
    with pytest.raises(ValueError, match="line 1 is not"):
        rf.parse_sums(b"abc  file\n")
    with pytest.raises(ValueError, match="not a release file name"):
        rf.parse_sums(f"{'0' * 64}  ../etc/passwd\n".encode())
    with pytest.raises(ValueError, match="twice"):
        rf.parse_sums(f"{'0' * 64}  a\n{'1' * 64} *a\n".encode())
    assert rf.parse_sums(f"{'A' * 64} *a.efi\n".encode()) == {"a.efi": "a" * 64}
    good = (b'{"format": 1, "version": "2", "variant": "base", "python": "3.11", "ray": "2.60.0", '
            b'"root": "x_2.root", "uki": "x_2.efi"}')
    assert rf.ReleaseManifest.parse(good).version == "2"
    with pytest.raises(ValueError, match="does not carry the version 2"):
        rf.ReleaseManifest.parse(good.replace(b"x_2.efi", b"x.efi"))
    with pytest.raises(ValueError, match="variant"):
        rf.ReleaseManifest.parse(good.replace(b"base", b"arm"))
    with pytest.raises(ValueError, match="format 2"):
        rf.ReleaseManifest.parse(good.replace(b'"format": 1', b'"format": 2'))


# -- served to the PCs


@pytest.fixture
def pc(tmp_path, store) -> EnrolledPc:
    pc = enrolled_pc(tmp_path)
    pc.client.app.include_router(releases_api.router(pc.registry, store))  # type: ignore[attr-defined]
    return pc


def auth(pc: EnrolledPc) -> dict[str, str]:
    return {"Authorization": f"Bearer {pc.enrollment['credential']}", modelfiles.NODE_HEADER: pc.node_id}


def test_an_enrolled_pc_fetches_a_release_with_ranges(pc, store, keys, tmp_path):
    src = make_release(tmp_path / "r", "2026.12.1", keys[0])
    store.add(src)
    root = (src / "garage-node_2026.12.1.root.raw").read_bytes()
    base = "/v1/releases/2026.12.1/"
    r = pc.client.get(base + rf.SUMS, headers=auth(pc))
    assert r.status_code == 200 and r.content == (src / rf.SUMS).read_bytes()
    assert pc.client.get(base + rf.SIGNATURE, headers=auth(pc)).content == (src / rf.SIGNATURE).read_bytes()
    r = pc.client.get(base + "garage-node_2026.12.1.root.raw", headers={**auth(pc), "Range": "bytes=100000-"})
    assert r.status_code == 206 and r.content == root[100000:]
    assert r.headers["content-range"] == f"bytes 100000-{len(root) - 1}/{len(root)}"
    whole = pc.client.get(base + "garage-node_2026.12.1.root.raw", headers=auth(pc)).content
    assert hashlib.sha256(whole).hexdigest() in (src / rf.SUMS).read_text()
    # Nothing but the release's own files.
    for path in (base + ".stored.json", base + "..%2f..%2fkeys%2ftrusted.gpg", "/v1/releases/..%2fkeys/trusted.gpg",
                 base + "missing.efi", "/v1/releases/2099.1/SHA256SUMS"):
        assert pc.client.get(path, headers=auth(pc)).status_code == 404, path
    # Strangers get nothing, not even whether a release exists.
    for headers in ({}, {"Authorization": "Bearer " + "x" * 43, modelfiles.NODE_HEADER: pc.node_id}):
        assert pc.client.get(base + rf.SUMS, headers=headers).status_code == 401
    pc.registry.revoke(pc.node_id)
    assert pc.client.get(base + rf.SUMS, headers=auth(pc)).status_code == 403


# -- the commands


@pytest.fixture
def head_config(tmp_path) -> Path:
    p = tmp_path / "head.toml"
    p.write_text(f'[head]\nstate_dir = "{tmp_path / "state"}"\n[api]\nadvertise_host = "203.0.113.7"\n')
    return p


def test_head_release_commands(head_config, keys, tmp_path, capsys):
    cfg = ["--config", str(head_config)]
    src = make_release(tmp_path / "r", "2026.12.1", keys[0])
    assert main(["head", "release", "add", str(src), *cfg]) == 2
    assert "trusts no release signing key yet" in capsys.readouterr().err
    assert main(["head", "release", "trust-key", str(keys[0].public), *cfg]) == 0
    assert keys[0].fingerprint in capsys.readouterr().out
    assert main(["head", "release", "add", str(src), *cfg]) == 0
    out = capsys.readouterr().out
    assert out.startswith("added release 2026.12.1 (base,") and "rollout start 2026.12.1" in out
    assert main(["head", "release", "add", str(src), *cfg]) == 0
    assert "already stored" in capsys.readouterr().out
    assert main(["head", "release", "list", *cfg]) == 0
    assert "2026.12.1" in capsys.readouterr().out
    assert main(["head", "release", "keys", *cfg]) == 0
    assert keys[0].fingerprint in capsys.readouterr().out
    assert main(["head", "release", "add", *cfg]) == 2
    assert "give the release directory" in capsys.readouterr().err
