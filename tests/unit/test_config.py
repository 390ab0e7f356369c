"""The daemon config (TOML) and the rule set (YAML): validation with key paths, defaults, immutability, and the
router built from the rules. Routing cases are data: (match, message) -> destinations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from adapters.mllp.config import MllpSourceConfig
from gateway.config import GatewayConfig, load_config, parse_config
from gateway.contracts import InputKind
from gateway.errors import ConfigError
from gateway.routing import Route, Router
from gateway.rules import RuleSet, load_rules

MINIMAL: dict[str, Any] = {"rules": "rules.yaml", "sources": [{"type": "mllp"}]}


def with_(**changes: Any) -> dict[str, Any]:
    return {**MINIMAL, **changes}


def config_error(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value


# -- daemon config ---------------------------------------------------------------------------------------------


def test_a_minimal_config_is_valid_and_filled_with_the_documented_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert isinstance(cfg, GatewayConfig)
    assert cfg.instance == "gateway"
    assert cfg.rules == "rules.yaml"
    assert cfg.drain_timeout_seconds == 10.0
    (src,) = cfg.sources
    assert isinstance(src, MllpSourceConfig)
    assert (src.name, src.host, src.port) == ("mllp", "127.0.0.1", 2575)
    assert (src.max_connections, src.idle_timeout_seconds) == (256, 300.0)
    assert (src.max_frame_bytes, src.ack_timeout_seconds) == (16 * 1024 * 1024, 30.0)
    d = cfg.delivery
    assert (d.max_attempts, d.backoff_initial_seconds, d.backoff_max_seconds) == (10, 1.0, 300.0)
    assert (d.batch_size, d.lease_seconds, d.poll_interval_seconds) == (200, 60.0, 1.0)
    assert cfg.journal.group_commit_max == 512
    assert cfg.journal.dedup_window_seconds == 7 * 86400
    assert cfg.journal.pool_size == 5
    assert (cfg.telemetry.listen, cfg.telemetry.log_level, cfg.telemetry.log_format) == (
        "127.0.0.1:9102",
        "INFO",
        "text",
    )
    assert cfg.normalise.validate_fhir is False


def test_the_default_journal_is_sqlite_at_an_absolute_path() -> None:
    url = parse_config(MINIMAL).journal.url
    scheme, _, path = url.partition(":///")
    assert scheme.startswith("sqlite")
    assert path.startswith("/"), "four slashes: an absolute path, independent of the working directory"
    assert url.count("/") >= 4 and "////" in url
    assert Path(path).is_absolute()


def test_values_are_read() -> None:
    cfg = parse_config(
        with_(
            instance="gw-7",
            journal={"url": "mysql+aiomysql://u:p@db:3306/gw", "pool_size": 9},
            delivery={"max_attempts": 3},
            sources=[
                {"type": "mllp", "name": "a", "port": 2575},
                {"type": "mllp", "name": "b", "port": 0, "max_frame_bytes": 1024},
            ],
        )
    )
    assert cfg.instance == "gw-7"
    assert cfg.journal.url == "mysql+aiomysql://u:p@db:3306/gw" and cfg.journal.pool_size == 9
    assert cfg.delivery.max_attempts == 3 and cfg.delivery.batch_size == 200
    assert [(s.name, s.port, s.max_frame_bytes) for s in cfg.sources] == [
        ("a", 2575, 16 * 1024 * 1024),
        ("b", 0, 1024),
    ]


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (with_(journal={"urll": "sqlite:///x"}), "journal.urll"),
        (with_(sources=[{"type": "mllp", "prot": 2575}]), "sources[0].prot"),
        (with_(sources=[{"type": "mllp"}, {"type": "mllp", "nmae": "b"}]), "sources[1].nmae"),
        (with_(delivery={"max_attempt": 3}), "delivery.max_attempt"),
        (with_(instnace="x"), "instnace"),
        (with_(routes=[]), "routes"),  # routes belong to the rule set, not here
    ],
)
def test_unknown_keys_are_rejected_with_their_path(data: dict[str, Any], path: str) -> None:
    err = config_error(data)
    assert err.path == path
    assert "Extra inputs are not permitted" in err.reason
    assert str(err).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (with_(sources=[{"type": "mllp", "port": "twenty"}]), "sources[0].port"),
        (with_(sources=[{"type": "mllp", "port": 70000}]), "sources[0].port"),
        (with_(sources=[{"type": "mllp", "max_frame_bytes": 1023}]), "sources[0].max_frame_bytes"),
        (with_(sources=[{"type": "mllp", "name": "has space"}]), "sources[0].name"),
        (with_(sources=[{"type": "mllp", "idle_timeout_seconds": 0}]), "sources[0].idle_timeout_seconds"),
        (with_(journal={"group_commit_max": 0}), "journal.group_commit_max"),
        (with_(journal="sqlite:///x"), "journal"),
        (with_(delivery={"backoff_initial_seconds": "soon"}), "delivery.backoff_initial_seconds"),
        (with_(telemetry={"log_level": "TRACE"}), "telemetry.log_level"),
        (with_(sources=[]), "sources"),
        (with_(sources={"type": "mllp"}), "sources"),
        ({"sources": [{"type": "mllp"}]}, "rules"),
        ({"rules": "r.yaml"}, "sources"),
    ],
)
def test_invalid_values_are_rejected_with_their_path(data: dict[str, Any], path: str) -> None:
    assert config_error(data).path == path


@pytest.mark.parametrize(
    "source",
    [{"type": "x400", "port": 104}, {"name": "no-type"}, {"type": None}],
    ids=["unknown-type", "missing-type", "null-type"],
)
def test_the_source_type_selects_the_adapter(source: dict[str, Any]) -> None:
    err = config_error(with_(sources=[{"type": "mllp"}, source]))
    assert err.path == "sources[1]"
    assert "sources[1]" in str(err)


def test_an_error_inside_a_source_names_the_users_path_without_the_adapter_tag() -> None:
    err = config_error(with_(sources=[{"type": "mllp", "port": -1}]))
    assert err.path == "sources[0].port"
    assert "mllp" not in err.path


def test_the_config_is_frozen() -> None:
    cfg = parse_config(MINIMAL)
    with pytest.raises(ValidationError):
        cfg.instance = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.journal.url = "sqlite:///elsewhere"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.sources[0].port = 1  # type: ignore[misc]
    assert isinstance(cfg.sources, tuple)
    assert cfg.sources[0].port == 2575 and cfg.instance == "gateway"


def test_rules_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    assert parse_config(MINIMAL).rules_path(tmp_path) == tmp_path / "rules.yaml"
    absolute = parse_config(with_(rules="/etc/gateway/rules.yaml"))
    assert absolute.rules_path(tmp_path) == Path("/etc/gateway/rules.yaml")


def test_load_config_reads_toml(tmp_path: Path) -> None:
    p = tmp_path / "gateway.toml"
    p.write_text(
        'instance = "t"\nrules = "r.yaml"\n[journal]\nurl = "sqlite:///j.db"\n'
        '[[sources]]\ntype = "mllp"\nname = "adt"\nport = 2600\n',
        encoding="utf-8",
    )
    cfg = load_config(p)
    assert cfg.instance == "t" and cfg.journal.url == "sqlite:///j.db"
    assert [(s.name, s.port) for s in cfg.sources] == [("adt", 2600)]


def test_load_config_reports_a_toml_syntax_error(tmp_path: Path) -> None:
    p = tmp_path / "gateway.toml"
    p.write_text('rules = "r.yaml"\n[[sources]\ntype = "mllp"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.path == str(p)
    assert "not valid TOML" in info.value.reason


def test_load_config_reports_a_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.path == str(p)
    assert "cannot read" in info.value.reason


def test_load_config_reports_the_key_path_of_a_validation_error(tmp_path: Path) -> None:
    p = tmp_path / "gateway.toml"
    p.write_text('rules = "r.yaml"\n[[sources]]\ntype = "mllp"\nprot = 1\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.path == "sources[0].prot"


@pytest.mark.parametrize("path", ["config/dev.toml", "config/gateway.example.toml"])
def test_the_shipped_configs_are_valid(path: str) -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / path)
    assert len(cfg.sources) >= 1


@pytest.mark.parametrize("loader", [load_config, load_rules], ids=["config", "rules"])
def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path, loader: Any) -> None:
    p = tmp_path / "latin1"
    p.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError):
        loader(p)


# -- rule set --------------------------------------------------------------------------------------------------

RULES = """\
serial: 1
destinations:
  store:
    type: sql_store
    url: sqlite:///store.db
  archive:
    type: sql_store
    url: sqlite:///archive.db
    pool_size: 2
