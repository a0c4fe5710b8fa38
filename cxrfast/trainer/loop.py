"""The pre-training loop: epochs of `steps` optimizer steps, each of `accum` micro-batches.

Per micro-batch: wait for data (timed), forward, `engine.backward`, `engine.step` (DeepSpeed
applies the optimizer and the LR scheduler on accumulation boundaries); after each optimizer step
the method's `after_optimizer_step` hook. Loss parts are summed on the device; host syncs happen
only on log steps and at epoch ends (`StepMeter.collect`). The torch RNG (masking noise, dropout)
is reseeded from (seed, step, rank) at every optimizer step, so a run resumed from any checkpoint,
mid-epoch included, computes exactly what the uninterrupted run computed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cxrfast.methods.base import StepContext
from cxrfast.trainer.checkpoint import Checkpointer, RunState
from cxrfast.trainer.data import EpochData
from cxrfast.trainer.metrics import MetricsLogger, StepMeter, Throughput
from cxrfast.trainer.validate import Selection, Validator

log = logging.getLogger(__name__)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + rank * 7_919 + 1) % 2**63


@dataclass
class LoopPlan:
    """When to stop, validate and checkpoint, and what to call on the way."""

    end_epoch: int  # train until this many epochs are done
    seed: int
    log_every: int
    stop_after_steps: int | None = None  # stop (with a checkpoint) once this many steps are done in this run
    validator: Validator | None = None
    validate_every: int = 0
    patience: int = 0  # early stopping: validations without improvement; 0 = never
    on_best: Callable[[RunState, dict[str, float]], None] | None = None  # e.g. export the best state
    client_state: Callable[[], dict[str, Any]] = dict  # extra client state for checkpoints
    selection: Selection = field(default_factory=Selection)


def train(engine: Any, data: EpochData, ctx: StepContext, *, state: RunState, plan: LoopPlan,
          checkpointer: Checkpointer, metrics: MetricsLogger, throughput: Throughput,
          data_state: bytes | None = None) -> RunState:
    """Train from `state` until the plan says stop; returns the final state."""
    from cxrfast.progress import progress

    method = engine.module
    rank = ctx.rank
    meter = StepMeter(engine.device)
    accum = data.accum
    start_step = state.step
    last_logged: dict[str, float] = {}
    lr = 0.0

    def save() -> None:
        extra = {**plan.client_state(), "selection": vars(plan.selection)}
        checkpointer.save(state, data_state=data.state() if state.micro else None, **extra)

    for epoch in range(state.epoch, plan.end_epoch):
        ctx.epoch = epoch
        method.on_epoch_start(ctx)
        engine.train()
        start = state.micro
        # The count advances every optimizer step (a host-side counter, no device sync); the loss
        # postfix changes only on log steps. In a log file: periodic lines, not a redrawn bar.
        bar = progress(f"epoch {epoch + 1}/{plan.end_epoch}", data.steps, "step", initial=start // accum,
                       enabled=rank == 0)
        batches = data.epoch(epoch, start=start, state=data_state if start else None)
        data_state = None
        throughput.restart()
        stopped = False
        for micro in range(start, data.micro_batches):
            if micro % accum == 0:
                torch.manual_seed(step_seed(plan.seed, state.step, rank))
            t0 = time.perf_counter()
            batch = next(batches)
            throughput.data_wait += time.perf_counter() - t0
            out = engine(batch)
            engine.backward(out["loss"])
            boundary = (micro + 1) % accum == 0
            if boundary:
                lr = engine.get_lr()[0]  # the lr this optimizer step uses (host value, no sync)
            engine.step()
            meter.add(out, state.step)
            throughput.images += int(next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0])
            if not boundary:
                continue
            state.step += 1
            state.micro = micro + 1
            ctx.step = state.step
            method.after_optimizer_step(ctx)
            throughput.steps += 1
            bar.update(1)
            end_of_epoch = micro + 1 == data.micro_batches
            if state.step % plan.log_every == 0 or end_of_epoch:
                last_logged = _log(meter, throughput, metrics, state, lr, epoch + (micro + 1) / data.micro_batches)
                bar.set_postfix(loss=f"{last_logged['loss']:.4f}")  # redraws the bar
            if end_of_epoch:
                break
            stop = plan.stop_after_steps is not None and state.step - start_step >= plan.stop_after_steps
            if stop or checkpointer.due_at_step(state.step):
                meter.check_finite()  # raises NonFiniteLoss before a bad state is saved
                save()
            if stop:
                stopped = True
                break
        bar.close()
        if stopped:
            log.info("stopping after %d steps as asked (train.stop_after_steps); resume with --resume", state.step)
            return state
        state.epoch, state.micro = epoch + 1, 0
        finish = False
        if plan.validator is not None and plan.validate_every and state.epoch % plan.validate_every == 0:
            finish = _validate(engine, plan, state, metrics)
        last = state.epoch == plan.end_epoch or finish
        stop = plan.stop_after_steps is not None and state.step - start_step >= plan.stop_after_steps
        if checkpointer.due_at_epoch_end(state.epoch, last=last or stop):
            save()
        if rank == 0:
            log.info("epoch %d/%d done: step %d, loss %.4f, %.1f images/s", state.epoch, plan.end_epoch, state.step,
                     last_logged.get("loss", float("nan")), last_logged.get("images_per_s", float("nan")))
        if finish or stop:
            return state
    return state


def _validate(engine: Any, plan: LoopPlan, state: RunState, metrics: MetricsLogger) -> bool:
    """Run the validator, log it, track the best; True when early stopping says stop."""
    assert plan.validator is not None
    t0 = time.perf_counter()
    values = plan.validator.run(engine)
    sel = plan.selection
    improved = sel.update(values["val_loss"], state.epoch)
    metrics.write(state.step, {"epoch": state.epoch, **values, "val_best": sel.best, "val_best_epoch": sel.best_epoch,
                               "val_seconds": time.perf_counter() - t0})
    log.info("validation after epoch %d: loss %.4f (best %.4f after epoch %d)", state.epoch, values["val_loss"],
             sel.best, sel.best_epoch)
    if improved and plan.on_best is not None:
        plan.on_best(state, values)
    if plan.patience and sel.bad >= plan.patience:
        log.info("early stopping: no improvement in %d validations (best %.4f after epoch %d)", sel.bad, sel.best,
                 sel.best_epoch)
        return True
    return False


def _log(meter: StepMeter, throughput: Throughput, metrics: MetricsLogger, state: RunState, lr: float,
         epoch: float) -> dict[str, float]:
    losses = meter.collect()  # host sync; raises NonFiniteLoss
    record: dict[str, Any] = {"epoch": round(epoch, 4), **losses, "lr": lr, **throughput.rates()}
    metrics.write(state.step, record)
    return record
