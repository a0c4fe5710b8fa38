"""The sharding worker pool: a stock `concurrent.futures.ProcessPoolExecutor` on multiprocessing's
*forkserver* context, with an initializer; no private attribute of either is touched.

- **Warm, clean workers.** The forkserver (a fresh single-threaded interpreter, started once per
  process) preloads `cxrfast.shards._preload` -- the worker module, OpenCV set to one thread, the
  numba loops loaded -- and forks each worker from that state in milliseconds.
- **The `__main__` contract** (Python's own rule for the spawn and forkserver start methods, see
  "Safe importing of main module" in the `multiprocessing` docs): each new worker re-imports the
  caller's main module before it runs a task; a script runs again as `__mp_main__`. So a script
  that shards must call cxrfast under `if __name__ == "__main__":` (and keep heavy imports such as
  torch inside that block or a function, or every worker pays for them). The `cxrfast` command,
  `python -m ...` and `python -c` need nothing. A script without the guard gets a WorkerError
  saying so (its re-run inside the worker fails before touching the output: the output folder is
  locked by the real run), never a nested sharding run.
- **Workers stop with their owner.** Each worker gets, as the initializer's argument, the read end
  of a pipe whose write end only the owning process holds, and a daemon thread that ends the
  worker (`os._exit(OWNER_GONE)`) when that pipe reaches end-of-file. That happens when the owner
  closes the pool with `abort=True` (an error, Ctrl-C: a tar in progress is not waited for) and
  when the owner dies in any way, SIGKILL included: no worker outlives a killed `cxrfast shard`,
  and every worker of an aborted pool exits, including one started while the pool was closing
  (one left alive would block forever on the call queue's lock held by a dead sibling and hang
  the interpreter's exit).
- **Dead workers are errors, not hangs.** A worker that dies (segfault, OOM kill, `os._exit`)
  breaks the pool; that is raised as WorkerError naming the task and the dead workers' pids and
  exit codes (read from `multiprocessing.active_children()` snapshots of the pool's processes).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection
from typing import Any

PRELOAD = ["cxrfast.shards._preload"]
#: Exit status of a worker whose owner closed the pool with abort=True or died.
OWNER_GONE = 70
_GUARD_HINT = (
    " If sharding was started from a Python script: each worker re-imports the caller's main "
    "script, so the script must call cxrfast under `if __name__ == \"__main__\":` (see cxrfast.shards.pool)."
)


class WorkerError(RuntimeError):
    """A task failed in a worker, or a worker process died."""


def _watch_owner(owner: Connection) -> None:
    """Worker initializer: exit this worker when the owner's end of `owner` closes."""

    def watch() -> None:
        try:
            owner.recv_bytes()  # nothing is ever sent: this returns only by EOFError at end-of-file
        except (EOFError, OSError):
            pass
        os._exit(OWNER_GONE)

    threading.Thread(target=watch, name="cxrfast-owner-watch", daemon=True).start()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"


class WorkerPool:
    """`workers` processes started right away from a background thread (their start-up -- the
    forkserver's preload -- overlaps whatever the caller does next); `map_unordered` runs tasks
    with a bounded number in flight. Use as a context manager: on an error the remaining tasks
    are cancelled and the workers stopped instead of waited for."""

    def __init__(self, workers: int, *, preload: Iterable[str] = PRELOAD) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        from cxrfast.shards.worker import ready

        self.workers = workers
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))  # takes effect when this process's forkserver starts
        self._owner_r, self._owner_w = ctx.Pipe(duplex=False)
        self._before = {p.pid for p in mp.active_children()}
        self._procs: dict[int, mp.process.BaseProcess] = {}
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_watch_owner, initargs=(self._owner_r,))
        self._start_error: BaseException | None = None

        def start() -> None:
            try:
                # One no-op task per worker: a submit with no idle worker starts a process.
                for f in [self._pool.submit(ready) for _ in range(workers)]:
                    f.result()
            except BaseException as e:  # re-raised by wait_ready() in the caller's thread
                self._start_error = e
            self._track()

        self._starter = threading.Thread(target=start, name="cxrfast-start-workers", daemon=True)
        self._starter.start()

    def _track(self) -> None:
        """Remember the pool's live processes (for their exit codes once they died)."""
        for p in mp.active_children():
            if p.pid not in self._before:
                self._procs.setdefault(p.pid, p)  # type: ignore[arg-type]

    def wait_ready(self) -> None:
        """Block until every worker has started; raise WorkerError if they could not."""
        self._starter.join()
        if self._start_error is not None:
            hint = _GUARD_HINT if getattr(sys.modules.get("__main__"), "__file__", None) else ""
            raise WorkerError(f"the sharding worker processes could not start: {self._why(self._start_error).rstrip('.')}.{hint}") from (
                self._start_error
            )

    def _why(self, e: BaseException) -> str:
        if not isinstance(e, BrokenProcessPool):
            return f"{type(e).__name__}: {e}"
        dead = [f"pid {pid} {_describe_exit(p.exitcode)}" for pid, p in self._procs.items() if p.exitcode not in (None, 0)]
        return "a worker process died" + (f" ({', '.join(dead)})" if dead else "") + f": {e}"

    def map_unordered(
        self, fn: Callable[[Any], Any], jobs: Iterable[tuple[str, Any]], *, in_flight: int
    ) -> Iterator[tuple[str, Any]]:
        """Run `fn(arg)` for each `(name, arg)` in `jobs`, at most `in_flight` at a time (bounded
        memory); yield `(name, result)` as they finish. A task's exception or a dead worker is
        raised as WorkerError naming the task."""
        self.wait_ready()
        it = iter(jobs)
        pending: dict[Future, str] = {}

        def submit_next() -> None:
            job = next(it, None)
            if job is not None:
                name, arg = job
                pending[self._pool.submit(fn, arg)] = name
                self._track()

        for _ in range(max(1, in_flight)):
            submit_next()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                name = pending.pop(fut)
                try:
                    result = fut.result()
                except BrokenProcessPool as e:
                    raise WorkerError(f"{name}: {self._why(e)}") from e
                except Exception as e:
                    raise WorkerError(f"{name} failed: {type(e).__name__}: {e}") from e
                submit_next()
                yield name, result

    def close(self, *, abort: bool = False) -> None:
        """Shut the pool down; with abort=True cancel queued tasks and stop the workers at once
        (a task still running is not waited for)."""
        if abort:
            self._track()
            self._owner_w.close()  # every worker's watcher sees end-of-file and exits
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._starter.join(timeout=30)
            self._track()
            for p in self._procs.values():
                p.join(timeout=10)
        else:
            self._starter.join()
            self._pool.shutdown(wait=True)
            self._owner_w.close()
        self._owner_r.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(abort=exc_type is not None)


def _probe(names: tuple[str, ...]) -> dict[str, Any]:
    """Diagnostics for tests, run in a worker: which of `names` it has imported, and the file
    its `__main__` came from (None when the caller's main was not re-imported)."""
    return {"imported": [n for n in names if n in sys.modules], "main": getattr(sys.modules["__main__"], "__file__", None)}


__all__ = ["WorkerPool", "WorkerError", "PRELOAD", "OWNER_GONE"]
