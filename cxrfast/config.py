"""Run configuration: small kw-only dataclasses, `key=value` overrides, JSON out.

A run's config is a preset (`cxrfast.presets.PRESETS`) plus overrides from the command line. The
method's own config dataclass nests under `method`. Override keys are dotted paths into the tree
(`optim.lr=3e-4`, `method.mask_ratio=0.8`) or a bare field name when it is unique in the tree
(`epochs=2`, `batch_size=8`); unknown keys and badly typed values are errors. Every dataclass
validates itself in `__post_init__`, so an override is checked as it is applied.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrfast.methods.base import MethodConfig
from cxrfast.shards.schema import DATASET_LABEL_NAMES

BACKENDS = ("dali", "torch", "synthetic")
PRECISIONS = ("bf16", "fp32")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("warmup_cosine", "step", "constant")
SELECT = ("last", "best")
SELECT_MODES = ("min", "max")
#: The datasets `cxrfast shard` writes (a shard folder's manifest "dataset").
DATASETS = tuple(DATASET_LABEL_NAMES)


@dataclass(kw_only=True)
class DataConfig:
    """Where batches come from (`cxrfast.pipelines.build_loader`)."""

    backend: str = "dali"  # dali | torch (DataLoader reference) | synthetic (random tensors, no I/O)
    split: str = "train"  # shard split to train on
    num_threads: int = 4  # DALI threads / DataLoader workers per rank
    shuffle: bool = True  # shuffle samples each epoch (seeded by seed + epoch)
    overfit_batches: int = 0  # >0: train on the first N batches only, repeated every epoch (debug)
    datasets: tuple[str, ...] = ()  # the datasets of the preset's published mix; other --shards are warned about
    strict_datasets: bool = False  # refuse --shards whose datasets differ from `datasets` (instead of a warning)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"data.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.split not in ("train", "validate", "test"):
            raise ValueError(f"data.split must be train, validate or test, got {self.split!r}")
        if self.num_threads < 1:
            raise ValueError(f"data.num_threads must be >= 1, got {self.num_threads}")
        if self.overfit_batches < 0:
            raise ValueError(f"data.overfit_batches must be >= 0, got {self.overfit_batches}")
        unknown = [d for d in self.datasets if d not in DATASETS]
        if unknown or len(set(self.datasets)) != len(self.datasets):
            raise ValueError(f"data.datasets must name distinct datasets of {DATASETS}, got {self.datasets}")


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer, learning rate rule and schedule (per-iteration, stepped by DeepSpeed)."""

    epochs: int  # length of the schedule in epochs
    name: str = "adamw"  # adamw | adam | sgd
    lr: float | None = None  # absolute peak learning rate; wins over blr when set
    blr: float | None = None  # base learning rate: peak lr = blr * global batch / lr_batch_ref
    lr_batch_ref: int = 256  # the batch size blr is quoted for (the linear scaling rule)
    weight_decay: float = 0.05  # decoupled (AdamW) or L2 (Adam, SGD) weight decay, on the method's decay group
    betas: tuple[float, float] = (0.9, 0.95)  # Adam/AdamW betas
    eps: float = 1e-8  # Adam/AdamW epsilon
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = False  # SGD Nesterov momentum
    clip_grad: float = 0.0  # gradient-norm clipping threshold; 0 = off
    schedule: str = "warmup_cosine"  # warmup_cosine | step | constant (each after the linear warmup)
    warmup_epochs: float = 0.0  # linear warmup from 0, in epochs (fractions allowed)
    min_lr: float = 0.0  # floor of the cosine decay
    milestones: tuple[float, ...] = ()  # step schedule: epochs at which the lr is multiplied by gamma
    gamma: float = 0.1  # step schedule factor
    steps: int | None = None  # schedule length in optimizer steps (wins over epochs; e.g. MRM's fine-tune tables)
    warmup_steps: int | None = None  # linear warmup in optimizer steps (instead of warmup_epochs)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"optim.epochs must be >= 1, got {self.epochs}")
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.lr is None and self.blr is None:
            raise ValueError("set optim.lr (absolute) or optim.blr (scaled by global batch / lr_batch_ref)")
        for name in ("lr", "blr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"optim.{name} must be > 0, got {value}")
        if self.lr_batch_ref < 1:
            raise ValueError(f"optim.lr_batch_ref must be >= 1, got {self.lr_batch_ref}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"optim.warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if min(self.min_lr, self.weight_decay, self.clip_grad, self.eps) < 0:
            raise ValueError("optim.min_lr, weight_decay, clip_grad and eps must be >= 0")
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise ValueError(f"optim.betas must be two values in [0, 1), got {self.betas}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"optim.momentum must be in [0, 1), got {self.momentum}")
        if list(self.milestones) != sorted(self.milestones) or any(m <= 0 for m in self.milestones):
            raise ValueError(f"optim.milestones must be increasing positive epochs, got {self.milestones}")
        if self.schedule == "step" and not self.milestones:
            raise ValueError("optim.schedule=step needs optim.milestones (epochs), e.g. milestones=120,160")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"optim.gamma must be in (0, 1], got {self.gamma}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"optim.steps must be >= 1 or none, got {self.steps}")
        if self.warmup_steps is not None:
            if self.warmup_epochs:
                raise ValueError("set optim.warmup_steps or optim.warmup_epochs, not both")
            if self.warmup_steps < 0 or (self.steps is not None and self.warmup_steps > self.steps):
                raise ValueError(f"optim.warmup_steps must be in [0, steps], got {self.warmup_steps}")

    def run_epochs(self, steps_per_epoch: int) -> int:
        """Epochs the run spans: `epochs`, or enough epochs to hold `steps` optimizer steps."""
        if self.steps is None:
            return self.epochs
        return -(-self.steps // steps_per_epoch)

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the whole schedule."""
        return self.steps if self.steps is not None else self.epochs * steps_per_epoch

    def peak_lr(self, global_batch: int) -> float:
        """The learning rate after warmup: `lr`, else `blr * global_batch / lr_batch_ref`."""
        if self.lr is not None:
            return self.lr
        assert self.blr is not None
        return self.blr * global_batch / self.lr_batch_ref


@dataclass(kw_only=True)
class TrainConfig:
    """Batching, precision, DeepSpeed ZeRO, logging, checkpointing, validation and export."""

    batch_size: int  # micro-batch per rank (per GPU)
    global_batch_size: int | None = None  # images per optimizer step; None = batch_size x world size
    zero_stage: int = 2  # DeepSpeed ZeRO stage: 0, 1 or 2
    precision: str = "bf16"  # bf16 (fp32 master weights in the optimizer) or fp32
    seed: int = 0  # seeds the model init, the per-step RNG and the data order
    log_every: int = 20  # optimizer steps between metric logs (the only host syncs)
    ckpt_every_steps: int = 0  # also checkpoint every N optimizer steps (mid-epoch); 0 = off
    ckpt_every_epochs: int = 20  # checkpoint every N epochs (and always at the end); 0 = only at the end
    ckpt_keep: int = 2  # keep the newest N checkpoints; 0 = keep all
    stop_after_epochs: int | None = None  # end this run after N epochs of the schedule (resume later)
    stop_after_steps: int | None = None  # end this run after N optimizer steps (mid-epoch; resume later)
    grad_checkpointing: bool = False  # activation checkpointing (the method says where)
    compile: bool = False  # torch.compile the method's compile targets (CUDA)
    validate_every_epochs: int = 0  # validation loss on data.validate_split every N epochs; 0 = off
    validate_every_steps: int = 0  # also validate every N optimizer steps (mid-epoch too, and at the last step); 0 = off
    validate_split: str = "validate"  # the split validation runs on (never test)
    early_stop_patience: int = 0  # stop after N validations without improvement; 0 = never
    select: str = "last"  # exported encoder: last epoch, or best (by select_metric on validation)
    select_metric: str = "val_loss"  # the validation value select=best and early stopping follow (a method may add e.g. val_auc)
    select_mode: str = "min"  # min | max: whether a lower or a higher select_metric is better
    keep_best: int = 1  # select=best: keep the N best states as OUT/best/*.safetensors (OUT/encoder.safetensors is the best)
    export: bool = True  # write OUT/encoder.safetensors (timm names) at the end
    peak_tflops: float | None = None  # accelerator peak for MFU when its name is not in the table

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.global_batch_size is not None and self.global_batch_size % self.batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of batch_size={self.batch_size}"
            )
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"train.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.log_every < 1 or min(self.ckpt_every_epochs, self.ckpt_every_steps, self.ckpt_keep) < 0:
            raise ValueError("train.log_every must be >= 1; ckpt_every_epochs, ckpt_every_steps and ckpt_keep >= 0")
        for name in ("stop_after_epochs", "stop_after_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"train.{name} must be >= 1, got {value}")
        if min(self.validate_every_epochs, self.validate_every_steps, self.early_stop_patience) < 0:
            raise ValueError("train.validate_every_epochs, validate_every_steps and early_stop_patience must be >= 0")
        if self.validate_split == "test":
            raise ValueError("train.validate_split=test: selecting or stopping on the test split is refused; use validate")
        if self.select not in SELECT:
            raise ValueError(f"train.select must be one of {SELECT}, got {self.select!r}")
        if (self.select == "best" or self.early_stop_patience) and not self.validates:
            raise ValueError("train.select=best and train.early_stop_patience need train.validate_every_epochs >= 1 "
                             "or train.validate_every_steps >= 1")
        if self.select_mode not in SELECT_MODES:
            raise ValueError(f"train.select_mode must be one of {SELECT_MODES}, got {self.select_mode!r}")
        if not self.select_metric.startswith("val_"):
            raise ValueError(f"train.select_metric names a validation value (val_loss, val_<part>, or a method's "
                             f"val_<metric>), got {self.select_metric!r}")
        if self.keep_best < 1 or (self.keep_best > 1 and self.select != "best"):
            raise ValueError(f"train.keep_best must be >= 1, and > 1 only with select=best, got {self.keep_best}")

    @property
    def validates(self) -> bool:
        """True when the run validates at all."""
        return bool(self.validate_every_epochs or self.validate_every_steps)

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank."""
        if self.global_batch_size is None:
            return 1
        per_step = self.batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of batch_size={self.batch_size} "
                f"x world size {world_size}"
            )
        return self.global_batch_size // per_step


MONITOR_POOLINGS = ("auto", "cls", "gap")


@dataclass(kw_only=True)
class MonitorConfig:
    """The in-training monitor: the cached-feature linear probe of `cxrfast eval` on a held-out labelled
    shard folder every N epochs, with the encoder being trained (per-label and mean test AUC, and the cost,
    logged to metrics.jsonl and TensorBoard)."""

    every_epochs: int = 0  # probe every N epochs (on rank 0; the other ranks wait); 0 = off
    shards: str | None = None  # labelled shard folder with train, validate and test splits (e.g. CheXpert)
    task: str = "chexpert5"  # evaluation task (cxrfast.eval.tasks)
    protocol: str = "mgca"  # evaluation protocol whose probe settings apply (cxrfast.eval.protocols)
    fraction: float = 1.0  # share of the monitor folder's train patients the head trains on, in (0, 1]
    pooling: str = "auto"  # cls | gap | auto (the class token when the encoder has one, else the global average)
    overrides: tuple[str, ...] = ()  # more protocol knobs as key=value, comma-separated (e.g. probe.epochs=20)

    def __post_init__(self) -> None:
        if self.every_epochs < 0:
            raise ValueError(f"monitor.every_epochs must be >= 0, got {self.every_epochs}")
        if self.every_epochs and not self.shards:
            raise ValueError("monitor.every_epochs needs monitor.shards=DIR (a labelled shard folder, e.g. CheXpert)")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"monitor.fraction must be in (0, 1], got {self.fraction}")
        if self.pooling not in MONITOR_POOLINGS:
            raise ValueError(f"monitor.pooling must be one of {MONITOR_POOLINGS}, got {self.pooling!r}")
        from cxrfast.eval.tasks import get_task

        get_task(self.task)
        self.protocol_settings()  # the protocol and its overrides are checked as they are set

    def protocol_settings(self):
        """The probe's `cxrfast.eval.protocols.Protocol`: the preset, the fraction and the overrides."""
        from cxrfast.eval.protocols import get_protocol

        extra = [f"data.fractions={self.fraction}"] + ([f"probe.pooling={self.pooling}"] if self.pooling != "auto" else [])
        return get_protocol(self.protocol, extra + list(self.overrides))


@dataclass(kw_only=True)
class RunConfig:
    """One pre-training run: the preset it started from, the method's config and the run's sections."""

    preset: str  # name in cxrfast.presets.PRESETS this config started from
    method: MethodConfig  # the method's own config (its class says which method)
    optim: OptimConfig
    train: TrainConfig
    data: DataConfig = field(default_factory=DataConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self) -> None:
        if self.train.stop_after_epochs is not None and self.train.stop_after_epochs > self.optim.epochs:
            raise ValueError(
                f"train.stop_after_epochs={self.train.stop_after_epochs} exceeds optim.epochs={self.optim.epochs}"
            )

    @property
    def method_name(self) -> str:
        from cxrfast.methods import method_for_config

        return method_for_config(self.method).name

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["method"] = {"name": self.method_name, **out["method"]}
        return out

    def save_json(self, path: Path, **extra: Any) -> Path:
        """Write the resolved config (plus `extra`, e.g. world size, lr) to `path` atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**self.to_dict(), **extra}, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        return path


# --- overrides -------------------------------------------------------------------------------
def _leaves(obj: Any, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """Every dataclass leaf under `obj`: dotted path -> (owning dataclass instance, field name)."""
    out: dict[str, tuple[Any, str]] = {}
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(_leaves(value, path + "."))
        else:
            out[path] = (obj, f.name)
    return out


def override_keys(cfg: Any) -> dict[str, str]:
    """Every accepted override key of `cfg` -> its dotted path (dotted paths and unique bare names)."""
    paths = [p for p in _leaves(cfg) if p != "preset"]
    index = {p: p for p in paths}
    bare: dict[str, list[str]] = {}
    for p in paths:
        bare.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    for name, where in bare.items():
        if len(where) == 1 and name not in index:
            index[name] = where[0]
    return index


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def parse_value(key: str, text: str, tp: Any) -> Any:
    """Parse `text` as the annotated type `tp`: bool, int, float, str, `X | None`, tuple[X, ...]."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        tp = args[0]
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        parts = [p.strip() for p in text.split(",") if p.strip()]
        item = args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_value(key, p, item) for p in parts)
        if len(parts) != len(args):
            raise ValueError(f"override {key}={text!r}: expected {len(args)} comma-separated values")
        return tuple(parse_value(key, p, a) for p, a in zip(parts, args, strict=True))
    try:
        if tp is bool:
            low = text.lower()
            if low not in _TRUE | _FALSE:
                raise ValueError
            return low in _TRUE
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
    except ValueError:
        raise ValueError(f"override {key}={text!r}: expected a {tp.__name__}") from None
    raise TypeError(f"override {key}: unsupported field type {tp!r}")


def _rebuild(obj: Any, changes: dict[str, Any], prefix: str = "") -> Any:
    """A copy of dataclass `obj` with every change under `prefix` applied; each changed dataclass
    is rebuilt once with all its changes (so validation sees the final values together)."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        path = f"{prefix}{f.name}"
        if path in changes:
            kwargs[f.name] = changes[path]
        elif any(p.startswith(path + ".") for p in changes):
            kwargs[f.name] = _rebuild(getattr(obj, f.name), changes, path + ".")
    return dataclasses.replace(obj, **kwargs) if kwargs else obj


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Return a copy of the dataclass tree `cfg` with `key=value` overrides applied and validated."""
    index = override_keys(cfg)
    leaves = _leaves(cfg)
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        if key not in index:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(index))}")
        path = index[key]
        owner, name = leaves[path]
        changes[path] = parse_value(key, text.strip(), typing.get_type_hints(type(owner))[name])
    return _rebuild(cfg, changes)
