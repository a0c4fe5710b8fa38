"""`cxrfast eval finetune`: full fine-tuning with the published protocols, through the project's
trainer (DeepSpeed, bf16, several ranks under the deepspeed launcher) and DALI pipelines.

One draw = one trainer run of the `finetune` method (`cxrfast.methods.finetune`) in
`EVAL/train/fraction-F_draw-D/`, on a subset shard folder of the draw (`cxrfast.shards.subset`:
the draw's train patients, and validate and test, each after the view filter). The run validates
every N epochs or steps and keeps the best state(s) by the protocol's criterion on validate (mean
AUC, or loss); test is never seen during training. Afterwards rank 0 scores validate and test ONCE
with the kept state(s) (the mean probability of the `finetune.ensemble_top_k` best), writes the
per-sample predictions (`results.save_draw`), and when every draw is done the numbers, table and
plots (`report.finish`). An interrupted evaluation resumes draw by draw, a draw mid-run from its
latest checkpoint.

Every rank runs this module; files are written by rank 0 while the others wait
(`cxrfast.trainer.distributed.on_rank_zero`), so an error there stops every rank.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrfast.eval import encoders, report, results
from cxrfast.eval.draws import Draw, all_draws
from cxrfast.eval.linprobe import EvalSetup, Inputs, draw_seed, folder_config, resolve_inputs, train_counts
from cxrfast.eval.metrics import class_counts
from cxrfast.eval.protocols import (
    FinetuneKnobs,
    Protocol,
    moco_cxr_epochs,
    moco_cxr_eval_every_samples,
    mrm_steps,
    refuse_test_selection,
)
from cxrfast.eval.samples import LabelledSplit, labelled_splits
from cxrfast.eval.tasks import get_task, task_labels
from cxrfast.shards.folder import ShardFolder, open_shards

log = logging.getLogger(__name__)

#: Sub-folder of EVAL holding one trainer run per draw.
TRAIN_DIR = "train"


@dataclass(frozen=True, kw_only=True)
class FinetuneSchedule:
    """A draw's resolved length, learning rate and validation cadence."""

    epochs: int  # epochs of an epoch-quoted schedule (1 when `steps` is set)
    steps: int | None  # optimizer steps of a step-quoted schedule (MRM's tables)
    warmup_epochs: float
    warmup_steps: int | None
    lr: float | None  # absolute peak lr, or None when blr applies
    blr: float | None
    validate_every_epochs: int
    validate_every_steps: int
    steps_per_epoch: int
    global_batch: int


