"""`cxrfast eval linprobe|compare` end to end on synthetic CheXpert shards (DALI CPU mode): what is
written, resume, refusal of another evaluation's folder, every encoder form and protocol preset,
the in-memory probe, feature-cache invalidation, and each bad input's error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from cxrfast.cli import app
from cxrfast.eval import features
from cxrfast.eval.encoders import EncoderSpec, load
from cxrfast.shards.folder import open_shards

FAST = ["boot=200", "run.num_threads=1", "run.extract_batch_size=32"]


def linprobe(shards: Path, out: Path, *args: str, encoder: Path | None = None, ok: bool = True) -> str:
    cmd = ["eval", "linprobe", "--shards", str(shards), "--out", str(out)]
    cmd += ["--encoder", str(encoder)] if encoder is not None else []
    if "--task" not in args:
        cmd += ["--task", "chexpert5"]
    r = CliRunner().invoke(app, [*cmd, *args, *FAST])
    assert (r.exit_code == 0) == ok, r.output + repr(r.exception)
    return r.output


@pytest.fixture(scope="module")
def base_eval(eval_shards: Path, tiny_encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("evals") / "tiny"
    text = linprobe(eval_shards, out, "--fractions", "0.1,1", "--draws", "2", encoder=tiny_encoder)
    return out, text


def test_linprobe_writes_every_number_with_its_split_fraction_draw_policy_and_views(base_eval, eval_shards) -> None:
    out, text = base_eval
    assert "chexpert5 test AUC" in text and "Pleural Effusion" in text and "mean" in text
    res = json.loads((out / "results.json").read_text())
    assert res["labels"] == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    for row in res["records"] + res["summary"]:
        assert {"split", "fraction", "policy", "views"} <= set(row) and (row["policy"], row["views"]) == ("mgca", "frontal")
        assert row.get("auc", row.get("mean")) is None or 0.0 <= row.get("auc", row.get("mean")) <= 1.0
        if row.get("auc", row.get("mean")) is None:
            assert row["undefined"]  # an undefined number says why
    tests = [r for r in res["records"] if r["split"] == "test" and r["label"] != "mean"]
    assert {(r["fraction"], r["draw"]) for r in tests} == {(0.1, 0), (0.1, 1), (1.0, 0)}
    assert all(r["ci"][0] <= r["auc"] <= r["ci"][1] for r in tests if r["auc"] is not None)
    assert all(r["positives"] + r["negatives"] > 0 for r in tests)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["encoder"]["name"] == "tiny_mae" and cfg["inputs"]["image_size"] == 64 and cfg["protocol"]["name"] == "mgca"

    table = open_shards(eval_shards).sample_table()
    frontal_views = pl.col("view").is_in(["PA", "AP"])
    train = set(table.filter((pl.col("split") == "train") & frontal_views)["subject_id"])
    other = set(table.filter(pl.col("split") != "train")["subject_id"])
    drawn = [set((out / "draws" / f"fraction-0.1_draw-{d}.txt").read_text().split()) for d in (0, 1)]
    assert all(d and d <= train and not d & other for d in drawn) and drawn[0] != drawn[1]
    assert set((out / "draws" / "fraction-1_draw-0.txt").read_text().split()) == train
    preds = pl.read_parquet(out / "predictions" / "fraction-0.1_draw-0.parquet")
    assert set(preds["split"]) == {"validate", "test"} and "score::Edema" in preds.columns
    frontal = table.filter((pl.col("split") == "test") & frontal_views)
    assert sorted(preds.filter(pl.col("split") == "test")["key"]) == sorted(frontal["key"])  # views=frontal
    for png in ("label_efficiency.png", "roc.png"):
        assert (out / png).stat().st_size > 1000


def test_resume_redoes_only_the_missing_draw(base_eval, eval_shards, tiny_encoder, tmp_path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(base_eval[0], out)
    before = json.loads((out / "results.json").read_text())
    (out / "runs" / "fraction-0.1_draw-1.json").unlink()  # as if interrupted during that draw
    kept = {p: p.stat().st_mtime_ns for p in (out / "predictions").iterdir() if "draw-1" not in p.name}
    kept.update({p: p.stat().st_mtime_ns for p in (out / "features").iterdir()})
    linprobe(eval_shards, out, "--fractions", "0.1,1", "--draws", "2", encoder=tiny_encoder)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished draws and cached features untouched
    after = json.loads((out / "results.json").read_text())
    assert after["records"] == before["records"]  # the redone draw is reproducible


def test_another_evaluation_is_refused_unless_overwrite(base_eval, eval_shards, tiny_encoder, tmp_path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(base_eval[0], out)
    text = linprobe(eval_shards, out, "--fractions", "0.1,1", "--draws", "2", "policy=ones", encoder=tiny_encoder,
                    ok=False)  # fmt: skip
    assert "holds another evaluation (protocol.data.policy: 'mgca' -> 'ones')" in text and "--overwrite" in text
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert "is not empty and holds no config.json" in linprobe(eval_shards, tmp_path / "other", encoder=tiny_encoder,
                                                                ok=False)  # fmt: skip
    linprobe(eval_shards, out, "--fractions", "1", "policy=ones", "--overwrite", encoder=tiny_encoder)
    res = json.loads((out / "results.json").read_text())
    assert res["policy"] == "ones" and {r["fraction"] for r in res["records"]} == {1.0}
    assert not (out / "runs" / "fraction-0.1_draw-0.json").exists()


def test_random_init_and_compare(base_eval, eval_shards, tiny_encoder, tmp_path) -> None:
    rnd = tmp_path / "random"
    linprobe(eval_shards, rnd, "--fractions", "0.1,1", "--draws", "2", "--init", "random", encoder=tiny_encoder)
    assert json.loads((rnd / "config.json").read_text())["encoder"]["identity"].startswith("random:vit_tiny")
    r = CliRunner().invoke(app, ["eval", "compare", str(rnd), str(base_eval[0]), "--out", str(tmp_path / "cmp"),
                                 "--boot", "200"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "difference to tiny_mae (random init)" in r.output and "Δ tiny_mae" in r.output
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [row["fraction"] for row in cmp["rows"]] == [0.1, 1.0]
    for row in cmp["rows"]:
        first, second = row["encoders"]
        assert second["diff_vs_first"] == pytest.approx(second["mean_auc"] - first["mean_auc"])
        assert second["diff_ci"][0] <= second["diff_ci"][1]
    assert (tmp_path / "cmp" / "label_efficiency.png").is_file()
    other = tmp_path / "ones"
    linprobe(eval_shards, other, "--fractions", "1", "policy=ones", encoder=tiny_encoder)
    r = CliRunner().invoke(app, ["eval", "compare", str(rnd), str(other)])
    assert r.exit_code == 2 and "differ in protocol.data.policy" in r.output


def _resnet_state(arch: str, in_chans: int) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(1)
    return timm.create_model(arch, pretrained=False, num_classes=3, in_chans=in_chans).state_dict()


@pytest.mark.slow
def test_timm_cnn_random_init_and_local_weights(eval_shards, tmp_path) -> None:
    from safetensors.torch import save_file

    cnn = ["--timm", "resnet18", "--fractions", "1", "data.image_size=32"]
    text = linprobe(eval_shards, tmp_path / "r0", *cnn, "--init", "random", ok=False)
    assert "pooling=cls needs a ViT class token" in text  # MGCA's CLS pooling does not apply to a CNN
    linprobe(eval_shards, tmp_path / "r1", *cnn, "--init", "random", "probe.pooling=gap")
    good = tmp_path / "r18.safetensors"
    save_file(_resnet_state("resnet18", 1), str(good))  # with its fc classifier: dropped on load
    linprobe(eval_shards, tmp_path / "r2", *cnn, "--weights", str(good), "probe.pooling=gap")
    assert json.loads((tmp_path / "r2" / "config.json").read_text())["encoder"]["identity"].startswith("sha256:")
    wrong = tmp_path / "r34.pth"
    torch.save(_resnet_state("resnet34", 1), wrong)
    text = linprobe(eval_shards, tmp_path / "r3", *cnn, "--weights", str(wrong), "probe.pooling=gap", ok=False)
    assert "r34.pth does not fit resnet18: missing keys" in text and "unexpected keys ['layer1.2.bn1" in text
    rgb = tmp_path / "rgb.pth"
    torch.save({"state_dict": _resnet_state("resnet18", 3)}, rgb)  # an ImageNet-style RGB checkpoint
    linprobe(eval_shards, tmp_path / "r4", *cnn, "--weights", str(rgb), "probe.pooling=gap")  # stem summed to 1 channel


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["--protocol", "mrm", "--fractions", "0.01"],  # MRM's step table: 2000 steps, warmup 150 at 1% CheXpert
        ["--protocol", "mae-cxr"],
        ["--protocol", "moco-cxr", "--fractions", "0.1,1", "--draws", "2", "--task", "pleural_effusion"],
        ["--fractions", "1", "--augment", "probe.epochs=3"],  # the published per-epoch probe (mgca)
    ],
    ids=["mrm", "mae-cxr", "moco-cxr", "mgca-augment"],
)
def test_every_protocol_preset_runs(args, eval_shards, tiny_encoder, tmp_path) -> None:
    linprobe(eval_shards, tmp_path / "e", *args, encoder=tiny_encoder)
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    assert res["summary"] and not res["missing_draws"]
    assert res["policy"] == cfg["protocol"]["data"]["policy"]
    assert cfg["mode"] == ("linprobe-augment" if "--augment" in args else "linprobe")
    run = json.loads(next((tmp_path / "e" / "runs").iterdir()).read_text())
    if "mrm" in args:
        assert (run["schedule"]["steps"], run["schedule"]["warmup_steps"]) == (2000, 150)


@pytest.fixture(scope="module")
def no_validate(eval_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The eval shards as a folder whose manifest lists no validate split."""
    out = tmp_path_factory.mktemp("novalidate") / "shards"
    out.mkdir()
    for p in eval_shards.iterdir():
        if p.name != "manifest.json":
            (out / p.name).symlink_to(p)
    manifest = json.loads((eval_shards / "manifest.json").read_text())
    del manifest["splits"]["validate"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "nih14"], "task 'nih14' needs labels ['Effusion', 'Infiltration'"),
        (["--fractions", "0,0.5"], "label fractions must be in (0, 1]"),
        (["--fractions", "1.5"], "label fractions must be in (0, 1]"),
        (["probe.lrr=1"], "unknown config key 'probe.lrr'"),
        (["probe.select_split=test"], "probe.select_split=test is refused"),
        (["data.image_size=96"], "the encoder takes 64-pixel inputs"),
        (["--timm", "resnet18"], "name the encoder one way"),
        (["--task", "chexpert5", "views=side"], "views must be one of"),
    ],
)
def test_bad_input_errors(args, message, eval_shards, tiny_encoder, tmp_path) -> None:
    enc = None if "--timm" in args else tiny_encoder
    text = linprobe(eval_shards, tmp_path / "e", *args, encoder=enc, ok=False)
    assert message in " ".join(text.split()), text