routes:
  - name: adt-to-store
    match:
      message_types: [ADT]
    to: [store]
  - name: everything-to-archive
    to: [archive, store]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "rules.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_load_rules_reads_destinations_and_routes(tmp_path: Path) -> None:
    rules = load_rules(write(tmp_path, RULES))
    assert set(rules.destinations) == {"store", "archive"}
    assert rules.destinations["archive"].pool_size == 2
    assert rules.destinations["store"].pool_size == 4
    assert [r.name for r in rules.routes] == ["adt-to-store", "everything-to-archive"]
    assert rules.routes[1].match.message_types == ()
    router = rules.router()
    kw: dict[str, Any] = {"source": "s", "kind": InputKind.HL7V2, "mapped": True}
    assert router.destinations(message_type="ADT^A01", **kw) == ["store", "archive"]
    assert router.destinations(message_type="ORU^R01", **kw) == ["archive", "store"]


def test_the_shipped_rules_are_valid() -> None:
    rules = load_rules(Path(__file__).resolve().parents[2] / "rules" / "demo.yaml")
    assert rules.router().destinations(source="x", kind=InputKind.HL7V2, message_type="ADT^A01", mapped=True)


def test_a_route_to_an_unknown_destination_is_rejected(tmp_path: Path) -> None:
    text = RULES.replace("to: [archive, store]", "to: [archive, stroe]")
    with pytest.raises(ConfigError) as info:
        load_rules(write(tmp_path, text))
    assert "unknown destination 'stroe'" in str(info.value)
    assert "routes[1]" in str(info.value)


