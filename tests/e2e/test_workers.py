"""`workers = 2`: a supervisor and two gateway processes sharing the MLLP and DICOM ports (SO_REUSEPORT), one MQTT
shared subscription and one journal; signals, crash restarts, the watchdog and systemd notify through the
supervisor."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from tests.conftest import MARIADB
from tests.e2e.conftest import Daemon, MllpConnection, free_port, msa, wait_for
from tests.e2e.test_dicom_daemon import dicom_source, make_series
from tests.e2e.test_mllp_daemon import adt
from tests.e2e.test_mqtt_daemon import mqtt_source, reading
from tests.e2e.test_systemd_notify import NotifySocket
from tests.integration.dicom_helpers import need_dcmtk
from tests.integration.mqtt_helpers import BROKER, mosquitto_pub_lines, need_mosquitto, unique_topic

pytestmark = pytest.mark.slow


def worker_daemon(work: Path, workers: int = 2, **kwargs: str) -> Daemon:
    d = Daemon(work, **kwargs)  # type: ignore[arg-type]
    d.config.write_text(f"workers = {workers}\n" + d.config.read_text())
    return d


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Supervisors a test starts; killed with their workers at the end if the test left them running."""
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            for pid in worker_pids(d).values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            d.proc.kill()
            d.proc.wait(10)


def worker_pids(d: Daemon) -> dict[int, int]:
    """The current pid of each worker, from the supervisor's log."""
    return {int(i): int(pid) for i, pid in re.findall(r"Worker (\d+) started \(pid (\d+)\)", d.log())}


def per_worker(d: Daemon, name: str, labels: str = "") -> dict[str, float]:
    """A metric's value per ``worker`` label from the supervisor's merged /metrics, for the samples that carry
    ``labels`` (``source="x",code="AA"``, in any order)."""
    want = set(re.findall(r'\w+="[^"]*"', labels))
    out: dict[str, float] = {}
    for found, value in re.findall(rf"^{re.escape(name)}{{(.*)}} (\S+)$", d.metrics(), re.M):
        have = set(re.findall(r'\w+="[^"]*"', found))
        worker = re.search(r'worker="(\d+)"', found)
        if worker and want <= have:
            out[worker.group(1)] = float(value)
    return out


def control_ids(d: Daemon) -> dict[str, int]:
    sql = "SELECT control_id, count(*) FROM messages WHERE source = 'mllp-e2e' GROUP BY control_id"
    if d.journal_url.startswith("mysql"):
        conn = pymysql.connect(**MARIADB, database=d.journal_url.rsplit("/", 1)[1])
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return {str(k): int(n) for k, n in cur.fetchall()}
        finally:
            conn.close()
    with contextlib.closing(sqlite3.connect(d.journal_path)) as db:
        return dict(db.execute(sql).fetchall())


