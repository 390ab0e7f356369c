"""`gateway --help` lists every command once, under its group, and hides the internal delivery command."""

from __future__ import annotations

import re

import pytest

from gateway.cli import COMMAND_GROUPS, build_parser, main


def test_help_groups_every_command_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gateway [-h] COMMAND ...")
    for title, _ in COMMAND_GROUPS:
        assert f"\n{title}:\n" in out
    listed = re.findall(r"^  ([a-z][a-z-]*)\b", out, re.M)
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = set(sub.choices) - {"deliver", "dead-letters"}  # internal; an alias shown beside dlq
    assert sorted(listed) == sorted(commands)
    assert "deliver" not in listed and "other:" not in out  # every command belongs to a named group


def test_a_command_still_parses_after_grouping() -> None:
    args = build_parser().parse_args(["status", "--config", "x.toml", "--json"])
    assert args.command == "status" and args.json is True


def test_send_to_a_closed_port_names_the_address(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["send", "--port", str(port), "tests/data/adt_a01.hl7"]) == 1
    assert f"error: cannot connect to 127.0.0.1:{port}: Connection refused" in capsys.readouterr().err


def test_a_command_s_usage_line_names_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["messages", "--help"])
    assert capsys.readouterr().out.startswith("usage: gateway messages [-h] --config CONFIG")
