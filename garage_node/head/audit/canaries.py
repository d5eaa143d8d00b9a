"""Canary requests: prompts the head sends itself through the normal path, indistinguishable
from a customer's (the same endpoints, body shape and parameters customers use), always
audited. The shipped pool (canaries.jsonl) or [audit] canary_prompts (JSON lines:
{"messages": [...]} or {"prompt": "..."})."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from garage_node.head.gateway.keys import ApiKey

KEY_NAME = "audit-canary"  # what the ledger bills them to
# The key canaries go out with (never checked against the key store: the head sends them).
KEY = ApiKey(name=KEY_NAME, hint="", models=(), rpm=None, tpm=None, quota_tokens=None, created_at=0.0,
             expires_at=None, revoked_at=None)


class CanaryError(ValueError):
    pass


@dataclass(frozen=True)
class Canary:
    path: str
    body: dict[str, Any]


def load(path: str = "") -> list[dict[str, Any]]:
    """The prompt pool: [audit] canary_prompts, or the shipped one. Raises CanaryError with the
    line that is wrong."""
    if path:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise CanaryError(f"[audit] canary_prompts: cannot read {path} ({e.strerror})") from None
        where = path
    else:
        text = resources.files("garage_node.head.audit").joinpath("canaries.jsonl").read_text()
        where = "the shipped canaries.jsonl"
    pool = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise CanaryError(f"{where} line {i} is not JSON") from None
        ok = isinstance(item, dict) and (
            (isinstance(item.get("messages"), list) and item["messages"]
             and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in item["messages"]))
            or (isinstance(item.get("prompt"), str) and item["prompt"]))
        if not ok:
            raise CanaryError(f'{where} line {i}: each line must be {{"messages": [{{"role", "content"}}...]}} or '
                              '{"prompt": "text"}')
        pool.append(item)
    if not pool:
        raise CanaryError(f"{where} holds no prompts")
    return pool


def make(pool: list[dict[str, Any]], model: str, rng: random.Random, greedy: bool = False,
         chat: bool = True) -> Canary:
    """One canary for `model`: a prompt of the pool with parameters customers use. Mostly at
    temperature 0 (the strongest check); `chat` False: text completions only (a model without
    a chat template)."""
    choices = [p for p in pool if chat or "prompt" in p] or pool
    item = rng.choice(choices)
    body: dict[str, Any] = {"model": model, "max_tokens": rng.choice((64, 96, 128, 200))}
    if not greedy and rng.random() < 0.34:
        body["temperature"] = rng.choice((0.7, 0.8, 1.0))
    else:
        body["temperature"] = 0
    if "messages" in item and chat:
        return Canary("/v1/chat/completions", {**body, "messages": item["messages"]})
    prompt = item.get("prompt") or "\n".join(m["content"] for m in item["messages"])
    return Canary("/v1/completions", {**body, "prompt": prompt})
