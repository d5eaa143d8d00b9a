#!/usr/bin/python3
"""Stage garage.toml for the image's GARAGE partition (called by ../build-image.sh).

    GARAGE_JOIN_TOKEN=gn1.... stage-garage-toml.py SRC DST

Copies SRC to DST, optionally with [node] join_token set to $GARAGE_JOIN_TOKEN (taken from
the environment, never from argv, which every user can read in ps). This does not check
what the keys mean: build-image.sh validates SRC before and DST after with the agent's
own validator (python3 -m garage_node.node.config), so there is one schema.

Why a script of its own rather than a TOML library: the file is the owner's to read and
edit on the stick, so it is edited as text and keeps its comments and layout; only the
token's value changes. The result is checked by parsing it again.

DST: no byte-order mark (Notepad may add one; TOML does not allow it), CRLF line ends
(Notepad on older Windows shows LF-only files as one line; TOML allows CRLF), mode 0600
from the start (it may hold the token). Never prints the token or any value of the file.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib


def fail(msg: str) -> None:
    sys.exit(f"build-image: error: {msg}")


def with_token(text: str, conf: dict, token: str, src: str) -> str:
    header = re.search(r"^[ \t]*\[[ \t]*node[ \t]*\][ \t]*(#.*)?$", text, re.M)
    if header is None:
        if "node" in conf:  # node.join_token = ..., node = {...} or only [node.x] tables
            fail(f"{src}: cannot add the join token: write the node settings as a [node] "
                 "section (see image/garage.toml), or leave --join-token out")
        # A new table at the end is valid after anything the file holds.
        return text.rstrip("\n") + f'\n\n[node]\njoin_token = "{token}"\n'
    end = re.compile(r"^[ \t]*\[", re.M).search(text, header.end())
    stop = end.start() if end else len(text)
    # The value only (a basic or literal one-line string): the line's comment stays.
    key = re.compile(r"""^([ \t]*join_token[ \t]*=[ \t]*)("[^"\n]*"|'[^'\n]*')""", re.M).search(text, header.end(), stop)
    if key:
        return text[:key.start(2)] + f'"{token}"' + text[key.end(2):]
    if "join_token" in conf.get("node", {}):
        fail(f"{src}: cannot replace [node] join_token: give it as join_token = \"...\" on one "
             "line, or leave --join-token out")
    return text[:header.end()] + f'\njoin_token = "{token}"' + text[header.end():]


def main(src: str, dst: str) -> None:
    token = os.environ.get("GARAGE_JOIN_TOKEN", "")
    try:
        text = open(src, "rb").read().decode("utf-8-sig").replace("\r\n", "\n")
        conf = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        # The validator has already passed this file: this should not happen.
        fail(f"{src}: cannot read it again ({type(e).__name__})")
    if token:
        text = with_token(text, conf, token, src)
        # Everything else must parse as before: the edit touched the token only.
        want = dict(conf, node=dict(conf.get("node", {}), join_token=token))
        try:
            ok = tomllib.loads(text) == want
        except tomllib.TOMLDecodeError:
            ok = False
        if not ok:
            fail(f"{src}: adding the join token did not give the expected file (token not shown); "
                 "put join_token = \"\" under [node] and build again")
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write(text.replace("\n", "\r\n"))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: GARAGE_JOIN_TOKEN=... stage-garage-toml.py SRC DST")
    main(sys.argv[1], sys.argv[2])
