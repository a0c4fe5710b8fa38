"""`shard_mimic` / `shard_chexpert` end to end: the shard contract, bad input, resume,
determinism, refusal of a foreign output folder, the CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest
from shard_tiny import make_tiny_chexpert, make_tiny_mimic
from shard_tiny import tar_samples as _samples

from cxrfast.shards.build import shard_chexpert, shard_mimic
from cxrfast.shards.schema import (
    LABEL_NAMES,
    MANIFEST,
    MANIFEST_FIELDS,
    METADATA_FIELDS,
    SKIPPED,
    decode_member,
)


def _manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def _assert_in_eq_out_plus_skipped(out: Path) -> dict:
    m = _manifest(out)
    c = m["counts"]
    n_tar = sum(t["samples"] for ts in m["splits"].values() for t in ts)
    skipped = [json.loads(x) for x in (out / SKIPPED).read_text().splitlines()]
    assert c["rows_in"] == c["samples_out"] + c["skipped"] == n_tar + len(skipped) == len(_samples(out)) + len(skipped)
    assert sum(m["skipped"].values()) == len(skipped)
    return m


def _tiny(tmp_path: Path, **kw) -> Path:
    raw = tmp_path / "raw"
    make_tiny_mimic(raw, **kw)
    return raw


def _shard(raw: Path, out: Path, **kw):
    kw.setdefault("samples_per_tar", 3)
    kw.setdefault("workers", 2)
    kw.setdefault("vocab_size", 200)
    return shard_mimic(raw, raw / "mimic-cxr-reports.zip", out, **kw)


# --- the contract on the session fixtures (synthetic MIMIC / CheXpert) --------------------
def test_mimic_shards_follow_the_contract(mimic_shards: Path, mimic_raw: Path) -> None:
    from tokenizers import Tokenizer

    m = _assert_in_eq_out_plus_skipped(mimic_shards)
    assert tuple(m) == MANIFEST_FIELDS and m["dataset"] == "mimic" and m["label_names"] == list(LABEL_NAMES)
    assert 0.0 < m["pixel_stats"]["mean"] < 1.0 and 0.0 < m["pixel_stats"]["std"] < 0.5
    tok = Tokenizer.from_file(str(mimic_shards / m["tokenizer"]["file"]))
    assert m["tokenizer"]["special_ids"]["pad"] == 0 and m["tokenizer"]["vocab_size"] == tok.get_vocab_size()
    labels = pl.read_csv(mimic_raw / "mimic-cxr-2.0.0-chexpert.csv.gz", infer_schema_length=0)
    assert labels.columns[2:] == sorted(LABEL_NAMES)  # alphabetical in the source: mapping must go by name
    by_study = {(r["subject_id"], r["study_id"]): r for r in labels.iter_rows(named=True)}
    samples = _samples(mimic_shards)
    assert samples
    with_report = 0
    for key, mem in samples.items():
        meta = json.loads(mem["json"])
        assert tuple(meta) == METADATA_FIELDS and meta["image_id"] == key and meta["view"] in ("PA", "AP")
        img = cv2.imdecode(np.frombuffer(mem["jpg"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert img.ndim == 2 and max(img.shape) == 512  # sources are 700-1000 px
        assert round(meta["orig_width"] / meta["orig_height"], 1) == round(img.shape[1] / img.shape[0], 1)
        row = by_study.get((meta["subject_id"], meta["study_id"]))
        want = [-2 if row is None or not row[n] else int(float(row[n])) for n in LABEL_NAMES]
        assert decode_member("labels.i8", mem["labels.i8"]).tolist() == want
        assert ("ids.i32" in mem) == ("txt" in mem)
        if "ids.i32" in mem:
            with_report += 1
            ids = decode_member("ids.i32", mem["ids.i32"]).tolist()
            assert ids == tok.encode(mem["txt"].decode()).ids and ids[0] == m["tokenizer"]["special_ids"]["cls"]
            assert meta["report_sections"] and "  " not in mem["txt"].decode()
    assert with_report + m["counts"]["without_report"] == len(samples)


def test_shards_carry_the_whole_report_too(mimic_shards: Path, mimic_raw: Path) -> None:
    """MRM trains on the whole report: every sample with a report also holds it, whitespace
    collapsed, and its token ids; findings + impression stay in ids.i32 / txt."""
    from tokenizers import Tokenizer

    from cxrfast.shards.reports import ReportStore

    m = _manifest(mimic_shards)
    assert m["tokenizer"]["texts"] == ["findings_impression", "report", "mgca_caption"]
    tok = Tokenizer.from_file(str(mimic_shards / m["tokenizer"]["file"]))
    store = ReportStore(mimic_raw / "mimic-cxr-reports.zip")
    n = 0
    for mem in _samples(mimic_shards).values():
        assert ("report.ids.i32" in mem) == ("report.txt" in mem) == ("ids.i32" in mem)
        if "ids.i32" not in mem:
            continue
        meta = json.loads(mem["json"])
        full = mem["report.txt"].decode()
        assert full == " ".join(store.read(meta["subject_id"], meta["study_id"]).split())
        assert all(body in full for body in meta["report_sections"].values())
        assert len(full) > len(mem["txt"].decode())
        assert decode_member("report.ids.i32", mem["report.ids.i32"]).tolist() == tok.encode(full).ids
        n += 1
    assert n > 0


def test_shards_carry_mgca_caption(mimic_shards: Path) -> None:
    """MGCA's caption (impression + findings as lower-case words) beside the other texts, with its ids;
    absent exactly where MGCA's rule leaves the study out."""
    from tokenizers import Tokenizer

    from cxrfast.shards.reports import mgca_caption

    m = _manifest(mimic_shards)
    tok = Tokenizer.from_file(str(mimic_shards / m["tokenizer"]["file"]))
    n = 0
    for mem in _samples(mimic_shards).values():
        assert ("mgca.ids.i32" in mem) == ("mgca.txt" in mem)
        if "ids.i32" not in mem:
            assert "mgca.ids.i32" not in mem
            continue
        caption = mgca_caption(json.loads(mem["json"])["report_sections"])
        assert ("mgca.txt" in mem) == (caption is not None)
        if caption is not None:
            assert mem["mgca.txt"].decode() == caption
            assert decode_member("mgca.ids.i32", mem["mgca.ids.i32"]).tolist() == tok.encode(caption).ids
            n += 1
    assert n > 0


