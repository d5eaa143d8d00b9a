"""The head's SQLite helper (head/sqlite.py): connections, transactions, migrations by
user_version; and the two stores opening files made by the code before the helper (frozen
here as SQL, so a later schema change cannot quietly rewrite the fixture)."""

from __future__ import annotations

import ipaddress
import sqlite3
import threading
import time

import pytest

from garage_node.core import token as tokens
from garage_node.head import sqlite
from garage_node.head.gateway.keys import KeyStore
from garage_node.head.gateway.ledger import Ledger
from garage_node.head.gateway.store import MIGRATIONS as GATEWAY_MIGRATIONS
from garage_node.head.gateway.store import Store
from garage_node.head.registry import MIGRATIONS, Registry

NET = ipaddress.IPv4Network("100.96.0.0/24")


def test_connect_sets_the_measured_pragmas(tmp_path):
    db = sqlite.connect(tmp_path / "a.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 10000
    assert db.isolation_level is None  # autocommit: transactions are ours
    assert sqlite.connect(tmp_path / "a.db", synchronous="NORMAL").execute("PRAGMA synchronous").fetchone()[0] == 1


def test_transaction_commits_or_rolls_back(tmp_path):
    db = sqlite.connect(tmp_path / "a.db")
    db.execute("CREATE TABLE t (x INTEGER)")
    with sqlite.transaction(db):
        db.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(RuntimeError), sqlite.transaction(db):
        db.execute("INSERT INTO t VALUES (2)")
        raise RuntimeError("a caller's error mid-way")
    assert [r[0] for r in db.execute("SELECT x FROM t")] == [1]
    assert not db.in_transaction
    store = sqlite.Database(tmp_path / "b.db")
    store.migrate(["CREATE TABLE t (x INTEGER UNIQUE)"])
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as tx:
        tx.execute("INSERT INTO t VALUES (1)")
        tx.execute("INSERT INTO t VALUES (1)")
    assert store.query("SELECT COUNT(*) FROM t")[0][0] == 0


def test_statements_split_only_where_one_ends():
    script = """
        CREATE TABLE a (x TEXT DEFAULT 'a;b');  -- a comment; with a semicolon
        CREATE TRIGGER t AFTER INSERT ON a BEGIN UPDATE a SET x = 'y'; END;
        ;
    """
    got = sqlite.statements(script)
    assert len(got) == 2 and "CREATE TRIGGER" in got[1] and got[1].endswith("END;")
    with pytest.raises(ValueError, match="incomplete"):
        sqlite.statements("CREATE TABLE a (x TEXT DEFAULT 'unclosed;")


STEPS: list[sqlite.Step] = [
    "CREATE TABLE a (x INTEGER); CREATE TABLE log (step INTEGER)",
    "ALTER TABLE a ADD COLUMN y TEXT; INSERT INTO log VALUES (2)",
    lambda db: db.execute("INSERT INTO log VALUES (3)"),
]


def test_migrations_from_an_empty_file_then_nothing_again(tmp_path):
    db = sqlite.connect(tmp_path / "a.db")
    assert sqlite.migrate(db, STEPS) == 3
    assert sqlite.version(db) == 3
    assert [r[1] for r in db.execute("PRAGMA table_info(a)")] == ["x", "y"]
    assert sqlite.migrate(db, STEPS) == 3
    assert [r[0] for r in db.execute("SELECT step FROM log")] == [2, 3]  # each step once


def test_migrations_resume_from_the_files_version_and_leave_a_newer_file_alone(tmp_path):
    db = sqlite.connect(tmp_path / "a.db")
    sqlite.migrate(db, STEPS[:1])
    assert sqlite.version(db) == 1
    assert sqlite.migrate(db, STEPS) == 3
    assert [r[0] for r in db.execute("SELECT step FROM log")] == [2, 3]
    assert sqlite.migrate(db, STEPS[:2]) == 3  # a head downgraded: the file stays as it is


def test_a_failing_step_leaves_the_file_at_the_last_good_version(tmp_path):
    db = sqlite.connect(tmp_path / "a.db")
    broken = [*STEPS[:2], "CREATE TABLE b (x INTEGER); INSERT INTO nowhere VALUES (1)"]
    with pytest.raises(sqlite3.OperationalError):
        sqlite.migrate(db, broken)
    assert sqlite.version(db) == 2
    assert db.execute("SELECT name FROM sqlite_master WHERE name='b'").fetchone() is None  # rolled back whole


def test_two_openers_at_once_apply_each_step_once(tmp_path):
    path = tmp_path / "a.db"
    sqlite.migrate(sqlite.connect(path), STEPS[:1])

    def slow(db: sqlite3.Connection) -> None:
        time.sleep(0.2)  # the second opener arrives while this one holds the write lock
        db.execute("INSERT INTO log VALUES (9)")

    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            sqlite.Database(path).migrate([STEPS[0], slow])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_it) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [r[0] for r in sqlite.connect(path).execute("SELECT step FROM log")] == [9]