def steps_per_epoch(n_train: int, *, world: int, micro: int, accum: int) -> int:
    """Optimizer steps per epoch as the trainer counts them with DALI (full batches per rank, the
    smallest rank's share)."""
    from cxrfast.pipelines.loader import rank_share

    return min(rank_share(n_train, r, world) // micro for r in range(world)) // accum


def resolve_schedule(k: FinetuneKnobs, *, n_train: int, fraction: float, task: str, world: int, micro: int,
                     accum: int) -> FinetuneSchedule:  # fmt: skip
    """The draw's schedule under the protocol's rule: mrm (MRM's step table, validate every epoch),
    moco-cxr (epochs and validate interval from the fraction, constant lr) or fixed."""
    spe = steps_per_epoch(n_train, world=world, micro=micro, accum=accum)
    common = dict(lr=k.lr, blr=k.blr, steps_per_epoch=spe, global_batch=k.batch_size)
    if k.schedule_rule == "mrm":  # train.py: validate when global_step % len(train_loader) == 0
        s = mrm_steps(task, fraction)
        return FinetuneSchedule(epochs=1, steps=s.steps, warmup_epochs=0.0, warmup_steps=s.warmup,
                                validate_every_epochs=1, validate_every_steps=0,
                                **{**common, "lr": s.lr, "blr": None})  # fmt: skip
    if k.schedule_rule == "moco-cxr":  # validate every min(2^17 f, 8192) samples
        every = max(1, round(moco_cxr_eval_every_samples(fraction) / k.batch_size))
        return FinetuneSchedule(epochs=moco_cxr_epochs(fraction), steps=None, warmup_epochs=0.0, warmup_steps=None,
                                validate_every_epochs=0, validate_every_steps=every, **common)  # fmt: skip
    whole = float(k.eval_every_epochs).is_integer()
    by_epoch = int(k.eval_every_epochs) if whole else 0
    by_step = 0 if whole else max(1, round(k.eval_every_epochs * spe))
    if k.steps is not None:
        return FinetuneSchedule(epochs=1, steps=k.steps, warmup_epochs=0.0,
                                warmup_steps=min(k.steps, round(k.warmup_epochs * spe)),
                                validate_every_epochs=by_epoch, validate_every_steps=by_step, **common)  # fmt: skip
    return FinetuneSchedule(epochs=k.epochs, steps=None, warmup_epochs=k.warmup_epochs, warmup_steps=None,
                            validate_every_epochs=by_epoch, validate_every_steps=by_step, **common)  # fmt: skip


def method_source(spec: encoders.EncoderSpec) -> dict[str, Any]:
    """The `FinetuneMethodConfig` fields that name the encoder `spec` names."""
    if spec.encoder is not None:
        return {"encoder": str(Path(spec.encoder).resolve()), "random_init": spec.init == "random",
                "init_seed": spec.init_seed}  # fmt: skip
    src: dict[str, Any] = {"arch": spec.timm, "timm_kwargs": json.dumps(dict(spec.timm_kwargs), sort_keys=True),
                           "init_seed": spec.init_seed}  # fmt: skip
    if spec.weights is not None:
        src["init"] = str(Path(spec.weights).resolve())
    return src


def run_config(protocol: Protocol, source: dict[str, Any], *, labels: tuple[str, ...], inputs: Inputs,
               sched: FinetuneSchedule, micro: int, seed: int):  # fmt: skip
    """The trainer's RunConfig of one draw."""
    from cxrfast.config import DataConfig, OptimConfig, RunConfig, TrainConfig
    from cxrfast.methods.finetune import FinetuneMethodConfig

    k, data, run = protocol.finetune, protocol.data, protocol.run
    assert k is not None
    method = FinetuneMethodConfig(
        **source, labels=labels, policy=data.policy, not_mentioned=data.not_mentioned, pooling=k.pooling,
        drop_path=k.drop_path, layer_decay=k.layer_decay, head_init_std=k.head_init_std,
        augmentation=k.train_augmentation, eval_augmentation=data.eval_augmentation, image_size=inputs.image_size,
        mean=inputs.mean, std=inputs.std,
    )  # fmt: skip
    optim = OptimConfig(
        epochs=sched.epochs, steps=sched.steps, name=k.optimizer, lr=sched.lr, blr=sched.blr, lr_batch_ref=256,
        weight_decay=k.weight_decay, betas=(k.beta1, k.beta2), momentum=k.momentum, clip_grad=k.clip_grad,
        schedule="warmup_cosine" if k.lr_schedule == "cosine" else "constant", warmup_epochs=sched.warmup_epochs,
        warmup_steps=sched.warmup_steps, min_lr=k.min_lr,
    )  # fmt: skip
    auc = k.select_metric == "val_auc"
    train = TrainConfig(
        batch_size=micro, global_batch_size=k.batch_size, zero_stage=run.zero_stage,
        precision="fp32" if run.precision == "fp32" else "bf16", seed=seed, log_every=run.log_every,
        ckpt_every_epochs=run.ckpt_every_epochs, ckpt_every_steps=run.ckpt_every_steps, ckpt_keep=2,
        validate_every_epochs=sched.validate_every_epochs, validate_every_steps=sched.validate_every_steps,
        validate_split=k.select_split, select="best", select_metric="val_auc" if auc else "val_loss",
        select_mode="max" if auc else "min", keep_best=k.ensemble_top_k, export=True,
    )  # fmt: skip
    return RunConfig(preset=f"eval-finetune-{protocol.name}", method=method, optim=optim, train=train,
                     data=DataConfig(backend=run.backend, num_threads=run.num_threads))  # fmt: skip


def _history(run_dir: Path) -> list[dict[str, Any]]:
    """The validation rows of a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "val_loss" in r]


def predict(paths: list[Path], folder: ShardFolder, split: LabelledSplit, inputs: Inputs, protocol: Protocol, *,
            progress: bool) -> np.ndarray:  # fmt: skip
    """Mean sigmoid probability of the exported classifiers `paths` on every sample of `split` (rows in
    LabelledSplit order), through the protocol's eval pipeline on one process."""
    from cxrfast.models.export import load_encoder
    from cxrfast.pipelines import build_loader
    from cxrfast.progress import progress as reporter

    device = torch.device("cuda" if inputs.device == "gpu" else "cpu")
    index = {k: i for i, k in enumerate(split.keys.tolist())}
    total = np.zeros((len(split), len(split.labels)), dtype=np.float64)
    for path in paths:
        model = load_encoder(path).to(device)
        seen = np.zeros(len(split), dtype=bool)
        loader = build_loader(folder, split.split, protocol.data.eval_augmentation, batch_size=protocol.run.extract_batch_size,
                              backend=protocol.run.backend, device=inputs.device, seed=0, rank=0, world_size=1,
                              shuffle=False, num_threads=protocol.run.num_threads, channels=inputs.channels,
                              mean=inputs.mean, std=inputs.std, image_size=inputs.image_size, with_keys=True)  # fmt: skip
        with torch.inference_mode(), reporter(f"predict {split.split}", len(split), "img", enabled=progress) as bar:
            for batch in loader:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=inputs.precision == "bf16"):
                    logits = model(batch["image"].to(device, non_blocking=True))
                rows = [index[k] for k in batch["key"]]
                total[rows] += torch.sigmoid(logits.float()).cpu().numpy()
                seen[rows] = True
                bar.update(len(rows))
        if not seen.all():
            raise ValueError(f"{folder.root}: {int((~seen).sum())} {split.split} samples were not read back")
        del model
    return total / len(paths)


