"""DICOM C-STORE benchmark: dcmtk's storescu sending CT_small to the gateway and, in the same run, to dcmtk's
storescp (the floor), over 1 and 4 parallel associations. Prints instances/s and the gateway/storescp ratio.

The gateway runs as the daemon process (through the e2e test helper, which writes and signs its config and rule
set), with durable storage (each instance fsynced, file and directory) and the SQLite journal (WAL,
synchronous=FULL) and encryption at rest on, as shipped. storescp writes files without fsync. Both sides and
storescu run with TCP_NODELAY=1 in their environment (dcmtk leaves Nagle on otherwise). Every gateway run sends
instances with fresh SOP Instance UIDs, so nothing is answered as a duplicate.

    .venv/bin/python bench/dicom_store.py [--instances 300] [--associations 1,4]

Target (issue #4): gateway >= 0.5 x storescp.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ENV = {**os.environ, "TCP_NODELAY": "1"}


def make_instances(directory: Path, n: int, tag: int) -> list[Path]:
    """``n`` copies of pydicom's CT_small (39 KB), one study, each with its own SOP Instance UID."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    directory.mkdir(parents=True)
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    root = f"1.2.826.0.1.3680043.2.1125.{os.getpid()}.{tag}"
    ds.StudyInstanceUID = root
    ds.SeriesInstanceUID = f"{root}.1"
    out = []
    for i in range(n):
        ds.SOPInstanceUID = f"{root}.1.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        p = directory / f"ct{i:05d}.dcm"
        ds.save_as(p)
        out.append(p)
    return out


def storescu_run(port: int, called: str, files: list[Path], associations: int) -> float:
    """Send ``files`` split over ``associations`` concurrent storescu processes; instances/s."""
    groups = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", called, "127.0.0.1", str(port), *map(str, g)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for g in groups
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise SystemExit(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return len(files) / (time.perf_counter() - started)


def wait_for_echo(port: int, called: str) -> None:
    deadline = time.monotonic() + 30
    while subprocess.run(["echoscu", "-aec", called, "127.0.0.1", str(port)], env=ENV, capture_output=True).returncode:
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing answers C-ECHO on port {port}")
        time.sleep(0.05)


def start_orthanc(work: Path) -> tuple[subprocess.Popen[bytes] | None, int]:
    """Debian's Orthanc on a temporary directory and free ports, no authentication, no plugins, HTTP on
    loopback only; (None, 0) when it is not installed (bench/install_peers.sh installs it)."""
    exe = shutil.which("Orthanc")
    if exe is None:
        return None, 0
    from tests.e2e.conftest import free_port

    port, http = free_port(), free_port()
    store = work / "orthanc"
    store.mkdir()
    config = {
        "Name": "bench",
        "StorageDirectory": str(store),
        "IndexDirectory": str(store),
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "HttpPort": http,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "StorageCompression": False,
        "Plugins": [],
    }
    (work / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen(
        [exe, str(work / "orthanc.json")], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return proc, port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=300, help="instances per run (default 300)")
    ap.add_argument("--associations", default="1,4", help="comma-separated association counts (default 1,4)")
    ap.add_argument("--workers", type=int, default=1, help="gateway worker processes (config key workers)")
    ap.add_argument("--no-orthanc", action="store_true", help="skip the Orthanc peer")
    ap.add_argument("--json", type=Path, help="also write the results to this file as JSON (for bench/run_all.py)")
    args = ap.parse_args()
    counts = [int(c) for c in args.associations.split(",")]
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} (Debian's dcmtk) is required")

    from tests.e2e.conftest import Daemon, free_port

    with tempfile.TemporaryDirectory(prefix="dicom-bench-") as tmp:
        work = Path(tmp)
        floor_port = free_port()
        floor_dir = work / "storescp"
        floor_dir.mkdir()
        floor = subprocess.Popen(
            ["storescp", "--fork", "-od", str(floor_dir), str(floor_port)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        gw_port = free_port()
        (work / "gw").mkdir()
        daemon = Daemon(
            work / "gw",
            encrypt=True,
            source_extra=(
                f'[[sources]]\ntype = "dicom"\nname = "bench"\nhost = "127.0.0.1"\nport = {gw_port}\n'
                'storage_dir = "dicom"\nstudy_quiet_seconds = 30\nmax_associations = 16\n'
            ),
        )
        if args.workers > 1:
            daemon.config.write_text(f"workers = {args.workers}\n" + daemon.config.read_text())
        orthanc, orthanc_port = (None, 0) if args.no_orthanc else start_orthanc(work)
        rows: list[dict[str, object]] = []
        daemon.start()
        try:
            wait_for_echo(floor_port, "ANY-SCP")
            wait_for_echo(gw_port, "GATEWAY")
            if orthanc is not None:
                wait_for_echo(orthanc_port, "ORTHANC")
            floor_files = make_instances(work / "floor-files", args.instances, 0)
            host = f"{platform.node()} {platform.python_version()} {os.cpu_count()} CPUs"
            print(f"# {host}; CT_small 39 KB x {args.instances} per run")
            print(f"{'associations':>12} {'storescp/s':>11} {'gateway/s':>10} {'ratio':>6} {'orthanc/s':>10}")
            for n, k in enumerate(counts, 1):
                gw_files = make_instances(work / f"gw-files-{n}", args.instances, n)
                storescu_run(floor_port, "ANY-SCP", floor_files[: min(20, len(floor_files))], 1)  # warm up
                floor_rate = storescu_run(floor_port, "ANY-SCP", floor_files, k)
                gw_rate = storescu_run(gw_port, "GATEWAY", gw_files, k)
                orthanc_rate = None
                if orthanc is not None:
                    # fresh UIDs: Orthanc, like the gateway, would otherwise only overwrite what it has
                    o_files = make_instances(work / f"orthanc-files-{n}", args.instances, 100 + n)
                    orthanc_rate = storescu_run(orthanc_port, "ORTHANC", o_files, k)
                shown = f"{orthanc_rate:>10.0f}" if orthanc_rate else f"{'n/a':>10}"
                print(f"{k:>12} {floor_rate:>11.0f} {gw_rate:>10.0f} {gw_rate / floor_rate:>6.2f} {shown}")
                rows.append({"associations": k, "storescp": floor_rate, "gateway": gw_rate, "orthanc": orthanc_rate})
            if args.json:
                out = {"instances": args.instances, "workers": args.workers, "rows": rows}
                out["orthanc"] = "measured" if orthanc else "skipped" if args.no_orthanc else "not installed"
                args.json.write_text(json.dumps(out, indent=1))
        finally:
            daemon.stop()
            if orthanc is not None:
                orthanc.terminate()
                orthanc.wait(30)
            floor.terminate()
            floor.wait(10)


if __name__ == "__main__":
    main()
