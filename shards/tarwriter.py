"""A reproducible WebDataset tar writer that writes DALI's index (`wds2idx` format) as it goes.

Members are written the way webdataset's `TarWriter` writes them (USTAR, mode 0o444, one
member per `KEY.ext`, extensions in sorted order) with a fixed mtime/uid/gid/uname, so the same
samples give a byte-identical tar. We use the standard library's `tarfile` directly because
importing `webdataset` imports torch, which the sharding install must not need. The index is
`v1.2 N` followed by one line per sample: `ext offset size name` for each member, offsets of
the member data (after its 512-byte header) -- exactly what `wds2idx` derives from `tar --list`.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

from cxrfast.shards.schema import TAR_MTIME, check_key

IDX_VERSION = "v1.2"
_BLOCK = tarfile.BLOCKSIZE


class _HashingFile:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.aborted = False

    def write(self, b: bytes) -> int:
        if self.aborted:  # tarfile's stream may flush its buffer when garbage-collected
            return len(b)
        self.sha.update(b)
        self.nbytes += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


class IndexedTarWriter:
    """Write samples `{ext: bytes}` under `KEY.ext` to `tar_path` and its DALI index to `idx_path`.

    Both are written to `*.tmp` names and renamed into place by `close()` (tar last), so no
    partial file ever sits under a final name; `abort()` removes the temporaries.
    """

    def __init__(self, tar_path: Path, idx_path: Path, *, user: str = "cxrfast", group: str = "cxrfast") -> None:
        self.tar_path, self.idx_path = Path(tar_path), Path(idx_path)
        self._tar_tmp = self.tar_path.with_name(self.tar_path.name + ".tmp")
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + ".tmp")
        self._raw = open(self._tar_tmp, "w+b")  # noqa: SIM115 (closed in close/abort); read back by close()
        self._file = _HashingFile(self._raw)
        self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.USTAR_FORMAT)  # type: ignore[arg-type]
        self._lines: list[str] = []
        self.user, self.group = user, group
        self.samples = 0
        self.sha256: str | None = None
        self.nbytes = 0
        self.file_id: list[int] | None = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample; members are written in sorted extension order."""
        check_key(key)
        if not members:
            raise ValueError(f"sample {key!r} has no members")
        parts = []
        for ext in sorted(members):
            data = members[ext]
            name = f"{key}.{ext}"
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = int(TAR_MTIME)
            ti.mode = 0o444
            ti.uid = ti.gid = 0
            ti.uname, ti.gname = self.user, self.group
            self._tar.addfile(ti, io.BytesIO(data))
            # TarFile.offset is now just past the member's padded data.
            data_offset = self._tar.offset - -(-len(data) // _BLOCK) * _BLOCK
            parts.append(f"{ext} {data_offset} {len(data)} {name}")
        self._lines.append(" ".join(parts))
        self.samples += 1

    def close(self) -> tuple[str, int]:
        """Finish the tar, fsync, check that the file holds exactly the bytes written (re-read and
        re-hashed: another writer of the same path is caught here), rename both files into place;
        returns (sha256, bytes). `file_id` is then the tar's [size, inode, mtime_ns]."""
        if not self._lines:
            self.abort()
            raise ValueError(f"{self.tar_path.name}: refusing to write an empty tar (DALI cannot index it)")
        self._tar.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self.sha256, self.nbytes = self._file.sha.hexdigest(), self._file.nbytes
        try:
            self._verify_written()
        except BaseException:
            self.abort()
            raise
        with open(self._idx_tmp, "w") as f:
            f.write(f"{IDX_VERSION} {len(self._lines)}\n")
            for line in self._lines:
                f.write(line + "\n")
        ino = os.fstat(self._raw.fileno()).st_ino
        self._raw.close()
        try:
            ours = os.stat(self._tar_tmp).st_ino == ino
        except FileNotFoundError:
            ours = False
        if not ours:
            self._idx_tmp.unlink(missing_ok=True)
            raise ValueError(f"{self._tar_tmp} was removed or replaced while it was written (another writer?)")
        os.replace(self._idx_tmp, self.idx_path)
        os.replace(self._tar_tmp, self.tar_path)
        st = os.stat(self.tar_path)
        if st.st_ino != ino or st.st_size != self.nbytes:
            raise ValueError(f"{self.tar_path} was replaced while it was being renamed into place (another writer?)")
        self.file_id = [st.st_size, st.st_ino, st.st_mtime_ns]
        return self.sha256, self.nbytes

    def _verify_written(self) -> None:
        f = self._raw
        f.seek(0)
        h, n = hashlib.sha256(), 0
        while b := f.read(1 << 22):
            h.update(b)
            n += len(b)
        if n != self.nbytes or h.hexdigest() != self.sha256:
            raise ValueError(
                f"{self._tar_tmp}: the file holds {n} bytes that differ from the {self.nbytes} bytes written "
                "(another process wrote the same file?)"
            )

    def abort(self) -> None:
        """Drop the temporaries (e.g. after an error or when every sample was skipped)."""
        self._file.aborted = True
        self._tar.closed = True
        try:
            self._raw.close()
        finally:
            for p in (self._tar_tmp, self._idx_tmp):
                p.unlink(missing_ok=True)


def index_from_tar(tar_path: Path) -> str:
    """Re-derive a tar's DALI index text by reading it (what `cxrfast inspect` compares with)."""
    bundles: list[list[str]] = []
    last = None
    with tarfile.open(tar_path, mode="r:") as tf:
        for m in tf:
            if not m.isreg():
                continue
            base = m.name.rsplit("/", 1)
            fname = base[-1]
            dot = fname.find(".")
            key = (m.name[: len(m.name) - len(fname)] + fname[:dot]) if dot >= 0 else m.name
            ext = fname[dot + 1 :] if dot >= 0 else ""
            entry = f"{ext} {m.offset_data} {m.size} {m.name}"
            if key != last:
                bundles.append([entry])
                last = key
            else:
                bundles[-1].append(entry)
    return f"{IDX_VERSION} {len(bundles)}\n" + "".join(" ".join(b) + "\n" for b in bundles)
