"""`cxrfast inspect`: passes on good shards, exits non-zero listing every tampering."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cxrfast.cli import app
from cxrfast.shards.inspect import inspect_shards
from cxrfast.shards.manifest import file_sha256
from cxrfast.shards.tarwriter import IndexedTarWriter


@pytest.mark.parametrize("fixture", ["mimic_shards", "chexpert_shards", "mimic_shards_mrm_tokenizer"])
def test_inspect_passes_on_good_shards(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    shards: Path = request.getfixturevalue(fixture)
    r = CliRunner().invoke(app, ["inspect", str(shards), "--samples", "6", "--sheet", str(tmp_path / "s.png")])
    assert r.exit_code == 0, r.output
    m = json.loads((shards / "manifest.json").read_text())
    for split, tars in m["splits"].items():
        assert f"{split} {sum(t['samples'] for t in tars)}" in r.output
    assert "Pleural Effusion" in r.output and (tmp_path / "s.png").stat().st_size > 1000
    if fixture != "chexpert_shards":
        assert "report tokens: n=" in r.output


def _rewrite_tar(src: Path, dst: Path, edit) -> None:
    """Copy tar `src` to `dst` through our writer, letting `edit(key, members)` change samples."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(src) as tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read()  # type: ignore[union-attr]
    w = IndexedTarWriter(dst, dst.with_suffix(".idx"))
    for key, members in samples.items():
        w.write(key, edit(key, members))
    w.close()


def test_inspect_fails_listing_every_inconsistency(mimic_shards: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(mimic_shards, bad)
    m = json.loads((bad / "manifest.json").read_text())
    tars = [t for ts in m["splits"].values() for t in ts]
    assert len(tars) >= 3
    # 1. a flipped byte inside a member: sha256 mismatch
    t0 = bad / tars[0]["tar"]
    data = bytearray(t0.read_bytes())
    data[1024 + 100] ^= 0x55
    t0.write_bytes(bytes(data))
    # 2. an index that no longer matches its tar
    idx1 = bad / tars[1]["idx"]
    idx1.write_text(idx1.read_text().replace(" 512 ", " 1024 ", 1))
    # 3. a tar whose first sample lost its labels and whose second has an invalid code (manifest sha updated,
    #    so only the member checks can catch it)
    t2 = bad / tars[2]["tar"]
    first = {}

    def edit(key: str, members: dict[str, bytes]) -> dict[str, bytes]:
        if not first:
            first[key] = True
            return {k: v for k, v in members.items() if k != "labels.i8"}
        if len(first) == 1:
            first[key] = True
            lab = np.frombuffer(members["labels.i8"], np.int8).copy()
            lab[3] = 7
            return {**members, "labels.i8": lab.tobytes()}
        if len(first) == 2 and "report.ids.i32" in members:
            first[key] = True
            return {k: v for k, v in members.items() if k != "report.ids.i32"}
        return members

    _rewrite_tar(t2, t2, edit)
    tars[2]["sha256"], tars[2]["bytes"] = file_sha256(t2), t2.stat().st_size
    # 4. counts that do not add up
    m["counts"]["samples_out"] += 1
    (bad / "manifest.json").write_text(json.dumps(m))

    rep = inspect_shards(bad, samples=0)
    text = "\n".join(rep.problems)
    assert f"{tars[0]['tar']}: sha256 differs" in text
    assert f"{tars[1]['idx']} does not match its tar" in text
    assert "lacks members ['labels.i8']" in text and "invalid codes" in text
    assert "has report.txt without report.ids.i32" in text
    assert "counts.samples_out" in text
    r = CliRunner().invoke(app, ["inspect", str(bad), "--samples", "0"])
    assert r.exit_code == 1 and f"{len(rep.problems)} problem(s)" in r.output


def test_inspect_catches_missing_files(chexpert_shards: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(chexpert_shards, bad)
    m = json.loads((bad / "manifest.json").read_text())
    t = m["splits"]["train"][0]
    (bad / t["idx"]).unlink()
    (bad / m["splits"]["test"][0]["tar"]).unlink()
    (bad / "skipped.jsonl").write_text('{"key": "x", "path": "p", "reason": "missing_image", "detail": "d"}\n')
    problems = "\n".join(inspect_shards(bad, samples=0).problems)
    assert f"{t['idx']} is missing" in problems and "listed in the manifest but missing" in problems
    assert "skipped.jsonl: 1 rows" in problems
    with pytest.raises(ValueError, match="not a shard folder"):
        inspect_shards(tmp_path)
    from cxrfast.shards.lock import FolderLock

    with FolderLock(tmp_path), pytest.raises(ValueError, match=f"being written by a cxrfast shard run \\(pid {os.getpid()} on"):
        inspect_shards(tmp_path)


def test_inspect_lists_a_damaged_manifest_tokenizer_and_sample_table(mimic_shards: Path, tmp_path: Path) -> None:
    import polars as pl

    bad = tmp_path / "bad"
    shutil.copytree(mimic_shards, bad)
    m = json.loads((bad / "manifest.json").read_text())
    entry = m["splits"]["train"][0]
    del entry["sha256"]  # an entry without its sha256
    (bad / "tokenizer.json").unlink()
    table = pl.read_parquet(bad / "samples.parquet")
    table.reverse().write_parquet(bad / "samples.parquet")  # same rows, not in tar order
    m["sample_table"]["sha256"] = file_sha256(bad / "samples.parquet")
    (bad / "manifest.json").write_text(json.dumps(m))
    text = "\n".join(inspect_shards(bad, samples=0).problems)
    assert "splits['train'][0] lacks ['sha256']" in text
    assert "tokenizer.json: tokenizer file named in" in text and "is missing" in text
    assert f"rows of {entry['tar']} do not match the tar's samples" in text
    table.head(3).write_parquet(bad / "samples.parquet")  # rows missing, sha256 stale
    text = "\n".join(inspect_shards(bad, samples=0).problems)
    assert "samples.parquet: sha256 differs" in text or "sample table:" in text


def test_inspect_prints_the_verdict_before_a_contact_sheet_it_cannot_write(
    chexpert_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cxrfast.shards.inspect as inspect_mod

    def read_only(*_a, **_k):  # what a read-only shard folder does to the default sheet path
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(inspect_mod, "contact_sheet", read_only)
    r = CliRunner().invoke(app, ["inspect", str(chexpert_shards), "--samples", "2"])
    assert r.exit_code == 0, r.output
    assert f"OK: {chexpert_shards} is consistent" in r.stdout
    assert "warning: cannot write the contact sheet" in r.stderr and "--sheet" in r.stderr
    r = CliRunner().invoke(app, ["inspect", str(chexpert_shards), "--samples", "2", "--sheet", "/x/s.png"])
    assert r.exit_code == 2 and "OK:" in r.stdout and "error: cannot write the contact sheet /x/s.png" in r.stderr