class Senders:
    """MLLP senders as real ones behave: wait for each ACK, resend after AE or a lost connection (reconnecting)."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.acked: dict[str, str] = {}
        self.stop = threading.Event()
        self.reconnects = 0
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(count)]
        for t in self.threads:
            t.start()

    def _run(self, k: int) -> None:
        n, conn = 0, None
        try:
            while not self.stop.is_set():
                msg, cid, mrn = adt(n, k)
                try:
                    if conn is None:
                        conn = MllpConnection(self.port, timeout=10)
                    code, _ = msa(conn.send(msg))
                except (OSError, ConnectionError):
                    if conn is not None:
                        conn.close()
                        conn = None
                    self.reconnects += 1
                    time.sleep(0.05)
                    continue
                if code == "AA":
                    self.acked[cid] = mrn
                    n += 1
                else:
                    time.sleep(0.05)
        finally:
            if conn is not None:
                conn.close()

    def until(self, acked: int, timeout: float = 60.0) -> None:
        wait_for(f"{acked} acknowledged messages", lambda: len(self.acked) >= acked, timeout)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


@pytest.mark.parametrize("database", ["sqlite", "mariadb"])
def test_two_workers_share_the_mllp_port_and_store_every_acknowledged_message_once(
    tmp_path: Path, daemons: list[Daemon], database: str, request: pytest.FixtureRequest
) -> None:
    url = str(request.getfixturevalue("mariadb_url")) if database == "mariadb" else None
    d = worker_daemon(tmp_path, **({"journal_url": url} if url else {}))
    daemons.append(d)
    d.start(timeout=120)
    # Each connection is one sender; the kernel hashes connections over the two listening sockets, so 16 of
    # them land on both workers (all on one: a chance of 2 in 65,536).
    senders = Senders(d.mllp_port, 16)
    senders.until(800)
    senders.finish()
    accepted = per_worker(d, "gateway_connections_total", 'source="mllp-e2e"')
    assert sorted(accepted) == ["0", "1"] and all(n > 0 for n in accepted.values()), accepted
    acks = per_worker(d, "gateway_acks_total", 'source="mllp-e2e",code="AA"')
    assert sum(acks.values()) == len(senders.acked)
    stored = control_ids(d)
    assert all(stored.get(cid) == 1 for cid in senders.acked)
    assert sum(stored.values()) == len(senders.acked)
    if url is None:
        d.wait_delivered(60)  # worker 0 delivers what either worker committed
    assert d.stop() == 0
    assert d.log().count("The gateway has stopped.") == 2  # both workers drained


def test_kill_9_of_a_worker_mid_stream_restarts_it_and_loses_nothing(tmp_path: Path, daemons: list[Daemon]) -> None:
    d = worker_daemon(tmp_path)
    daemons.append(d)
    d.start(timeout=120)
    senders = Senders(d.mllp_port, 8)
    senders.until(300)
    victim = worker_pids(d)[1]
    os.kill(victim, signal.SIGKILL)
    wait_for("the restarted worker", lambda: d.log().count("Worker 1 is ready.") == 2, 120)
    assert worker_pids(d)[1] != victim
    wait_for("readiness", d.healthy)
    done = len(senders.acked)
    senders.until(done + 300)  # the senders reconnect and go on
    senders.finish()
    assert "Worker 1 exited unexpectedly (killed by SIGKILL); restarting it" in d.log()
    assert re.search(r'^gateway_worker_restarts_total{worker="1"} 1\.0$', d.metrics(), re.M)
    stored = control_ids(d)
    missing = [cid for cid in senders.acked if cid not in stored]
    assert not missing, f"{len(missing)} acknowledged messages are not in the journal, e.g. {missing[:5]}"
    twice = [cid for cid, n in stored.items() if n > 1]
    assert not twice, f"stored more than once: {twice[:5]}"
    d.wait_delivered(60)
    assert d.stop() == 0


def test_sighup_reloads_the_rules_in_every_worker(tmp_path: Path, daemons: list[Daemon]) -> None:
    d = worker_daemon(tmp_path)
    daemons.append(d)
    d.start(timeout=120)
    assert per_worker(d, "gateway_rules_serial") == {"0": 1.0, "1": 1.0}
    d.write_rules()  # serial 2, signed
    d.reload()
    wait_for("serial 2 in both workers", lambda: per_worker(d, "gateway_rules_serial") == {"0": 2.0, "1": 2.0})
    reloads = per_worker(d, "gateway_rules_reloads_total", 'result="ok"')
    assert reloads == {"0": 1.0, "1": 1.0}, reloads
    assert d.proc is not None and d.proc.poll() is None and d.healthy()

    # The supervisor killed outright: its workers get SIGTERM from the kernel (parent-death signal) and drain,
    # so no orphan keeps the shared port.
    pids = worker_pids(d)
    d.kill()
    wait_for("the workers to exit", lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids.values()), 30)
    assert d.log().count("The gateway has stopped.") == 2


def test_notify_ready_after_every_worker_watchdog_kills_a_stuck_worker_and_stopping_on_sigterm(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    d = worker_daemon(tmp_path)
    daemons.append(d)
    try:
        d.start(timeout=120, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"})
        ready = notify.wait_for("READY")
        log = d.log()
        assert log.index("Worker 1 is ready.") < log.index("is ready with 2 workers")
        assert d.proc is not None and ready.get("MAINPID") == str(d.proc.pid)  # NotifyAccess=main holds
        notify.wait_for("WATCHDOG", timeout=5)

        # A worker whose event loop is stuck (here: stopped) stops pinging; the supervisor kills and restarts it.
        stuck = worker_pids(d)[0]
        os.kill(stuck, signal.SIGSTOP)
        wait_for("the stuck worker replaced", lambda: worker_pids(d)[0] != stuck, 60)
        assert "Worker 0 stopped answering its watchdog" in d.log()
        wait_for("readiness", d.healthy, 120)
        notify.received.clear()
        notify.wait_for("WATCHDOG", timeout=5)  # every worker pings again, so the supervisor does too

        d.proc.send_signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING", timeout=10)["STOPPING"] == "1"
        assert d.proc.wait(60) == 0
        assert not [f for _, f in notify.received if "MAINPID" in f and f["MAINPID"] != str(d.proc.pid)]
    finally:
        notify.close()


def test_a_port_taken_without_sharing_stops_the_supervisor_and_a_single_daemon_cannot_share(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    # A plain listener (no SO_REUSEPORT) on the port: worker 0 cannot bind, the supervisor exits 2.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    (tmp_path / "w").mkdir()
    d = worker_daemon(tmp_path / "w")
    d.config.write_text(d.config.read_text().replace(f"port = {d.mllp_port}\n", f"port = {port}\n"))
    code, out = d.start_refused(timeout=120)
    blocker.close()
    assert code == 2, out
    assert "cannot listen on 127.0.0.1" in out and "Worker 0 could not start (exit status 2)" in out

    # A listener that shares (as a worker's does): a single daemon, which does not set SO_REUSEPORT, is refused.
    sharing = socket.socket()
    sharing.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sharing.bind(("127.0.0.1", 0))
    sharing.listen()
    (tmp_path / "s").mkdir()
    single = Daemon(tmp_path / "s")
    taken = sharing.getsockname()[1]
    single.config.write_text(single.config.read_text().replace(f"port = {single.mllp_port}\n", f"port = {taken}\n"))
    code, out = single.start_refused(timeout=60)
    sharing.close()
    assert code == 2 and "cannot listen on 127.0.0.1" in out, out


def test_two_workers_share_the_dicom_port(tmp_path: Path, daemons: list[Daemon]) -> None:
    need_dcmtk()
    port = free_port()
    d = worker_daemon(tmp_path, source_extra=dicom_source(port))
    daemons.append(d)
    d.start(timeout=120)
    files = make_series(tmp_path / "series", 8)
    for f in files:  # one association per file, as dcmtk does with one storescu per file
        done = subprocess.run(
            ["storescu", "-aec", "GATEWAY", "127.0.0.1", str(port), str(f)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
    with contextlib.closing(sqlite3.connect(d.journal_path)) as db:
        # Instances only: study summaries (dicom-study|...) follow whenever the study has been quiet a second.
        rows = db.execute("SELECT dedup_key FROM messages WHERE dedup_key LIKE 'dicom|%'").fetchall()
    assert len(rows) == len({k for (k,) in rows}) == len(files), rows
    assert sum(per_worker(d, "gateway_connections_total", 'source="dicom-e2e"').values()) == len(files)
    assert d.stop() == 0


def test_two_workers_share_one_mqtt_subscription_and_store_each_reading_once(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    need_mosquitto()
    n = 400
    topic = unique_topic()
    src = mqtt_source(BROKER[1], topic, f"gw-workers-{os.getpid()}", shared_group='"workers-e2e"')
    d = worker_daemon(tmp_path, source_extra=src)
    daemons.append(d)
    d.start(timeout=120)
    both = {"0": 1.0, "1": 1.0}
    wait_for("both subscriptions", lambda: per_worker(d, "gateway_mqtt_connected", 'source="mqtt-e2e"') == both)
    mosquitto_pub_lines(f"{topic}/bed-3", [reading(i, "bed-3") for i in range(n)])

    def stored() -> list[str]:
        with contextlib.closing(sqlite3.connect(d.journal_path)) as db:
            return [k for (k,) in db.execute("SELECT dedup_key FROM messages WHERE source = 'mqtt-e2e'")]

    wait_for("every reading committed", lambda: len(stored()) >= n)
    received = per_worker(d, "gateway_received_total", 'source="mqtt-e2e"')
    assert sum(received.values()) == n and all(v > 0 for v in received.values()), received
    assert sorted(stored()) == sorted(f"mqtt|bed-3|r-{i}" for i in range(n))
    assert d.stop() == 0
