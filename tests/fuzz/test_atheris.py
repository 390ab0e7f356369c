"""The atheris harness runs for a bounded time on a corpus seeded from the tricky inputs, and finds nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, corpus

HARNESS = REPO / "tests" / "fuzz" / "fuzz_mllp.py"


def test_the_fuzzer_runs_for_a_bounded_time_without_a_crash(tmp_path: Path) -> None:
    seeds = tmp_path / "corpus"
    seeds.mkdir()
    for f in corpus("hl7v2/tricky").iterdir():
        if f.is_file():
            shutil.copy(f, seeds / f.name)
    run = subprocess.run(
        [sys.executable, str(HARNESS), "-max_total_time=8", "-rss_limit_mb=1024", "-timeout=5", str(seeds)],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,  # a crash reproducer would be written here
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Done" in run.stderr and "cov:" in run.stderr  # it really ran, with coverage feedback
    assert not list(tmp_path.glob("crash-*"))