# -- files made by the code before the helper

# The registry as the code before the helper left it: the first release's tables, the four
# columns added at open since, and user_version 0 (it was never set).
REGISTRY_BEFORE = """
CREATE TABLE tokens (id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, created_at REAL NOT NULL,
    expires_at REAL NOT NULL, uses_left INTEGER, uses INTEGER NOT NULL DEFAULT 0);
CREATE TABLE nodes (id TEXT PRIMARY KEY, name TEXT NOT NULL, region TEXT NOT NULL,
    wg_public_key TEXT NOT NULL UNIQUE, overlay_ip TEXT NOT NULL UNIQUE, credential_hash TEXT NOT NULL,
    token_id TEXT NOT NULL, enrolled_at REAL NOT NULL, last_seen REAL, revoked_at REAL,
    report TEXT NOT NULL DEFAULT '{}', ray_alive INTEGER NOT NULL DEFAULT 0, ray_checked_at REAL);
ALTER TABLE nodes ADD COLUMN confirmed_at REAL;
ALTER TABLE nodes ADD COLUMN credential_issued_at REAL;
ALTER TABLE nodes ADD COLUMN prev_credential_hash TEXT;
ALTER TABLE nodes ADD COLUMN prev_credential_until REAL;
"""
NODE = ("INSERT INTO nodes (id, name, region, wg_public_key, overlay_ip, credential_hash, token_id, enrolled_at,"
        " last_seen, report, confirmed_at, credential_issued_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)")


def _old_registry(path, script):
    db = sqlite3.connect(path)
    db.executescript(script)
    db.execute("INSERT INTO tokens (id, secret_hash, created_at, expires_at, uses_left, uses) VALUES (?,?,?,?,?,?)",
               ("t", tokens.hash_secret("secret-secret-secret"), 1.0, time.time() + 600, 3, 2))
    return db


def test_a_registry_made_by_the_code_before_the_helper_opens_unchanged_at_version_1(tmp_path):
    path = tmp_path / "registry.sqlite"
    db = _old_registry(path, REGISTRY_BEFORE)
    now = time.time()
    db.execute(NODE, ("n1", "pc1", "eu", "k1", "100.96.0.2", tokens.hash_secret("cred1"), "t", now, now,
                      '{"state": "joined"}', now, now))
    # Enrolled, never confirmed: the adoption must not take it as confirmed (that backfill is for
    # files from before the column existed).
    db.execute(NODE, ("n2", "pc2", "eu", "k2", "100.96.0.3", tokens.hash_secret("cred2"), "t", 5.0, None,
                      "{}", None, 5.0))
    db.commit()
    db.close()
    reg = Registry(path, NET)
    assert sqlite.version(sqlite.connect(path)) == len(MIGRATIONS)  # 1, then the steps after it (#18's tables)
    one = reg.node("n1")
    assert one.report == {"state": "joined"} and one.confirmed_at == now and one.last_seen == now
    assert reg.authenticate("n1", "cred1") is not None
    assert reg.node("n2").confirmed_at is None
    assert [n.id for n in reg.reclaim_unconfirmed(60)] == ["n2"]  # reclaimed as before the upgrade
    assert reg.tokens()[0].uses_left == 4 and reg.tokens()[0].uses == 1
    assert reg.enroll("t", "secret-secret-secret", "pc3", "eu", "k3").node.overlay_ip == "100.96.0.3"


