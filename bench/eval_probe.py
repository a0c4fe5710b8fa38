"""`cxrfast bench eval`: the cached-feature linear probe against the published per-epoch probe
(the frozen backbone runs over the train split every epoch, with the protocol's train
augmentation, and over validate at every evaluation), on the same encoder, shards and protocol.

Both run the MGCA protocol for exactly `--epochs` epochs (early stopping off, so both do the same
number of head steps) at `--fraction`. Reported: the probe's time in each (feature extraction from
an empty cache + head training; the per-epoch one's backbone passes are inside its head training),
their ratio, the end-to-end command times (the same metrics, plots and start-up in both), and both
test mean AUCs with 95% patient bootstrap CIs. Target: >= 20x faster with each AUC inside the
other's CI.

    cxrfast bench eval                                    # CPU: timm ViT-Tiny at 96 px, synthetic CheXpert
    cxrfast bench eval --arch mae_vit_tiny_test           # the registry's 64-px test ViT (seconds)
    cxrfast bench eval --shards data/shards/chexpert --encoder runs/mrm/encoder.safetensors --task chexpert5

Without --shards a synthetic CheXpert (200 patients) is generated and sharded under OUT/cache;
without --encoder timm's ViT-Tiny at 96 px (seeded random weights) is exported there. Protocol (bench/common.py): one
untimed warm-up of the cached path (imports, compilation), then `--repeats` timed runs of each.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from cxrfast.bench.common import BENCH_OUT
from cxrfast.shards.folder import open_shards
from cxrfast.shards.schema import MANIFEST

log = logging.getLogger(__name__)

NAME = "eval_probe"
TARGET_RATIO = 20.0
REGISTRY_TINY = "mae_vit_tiny_test"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cxrfast bench eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--shards", type=Path, help="labelled shard folder (default: synthetic CheXpert under OUT/cache)")
    p.add_argument("--patients", type=int, default=200, help="synthetic CheXpert patients without --shards")
    p.add_argument("--encoder", type=Path, help="encoder.safetensors (default: exported under OUT/cache, see --arch)")
    p.add_argument("--arch", default="vit_tiny_patch16_224",
                   help=f"without --encoder: a timm architecture exported with seeded random weights at --img-size, "
                   f"or {REGISTRY_TINY} (the registry's 64-px, 2-block test ViT)")  # fmt: skip
    p.add_argument("--img-size", type=int, default=96, help="input side of --arch")
    p.add_argument("--task", default="chexpert5")
    p.add_argument("--protocol", default="mgca", help="evaluation protocol (its probe knobs; early stopping off)")
    p.add_argument("--epochs", type=int, default=50, help="head epochs of both probes")
    p.add_argument("--fraction", type=float, default=1.0, help="label fraction of the train patients")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each probe (median)")
    p.add_argument("--workers", type=int, default=2, help="DALI threads")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra protocol overrides for both probes")  # fmt: skip
    p.add_argument("--out", type=Path, default=BENCH_OUT)
    p.add_argument("--no-results-row", action="store_true", help="do not append to bench/RESULTS.md")
    return p.parse_args(argv)


def ensure_inputs(out: Path, patients: int, workers: int, arch: str, img_size: int) -> tuple[Path, Path]:
    """Cached synthetic CheXpert shards (all views, 128 px) and an encoder export under out/cache: timm
    `arch` at `img_size` with seeded random weights, or the registry's tiny test ViT."""
    import torch

    from cxrfast.models import build_model
    from cxrfast.models.export import ENCODER_FILE, export_encoder, write_encoder
    from cxrfast.shards.build import shard_chexpert
    from cxrfast.synth import make_chexpert

    cache = out / "cache" / f"chexpert_{patients}"
    shards = cache / "shards"
    if not (shards / MANIFEST).is_file():
        make_chexpert(cache / "raw", patients=patients, seed=0, workers=workers, overwrite=True)
        shard_chexpert(root=cache / "raw" / "CheXpert-v1.0-small", out=shards, workers=workers, views="all",
                       max_size=128, validate_fraction=0.2, overwrite=True)  # fmt: skip
    open_shards(shards)
    if arch == REGISTRY_TINY:
        encoder = cache / "tiny_mae" / ENCODER_FILE
        if not encoder.is_file():
            torch.manual_seed(0)
            export_encoder(build_model(REGISTRY_TINY), encoder.parent)
        return shards, encoder
    import timm

    from cxrfast.methods.base import EncoderExport

    encoder = cache / f"{arch}_{img_size}" / ENCODER_FILE
    if not encoder.is_file():
        torch.manual_seed(0)
        kwargs = {"in_chans": 1, "num_classes": 0, "img_size": img_size}
        model = timm.create_model(arch, pretrained=False, **kwargs)
        write_encoder(EncoderExport(arch=arch, kwargs=kwargs, state_dict=model.state_dict()), encoder)
    return shards, encoder


def _mean_row(res: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in res["summary"] if r["split"] == "test" and r["label"] == "mean")


