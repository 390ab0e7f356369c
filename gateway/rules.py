"""The rule set: a serial, named destinations (sink configs), routes and dedup rules, loaded from signed YAML.

``load_rule_set(config, base_dir)`` is the only way the daemon, its delivery process and the CLI get a rule set:
it decrypts (when configured), verifies the detached Ed25519 signature over the exact plaintext bytes against
the trusted keys, parses and validates the YAML, compiles it (FHIRPath conditions once, here), and checks the
serial against the highest one accepted on this machine (gateway/signing.py). Any failure is a ConfigError
whose message names the check that failed. ``parse_rules`` is the same without the trust checks, for tools
(`gateway rules test`, the schema, tests) that look at a rule file before it is signed.

docs/rules.md explains every field; rules/rules.schema.json is ``RuleSet.model_json_schema()``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway import signing
from gateway.config import GatewayConfig, validation_error
from gateway.destinations import DestinationConfig
from gateway.errors import ConfigError
from gateway.routing import TEMPLATE_FIELDS, DedupRule, Route, Router, template_fields

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
Kind = Literal["hl7v2", "dicom", "mqtt"]


def parse_duration(value: str | float) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``24h`` or ``7d``."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(value)
        if not m:
            raise ValueError("expected a duration such as 90s, 15m, 24h or 7d")
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if seconds <= 0:
        raise ValueError("a window must be longer than zero")
    return seconds


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouteMatch(Frozen):
    """What a message must look like for a route to apply. Every criterion given must hold; a list matches when
    any of its values does; an empty or absent criterion matches everything."""

    sources: tuple[str, ...] = Field((), description="Source names (as in the daemon config); empty: any source.")
    kinds: tuple[Kind, ...] = Field((), description="Input kinds: hl7v2, dicom, mqtt; empty: any.")
    message_types: tuple[str, ...] = Field(
        (),
        description='Message types as globs: "ADT^A0*", "ORU^R01", "DICOM^CT"; a value without "^" or wildcards '
        'such as "ADT" matches every event of that type.',
    )
    resource_types: tuple[str, ...] = Field(
        (), description="FHIR resource types; matches when the mapped bundle holds at least one of them."
    )
    topics: tuple[str, ...] = Field(
        (), description="MQTT topic filters (+ one level, # the rest) against the topic the reading came on."
    )
    calling_ae: tuple[str, ...] = Field((), description="DICOM calling AE titles (globs) of the sending modality.")
    called_ae: tuple[str, ...] = Field((), description="DICOM called AE titles (globs), the gateway's title it used.")
    modalities: tuple[str, ...] = Field((), description="DICOM modalities (0008,0060): CT, MR, US ...")
    meta: dict[str, tuple[str, ...]] = Field(
        {},
        description="Header facts the normaliser recorded (docs/rules.md lists them per kind), each against "
        "globs: {processing_id: [P]}, {sending_facility: [HOSP*]}, {device_id: [pulseox-*]}.",
    )
    mapped: bool | None = Field(None, description="true: only messages mapped to FHIR; false: only unmapped ones.")
    condition: str | None = Field(
        None,
        description="A FHIRPath expression over the mapped Bundle; the route matches when it evaluates to true "
        "(or a non-empty collection without false). Compiled when the rule set is loaded; never true for an "
        "unmapped message.",
    )

    @field_validator("topics")
    @classmethod
    def _topic_filters(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for f in value:
            levels = f.split("/")
            if not f or any(("#" in lv and lv != "#") or ("+" in lv and lv != "+") for lv in levels):
                raise ValueError(f"{f!r} is not an MQTT topic filter")
            if "#" in levels[:-1]:
                raise ValueError(f"{f!r}: '#' must be the last level")
        return value


class RouteConfig(Frozen):
    name: str = Field(description="Route name, in logs, metrics and `gateway rules test`.")
    match: RouteMatch = Field(default_factory=RouteMatch, description="When the route applies.")
    action: Literal["deliver", "drop", "quarantine"] = Field(
        "deliver",
        description="deliver: send to `to`. drop: commit the message, deliver it nowhere, status dropped. "
        "quarantine: commit it as quarantined with `reason` (the sender hears a permanent reject). drop and "
        "quarantine end evaluation and override destinations chosen by earlier routes.",
    )
    to: tuple[str, ...] = Field((), description="Destination names (deliver only).")
    resource_types: tuple[str, ...] = Field(
        (), description="Deliver only these FHIR resource types to `to` (deliver only); empty: all of them."
    )
    reason: str = Field("", description="Why (drop and quarantine): stored with the message and logged.")
    stop: bool = Field(False, description="When this route matches, later routes are not evaluated.")

    @model_validator(mode="after")
    def _action_fields(self) -> RouteConfig:
        if self.action == "deliver" and not self.to:
            raise ValueError(f"route {self.name!r}: a deliver route needs `to`")
        if self.action != "deliver" and (self.to or self.resource_types):
            raise ValueError(f"route {self.name!r}: a {self.action} route takes no `to` or `resource_types`")
        return self


class DedupMatch(Frozen):
    sources: tuple[str, ...] = Field((), description="Source names; empty: any.")
    kinds: tuple[Kind, ...] = Field((), description="Input kinds; empty: any.")
    message_types: tuple[str, ...] = Field((), description="Message type globs, as in routes; empty: any.")


class DedupConfig(Frozen):
    name: str = Field(description="Rule name; part of every key it makes, so two rules never share a key.")
    match: DedupMatch = Field(default_factory=DedupMatch, description="Which messages the rule applies to.")
    key: str = Field(
        description="Key template: literal text and {fields}: {source}, {kind}, {message_type}, {control_id}, "
        "{default} (the normaliser's own key) and {meta.NAME} (e.g. {meta.sending_facility}, "
        "{meta.device_id}). When a field is empty the rule does not apply to that message."
    )
    window: str | float = Field(
        description="How long the key is remembered: seconds, or 90s, 15m, 24h, 7d. A resend inside the window "
        "is acknowledged and not processed again."
    )

    @field_validator("key")
    @classmethod
    def _known_fields(cls, value: str) -> str:
        names = template_fields(value)
        if not names:
            raise ValueError("a key template needs at least one {field}")
        for n in names:
            if n not in TEMPLATE_FIELDS and not (n.startswith("meta.") and len(n) > 5):
                raise ValueError(f"unknown field {{{n}}} (known: {', '.join(TEMPLATE_FIELDS)}, meta.NAME)")
        return value

    @field_validator("window")
    @classmethod
    def _duration(cls, value: str | float) -> str | float:
        parse_duration(value)
        return value


class RuleSet(Frozen):
    serial: int = Field(
        ge=1,
        description="Increase with every change: the daemon refuses a rule set whose serial is lower than one it "
        "has accepted (an older signed set replayed), or a changed set under the same serial.",
    )
    description: str = Field("", description="Free text: what this rule set is for, who owns it.")
    destinations: dict[str, DestinationConfig] = Field(description="Named destinations (sink configurations).")
    routes: tuple[RouteConfig, ...] = Field(description="Routes, evaluated in order.")
    dedup: tuple[DedupConfig, ...] = Field(
        (), description="Dedup rules; the first that applies gives a message's key and window."
    )

    @model_validator(mode="after")
    def _consistent(self) -> RuleSet:
        names: set[str] = set()
        for i, r in enumerate(self.routes):
            if r.name in names:
                raise ValueError(f"routes[{i}]: route name {r.name!r} is used twice")
            names.add(r.name)
            for d in r.to:
                if d not in self.destinations:
                    raise ValueError(f"routes[{i}] ({r.name}) sends to unknown destination {d!r}")
        dnames = [d.name for d in self.dedup]
        if len(set(dnames)) != len(dnames):
            raise ValueError("dedup rule names must be unique")
        return self

    def router(self) -> Router:
        """Compile (FHIRPath conditions included). Raises ConfigError naming the route of a bad expression."""
        routes = []
        for i, r in enumerate(self.routes):
            m = r.match
            routes.append(
                Route(
                    name=r.name,
                    to=r.to,
                    sources=frozenset(m.sources),
                    kinds=frozenset(m.kinds),
                    message_types=frozenset(m.message_types),
                    mapped=m.mapped,
                    resource_types=frozenset(m.resource_types),
                    topics=m.topics,
                    calling_ae=frozenset(m.calling_ae),
                    called_ae=frozenset(m.called_ae),
                    modalities=frozenset(m.modalities),
                    meta=tuple(sorted(m.meta.items())),
                    condition=compile_condition(m.condition, f"routes[{i}].match.condition") if m.condition else None,
                    condition_text=m.condition or "",
                    action=r.action,
                    only_resource_types=frozenset(r.resource_types),
                    reason=r.reason,
                    stop=r.stop,
                )
            )
        dedup = [
            DedupRule(
                name=d.name,
                template=d.key,
                window=timedelta(seconds=parse_duration(d.window)),
                sources=frozenset(d.match.sources),
                kinds=frozenset(d.match.kinds),
                message_types=frozenset(d.match.message_types),
            )
            for d in self.dedup
        ]
        return Router(routes, dedup, self.serial)


def compile_condition(expression: str, where: str) -> Any:
    """A FHIRPath expression compiled once; the returned function answers True/False for a bundle. An
    expression that fails at run time (a type error on unexpected data) counts as false and is logged once per
    route, without the data."""
    import logging

    from fhirpathpy import compile as fp_compile

    _check_fhirpath_syntax(expression, where)
    try:
        fn = fp_compile(expression, None)
        # fhirpathpy resolves functions when it evaluates: a trial run on an empty Bundle finds unknown
        # functions and wrong arities now, at load, instead of on every message.
        fn({"resourceType": "Bundle", "type": "transaction", "entry": []}, None)
    except Exception as exc:  # fhirpathpy raises plain Exception and its parser's own types
        raise ConfigError(f"not a valid FHIRPath expression: {exc}", where) from None
    warned = False

    def condition(bundle: dict[str, Any]) -> bool:
        nonlocal warned
        try:
            result = fn(bundle, None)
        except Exception as exc:  # the per-message boundary of user-written code
            if not warned:
                warned = True
                logging.getLogger(__name__).warning(
                    "The FHIRPath condition of %s failed on a message (%s); it counts as false.",
                    where,
                    type(exc).__name__,
                )
            return False
        return bool(result) and all(v is not False for v in result)

    return condition


# -- loading ----------------------------------------------------------------------------------------------------


def parse_rules(text: bytes | str, where: str) -> RuleSet:
    """Parse and validate rule set YAML and compile it once (so a bad FHIRPath is found now). No trust checks."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", where) from None
    if not isinstance(data, dict):
        raise ConfigError("a rule set is a YAML mapping (serial, destinations, routes, dedup)", where)
    try:
        rules = RuleSet.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, data) from None
    rules.router()
    return rules


