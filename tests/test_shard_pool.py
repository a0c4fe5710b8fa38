"""The sharding worker pool's lifetime: its workers stop with their owner, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HANG_GUARD_S = 60  # a bound on waiting for processes to go, not a timing assertion

_OWNER = """
import multiprocessing as mp, sys, threading, time
from cxrfast.shards.pool import WorkerPool

if __name__ == "__main__":
    pool = WorkerPool(2)
    pool.wait_ready()
    jobs = [("a", 600), ("b", 600)]  # tasks that would keep the workers busy for ten minutes
    threading.Thread(target=lambda: list(pool.map_unordered(time.sleep, jobs, in_flight=2)), daemon=True).start()
    time.sleep(1)
    print(" ".join(str(p.pid) for p in mp.active_children()), flush=True)
    if sys.argv[1] == "abort":
        sys.stdin.readline()  # the test has seen the workers alive
        pool.close(abort=True)
        print("closed", flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; its reaper may be slow in a container


def _wait_gone(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + HANG_GUARD_S
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


@pytest.mark.parametrize("how", ["sigkill_owner", "abort"])
def test_workers_stop_with_their_owner(tmp_path: Path, how: str) -> None:
    script = tmp_path / "owner.py"
    script.write_text(_OWNER)
    owner = subprocess.Popen([sys.executable, str(script), how], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]  # type: ignore[union-attr]
        assert pids and all(map(_alive, pids))
        if how == "sigkill_owner":
            owner.send_signal(signal.SIGKILL)  # no clean-up of any kind runs in the owner
        else:
            owner.stdin.write("abort\n")  # type: ignore[union-attr]
            owner.stdin.flush()  # type: ignore[union-attr]
            assert owner.stdout.readline().strip() == "closed"  # type: ignore[union-attr]
        assert _wait_gone(pids) == [], "workers outlived their owner"
    finally:
        owner.kill()
        owner.wait()
        for pid in pids if "pids" in locals() else []:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