@pytest.mark.parametrize(
    ("old", "new", "path"),
    [
        ("message_types: [ADT]", "message_type: [ADT]", "routes[0].match.message_type"),
        ("    pool_size: 2", "    poolsize: 2", "destinations.archive.poolsize"),
        ("    type: sql_store\n    url: sqlite:///store.db", "    type: s3\n    url: x", "destinations.store"),
        ("    to: [store]", "    to: []", "routes[0]"),  # a deliver route needs destinations
        ("      message_types: [ADT]", "      kinds: [hl7]", "routes[0].match.kinds[0]"),
        ("      message_types: [ADT]", "      mapped: perhaps", "routes[0].match.mapped"),
    ],
)
def test_rule_errors_name_their_path(tmp_path: Path, old: str, new: str, path: str) -> None:
    assert old in RULES
    with pytest.raises(ConfigError) as info:
        load_rules(write(tmp_path, RULES.replace(old, new)))
    assert info.value.path == path


def test_a_destination_named_like_an_adapter_keeps_its_name_in_the_error_path(tmp_path: Path) -> None:
    text = (
        "serial: 1\ndestinations:\n  sql_store:\n    type: sql_store\n    urll: x\n"
        "    url: sqlite:///y.db\nroutes: []\n"
    )
    with pytest.raises(ConfigError) as info:
        load_rules(write(tmp_path, text))
    assert info.value.path == "destinations.sql_store.urll"


