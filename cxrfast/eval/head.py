"""Train a classification head on frozen features and select it on `validate`.

One loop for both feeds: cached feature tensors (the fast default: seconds per draw) and the
per-epoch pass through the frozen backbone with train augmentations (`--augment`, the published
way). Every `eval_every_steps` the head is scored on validate (masked BCE loss and mean AUC); the
best by the protocol's metric is kept (the k best for an ensemble), early stopping counts
evaluations without improvement, and test is never looked at here.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrfast.eval.metrics import auc_per_label
from cxrfast.eval.protocols import (
    ProbeKnobs,
    moco_cxr_epochs,
    moco_cxr_eval_every_samples,
    mrm_steps,
    refuse_test_selection,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Schedule:
    """A draw's resolved training length and learning rate."""

    steps: int  # optimizer steps
    warmup_steps: int
    lr: float  # peak learning rate
    eval_every_steps: int
    steps_per_epoch: int

    def lr_at(self, step: int, *, cosine: bool, min_lr: float) -> float:
        """Linear warmup from 0, then constant or half-cycle cosine down to min_lr (step counts from 0)."""
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if not cosine:
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return min_lr + (self.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_per_epoch(n_train: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch; a draw smaller than one batch still gets its one (partial) batch."""
    if drop_last and n_train >= batch_size:
        return n_train // batch_size
    return max(1, math.ceil(n_train / batch_size))


def resolve_schedule(k: ProbeKnobs, *, n_train: int, fraction: float, task: str) -> Schedule:
    """The schedule of one draw under the protocol's rule (fixed, mrm or moco-cxr)."""
    spe = steps_per_epoch(n_train, k.batch_size, k.drop_last)
    base_lr = k.lr if k.lr is not None else (k.blr or 0.0) * k.batch_size / 256
    if k.schedule_rule == "mrm":  # MRM: fixed steps / warmup / lr per dataset and fraction; validate every epoch
        s = mrm_steps(task, fraction)
        return Schedule(s.steps, s.warmup, s.lr, spe, spe)
    if k.schedule_rule == "moco-cxr":  # epochs and validate interval from the fraction
        every = max(1, round(moco_cxr_eval_every_samples(fraction) / k.batch_size))
        return Schedule(moco_cxr_epochs(fraction) * spe, 0, base_lr, every, spe)
    steps = k.steps if k.steps is not None else k.epochs * spe
    every = max(1, round(k.eval_every_epochs * spe))
    return Schedule(steps, round(k.warmup_epochs * spe), base_lr, every, spe)


class LinearHead(nn.Module):
    """[BatchNorm1d without affine (MAE's linear probe)] -> Dropout -> Linear."""

    def __init__(self, dim: int, n_labels: int, *, batchnorm: bool, dropout: float, init_std: float | None) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, n_labels)
        if init_std is not None:
            nn.init.trunc_normal_(self.fc.weight, std=init_std)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(x)))


def build_head(k: ProbeKnobs, dim: int, n_labels: int, seed: int) -> LinearHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LinearHead(dim, n_labels, batchnorm=k.head == "bn_linear", dropout=k.dropout, init_std=k.head_init_std)


def build_optimizer(k: ProbeKnobs, head: nn.Module, lr: float) -> torch.optim.Optimizer:
    params = list(head.parameters())
    if k.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(k.beta1, k.beta2), weight_decay=k.weight_decay)
    if k.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(k.beta1, k.beta2), weight_decay=k.weight_decay)
    if k.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=k.momentum, weight_decay=k.weight_decay)
    from timm.optim import Lars

    # MAE's LARS: trust-ratio scaling and weight decay on matrices only; biases plain SGD with momentum
    mats = [p for p in params if p.ndim > 1]
    vecs = [p for p in params if p.ndim <= 1]
    return Lars([{"params": mats, "weight_decay": k.weight_decay, "always_adapt": True},
                 {"params": vecs, "weight_decay": 0.0, "always_adapt": False}],
                lr=lr, momentum=k.momentum, trust_coeff=0.001)  # fmt: skip


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE over the entries whose target is not masked (-1)."""
    mask = (targets >= 0).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.clamp(min=0).float(), weight=mask, reduction="sum")
    return loss / mask.sum().clamp(min=1)


class TrainFeed(Protocol):
    """Training batches of (features [b, D], targets [b, L]) on the head's device, forever."""

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class TensorFeed:
    """Cached features: a seeded permutation per epoch, batches of `batch_size` (drop_last as the protocol)."""

    x: torch.Tensor
    y: torch.Tensor
    batch_size: int
    drop_last: bool
    seed: int

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        gen = torch.Generator().manual_seed(self.seed)
        spe = steps_per_epoch(n, self.batch_size, self.drop_last)
        while True:
            perm = torch.randperm(n, generator=gen).to(self.x.device)
            for i in range(spe):
                idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
                yield self.x[idx], self.y[idx]