def test_mrm_style_tokenizer_without_sep(mimic_shards_mrm_tokenizer: Path, mrm_tokenizer: Path) -> None:
    """MRM's `mimic_wordpiece.json` has no [SEP] and no post-processor: it loads, the manifest lists no
    "sep", and the stored ids are MRM's `tokenizer.encode("[CLS] " + text)` for both texts."""
    from tokenizers import Tokenizer

    m = _manifest(mimic_shards_mrm_tokenizer)
    assert m["tokenizer"]["special_ids"] == {"pad": 0, "unk": 1, "cls": 2, "mask": 3}
    as_mrm = Tokenizer.from_file(str(mrm_tokenizer))  # no post-processor: MRM prefixes "[CLS] " itself
    n = 0
    for mem in _samples(mimic_shards_mrm_tokenizer).values():
        for ids, txt in (("ids.i32", "txt"), ("report.ids.i32", "report.txt")):
            if ids in mem:
                want = as_mrm.encode("[CLS] " + mem[txt].decode()).ids
                assert decode_member(ids, mem[ids]).tolist() == want and want[0] == 2
                n += 1
    assert n > 0


def test_chexpert_shards_follow_the_contract(chexpert_shards: Path, chexpert_raw: Path) -> None:
    m = _assert_in_eq_out_plus_skipped(chexpert_shards)
    assert m["dataset"] == "chexpert" and m["tokenizer"] is None and set(m["splits"]) == {"train", "validate", "test"}
    root = chexpert_raw / "CheXpert-v1.0-small"
    valid = pl.read_csv(root / "valid.csv", infer_schema_length=0).filter(pl.col("Frontal/Lateral") == "Frontal")
    samples = _samples(chexpert_shards)
    split_of = {k: json.loads(v["json"])["split"] for k, v in samples.items()}
    from cxrfast.shards.schema import chexpert_key

    assert {k for k, s in split_of.items() if s == "test"} == {chexpert_key(p) for p in valid["Path"]}
    patients = {s: {k.split("_")[0] for k, v in split_of.items() if v == s} for s in ("train", "validate")}
    assert patients["validate"] and not patients["train"] & patients["validate"]  # held out by patient
    for mem in samples.values():
        assert "ids.i32" not in mem and "txt" not in mem
        assert json.loads(mem["json"])["sex"] in ("M", "F", "")


