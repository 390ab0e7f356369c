"""The compiled rule set the pipeline calls on every message: routes and dedup rules.

The rule set (rules/*.yaml, gateway/rules.py) is validated once and compiled here into plain objects: globs
become regular expressions or sets, FHIRPath conditions compiled functions, so matching a message is set
lookups and a few string matches (bench/rules_eval.py: a 50-route set costs microseconds per message).

Evaluation, in rule order:
- a ``deliver`` route that matches adds its destinations (each once), optionally restricting which resource
  types go to them, and ends evaluation when it has ``stop``;
- a ``drop`` or ``quarantine`` route that matches ends evaluation: the message is committed, delivered nowhere
  (destinations collected before it included), and marked dropped or quarantined with the route's reason.
Dedup rules: the first one that matches and whose key template can be filled gives the dedup key and window;
when none does, the normaliser's own key and the daemon's default window apply.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from gateway.contracts import Envelope, InputKind
from gateway.normalise import Prepared

log = logging.getLogger(__name__)

Action = Literal["deliver", "drop", "quarantine"]
CACHE_MAX = 4096  # header combinations (kind, source, message type, mapped) whose candidate routes are remembered
MAX_KEY = 200  # dedup_keys.dedup_key is 255; longer keys keep a prefix and a hash of the whole


class Glob:
    """A set of shell-style patterns (``*``, ``?``, ``[...]``), matched case-sensitively. Literal patterns are
    a set lookup; the rest one compiled regular expression."""

    __slots__ = ("exact", "regex")

    def __init__(self, patterns: Iterable[str]) -> None:
        pats = list(patterns)
        self.exact = frozenset(p for p in pats if not _has_wildcard(p))
        wild = [fnmatch.translate(p) for p in pats if _has_wildcard(p)]
        self.regex = re.compile("|".join(f"(?:{w})" for w in wild)) if wild else None

    def __call__(self, value: str) -> bool:
        if value in self.exact:
            return True
        return self.regex is not None and self.regex.match(value) is not None


def _has_wildcard(p: str) -> bool:
    return any(c in p for c in "*?[")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching (``+`` one level, ``#`` the rest); a ``$`` topic needs an explicit first
    level, as in MQTT 3.1.1 section 4.7.2."""
    f = topic_filter.split("/")
    t = topic.split("/")
    if t and t[0].startswith("$") and f and f[0] in ("+", "#"):
        return False
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t):
            return False
        if part != "+" and part != t[i]:
            return False
    return len(f) == len(t)


def message_type_glob(patterns: Iterable[str]) -> Glob:
    """``ADT`` (no ``^``, no wildcard) matches every ADT event, as ``ADT^*`` would; other values are globs."""
    out: list[str] = []
    for p in patterns:
        out.append(p)
        if "^" not in p and not _has_wildcard(p):
            out.append(p + "^*")
    return Glob(out)


Condition = Callable[[dict[str, Any]], bool]
Check = Callable[[Envelope, Prepared, Callable[[Prepared], frozenset[str]]], bool]


def _meta_check(key: str, glob: Glob) -> Check:
    return lambda env, p, types: glob(p.meta.get(key, ""))


