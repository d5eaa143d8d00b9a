"""`garage-node`: one thin command for the node (cli.node) and the head (cli.head).

The commands only parse arguments, call the typed modules and print; the node's commands
reach the running agent through its local API client, never behind its back.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from garage_node import __version__
from garage_node.cli import head, node
from garage_node.core.settings import ConfigError

EX_CONFIG = 78  # sysexits.h: the config is wrong; systemd keeps retrying slowly

HELP = """\
The node side. With no token typed anywhere but garage.toml (or `join`), `run` detects the
GPUs, enrolls with the regional head, brings up the WireGuard overlay, runs a Ray worker and
the inference engine, and keeps all of it running. `status` shows how that is going.
`garage-node head --help`: the regional head that PCs join."""


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"garage-node: config error: {e}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `garage-node status --json | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="garage-node", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"garage-node {__version__}")
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    node.add_commands(sub)
    head.add_commands(sub)
    return p


def _setup_logging(verbose: bool) -> None:
    # Under systemd the journal adds its own timestamps.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt, stream=sys.stderr)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
