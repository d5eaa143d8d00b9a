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
    assert reg.authenticate(e.node.id, e.credential).id == e.node.id
    assert reg.authenticate(e.node.id, e.credential + "x") is None
    assert reg.authenticate("nobody", e.credential) is None


def test_same_wireguard_key_twice_is_refused(reg):
    reg.add_token("t", "secret-secret-secret", 60, uses=None)
    k = key()
    reg.enroll("t", "secret-secret-secret", "pc", "eu", k)
    with pytest.raises(EnrollError) as e:
        reg.enroll("t", "secret-secret-secret", "pc", "eu", k)
    assert e.value.code == "key_in_use"


def test_find_node_by_name_or_id(reg):
    reg.add_token("t", "secret-secret-secret", 60, uses=None)
    a = reg.enroll("t", "secret-secret-secret", "pc", "eu", key()).node
    reg.enroll("t", "secret-secret-secret", "pc", "eu", key())
    assert reg.find_node(a.id).id == a.id
    with pytest.raises(LookupError, match="names 2 nodes"):
        reg.find_node("pc")
    with pytest.raises(KeyError):
        reg.find_node("ghost")