@dataclass(frozen=True, slots=True)
class Route:
    """One compiled route. Empty criteria match anything."""

    name: str
    to: tuple[str, ...] = ()
    sources: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()
    message_types: frozenset[str] = frozenset()  # "ADT" matches every ADT; "ADT^A0*" a glob
    mapped: bool | None = None  # True: only messages mapped to FHIR; False: only unmapped ones
    resource_types: frozenset[str] = frozenset()  # match: the bundle holds at least one of these
    topics: tuple[str, ...] = ()  # MQTT topic filters against meta["topic"]
    calling_ae: frozenset[str] = frozenset()  # globs against meta["calling_ae"]
    called_ae: frozenset[str] = frozenset()
    modalities: frozenset[str] = frozenset()  # exact, against meta["modality"]
    meta: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (meta key, globs): each key must match one of its globs
    condition: Condition | None = None  # compiled FHIRPath over the bundle
    condition_text: str = ""
    action: Action = "deliver"
    only_resource_types: frozenset[str] = frozenset()  # deliver only these resource types (empty: all)
    reason: str = ""
    stop: bool = False
    _static: tuple[Check, ...] = field(init=False, repr=False, compare=False)
    _checks: tuple[Check, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Only the criteria this route has become checks. Kinds are not among them: the Router keeps one route
        # list per kind. The static checks read only the message's header (source, message type, mapped), whose
        # combinations are few, so the Router caches their outcome; the others run per message.
        static: list[Check] = []
        if self.sources:
            sources = self.sources
            static.append(lambda env, p, types: env.source in sources)
        if self.mapped is not None:
            want = self.mapped
            static.append(lambda env, p, types: (p.bundle is not None) is want)
        if self.message_types:
            mt = message_type_glob(self.message_types)
            static.append(lambda env, p, types: mt(p.message_type))
        checks: list[Check] = []
        if self.modalities:
            modalities = self.modalities
            checks.append(lambda env, p, types: p.meta.get("modality", "") in modalities)
        for key, patterns in self.meta:
            checks.append(_meta_check(key, Glob(patterns)))
        if self.calling_ae:
            calling = Glob(self.calling_ae)
            checks.append(lambda env, p, types: calling(p.meta.get("calling_ae", "")))
        if self.called_ae:
            called = Glob(self.called_ae)
            checks.append(lambda env, p, types: called(p.meta.get("called_ae", "")))
        if self.topics:
            filters = self.topics
            checks.append(lambda env, p, types: any(topic_matches(f, p.meta.get("topic", "")) for f in filters))
        if self.resource_types:
            wanted = self.resource_types
            checks.append(lambda env, p, types: not wanted.isdisjoint(types(p)))
        if self.condition is not None:
            condition = self.condition
            checks.append(lambda env, p, types: p.bundle is not None and condition(p.bundle))
        object.__setattr__(self, "_static", tuple(static))
        object.__setattr__(self, "_checks", tuple(checks))

    def matches(self, env: Envelope, prepared: Prepared, types: Callable[[Prepared], frozenset[str]]) -> bool:
        """Whether every criterion holds. ``types`` gives the bundle's resource types (computed at most once
        per message, and only when a route asks)."""
        if self.kinds and env.kind.value not in self.kinds:
            return False
        return all(check(env, prepared, types) for check in self._static + self._checks)


@dataclass(frozen=True, slots=True)
class DedupRule:
    """One compiled dedup rule: where it applies, the key template and the window."""

    name: str
    template: str
    window: timedelta
    sources: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()
    message_types: frozenset[str] = frozenset()
    _types: Glob = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_types", message_type_glob(self.message_types))

    def applies(self, env: Envelope, prepared: Prepared) -> bool:
        if self.kinds and env.kind.value not in self.kinds:
            return False
        if self.sources and env.source not in self.sources:
            return False
        return not self.message_types or self._types(prepared.message_type)

    def key(self, env: Envelope, prepared: Prepared) -> str | None:
        """The filled template, or None when a field it names is missing or empty (the rule then does not
        apply, so a message without, say, a sending facility is not deduplicated on half a key)."""
        parts: list[str] = []
        for literal, name in _template_parts(self.template):
            parts.append(literal)
            if name is None:
                continue
            value = _field(name, env, prepared)
            if not value:
                return None
            parts.append(value)
        key = f"{self.name}|{''.join(parts)}"
        if len(key) > MAX_KEY:
            key = key[:160] + "|" + hashlib.sha256(key.encode()).hexdigest()[:32]
        return key


TEMPLATE_FIELDS = ("source", "kind", "message_type", "control_id", "default")
_TEMPLATE_RE = re.compile(r"\{([^{}]*)\}")


def _template_parts(template: str) -> list[tuple[str, str | None]]:
    """(literal, field name or None) pairs of a ``{field}`` template; cached per template string."""
    cached = _PARTS.get(template)
    if cached is not None:
        return cached
    out: list[tuple[str, str | None]] = []
    pos = 0
    for m in _TEMPLATE_RE.finditer(template):
        out.append((template[pos : m.start()], m.group(1)))
        pos = m.end()
    out.append((template[pos:], None))
    _PARTS[template] = out
    return out


_PARTS: dict[str, list[tuple[str, str | None]]] = {}


def template_fields(template: str) -> list[str]:
    return [name for _, name in _template_parts(template) if name is not None]


def _field(name: str, env: Envelope, prepared: Prepared) -> str:
    if name.startswith("meta."):
        return prepared.meta.get(name[5:], "")
    if name == "source":
        return env.source
    if name == "kind":
        return env.kind.value
    if name == "message_type":
        return prepared.message_type
    if name == "control_id":
        return prepared.control_id
    if name == "default":
        return prepared.dedup_key or ""
    return ""


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a microsecond per message
class Decision:
    """What the rules decided about one message."""

    action: Action
    destinations: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()  # names of the routes that matched, in order
    reason: str = ""  # for drop and quarantine
    # Per destination, the resource types it receives; a destination absent here receives all of them.
    resource_types: Mapping[str, frozenset[str]] = field(default_factory=dict)
    dedup_key: str | None = None
    dedup_window: timedelta | None = None  # None: the daemon's default window
    dedup_rule: str = ""  # the dedup rule that gave the key ("" for the normaliser's default)


class _TypesOnce:
    """The resource types of a message's bundle, computed on the first route that asks."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: frozenset[str] | None = None

    def __call__(self, prepared: Prepared) -> frozenset[str]:
        if self.value is None:
            self.value = resource_types_of(prepared.bundle)
        return self.value


def _no_types(prepared: Prepared) -> frozenset[str]:  # static checks never ask for resource types
    raise AssertionError("a static route check asked for resource types")


def resource_types_of(bundle: dict[str, Any] | None) -> frozenset[str]:
    if not bundle:
        return frozenset()
    return frozenset(str(e.get("resource", {}).get("resourceType", "")) for e in bundle.get("entry", ()))


class Router:
    """Routes and dedup rules, compiled. Immutable: a reload builds a new Router and swaps it in."""

    def __init__(self, routes: Sequence[Route], dedup: Sequence[DedupRule] = (), serial: int = 0) -> None:
        self.routes = tuple(routes)
        self.dedup = tuple(dedup)
        self.serial = serial
        # Per input kind, the routes that can match it, in rule order: a kind criterion costs nothing per message.
        self._by_kind = {k: tuple(r for r in self.routes if not r.kinds or k.value in r.kinds) for k in InputKind}
        self._cache: dict[tuple[InputKind, str, str, bool], tuple[Route, ...]] = {}

    def _candidates(self, env: Envelope, prepared: Prepared) -> tuple[Route, ...]:
        """The routes whose header criteria (kind, source, message type, mapped) hold, from a cache keyed by
        those four values. The cache is bounded: past CACHE_MAX header combinations (a sender inventing message
        types), new combinations are evaluated every time instead of remembered."""
        key = (env.kind, env.source, prepared.message_type, prepared.bundle is not None)
        found = self._cache.get(key)
        if found is None:
            found = tuple(
                r
                for r in self._by_kind.get(env.kind, self.routes)
                if all(check(env, prepared, _no_types) for check in r._static)
            )
            if len(self._cache) < CACHE_MAX:
                self._cache[key] = found
        return found

    def route(self, env: Envelope, prepared: Prepared) -> Decision:
        """Evaluate every route and dedup rule for one prepared message (pure, no I/O)."""
        types = _TypesOnce()
        dests: list[str] = []
        matched: list[str] = []
        only: dict[str, frozenset[str]] = {}
        unrestricted: set[str] = set()
        action: Action = "deliver"
        reason = ""
        for r in self._candidates(env, prepared):
            for check in r._checks:
                if not check(env, prepared, types):
                    break
            else:
                matched.append(r.name)
                if r.action != "deliver":
                    action, reason, dests, only = r.action, r.reason or f"route {r.name}", [], {}
                    break
                for d in r.to:
                    if d not in dests:
                        dests.append(d)
                    if r.only_resource_types and d not in unrestricted:
                        only[d] = only.get(d, frozenset()) | r.only_resource_types
                    else:
                        unrestricted.add(d)
                        only.pop(d, None)
                if r.stop:
                    break
        key, window, rule = prepared.dedup_key, None, ""
        for rule_ in self.dedup:
            if rule_.applies(env, prepared):
                k = rule_.key(env, prepared)
                if k is not None:
                    key, window, rule = k, rule_.window, rule_.name
                    break
        return Decision(action, tuple(dests), tuple(matched), reason, only, key, window, rule)

    def destinations(self, *, source: str, kind: InputKind, message_type: str, mapped: bool) -> list[str]:
        """Destinations for a message described by its header facts only (no meta, no bundle): what the
        simple routes of earlier rule sets need, and what operators' tools ask."""
        from datetime import UTC, datetime

        env = Envelope(id="", source=source, kind=kind, received_at=datetime.now(UTC), payload=b"", peer="")
        prepared = Prepared(message_type=message_type, bundle={"entry": []} if mapped else None)
        return list(self.route(env, prepared).destinations)


STATUS_DROPPED = "dropped"  # messages.status of a message a drop route took: committed, delivered nowhere

# A route's resource-type restriction travels with the message (in messages.meta) to the delivery side, which
# applies it when it claims the message for that destination: "store=Encounter,Patient;fhir=Observation".
RESOURCE_TYPES_META = "route.resource_types"


def encode_restrictions(restrictions: Mapping[str, frozenset[str]]) -> str:
    return ";".join(f"{d}={','.join(sorted(t))}" for d, t in sorted(restrictions.items()))


def decode_restrictions(text: str) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for part in text.split(";"):
        dest, sep, types = part.partition("=")
        if sep:
            out[dest] = frozenset(t for t in types.split(",") if t)
    return out


def restrict_bundle(meta_json: str | None, destination: str, fhir: bytes | None) -> bytes | None:
    """The bundle as ``destination`` may receive it: only the resource types its route allows, when the
    message carries a restriction for it (see RESOURCE_TYPES_META); else unchanged, without parsing."""
    if fhir is None or not meta_json or RESOURCE_TYPES_META not in meta_json:
        return fhir
    import orjson

    meta = orjson.loads(meta_json)
    allowed = decode_restrictions(str(meta.get(RESOURCE_TYPES_META, ""))).get(destination)
    if allowed is None:
        return fhir
    bundle = orjson.loads(fhir)
    kept = [e for e in bundle.get("entry", ()) if e.get("resource", {}).get("resourceType") in allowed]
    # A Provenance kept must not point at resources this destination does not receive (a dangling reference
    # in a transaction fails on a FHIR server); one left with no target at all (target is 1..*) is dropped.
    present: set[str] = set()
    for e in kept:
        res = e.get("resource", {})
        present.add(f"{res.get('resourceType')}/{res.get('id')}")
        if e.get("fullUrl"):
            present.add(e["fullUrl"])
    out = []
    for e in kept:
        res = e.get("resource", {})
        if res.get("resourceType") == "Provenance":
            res["target"] = [t for t in res.get("target", ()) if t.get("reference") in present]
            if not res["target"]:
                continue
        out.append(e)
    bundle["entry"] = out
    return orjson.dumps(bundle)
