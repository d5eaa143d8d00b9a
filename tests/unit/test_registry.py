import ipaddress
import time

import pytest

from garage_node.head.registry import EnrollError, Registry
from garage_node.core.wireguard import generate_private_key, public_key_of


@pytest.fixture
def reg(tmp_path):
    return Registry(tmp_path / "r.sqlite", ipaddress.IPv4Network("100.96.0.0/29"))


def key():
    return public_key_of(generate_private_key())


def test_single_use_token(reg):
    reg.add_token("tok1", "secret-secret-secret", 60, uses=1)
    first = reg.enroll("tok1", "secret-secret-secret", "pc1", "eu", key())
    assert first.node.overlay_ip == "100.96.0.2"
    with pytest.raises(EnrollError) as e:
        reg.enroll("tok1", "secret-secret-secret", "pc2", "eu", key())
    assert e.value.code == "token_used"
    assert len(reg.nodes()) == 1


def test_wrong_secret_and_unknown_token_look_the_same(reg):
    reg.add_token("tok1", "secret-secret-secret", 60, uses=None)
    for tid, secret in (("tok1", "wrong-wrong-wrong-x"), ("nope", "secret-secret-secret")):
        with pytest.raises(EnrollError) as e:
            reg.enroll(tid, secret, "pc", "eu", key())
        assert e.value.code == "token_unknown"
    assert reg.tokens()[0].uses == 0


def test_expired_token(reg):
    reg.add_token("tok1", "secret-secret-secret", 0.01, uses=None)
    time.sleep(0.05)
    with pytest.raises(EnrollError) as e:
        reg.enroll("tok1", "secret-secret-secret", "pc", "eu", key())
    assert e.value.code == "token_expired"


def test_addresses_never_reused_and_network_full(reg):
    reg.add_token("t", "secret-secret-secret", 60, uses=None)
    got = [reg.enroll("t", "secret-secret-secret", f"pc{i}", "eu", key()) for i in range(5)]
    assert [g.node.overlay_ip for g in got] == [f"100.96.0.{i}" for i in range(2, 7)]
    reg.revoke(got[0].node.id)
    with pytest.raises(EnrollError) as e:  # /29: .2-.6 taken (revoked .2 stays taken)
        reg.enroll("t", "secret-secret-secret", "pc9", "eu", key())
    assert e.value.code == "network_full"
    assert len(reg.active_peers()) == 4


def test_credentials(reg):
    reg.add_token("t", "secret-secret-secret", 60, uses=None)
    e = reg.enroll("t", "secret-secret-secret", "pc", "eu", key())
    assert reg.authenticate(e.node.id, e.credential).node.id == e.node.id
    assert reg.authenticate(e.node.id, e.credential + "x") is None
    assert reg.authenticate("nobody", e.credential) is None
    assert reg.authenticate(e.node.id, "") is None


def test_same_wireguard_key_after_confirmation_is_refused(reg):
    reg.add_token("t", "secret-secret-secret", 60, uses=None)
    k = key()
    first = reg.enroll("t", "secret-secret-secret", "pc", "eu", k)
    reg.record_heartbeat(first.node.id, {})  # the node came back with its credential: confirmed
    with pytest.raises(EnrollError) as e:
        reg.enroll("t", "secret-secret-secret", "pc", "eu", k)
    assert e.value.code == "key_in_use"


# ---------------------------------------------------------------- idempotent enrollment (#9)


def test_enrolling_again_with_same_token_and_key_returns_the_same_identity(reg):
    reg.add_token("t", "secret-secret-secret", 60, uses=1)
    k = key()
    first = reg.enroll("t", "secret-secret-secret", "pc", "eu", k)
    reg.record_heartbeat(first.node.id, {"state": "enrolling"}, confirm=False)  # the enrollment's own report
    again = reg.enroll("t", "secret-secret-secret", "pc", "eu", k)  # the first answer was lost
    assert again.resumed and not first.resumed
    assert (again.node.id, again.node.overlay_ip) == (first.node.id, first.node.overlay_ip)
    assert again.credential != first.credential  # a fresh one: the first never arrived
    assert reg.authenticate(first.node.id, first.credential) is None
    assert reg.authenticate(again.node.id, again.credential) is not None
    assert len(reg.nodes()) == 1 and reg.tokens()[0].uses == 1  # no second use spent


def test_resume_needs_the_right_secret_and_the_same_token(reg):
    reg.add_token("t", "secret-secret-secret", 60, uses=1)
    reg.add_token("u", "other-secret-secret", 60, uses=None)
    k = key()
    reg.enroll("t", "secret-secret-secret", "pc", "eu", k)
    with pytest.raises(EnrollError) as e:
        reg.enroll("t", "wrong-wrong-wrong-x", "pc", "eu", k)
    assert e.value.code == "token_unknown"
    with pytest.raises(EnrollError) as e:
        reg.enroll("u", "other-secret-secret", "pc", "eu", k)  # another token: not the same request
    assert e.value.code == "key_in_use"


