"""One pre-training run inside an initialised process group: build the parts, train, export.

The trainer knows nothing method-specific: it opens the shard folders (one `ShardSet`: one
folder or several, trained on as their union), builds the method from the run config, asks it
what data it needs, builds the DeepSpeed engine around it, runs the loop (which calls the
method's hooks), checkpoints, resumes and exports `method.encoder_export()`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrfast.config import RunConfig
from cxrfast.methods import build_method
from cxrfast.methods.base import Method, StepContext
from cxrfast.shards.shard_set import ShardsArg, ShardSet, open_shard_set
from cxrfast.trainer import deepspeed_config
from cxrfast.trainer.build import build_engine, loader_dtype, lr_schedule
from cxrfast.trainer.checkpoint import Checkpointer, RunState
from cxrfast.trainer.data import EpochData
from cxrfast.trainer.export import export_trained
from cxrfast.trainer.kept import KeptStates
from cxrfast.trainer.loop import LoopPlan, train
from cxrfast.trainer.metrics import MetricsLogger, Throughput, peak_tflops
from cxrfast.trainer.schedule import LRSchedule, set_position
from cxrfast.trainer.validate import Selection, Update, Validator

log = logging.getLogger(__name__)


def make_method(cfg: RunConfig, shards: ShardSet) -> Method:
    """The method of `cfg`, seeded by `train.seed` (every rank builds identical initial weights)."""
    import torch

    torch.manual_seed(cfg.train.seed)
    return build_method(cfg.method, shards)


def check_datasets(cfg: RunConfig, shards: ShardSet, *, rank: int = 0) -> None:
    """Compare the folders' datasets with the preset's published mix (`data.datasets`): a warning
    (rank 0), or a ValueError with `data.strict_datasets=true`; nothing when the preset names none."""
    want = cfg.data.datasets
    if not want or sorted(set(shards.datasets)) == sorted(set(want)):
        return
    given = ", ".join(f"{f.root} ({f.dataset})" for f in shards.folders)
    message = (f"preset {cfg.preset!r} was published on {' + '.join(want)}, but the shard folders hold {given}: "
               "this run is not the published mix")
    if cfg.data.strict_datasets:
        raise ValueError(f"{message} (data.strict_datasets=true; set data.datasets to the mix you mean, or "
                         "data.strict_datasets=false to train anyway)")
    if rank == 0:
        log.warning("%s (data.strict_datasets=true refuses this)", message)


@dataclass
class Built:
    """The parts of a run, ready to train."""

    engine: Any
    method: Method
    data: EpochData
    shards: ShardSet
    ds: dict[str, Any]
    peak_lr: float
    schedule: LRSchedule
    flops_per_image: float


def build(cfg: RunConfig, shards: ShardsArg, ds_file: Path | None = None) -> Built:
    """Method, DeepSpeed settings, data and engine for `cfg` on the shard folder(s) `shards`
    (collective: every rank calls it)."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    shards = open_shard_set(shards)
    shards.require_split(cfg.data.split, "training")
    check_datasets(cfg, shards, rank=rank)
    method = make_method(cfg, shards)
    if cfg.train.grad_checkpointing:
        method.set_grad_checkpointing(True)
    if cfg.train.compile:
        targets = method.compile_targets()
        for module in targets:
            module.compile()
        log.info("torch.compile: %d module(s)", len(targets))
    ds = deepspeed_config.build(cfg, world, ds_file)
    data = EpochData(
        shards, method.data_request(cfg.data.split), split=cfg.data.split,
        batch_size=ds["train_micro_batch_size_per_gpu"], accum=ds["gradient_accumulation_steps"],
        backend=cfg.data.backend, dtype=loader_dtype(ds), seed=cfg.train.seed, shuffle=cfg.data.shuffle,
        num_threads=cfg.data.num_threads, rank=rank, world_size=world, overfit_batches=cfg.data.overfit_batches,
    )
    flops = float(method.flops_per_image())
    peak_lr = cfg.optim.peak_lr(ds["train_batch_size"])
    schedule = lr_schedule(cfg.optim, data.steps, peak_lr)
    engine = build_engine(method, cfg.optim, ds, schedule, peak_lr, cuda=torch.cuda.is_available())
    return Built(engine=engine, method=engine.module, data=data, shards=shards, ds=ds, peak_lr=peak_lr,
                 schedule=schedule, flops_per_image=flops)


