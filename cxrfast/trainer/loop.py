"""The pre-training loop: epochs of `steps` optimizer steps, each of `accum` micro-batches (a
schedule quoted in steps ends inside its last epoch, at `LoopPlan.end_step`).

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
from typing import Any, Protocol

import torch

from cxrfast.methods.base import StepContext
from cxrfast.trainer.checkpoint import Checkpointer, RunState
from cxrfast.trainer.data import EpochData
from cxrfast.trainer.metrics import MetricsLogger, StepMeter, Throughput
from cxrfast.trainer.validate import Selection, Update, Validator

log = logging.getLogger(__name__)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + rank * 7_919 + 1) % 2**63


class Monitor(Protocol):
    """A part run at epoch ends (the in-training linear probe, `cxrfast.trainer.monitor`)."""

    def due(self, epoch: int) -> bool: ...

    def run(self, engine: Any, state: RunState, metrics: MetricsLogger) -> None: ...


@dataclass
class LoopPlan:
    """When to stop, validate and checkpoint, and what to call on the way."""

    end_epoch: int  # train until this many epochs are done
    seed: int
    log_every: int
    end_step: int | None = None  # the schedule ends after this many optimizer steps (inside epoch end_epoch)
    stop_after_steps: int | None = None  # stop (with a checkpoint) once this many steps are done in this run
    validator: Validator | None = None
    validate_every: int = 0  # validate every N epochs
    validate_every_steps: int = 0  # validate every N optimizer steps
    select_metric: str = "val_loss"  # the validation value the selection follows
    patience: int = 0  # early stopping: validations without improvement; 0 = never
    on_select: Callable[[RunState, dict[str, float], Update], None] | None = None  # e.g. export a kept state
    client_state: Callable[[], dict[str, Any]] = dict  # extra client state for checkpoints
    selection: Selection = field(default_factory=Selection)
    monitor: Monitor | None = None
    last_validated: int = -1  # optimizer step of the last validation (no step is validated twice)

    def ended(self, state: RunState) -> bool:
        """The schedule is done, or early stopping said stop."""
        done = self.end_step is not None and state.step >= self.end_step
        return done or bool(self.patience and self.selection.bad >= self.patience)

    def validation_due(self, state: RunState, *, epoch_end: bool, last: bool) -> bool:
        """Validate now: at the epoch or step intervals, and once at the end of training."""
        if self.validator is None or state.step == self.last_validated:
            return False
        every_epoch = epoch_end and self.validate_every and state.epoch % self.validate_every == 0
        every_step = self.validate_every_steps and state.step % self.validate_every_steps == 0
        return bool(every_epoch or every_step or last)


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
        extra = {**plan.client_state(), "selection": plan.selection.state()}
        checkpointer.save(state, data_state=data.state() if state.micro else None, **extra)

    if plan.ended(state):  # resumed from the checkpoint of a finished run
        return state
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
        stopped = ended = False
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
                lr = max(engine.get_lr())  # the lr this step uses at lr_scale 1 (host values, no sync)
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
            done = plan.end_step is not None and state.step >= plan.end_step
            position = epoch + (micro + 1) / data.micro_batches
            if state.step % plan.log_every == 0 or end_of_epoch or done:
                last_logged = _log(meter, throughput, metrics, state, lr, position)
                bar.set_postfix(loss=f"{last_logged['loss']:.4f}")  # redraws the bar
            if end_of_epoch:
                break
            if plan.validation_due(state, epoch_end=False, last=done):
                done = _validate(engine, plan, state, metrics, position) or done
            stop = plan.stop_after_steps is not None and state.step - start_step >= plan.stop_after_steps
            if done or stop or checkpointer.due_at_step(state.step):
                meter.check_finite()  # raises NonFiniteLoss before a bad state is saved
                save()
            if done or stop:
                stopped, ended = stop and not done, done
                break
        bar.close()
        if ended:
            log.info("training done after %d steps (inside epoch %d)", state.step, epoch + 1)
            return state
        if stopped:
            log.info("stopping after %d steps as asked (train.stop_after_steps); resume with --resume", state.step)
            return state
        state.epoch, state.micro = epoch + 1, 0
        done = state.epoch == plan.end_epoch or (plan.end_step is not None and state.step >= plan.end_step)
        finish = False
        if plan.validation_due(state, epoch_end=True, last=done):
            finish = _validate(engine, plan, state, metrics, state.epoch)
        if plan.monitor is not None and plan.monitor.due(state.epoch):
            plan.monitor.run(engine, state, metrics)
        last = done or finish
        stop = plan.stop_after_steps is not None and state.step - start_step >= plan.stop_after_steps
        if checkpointer.due_at_epoch_end(state.epoch, last=last or stop):
            save()
        if rank == 0:
            log.info("epoch %d/%d done: step %d, loss %.4f, %.1f images/s", state.epoch, plan.end_epoch, state.step,
                     last_logged.get("loss", float("nan")), last_logged.get("images_per_s", float("nan")))
        if finish or stop or done:
            return state
    return state


def _validate(engine: Any, plan: LoopPlan, state: RunState, metrics: MetricsLogger, position: float | int) -> bool:
    """Run the validator, log it, track the best; True when early stopping says stop."""
    assert plan.validator is not None
    t0 = time.perf_counter()
    values = plan.validator.run(engine)
    plan.last_validated = state.step
    if plan.select_metric not in values:
        raise ValueError(f"train.select_metric={plan.select_metric} is not a validation value of this method "
                         f"(it reports {sorted(values)})")
    sel = plan.selection
    update = sel.update(values[plan.select_metric], epoch=state.epoch, step=state.step)
    metrics.write(state.step, {"epoch": position if isinstance(position, int) else round(position, 4), **values,
                               "val_best": sel.best,
                               "val_best_step": sel.best_step, "val_best_epoch": sel.best_epoch,
                               "val_seconds": time.perf_counter() - t0})  # fmt: skip
    log.info("validation at step %d (epoch %.2f): %s %.4f (best %.4f at step %d)", state.step, position,
             plan.select_metric, values[plan.select_metric], sel.best, sel.best_step)
    if plan.on_select is not None and (update.kept or update.dropped):
        plan.on_select(state, values, update)
    if plan.patience and sel.bad >= plan.patience:
        log.info("early stopping: no improvement in %d validations (best %.4f at step %d)", sel.bad, sel.best,
                 sel.best_step)
        return True
    return False


def _log(meter: StepMeter, throughput: Throughput, metrics: MetricsLogger, state: RunState, lr: float,
         epoch: float) -> dict[str, float]:
    losses = meter.collect()  # host sync; raises NonFiniteLoss
    record: dict[str, Any] = {"epoch": round(epoch, 4), **losses, "lr": lr, **throughput.rates()}
    metrics.write(state.step, record)
    return record
