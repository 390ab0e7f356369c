"""Command groups of the ``gateway`` CLI that live in their own modules.

Each module in ``MODULES`` has ``register(sub)``, which adds its subparsers to the ``gateway`` command (and sets
``func`` on each, a function of the parsed arguments returning the exit code). gateway/cli.py holds the
daemon's own commands and the error handling shared by all.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

MODULES: tuple[str, ...] = (
    "gateway.commands.certs",
    "gateway.commands.convert",
    "gateway.commands.dlq",
    "gateway.commands.keys",
    "gateway.commands.replay",
    "gateway.commands.rules",
)


def register_all(sub: argparse._SubParsersAction[Any]) -> None:
    for name in MODULES:
        importlib.import_module(name).register(sub)
