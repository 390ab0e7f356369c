"""`make bench`: every benchmark in bench/, one table.

Runs each script as its own process with ``--json`` (so nothing here parses prose), keeps its printed output in
var/bench/<run>/<step>.log, and prints one markdown table: benchmark, configuration, result, p50/p99, the floor
or peer measured in the same run, the ratio, the issue's target (met / not met) and the peak RSS of the gateway
processes. The table and the machine facts (cores, CPU model, kernel, Python, fsync latency of the disk, load
average before and after) are saved as JSON and markdown under var/bench/.

Peak RSS is read by this driver, not by the scripts: while a step runs, a thread walks /proc every 0.2 s for
the step's descendants that are gateway processes (``python -m gateway ...``: the daemon, its delivery child,
its workers) and keeps each one's VmHWM (the kernel's own high-water mark, so a peak between two samples is
not missed while the process lives). psutil would add a dependency for three /proc reads.

    .venv/bin/python bench/run_all.py                 # about 12-20 minutes
    BENCH_QUICK=1 .venv/bin/python bench/run_all.py   # about 5 minutes, shorter runs, same rows
    .venv/bin/python bench/run_all.py --only convert,mllp-sqlite-1w --mllp-seconds 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RSS_TARGET_MB = 250.0


# -- rows --------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    benchmark: str
    configuration: str
    result: float | None
    unit: str
    p50_ms: float | None = None
    p99_ms: float | None = None
    peer: str = ""  # what the floor or peer is
    peer_result: float | None = None
    ratio: float | None = None
    target: str = ""
    target_met: bool | None = None
    rss_sum_mb: float | None = None
    rss_processes: list[tuple[str, float]] = field(default_factory=list)
    note: str = ""


def fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def markdown(rows: list[Row]) -> str:
    columns = ["benchmark", "configuration", "result", "p50 / p99 ms", "floor or peer (same run)", "ratio", "target"]
    columns.append("peak RSS MB (per process)")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        result = "**failed**" if r.result is None else f"{fmt(r.result, 1 if r.result < 100 else 0)} {r.unit}"
        lat = "-" if r.p50_ms is None else f"{r.p50_ms:.2f} / {r.p99_ms:.2f}"
        peer = r.peer if r.peer_result is None else f"{r.peer}: {fmt(r.peer_result)}"
        target = r.target
        if r.target and r.target_met is not None:
            target += ": met" if r.target_met else ": **not met**"
        rss = "-"
        if r.rss_sum_mb is not None:
            per = ", ".join(f"{name} {mb:.0f}" for name, mb in r.rss_processes)
            worst = max(mb for _, mb in r.rss_processes)
            rss = f"{r.rss_sum_mb:.0f} ({per}){'' if worst <= RSS_TARGET_MB else ' **> 250**'}"
        note = f" ({r.note})" if r.note else ""
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}" if r.ratio >= 0.1 else f"{r.ratio:.2g}"
        cells = [r.benchmark, r.configuration + note, result, lat, peer, ratio, target, rss]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- peak RSS of the gateway processes ------------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _parents() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return out


def _vmhwm_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def gateway_role(cmd: list[str]) -> str | None:
    """ "run", "deliver", ... for ``python -m gateway <command>`` (or the ``gateway`` script); else None."""
    for i, arg in enumerate(cmd):
        if (arg == "gateway" and i > 0 and cmd[i - 1] == "-m") or arg.endswith("/bin/gateway"):
            return cmd[i + 1] if i + 1 < len(cmd) else "gateway"
    return None


class PeakRss:
    """Samples the VmHWM of every gateway process below ``root`` until stopped.

    Processes are grouped by their top gateway process (one daemon with its delivery child and workers); a step
    that starts several daemons one after the other reports the group with the largest sum."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peaks: dict[int, tuple[int, str, float]] = {}  # pid -> (daemon pid, role, MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            children: dict[int, list[int]] = {}
            for pid, ppid in _parents().items():
                children.setdefault(ppid, []).append(pid)
            stack: list[tuple[int, int | None]] = [(self.root, None)]
            while stack:
                pid, daemon = stack.pop()
                role = gateway_role(_cmdline(pid))
                if role is not None:
                    # a worker is the daemon's command again below the daemon (forked or spawned)
                    name = "worker" if daemon is not None and role == "run" else role
                    mb = _vmhwm_mb(pid)
                    if mb is not None:
                        top = daemon if daemon is not None else pid
                        old = self.peaks.get(pid, (top, name, 0.0))[2]
                        self.peaks[pid] = (top, name, max(old, mb))
                    if daemon is None:
                        daemon = pid
                stack.extend((c, daemon) for c in children.get(pid, []))

    def largest(self) -> list[tuple[str, float]]:
        groups: dict[int, list[tuple[str, float]]] = {}
        for top, name, mb in self.peaks.values():
            groups.setdefault(top, []).append((name, mb))
        if not groups:
            return []
        procs = max(groups.values(), key=lambda g: sum(mb for _, mb in g))
        order = {"run": 0, "worker": 1}
        return sorted(procs, key=lambda v: (order.get(v[0], 2), v[0]))