@dataclass
class Evaluation:
    step: int
    epoch: float
    train_loss: float
    val_loss: float
    val_auc: float | None  # mean over labels defined on validate


@dataclass
class FitResult:
    """The selected head(s) and the training record of one draw."""

    heads: list[nn.Module]  # best first (len = ensemble size)
    selected: list[Evaluation]
    history: list[Evaluation] = field(default_factory=list)
    steps_run: int = 0
    stopped_early: bool = False

    def record(self) -> dict[str, Any]:
        return {"steps_run": self.steps_run, "stopped_early": self.stopped_early,
                "selected": [vars(e) for e in self.selected], "history": [vars(e) for e in self.history]}  # fmt: skip


@torch.no_grad()
def predict(heads: list[nn.Module], x: torch.Tensor, chunk: int = 65536) -> np.ndarray:
    """Mean sigmoid probability of `heads` (an ensemble of one or more) on features x -> [n, L]."""
    out = []
    for h in heads:
        h.eval()
        out.append(torch.cat([torch.sigmoid(h(x[i : i + chunk]).float()) for i in range(0, len(x), chunk)]))
    return torch.stack(out).mean(0).cpu().numpy()


def _score(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float | None]:
    with torch.no_grad():
        head.eval()
        logits = torch.cat([head(x[i : i + 65536]) for i in range(0, len(x), 65536)])
        head.train()
    loss = float(masked_bce(logits, y))
    aucs = auc_per_label(torch.sigmoid(logits.float()).cpu().numpy(), y.cpu().numpy())
    finite = aucs[np.isfinite(aucs)]
    return loss, (float(finite.mean()) if finite.size else None)


def _selection_key(metric: str, val_loss: float, val_auc: float | None) -> tuple[int, float]:
    """Smaller is better. val_auc: evaluations with a defined validate AUC first, by AUC; when no label
    has both classes on validate, by loss instead."""
    if metric == "val_loss":
        return (0, val_loss)
    return (0, -val_auc) if val_auc is not None else (1, val_loss)


def fit_head(k: ProbeKnobs, sched: Schedule, feed: TrainFeed, val: Callable[[], tuple[torch.Tensor, torch.Tensor]],
             *, dim: int, n_labels: int, seed: int, device: torch.device, progress: bool = False) -> FitResult:  # fmt: skip
    """Train a head for `sched.steps` steps (or until early stopping) and keep the best on validate."""
    refuse_test_selection(k.select_split, "probe.select_split")
    from cxrfast.progress import progress as reporter

    head = build_head(k, dim, n_labels, seed).to(device)
    opt = build_optimizer(k, head, sched.lr)
    result = FitResult(heads=[], selected=[])
    ranked: list[tuple[tuple[int, float], int, nn.Module, Evaluation]] = []  # (key, step, head copy, evaluation)
    best, since_best, running, seen = (2, 0.0), 0, 0.0, 0
    cosine = k.lr_schedule == "cosine"
    batches = feed.batches()
    head.train()
    bar = reporter("head", sched.steps, "step", enabled=progress and sched.steps >= 1000)  # short heads: one log line
    for step in range(sched.steps):
        bar.update()
        lr = sched.lr_at(step, cosine=cosine, min_lr=k.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = next(batches)
        loss = masked_bce(head(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if k.clip_grad > 0:
            nn.utils.clip_grad_norm_(head.parameters(), k.clip_grad)
        opt.step()
        running += float(loss.detach())
        seen += 1
        done = step + 1
        if done % sched.eval_every_steps and done != sched.steps:
            continue
        vx, vy = val()
        val_loss, val_auc = _score(head, vx, vy)
        ev = Evaluation(done, done / sched.steps_per_epoch, running / max(seen, 1), val_loss, val_auc)
        result.history.append(ev)
        running, seen = 0.0, 0
        key = _selection_key(k.select_metric, val_loss, val_auc)
        if len(ranked) < k.ensemble_top_k or key < ranked[-1][0]:  # copy the head only when it is kept
            ranked.append((key, done, copy.deepcopy(head).eval(), ev))
            ranked.sort(key=lambda t: (t[0], t[1]))
            del ranked[k.ensemble_top_k :]
        if key < best:
            best, since_best = key, 0
        else:
            since_best += 1
            if k.patience is not None and since_best >= k.patience:
                result.stopped_early = True
                result.steps_run = done
                break
    else:
        result.steps_run = sched.steps
    bar.close()
    result.heads = [t[2] for t in ranked]
    result.selected = [t[3] for t in ranked]
    return result