def load_rules(path: str | Path) -> RuleSet:
    """An unverified rule file, for tools and tests; the daemon uses ``load_rule_set``."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the rule set: {exc.strerror}", str(p)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("the rule set is not UTF-8 text (encrypted? use the daemon config)", str(p)) from None
    return parse_rules(text, str(p))


@dataclass(frozen=True)
class LoadedRules:
    """A verified rule set and what the audit trail and metrics say about it."""

    rules: RuleSet
    router: Router
    path: Path
    serial: int
    sha256: str  # of the plaintext that was verified
    key_id: str
    encrypted: bool
    text: str  # the verified plaintext: what the delivery process runs (it never reads the file itself)


def load_rule_set(config: GatewayConfig, base_dir: Path, *, accept: bool = False) -> LoadedRules:
    """Read, decrypt, verify, validate, compile and rollback-check the configured rule set.

    ``accept``: remember its serial as the highest accepted (the daemon at start and on reload); tools and the
    delivery process only check. Raises ConfigError whose message starts with the check that failed:
    "decryption failed", "signature check failed", "rollback check failed", or a validation error."""
    path = config.rules_path(base_dir)
    trust = config.rules_trust
    where = str(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the rule set: {exc.strerror}", where) from None
    encrypted = signing.is_encrypted(blob)
    if trust.decryption_key is not None:
        plaintext = signing.decrypt(blob, signing.read_encryption_key(trust.decryption_key), where)
    elif encrypted:
        raise ConfigError(
            "decryption failed: the rule set is encrypted but [rules_trust] decryption_key is not set", where
        )
    else:
        plaintext = blob
    keys = signing.trusted_keys(trust)
    if not keys:
        raise ConfigError(
            "signature check failed: no trusted keys ([rules_trust] keys); the daemon only runs signed rule sets",
            "rules_trust.keys",
        )
    sig_path = Path(trust.signature) if trust.signature else signing.default_signature_path(path)
    try:
        sig_text = sig_path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(
            f"signature check failed: the rule set is not signed (no signature file {sig_path})", where
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"signature check failed: cannot read {sig_path}: {exc}", where) from None
    key_id = signing.verify(plaintext, sig_text, keys, where)
    try:
        text = plaintext.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("the rule set is not UTF-8 text", where) from None
    rules = parse_rules(text, where)
    digest = signing.sha256(plaintext)
    state_path = Path(trust.state_file)
    signing.check_serial(rules.serial, digest, signing.read_state(state_path), where)
    if accept:
        try:
            signing.write_state(state_path, signing.Accepted(rules.serial, digest))
        except OSError as exc:
            raise ConfigError(
                f"rollback check failed: cannot record serial {rules.serial} in the state file: {exc.strerror}",
                str(state_path),
            ) from None
    return LoadedRules(rules, rules.router(), path, rules.serial, digest, key_id, encrypted, text)


def _check_fhirpath_syntax(expression: str, where: str) -> None:
    """Parse with fhirpathpy's grammar, failing on the first syntax error and on trailing input (fhirpathpy's
    own ``compile`` recovers from syntax errors silently and would evaluate half an expression)."""
    from antlr4 import CommonTokenStream, InputStream, Token
    from antlr4.error.ErrorListener import ErrorListener
    from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
    from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

    class Refuse(ErrorListener):  # type: ignore[misc]
        def syntaxError(self, recognizer: Any, offending: Any, line: int, column: int, msg: str, e: Any) -> None:
            raise ConfigError(f"not a valid FHIRPath expression: at column {column + 1}: {msg}", where)

    lexer = FHIRPathLexer(InputStream(expression))
    lexer.removeErrorListeners()
    lexer.addErrorListener(Refuse())
    tokens = CommonTokenStream(lexer)
    parser = FHIRPathParser(tokens)
    parser.removeErrorListeners()
    parser.addErrorListener(Refuse())
    parser.expression()
    if tokens.LA(1) != Token.EOF:
        raise ConfigError(
            f"not a valid FHIRPath expression: unexpected {tokens.LT(1).text!r} at column {tokens.LT(1).column + 1}",
            where,
        )
