"""`gateway send dicom` and `gateway send mqtt`: test clients for the DICOM and MQTT listeners.

They are what an integration engineer uses to push sample files at a gateway (ours or another) before go-live:
a line per file with the peer's answer, a progress line on a terminal, a summary, and exit 1 unless every file
was accepted. `gateway send mllp` (cli.cmd_send) is the HL7 one.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError


class Progress:
    """Per-file lines (unless quiet), a progress line on a terminal, a summary for several files."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total = total
        self.quiet = quiet
        self.tally: dict[str, int] = {}
        self.n = 0
        self.live = total > 1 and sys.stderr.isatty()

    def record(self, name: str, outcome: str, detail: str = "") -> None:
        self.n += 1
        self.tally[outcome] = self.tally.get(outcome, 0) + 1
        if not self.quiet:
            print(f"{name}: {outcome}{(' ' + detail) if detail else ''}")
        if self.live:
            print(f"\r[{self.n}/{self.total}] {self._counts()}", end="", file=sys.stderr, flush=True)

    def finish(self, what: str) -> None:
        if self.total > 1:
            print(f"{chr(13) if self.live else ''}sent {self.n} {what}: {self._counts()}", file=sys.stderr)

    def _counts(self) -> str:
        return " ".join(f"{k}={v}" for k, v in sorted(self.tally.items()))


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client TLS context of `gateway send` (all protocols): None without --tls, --ca or --cert."""
    if not (args.tls or args.ca or args.cert):
        return None
    from pydantic import ValidationError

    from gateway.tls import ClientTLS, client_context

    try:
        cfg = ClientTLS(ca=args.ca, cert=args.cert, key=args.key, server_hostname=args.server_name)
    except ValidationError as exc:
        raise ConfigError(f"--cert and --key: {exc.errors()[0]['msg']}") from None
    return client_context(cfg)


def _files(paths: list[str]) -> Iterator[Path]:
    """Files as given; directories walked recursively in name order."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file())
        else:
            yield p


def _check_complete(path: Path, ds: Any) -> None:
    """Raise DatasetError when the file's dataset is cut short. pydicom reads a short last value without a
    word and would re-encode it as a well-formed, shorter dataset, which the receiver cannot tell from the real
    thing (a CT with a quarter of its pixels was stored as sent); storescu refuses such a file, and so do we,
    with the receiver's own check on the bytes after the File Meta Information."""
    from adapters.dicom.dataset import check_complete

    data = path.read_bytes()
    meta_length = ds.file_meta.get("FileMetaInformationGroupLength")
    if data[128:132] != b"DICM" or meta_length is None:
        return  # not laid out as PS3.10 says: pydicom found the dataset some other way; nothing to check against
    check_complete(data[132 + 12 + int(meta_length) :], str(ds.file_meta.TransferSyntaxUID))


def send_dicom(args: argparse.Namespace) -> int:
    """C-STORE each DICOM file (directories walked) over one association, as stored: each file's own SOP class
    and transfer syntax are proposed, so nothing is transcoded."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pynetdicom import AE

    from adapters.dicom import sockets  # noqa: F401  (closes association sockets whose peer is gone)
    from adapters.dicom.dataset import DatasetError

    files: list[tuple[Path, pydicom.Dataset]] = []
    bad = 0
    for f in _files(args.files):
        try:
            ds = pydicom.dcmread(f)
            ds.SOPClassUID  # noqa: B018 (a storable instance has one)
            _check_complete(f, ds)
            files.append((f, ds))
        except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
            print(f"{f}: not a DICOM instance ({type(exc).__name__})", file=sys.stderr)
            bad += 1
        except DatasetError as exc:
            print(f"{f}: not a complete DICOM instance ({exc})", file=sys.stderr)
            bad += 1
    if not files:
        print("no DICOM files to send", file=sys.stderr)
        return 1
    ae = AE(ae_title=args.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    contexts = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in files})
    if len(contexts) > 128:
        raise ConfigError("more than 128 SOP class / transfer syntax pairs: send the files in several runs")
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    ctx = tls_context(args)
    tls_args = (ctx, args.server_name or args.host) if ctx is not None else None
    assoc = ae.associate(args.host, args.port, ae_title=args.called_ae, tls_args=tls_args)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        print(f"{args.host}:{args.port}: association {why}", file=sys.stderr)
        return 1
    progress = Progress(len(files), args.quiet)
    worst = 1 if bad else 0
    try:
        for f, instance in files:
            status = assoc.send_c_store(instance)
            if not assoc.is_established:
                progress.record(str(f), "aborted", "the association ended")
                worst = 1
                break
            code = int(status.Status) if "Status" in status else -1
            ok = code == 0x0000 or (0xB000 <= code <= 0xBFFF)
            progress.record(
                str(f), "Success" if code == 0 else "Warning" if ok else "Failure", f"0x{code & 0xFFFF:04X}"
            )
            if not ok:
                worst = 1
    finally:
        if assoc.is_established:
            assoc.release()
    progress.finish("instance(s)")
    return worst


def send_mqtt(args: argparse.Namespace) -> int:
    """Publish each file (one JSON payload per file) to --topic at QoS 1; a file counts as sent when the
    broker's PUBACK arrives."""
    import aiomqtt

    files = list(_files(args.files))
    progress = Progress(len(files), args.quiet)
    ctx = tls_context(args)

    async def main() -> int:
        worst = 0
        async with aiomqtt.Client(
            args.host,
            args.port,
            username=args.username,
            password=args.password,
            tls_context=ctx,
            timeout=args.timeout,
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as client:
            for f in files:
                try:
                    payload = f.read_bytes()
                except OSError as exc:
                    progress.record(str(f), "unreadable", exc.strerror or "")
                    worst = 1
                    continue
                await client.publish(args.topic, payload, qos=1, timeout=args.timeout)
                progress.record(str(f), "PUBACK", args.topic)
        return worst

    try:
        rc = asyncio.run(main())
    except aiomqtt.MqttError as exc:
        print(f"{args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    progress.finish("payload(s)")
    return rc