def test_unconfirmed_rows_are_reclaimed_and_the_token_gets_its_use_back(reg):
    reg.add_token("t", "secret-secret-secret", 60, uses=1)
    orphan = reg.enroll("t", "secret-secret-secret", "pc", "eu", key())
    assert reg.reclaim_unconfirmed(3600) == []  # too young
    time.sleep(0.02)
    gone = reg.reclaim_unconfirmed(0.01)
    assert [g.id for g in gone] == [orphan.node.id]
    assert reg.nodes() == [] and reg.active_peers() == []
    assert reg.tokens()[0].uses_left == 1
    again = reg.enroll("t", "secret-secret-secret", "pc", "eu", key())
    assert again.node.overlay_ip == orphan.node.overlay_ip  # never used by a node: free again


def test_confirmed_and_revoked_rows_are_never_reclaimed(reg):
    reg.add_token("t", "secret-secret-secret", 60, uses=None)
    alive = reg.enroll("t", "secret-secret-secret", "pc1", "eu", key())
    reg.record_heartbeat(alive.node.id, {})
    revoked = reg.enroll("t", "secret-secret-secret", "pc2", "eu", key())
    reg.revoke(revoked.node.id)
    time.sleep(0.02)
    assert reg.reclaim_unconfirmed(0.01) == []
    assert len(reg.nodes()) == 2


# ---------------------------------------------------------------- credential lifetime (#9)


def test_credential_expires_and_renewal_keeps_the_old_one_for_the_overlap(tmp_path):
    reg = Registry(tmp_path / "r.sqlite", ipaddress.IPv4Network("100.96.0.0/24"),
                   credential_lifetime_s=0.3, credential_overlap_s=0.15)
    reg.add_token("t", "secret-secret-secret", 60, uses=None)
    e = reg.enroll("t", "secret-secret-secret", "pc", "eu", key())
    auth = reg.authenticate(e.node.id, e.credential)
    assert 0 < auth.expires_in_s <= 0.3 and auth.lifetime_s == 0.3 and not auth.previous
    new_key = key()
    renewal = reg.renew_credential(auth, e.credential, new_key)
    assert renewal.key_changed and reg.node(e.node.id).wg_public_key == new_key
    assert reg.node(e.node.id).confirmed_at is not None
    old = reg.authenticate(e.node.id, e.credential)
    assert old.previous and 0 < old.expires_in_s <= 0.15  # the overlap
    assert reg.authenticate(e.node.id, renewal.credential).expires_in_s > 0.2
    time.sleep(0.2)
    assert reg.authenticate(e.node.id, e.credential).expires_in_s <= 0  # overlap over
    time.sleep(0.15)
    assert reg.authenticate(e.node.id, renewal.credential).expires_in_s <= 0  # lifetime over


def test_renewal_to_another_nodes_key_is_refused(reg):
    reg.add_token("t", "secret-secret-secret", 60, uses=None)
    a = reg.enroll("t", "secret-secret-secret", "pc1", "eu", key())
    b = reg.enroll("t", "secret-secret-secret", "pc2", "eu", key())
    with pytest.raises(EnrollError) as e:
        reg.renew_credential(reg.authenticate(a.node.id, a.credential), a.credential, b.node.wg_public_key)
    assert e.value.code == "key_in_use"
    assert reg.authenticate(a.node.id, a.credential) is not None  # nothing changed


def test_a_registry_from_before_the_new_columns_is_migrated(tmp_path):
    import sqlite3

    from garage_node.head.registry import SCHEMA
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.execute("INSERT INTO nodes (id, name, region, wg_public_key, overlay_ip, credential_hash, token_id, enrolled_at,"
               " last_seen) VALUES ('n0000000001', 'pc', 'eu', 'k', '100.96.0.2', 'h', 't', 1.0, 2.0)")
    db.commit()
    db.close()
    reg = Registry(path, ipaddress.IPv4Network("100.96.0.0/24"))
    assert reg.node("n0000000001").confirmed_at == 2.0  # an old row counts as confirmed: never reclaimed
    assert reg.reclaim_unconfirmed(0) == []
    Registry(path, ipaddress.IPv4Network("100.96.0.0/24"))  # opening again changes nothing


def test_find_node_by_name_or_id(reg):
    reg.add_token("t", "secret-secret-secret", 60, uses=None)
    a = reg.enroll("t", "secret-secret-secret", "pc", "eu", key()).node
    reg.enroll("t", "secret-secret-secret", "pc", "eu", key())
    assert reg.find_node(a.id).id == a.id
    with pytest.raises(LookupError, match="names 2 nodes"):
        reg.find_node("pc")
    with pytest.raises(KeyError):
        reg.find_node("ghost")