# -- steps ---------------------------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    script: str
    args: list[str]
    rows: Callable[[dict[str, Any], list[tuple[str, float]]], list[Row]]
    note_if_missing: str = ""


def rss_fields(procs: list[tuple[str, float]]) -> dict[str, Any]:
    if not procs:
        return {}
    return {"rss_sum_mb": sum(mb for _, mb in procs), "rss_processes": procs}


def mllp_rows(journal: str, workers: int) -> Callable[[dict[str, Any], list[tuple[str, float]]], list[Row]]:
    def rows(data: dict[str, Any], procs: list[tuple[str, float]]) -> list[Row]:
        floor = {r["senders"]: r for r in data["rows"] if r["target"] == "floor"}
        out = []
        for r in data["rows"]:
            if not r["target"].startswith("gateway") or "validate" in r["target"]:
                continue
            n = r["senders"]
            target, met = "", None
            if n == 8 and workers == 2:
                want = 5000 if journal == "SQLite" else 3000
                target = f">= {want:,}/s, p99 <= 20 ms"
                met = r["rate"] >= want and r["p99"] <= 20
            out.append(
                Row(
                    "MLLP ADT^A01",
                    f"{n} sender{'s' if n > 1 else ''}, {journal}, {workers} worker{'s' if workers > 1 else ''}",
                    r["rate"],
                    "msg/s",
                    r["p50"],
                    r["p99"],
                    "echo floor",
                    floor[n]["rate"],
                    r["rate"] / floor[n]["rate"],
                    target,
                    met,
                    **rss_fields(procs),
                )
            )
        return out

    return rows


def peers_rows(data: dict[str, Any], procs: list[tuple[str, float]]) -> list[Row]:
    floor = {r["senders"]: r for r in data["rows"] if r["target"] == "floor"}
    out = []
    for r in data["rows"]:
        n = r["senders"]
        name = "MLLP peer: bare echo server" if r["target"] == "floor" else "MLLP peer: hl7apy MLLPServer"
        note = "" if r["target"] == "floor" else "a connection per message: hl7apy closes after each ACK"
        out.append(
            Row(
                name,
                f"{n} sender{'s' if n > 1 else ''}",
                r["rate"],
                "msg/s",
                r["p50"],
                r["p99"],
                "echo floor",
                floor[n]["rate"],
                r["rate"] / floor[n]["rate"],
                note=note,
            )
        )
    return out


def dicom_rows(data: dict[str, Any], procs: list[tuple[str, float]]) -> list[Row]:
    out = []
    for r in data["rows"]:
        k = r["associations"]
        ratio = r["gateway"] / r["storescp"]
        orthanc = r["orthanc"]
        peer = "storescp" + (f" {r['storescp']:,.0f}; Orthanc {orthanc:,.0f}" if orthanc else "")
        if orthanc is None:
            peer += f"; Orthanc {data.get('orthanc', 'not installed')}"
        out.append(
            Row(
                "DICOM C-STORE CT_small",
                f"{k} association{'s' if k > 1 else ''}, {data['instances']} instances, {data['workers']} "
                f"worker{'s' if data['workers'] > 1 else ''}",
                r["gateway"],
                "instances/s",
                peer=peer,
                ratio=ratio,
                target=">= 0.5 (#4), 0.6 (#10) x storescp" if k == 1 else "",
                target_met=ratio >= 0.6 if k == 1 else None,
                note=f"vs Orthanc {r['gateway'] / orthanc:.2f}" if orthanc else "",
                **rss_fields(procs),
            )
        )
    return out


