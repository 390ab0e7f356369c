"""``gateway replay``: run stored messages through normalise and routing again, with the current rules.

The fix-and-replay workflow: a message was quarantined (a mapping bug, an unsupported variant) or routed the
wrong way; the mapping or the rule set is fixed; ``gateway replay`` re-reads the message's raw bytes from the
journal, prepares it exactly as the daemon would now (the same Pipeline as gateway/app.py builds, with the
verified rule set) and stores the outcome over the message's row: status, header facts, bundle, reason. The
destinations the current routes pick get a new outbox item (one that still has an item pending gets none), so
the running daemon delivers the replayed messages. The dedup key and the raw bytes are left as they are.

Pick one message by id, or the messages of one source received in a time range (``--since``/``--until``,
ISO 8601, UTC when no offset is given). ``--dry-run`` tells what would happen and writes nothing. A long
replay reports its progress on stderr. The replay is recorded in the audit trail.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from gateway.commands.dlq import audit
from gateway.config import load_config
from gateway.errors import ConfigError

PAGE = 200


def _when(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"{name}: not an ISO 8601 date or time: {value!r}") from None
    return (t.astimezone(UTC) if t.tzinfo else t).replace(tzinfo=None)


def cmd_replay(args: argparse.Namespace) -> int:
    if bool(args.message_id) == bool(args.source):
        raise ConfigError("name one message id, or --source (with --since/--until) for a range")
    if args.message_id and (args.since or args.until):
        raise ConfigError("--since and --until select a range of --source, not a single message")
    since, until = _when(args.since, "--since"), _when(args.until, "--until")
    cfg = load_config(args.config)
    base = Path(args.config).resolve().parent
    from gateway.crypto import load_keyring
    from gateway.journal import Journal
    from gateway.normalisers import build_normalisers
    from gateway.pipeline import Pipeline
    from gateway.rules import load_rule_set

    loaded = load_rule_set(cfg, base)  # every check the daemon makes: a replay never uses unverified rules
    progress = args.progress or (args.progress is None and sys.stderr.isatty())

    async def main() -> dict[str, Any]:
        journal = Journal(cfg.journal.url, keyring=load_keyring(cfg.encryption))
        await journal.open(migrate_schema=False)
        pipeline = Pipeline(
            journal,
            loaded.router,
            normalisers=build_normalisers(cfg),
            validate_fhir=cfg.normalise.validate_fhir,
        )
        statuses: Counter[str] = Counter()
        routed: Counter[str] = Counter()
        queued = 0
        done = 0
        started = last = time.monotonic()
        try:
            after = ""
            while True:
                page = await journal.replay_candidates(
                    message_id=args.message_id, source=args.source, since=since, until=until, after_id=after, limit=PAGE
                )
                if not page:
                    break
                for env in page:
                    # CPU-bound mapping runs off the loop, as the daemon does for large messages
                    record = await asyncio.to_thread(pipeline.prepare, env)
                    statuses[record.status] += 1
                    routed.update(record.destinations)
                    if args.dry_run:  # what replace() would queue: a destination with a pending item gets none
                        queued += len(set(record.destinations) - await journal.pending_destinations(env.id))
                    else:
                        queued += await journal.replace(record)
                    done += 1
                    if progress and time.monotonic() - last >= 1.0:
                        last = time.monotonic()
                        rate = done / max(1e-9, last - started)
                        print(
                            f"\rreplayed {done} message(s), {rate:.0f}/s, {queued} item(s) queued",
                            end="",
                            file=sys.stderr,
                            flush=True,
                        )
                after = page[-1].id
                if args.message_id:
                    break
        finally:
            await journal.close()
        if progress and done:
            print(file=sys.stderr)
        return {
            "replayed": done,
            "dry_run": bool(args.dry_run),
            "statuses": dict(statuses),
            "routed": dict(routed),
            "queued": queued,
            "rules_serial": loaded.serial,
        }

    summary = asyncio.run(main())
    if args.message_id and summary["replayed"] == 0:
        print(f"error: message {args.message_id} is not in the journal", file=sys.stderr)
        return 1
    if not args.dry_run and summary["replayed"]:
        audit(
            cfg,
            "messages.replay",
            count=summary["replayed"],
            queued=summary["queued"],
            selection=args.message_id or f"source={args.source} since={args.since or '-'} until={args.until or '-'}",
            rules_serial=loaded.serial,
        )
    if args.json:
        sys.stdout.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    statuses = "  ".join(f"{k}={v}" for k, v in sorted(summary["statuses"].items())) or "none"
    routes = "  ".join(f"{k}={v}" for k, v in sorted(summary["routed"].items())) or "nowhere"
    verb = "would queue" if args.dry_run else "queued"
    print(
        f"replayed {summary['replayed']} message(s): {statuses}; routed to {routes}; {verb} {summary['queued']} item(s)"
    )
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    r = sub.add_parser(
        "replay",
        help="re-run normalise and routing on stored messages with the current rules",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("message_id", nargs="?", help="one message id (see `gateway messages`)")
    r.add_argument("--config", "-c", required=True)
    r.add_argument("--source", help="replay the messages of this source (with --since/--until)")
    r.add_argument("--since", help="received at or after this time (ISO 8601; UTC unless an offset is given)")
    r.add_argument("--until", help="received before this time")
    r.add_argument("--dry-run", action="store_true", help="report what would happen; write nothing")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress on stderr (default: on a tty)"
    )
    r.set_defaults(func=cmd_replay)