@pytest.mark.parametrize(
    "text",
    ["destinations: [\n", "", "- just\n- a list\n", "destinations: {}\n"],
    ids=["syntax", "empty", "list", "no-routes"],
)
def test_malformed_rule_files_are_config_errors(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        load_rules(write(tmp_path, text))


def test_load_rules_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_rules(tmp_path / "absent.yaml")
    assert "cannot read" in info.value.reason


def test_the_rule_set_is_frozen(tmp_path: Path) -> None:
    rules = load_rules(write(tmp_path, RULES))
    with pytest.raises(ValidationError):
        rules.routes = ()  # type: ignore[misc]
    with pytest.raises(ValidationError):
        rules.routes[0].match.mapped = True  # type: ignore[misc]


# -- routing ---------------------------------------------------------------------------------------------------


def rule_set(*routes: dict[str, Any]) -> RuleSet:
    dests = {n: {"type": "sql_store", "url": f"sqlite:///{n}.db"} for n in ("a", "b", "c")}
    return RuleSet.model_validate({"serial": 1, "destinations": dests, "routes": list(routes)})


def route(to: list[str], **match: Any) -> dict[str, Any]:
    return {"name": f"to-{'-'.join(to)}", "match": match, "to": to}


# (routes, message as (source, kind, message_type, mapped), expected destinations)
ROUTING_CASES: list[tuple[list[dict[str, Any]], tuple[str, InputKind, str, bool], list[str]]] = [
    ([route(["a"])], ("s", InputKind.HL7V2, "ADT^A01", True), ["a"]),  # empty match: everything
    ([route(["a"], message_types=["ADT"])], ("s", InputKind.HL7V2, "ADT^A04", True), ["a"]),
    ([route(["a"], message_types=["ADT"])], ("s", InputKind.HL7V2, "ADT", True), ["a"]),
    ([route(["a"], message_types=["ADT"])], ("s", InputKind.HL7V2, "ORU^R01", True), []),
    ([route(["a"], message_types=["ADT"])], ("s", InputKind.HL7V2, "ADTX^A01", True), []),  # prefix, not substring
    ([route(["a"], message_types=["ADT^A01"])], ("s", InputKind.HL7V2, "ADT^A01", True), ["a"]),
    ([route(["a"], message_types=["ADT^A01"])], ("s", InputKind.HL7V2, "ADT^A04", True), []),
    ([route(["a"], message_types=["ADT^A01"])], ("s", InputKind.HL7V2, "ADT", True), []),
    ([route(["a"], message_types=["ADT^A01", "ORU"])], ("s", InputKind.HL7V2, "ORU^R01", True), ["a"]),
    ([route(["a"], sources=["adt-feed"])], ("adt-feed", InputKind.HL7V2, "ADT^A01", True), ["a"]),
    ([route(["a"], sources=["adt-feed"])], ("lab-feed", InputKind.HL7V2, "ADT^A01", True), []),
    ([route(["a"], kinds=["dicom"])], ("s", InputKind.HL7V2, "ADT^A01", True), []),
    ([route(["a"], kinds=["hl7v2", "dicom"])], ("s", InputKind.DICOM, "", True), ["a"]),
    ([route(["a"], mapped=True)], ("s", InputKind.HL7V2, "ADT^A01", True), ["a"]),
    ([route(["a"], mapped=True)], ("s", InputKind.HL7V2, "ZZZ^Z01", False), []),
    ([route(["a"], mapped=False)], ("s", InputKind.HL7V2, "ZZZ^Z01", False), ["a"]),
    ([route(["a"], mapped=False)], ("s", InputKind.HL7V2, "ADT^A01", True), []),
    # all conditions must hold
    ([route(["a"], sources=["x"], message_types=["ADT"], mapped=True)], ("x", InputKind.HL7V2, "ADT^A01", False), []),
    ([route(["a"], sources=["x"], message_types=["ADT"], mapped=True)], ("x", InputKind.HL7V2, "ADT^A01", True), ["a"]),
    # union of every matching route, each destination once, in rule order
    ([route(["b", "a"]), route(["a", "c"]), route(["b"])], ("s", InputKind.HL7V2, "ADT^A01", True), ["b", "a", "c"]),
    (
        [route(["c"], message_types=["ORU"]), route(["b"], message_types=["ADT"]), route(["a", "b"])],
        ("s", InputKind.HL7V2, "ADT^A08", True),
        ["b", "a"],
    ),
]


@pytest.mark.parametrize(("routes", "message", "expected"), ROUTING_CASES)
def test_rule_set_routing(
    routes: list[dict[str, Any]], message: tuple[str, InputKind, str, bool], expected: list[str]
) -> None:
    source, kind, message_type, mapped = message
    router = rule_set(*routes).router()
    assert router.destinations(source=source, kind=kind, message_type=message_type, mapped=mapped) == expected


def test_router_directly() -> None:
    router = Router(
        [
            Route("adt", ("store",), message_types=frozenset({"ADT"})),
            Route(
                "a01-from-main", ("audit", "store"), sources=frozenset({"main"}), message_types=frozenset({"ADT^A01"})
            ),
            Route("raw", ("archive",), mapped=False),
            Route("dicom", ("pacs",), kinds=frozenset({"dicom"})),
        ]
    )
    assert isinstance(router.routes, tuple)

    def dests(
        source: str = "main", kind: InputKind = InputKind.HL7V2, mt: str = "ADT^A01", mapped: bool = True
    ) -> list[str]:
        return router.destinations(source=source, kind=kind, message_type=mt, mapped=mapped)

    assert dests() == ["store", "audit"]
    assert dests(source="other") == ["store"]
    assert dests(mt="ADT^A08") == ["store"]
    assert dests(mt="ADT^A01", mapped=False) == ["store", "audit", "archive"]
    assert dests(mt="ZZZ^Z99", mapped=False) == ["archive"]
    assert dests(kind=InputKind.DICOM, mt="", mapped=False) == ["archive", "pacs"]
    assert dests(mt="ORU^R01") == []
    assert Router([]).destinations(source="s", kind=InputKind.HL7V2, message_type="ADT^A01", mapped=True) == []


@pytest.mark.parametrize(
    ("section", "key", "value", "path"),
    [
        ("telemetry", "listen", "localhost", "telemetry.listen"),
        ("telemetry", "listen", "127.0.0.1:99999", "telemetry.listen"),
        ("journal", "url", "postgresql://localhost/gw", "journal.url"),
        ("journal", "url", "mysql+pymysql://root@localhost/gw", "journal.url"),
        ("journal", "url", "sqlite://", "journal.url"),
    ],
)
def test_values_that_could_not_start_are_refused_by_check_config(section: str, key: str, value: str, path: str) -> None:
    data = {"rules": "rules.yaml", "sources": [{"type": "mllp"}], section: {key: value}}
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert err.value.path == path


def test_good_listen_addresses_and_database_urls_pass() -> None:
    for listen in ("127.0.0.1:9102", "[::1]:9102", "0.0.0.0:1", ""):
        for url in ("sqlite:///var/j.db", "sqlite+aiosqlite:////var/lib/j.db", "mysql+aiomysql://u:p@h:3306/d"):
            cfg = parse_config(
                {
                    "rules": "r.yaml",
                    "sources": [{"type": "mllp"}],
                    "telemetry": {"listen": listen},
                    "journal": {"url": url},
                }
            )
            assert cfg.telemetry.listen == listen and cfg.journal.url == url
