"""``gateway rules``: sign, verify, encrypt and dry-run rule sets (docs/rules.md).

- ``rules keygen --key-id ID --out PREFIX``: an Ed25519 key pair, PREFIX.key (secret, 0600) and PREFIX.pub.
- ``rules sign --key PREFIX.key RULES``: validate RULES, then write the detached signature RULES.sig.
- ``rules verify RULES --trust PREFIX.pub...`` or ``rules verify --config CONFIG``: every check the daemon makes.
- ``rules encrypt --key KEY RULES`` / ``rules decrypt --key KEY RULES.enc``: AES-256-GCM (key from a file or
  ``credential:NAME``; make one with ``gateway keys generate``).
- ``rules schema``: the JSON Schema of the rule language (committed as rules/rules.schema.json).
- ``rules test RULES MESSAGE...`` / ``rules test --cases FILE...``: dry runs, no daemon needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import orjson

from gateway import signing
from gateway.errors import ConfigError


def cmd_keygen(args: argparse.Namespace) -> int:
    prefix = Path(args.out)
    secret, public = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    signing.keygen(args.key_id, secret, public)
    print(f"secret key {secret} (keep it off the gateway's machine), public key {public}")
    print("Trust it in the daemon config (a relative file is relative to the config file):")
    print(f'[rules_trust]\nkeys = [{{file = "{public.resolve()}"}}]')
    return 0


def _plaintext(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", str(path)) from None
    if signing.is_encrypted(data):
        raise ConfigError("this rule set is encrypted; sign the plaintext, then encrypt it", str(path))
    return data


def cmd_sign(args: argparse.Namespace) -> int:
    from gateway.rules import parse_rules

    path = Path(args.rules)
    data = _plaintext(path)
    rules = parse_rules(data.decode("utf-8", errors="strict"), str(path))  # never sign a set the daemon refuses
    key_id, key = signing.load_secret_key(Path(args.key))
    out = Path(args.out) if args.out else signing.default_signature_path(path)
    out.write_text(signing.sign(data, key_id, key))
    print(f"{out}: serial {rules.serial} signed by key {key_id}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from gateway.rules import load_rule_set, parse_rules

    if args.config:
        from gateway.config import load_config

        cfg = load_config(args.config)
        loaded = load_rule_set(cfg, Path(args.config).resolve().parent)
        print(f"OK: {loaded.path}: serial {loaded.serial}, signed by key {loaded.key_id}")
        return 0
    if not args.rules or not args.trust:
        raise ConfigError("give RULES and --trust PUBLIC_KEY_FILE (or --config CONFIG)")
    path = Path(args.rules)
    blob = path.read_bytes()
    plaintext = blob
    if signing.is_encrypted(blob) or args.decryption_key:
        if not args.decryption_key:
            raise ConfigError("decryption failed: the rule set is encrypted; give --decryption-key", str(path))
        plaintext = signing.decrypt(blob, signing.read_encryption_key(args.decryption_key), str(path))
    keys: dict[str, Any] = {}
    for f in args.trust:
        key_id, pub = signing.parse_public_key_file(Path(f).read_text(encoding="ascii"), f)
        keys[key_id] = pub
    sig = Path(args.signature) if args.signature else signing.default_signature_path(path)
    try:
        sig_text = sig.read_text(encoding="ascii")
    except OSError:
        raise ConfigError(f"signature check failed: the rule set is not signed (no {sig})", str(path)) from None
    key_id = signing.verify(plaintext, sig_text, keys, str(path))
    rules = parse_rules(plaintext.decode("utf-8"), str(path))
    print(f"OK: {path}: serial {rules.serial}, signed by key {key_id}")
    return 0


def cmd_encrypt(args: argparse.Namespace) -> int:
    path = Path(args.rules)
    data = _plaintext(path)
    out = Path(args.out) if args.out else path.with_name(path.name + ".enc")
    out.write_bytes(signing.encrypt(data, signing.read_encryption_key(args.key)))
    print(f"{out}: encrypted; the signature {signing.default_signature_path(out)} stays over the plaintext")
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    path = Path(args.rules)
    plaintext = signing.decrypt(path.read_bytes(), signing.read_encryption_key(args.key), str(path))
    if args.out and args.out != "-":
        Path(args.out).write_bytes(plaintext)
    else:
        sys.stdout.buffer.write(plaintext)
    return 0


def schema() -> dict[str, Any]:
    from gateway.rules import RuleSet

    doc = RuleSet.model_json_schema()
    doc["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    doc["title"] = "hl7-gateway rule set"
    return doc


def schema_text() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"


def cmd_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(schema_text())
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from gateway import rulecases
    from gateway.contracts import InputKind
    from gateway.rules import load_rules

    failed = 0
    by_kind = rulecases.normalisers(args.config)
    for case_file in args.cases or []:
        for case, _result, diffs in rulecases.run_case_file(Path(case_file), by_kind):
            if diffs:
                failed += 1
                print(f"FAIL {case_file}: {case.name}")
                for d in diffs:
                    print(f"     {d}")
            elif not args.quiet:
                print(f"ok   {case_file}: {case.name}")
    if args.messages:
        if not args.rules:
            raise ConfigError("give the rule set: gateway rules test RULES MESSAGE...")
        router = load_rules(args.rules).router()
        for name in args.messages:
            data = Path(name).read_bytes()
            kind = InputKind(args.kind) if args.kind else rulecases.guess_kind(Path(name), data)
            env = rulecases.envelope(kind, args.source, data, {"topic": args.topic} if args.topic else {})
            outcome = rulecases.dry_run(router, env, name, by_kind).as_dict()
            if args.json:
                sys.stdout.write(orjson.dumps(outcome).decode() + "\n")
            else:
                _print_result(outcome)
    elif not args.cases:
        raise ConfigError("give MESSAGE files or --cases FILE")
    if args.cases:
        print(f"{failed} failed" if failed else "all rule tests passed", file=sys.stderr)
    return 1 if failed else 0


def _print_result(r: dict[str, Any]) -> None:
    print(f"{r['input']}: {r['kind']} {r.get('message_type', '')}")
    if r["action"] != "deliver":
        print(f"  action       {r['action']}: {r.get('reason', '')}")
    print(f"  routes       {', '.join(r.get('routes') or []) or '(none matched)'}")
    dests = r.get("destinations") or {}
    for dest, types in dests.items():
        print(f"  -> {dest:<10} {', '.join(types) or '(raw message only)'}")
    if r["action"] == "deliver" and not dests:
        print("  -> nowhere (committed to the journal only)")
    if "dedup_key" in r:
        window = r.get("dedup_window_seconds")
        print(f"  dedup        {r['dedup_key']} ({r['dedup_rule']}, window {window or 'default'} s)")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    r = sub.add_parser("rules", help="sign, verify, encrypt and dry-run rule sets")
    rsub = r.add_subparsers(dest="rules_command", required=True)

    k = rsub.add_parser("keygen", help="a new Ed25519 signing key pair: PREFIX.key (secret) and PREFIX.pub")
    k.add_argument("--key-id", required=True, help="the key's id in signatures and in [rules_trust]")
    k.add_argument("--out", required=True, help="path prefix of the two files")
    k.set_defaults(func=cmd_keygen)

    s = rsub.add_parser("sign", help="validate RULES and write its detached signature (RULES.sig)")
    s.add_argument("rules")
    s.add_argument("--key", required=True, help="the secret key file (from keygen)")
    s.add_argument("--out", help="signature file (default: RULES.sig)")
    s.set_defaults(func=cmd_sign)

    v = rsub.add_parser("verify", help="check a rule set's signature and validity as the daemon does")
    v.add_argument("rules", nargs="?")
    v.add_argument("--trust", action="append", help="a trusted public key file (repeat for several)")
    v.add_argument("--signature", help="signature file (default: RULES.sig, after removing .enc)")
    v.add_argument("--decryption-key", help="key of an encrypted rule set (file or credential:NAME)")
    v.add_argument("--config", "-c", help="check the daemon config's rule set with its [rules_trust] instead")
    v.set_defaults(func=cmd_verify)

    e = rsub.add_parser("encrypt", help="AES-256-GCM encrypt RULES (to RULES.enc)")
    e.add_argument("rules")
    e.add_argument("--key", required=True, help="AES-256 key: a file (gateway keys generate) or credential:NAME")
    e.add_argument("--out")
    e.set_defaults(func=cmd_encrypt)

    d = rsub.add_parser("decrypt", help="decrypt an encrypted rule set (to stdout or --out)")
    d.add_argument("rules")
    d.add_argument("--key", required=True)
    d.add_argument("--out")
    d.set_defaults(func=cmd_decrypt)

    sc = rsub.add_parser("schema", help="print the JSON Schema of the rule language")
    sc.set_defaults(func=cmd_schema)

    t = rsub.add_parser(
        "test",
        help="dry run: which routes match each MESSAGE, where it would go, its dedup key; or rule tests (--cases)",
    )
    t.add_argument("rules", nargs="?", help="the rule set (plaintext; not verified)")
    t.add_argument("messages", nargs="*", help="message files: HL7 v2, a DICOM descriptor, an MQTT sensor payload")
    t.add_argument("--cases", action="append", help="a YAML file of rule tests (repeat for several)")
    t.add_argument("--kind", choices=["hl7v2", "dicom", "mqtt"], help="input kind (default: guessed per file)")
    t.add_argument("--source", default="dry-run", help="source name the messages arrive on")
    t.add_argument("--topic", default="", help="MQTT topic of the messages")
    t.add_argument("--json", action="store_true", help="one JSON object per message")
    t.add_argument("--quiet", "-q", action="store_true", help="only failed rule tests")
    t.add_argument("--config", metavar="FILE", help="map messages with this daemon config's [normalise] settings")
    t.set_defaults(func=cmd_test)
