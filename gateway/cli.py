"""The ``gateway`` command: run the daemon, check a config, migrate, send test messages, look inside."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.exc import SQLAlchemyError

from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError, GatewayError

log = logging.getLogger("gateway")


def _setup_logging(level: str, fmt: str, log_phi: bool = False, worker: int | None = None) -> None:
    """One line per event on stdout (journald's stream under systemd); a worker of `workers = N` names itself
    (``w1`` in text, a ``worker`` field in JSON), since all workers write to the one stream."""
    from gateway import telemetry

    telemetry.log_phi = log_phi
    handler = logging.StreamHandler(sys.stdout)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        tag = "" if worker is None else f"w{worker} "
        handler.setFormatter(logging.Formatter(f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s"))
    if worker is not None:
        handler.addFilter(_WorkerField(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("alembic", "aiosqlite", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class _WorkerField(logging.Filter):
    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


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


def _tune_gc() -> None:
    """The collector's default (a collection every 700 net allocations) is made for short scripts. A daemon
    holds ~100,000 long-lived objects from its imports, which every full collection walks again, and many
    objects live for one group commit (tens of milliseconds): they survive young collections, are promoted,
    and trigger full ones. MQTT ingest measured 42 us of CPU per reading in the collector (a quarter of the
    total); with the start-up objects frozen out of collection and fewer, larger young collections, 12 us.
    Cycles are still collected, a little later."""
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed, else on asyncio's loop; freed memory is given back to the system
    once a minute meanwhile (gateway/memory.py)."""
    _tune_gc()
    try:
        import uvloop
    except ImportError:
        asyncio.run(_trimming(main))
        return
    uvloop.run(_trimming(main))


async def _trimming(main: Coroutine[Any, Any, None]) -> None:
    from gateway.memory import trim_periodically

    trimmer = asyncio.create_task(trim_periodically(), name="malloc-trim")
    try:
        await main
    finally:
        trimmer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trimmer


# -- commands -------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    cfg, base = _load(args.config)
    from gateway.worker import current_role

    role = current_role()
    _setup_logging(
        cfg.telemetry.log_level, cfg.telemetry.log_format, cfg.telemetry.log_phi, None if role is None else role.index
    )
    if cfg.workers > 1 and role is None:
        from gateway.supervisor import run_supervisor

        return run_supervisor(cfg, Path(args.config).resolve())
    if role is not None:
        from gateway.worker import follow_supervisor

        follow_supervisor()
    from gateway.app import Gateway

    async def main() -> None:
        gw = Gateway(cfg, base, Path(args.config))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        # systemctl reload sends SIGHUP, whose default action would end the process. The rule set is reloaded
        # all-or-nothing (a set that fails a check leaves the running one in place, Gateway.reload_rules); TLS
        # certificates and keys are re-read for new connections (a file that fails keeps the old certificate,
        # see gateway.tls.reload_all).
        reloads: set[asyncio.Task[bool]] = set()

        def on_sighup() -> None:
            from gateway.tls import reload_all

            errors = reload_all()
            log.warning(
                "SIGHUP received: reloading the rule set; TLS certificates reloaded (%d failed); restart to apply "
                "other changes.",
                len(errors),
            )
            task = loop.create_task(gw.reload_rules(), name="rules-reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        await gw.run(stop)
        if not gw.stopped_cleanly:
            # A journal thread or connection may still wait on the database: exit now, past the loop's and the
            # interpreter's shutdown, which would wait for it.
            logging.shutdown()
            os._exit(1)

    _run_loop(main())
    return 0


def cmd_deliver(args: argparse.Namespace) -> int:
    """The delivery child process, started by `gateway run` (not meant to be run by hand). It runs the config and
    rule set its parent hands it, not the files (``--config`` only names the daemon's in `ps`)."""
    from gateway.deliveryproc import receive_setup, serve_child

    # The parent handles SIGHUP (reload) and restarts this process when destinations change; a hangup of the
    # terminal or a SIGHUP to the whole process group must not end delivery.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        setup = receive_setup()
    except (OSError, KeyError, ValueError) as exc:
        print(f"error: no setup from the gateway process: {exc}", file=sys.stderr)
        return 2
    cfg = setup.config
    _setup_logging(cfg.telemetry.log_level, cfg.telemetry.log_format, cfg.telemetry.log_phi)
    _run_loop(serve_child(setup))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Every check the daemon makes before it binds: the config, the rule set (decrypt, signature, validation,
    rollback), the journal encryption key, and every TLS certificate, key and CA bundle the config and the rule
    set name (read and loaded as the daemon loads them)."""
    cfg, base = _load(args.config)
    from gateway.crypto import load_keyring
    from gateway.rules import load_rule_set
    from gateway.tls import ClientTLS, ServerTLS, client_context, server_context

    loaded = load_rule_set(cfg, base)
    keyring = load_keyring(cfg.encryption)
    settings = [*_tls_settings(cfg, ""), *_tls_settings(loaded.rules, "rules.")]
    for where, tls in settings:
        try:
            if isinstance(tls, ServerTLS):
                server_context(tls)
            elif isinstance(tls, ClientTLS):
                client_context(tls)
        except ConfigError as exc:
            raise ConfigError(exc.reason, where) from None
    encryption = f"encryption key {keyring.current_key_id}" if keyring is not None else "ENCRYPTION AT REST OFF"
    print(
        f"OK: rule set serial {loaded.serial}, signed by key {loaded.key_id}; {encryption}; "
        f"{len(settings)} TLS setting(s) loaded"
    )
    return 0


def _tls_settings(obj: object, path: str) -> Iterator[tuple[str, object]]:
    """(key path, setting) of every TLS setting (ServerTLS, ClientTLS) inside a config or rule set model."""
    from pydantic import BaseModel

    from gateway.tls import ClientTLS, ServerTLS

    if isinstance(obj, ServerTLS | ClientTLS):
        yield path.rstrip("."), obj
    elif isinstance(obj, BaseModel):
        for name in type(obj).model_fields:
            yield from _tls_settings(getattr(obj, name), f"{path}{name}.")
    elif isinstance(obj, list | tuple):
        for i, item in enumerate(obj):
            yield from _tls_settings(item, f"{path.rstrip('.')}[{i}].")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            yield from _tls_settings(item, f"{path}{key}.")


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    cfg, base = _load(args.config)
    _setup_logging("INFO", "text")
    from gateway.journal import Journal
    from gateway.rules import load_rule_set

    rules = load_rule_set(cfg, base).rules

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


def _connect(args: argparse.Namespace) -> socket.socket:
    """A TCP connection to the MLLP listener, over TLS when --tls, --ca or --cert is given (the server's
    certificate is verified against --ca, else the system trust store; --cert/--key for mutual TLS)."""
    from gateway.sendclients import tls_context

    ctx = tls_context(args)
    try:
        sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    except OSError as exc:
        raise ConnectionError(f"cannot connect to {args.host}:{args.port}: {exc.strerror or exc}") from None
    if ctx is None:
        return sock
    try:
        return ctx.wrap_socket(sock, server_hostname=args.server_name or args.host)
    except BaseException:
        sock.close()
        raise


def _is_tls(sock: socket.socket) -> bool:
    import ssl

    return isinstance(sock, ssl.SSLSocket)


SEND_PORTS = {"mllp": 2575, "dicom": 11112, "mqtt": 1883}


def cmd_send(args: argparse.Namespace) -> int:
    """Send files with the named protocol (mllp when the first argument names none)."""
    protocol = args.protocol
    if not args.files:
        raise ConfigError(f"gateway send {protocol}: no files given")
    if args.port is None:
        args.port = SEND_PORTS[protocol]
    if protocol == "dicom":
        from gateway.sendclients import send_dicom

        return send_dicom(args)
    if protocol == "mqtt":
        if not args.topic:
            raise ConfigError("gateway send mqtt needs --topic")
        from gateway.sendclients import send_mqtt

        return send_mqtt(args)
    return send_mllp(args)


def send_mllp(args: argparse.Namespace) -> int:
    """Send HL7 files over MLLP, one message per file (LF or CRLF converted to CR), and print each ACK."""
    from adapters.mllp.framing import Deframer, frame
    from gateway.hl7v2.parse import parse

    worst = 0
    tally: dict[str, int] = {}
    total = len(args.files)
    progress = total > 1 and sys.stderr.isatty()
    with _connect(args) as sock:
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
                    tls = (
                        " (TLS: the listener may have refused this client's certificate)"
                        if _is_tls(sock)
                        else " (is it a TLS port? then give --ca, and --cert/--key for mutual TLS)"
                    )
                    print(f"{name}: connection closed before an ACK{tls}", file=sys.stderr)
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
    from gateway.rules import load_rule_set

    rules = load_rule_set(cfg, base).rules
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
                    messages.c.meta,
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
            f"{r.control_id or _topic(r.meta):<20} {r.status:<11} {r.error or ''}"
        )
    return 0


def _topic(meta: str | None) -> str:
    """For a message without a control id (an MQTT payload that could not be read): its topic, which names
    the device that sent it."""
    try:
        topic = orjson.loads(meta or "{}").get("topic")
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    return f"topic {topic}" if isinstance(topic, str) and topic else ""


def cmd_status(args: argparse.Namespace) -> int:
    """Journal and outbox at a glance, as a table or as JSON (for scripts and monitoring)."""
    cfg, base = _load(args.config)
    from gateway.journal import Journal
    from gateway.rules import load_rule_set

    # The status is needed most when something is wrong, e.g. a rule set edited on disk but not yet signed (the
    # daemon keeps running the one it verified): then the destinations are those the journal's outbox names.
    names: list[str] | None
    rules_problem = ""
    try:
        names = list(load_rule_set(cfg, base).rules.destinations)
    except ConfigError as exc:
        names, rules_problem = None, str(exc)
        print(
            f"warning: the rule set on disk does not load ({exc}); destinations as the journal has them",
            file=sys.stderr,
        )

    async def main() -> dict[str, Any]:
        j = Journal(cfg.journal.url)
        await j.open(migrate_schema=False)
        try:
            counts = await j.counts()
            per_dest = await j.destination_state()
        finally:
            await j.close()
        empty = {"pending": 0, "retrying": 0, "oldest_seconds": 0.0, "dead": 0}
        shown = names if names is not None else sorted(per_dest)
        return {
            **({"rule_set_problem": rules_problem} if rules_problem else {}),
            "journal": cfg.journal.url.split("@")[-1],  # never print a password
            "messages": {k.split(".", 1)[1]: v for k, v in counts.items() if k.startswith("messages.")},
            "outbox": {k.split(".", 1)[1]: v for k, v in counts.items() if k.startswith("outbox.")},
            "destinations": {
                name: {
                    "pending": int(d["pending"]),
                    "retrying": int(d["retrying"]),
                    "oldest_seconds": round(d["oldest_seconds"], 1),
                    "dead": int(d["dead"]),
                }
                for name, d in ((n, per_dest.get(n, empty)) for n in shown)
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
        print(
            f"  {dest:<12} pending={d['pending']}  retrying={d['retrying']}  oldest={d['oldest_seconds']}s"
            f"  dead={d['dead']}"
        )
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
        usage="gateway [-h] COMMAND ...",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 success; 1 failure (a message not accepted, a database or network error, a broken\n"
        "audit chain); 2 configuration error or bad usage; 130 interrupted.\n"
        "`gateway COMMAND --help` shows a command's options.",
    )
    # prog: a command's usage line reads "gateway messages ...", not "gateway [-h] COMMAND ... messages ..."
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS, prog="gateway")

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

    s = sub.add_parser(
        "send",
        help="test client: send HL7 v2 (mllp), DICOM (dicom) or JSON readings (mqtt) files; prints each answer",
        usage="gateway send [mllp|dicom|mqtt] [options] FILE...",
        description="gateway send mllp FILE...: HL7 v2 over MLLP (the default when no protocol is named); "
        "gateway send dicom PATH...: C-STORE of DICOM files (directories walked); gateway send mqtt --topic T "
        "FILE...: publish at QoS 1. Exit 1 unless every file was accepted (AA, Success, PUBACK).",
    )
    s.add_argument("files", nargs="*", help="files ('-' for stdin with mllp)")
    # `gateway send dicom FILE...` arrives here as `--protocol dicom FILE...` (see main): argparse cannot take a
    # positional word, options, then more positionals.
    s.add_argument("--protocol", choices=sorted(SEND_PORTS), default="mllp", help=argparse.SUPPRESS)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, help="default: 2575 (mllp), 11112 (dicom), 1883 (mqtt)")
    s.add_argument("--called-ae", default="GATEWAY", help="dicom: the listener's AE title")
    s.add_argument("--calling-ae", default="GWSEND", help="dicom: our AE title")
    s.add_argument("--topic", help="mqtt: the topic to publish to")
    s.add_argument("--username", help="mqtt: user name")
    s.add_argument("--password", help="mqtt: password")
    s.add_argument("--timeout", type=float, default=30.0)
    s.add_argument("--quiet", "-q", action="store_true", help="no line per file, only the summary")
    s.add_argument("--tls", action="store_true", help="speak TLS (implied by --ca and --cert)")
    s.add_argument("--ca", help="PEM bundle of the CA that signed the server's certificate (default: system store)")
    s.add_argument("--cert", help="PEM client certificate, for a listener that requires one (mutual TLS)")
    s.add_argument("--key", help="PEM private key of --cert")
    s.add_argument("--server-name", help="name expected in the server's certificate (default: --host)")
    s.set_defaults(func=cmd_send)

    res = sub.add_parser("resources", help="print FHIR resources from the SQL resource store")
    res.add_argument("--config", "-c", required=True)
    res.add_argument("--type", help="resource type, e.g. Patient")
    res.add_argument("--destination", help="which sql_store destination (default: the first)")
    res.add_argument("--limit", type=int, default=20)
    res.set_defaults(func=cmd_resources)

    m = sub.add_parser("messages", help="list journaled messages, newest first")
    m.add_argument("--config", "-c", required=True)
    m.add_argument("--status", choices=["accepted", "not_mapped", "quarantined", "dropped"])
    m.add_argument("--limit", type=int, default=20)
    m.set_defaults(func=cmd_messages)

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
    p.description = (p.description or "").strip() + "\n\n" + _grouped_commands(sub)
    return p


# How `gateway --help` groups the commands; a command missing here is listed under "other".
COMMAND_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("run the daemon", ("run", "check-config", "db")),
    ("messages", ("send", "convert", "replay", "dlq")),
    ("look inside", ("status", "messages", "resources", "audit")),
    ("security", ("rules", "certs", "keys")),
)
_HIDDEN_COMMANDS = frozenset({"deliver"})  # started by `gateway run`, not by people


def _grouped_commands(sub: argparse._SubParsersAction[Any]) -> str:
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    aliases = {a.dest: a.metavar for a in sub._choices_actions}
    lines: list[str] = []
    groups = list(COMMAND_GROUPS)
    rest = tuple(n for n in helps if n not in _HIDDEN_COMMANDS and all(n not in g for _, g in COMMAND_GROUPS))
    if rest:
        groups.append(("other", rest))
    for title, names in groups:
        present = [n for n in names if n in helps]
        if not present:
            continue
        lines.append(f"{title}:")
        for n in present:
            label = str(aliases[n] or n)
            lines.append(f"  {label:<22}{helps[n]}")
        lines.append("")
    return "commands:\n\n" + "\n".join(lines).rstrip()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[0] == "send" and argv[1] in SEND_PORTS and not Path(argv[1]).exists():
        argv[1:2] = ["--protocol", argv[1]]
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
