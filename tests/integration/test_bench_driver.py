"""`make bench` cannot rot: the driver runs two of its steps in quick mode (conversion, and MLLP into the daemon on
SQLite with its echo floor) and must print the table and save JSON with the rows, positive figures, the floor
measured in the same run and the peak RSS of the daemon and its delivery process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.run_all import Row, gateway_role, markdown

REPO = Path(__file__).resolve().parents[2]


def test_driver_runs_a_subset_and_saves_the_table(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "bench/run_all.py", "--quick", "--only", "convert,mllp-sqlite-1w", "--mllp-seconds", "1",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| benchmark | configuration | result |" in done.stdout
    assert "| MLLP ADT^A01 | 8 senders, SQLite, 1 worker |" in done.stdout

    doc = json.loads((tmp_path / "latest.json").read_text())
    machine = doc["machine"]
    assert machine["cores"] >= 1 and machine["python"] and machine["kernel"]
    assert machine["fsync_ms_512b_append"] > 0
    assert len(machine["loadavg_before"]) == 3 and len(machine["loadavg_after"]) == 3
    assert doc["failures"] == {}
    rows = {(r["benchmark"], r["configuration"]): r for r in doc["rows"]}
    assert set(rows) == {
        ("HL7 v2 -> FHIR conversion", "ADT^A01, one core"),
        ("HL7 v2 -> FHIR conversion", "ORU^R01 10 OBX, one core"),
        ("MLLP ADT^A01", "1 sender, SQLite, 1 worker"),
        ("MLLP ADT^A01", "8 senders, SQLite, 1 worker"),
    }
    adt = rows[("HL7 v2 -> FHIR conversion", "ADT^A01, one core")]
    assert adt["result"] > 0 and adt["target"] == ">= 3,000/s" and isinstance(adt["target_met"], bool)
    for senders in ("1 sender", "8 senders"):
        r = rows[("MLLP ADT^A01", f"{senders}, SQLite, 1 worker")]
        assert r["result"] > 0 and r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"]
        assert r["peer"] == "echo floor" and r["peer_result"] > 0
        assert r["ratio"] == r["result"] / r["peer_result"]
        roles = {name for name, _ in r["rss_processes"]}
        assert roles == {"run", "deliver"}, r["rss_processes"]  # the daemon and its delivery process
        assert r["rss_sum_mb"] == sum(mb for _, mb in r["rss_processes"]) > 0
    assert (tmp_path / "latest.md").read_text().count("| MLLP ADT^A01 |") == 2


def test_a_failed_step_is_a_row_that_says_so() -> None:
    table = markdown([Row("mllp-mariadb-1w", "MariaDB is not running on 127.0.0.1:3306", None, "")])
    assert "| mllp-mariadb-1w | MariaDB is not running on 127.0.0.1:3306 | **failed** |" in table


def test_gateway_processes_are_recognised_by_command_line() -> None:
    assert gateway_role(["/usr/bin/python3", "-m", "gateway", "run", "--config", "x.toml"]) == "run"
    assert gateway_role(["/usr/bin/python3", "-m", "gateway", "deliver", "--config", "x.toml"]) == "deliver"
    assert gateway_role(["/opt/gw/bin/gateway", "run"]) == "run"
    assert gateway_role(["storescp", "--fork", "11112"]) is None
    assert gateway_role(["/usr/bin/python3", "bench/mllp_throughput.py", "--floor-server", "1"]) is None