def test_missing_split_and_encoder_file(no_validate, tiny_encoder, tmp_path) -> None:
    text = linprobe(no_validate, tmp_path / "e", encoder=tiny_encoder, ok=False)
    assert "manifest.json: no 'validate' samples" in " ".join(text.split())
    text = linprobe(no_validate, tmp_path / "e", encoder=tmp_path / "nope.safetensors", ok=False)
    assert "nope.safetensors does not exist" in " ".join(text.split())


def test_feature_cache_is_invalidated_when_the_encoder_changes(eval_shards, tmp_path, monkeypatch) -> None:
    from cxrfast.models import build_model
    from cxrfast.models.export import export_encoder

    folder = open_shards(eval_shards)
    calls = []
    real = features.extract
    monkeypatch.setattr(features, "extract", lambda *a, **k: calls.append(a[2].encoder) or real(*a, **k))

    def feats(path: Path) -> np.ndarray:
        enc = load(EncoderSpec(encoder=path))
        req = features.FeatureRequest(encoder=enc.identity, shards=features.shards_identity(folder), split="validate",
                                      augmentation="eval_pad", image_size=64, mean=0.5, std=0.5, channels=1, pooling="cls",
                                      precision="fp32", device="cpu", backend="dali")  # fmt: skip
        return features.split_features(enc.module, folder, req, cache_dir=tmp_path / "cache", batch_size=32,
                                       num_threads=1, progress=False).values  # fmt: skip

    path = tmp_path / "run"
    torch.manual_seed(0)
    export_encoder(build_model("mae_vit_tiny_test"), path)
    first = feats(path / "encoder.safetensors")
    np.testing.assert_array_equal(feats(path / "encoder.safetensors"), first)
    assert len(calls) == 1  # the same file: a cache hit
    torch.manual_seed(1)
    export_encoder(build_model("mae_vit_tiny_test"), path)  # new weights written to the same path
    values = feats(path / "encoder.safetensors")
    assert len(calls) == 2 and calls[0] != calls[1]  # a miss: the file's sha256 changed
    assert not np.allclose(first, values)
    assert len(list((tmp_path / "cache").glob("validate-*.npz"))) == 2


