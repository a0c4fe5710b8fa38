"""The promises `cxrfast shard` keeps about its output folder: one writer at a time (a crashed
run does not leave it locked), never vouching for a tar it did not verify, never touching files it
did not write, resuming only what the same inputs would produce, options checked before any work."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import polars as pl
import pytest
from shard_tiny import shard_tiny_mimic, tiny_mimic_raw

from cxrfast.shards.inspect import inspect_shards
from cxrfast.shards.manifest import check_unchanged, file_sha256
from cxrfast.shards.schema import MANIFEST
from cxrfast.shards.tarwriter import IndexedTarWriter

HANG_GUARD_S = 120  # a bound on waiting for a subprocess, not a timing assertion
LABEL_CSV = "mimic-cxr-2.0.0-chexpert.csv.gz"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --- one writer --------------------------------------------------------------------------------
_RUN = """
import sys
from pathlib import Path
from cxrfast.shards.build import shard_mimic
raw, reports, out = map(Path, sys.argv[1:4])
shard_mimic(raw, reports, out, samples_per_tar=3, workers=1, vocab_size=200)
"""


def test_a_second_writer_is_refused_and_a_killed_writer_leaves_no_lock(tmp_path: Path) -> None:
    raw = tiny_mimic_raw(tmp_path, studies=5)
    reports = tmp_path / "reports"
    with zipfile.ZipFile(raw / "mimic-cxr-reports.zip") as zf:
        zf.extractall(reports)
    # One train report is a FIFO: the first run blocks on it (tokenizer training) while it holds `out`.
    fifo = sorted(reports.glob("files/p*/p*/s*.txt"))[0]
    text = fifo.read_bytes()
    fifo.unlink()
    os.mkfifo(fifo)
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", _RUN, str(raw), str(reports), str(out)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not (out / ".progress" / "params.json").exists():  # claimed: metadata read, folder prepared
            assert first.poll() is None, first.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the first run never claimed the folder"
            time.sleep(0.2)
        second = subprocess.run(
            [sys.executable, "-c", _RUN, str(raw), str(reports), str(out)], capture_output=True, text=True,
            timeout=HANG_GUARD_S,
        )  # fmt: skip
        assert second.returncode != 0
        assert f"being written by another cxrfast shard run: pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: no clean-up runs
        first.wait(timeout=HANG_GUARD_S)
    fifo.unlink()
    fifo.write_bytes(text)  # a changed report (it is the input fingerprint's business to notice)
    s = shard_tiny_mimic(raw, out, reports, overwrite=True)  # the dead run's lock is not in the way
    assert s.samples > 0 and (out / MANIFEST).is_file() and not (out / ".cxrfast.lock").exists()


def test_two_writers_of_one_tar_are_caught_not_vouched_for(tmp_path: Path) -> None:
    tar, idx = tmp_path / "train-000000.tar", tmp_path / "train-000000.idx"
    w1, w2 = IndexedTarWriter(tar, idx), IndexedTarWriter(tar, idx)  # the same .tmp file, as two runs had
    payload = os.urandom(200_000)  # more than tarfile buffers: both write through to the file
    w1.write("a", {"jpg": payload})
    w2.write("b", {"jpg": payload[::-1]})
    with pytest.raises(ValueError, match="differ from the .* bytes written"):
        w1.close()
    with pytest.raises(ValueError):
        w2.close()
    assert not tar.exists()


def test_a_tar_changed_after_it_was_verified_is_not_vouched_for(tmp_path: Path) -> None:
    raw = tiny_mimic_raw(tmp_path, studies=3)
    out = tmp_path / "out"
    shard_tiny_mimic(raw, out)
    entry = json.loads((out / MANIFEST).read_text())["splits"]["train"][0]
    rec = json.loads((out / ".progress" / (entry["tar"] + ".json")).read_text())
    check_unchanged(out, rec)  # as written
    tar = out / entry["tar"]
    data = tar.read_bytes()
    tar.unlink()
    tar.write_bytes(bytes(len(data)))  # replaced by zeros of the same size (the observed race)
    with pytest.raises(ValueError, match=f"{entry['tar']} changed after it was written"):
        check_unchanged(out, rec)
    tar.unlink()
    with pytest.raises(ValueError, match="disappeared"):
        check_unchanged(out, rec)


# --- files that are not ours -----------------------------------------------------------------
def test_a_folder_of_foreign_files_is_refused_and_never_emptied(tmp_path: Path) -> None:
    raw = tiny_mimic_raw(tmp_path, studies=3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"made by another tool")
    (out / "notes.txt").write_text("mine")
    before = _files(out)
    for overwrite in (False, True):  # a name we would write: refused even with --overwrite
        with pytest.raises(ValueError, match=r"not written by cxrfast shard \(notes.txt, train-000000.tar\).*never deletes"):
            shard_tiny_mimic(raw, out, overwrite=overwrite)
        assert _files(out) == before and sorted(p.name for p in out.iterdir()) == ["notes.txt", "train-000000.tar"]
    (out / "train-000000.tar").unlink()
    with pytest.raises(ValueError, match=r"not empty and holds no shards of ours \(notes.txt\).*--overwrite"):
        shard_tiny_mimic(raw, out)
    assert shard_tiny_mimic(raw, out, overwrite=True).samples > 0  # written next to the foreign file
    shard_tiny_mimic(raw, out, overwrite=True, max_size=256)  # a rebuild of ours deletes only our files
    assert (out / "notes.txt").read_text() == "mine"


def test_bad_out_and_bad_options_fail_before_any_work(tmp_path: Path) -> None:
    raw = tiny_mimic_raw(tmp_path, studies=2)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="a_file is a file; expected a folder"):
        shard_tiny_mimic(raw, tmp_path / "a_file")
    with pytest.raises(ValueError, match=r"is below .*a_file, which is a file"):
        shard_tiny_mimic(raw, tmp_path / "a_file" / "out")
    with pytest.raises(ValueError, match="cannot create the folder"):  # sysfs refuses new folders, even to root
        shard_tiny_mimic(raw, Path("/sys/cxrfast-test-out/out"))
    out = tmp_path / "out"
    for kw, msg in (
        ({"samples_per_tar": 0}, "--samples-per-tar must be >= 1"),
        ({"workers": 0}, "--workers must be >= 1"),
        ({"max_skipped_fraction": 1.5}, "--max-skipped-fraction must be in"),
        ({"views": ","}, "--views is empty"),
        ({"labels": "nope"}, "--labels must be one of"),
    ):
        with pytest.raises(ValueError, match=msg):
            shard_tiny_mimic(raw, out, **kw)
        assert not out.exists()  # nothing claimed
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="missing CSV"):  # fails after locking: the new folder is removed again
        shard_tiny_mimic(empty, out, raw / "mimic-cxr-reports.zip")
    assert not out.exists()


# --- stale resume --------------------------------------------------------------------------
def test_resume_keys_on_the_inputs(tmp_path: Path) -> None:
    raw = tiny_mimic_raw(tmp_path, studies=8)
    out = tmp_path / "out"
    first = shard_tiny_mimic(raw, out)
    assert first.tars_resumed == 0
    # The same tables and images elsewhere (a copy keeping mtimes) are the same input: all kept.
    moved = tmp_path / "moved"
    shutil.copytree(raw, moved)
    assert shard_tiny_mimic(moved, out).tars_resumed == first.tars
    # Other reports: refused, naming the input.
    other = tmp_path / "other-reports.zip"
    with zipfile.ZipFile(raw / "mimic-cxr-reports.zip") as src, zipfile.ZipFile(other, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name).decode().replace("clear", "CLEAR"))
    with pytest.raises(ValueError, match=r"input reports \(other-reports.zip\) changed.*--overwrite"):
        shard_tiny_mimic(raw, out, other)
    # Another label table: refused, naming it; --overwrite rebuilds.
    lab = raw / LABEL_CSV
    df = pl.read_csv(lab, infer_schema_length=0)
    with gzip.open(lab, "wb") as f:
        df.with_columns(pl.lit("1.0").alias("Edema")).write_csv(f)
    with pytest.raises(ValueError, match=rf"input labels_csv \({LABEL_CSV}\) changed"):
        shard_tiny_mimic(raw, out)
    assert shard_tiny_mimic(raw, out, overwrite=True).tars_resumed == 0
    m = json.loads((out / MANIFEST).read_text())["created_with"]
    assert m["inputs"]["labels_csv"]["sha256"] == file_sha256(lab) and m["root"] == str(raw.resolve())


def test_an_image_fixed_after_a_run_rewrites_its_tar(tmp_path: Path) -> None:
    raw = tiny_mimic_raw(tmp_path, studies=8)
    out = tmp_path / "out"
    jpg = sorted(raw.glob("files/**/*.jpg"))[0]
    good = jpg.read_bytes()
    jpg.write_bytes(good[: len(good) // 3])  # truncated: skipped
    first = shard_tiny_mimic(raw, out, max_skipped_fraction=1.0)
    assert first.skipped == {"undecodable_image": 1}
    jpg.write_bytes(good)  # fixed
    again = shard_tiny_mimic(raw, out, max_skipped_fraction=1.0)
    assert again.skipped == {} and again.samples == first.samples + 1
    assert again.tars_resumed == first.tars - 1  # only the tar planned to hold it was rewritten
    assert inspect_shards(out, samples=0).problems == []  # manifest, sample table and tars agree