def mqtt_rows(data: dict[str, Any], procs: list[tuple[str, float]]) -> list[Row]:
    w = data["workers"]
    rate = data["gateway_rate"]
    lat = "gateway_p50_ms" in data
    return [
        Row(
            "MQTT readings, PUBACK after commit",
            f"{data['readings']:,} readings, {w} worker{'s' if w > 1 else ''}",
            rate,
            "readings/s",
            data.get("gateway_p50_ms"),
            data.get("gateway_p99_ms"),
            "mosquitto_sub to a file",
            data["floor_rate"],
            rate / data["floor_rate"],
            ">= 8,000/s",
            rate >= 8000,
            note=(
                f"latency at a paced {data['latency_rate']:,.0f}/s; floor p50/p99 "
                f"{data['floor_p50_ms']:.1f} / {data['floor_p99_ms']:.1f} ms"
                if lat
                else ""
            ),
            **rss_fields(procs),
        )
    ]


def convert_rows(data: dict[str, Any], procs: list[tuple[str, float]]) -> list[Row]:
    corpus = [r["rate"] for r in data["rows"][2:]]
    note = f"corpus types {min(corpus):,.0f}-{max(corpus):,.0f} msg/s" if corpus else ""
    return [
        Row("HL7 v2 -> FHIR conversion", "ADT^A01, one core", data["adt_rate"], "msg/s", target=">= 3,000/s",
            target_met=data["adt_rate"] >= 3000, note=note),
        Row("HL7 v2 -> FHIR conversion", "ORU^R01 10 OBX, one core", data["oru10_rate"], "msg/s",
            target=">= 1,000/s", target_met=data["oru10_rate"] >= 1000),
    ]  # fmt: skip


def rules_rows(data: dict[str, Any], procs: list[tuple[str, float]]) -> list[Row]:
    floor = data["floor_us"]
    return [
        Row("Rule evaluation", f"{data['routes']} routes, no FHIRPath", data["plain_us"], "us/message",
            peer="1 route", peer_result=floor, ratio=data["plain_us"] / floor, target="<= 50 us",
            target_met=data["plain_us"] <= 50),
        Row("Rule evaluation", f"{data['routes']} routes, {data['fhirpath']} with FHIRPath", data["fhirpath_us"],
            "us/message", peer="1 route", peer_result=floor, ratio=data["fhirpath_us"] / floor),
    ]  # fmt: skip


def security_rows(data: dict[str, Any], procs: list[tuple[str, float]]) -> list[Row]:
    return [
        Row("Security: journal encryption", "8 committers, SQLite", data["journal_encrypted"], "commits/s",
            peer="clear", peer_result=data["journal_clear"], ratio=data["journal_encrypted"] / data["journal_clear"]),
        Row("Security: MLLP mutual TLS", "8 senders, instant submitter", data["mllp_tls"], "msg/s",
            peer="plain TCP", peer_result=data["mllp_plain"], ratio=data["mllp_tls"] / data["mllp_plain"]),
        Row("Security: new mutual-TLS connections", "one client", data["handshakes"], "conn/s",
            note=f"AES-256-GCM seal 1 KB {data['seal_1024_us']:.1f} us, 1 MB {data['seal_1048576_us']:.0f} us"),
    ]  # fmt: skip


def delivery_rows(db: str) -> Callable[[dict[str, Any], list[tuple[str, float]]], list[Row]]:
    def rows(data: dict[str, Any], procs: list[tuple[str, float]]) -> list[Row]:
        floor = data["floor"]
        updates = []
        if "sql_store_updates" in data:  # the same patients again: resources updated, not created
            updates.append(
                Row(
                    "Delivery: sql_store, updates",
                    f"{db}, the same {data['messages']:,} patients again",
                    data["sql_store_updates"],
                    "deliveries/s",
                )
            )
        return [
            Row("Delivery: sql_store", f"{db} journal and store, {data['messages']:,} bundles", data["sql_store"],
                "deliveries/s"),
            *updates,
            Row("Delivery: fhir_rest", f"{db} journal, {data['messages']:,} bundles", data["fhir_rest"],
                "deliveries/s", peer="plain aiohttp client", peer_result=floor, ratio=data["fhir_rest"] / floor),
        ]  # fmt: skip

    return rows


