"""``gateway keys``: keys for encryption at rest.

- ``keys generate FILE``: a new random AES-256 key (64 hex digits, mode 0600); prints its key id.
- ``keys status -c CONFIG``: journal rows by the key that seals them (``clear`` for rows written while encryption
  was off), so an operator knows when an old key is no longer needed.
- ``keys rotate -c CONFIG``: re-seal every row not sealed with the current key, in short batches, while the
  daemon runs. The daemon must already know the new key (current ``key``, old one in ``old_keys``, then a
  restart): rows are readable by it before, during and after the rotation.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, select, update

from gateway.crypto import KEY_ID_BYTES, MAGIC, Keyring, generate_key_file, load_keyring, row_aad
from gateway.db import Database, open_database
from gateway.errors import ConfigError
from gateway.journal.schema import messages

_HEADER = len(MAGIC) + KEY_ID_BYTES


@dataclass
class RotationReport:
    scanned: int = 0
    resealed: int = 0


async def rotate(
    db: Database, keyring: Keyring, *, batch: int = 200, pause: float = 0.0, progress: Any = None
) -> RotationReport:
    """Re-seal, with the current key, every ``messages`` row whose raw or fhir is sealed with another key or
    stored in clear. Walks the table in id order, one short transaction per batch, so the daemon's group
    commits wait at most one batch. Safe to interrupt and run again: finished rows are skipped."""
    report = RotationReport()
    last = ""

    def step(conn: Connection) -> tuple[str, int, int]:
        rows = conn.execute(
            select(messages.c.id, messages.c.raw, messages.c.fhir)
            .where(messages.c.id > last)
            .order_by(messages.c.id)
            .limit(batch)
        ).all()
        changed = 0
        for mid, raw, fhir in rows:
            values: dict[str, bytes] = {}
            if keyring.needs_rotation(raw):
                aad = row_aad("messages", "raw", mid)
                values["raw"] = keyring.seal(keyring.open(raw, aad), aad)
            if keyring.needs_rotation(fhir):
                aad = row_aad("messages", "fhir", mid)
                values["fhir"] = keyring.seal(keyring.open(fhir, aad), aad)
            if values:
                conn.execute(update(messages).where(messages.c.id == mid).values(**values))
                changed += 1
        return (rows[-1][0] if rows else ""), len(rows), changed

    while True:
        last_id, scanned, changed = await db.transaction(step)
        if not scanned:
            return report
        last = last_id
        report.scanned += scanned
        report.resealed += changed
        if progress is not None:
            progress(report)
        if pause:
            await asyncio.sleep(pause)


async def key_usage(db: Database) -> dict[str, int]:
    """Rows by the key id that seals their raw payload ("clear" for plaintext)."""

    def count(conn: Connection) -> dict[str, int]:
        head = func.substr(messages.c.raw, 1, _HEADER)
        out: dict[str, int] = {}
        for value, n in conn.execute(select(head, func.count()).group_by(head)):
            data = bytes(value or b"")
            kid = data[len(MAGIC) :].hex() if data.startswith(MAGIC) and len(data) == _HEADER else "clear"
            out[kid] = out.get(kid, 0) + int(n)
        return out

    return await db.read(count)


def _journal_and_keys(config: str) -> tuple[str, Keyring | None]:
    from gateway.config import load_config

    cfg = load_config(config)
    return cfg.journal.url, load_keyring(cfg.encryption)


def cmd_keys_generate(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        kid = generate_key_file(path)
    except FileExistsError:
        raise ConfigError(
            "exists already; a key file is never overwritten (it may be the only copy)", str(path)
        ) from None
    print(f"{path}: key id {kid}")
    return 0


def cmd_keys_status(args: argparse.Namespace) -> int:
    url, keyring = _journal_and_keys(args.config)

    async def main() -> dict[str, int]:
        db = open_database(url, pool_size=1)
        try:
            return await key_usage(db)
        finally:
            await db.dispose()

    usage = asyncio.run(main())
    current = keyring.current_key_id if keyring else None
    for kid, n in sorted(usage.items()):
        mark = " (current)" if kid == current else ""
        print(f"{kid}{mark}: {n} message(s)")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    url, keyring = _journal_and_keys(args.config)
    if keyring is None:
        raise ConfigError("encryption is off in this config; set [encryption] key first", "encryption")
    started = time.monotonic()

    def progress(r: RotationReport) -> None:
        print(f"\rscanned {r.scanned}, re-sealed {r.resealed}", end="", file=sys.stderr, flush=True)

    async def main() -> RotationReport:
        db = open_database(url, pool_size=1)
        try:
            return await rotate(db, keyring, batch=args.batch, pause=args.pause, progress=progress)
        finally:
            await db.dispose()

    report = asyncio.run(main())
    print(
        f"\rre-sealed {report.resealed} of {report.scanned} message(s) with key {keyring.current_key_id} "
        f"in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
    )
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    k = sub.add_parser("keys", help="keys for encryption at rest")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    g = ksub.add_parser("generate", help="write a new random AES-256 key to FILE (never overwrites)")
    g.add_argument("file")
    g.set_defaults(func=cmd_keys_generate)
    st = ksub.add_parser("status", help="journal messages by the key that seals them")
    st.add_argument("--config", "-c", required=True)
    st.set_defaults(func=cmd_keys_status)
    r = ksub.add_parser(
        "rotate", help="re-seal every message not sealed with the current key, in batches, while the daemon runs"
    )
    r.add_argument("--config", "-c", required=True)
    r.add_argument("--batch", type=int, default=200, help="messages per transaction")
    r.add_argument("--pause", type=float, default=0.0, help="seconds to wait between batches (spares the disk)")
    r.set_defaults(func=cmd_keys_rotate)
