"""``gateway convert FILE... [--out DIR] [--ndjson] [--config FILE] [--validate]``: HL7 v2 to FHIR R4 offline.

The tool an integration engineer runs on a sample feed before go-live: the same parser, checks and map as the
daemon (with the daemon's ``[normalise]`` tables when ``--config`` names its config), no daemon, no database.
A file may hold one message, several (one per MSH, or an FHS/BHS batch), with CR, LF or CRLF separators and a
BOM. Each message gives one transaction Bundle: printed as JSON (or one line each with ``--ndjson``), or written
to DIR as ``<file stem>.json`` (``<stem>-<n>.json`` for the n-th message of a file with several;
``<stem>.ndjson`` with ``--ndjson``).

Exit status: 0 when every message converted; 1 when any did not, each failure reported on stderr as
``FILE: message N: reason`` where the reason names the segment and field (and never a value: it may be PHI).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.hl7v2.batch import BatchError, split_messages
from gateway.hl7v2.parse import HL7ParseError, parse
from gateway.normalise import MapContext, MappingError
from gateway.normalise.hl7v2 import map_hl7v2, message_event
from gateway.normalise.hl7v2.normaliser import SUPPORTED_HL7_VERSIONS
from gateway.normalise.hl7v2.settings import DEFAULT_SETTINGS, MappingSettings


class ConversionError(Exception):
    """One message could not be converted; the text says why, naming segment and field."""


def convert_message(
    data: bytes, settings: MappingSettings = DEFAULT_SETTINGS, *, source: str = "convert", message_id: str = "1"
) -> dict[str, Any]:
    """One message's bytes -> its FHIR transaction Bundle; ConversionError when it cannot be converted (not
    HL7, unsupported version, a type we do not map, or a mapping error)."""
    try:
        msg = parse(data)
    except HL7ParseError as exc:
        raise ConversionError(f"not a readable HL7 v2 message: {exc}") from None
    if msg.version not in SUPPORTED_HL7_VERSIONS:
        raise ConversionError("MSH-12: unsupported HL7 version")
    message_type, trigger = message_event(msg)
    if not message_type:
        raise ConversionError("MSH-9: the message type is missing")
    ctx = MapContext(message_id=message_id, source=source, received_at=datetime.now(UTC))
    try:
        bundle = map_hl7v2(msg, ctx, settings)
    except MappingError as exc:
        raise ConversionError(str(exc)) from None
    if bundle is None:
        raise ConversionError(f"MSH-9: {message_type}^{trigger} is not a message type the gateway maps")
    return bundle


def convert_file(path: Path, settings: MappingSettings) -> list[tuple[int, dict[str, Any] | ConversionError]]:
    """Every message of one file: (its number, counted from 1, and its bundle or error)."""
    data = path.read_bytes()
    try:
        messages = split_messages(data)
    except BatchError as exc:
        return [(1, ConversionError(f"not a readable HL7 v2 batch: {exc}"))]
    out: list[tuple[int, dict[str, Any] | ConversionError]] = []
    for n, message in enumerate(messages, 1):
        try:
            out.append((n, convert_message(message, settings, message_id=f"{path.name}-{n}")))
        except ConversionError as exc:
            out.append((n, exc))
    return out


def cmd_convert(args: argparse.Namespace) -> int:
    settings = DEFAULT_SETTINGS
    if args.config:
        from gateway.config import load_config

        settings = load_config(args.config).normalise.mapping_settings()
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    validate = None
    if args.validate:
        from gateway.normalise.validate import validate_bundle

        validate = validate_bundle
    failed = 0
    for name in args.files:
        path = Path(name)
        if not path.is_file():
            print(f"{name}: no such file", file=sys.stderr)
            failed += 1
            continue
        results = convert_file(path, settings)
        bundles: list[tuple[int, dict[str, Any]]] = []
        for n, result in results:
            if isinstance(result, ConversionError):
                print(f"{name}: message {n}: {result}", file=sys.stderr)
                failed += 1
                continue
            if validate is not None:
                try:
                    validate(result)
                except MappingError as exc:
                    print(f"{name}: message {n}: {exc}", file=sys.stderr)
                    failed += 1
                    continue
            bundles.append((n, result))
        _write(path, bundles, len(results), out_dir, ndjson=args.ndjson)
    return 1 if failed else 0


def _write(
    path: Path, bundles: list[tuple[int, dict[str, Any]]], total: int, out_dir: Path | None, *, ndjson: bool
) -> None:
    if out_dir is None:
        for _, bundle in bundles:
            print(
                json.dumps(bundle, ensure_ascii=False) if ndjson else json.dumps(bundle, indent=2, ensure_ascii=False)
            )
        return
    if ndjson:
        if bundles:
            lines = "".join(json.dumps(b, ensure_ascii=False) + "\n" for _, b in bundles)
            (out_dir / f"{path.stem}.ndjson").write_text(lines, encoding="utf-8")
        return
    for n, bundle in bundles:
        target = out_dir / (f"{path.stem}.json" if total == 1 else f"{path.stem}-{n}.json")
        target.write_text(json.dumps(bundle, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    c = sub.add_parser(
        "convert",
        help="convert HL7 v2 files to FHIR R4 transaction bundles, without a daemon (exit 1 if any message fails)",
    )
    c.add_argument("files", nargs="+", metavar="FILE", help="HL7 v2 files (one message, several, or a batch)")
    c.add_argument("--out", metavar="DIR", help="write <stem>.json (or <stem>-<n>.json) files here, not stdout")
    c.add_argument("--ndjson", action="store_true", help="one bundle per line (<stem>.ndjson with --out)")
    c.add_argument("--config", metavar="FILE", help="use this daemon config's [normalise] tables")
    c.add_argument("--validate", action="store_true", help="also validate each bundle with the FHIR R4 models")
    c.set_defaults(func=cmd_convert)