# --- bad input ---------------------------------------------------------------------------
def test_missing_csv_and_missing_columns_are_clear_errors(tmp_path: Path) -> None:
    raw = _tiny(tmp_path, studies=3)
    (raw / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(ValueError, match=r"missing CSV .*mimic-cxr-2\.0\.0-split\.csv\.gz"):
        _shard(raw, tmp_path / "out")
    meta = raw / "mimic-cxr-2.0.0-metadata.csv.gz"
    df = pl.read_csv(meta, infer_schema_length=0).drop("ViewPosition", "study_id")
    with gzip.open(meta, "wb") as f:
        df.write_csv(f)
    make_tiny_mimic(tmp_path / "raw2", studies=3)
    shutil.copy(tmp_path / "raw2/mimic-cxr-2.0.0-split.csv.gz", raw)
    with pytest.raises(ValueError, match=r"metadata\.csv\.gz: missing columns \['study_id', 'ViewPosition'\]"):
        _shard(raw, tmp_path / "out")
    root = make_tiny_chexpert(tmp_path / "chex", patients=3)
    csv = root / "train.csv"
    csv.write_text(csv.read_text().replace("Pleural Effusion", "Effusion"))
    with pytest.raises(ValueError, match=r"train\.csv: missing columns \['Pleural Effusion'\]"):
        shard_chexpert(root, tmp_path / "out_c", workers=1)


def test_bad_keys_and_label_values_are_clear_errors(tmp_path: Path) -> None:
    raw = _tiny(tmp_path, studies=3)
    lab = raw / "mimic-cxr-2.0.0-chexpert.csv.gz"
    df = pl.read_csv(lab, infer_schema_length=0)
    with gzip.open(lab, "wb") as f:
        df.with_columns(pl.lit("2.0").alias("Edema")).write_csv(f)
    with pytest.raises(ValueError, match=r"chexpert\.csv\.gz: column 'Edema' holds '2\.0'"):
        _shard(raw, tmp_path / "out")
    with gzip.open(lab, "wb") as f:
        df.write_csv(f)
    meta = raw / "mimic-cxr-2.0.0-metadata.csv.gz"
    df = pl.read_csv(meta, infer_schema_length=0)
    with gzip.open(meta, "wb") as f:
        df.with_columns(pl.col("dicom_id").str.replace("abc", "a.c")).write_csv(f)
    with pytest.raises(ValueError, match=r"metadata\.csv\.gz: bad dicom_id: invalid sample key"):
        _shard(raw, tmp_path / "out")


def test_bad_rows_are_skipped_counted_and_listed(tmp_path: Path) -> None:
    raw = _tiny(tmp_path, studies=6, no_report=2)
    jpgs = sorted(raw.glob("files/**/*.jpg"))
    frontal = [p for p in jpgs if cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape[0] == 600]  # PA/AP are 600 high
    frontal[0].unlink()  # missing image
    frontal[1].write_bytes(b"\xff\xd8 garbage")  # undecodable
    frontal[2].write_bytes(frontal[2].read_bytes()[:2000])  # truncated
    s = _shard(raw, tmp_path / "out", max_skipped_fraction=1.0)
    m = _assert_in_eq_out_plus_skipped(tmp_path / "out")
    assert m["skipped"] == {"missing_image": 1, "undecodable_image": 2} == s.skipped
    rows = [json.loads(x) for x in (tmp_path / "out" / SKIPPED).read_text().splitlines()]
    assert {r["key"] for r in rows} == {p.stem for p in frontal[:3]}
    assert all(set(r) == {"key", "path", "reason", "detail"} and r["path"].startswith("files/p") for r in rows)
    # The two studies without report (the last two) are kept, without ids/txt, and counted.
    samples = _samples(tmp_path / "out")
    no_report = [k for k, v in samples.items() if "txt" not in v]
    assert len(no_report) == m["counts"]["without_report"] > 0
    assert all(json.loads(samples[k]["json"])["study_id"] in ("50000004", "50000005") for k in no_report)


def test_resume_keeps_good_tars_and_rewrites_bad_ones(tmp_path: Path) -> None:
    raw = _tiny(tmp_path, studies=8)
    out = tmp_path / "out"
    _shard(raw, out)
    first = {p.name: p.read_bytes() for p in sorted(out.glob("*.tar")) + sorted(out.glob("*.idx"))}
    tars = sorted(out.glob("train-*.tar"))
    assert len(tars) >= 3
    tars[0].unlink()  # deleted
    data = bytearray(tars[1].read_bytes())
    data[700] ^= 0xFF  # corrupted (same size)
    tars[1].write_bytes(bytes(data))
    (out / "manifest.json").unlink()  # the run "crashed" before the manifest...
    (out / (tars[2].name + ".tmp")).write_bytes(b"partial")  # ...while writing a tar
    tars[2].unlink()
    (out / ".progress" / (tars[2].name + ".json")).unlink()
    s = _shard(raw, out)
    n_tars = len(first) // 2
    assert s.tars_resumed == n_tars - 3 and s.tars == n_tars
    assert {p.name: p.read_bytes() for p in sorted(out.glob("*.tar")) + sorted(out.glob("*.idx"))} == first
    assert not list(out.glob("*.tmp"))
    _assert_in_eq_out_plus_skipped(out)


def test_output_folder_of_another_dataset_or_parameters_is_refused(tmp_path: Path) -> None:
    raw = _tiny(tmp_path, studies=3)
    out = tmp_path / "out"
    _shard(raw, out)
    root = make_tiny_chexpert(tmp_path / "chex", patients=3)
    with pytest.raises(ValueError, match="manifest of dataset 'mimic'.*--overwrite"):
        shard_chexpert(root, out, workers=1)
    with pytest.raises(ValueError, match=r"other parameters or inputs: max_size 512 -> 256 \(use --overwrite"):
        _shard(raw, out, max_size=256)
    s = shard_chexpert(root, out, workers=1, overwrite=True)
    assert _manifest(out)["dataset"] == "chexpert" and s.samples > 0
    assert not (out / "tokenizer.json").exists() and all(p.name.startswith(("train", "validate", "test")) for p in out.glob("*.tar"))
    _assert_in_eq_out_plus_skipped(out)


# --- determinism, options ----------------------------------------------------------------
def _digests(out: Path) -> dict[str, str]:
    names = [p for p in out.iterdir() if p.suffix in (".tar", ".idx") or p.name == "tokenizer.json"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in names}


def test_same_inputs_and_seed_give_identical_tars(tmp_path: Path) -> None:
    raw = _tiny(tmp_path, studies=9)
    _shard(raw, tmp_path / "a", workers=2)
    _shard(raw, tmp_path / "b", workers=1)  # the worker count does not change the output
    _shard(raw, tmp_path / "c", workers=2, seed=1)
    a, b, c = _digests(tmp_path / "a"), _digests(tmp_path / "b"), _digests(tmp_path / "c")
    assert a == b and len(a) > 3
    assert a != c  # another seed, another order
    ma, mb = _manifest(tmp_path / "a"), _manifest(tmp_path / "b")
    assert ma["splits"] == mb["splits"] and ma["pixel_stats"] == mb["pixel_stats"]


def test_views_labels_png16_and_local_tokenizer(tmp_path: Path) -> None:
    raw = _tiny(tmp_path, studies=4)
    # A 16-bit PNG source instead of one JPEG.
    jpg = sorted(raw.glob("files/**/*.jpg"))[0]
    img16 = (cv2.imread(str(jpg), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 200 + 1000)
    cv2.imwrite(str(jpg.with_suffix(".png")), img16)
    jpg.unlink()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "lungs", "are", "clear", "."]
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert/vocab.txt").write_text("\n".join(vocab) + "\n")
    s = _shard(raw, tmp_path / "out", views="all", labels="negbio", tokenizer=tmp_path / "bert")
    m = _manifest(tmp_path / "out")
    samples = _samples(tmp_path / "out")
    assert s.samples == len(samples) == len(list(raw.glob("files/**/*.*")))  # every view kept
    assert {json.loads(v["json"])["view"] for v in samples.values()} == {"PA", "AP", "LATERAL"}
    png = samples[jpg.stem]
    assert json.loads(png["json"])["source_path"].endswith(".png")
    dec = cv2.imdecode(np.frombuffer(png["jpg"], np.uint8), cv2.IMREAD_UNCHANGED)
    assert dec.dtype == np.uint8 and dec.max() > 200 and dec.min() < 50  # windowed, not clipped to white
    assert m["tokenizer"]["vocab_size"] == len(vocab) and m["created_with"]["labels"] == "negbio"
    txts = [v for v in samples.values() if "txt" in v]
    assert any(decode_member("ids.i32", v["ids.i32"]).tolist()[1:3] == [5, 6] for v in txts)  # "the lungs"


def test_sharding_does_not_import_torch() -> None:
    code = "import sys, cxrfast.shards.build, cxrfast.shards.worker, cxrfast.shards.inspect; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# --- CLI ---------------------------------------------------------------------------------
def test_cli_shard_and_inspect(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cxrfast.cli import app

    raw = _tiny(tmp_path, studies=4)
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["shard", "mimic", "--root", str(raw), "--reports", str(raw / "mimic-cxr-reports.zip"), "--out", str(out)]
    r = runner.invoke(app, [*args, "--samples-per-tar", "4", "--workers", "2", "--vocab-size", "300"])
    assert r.exit_code == 0, r.output
    assert "mimic: " in r.output and "img/s" in r.output and "0 skipped" in r.output
    r = runner.invoke(app, ["inspect", str(out), "--samples", "4", "--sheet", str(tmp_path / "sheet.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "sheet.png").stat().st_size > 1000 and "Cardiomegaly" in r.output
    (raw / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
    r = runner.invoke(app, [*args, "--overwrite"])
    assert r.exit_code != 0 and "mimic-cxr-2.0.0-chexpert.csv.gz" in r.output
    root = make_tiny_chexpert(tmp_path / "chex", patients=3)
    r = runner.invoke(app, ["shard", "chexpert", "--root", str(root), "--out", str(tmp_path / "c"), "--workers", "1"])
    assert r.exit_code == 0, r.output


def test_dali_reads_the_mimic_shards_with_their_indices(mimic_shards: Path) -> None:
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    m = _manifest(mimic_shards)
    tars = [mimic_shards / t["tar"] for ts in m["splits"].values() for t in ts]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        jpg, lab, ids = fn.readers.webdataset(
            paths=[str(t) for t in tars], index_paths=[str(t.with_suffix(".idx")) for t in tars],
            ext=["jpg", "labels.i8", "ids.i32"], missing_component_behavior="empty", name="r",
        )  # fmt: skip
        return fn.decoders.image(jpg, device="cpu", output_type=0), lab, ids

    p = pipe()
    p.build()
    assert p.epoch_size("r") == m["counts"]["samples_out"]
    imgs, labs, _ = p.run()
    assert max(np.asarray(imgs[0]).shape[:2]) == 512 and np.asarray(labs[0]).size == 14


def test_synthetic_16bit_png_mimic(tmp_path: Path) -> None:
    from cxrfast.synth import make_mimic

    raw = tmp_path / "raw"
    make_mimic(raw, studies=4, seed=3, size_range=(600, 700), image_format="png16")
    assert list(raw.glob("files/**/*.png")) and not list(raw.glob("files/**/*.jpg"))
    s = _shard(raw, tmp_path / "out")
    m = _assert_in_eq_out_plus_skipped(tmp_path / "out")
    assert s.samples > 0 and not m["skipped"]
    for mem in _samples(tmp_path / "out").values():
        assert json.loads(mem["json"])["source_path"].endswith(".png")
        img = cv2.imdecode(np.frombuffer(mem["jpg"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint8 and max(img.shape) == 512 and img.std() > 20


# --- sharding from any caller; dead workers --------------------------------------------------
# Workers start from a forkserver and re-import the caller's main script (Python's own rule for
# the forkserver/spawn start methods): a script calls cxrfast under `if __name__ == "__main__":`
# and keeps heavy imports (torch) inside it. The subprocess timeouts are hang guards, not timing
# assertions.
_CALLER_BODY = """\
import sys
import torch  # noqa: F401  (the reported case: a process that imported torch first)
from pathlib import Path
from cxrfast.shards.build import shard_mimic
import cxrfast.shards.pool as pool

raw, out = Path(sys.argv[1]), Path(sys.argv[2])
s = shard_mimic(raw, raw / "mimic-cxr-reports.zip", out, workers=2, samples_per_tar=3, vocab_size=200)
# A worker must not hold torch or polars: check in a fresh pool, in the workers.
with pool.WorkerPool(1) as p:
    (_, probe), = p.map_unordered(pool._probe, [("probe", ("torch", "polars"))], in_flight=1)
print("RESULT", s.samples, probe["imported"], probe["main"])
"""
_GUARDED = "def main():\n" + "".join(f"    {line}\n" for line in _CALLER_BODY.splitlines()) + "\nif __name__ == '__main__':\n    main()\n"


@pytest.mark.parametrize("entry", ["guarded_script", "console_script", "python_c"])
def test_sharding_works_from_any_caller_that_imported_torch(tmp_path: Path, entry: str) -> None:
    raw = _tiny(tmp_path, studies=4)
    out = tmp_path / "out"
    script = tmp_path / "user_script.py"
    script.write_text(_GUARDED)
    if entry == "guarded_script":
        cmd, main = [sys.executable, str(script)], str(script)
    elif entry == "console_script":  # the shape pip gives `cxrfast`: a wrapper file without .py
        (tmp_path / "wrapper").write_text(
            f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(tmp_path)!r})\nfrom user_script import main\n"
            "if __name__ == '__main__':\n    sys.exit(main())\n"
        )
        cmd, main = [sys.executable, str(tmp_path / "wrapper")], str(tmp_path / "wrapper")
    else:
        cmd, main = [sys.executable, "-c", _CALLER_BODY], "None"
    res = subprocess.run([*cmd, str(raw), str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT")][-1]
    # no torch or polars in the workers; the caller's main re-imported there (if it has a file), not re-run
    assert line == f"RESULT {_manifest(out)['counts']['samples_out']} [] {main}"
    _assert_in_eq_out_plus_skipped(out)


def test_a_script_without_main_guard_gets_a_clear_error_not_a_nested_run(tmp_path: Path) -> None:
    raw = _tiny(tmp_path, studies=3)
    out = tmp_path / "out"
    script = tmp_path / "unguarded.py"
    script.write_text(_CALLER_BODY)
    res = subprocess.run([sys.executable, str(script), str(raw), str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "WorkerError" in res.stderr and 'if __name__ == "__main__":' in res.stderr
    # the re-run inside a worker was refused by the folder lock before it wrote anything
    assert "is being written by another cxrfast shard run" in res.stderr
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_a_dead_worker_is_a_clear_error_not_a_hang(how: str) -> None:
    import os
    import signal
    import threading

    from cxrfast.shards.pool import WorkerError, WorkerPool

    fn, arg = (os._exit, 3) if how == "exit" else (signal.raise_signal, signal.SIGKILL)
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            with WorkerPool(2) as p:
                list(p.map_unordered(fn, [("train-000007.tar", arg)], in_flight=2))
            result.append(None)
        except BaseException as e:  # noqa: BLE001
            result.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=120)  # hang guard
    assert not t.is_alive(), "the pool hung after a worker died"
    err = result[0]
    assert isinstance(err, WorkerError), repr(err)
    assert "train-000007.tar" in str(err) and "worker process died" in str(err)
    # The forkserver reports a child's status over a socket; when that read races the pool's
    # teardown, CPython's popen_forkserver.poll() records 255 ("status unknown") instead.
    assert ("exit code 3" if how == "exit" else "killed by SIGKILL") in str(err) or "exit code 255" in str(err)


def test_a_failing_task_names_the_tar_and_the_error() -> None:
    from cxrfast.shards.pool import WorkerError, WorkerPool

    with pytest.raises(WorkerError, match=r"val-000001\.tar failed: ValueError: invalid literal"):
        with WorkerPool(1) as p:
            list(p.map_unordered(int, [("val-000001.tar", "not a number")], in_flight=1))


_ABORT_RACE = """
import time
from concurrent.futures.process import BrokenProcessPool
from cxrfast.shards.pool import WorkerPool
from cxrfast.shards.worker import ready

wp = WorkerPool(1)
wp.wait_ready()
time.sleep(0.5)  # worker A idles in the call queue's get(), holding the queue's read lock
ex, real_shutdown = wp._pool, wp._pool.shutdown

def shutdown(*a, **k):  # a submit lands inside close(abort=True), as the starter thread's can
    ex._idle_worker_semaphore.acquire(blocking=False)
    ex._max_workers = 2
    try:
        ex.submit(ready)  # starts worker B
    except BrokenProcessPool:  # the abort already stopped worker A: no worker B can start (the race did not occur)
        pass
    time.sleep(0.5)
    return real_shutdown(*a, **k)

ex.shutdown = shutdown
wp.close(abort=True)
"""


def test_abort_terminates_a_worker_started_during_close() -> None:
    # A caller that fails right after creating the pool (a missing CSV) aborts while the starter
    # thread may still be submitting. A worker started then, and missed by the abort, blocks for
    # good on the queue lock of a terminated worker, and the interpreter never exits.
    proc = subprocess.run([sys.executable, "-c", _ABORT_RACE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_sample_table_lists_every_written_sample(mimic_shards: Path):
    from cxrfast.shards.folder import open_shards
    from cxrfast.shards.schema import LABEL_NAMES, SAMPLE_TABLE_COLUMNS

    folder = open_shards(mimic_shards)
    table = folder.sample_table()
    assert table.columns == [*SAMPLE_TABLE_COLUMNS, *LABEL_NAMES]
    assert table.height == sum(folder.split_samples.values())
    for split, entries in folder.manifest["splits"].items():
        for entry in entries:  # the table's keys per tar are the tar's keys, in tar order
            keys = [name.split(".", 1)[0] for name in tarfile.open(mimic_shards / entry["tar"]).getnames()]
            keys = list(dict.fromkeys(keys))
            sub = table.filter(pl.col("tar") == entry["tar"])
            assert sub["key"].to_list() == keys and set(sub["split"]) == {split}
    # labels as written in the tars
    first = folder.manifest["splits"]["train"][0]["tar"]
    with tarfile.open(mimic_shards / first) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(".labels.i8"))
        codes = np.frombuffer(tf.extractfile(member).read(), dtype=np.int8).tolist()
    row = table.filter(pl.col("key") == member.name.split(".", 1)[0])
    assert [row[name][0] for name in LABEL_NAMES] == codes
