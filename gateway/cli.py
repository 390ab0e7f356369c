"""The ``gateway`` command: run the daemon, check a config, migrate, send test messages, look inside."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.exc import SQLAlchemyError

from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError, GatewayError

log = logging.getLogger("gateway")


def _setup_logging(level: str, fmt: str, log_phi: bool = False) -> None:
    """One line per event on stdout (journald's stream under systemd)."""
    from gateway import telemetry

    telemetry.log_phi = log_phi
    handler = logging.StreamHandler(sys.stdout)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("alembic", "aiosqlite", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class _JsonFormatter(logging.Formatter):
    _skip = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in self._skip:
                doc[k] = v if isinstance(v, str | int | float | bool) or v is None else str(v)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def _load(path: str) -> tuple[GatewayConfig, Path]:
    cfg = load_config(path)
    return cfg, Path(path).resolve().parent


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


# -- commands -------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    cfg, base = _load(args.config)
    _setup_logging(cfg.telemetry.log_level, cfg.telemetry.log_format, cfg.telemetry.log_phi)
    from gateway.app import Gateway

    async def main() -> None:
        gw = Gateway(cfg, base, Path(args.config))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # systemctl reload sends SIGHUP, whose default action would end the process. Reloading the rule set
        # atomically comes with signed rules (issue #6); until then a reload changes nothing and says so.
        loop.add_signal_handler(
            signal.SIGHUP,
            lambda: log.warning("SIGHUP received: reloading is not supported yet; restart to apply changes."),
        )
        await gw.run(stop)

    _run_loop(main())
    return 0


def cmd_deliver(args: argparse.Namespace) -> int:
    """The delivery child process, started by `gateway run` (not meant to be run by hand)."""
    cfg, base = _load(args.config)
    _setup_logging(cfg.telemetry.log_level, cfg.telemetry.log_format, cfg.telemetry.log_phi)
    from gateway.deliveryproc import serve_child

    _run_loop(serve_child(Path(args.config), base))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg, base = _load(args.config)
    from gateway.rules import load_rules

    load_rules(cfg.rules_path(base))
    print("OK")
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    cfg, base = _load(args.config)
    _setup_logging("INFO", "text")
    from gateway.journal import Journal
    from gateway.rules import load_rules

    rules = load_rules(cfg.rules_path(base))

    async def main() -> None:
        j = Journal(cfg.journal.url)
        await j.open()
        await j.close()
        print("journal: up to date")
        for name, dest in rules.destinations.items():
            sink = dest.build(name)
            await sink.start()
            await sink.close()
            print(f"destination {name}: up to date")

    asyncio.run(main())
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    """Send HL7 files over MLLP, one message per file (LF or CRLF converted to CR), and print each ACK."""
    from adapters.mllp.framing import Deframer, frame
    from gateway.hl7v2.parse import parse

    worst = 0
    tally: dict[str, int] = {}
    total = len(args.files)
    progress = total > 1 and sys.stderr.isatty()
    with socket.create_connection((args.host, args.port), timeout=args.timeout) as sock:
        deframer = Deframer(16 * 1024 * 1024)
        for n, name in enumerate(args.files, 1):
            data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
            if data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            data = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r").strip(b"\r") + b"\r"
            sock.sendall(frame(data))
            acks: list[bytes | Any] = []
            while not acks:
                chunk = sock.recv(65536)
                if not chunk:
                    print(f"{name}: connection closed before an ACK", file=sys.stderr)
                    return 1
                acks = deframer.feed(chunk)
            ack = parse(acks[0])
            msa = ack.first("MSA")
            code = msa.get(1) if msa else "??"
            text = msa.get(3) if msa else ""
            err = ack.first("ERR")
            detail = f" ERR {err.get(3, 1) or err.get(1, 4, 1)}" if err else ""
            tally[code] = tally.get(code, 0) + 1
            if not args.quiet:
                print(f"{name}: {code} {msa.get(2) if msa else ''}{(' ' + text) if text else ''}{detail}")
            if progress:
                counts = " ".join(f"{k}={v}" for k, v in sorted(tally.items()))
                print(f"\r[{n}/{total}] {counts}", end="", file=sys.stderr, flush=True)
            if code not in ("AA", "CA"):
                worst = 1
    if total > 1:
        counts = " ".join(f"{k}={v}" for k, v in sorted(tally.items()))
        print(f"{chr(13) if progress else ''}sent {total} message(s): {counts}", file=sys.stderr)
    return worst


def cmd_resources(args: argparse.Namespace) -> int:
    cfg, base = _load(args.config)
    from adapters.sqlstore.config import SqlStoreConfig
    from gateway.rules import load_rules

    rules = load_rules(cfg.rules_path(base))
    stores = [(n, d) for n, d in rules.destinations.items() if isinstance(d, SqlStoreConfig)]
    if args.destination:
        stores = [(n, d) for n, d in stores if n == args.destination]
    if not stores:
        raise ConfigError("no sql_store destination in the rule set")
    name, dest = stores[0]

    async def main() -> list[dict[str, Any]]:
        sink = dest.build(name)
        await sink.start()
        try:
            return await sink.read(args.type, args.limit)
        finally:
            await sink.close()

    for doc in asyncio.run(main()):
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def cmd_messages(args: argparse.Namespace) -> int:
    cfg, _ = _load(args.config)
    from sqlalchemy import select

    from gateway.journal import Journal
    from gateway.journal.schema import messages

    async def main() -> list[Any]:
        j = Journal(cfg.journal.url)
        await j.open(migrate_schema=False)
        try:
            assert j.db is not None
            stmt = (
                select(
                    messages.c.id,
                    messages.c.received_at,
                    messages.c.source,
                    messages.c.peer,
                    messages.c.message_type,
                    messages.c.control_id,
                    messages.c.status,
                    messages.c.error,
                )
                .order_by(messages.c.id.desc())
                .limit(args.limit)
            )
            if args.status:
                stmt = stmt.where(messages.c.status == args.status)
            return await j.db.read(lambda conn: list(conn.execute(stmt)))
        finally:
            await j.close()

    for r in asyncio.run(main()):
        print(
            f"{r.id}  {r.received_at:%Y-%m-%d %H:%M:%S}  {r.source:<12} {r.message_type:<10} "
            f"{r.control_id:<20} {r.status:<11} {r.error or ''}"
        )
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    cfg, _ = _load(args.config)
    from gateway.journal import Journal

    async def main() -> int:
        j = Journal(cfg.journal.url)
        await j.open(migrate_schema=False)
        try:
            if args.action == "retry":
                n = await j.retry_dead([int(i) for i in args.ids] if args.ids else None)
                if cfg.audit_log:
                    from gateway.audit import AuditLog, operator

                    AuditLog(Path(cfg.audit_log)).append(
                        "dead_letters.retry", f"operator:{operator()}", count=n, ids=",".join(args.ids) or "all"
                    )
                print(f"{n} dead letter(s) queued again")
                return 0
            for r in await j.dead_letters(args.destination, args.limit):
                print(
                    f"{r['id']}  {r['destination']:<12} {r['message_id']}  {r['message_type']:<10} "
                    f"attempts={r['attempts']}  {r['last_error']}"
                )
            return 0
        finally:
            await j.close()

    return asyncio.run(main())


def cmd_status(args: argparse.Namespace) -> int:
    """Journal and outbox at a glance, as a table or as JSON (for scripts and monitoring)."""
    cfg, base = _load(args.config)
    from gateway.journal import Journal
    from gateway.rules import load_rules

    names = list(load_rules(cfg.rules_path(base)).destinations)

    async def main() -> dict[str, Any]:
        j = Journal(cfg.journal.url)
        await j.open(migrate_schema=False)
        try:
            counts = await j.counts()
            outbox = await j.outbox_state()
        finally:
            await j.close()
        return {
            "journal": cfg.journal.url.split("@")[-1],  # never print a password
            "messages": {k.split(".", 1)[1]: v for k, v in counts.items() if k.startswith("messages.")},
            "outbox": {k.split(".", 1)[1]: v for k, v in counts.items() if k.startswith("outbox.")},
            "destinations": {
                d: {"pending": n, "oldest_seconds": round(age, 1)}
                for d, (n, age) in {name: outbox.get(name, (0, 0.0)) for name in names}.items()
            },
        }

    state = asyncio.run(main())
    if args.json:
        sys.stdout.write(orjson.dumps(state, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    print(f"journal      {state['journal']}")
    print("messages     " + ("  ".join(f"{k}={v}" for k, v in sorted(state["messages"].items())) or "none"))
    print("outbox       " + ("  ".join(f"{k}={v}" for k, v in sorted(state["outbox"].items())) or "empty"))
    for dest, d in sorted(state["destinations"].items()):
        print(f"  {dest:<12} pending={d['pending']}  oldest={d['oldest_seconds']}s")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from gateway.audit import verify

    verdict = verify(Path(args.file))
    if verdict.ok:
        print(f"OK: {verdict.records} record(s), the chain is intact")
        return 0
    print(f"BROKEN at line {verdict.line}: {verdict.reason} ({verdict.records} record(s) before it are intact)")
    return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gateway",
        description=__doc__,
        epilog="Exit codes: 0 success; 1 failure (a message not accepted, a database or network error, a broken "
        "audit chain); 2 configuration error or bad usage; 130 interrupted.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the daemon")
    r.add_argument("--config", "-c", required=True)
    r.set_defaults(func=cmd_run)

    dl = sub.add_parser("deliver", help="the delivery process (started by `gateway run`)")
    dl.add_argument("--config", "-c", required=True)
    dl.set_defaults(func=cmd_deliver)

    c = sub.add_parser("check-config", help="validate a config file and its rule set; prints OK or the first error")
    c.add_argument("config")
    c.set_defaults(func=cmd_check_config)

    db = sub.add_parser("db", help="database maintenance")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    up = dbsub.add_parser("upgrade", help="apply migrations to the journal and to SQL destinations")
    up.add_argument("--config", "-c", required=True)
    up.set_defaults(func=cmd_db_upgrade)

    s = sub.add_parser("send", help="send HL7 v2 files over MLLP and print the ACKs")
    s.add_argument("files", nargs="+", help="files with one message each ('-' for stdin)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=2575)
    s.add_argument("--timeout", type=float, default=30.0)
    s.add_argument("--quiet", "-q", action="store_true", help="no line per file, only the summary")
    s.set_defaults(func=cmd_send)

    res = sub.add_parser("resources", help="print FHIR resources from the SQL resource store")
    res.add_argument("--config", "-c", required=True)
    res.add_argument("--type", help="resource type, e.g. Patient")
    res.add_argument("--destination", help="which sql_store destination (default: the first)")
    res.add_argument("--limit", type=int, default=20)
    res.set_defaults(func=cmd_resources)

    m = sub.add_parser("messages", help="list journaled messages, newest first")
    m.add_argument("--config", "-c", required=True)
    m.add_argument("--status", choices=["accepted", "not_mapped", "quarantined"])
    m.add_argument("--limit", type=int, default=20)
    m.set_defaults(func=cmd_messages)

    d = sub.add_parser("dead-letters", aliases=["dlq"], help="list or retry outbox items that could not be delivered")
    d.add_argument("action", choices=["list", "retry"])
    d.add_argument("ids", nargs="*", help="outbox item ids to retry (default: all)")
    d.add_argument("--config", "-c", required=True)
    d.add_argument("--destination")
    d.add_argument("--limit", type=int, default=100)
    d.set_defaults(func=cmd_dead_letters)
    st = sub.add_parser("status", help="messages by status, outbox depth and age per destination")
    st.add_argument("--config", "-c", required=True)
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.set_defaults(func=cmd_status)

    au = sub.add_parser("audit", help="the audit trail")
    ausub = au.add_subparsers(dest="audit_command", required=True)
    av = ausub.add_parser("verify", help="check the hash chain of an audit file; exit 1 when it is broken")
    av.add_argument("file")
    av.set_defaults(func=cmd_audit_verify)

    from gateway.commands import register_all

    register_all(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None) or exc
        print(
            f"error: database: {str(orig).splitlines()[0]} (is the journal URL right? try `gateway db upgrade`)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
