import base64
import json

import pytest

from garage_node.core import token
from garage_node.core.token import JoinToken, TokenError

PIN = "sha256:" + "ab" * 32


def test_roundtrip_and_repr_hides_secret():
    tok = token.new_token("https://203.0.113.10:8443", PIN)
    text = tok.encode()
    assert text.startswith("gn1.") and "=" not in text
    assert token.parse("  " + text + "\n") == tok
    assert tok.secret not in repr(tok)


def _encode(body):
    return "gn1." + base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


GOOD = {"a": "https://h:8443", "c": PIN, "i": "abc123", "s": "x" * 43}


@pytest.mark.parametrize("text, words", [
    ("hello", "not a garage-node join token"),
    ("gn1.%%%%", "damaged"),
    ("gn1." + "A" * 40, "damaged"),
    (_encode({**GOOD, "s": None}), "incomplete"),
    (_encode({k: v for k, v in GOOD.items() if k != "c"}), "incomplete"),
    (_encode({**GOOD, "a": "http://h:8443"}), "HTTPS"),
    (_encode({**GOOD, "c": "md5:00"}), "damaged"),
    (_encode({**GOOD, "s": "short"}), "damaged"),
    (_encode(GOOD)[:-10], "damaged"),
])
def test_malformed_tokens_say_what_is_wrong(text, words):
    with pytest.raises(TokenError) as e:
        token.parse(text)
    assert words in str(e.value)
    assert "x" * 43 not in str(e.value)


def test_secret_hash():
    h = token.hash_secret("s3cret")
    assert token.secret_matches("s3cret", h) and not token.secret_matches("s3cre", h)
    assert "s3cret" not in h


def test_token_fields_are_validated_exactly():
    tok = token.parse(_encode(GOOD))
    assert tok == JoinToken("https://h:8443", PIN, "abc123", "x" * 43)
