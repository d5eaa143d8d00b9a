from pathlib import Path

import pytest

from garage_node.core.settings import ConfigError
from garage_node.head.config import load_head_config
from garage_node.node.config import load_node_config

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_examples_are_valid():
    cfg = load_node_config(ROOT / "configs/node.example.toml", ROOT / "configs/garage.example.toml")
    assert cfg.overlay.interface == "garage0" and cfg.node.join_token == ""
    head = load_head_config(ROOT / "configs/head.example.toml")
    assert head.hub_ip == "100.96.0.1" and head.wg_endpoint == "203.0.113.10:51820"
    assert head.api_url == "https://203.0.113.10:8443"


def test_override_replaces_base_key_by_key(tmp_path):
    base = write(tmp_path, "node.toml", '[node]\nname = "base"\nregion = "eu"\n[agent]\nreconcile_s = 5\n')
    over = write(tmp_path, "garage.toml", '[node]\nname = "stick"\n')
    cfg = load_node_config(base, over)
    assert (cfg.node.name, cfg.node.region, cfg.agent.reconcile_s) == ("stick", "eu", 5.0)


def test_missing_files_give_defaults(tmp_path):
    cfg = load_node_config(tmp_path / "none.toml", tmp_path / "nope.toml")
    assert cfg.node.state_dir == Path("/var/lib/garage-node")


@pytest.mark.parametrize("text, words", [
    ('[node]\njoin_tokn = "x"\n', ["unknown key 'node.join_tokn'", "join_token"]),
    ('[nod]\nname = "x"\n', ["unknown key 'nod'"]),
    ('[agent]\nreconcile_s = "fast"\n', ["'agent.reconcile_s' must be a number"]),
    ('[agent]\nreconcile_s = -1\n', ["'agent.reconcile_s' must be greater than 0"]),
    ('[agent]\nreconcile_s = 0.0\n', ["'agent.reconcile_s' must be greater than 0"]),
    ('[ray]\nnum_cpus = -1\n', ["'ray.num_cpus' must be 0 or more"]),
    ('[engine]\nport = 70000\n', ["'engine.port' must be a TCP port (1-65535)"]),
    ('[agent]\nreconcile_s = inf\n', ["'agent.reconcile_s' must be a number"]),
    ('[agent]\nheartbeat_s = 5\n', ["unknown key 'agent.heartbeat_s'"]),
    ('[ray]\nnum_cpus = 1.5\n', ["'ray.num_cpus' must be a whole number"]),
    ('[node]\nname = \n', ["not valid TOML"]),
    ('node = "x"\n', ["'node' must be a table"]),
    ('[ssh]\nauthorized_keys = "ssh-ed25519 AAA"\n', ["'ssh.authorized_keys' must be a list of strings"]),
    ('[overlay]\ninterface = "--help"\n', ["overlay.interface"]),
    ('[overlay]\nimplementation = "magic"\n', ["overlay.implementation", "wireguard-go"]),
])
def test_errors_name_file_and_key(tmp_path, text, words):
    over = write(tmp_path, "garage.toml", text)
    with pytest.raises(ConfigError) as e:
        load_node_config(tmp_path / "none.toml", over)
    msg = str(e.value)
    if "overlay" not in text:
        assert str(over) in msg
    for w in words:
        assert w in msg


def test_secret_values_never_echoed(tmp_path):
    over = write(tmp_path, "garage.toml", '[node]\njoin_token = 12345678\n[wifi]\npsk = "hunter2"\n')
    with pytest.raises(ConfigError) as e:
        load_node_config(tmp_path / "none.toml", over)
    assert "12345678" not in str(e.value)
    ok = write(tmp_path, "ok.toml", '[node]\njoin_token = "gn1.sekrit"\n[wifi]\npsk = "hunter2"\n')
    text = repr(load_node_config(tmp_path / "none.toml", ok))
    assert "sekrit" not in text and "hunter2" not in text


def test_head_requires_advertise_host(tmp_path):
    p = write(tmp_path, "head.toml", "[head]\nregion = \"x\"\n")
    with pytest.raises(ConfigError, match="advertise_host"):
        load_head_config(p)
    with pytest.raises(ConfigError, match="head config not found"):
        load_head_config(tmp_path / "missing.toml")


def test_head_rejects_bad_cidr(tmp_path):
    p = write(tmp_path, "head.toml", '[api]\nadvertise_host = "h"\n[overlay]\ncidr = "100.96.0.0/30"\n')
    with pytest.raises(ConfigError, match="too small"):
        load_head_config(p)
    p.write_text('[api]\nadvertise_host = "h"\n[overlay]\ncidr = "banana"\n')
    with pytest.raises(ConfigError, match="IPv4 network"):
        load_head_config(p)


def test_garage_toml_saved_by_notepad(tmp_path):
    over = tmp_path / "garage.toml"
    over.write_bytes("\ufeff[node]\r\nname = \"alice\"\r\n".encode())
    assert load_node_config(tmp_path / "none.toml", over).node.name == "alice"


HEAD = '[api]\nadvertise_host = "203.0.113.7"\n'


def test_a_field_own_range_is_the_rule(tmp_path):
    """A share may be 0 (its check says 0-1), though no period may: the reader itself puts no
    range on numbers (it once refused every float <= 0, this one included)."""
    cfg = load_head_config(write(tmp_path, "head.toml", HEAD + "[gateway]\naffinity_threshold = 0.0\n"))
    assert cfg.gateway.affinity_threshold == 0.0
    for text, words in [("[gateway]\naffinity_threshold = 1.5\n", "'gateway.affinity_threshold' must be a share"),
                        ("[options]\nheartbeat_s = 0\n", "'options.heartbeat_s' must be greater than 0"),
                        ("[gateway]\nbalance_abs = 0\n", "'gateway.balance_abs' must be greater than 0"),
                        ("[ray]\nnum_cpus = -2\n", "'ray.num_cpus' must be 0 or more")]:
        with pytest.raises(ConfigError) as e:
            load_head_config(write(tmp_path, "head.toml", HEAD + text))
        assert words in str(e.value), text


def test_every_number_has_its_own_check():
    """The reader checks a number's type only, so a numeric field without a check would take
    -5 seconds or port 70000: each says its range."""
    import dataclasses
    import typing

    from garage_node.core import settings
    from garage_node.head.config import HeadConfig
    from garage_node.node.config import NodeConfig

    unchecked = []

    def walk(cls, where):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            if dataclasses.is_dataclass(kind):
                walk(kind, f"{where}.{f.name}")
            elif kind in (int, float) and not {settings._CHECK, settings._PARSE, settings._SKIP} & set(f.metadata):
                unchecked.append(f"{where}.{f.name}")

    walk(NodeConfig, "node.toml")
    walk(HeadConfig, "head.toml")
    assert unchecked == []
