"""What every command group of ``txr`` shares: the exit codes, the messages on stderr, and the
arguments several groups take."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeAlias

from infra.local import cluster

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

Handler = Callable[[argparse.Namespace], int]
# What ``register`` of each command group adds its commands to.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def err(msg: str) -> None:
    print(f"txr: {msg}", file=sys.stderr)


def progress(msg: str) -> None:
    print(f"[txr local] {msg}", file=sys.stderr, flush=True)


def step(msg: str) -> None:
    print(f"[txr] {msg}", file=sys.stderr, flush=True)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("a positive integer")
    return value


def add_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dir",
        type=Path,
        default=cluster.DEFAULT_DIR,
        help="cluster directory (default: .txr/local)",
    )