def delivery_targets(rows: list[Row]) -> None:
    """The outbox must keep up with ingest: each sql_store row against the 8-sender, 1-worker MLLP rate on the
    same journal, measured in this run."""
    ingest = {
        r.configuration.split(", ")[1]: r.result
        for r in rows
        if r.benchmark == "MLLP ADT^A01" and r.configuration.startswith("8 senders") and r.configuration.endswith(
            ", 1 worker")
    }  # fmt: skip
    for r in rows:
        db = r.configuration.split()[0]
        if r.benchmark == "Delivery: sql_store" and r.result is not None and ingest.get(db):
            r.target = f">= MLLP ingest, 8 senders, 1 worker ({ingest[db]:,.0f}/s)"
            r.target_met = r.result >= ingest[db]  # type: ignore[operator]


# -- machine --------------------------------------------------------------------------------------------------------


def machine_facts(out_dir: Path) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from bench.mllp_throughput import fsync_floor

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "host": platform.node(),
        "cores": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fsync_ms_512b_append": round(fsync_floor(out_dir), 3),
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
    }


@contextlib.contextmanager
def mariadb_database() -> Iterator[str | None]:
    """A fresh database on the local MariaDB for one step, dropped after; None when MariaDB is not running."""
    try:
        import pymysql

        conn = pymysql.connect(host="127.0.0.1", user="root", password="", connect_timeout=2)
    except Exception:
        yield None
        return
    name = f"gwbench_{secrets.token_hex(4)}"
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
        yield f"mysql+aiomysql://root:@127.0.0.1:3306/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.close()


# -- the run --------------------------------------------------------------------------------------------------------


def steps(quick: bool, mllp_seconds: float) -> list[Step]:
    q = quick
    mllp = ["--validate", "off", "--senders", "1,8", "--duration", f"{mllp_seconds:g}"]
    out = [
        Step("convert", "convert.py", ["--quick", "--targets-only"] if q else [], convert_rows),
        Step("rules", "rules_eval.py", ["--n", "5000", "--repeat", "3"] if q else [], rules_rows),
        Step("security", "security_overhead.py", ["--duration", "1" if q else "3", "--rounds", "1" if q else "3"],
             security_rows),
        Step("mllp-peers", "mllp_peers.py", ["--duration", f"{min(mllp_seconds, 5):g}"], peers_rows),
    ]  # fmt: skip
    for journal in ("sqlite", "mariadb"):
        for workers in (1, 2):
            label = "SQLite" if journal == "sqlite" else "MariaDB"
            out.append(Step(f"mllp-{journal}-{workers}w", "mllp_throughput.py", mllp, mllp_rows(label, workers)))
    out += [
        Step("dicom-1w", "dicom_store.py", ["--instances", "200" if q else "1000"], dicom_rows),
        Step("dicom-2w", "dicom_store.py", ["--instances", "200" if q else "1000", "--workers", "2", "--no-orthanc"],
             dicom_rows),
        Step("mqtt-1w", "mqtt_ingest.py", ["--readings", "5000", "--latency-seconds", "0"] if q else [], mqtt_rows),
        Step("mqtt-2w", "mqtt_ingest.py", ["--readings", "5000" if q else "20000", "--latency-seconds", "0",
             "--workers", "2"], mqtt_rows),
        Step("delivery-sqlite", "delivery.py", ["--messages", "600" if q else "3000"], delivery_rows("SQLite")),
        Step("delivery-mariadb", "delivery.py", ["--messages", "600" if q else "3000", "--db", "mariadb"],
             delivery_rows("MariaDB")),
    ]  # fmt: skip
    return out