def _mix_summary(mix: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(dataset, samples) per folder in order: what a mid-epoch data position depends on."""
    return [(str(e["dataset"]), int(e["samples"])) for e in mix]


def _check_resume(cfg: RunConfig, client: dict[str, Any], b: Built, world: int) -> None:
    """Refuse a checkpoint of another preset/method, or a mid-epoch one with another batch geometry
    or other shard folders; say what changed when the schedule or the folders differ."""
    state = RunState(epoch=int(client["epoch"]), step=int(client["step"]), micro=int(client.get("micro", 0)))
    if client.get("preset") not in (None, cfg.preset):
        raise ValueError(f"--resume: the checkpoint is of preset {client.get('preset')!r}, this run is preset "
                         f"{cfg.preset!r}; resume with --preset {client.get('preset')} or start a new --out")
    if client.get("method") not in (None, cfg.method_name):
        raise ValueError(f"--resume: the checkpoint is of method {client.get('method')!r}, this run's is {cfg.method_name!r}")
    old_mix, mix = client.get("shards"), b.shards.mix(cfg.data.split)
    if old_mix is not None and _mix_summary(old_mix) != _mix_summary(mix):
        before = ", ".join(f"{e['path']} ({e['dataset']}, {e['samples']})" for e in old_mix)
        now = ", ".join(f"{e['path']} ({e['dataset']}, {e['samples']})" for e in mix)
        if state.micro:
            raise ValueError(f"--resume: the checkpoint is {state.micro} micro-batches into an epoch over the shard "
                             f"folders {before}; this run reads {now}: a mid-epoch position cannot carry over (give "
                             "the same --shards in the same order, or resume from an epoch-end checkpoint)")
        log.warning("the shard folders changed since the checkpoint (%s -> %s): the next epoch reads this run's",
                    before, now)
    geometry = {"world_size": world, "steps_per_epoch": b.data.steps, "global_batch": b.ds["train_batch_size"]}
    old = {k: client.get(k) for k in geometry}
    if old != geometry:
        if state.micro:
            raise ValueError(f"--resume: the checkpoint is {state.micro} micro-batches into an epoch with {old}; this "
                             f"run has {geometry}: a mid-epoch position cannot carry over (resume from an epoch-end "
                             "checkpoint, or keep the world size and batch)")
        log.warning("checkpoint geometry %s differs from this run's %s: the schedule continues from step %d",
                    old, geometry, state.step)
    new = b.schedule.describe()
    if client.get("schedule") not in (None, new):
        changed = {k: (client["schedule"].get(k), v) for k, v in new.items() if client["schedule"].get(k) != v}
        log.warning("the schedule changed since the checkpoint (%s): following this run's schedule from step %d",
                    ", ".join(f"{k} {a} -> {c}" for k, (a, c) in changed.items()), state.step)


def run(cfg: RunConfig, *, shards: ShardsArg, out: Path, ds_file: Path | None = None,
        resume: Path | None = None) -> RunState:
    """Train `cfg` on the union of the shard folder(s) `shards` into `out`; `resume` is a checkpoint
    folder (or tag folder) to continue from."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    b = build(cfg, shards, ds_file)
    engine, data, ds, shards = b.engine, b.data, b.ds, b.shards
    mix = shards.mix(cfg.data.split)
    cuda = torch.cuda.is_available()
    if rank == 0:
        log.info("%s (%s) on %s (%d %s samples): %s, %d steps/epoch, peak lr %.3g, %d rank(s)", cfg.preset,
                 cfg.method_name, ", ".join(f"{e['path']} ({e['dataset']}, {e['samples']}, {e['share']:.1%})" for e in mix),
                 shards.split_samples[cfg.data.split], cfg.data.split, deepspeed_config.describe(ds), data.steps,
                 b.peak_lr, world)

    t = cfg.train
    checkpointer = Checkpointer(engine, out / "checkpoints", every_epochs=t.ckpt_every_epochs,
                                every_steps=t.ckpt_every_steps, keep=t.ckpt_keep, rank=rank, world_size=world)
    state, data_state = RunState(), None
    selection = Selection(mode=t.select_mode, keep=t.keep_best)
    if resume is not None:
        state, client, data_state = checkpointer.load(resume, check=lambda c: _check_resume(cfg, c, b, world))
        selection.restore(client.get("selection", {}))
    if engine.lr_scheduler is not None and "scheduler" not in ds:
        set_position(engine.lr_scheduler, b.schedule, state.step)
    epochs = cfg.optim.run_epochs(data.steps)
    total_steps = cfg.optim.total_steps(data.steps)
    stop = t.stop_after_epochs
    end_epoch = epochs if stop is None else min(epochs, state.epoch + stop)
    if rank == 0:
        cfg.save_json(out / "config.json", world_size=world, deepspeed=ds, peak_lr=b.peak_lr, steps_per_epoch=data.steps,
                      shards=mix, resumed_from=None if resume is None else str(resume))

    device_name = torch.cuda.get_device_name() if cuda else None
    throughput = Throughput(world_size=world, flops_per_image=b.flops_per_image,
                            peak=t.peak_tflops or peak_tflops(device_name), cuda=cuda)
    metrics = MetricsLogger(out, enabled=rank == 0)
    ctx = StepContext(step=state.step, epoch=state.epoch, epochs=epochs, steps_per_epoch=data.steps,
                      rank=rank, world_size=world, global_batch=ds["train_batch_size"],
                      accumulation=ds["gradient_accumulation_steps"], engine=engine)
    engine.module.on_train_start(ctx)

    metadata = {"source": type(b.method).__name__, "method": cfg.method_name, "preset": cfg.preset}

    def export(tag: str, file: Path | None = None) -> Path | None:
        def extra(method: Method) -> list[Path]:
            return method.extra_exports(out, shards)

        return export_trained(engine, lambda: build_method(cfg.method, shards), out, rank=rank,
                              metadata={**metadata, "selected": tag}, write_extra=extra, file=file)

    validator = None
    if t.validates:
        validator = Validator(shards, engine.module, split=t.validate_split, batch_size=ds["train_micro_batch_size_per_gpu"],
                              backend=cfg.data.backend, dtype=loader_dtype(ds), num_threads=cfg.data.num_threads,
                              rank=rank, world_size=world)
    kept = KeptStates(out, metric=t.select_metric, mode=t.select_mode, keep=t.keep_best, rank=rank)
    if t.export and t.select == "best":
        kept.prune(selection)

    def on_select(st: RunState, values: dict[str, float], update: Update) -> None:
        if not (t.export and t.select == "best"):
            return
        name = "validation loss" if t.select_metric == "val_loss" else t.select_metric
        where = f"after epoch {st.epoch}" if st.micro == 0 else f"at step {st.step} (in epoch {st.epoch + 1})"
        tag = f"{'best' if update.improved else 'kept'} {name} {values[t.select_metric]:.6g} {where}"
        if update.kept:
            path = export(tag, kept.file(st.step))
            if t.keep_best > 1 and update.improved and rank == 0:
                kept.copy_best(path)
        kept.write(selection, dropped=update.dropped)

    monitor = None
    if cfg.monitor.every_epochs:
        from cxrfast.trainer.monitor import Monitor

        monitor = Monitor(cfg, shards, out, rank=rank)

    def client_state() -> dict[str, Any]:
        return {"preset": cfg.preset, "method": cfg.method_name, "world_size": world, "steps_per_epoch": data.steps,
                "global_batch": ds["train_batch_size"], "schedule": b.schedule.describe(), "shards": mix}

    plan = LoopPlan(end_epoch=end_epoch, seed=t.seed, log_every=t.log_every, end_step=cfg.optim.steps,
                    stop_after_steps=t.stop_after_steps, validator=validator, validate_every=t.validate_every_epochs,
                    validate_every_steps=t.validate_every_steps, select_metric=t.select_metric,
                    patience=t.early_stop_patience, on_select=on_select, client_state=client_state,
                    selection=selection, monitor=monitor)
    start_step, t0 = state.step, time.perf_counter()
    try:
        state = train(engine, data, ctx, state=state, plan=plan, checkpointer=checkpointer, metrics=metrics,
                      throughput=throughput, data_state=data_state)
    finally:
        metrics.close()
    elapsed = time.perf_counter() - t0
    encoder = None
    finished = state.step >= total_steps or (t.early_stop_patience and selection.bad >= t.early_stop_patience)
    if t.export and t.select == "last":
        encoder = export(f"last: epoch {state.epoch}, step {state.step}")
    elif t.export and rank == 0:
        encoder = out / "encoder.safetensors"
        log.info("the exported encoder is the best on %s: %s %.6g at step %d (epoch %d)", t.validate_split,
                 t.select_metric, selection.best, selection.best_step, selection.best_epoch)
    if rank == 0:
        steps = state.step - start_step
        images = steps * ds["train_batch_size"]
        log.info("done%s: %d steps (%d images) in %.1f s, %.1f images/s; epoch %d/%d; checkpoints %s; encoder %s",
                 "" if finished else " for now", steps, images, elapsed, images / max(elapsed, 1e-9), state.epoch,
                 epochs, out / "checkpoints", encoder)
    return state
