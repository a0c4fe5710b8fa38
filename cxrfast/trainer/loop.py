"""The pre-training loop: epochs of `steps` optimizer steps, each of `accum` micro-batches.

Per micro-batch: wait for data (timed), forward, `engine.backward`, `engine.step` (DeepSpeed
applies the optimizer and the LR scheduler on accumulation boundaries). Loss parts are summed on
the device; host syncs happen only on log steps and at epoch ends (`StepMeter.collect`).
The torch RNG (masking noise) is reseeded from (seed, epoch, rank) at every epoch start, which
makes a run resumed at an epoch boundary identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from cxrfast.trainer.checkpoint import Checkpointer, RunState
from cxrfast.trainer.data import EpochData
from cxrfast.trainer.metrics import MetricsLogger, StepMeter, Throughput

log = logging.getLogger(__name__)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2**63


def train(
    engine: Any,
    data: EpochData,
    *,
    state: RunState,
    end_epoch: int,
    seed: int,
    rank: int,
    log_every: int,
    checkpointer: Checkpointer,
    metrics: MetricsLogger,
    throughput: Throughput,
    client_state: Callable[[], dict[str, Any]] = dict,
) -> RunState:
    """Train from `state` until `end_epoch` epochs are done; returns the final state."""
    from tqdm import tqdm

    device = engine.device
    interactive = sys.stderr.isatty()
    meter = StepMeter(device)
    accum = data.accum
    batch_size = None
    last_logged: dict[str, float] = {}
    lr = 0.0
    for epoch in range(state.epoch, end_epoch):
        torch.manual_seed(epoch_seed(seed, epoch, rank))
        engine.train()
        # The count advances every optimizer step (a host-side counter, no device sync); the
        # loss postfix changes only on log steps, where `_log` has synced anyway. Without a
        # terminal (a log file) the bar is redrawn at most every 30 s and kept at the epoch end.
        bar = tqdm(total=data.steps, desc=f"epoch {epoch + 1}/{end_epoch}", disable=rank != 0,
                   mininterval=0.5 if interactive else 30.0, dynamic_ncols=True, leave=not interactive)
        batches = data.epoch(epoch)
        throughput.restart()
        for micro in range(data.micro_batches):
            t0 = time.perf_counter()
            batch = next(batches)
            throughput.data_wait += time.perf_counter() - t0
            if batch_size is None:
                batch_size = int(batch["image"].shape[0])
            out = engine(batch)
            engine.backward(out["loss"])
            boundary = (micro + 1) % accum == 0
            if boundary:
                lr = engine.get_lr()[0]  # the lr this optimizer step uses (host value, no sync)
            engine.step()
            meter.add(out, state.step)
            throughput.images += batch_size
            if not boundary:
                continue
            state.step += 1
            throughput.steps += 1
            bar.update(1)
            end_of_epoch = micro + 1 == data.micro_batches
            if state.step % log_every == 0 or end_of_epoch:
                last_logged = _log(meter, throughput, metrics, state, lr, epoch + (micro + 1) / data.micro_batches)
                bar.set_postfix(loss=f"{last_logged['loss']:.4f}")  # redraws the bar
        bar.close()
        state.epoch = epoch + 1
        if checkpointer.due(state.epoch, last=state.epoch == end_epoch):
            checkpointer.save(state, **client_state())
        if rank == 0:
            log.info("epoch %d/%d done: step %d, loss %.4f, %.1f images/s", state.epoch, end_epoch, state.step,
                     last_logged["loss"], last_logged["images_per_s"])
    return state


def _log(meter: StepMeter, throughput: Throughput, metrics: MetricsLogger, state: RunState, lr: float,
         epoch: float) -> dict[str, float]:
    losses = meter.collect()  # host sync; raises NonFiniteLoss
    record: dict[str, Any] = {"epoch": round(epoch, 4), **losses, "lr": lr, **throughput.rates()}
    metrics.write(state.step, record)
    return record