@dataclass(kw_only=True)
class Evaluation(EvalSetup):
    """What every draw of one fine-tune evaluation shares."""

    spec: encoders.EncoderSpec
    rank: int
    world: int

    @property
    def knobs(self) -> FinetuneKnobs:
        assert self.protocol.finetune is not None
        return self.protocol.finetune

    def micro_accum(self) -> tuple[int, int]:
        """(micro-batch per rank, accumulation steps) for the protocol's global batch on this world size."""
        k, run = self.knobs, self.protocol.run
        per_rank, rest = divmod(k.batch_size, self.world)
        if rest:
            raise ValueError(f"finetune.batch_size={k.batch_size} is not divisible by the {self.world} ranks")
        micro = run.micro_batch_size or per_rank
        if per_rank % micro:
            raise ValueError(f"run.micro_batch_size={micro} does not divide the per-rank batch {per_rank} "
                             f"(finetune.batch_size={k.batch_size} over {self.world} ranks)")  # fmt: skip
        return micro, per_rank // micro

    def run_draw(self, draw: Draw) -> None:
        """Train, select on validate, score validate and test once, write the draw (see the module doc)."""
        from cxrfast.shards.subset import write_subset
        from cxrfast.trainer.distributed import on_rank_zero
        from cxrfast.trainer.kept import read_ranking
        from cxrfast.trainer.run import run as train_run

        t0 = time.perf_counter()
        data = self.protocol.data
        train = self.splits["train"]
        mask = np.isin(train.subjects, np.asarray(draw.patients))
        micro, accum = self.micro_accum()
        n = int(mask.sum())
        sched = resolve_schedule(self.knobs, n_train=n, fraction=draw.fraction, task=self.task, world=self.world,
                                 micro=micro, accum=accum)  # fmt: skip
        if sched.steps_per_epoch < 1:
            raise ValueError(f"{draw.name}: {n} training images give no full batch of {micro} x {accum} on each of "
                             f"{self.world} ranks (finetune.batch_size={self.knobs.batch_size}); lower the batch size "
                             "or use fewer ranks")  # fmt: skip
        seed = draw_seed(data.seed, draw.fraction, draw.index)
        cfg = run_config(self.protocol, method_source(self.spec), labels=self.labels, inputs=self.inputs,
                         sched=sched, micro=micro, seed=seed)  # fmt: skip
        run_dir = self.out / TRAIN_DIR / draw.name
        keep = {"train": train.keys[mask].tolist(), "validate": self.splits["validate"].keys.tolist(),
                "test": self.splits["test"].keys.tolist()}  # fmt: skip
        on_rank_zero(lambda: write_subset(self.folder, keep, run_dir / "shards"), rank=self.rank)
        resume = run_dir / "checkpoints" if (run_dir / "checkpoints" / "latest").is_file() else None
        if resume is not None:
            log.info("%s: resuming its trainer run from %s", draw.name, resume)
        state = train_run(cfg, shards=run_dir / "shards", out=run_dir, resume=resume)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

        def score() -> None:
            sub = open_shards(run_dir / "shards")
            ranking = read_ranking(run_dir)
            paths = [row["path"] for row in ranking["kept"]]
            preds = {}
            for split in ("validate", "test"):  # test: once, with the state(s) selected on validate
                s = self.splits[split]
                preds[split] = results.SplitScores(s.keys, s.subjects, predict(paths, sub, s, self.inputs, self.protocol,
                                                                               progress=self.progress), s.targets)  # fmt: skip
            kept = [{k: v for k, v in row.items() if k != "path"} for row in ranking["kept"]]
            record = {"fraction": draw.fraction, "draw": draw.index, "seed": seed,
                      "train": train_counts(train, draw, mask), "schedule": asdict(sched),
                      "fit": {"steps_run": state.step, "selected": kept, "select_metric": ranking["metric"],
                              "history": _history(run_dir)},
                      "world_size": self.world, "run": str(run_dir), "seconds": time.perf_counter() - t0}  # fmt: skip
            results.save_draw(self.out, draw, self.labels, preds, record)
            best = kept[0]
            log.info("%s: %d patients, %d images, %d steps, selected step %d (%s %.4f), %.1f s", draw.name,
                     len(draw.patients), n, state.step, best["step"], ranking["metric"], best["value"],
                     record["seconds"])  # fmt: skip

        on_rank_zero(score, rank=self.rank)


