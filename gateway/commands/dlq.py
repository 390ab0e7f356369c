"""``gateway dlq list|show|retry|drop``: the dead letters, for the operator who fixes what made them.

A dead letter is an outbox item that will not be retried by itself: its destination refused it (4xx, AR) or it
ran out of attempts or age. ``retry`` puts it back in the queue with a fresh attempt count (after the fix);
``drop`` gives up on it for good (it stays on record, status ``dropped``, until retention purges the message).
Both are recorded in the audit trail with the operator's name. ``dead-letters`` is the command's old name.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson

from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError

T = TypeVar("T")


def _with_journal(cfg: GatewayConfig, fn: Callable[[Any], Awaitable[T]]) -> T:
    from gateway.crypto import load_keyring
    from gateway.journal import Journal

    async def main() -> T:
        j = Journal(cfg.journal.url, keyring=load_keyring(cfg.encryption))
        await j.open(migrate_schema=False)
        try:
            return await fn(j)
        finally:
            await j.close()

    return asyncio.run(main())


def audit(cfg: GatewayConfig, action: str, **fields: str | int) -> None:
    """Record an operator action in the audit trail (when one is configured)."""
    if cfg.audit_log:
        from gateway.audit import AuditLog, operator

        AuditLog(Path(cfg.audit_log)).append(action, f"operator:{operator()}", **fields)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError


def _dump(doc: Any) -> None:
    sys.stdout.write(
        orjson.dumps(doc, default=_json_default, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode() + "\n"
    )


def _ids(args: argparse.Namespace) -> list[int] | None:
    """The ids named on the command line; None (all) only when --all says so or for the old spelling."""
    try:
        ids = [int(i) for i in args.ids]
    except ValueError:
        raise ConfigError("outbox item ids are numbers (see `gateway dlq list`)") from None
    if ids and args.all:
        raise ConfigError("name ids or give --all, not both")
    if not ids and not args.all and args.command != "dead-letters":
        raise ConfigError(f"name the ids to {args.action}, or give --all")
    return ids or None


def cmd_dlq(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.action == "list":
        rows = _with_journal(cfg, lambda j: j.dead_letters(args.destination, args.limit))
        if args.json:
            _dump(rows)
            return 0
        if not rows:
            print("no dead letters", file=sys.stderr)  # stdout stays empty for scripts
        for r in rows:
            print(
                f"{r['id']}  {r['destination']:<12} {r['message_id']}  {r['message_type']:<10} "
                f"attempts={r['attempts']}  {r['last_error']}"
            )
        return 0
    if args.action == "show":
        if len(args.ids) != 1:
            raise ConfigError("show takes one outbox item id")
        (item_id,) = _ids(args) or [0]
        item = _with_journal(cfg, lambda j: j.outbox_item(item_id))
        if item is None:
            print(f"error: no outbox item {args.ids[0]}", file=sys.stderr)
            return 1
        if args.json:
            _dump(item)
            return 0
        for key, value in item.items():
            print(f"{key:<16} {value if value is not None else ''}")
        return 0
    ids = _ids(args)
    retry = args.action == "retry"

    async def act(j: Any) -> tuple[list[tuple[int, str]], int]:
        # Named ids that are not dead letters (delivered, still pending, no such item) are said so, and make the
        # exit code 1: "0 dead letter(s) queued again" alone left the operator guessing.
        not_dead = await _not_dead(j, ids, args.destination) if ids else []
        n = await (j.retry_dead if retry else j.drop_dead)(ids, args.destination)
        return not_dead, n

    not_dead, n = _with_journal(cfg, act)
    for item_id, why in not_dead:
        print(f"outbox item {item_id}: {why}", file=sys.stderr)
    audit(
        cfg,
        "dead_letters.retry" if retry else "dead_letters.drop",
        count=n,
        ids=",".join(map(str, ids)) if ids else "all",
        destination=args.destination or "any",
    )
    print(f"{n} dead letter(s) {'queued again' if retry else 'dropped'}")
    return 1 if not_dead else 0


async def _not_dead(j: Any, ids: list[int], destination: str | None) -> list[tuple[int, str]]:
    """(id, why) for each named id that is not a dead letter (of ``destination``, when given)."""
    out = []
    for item_id in ids:
        item = await j.outbox_item(item_id)
        if item is None:
            out.append((item_id, "no such outbox item"))
        elif item["status"] != "dead":
            out.append((item_id, f"not a dead letter (it is {item['status']})"))
        elif destination and item["destination"] != destination:
            out.append((item_id, f"a dead letter of {item['destination']}, not of {destination}"))
    return out


def register(sub: argparse._SubParsersAction[Any]) -> None:
    d = sub.add_parser(
        "dlq",
        aliases=["dead-letters"],
        help="list, show, retry or drop outbox items that could not be delivered",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("action", choices=["list", "show", "retry", "drop"])
    d.add_argument("ids", nargs="*", help="outbox item ids (show: one; retry/drop: these, or --all)")
    d.add_argument("--config", "-c", required=True)
    d.add_argument("--destination", help="only this destination's dead letters")
    d.add_argument("--all", action="store_true", help="retry/drop: every dead letter (of --destination)")
    d.add_argument("--limit", type=int, default=100, help="list: at most this many")
    d.add_argument("--json", action="store_true", help="list/show: print JSON")
    d.set_defaults(func=cmd_dlq)