def main(argv: list[str]) -> int:
    from cxrfast.bench.common import append_results_row, bar_plot, command_line, machine, write_json
    from cxrfast.eval.encoders import EncoderSpec
    from cxrfast.eval.linprobe import run_linprobe
    from cxrfast.eval.protocols import get_protocol

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    shards, encoder = (args.shards, args.encoder) if args.shards and args.encoder else (None, None)
    if shards is None:
        syn_shards, syn_encoder = ensure_inputs(args.out, args.patients, args.workers, args.arch, args.img_size)
        shards, encoder = args.shards or syn_shards, args.encoder or syn_encoder
    spec = EncoderSpec(encoder=encoder)
    work = args.out / NAME

    def run(augment: bool, tag: str) -> tuple[float, dict[str, Any]]:
        folder = work / tag
        over = [f"fractions={args.fraction}", "draws=1", f"probe.epochs={args.epochs}", "probe.patience=none",
                f"run.num_threads={args.workers}", f"run.cache_dir={folder / 'features'}", *args.overrides]  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)  # an empty feature cache: extraction is part of the time
        t0 = time.perf_counter()
        res = run_linprobe(spec, shards, args.task, get_protocol(args.protocol, over), folder, augment=augment,
                           overwrite=True, progress=False)  # fmt: skip
        return time.perf_counter() - t0, res

    log.info("warm-up (untimed): cached probe")
    run(False, "warmup")
    timed: dict[str, list[float]] = {"cached": [], "per_epoch": []}  # features + head training
    wall: dict[str, list[float]] = {"cached": [], "per_epoch": []}  # the whole command, metrics and plots included
    results: dict[str, dict[str, Any]] = {}
    for i in range(args.repeats):
        for name, augment in (("cached", False), ("per_epoch", True)):
            seconds, res = run(augment, name)
            wall[name].append(seconds)
            timed[name].append(res["seconds"]["features"] + res["seconds"]["heads"])
            results[name] = res
            log.info("%s probe, repeat %d: %.1f s (%.1f s end to end), test mean AUC %s", name, i, timed[name][-1],
                     seconds, _mean_row(res)["mean"])  # fmt: skip
    med = {k: statistics.median(v) for k, v in timed.items()}
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    ratio = med["per_epoch"] / med["cached"]
    rows = {k: _mean_row(r) for k, r in results.items()}

    def inside(a: str, b: str) -> bool | None:
        ci, x = rows[b]["ci"], rows[a]["mean"]
        return None if ci is None or x is None else bool(ci[0] <= x <= ci[1])

    desc = machine()
    cfg = json.loads((work / "cached" / "config.json").read_text())
    payload = {
        "benchmark": NAME, "command": command_line(["eval", *argv]), "machine": desc,
        "shards": str(shards), "encoder": str(encoder), "task": args.task, "protocol": args.protocol,
        "epochs": args.epochs, "fraction": args.fraction, "split_sizes": cfg["split_sizes"], "inputs": cfg["inputs"],
        "probe_seconds": timed, "median_s": med, "speedup": ratio, "target_speedup": TARGET_RATIO,
        "end_to_end_seconds": wall, "median_end_to_end_s": med_wall,
        "end_to_end_speedup": med_wall["per_epoch"] / med_wall["cached"],
        "test_mean_auc": {k: {"mean": r["mean"], "ci": r["ci"]} for k, r in rows.items()},
        "cached_auc_inside_per_epoch_ci": inside("cached", "per_epoch"),
        "per_epoch_auc_inside_cached_ci": inside("per_epoch", "cached"),
    }  # fmt: skip
    json_path = write_json(args.out, NAME, payload)
    png = bar_plot(args.out, NAME, ["cached: features + head", "per-epoch backbone + head", "cached, end to end",
                                    "per-epoch, end to end"],
                   [med["cached"], med["per_epoch"], med_wall["cached"], med_wall["per_epoch"]],
                   ylabel="seconds (lower is better)",
                   title=f"linear probe, {args.epochs} epochs, {args.protocol}, fraction {args.fraction:g}: "
                         f"{ratio:.1f}x")  # fmt: skip

    def auc(k: str) -> str:
        r = rows[k]
        if r["mean"] is None:
            return "undefined"
        return f"{r['mean']:.3f}" + (f" [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]" if r["ci"] else "")

    sizes = cfg["split_sizes"]
    numbers = (
        f"{args.protocol} linear probe {args.epochs} epochs, fraction {args.fraction:g}, train/validate/test "
        f"{sizes['train']['images']}/{sizes['validate']['images']}/{sizes['test']['images']} images, "
        f"{cfg['inputs']['image_size']} px, {cfg['inputs']['device']}: features + head cached {med['cached']:.2f} s vs "
        f"per-epoch {med['per_epoch']:.2f} s = {ratio:.1f}x (target {TARGET_RATIO:g}x); end to end (metrics, plots, "
        f"startup) {med_wall['cached']:.1f} s vs {med_wall['per_epoch']:.1f} s = {payload['end_to_end_speedup']:.1f}x; "
        f"test mean AUC cached {auc('cached')}, "
        f"per-epoch {auc('per_epoch')}; each inside the other's CI: {payload['cached_auc_inside_per_epoch_ci']}/"
        f"{payload['per_epoch_auc_inside_cached_ci']}"
    )
    if not args.no_results_row:
        append_results_row(payload["command"], numbers, machine_desc=desc)
    log.info("wrote %s and %s", json_path, png)
    print(f"eval probe: {numbers}")
    return 0
