"""One pre-training run inside an initialised process group: build the parts, train, export."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrfast.config import Config
from cxrfast.trainer import deepspeed_config
from cxrfast.trainer.build import build_engine, build_model, compile_blocks, loader_dtype, model_kwargs
from cxrfast.trainer.checkpoint import Checkpointer, RunState
from cxrfast.trainer.data import EpochData, ShardInfo, read_shards
from cxrfast.trainer.export import export_trained_encoder
from cxrfast.trainer.loop import train
from cxrfast.trainer.metrics import MetricsLogger, Throughput, peak_tflops

log = logging.getLogger(__name__)


@dataclass
class Built:
    """The parts of a run, ready to train."""

    engine: Any
    data: EpochData
    info: ShardInfo
    ds: dict[str, Any]
    peak_lr: float
    model_kwargs: dict[str, Any]
    flops_per_image: float


def build(cfg: Config, shards: Path, ds_file: Path | None = None) -> Built:
    """Model, DeepSpeed settings, data and engine for `cfg` (collective: every rank calls it)."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    info = read_shards(shards, cfg.data.split)
    kwargs = model_kwargs(cfg, info)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, kwargs)
    if cfg.model.compile:
        log.info("torch.compile: %d transformer blocks", compile_blocks(model))
    ds = deepspeed_config.build(cfg, world, ds_file)
    data = EpochData(
        info, split=cfg.data.split, recipe=model.data_recipe, batch_size=ds["train_micro_batch_size_per_gpu"],
        accum=ds["gradient_accumulation_steps"], backend=cfg.data.backend, dtype=loader_dtype(ds),
        seed=cfg.train.seed, shuffle=cfg.data.shuffle, num_threads=cfg.data.num_threads,
        image_size=int(model.timm_kwargs["img_size"]), rank=rank, world_size=world,
        overfit_batches=cfg.data.overfit_batches,
    )
    flops = float(model.flops_per_image())
    engine, peak_lr = build_engine(model, cfg, ds, steps_per_epoch=data.steps, cuda=torch.cuda.is_available())
    return Built(engine=engine, data=data, info=info, ds=ds, peak_lr=peak_lr, model_kwargs=kwargs,
                 flops_per_image=flops)


def run(cfg: Config, *, shards: Path, out: Path, ds_file: Path | None = None, resume: Path | None = None) -> RunState:
    """Train `cfg` on `shards` into `out`; `resume` is a checkpoint folder to continue from."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    b = build(cfg, shards, ds_file)
    engine, data, ds, info, peak_lr = b.engine, b.data, b.ds, b.info, b.peak_lr
    cuda = torch.cuda.is_available()
    if rank == 0:
        log.info("%s on %s (%s, %d %s samples): %s, %d steps/epoch, peak lr %.3g, %d rank(s)", cfg.recipe, shards,
                 info.dataset, info.split_samples[cfg.data.split], cfg.data.split, deepspeed_config.describe(ds),
                 data.steps, peak_lr, world)

    checkpointer = Checkpointer(engine, out / "checkpoints", every_epochs=cfg.train.ckpt_every_epochs,
                                keep=cfg.train.ckpt_keep, rank=rank)
    state = RunState()
    if resume is not None:
        state = checkpointer.load(resume)
        if state.step != state.epoch * data.steps:
            log.warning("checkpoint is at step %d after %d epochs, but this run has %d steps/epoch (world size or "
                        "batch changed): the schedule continues from step %d", state.step, state.epoch, data.steps,
                        state.step)
    stop = cfg.train.stop_after_epochs
    end_epoch = cfg.optim.epochs if stop is None else min(cfg.optim.epochs, state.epoch + stop)
    if rank == 0:
        cfg.save_json(out / "config.json", world_size=world, deepspeed=ds, peak_lr=peak_lr,
                      steps_per_epoch=data.steps, shards=str(shards), resumed_from=None if resume is None else str(resume))

    device_name = torch.cuda.get_device_name() if cuda else None
    throughput = Throughput(world_size=world, flops_per_image=b.flops_per_image,
                            peak=cfg.train.peak_tflops or peak_tflops(device_name), cuda=cuda)
    metrics = MetricsLogger(out, enabled=rank == 0)
    start_step, t0 = state.step, time.perf_counter()

    def client_state() -> dict[str, Any]:
        return {"recipe": cfg.recipe, "world_size": world, "steps_per_epoch": data.steps}

    try:
        state = train(engine, data, state=state, end_epoch=end_epoch, seed=cfg.train.seed, rank=rank,
                      log_every=cfg.train.log_every, checkpointer=checkpointer, metrics=metrics,
                      throughput=throughput, client_state=client_state)
    finally:
        metrics.close()
    elapsed = time.perf_counter() - t0
    encoder = None
    if cfg.train.export:
        encoder = export_trained_encoder(engine, lambda: build_model(cfg, b.model_kwargs), out / "encoder.safetensors",
                                         rank=rank)
    if rank == 0:
        steps = state.step - start_step
        images = steps * ds["train_batch_size"]
        log.info("done: %d steps (%d images) in %.1f s, %.1f images/s; epoch %d/%d; checkpoints %s; encoder %s",
                 steps, images, elapsed, images / max(elapsed, 1e-9), state.epoch, cfg.optim.epochs,
                 out / "checkpoints", encoder)
    return state
