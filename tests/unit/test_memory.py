"""Freed memory is handed back to the system periodically (glibc's malloc_trim), in every gateway process."""

from __future__ import annotations

import asyncio
import platform

import pytest

from gateway import memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_malloc_trim_is_found_and_called_on_glibc() -> None:
    assert memory.release_free_memory()


async def test_the_trim_runs_every_interval_until_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memory, "_TRIM", lambda pad: calls.append(pad) or 1)
    task = asyncio.create_task(memory.trim_periodically(0.01))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(calls) >= 3 and set(calls) == {0}
    settled = len(calls)
    await asyncio.sleep(0.05)
    assert len(calls) == settled