def _check_validate(splits: dict[str, LabelledSplit], k: FinetuneKnobs, where: str) -> None:
    """Selecting on the validate mean AUC needs a label with both classes there."""
    if k.select_metric != "val_auc":
        return
    pos, neg = class_counts(splits["validate"].targets)
    if not ((pos > 0) & (neg > 0)).any():
        raise ValueError(f"{where}: no label has both positives and negatives on validate, so its mean AUC cannot "
                         "select a state; use finetune.select_metric=val_loss or a larger validate split")  # fmt: skip


def check_finetune(protocol: Protocol) -> FinetuneKnobs:
    """The protocol's fine-tune settings; ValueError when it publishes none or selects on test."""
    k = protocol.finetune
    if k is None:
        raise ValueError(f"protocol {protocol.name!r} publishes no fine-tuning (a linear probe only); use "
                         "`cxrfast eval linprobe`, or --protocol mrm | mae-cxr | moco-cxr")  # fmt: skip
    refuse_test_selection(k.select_split, "finetune.select_split")
    return k


def run_finetune(spec: encoders.EncoderSpec, shards: Path | str, task: str, protocol: Protocol, out: Path, *,
                 overwrite: bool = False, progress: bool = True) -> dict[str, Any] | None:  # fmt: skip
    """`cxrfast eval finetune` on every rank of an initialised process group; returns the results on
    rank 0 (also in out/results.json), None on the other ranks."""
    import torch.distributed as dist

    from cxrfast.trainer.distributed import on_rank_zero

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    k = check_finetune(protocol)
    folder = open_shards(shards)
    labels = task_labels(get_task(task), folder)
    data = protocol.data
    splits = labelled_splits(folder, labels, policy=data.policy, views=data.views, not_mentioned=data.not_mentioned)
    _check_validate(splits, k, str(folder.root))
    enc = encoders.load(spec)
    inputs = resolve_inputs(data, protocol.run, img_size=enc.img_size, mean=enc.mean, std=enc.std,
                            channels=enc.in_chans, where=str(folder.root))  # fmt: skip
    del enc.module
    ev = Evaluation(spec=spec, folder=folder, task=task, labels=labels, splits=splits, protocol=protocol,
                    inputs=inputs, out=Path(out), rank=rank, world=world, progress=progress)  # fmt: skip
    ev.micro_accum()  # a batch that does not fit the world size is an error before anything is written
    config = folder_config(mode="finetune", task=task, labels=labels, folder=folder, splits=splits,
                           encoder={"name": enc.name, **enc.source}, protocol=protocol, inputs=inputs)  # fmt: skip
    config["ranks"] = world  # a draw resumes from a ZeRO checkpoint partitioned over this many ranks
    on_rank_zero(lambda: results.prepare_folder(ev.out, config, overwrite=overwrite), rank=rank)
    draws = all_draws(splits["train"].subjects, data.fractions, data.draws, data.seed)
    todo = [d for d in draws if not results.draw_done(ev.out, d.fraction, d.index)]
    if len(todo) < len(draws) and rank == 0:
        log.info("resuming %s: %d of %d draws already done", ev.out, len(draws) - len(todo), len(draws))
    t0 = time.perf_counter()
    for draw in todo:
        ev.run_draw(draw)
    t1 = time.perf_counter()

    def finish() -> dict[str, Any]:
        res = report.finish(ev.out)
        res["seconds"] = {"finetune": t1 - t0, "metrics_and_plots": time.perf_counter() - t1,
                          "draws_computed": len(todo)}  # fmt: skip
        results.write_json(ev.out / results.RESULTS, res)
        return res

    return on_rank_zero(finish, rank=rank)
