"""Security end to end, with the daemon as a process (on uvloop): MLLP over mutual TLS with `gateway send`,
certificates reloaded on SIGHUP without dropping connections, the journal encrypted on disk, a key rotation
while the daemon serves, and every tricky corpus file answered without a crash or a hang."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gateway.commands.certs import issue
from gateway.tls import ClientTLS, PeerCertificate, client_context
from tests.conftest import corpus, hl7_for_wire
from tests.e2e.conftest import REPO, Daemon, MllpConnection, msa
from tests.e2e.test_mllp_daemon import CONVERTER, adt, with_control_id
from tests.pki import make_pki

pytestmark = pytest.mark.slow


def gateway(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def sample(metrics: str, name: str, labels: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", metrics, re.M)
    return float(m.group(1)) if m else 0.0


class TlsMllp(MllpConnection):
    """MllpConnection over TLS, with a client certificate."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.buf = b""


def test_mllp_over_mutual_tls_with_gateway_send_and_a_sighup_reload(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(pki.path("server.pem"), live / "server.pem")
    shutil.copy(pki.path("server.key"), live / "server.key")
    d = Daemon(
        tmp_path,
        source_extra=(
            "[sources.tls]\n"
            'cert = "live/server.pem"\nkey = "live/server.key"\n'  # relative to the config file
            f'client_ca = "{pki.p("ca.pem")}"\nrequire_client_cert = true\n'
            'allowed_subjects = ["CN=modality-1"]\n'
        ),
    )
    d.start()
    try:
        port = str(d.mllp_port)
        ca = ("--ca", pki.p("ca.pem"))
        ok = gateway(
            "send",
            "--port",
            port,
            *ca,
            "--cert",
            pki.p("client.pem"),
            "--key",
            pki.p("client.key"),
            "tests/data/adt_a01.hl7",
        )
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == "tests/data/adt_a01.hl7: AA MSG-QS-0001"
        for who in (None, "rogue", "expired", "client2"):  # no certificate, another CA, expired, not allowed
            args = () if who is None else ("--cert", pki.p(f"{who}.pem"), "--key", pki.p(f"{who}.key"))
            refused = gateway("send", "--port", port, *ca, *args, "tests/data/adt_a01.hl7")
            assert refused.returncode == 1, (who, refused.stdout, refused.stderr)
        plain = gateway("send", "--port", port, "tests/data/adt_a01.hl7")
        assert plain.returncode == 1
        metrics = d.metrics()
        assert sample(metrics, "gateway_tls_refused_total", 'reason="handshake-failed",source="mllp-e2e"') >= 3
        assert sample(metrics, "gateway_tls_refused_total", 'reason="not-allowed",source="mllp-e2e"') == 1

        # SIGHUP with a renewed certificate: an established connection keeps working, a new one sees the new
        # certificate.
        ctx = client_context(ClientTLS(ca=pki.p("ca.pem"), cert=pki.p("client.pem"), key=pki.p("client.key")))
        before = TlsMllp(d.mllp_port, ctx)
        msg, cid, _ = adt(1, 1)
        assert msa(before.send(msg)) == ("AA", cid)
        issue(pki.ca, "renewed", server=True, dns_names=("localhost",)).write(live / "server.pem", live / "server.key")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "TLS certificates reloaded" not in d.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        after = TlsMllp(d.mllp_port, ctx)
        der = after.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        assert der is not None and PeerCertificate.from_der(der).common_name == "renewed"
        msg, cid, _ = adt(2, 1)
        assert msa(after.send(msg)) == ("AA", cid)
        msg, cid, _ = adt(3, 1)
        assert msa(before.send(msg)) == ("AA", cid)  # the old connection was not dropped
        before.close()
        after.close()
        assert d.proc.poll() is None
    finally:
        assert d.stop() == 0, d.log()


def phi_of(messages: list[bytes]) -> set[str]:
    from gateway.hl7v2.parse import parse

    phi: set[str] = set()
    for raw in messages:
        pid = parse(raw).first("PID")
        if pid is not None:
            phi |= {pid.get(5, 1), pid.get(5, 2)}
    # MSH (application and facility names) is stored in clear on purpose, to route and list messages; a patient
    # name that is also a header value ("PROSOLV", "Test") cannot be told apart there.
    headers = b"".join(raw.partition(b"\r")[0] for raw in messages).decode("latin-1")
    return {v for v in phi if len(v) >= 4 and v not in headers}


def leaked(phi: set[str], on_disk: bytes) -> list[str]:
    """The names of ``phi`` found in ``on_disk``. Names of six letters or more are searched as they are; shorter
    ones only between the delimiters they would have in a message or a resource (|, ^, ~, quotes, space, CR): four
    given letters occur by chance about once in 4 GB of ciphertext, and the journal holds several megabytes of it,
    so a bare search for "BROS" failed once in CI on sealed, random bytes."""
    found = []
    for v in phi:
        word = re.escape(v.encode())
        pattern = word if len(v) >= 6 else rb'[|^~" \r]' + word + rb'[|^~" \r]'
        if re.search(pattern, on_disk):
            found.append(v)
    return found


def journal_bytes(d: Daemon) -> bytes:
    return b"".join(p.read_bytes() for p in d.workdir.iterdir() if p.name.startswith("journal.db"))


def test_the_journal_on_disk_holds_no_patient_name_and_a_rotation_runs_while_the_daemon_serves(
    tmp_path: Path,
) -> None:
    d = Daemon(tmp_path, encrypt=True)
    d.start()
    files = sorted(corpus(CONVERTER).glob("*.hl7"))
    sent = [with_control_id(hl7_for_wire(f.read_bytes()), f"ENC-{i:03d}") for i, f in enumerate(files)]
    conn = MllpConnection(d.mllp_port)
    codes = [msa(conn.send(m))[0] for m in sent]
    conn.close()
    assert codes.count("AA") == len(sent)
    d.wait_delivered()  # delivery opened every sealed row (the store has them in clear: it is the destination)
    phi = phi_of(sent)
    assert len(phi) > 20
    on_disk = journal_bytes(d)
    assert b"ENC-100" in on_disk  # the rows are there ...
    assert not leaked(phi, on_disk), "patient names in the journal file"  # ... sealed
    assert "ENCRYPTION AT REST IS OFF" not in d.log()
    assert d.stop() == 0

    # A new key: current in the config, the old one kept for the rows it sealed; restart, then rotate while
    # senders keep sending.
    old_id = gateway("keys", "status", "-c", str(d.config)).stdout.split(":")[0].split()[0]
    made = gateway("keys", "generate", str(tmp_path / "journal2.key"))
    assert made.returncode == 0, made.stderr
    new_id = made.stdout.strip().rsplit(" ", 1)[1]
    text = d.config.read_text().replace('key = "journal.key"', 'key = "journal2.key"\nold_keys = ["journal.key"]')
    d.config.write_text(text)
    d.start()
    stop = threading.Event()
    acked: list[str] = []

    def sender() -> None:
        c = MllpConnection(d.mllp_port)
        n = 0
        while not stop.is_set():
            msg, cid, _ = adt(n, 7)
            code, got = msa(c.send(msg))
            if code == "AA" and got == cid:
                acked.append(cid)
            n += 1
        c.close()

    t = threading.Thread(target=sender)
    t.start()
    try:
        rotated = gateway("keys", "rotate", "-c", str(d.config), "--batch", "16")
    finally:
        time.sleep(0.3)
        stop.set()
        t.join(30)
    assert rotated.returncode == 0, rotated.stderr
    assert f"with key {new_id}" in rotated.stderr
    assert len(acked) > 0
    status = gateway("keys", "status", "-c", str(d.config))
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip() == f"{new_id} (current): {len(sent) + len(acked)} message(s)", status.stdout
    assert old_id != new_id
    d.wait_delivered()
    assert d.proc is not None and d.proc.poll() is None
    assert d.stop() == 0
    # Still no patient name on disk after the re-sealing (the rotation itself is covered row by row in
    # tests/integration/test_journal_encryption.py, where the old key alone no longer opens anything).
    on_disk = journal_bytes(d)
    assert not leaked(phi, on_disk)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_every_tricky_corpus_file_is_answered_or_closed_never_a_crash_or_hang(daemon: Daemon) -> None:
    tricky = sorted(p for p in corpus("hl7v2/tricky").iterdir() if p.is_file())
    assert len(tricky) >= 39
    daemon.start()
    assert daemon.proc is not None
    rss_start = rss_kib(daemon.proc.pid)
    outcomes: dict[str, str] = {}
    for rounds in range(3):  # three passes: memory must not grow with repetition
        for f in tricky:
            for variant, data in (("raw", f.read_bytes()), ("wire", hl7_for_wire(f.read_bytes()))):
                conn = MllpConnection(daemon.mllp_port, timeout=15)
                try:
                    code, _ = msa(conn.send(data))
                except (TimeoutError, ConnectionError) as exc:
                    code = "closed" if isinstance(exc, ConnectionError) else "HANG"
                except AssertionError:
                    code = "no-MSA"
                finally:
                    conn.close()
                outcomes[f"{f.name}:{variant}"] = code
                assert daemon.proc.poll() is None, f"the daemon died on {f.name} ({variant}):\n{daemon.log()[-3000:]}"
        if rounds == 0:
            rss_first = rss_kib(daemon.proc.pid)
    assert set(outcomes.values()) <= {"AA", "AE", "AR", "CA", "CE", "CR", "closed"}, {
        k: v for k, v in outcomes.items() if v not in ("AA", "AE", "AR")
    }
    assert list(outcomes.values()).count("AR") >= 5  # the malformed ones are rejected, not silently accepted
    rss_end = rss_kib(daemon.proc.pid)
    assert rss_end - rss_first < 50 * 1024, (rss_start, rss_first, rss_end)  # bounded: no growth per pass
    assert daemon.healthy()
    assert daemon.stop() == 0


def test_the_daemon_does_not_store_patient_data_in_clear_unless_told_so_by_name(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    d.config.write_text(d.config.read_text().replace("[encryption]\nenabled = false\n", ""))
    run = gateway("run", "--config", str(d.config), timeout=60)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "encryption at rest is on but no key is set" in run.stderr
    assert not d.journal_path.exists() or b"MSH" not in d.journal_path.read_bytes()
