"""docs/examples/haproxy.cfg as shipped: valid for HAProxy, and, with only its addresses changed, in front of two
gateway instances on one MariaDB: it spreads MLLP connections over both, takes a killed instance out of rotation
by its /readyz health check, sends new connections to the survivor, and takes the instance back once restarted."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.conftest import REPO, need_service
from tests.e2e.conftest import Daemon, MllpConnection, free_port, msa, wait_for
from tests.e2e.test_mllp_daemon import adt

EXAMPLE = REPO / "docs" / "examples" / "haproxy.cfg"


def haproxy() -> str:
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if path is None:
        need_service("haproxy", "the haproxy binary is not installed (.ci/services installs Debian's)")
        raise AssertionError("unreachable")
    return path


def test_the_example_config_is_valid_for_haproxy() -> None:
    done = subprocess.run([haproxy(), "-c", "-f", str(EXAMPLE)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Configuration file is valid" in done.stdout + done.stderr


def replace_once(text: str, old: str, new: str) -> str:
    """The example must still contain ``old``: if it changes shape, this test has to follow it."""
    assert text.count(old) == 1, f"{old!r} is not in the example once"
    return text.replace(old, new)


class Balancer:
    def __init__(self, workdir: Path, daemons: list[Daemon], dicom_ports: list[int]) -> None:
        self.mllp_port, self.dicom_port = free_port(), free_port()
        self.admin = workdir / "admin.sock"
        cfg = EXAMPLE.read_text()
        cfg = replace_once(cfg, "stats socket /run/haproxy/admin.sock", f"stats socket {self.admin}")
        cfg = replace_once(cfg, "bind :2575", f"bind 127.0.0.1:{self.mllp_port}")
        cfg = replace_once(cfg, "bind :11112", f"bind 127.0.0.1:{self.dicom_port}")
        for i, (d, dicom) in enumerate(zip(daemons, dicom_ports, strict=True)):
            host = f"10.0.0.{11 + i}"
            # Each instance's own telemetry port for the health check (the example's hosts all use 9102).
            check = f"check port {d.http_port}"
            cfg = replace_once(
                cfg, f"server gw{i + 1} {host}:2575", f"server gw{i + 1} 127.0.0.1:{d.mllp_port} {check}"
            )
            cfg = replace_once(cfg, f"server gw{i + 1} {host}:11112", f"server gw{i + 1} 127.0.0.1:{dicom} {check}")
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(cfg)
        self.log = workdir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([haproxy(), "-db", "-f", str(self.config)], stdout=log, stderr=log)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def status(self, backend: str) -> dict[str, str]:
        """Server name -> UP / DOWN / ..., from the runtime API's `show stat`."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.admin))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        out = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == backend and row.get("svname") not in ("FRONTEND", "BACKEND"):
                out[row["svname"]] = row["status"].split()[0]
        return out


def received(d: Daemon) -> float:
    for line in d.metrics().splitlines():
        if line.startswith('gateway_received_total{source="mllp-e2e"}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def cleanup() -> Iterator[list[Daemon | Balancer]]:
    things: list[Daemon | Balancer] = []
    yield things
    for t in things:
        if isinstance(t, Balancer):
            t.stop()
        elif t.proc is not None and t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait(10)


@pytest.mark.slow
@pytest.mark.mariadb
def test_the_example_balances_two_instances_and_routes_around_a_killed_one(
    tmp_path: Path, mariadb_url: str, cleanup: list[Daemon | Balancer]
) -> None:
    haproxy()
    daemons, dicom_ports = [], []
    for i in range(2):
        work = tmp_path / f"gw{i}"
        work.mkdir()
        dicom_ports.append(free_port())
        dicom = (
            f'[[sources]]\ntype = "dicom"\nname = "dicom-e2e"\nhost = "127.0.0.1"\nport = {dicom_ports[i]}\n'
            'storage_dir = "dicom"\n'
        )
        daemons.append(Daemon(work, journal_url=mariadb_url, source_extra=dicom))
    cleanup.extend(daemons)
    for d in daemons:
        d.start()
    lb = Balancer(tmp_path, daemons, dicom_ports)
    cleanup.append(lb)
    lb.start()
    wait_for(
        "both instances up in HAProxy", lambda: lb.status("gw_mllp") == {"gw1": "UP", "gw2": "UP"}, ignore=(OSError,)
    )

    def send_through_balancer(first: int, n: int, connections: int) -> None:
        conns = [MllpConnection(lb.mllp_port) for _ in range(connections)]
        try:
            for k in range(first, first + n):
                msg, cid, _ = adt(k, 41)
                assert msa(conns[k % connections].send(msg)) == ("AA", cid)
        finally:
            for c in conns:
                c.close()

    # leastconn: four connections open at once go two and two.
    send_through_balancer(0, 20, 4)
    assert [received(d) for d in daemons] == [10.0, 10.0]

    # A DICOM association through the balancer reaches an instance (C-ECHO).
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", lb.dicom_port, ae_title="GATEWAY")
    try:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()

    daemons[0].kill()
    wait_for(
        "the killed instance marked down by its health check",
        lambda: lb.status("gw_mllp")["gw1"] == "DOWN",
        ignore=(OSError,),
    )
    send_through_balancer(20, 20, 4)  # every new connection lands on the survivor
    assert received(daemons[1]) == 30.0

    daemons[0].start()
    wait_for("the restarted instance back in rotation", lambda: lb.status("gw_mllp")["gw1"] == "UP", ignore=(OSError,))
    send_through_balancer(40, 8, 4)  # the restarted instance has no connections: leastconn fills it first
    assert received(daemons[0]) > 0

    import pymysql

    from tests.conftest import MARIADB

    conn = pymysql.connect(**MARIADB, database=mariadb_url.rsplit("/", 1)[1])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT control_id, count(*) FROM messages GROUP BY control_id")
            rows = dict(cur.fetchall())
    finally:
        conn.close()
    assert rows == {f"S41-{k}": 1 for k in range(48)}
    for d in daemons:
        assert d.stop() == 0