def test_a_registry_from_an_intermediate_release_gets_only_the_missing_columns(tmp_path):
    path = tmp_path / "registry.sqlite"
    # The release that had confirmation but not yet credential renewal.
    script = REGISTRY_BEFORE.split("ALTER TABLE nodes ADD COLUMN credential_issued_at")[0]
    db = _old_registry(path, script)
    db.execute("INSERT INTO nodes (id, name, region, wg_public_key, overlay_ip, credential_hash, token_id,"
               " enrolled_at, confirmed_at) VALUES ('n1', 'pc', 'eu', 'k', '100.96.0.2', ?, 't', 7.0, NULL)",
               (tokens.hash_secret("cred"),))
    db.commit()
    db.close()
    reg = Registry(path, NET, credential_lifetime_s=1e12)
    assert reg.node("n1").confirmed_at is None  # the column was there: left as it was
    auth = reg.authenticate("n1", "cred")
    assert auth is not None and auth.expires_in_s == pytest.approx(7.0 + 1e12 - time.time(), abs=5)  # issued = enrolled


def test_a_new_registry_is_at_the_latest_version_with_every_column(tmp_path):
    Registry(tmp_path / "r.sqlite", NET)
    db = sqlite.connect(tmp_path / "r.sqlite")
    assert sqlite.version(db) == len(MIGRATIONS)
    columns = {r[1] for r in db.execute("PRAGMA table_info(nodes)")}
    assert {"confirmed_at", "credential_issued_at", "prev_credential_hash", "prev_credential_until"} <= columns


# The gateway's database has been numbered since its first release: version 1 is its schema.
GATEWAY_BEFORE = """
CREATE TABLE api_keys (name TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, hint TEXT NOT NULL,
    models TEXT NOT NULL DEFAULT '', rpm INTEGER, tpm INTEGER, quota_tokens INTEGER,
    created_at REAL NOT NULL, expires_at REAL, revoked_at REAL);
CREATE TABLE usage (hour INTEGER NOT NULL, key TEXT NOT NULL, node_id TEXT NOT NULL, model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (hour, key, node_id, model));
CREATE INDEX usage_node ON usage (node_id, hour);
CREATE INDEX usage_key ON usage (key, hour);
PRAGMA user_version = 1;
"""


def test_a_gateway_database_made_by_the_code_before_the_helper_opens_with_its_keys_and_usage(tmp_path):
    path = tmp_path / "gateway.db"
    db = sqlite3.connect(path)
    db.executescript(GATEWAY_BEFORE)
    db.execute("INSERT INTO api_keys (name, hash, hint, created_at) VALUES ('alice', 'h', 'gk-abcde', 1.0)")
    db.execute("INSERT INTO usage VALUES (10, 'alice', 'n1', 'm', 2, 30, 12)")
    db.commit()
    db.close()
    store = Store(path)
    assert sqlite.version(sqlite.connect(path)) == len(GATEWAY_MIGRATIONS)
    assert [k.name for k in KeyStore(store).all()] == ["alice"]
    assert Ledger(store).key_tokens("alice") == 42
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_new_gateway_database_is_at_its_newest_version(tmp_path):
    Store(tmp_path / "gateway.db")
    assert sqlite.version(sqlite.connect(tmp_path / "gateway.db")) == len(GATEWAY_MIGRATIONS) > 1
