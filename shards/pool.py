"""The sharding worker pool: a `ProcessPoolExecutor` whose processes are forked from a clean
multiprocessing forkserver that preloaded `cxrfast.shards._preload` (worker module, OpenCV set
to one thread, numba loops loaded), and that never replay the caller's `__main__`.

Why not the stock forkserver/spawn context: a new process started by either runs
`multiprocessing.spawn.prepare()`, which re-executes the parent's main script (or re-imports its
main module) as `__mp_main__` before it runs any task. Our tasks are functions of
`cxrfast.shards.worker` and need nothing from the caller's main, but the replay made every
worker import whatever the caller's script imports at top level (torch: +1.5 s and +300 MB per
worker), and a caller without an `if __name__ == "__main__":` guard (a plain script, a
notebook exported to a script) ran its whole sharding call again inside each worker: nested
pools, a second metadata/tokenizer pass over the same output folder, a broken pool. (The
forkserver's own `"__main__"` preload entry does not help: CPython 3.11 filters the main path
out of the data it passes to the server, so it is a no-op, and where it works it would run the
caller's script in the server.) `_Popen` below sends the workers the usual preparation data
minus the two main-module entries, so sharding behaves the same from any caller.

A worker that dies (segfault, SIGKILL from the OOM killer, `os._exit`) breaks the pool; that is
raised as `WorkerError` naming the task, the worker's pid and exit code -- never a hang.
"""

from __future__ import annotations

import signal
import threading
import types
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import context, popen_forkserver, spawn
from typing import Any

PRELOAD = ["cxrfast.shards._preload"]


class WorkerError(RuntimeError):
    """A task failed in a worker, or a worker process died."""


class _SpawnWithoutMain:
    """`multiprocessing.spawn` as `_Popen._launch` sees it: the preparation data sent to a new
    worker (sys.path, cwd, authkey, ...) without `init_main_from_path` / `init_main_from_name`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(spawn, name)

    @staticmethod
    def get_preparation_data(name: str) -> dict[str, Any]:
        data = spawn.get_preparation_data(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data


class _Popen(popen_forkserver.Popen):
    # The stdlib's own `_launch` (whatever this Python's version of it is), looking up `spawn`
    # in a copy of its module's globals where it is `_SpawnWithoutMain`; nothing else changes.
    _launch = types.FunctionType(
        popen_forkserver.Popen._launch.__code__,
        {**vars(popen_forkserver), "spawn": _SpawnWithoutMain()},
        "_launch",
    )


class _Process(context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):  # noqa: N802 (multiprocessing's name)
        return _Popen(process_obj)


class _Context(context.ForkServerContext):
    Process = _Process


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
    are cancelled and the workers terminated instead of waited for."""

    def __init__(self, workers: int, *, preload: Iterable[str] = PRELOAD) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        from cxrfast.shards.worker import ready

        self.workers = workers
        ctx = _Context()
        ctx.set_forkserver_preload(list(preload))  # takes effect when this process's forkserver starts
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        self._start_error: BaseException | None = None

        def start() -> None:
            try:
                # One no-op task per worker: each submit with no idle worker starts a process.
                for f in [self._pool.submit(ready) for _ in range(workers)]:
                    f.result()
            except BaseException as e:  # re-raised by wait_ready() in the caller's thread
                self._start_error = e

        self._starter = threading.Thread(target=start, name="cxrfast-start-workers", daemon=True)
        self._starter.start()

    def wait_ready(self) -> None:
        """Block until every worker has started; raise WorkerError if they could not."""
        self._starter.join()
        if self._start_error is not None:
            raise WorkerError(f"the sharding worker processes could not start: {self._why(self._start_error)}") from (
                self._start_error
            )

    def _why(self, e: BaseException) -> str:
        if not isinstance(e, BrokenProcessPool):
            return f"{type(e).__name__}: {e}"
        # ProcessPoolExecutor keeps its processes in `_processes` (pid -> Process); the exit codes
        # are the only clue to why one died, so read them where this Python has them.
        procs = getattr(self._pool, "_processes", None) or {}
        dead = [f"pid {pid} {_describe_exit(p.exitcode)}" for pid, p in procs.items() if p.exitcode not in (None, 0)]
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
        """Shut the pool down; with abort=True cancel queued tasks and terminate the workers
        (a task still running is not waited for)."""
        if not abort:
            self._starter.join()
            self._pool.shutdown(wait=True)
            return
        # The executor's live pid -> Process dict (shutdown() drops the executor's reference to
        # it, the management thread keeps using it). Shut down first so that no submit -- e.g. the
        # starter thread's, when the caller failed before wait_ready() -- can start a process
        # after we looked; then terminate every worker. A worker killed while it waited on the
        # call queue holds the queue's lock for good, so any worker left alive would block on it
        # forever and hang the interpreter's exit: none may be missed.
        procs_by_pid = getattr(self._pool, "_processes", None) or {}
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._starter.join(timeout=10)
        procs = list(procs_by_pid.values())
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(abort=exc_type is not None)



def _probe(names: tuple[str, ...]) -> dict[str, Any]:
    """Diagnostics for tests, run in a worker: which of `names` it has imported, and the file
    its `__main__` came from (None: the caller's main was not replayed)."""
    import sys

    return {"imported": [n for n in names if n in sys.modules], "main": getattr(sys.modules["__main__"], "__file__", None)}

__all__ = ["WorkerPool", "WorkerError", "PRELOAD"]
