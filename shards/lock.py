"""One writer per shard folder: an advisory `flock` on `OUT/.cxrfast.lock`.

The kernel releases an `flock` when the process holding it exits, however it exits (SIGKILL and
OOM kills included), so a crashed run never leaves the folder locked; the file itself stays
behind only when the process dies, and then it is merely a note of who held it last. The lock
is taken on an open file description that is not inherited by child processes (Python opens
files non-inheritable, and the sharding workers are started by a multiprocessing forkserver),
so a worker outliving its parent cannot keep the folder locked either.

The file holds `{"pid", "host", "started", "argv"}` of the holder, for the refusal message. On
release the file is unlinked before the lock is dropped; an acquirer checks after locking that
the file it locked is still the one at the path (same inode), and retries otherwise, so an
unlink never lets two runs in at once.

`flock` works on local filesystems and on NFSv4 (Linux maps it to an NFS byte-range lock);
on a filesystem without lock support the error says so instead of silently not locking.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".cxrfast.lock"


class FolderLocked(ValueError):
    """Another process holds the folder's lock (a ValueError: the CLI prints it as an error)."""


def lock_holder(folder: Path) -> dict | None:
    """Who holds `folder`'s lock, from the lock file ({} when it cannot be read), or None when
    nobody holds it. Does not take the lock for longer than the probe."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_info(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_info(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        info = json.loads(data.decode())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(info: dict) -> str:
    if not info:
        return "another process"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])) if "started" in info else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} (started {when}: {' '.join(info.get('argv') or [])})"


class FolderLock:
    """`with FolderLock(out, what="cxrfast shard"):` holds `out`'s lock (`out` must exist).

    Raises FolderLocked naming the holder when another process has it, and ValueError when the
    lock file cannot be created (read-only folder, filesystem without locks).
    """

    def __init__(self, folder: Path, *, what: str = "cxrfast shard") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        for _ in range(100):  # a retry only follows a concurrent release; 100 is a hang guard
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ValueError(f"cannot create the lock file {self.path}: {e.strerror} (is {self.folder} writable?)") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read_info(fd)
                os.close(fd)
                raise FolderLocked(
                    f"{self.folder} is being written by another {self.what} run: {_describe(info)}; "
                    "wait for it to finish, or pick another --out"
                ) from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise ValueError(f"{self.folder}: the filesystem does not support file locks ({e.strerror})") from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (and unlinked) it between our open and flock
                os.close(fd)
                continue
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv[:8]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            self._fd = fd
            return self
        raise ValueError(f"could not lock {self.path}: it kept being replaced")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["LOCK_FILE", "FolderLock", "FolderLocked", "lock_holder"]
