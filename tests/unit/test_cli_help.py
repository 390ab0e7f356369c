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
