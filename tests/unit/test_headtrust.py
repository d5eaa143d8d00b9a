"""`garage-node head node ...`, `head nodes` and `head usage --by node` against a real head
state directory (issue #20): the operator's word on a PC's trust, and what it shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from garage_node.cli import main
from garage_node.head import setup
from garage_node.head.audit.trust import Trust
from garage_node.head.config import load_head_config
from garage_node.head.gateway.gateway import database_path
from garage_node.head.gateway.ledger import Ledger
from garage_node.head.gateway.store import Store
from tests.unit.test_head_placement import enroll


@pytest.fixture
def head(tmp_path, capsys):
    config = tmp_path / "head.toml"
    config.write_text(f'[head]\nstate_dir = "{tmp_path / "state"}"\n[api]\nadvertise_host = "127.0.0.1"\n'
                      '[audit]\nhold_days = 2\n')
    assert main(["head", "init", "--config", str(config)]) == 0
    capsys.readouterr()
    cfg = load_head_config(config)
    reg = setup.open_registry(cfg)
    nodes = {name: enroll(reg, name) for name in ("alice-pc", "bob-pc")}
    return config, nodes, Store(database_path(cfg.head.state_dir))


def cli(capsys, config: Path, *args: str) -> tuple[int, str, str]:
    rc = main(["head", *args, "--config", str(config)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_trust_quarantine_release_and_forfeit_by_name_with_clear_refusals(head, capsys):
    config, nodes, store = head
    alice = nodes["alice-pc"]
    rc, _, err = cli(capsys, config, "node", "trust", "carol-pc")
    assert rc == 2 and "no node 'carol-pc'" in err and "head nodes" in err
    rc, _, err = cli(capsys, config, "node", "release", "alice-pc")
    assert rc == 2 and "not quarantined" in err
    rc, _, err = cli(capsys, config, "node", "forfeit", "alice-pc")
    assert rc == 2 and "nothing frozen" in err

    rc, out, _ = cli(capsys, config, "node", "trust", "alice-pc")
    assert rc == 0 and out.startswith(f"alice-pc ({alice}): trusted")
    assert Trust(store).get(alice).trusted
    rc, out, _ = cli(capsys, config, "node", "quarantine", "alice-pc", "--why", "tokens far below the verifier's")
    assert rc == 0 and "quarantined" in out
    t = Trust(store).get(alice)
    assert t.state == "quarantined" and not t.trusted and t.why == "tokens far below the verifier's"
    rc, _, err = cli(capsys, config, "node", "trust", alice)  # by id too
    assert rc == 2 and "release it first" in err

    rc, out, _ = cli(capsys, config, "nodes")
    line = next(ln for ln in out.splitlines() if ln.startswith(alice))
    assert "QUARANTINED: tokens far below the verifier's" in line
    rows = {r["node_id"]: r for r in json.loads(cli(capsys, config, "nodes", "--json")[1])}
    assert rows[alice]["trust_state"] == "quarantined" and rows[nodes["bob-pc"]]["trust_state"] == "ok"

    rc, out, _ = cli(capsys, config, "node", "release", "alice-pc")
    assert rc == 0 and "re-check started" in out and Trust(store).get(alice).state == "rechecking"
    rc, _, err = cli(capsys, config, "node", "release", "alice-pc")
    assert rc == 2 and "being re-checked already" in err and "--without-recheck" in err
    rc, out, _ = cli(capsys, config, "node", "forfeit", "alice-pc")
    assert rc == 0 and "forfeited" in out
    rc, _, err = cli(capsys, config, "node", "forfeit", "alice-pc")
    assert rc == 2 and "forfeited already" in err
    rc, out, _ = cli(capsys, config, "node", "release", "alice-pc", "--without-recheck")
    assert rc == 0 and "released without a re-check" in out and Trust(store).get(alice).serves
    shown = json.loads(cli(capsys, config, "node", "show", "alice-pc", "--json")[1])
    assert shown["trust"]["state"] == "ok" and shown["trust"]["forfeited"] is True


def test_usage_by_node_shows_earned_held_frozen_and_forfeited(head, capsys):
    config, nodes, store = head
    alice, bob = nodes["alice-pc"], nodes["bob-pc"]
    ledger = Ledger(store)
    ledger.add("k", alice, "m", 60, 40)
    ledger.add("k", bob, "m", 5, 2)
    ledger.flush()
    # Written three days ago (hold_days = 2): alice's earlier tokens are earned.
    _shift(store, alice, 72)
    ledger.add("k", alice, "m", 3, 0)
    ledger.flush()
    Trust(store).quarantine(bob, "x")
    rows = {r["node"]: r for r in json.loads(cli(capsys, config, "usage", "--by", "node", "--json")[1])}
    assert {k: rows[alice][k] for k in ("total_tokens", "earned_tokens", "held_tokens", "frozen_tokens")} == \
        {"total_tokens": 103, "earned_tokens": 100, "held_tokens": 3, "frozen_tokens": 0}
    assert rows[bob]["frozen_tokens"] == 7 and rows[bob]["earned_tokens"] == 0 and rows[bob]["name"] == "bob-pc"
    rc, out, _ = cli(capsys, config, "usage", "--by", "node")
    assert rc == 0 and "EARNED" in out and "FROZEN" in out and "hold_days" in out and "hourly" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("alice-pc"))
    assert line.split()[-4:] == ["100", "3", "0", "0"]
    rc, out, _ = cli(capsys, config, "usage", "--by", "key")
    assert rc == 0 and "EARNED" not in out


def _shift(store: Store, node_id: str, hours: int) -> None:
    with store.transaction() as db:
        db.execute("UPDATE usage SET hour = hour - ? WHERE node_id = ?", (hours, node_id))
