"""The shipped unit file: systemd accepts it, and its hardening rates 2.0 or better."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, need_service


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    if shutil.which("systemd-analyze") is None:
        need_service("systemd-analyze", "install Debian's systemd package")
    path = tmp_path / "gateway.service"
    # verify checks that ExecStart's binary exists; the gateway is not installed into /opt on a test machine.
    path.write_text((REPO / "systemd/gateway.service").read_text().replace("/opt/gateway/bin/gateway", "/bin/true"))
    return path


def test_systemd_analyze_verify_accepts_the_unit(unit: Path) -> None:
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in (out.stdout + out.stderr).splitlines() if "gateway.service" in line]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr


def test_systemd_analyze_security_rates_the_unit_2_or_lower(unit: Path) -> None:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for gateway\.service: (\d+\.\d+)", out.stdout)
    assert m, out.stdout[-2000:] + out.stderr
    assert float(m.group(1)) <= 2.0, out.stdout[-3000:]


def test_every_credential_the_example_config_names_is_loaded_by_the_unit() -> None:
    """A `credential:NAME` in the production example config must reach the service through LoadCredential=,
    or the daemon cannot read its key under systemd."""
    unit_text = (REPO / "systemd/gateway.service").read_text()
    loaded = set(re.findall(r"^#?LoadCredential=([^:\s]+):", unit_text, re.M))
    active = set(re.findall(r"^LoadCredential=([^:\s]+):", unit_text, re.M))
    example = (REPO / "config/gateway.example.toml").read_text()
    used = set(re.findall(r'^\s*#?\s*\w+\s*=\s*"credential:([^"]+)"', example, re.M))
    assert used and used <= loaded, (used, loaded)
    # encryption at rest is on by default, so its key is always loaded
    assert "journal.key" in active