def stop_step(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT first: the scripts stop their daemons, brokers and peers in ``finally`` on KeyboardInterrupt."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_step(step: Step, run_dir: Path, timeout: float) -> tuple[list[Row], str]:
    """Run one script; its rows, or one failed row and the reason."""
    args = list(step.args)
    needs_mariadb = "mariadb" in step.name
    with contextlib.ExitStack() as stack:
        if step.script == "mllp_throughput.py":
            # --workers and --journal-url are the MLLP script's own options (issue #10, item 1)
            args += ["--workers", step.name.rsplit("-", 1)[1].rstrip("w")]
            if needs_mariadb:
                url = stack.enter_context(mariadb_database())
                if url is None:
                    return [], "MariaDB is not running on 127.0.0.1:3306"
                args += ["--journal-url", url]
        elif needs_mariadb:
            url = stack.enter_context(mariadb_database())
            if url is None:
                return [], "MariaDB is not running on 127.0.0.1:3306"
        out_json = run_dir / f"{step.name}.json"
        log = run_dir / f"{step.name}.log"
        cmd = [sys.executable, str(BENCH / step.script), *args, "--json", str(out_json)]
        started = time.monotonic()
        with log.open("wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
            with PeakRss(proc.pid) as rss:
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    stop_step(proc)
                    return [], f"timed out after {timeout:.0f} s (log: {log})"
                except BaseException:
                    stop_step(proc)
                    raise
        elapsed = time.monotonic() - started
        if proc.returncode != 0 or not out_json.exists():
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            return [], f"exit {proc.returncode}: {tail[0][:160]} (log: {log})"
        data = json.loads(out_json.read_text())
        rows = step.rows(data, rss.largest())
        print(f"  {step.name}: {len(rows)} rows in {elapsed:.0f} s", file=sys.stderr)
        return rows, ""


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs (also BENCH_QUICK=1)")
    ap.add_argument("--only", help="comma-separated step names (see --list)")
    ap.add_argument("--list", action="store_true", help="list the steps and exit")
    ap.add_argument("--mllp-seconds", type=float, help="seconds per MLLP measurement (default 10, quick 3)")
    ap.add_argument("--out", type=Path, default=REPO / "var" / "bench", help="where the JSON and logs go")
    args = ap.parse_args()
    # SIGTERM (make interrupted, a timeout) unwinds like Ctrl-C: the running step and its daemon are stopped and
    # the step's scratch MariaDB database is dropped.
    signal.signal(signal.SIGTERM, interrupted)
    quick = args.quick or os.environ.get("BENCH_QUICK", "") not in ("", "0")
    mllp_seconds = args.mllp_seconds or (3.0 if quick else 10.0)
    plan = steps(quick, mllp_seconds)
    if args.list:
        print("\n".join(s.name for s in plan))
        return
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {s.name for s in plan}
        if unknown:
            raise SystemExit(f"unknown steps: {', '.join(sorted(unknown))}")
        plan = [s for s in plan if s.name in wanted]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = args.out / stamp
    run_dir.mkdir(parents=True)
    facts = machine_facts(run_dir)
    facts["mode"] = "quick" if quick else "full"
    facts["started"] = stamp
    print(f"bench: {len(plan)} steps, {facts['mode']} mode; logs in {run_dir}", file=sys.stderr)
    rows: list[Row] = []
    failures: dict[str, str] = {}
    for step in plan:
        step_rows, error = run_step(step, run_dir, timeout=240 if quick else 420)
        if error:
            print(f"  {step.name}: FAILED: {error}", file=sys.stderr)
            failures[step.name] = error
            rows.append(Row(step.name, error, None, ""))
        rows.extend(step_rows)
    delivery_targets(rows)
    facts["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    facts["orthanc"] = "installed" if shutil.which("Orthanc") else "not installed"
    table = markdown(rows)
    header = (
        f"{facts['cores']} cores ({facts['cpu_model']}), kernel {facts['kernel']}, Python {facts['python']}, "
        f"fsync of a 512-byte append {facts['fsync_ms_512b_append']:.2f} ms, load average "
        f"{' '.join(facts['loadavg_before'])} before / {' '.join(facts['loadavg_after'])} after, {facts['mode']} mode"
    )
    print(f"\n{header}\n\n{table}")
    doc = {"machine": facts, "rows": [asdict(r) for r in rows], "failures": failures}
    for target in (run_dir / "bench.json", args.out / "latest.json"):
        target.write_text(json.dumps(doc, indent=1))
    (args.out / "latest.md").write_text(f"{header}\n\n{table}\n")
    print(f"\nsaved {run_dir / 'bench.json'} (and {args.out / 'latest.json'})", file=sys.stderr)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