def test_probe_of_an_in_memory_encoder(eval_shards, tmp_path) -> None:
    import timm

    from cxrfast.eval.linprobe import probe

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, in_chans=1, img_size=64)
    model.train()
    res = probe(model, eval_shards, "chexpert5", cache_key="run@epoch-1", overrides=("fractions=1", *FAST,
                f"run.cache_dir={tmp_path / 'cache'}"), out=tmp_path / "monitor")  # fmt: skip
    assert model.training  # the module's mode is restored
    mean = [r for r in res["summary"] if r["split"] == "test" and r["label"] == "mean"]
    assert len(mean) == 1 and res["encoder"] == "encoder"
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.npz"))
    assert cached == ["test", "train", "validate"]
    assert json.loads((tmp_path / "monitor" / "config.json").read_text())["encoder"]["identity"] == "key:run@epoch-1"


@pytest.mark.slow
def test_bench_eval_runs(eval_shards, tiny_encoder, tmp_path) -> None:
    from cxrfast.bench import eval_probe

    rc = eval_probe.main(["--shards", str(eval_shards), "--encoder", str(tiny_encoder), "--epochs", "2", "--workers", "1",
                          "--out", str(tmp_path), "--no-results-row", "--set", "boot=200"])  # fmt: skip
    assert rc == 0
    res = json.loads((tmp_path / "eval_probe.json").read_text())
    assert res["speedup"] > 0 and set(res["test_mean_auc"]) == {"cached", "per_epoch"}
    assert (tmp_path / "eval_probe.png").stat().st_size > 0
