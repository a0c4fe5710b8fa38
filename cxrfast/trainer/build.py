"""Build the optimizer, LR schedule and DeepSpeed engine of a run around its method."""

from __future__ import annotations

import logging
from typing import Any

import torch

from cxrfast.config import OptimConfig
from cxrfast.methods.base import Method
from cxrfast.trainer.schedule import LRSchedule, make_scheduler

log = logging.getLogger(__name__)


def optimizer_groups(method: Method, o: OptimConfig, peak_lr: float) -> list[dict[str, Any]]:
    """The method's parameter groups with each group's peak lr (`lr_scale` x the run's peak)."""
    groups = method.param_groups(o.weight_decay)
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    grouped = [p for g in groups for p in g["params"]]
    if len(grouped) != len({id(p) for p in grouped}) or {id(p) for p in grouped} != trainable:
        raise ValueError(f"method {method.name!r}: param_groups() must list every trainable parameter exactly once")
    for g in groups:
        g["lr"] = peak_lr * g.get("lr_scale", 1.0)
    return groups


def build_optimizer(method: Method, o: OptimConfig, peak_lr: float, *, cuda: bool) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD over the method's parameter groups. CUDA: torch's fused kernels where
    the optimizer has them; CPU: the foreach implementation (DeepSpeed's FusedAdam needs CUDA)."""
    groups = optimizer_groups(method, o, peak_lr)
    impl = {"fused": True} if cuda else {"foreach": True}
    if o.name == "adamw":
        opt = torch.optim.AdamW(groups, lr=peak_lr, betas=o.betas, eps=o.eps, **impl)
    elif o.name == "adam":
        opt = torch.optim.Adam(groups, lr=peak_lr, betas=o.betas, eps=o.eps, **impl)
    else:
        opt = torch.optim.SGD(groups, lr=peak_lr, momentum=o.momentum, nesterov=o.nesterov, **impl)
    n_decay = sum(len(g["params"]) for g in groups if g["weight_decay"] > 0)
    n_all = sum(len(g["params"]) for g in groups)
    log.info("optimizer: torch.optim.%s(%s=True) peak lr %.3g, wd %g on %d tensors, 0 on %d, %d group(s)",
             type(opt).__name__, next(iter(impl)), peak_lr, o.weight_decay, n_decay, n_all - n_decay, len(groups))
    return opt


def lr_schedule(o: OptimConfig, steps_per_epoch: int, peak_lr: float) -> LRSchedule:
    return LRSchedule(steps_per_epoch=steps_per_epoch, epochs=o.run_epochs(steps_per_epoch),
                      warmup_epochs=o.warmup_epochs, kind=o.schedule, min_lr_ratio=o.min_lr / peak_lr,
                      milestones=tuple(o.milestones), gamma=o.gamma, total_steps=o.steps, warmup_steps=o.warmup_steps)


def build_engine(method: Method, o: OptimConfig, ds_config: dict[str, Any], factor: LRSchedule, peak_lr: float, *,
                 cuda: bool) -> Any:
    """`deepspeed.initialize` with the configured optimizer + schedule, unless `ds_config` brings
    its own (then `optim.lr`/`blr` and the schedule are not used, and the log says so)."""
    import deepspeed

    if "optimizer" in ds_config:
        log.warning("optimizer: DeepSpeed %s from --deepspeed_config; optim.name/lr/blr/betas are ignored (its "
                    "params: %s); the logged lr is the one it uses", ds_config["optimizer"].get("type"),
                    ds_config["optimizer"].get("params"))
        params = optimizer_groups(method, o, peak_lr)
        for g in params:
            g.pop("lr")
        optimizer = None
    else:
        params = None
        optimizer = build_optimizer(method, o, peak_lr, cuda=cuda)
    scheduler = None
    if "scheduler" in ds_config:
        log.warning("LR schedule: DeepSpeed %s from --deepspeed_config; optim.schedule is ignored",
                    ds_config["scheduler"].get("type"))
    else:
        scheduler = lambda opt: make_scheduler(opt, factor)  # noqa: E731  (DeepSpeed calls it with its optimizer)
    originals = fp32_originals(method)
    masters = trainable_fp32(method) if loader_dtype(ds_config) != torch.float32 else {}
    engine, _, _, _ = deepspeed.initialize(model=method, optimizer=optimizer, model_parameters=params,
                                           lr_scheduler=scheduler, config=ds_config)
    restore_fp32(engine.module, originals)
    restore_masters(engine, masters)
    return engine


def trainable_fp32(method: Method) -> dict[str, torch.Tensor]:
    """CPU fp32 copies of the trainable parameters before `deepspeed.initialize` casts them."""
    return {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in method.named_parameters() if p.requires_grad}


def restore_masters(engine: Any, masters: dict[str, torch.Tensor]) -> int:
    """Start the optimizer's fp32 master weights from the method's fp32 values: DeepSpeed builds
    them from the bf16-cast module, which would round every initialisation (a published checkpoint
    included) to bf16. ZeRO-1/2 masters only (ZeRO-0 under bf16 keeps no reachable master; logged).
    Returns the number of parameters restored."""
    from deepspeed.utils import safe_set_full_fp32_param

    n, unreachable = 0, []
    for name, p in engine.module.named_parameters():
        if name not in masters:
            continue
        if not hasattr(p, "_hp_mapping"):
            unreachable.append(name)
            continue
        safe_set_full_fp32_param(p, masters[name].to(p.device))
        n += 1
    if unreachable:
        log.warning("%d trainable parameter(s) have no fp32 master DeepSpeed exposes (ZeRO stage 0 under bf16?): "
                    "they start from their bf16-rounded initial values", len(unreachable))
    return n


def fp32_originals(method: Method) -> dict[str, torch.Tensor]:
    """CPU copies of the floating tensors under `method.fp32_names()` (frozen parameters and buffers),
    taken before `deepspeed.initialize` rounds them; trainable ones there are an error."""
    prefixes = tuple(method.fp32_names())
    if not prefixes:
        return {}
    out = {}
    for name, p in list(method.named_parameters()) + list(method.named_buffers()):
        if not name.startswith(prefixes) or not p.is_floating_point():
            continue
        if isinstance(p, torch.nn.Parameter) and p.requires_grad:
            raise ValueError(f"method {method.name!r}: fp32_names() covers the trainable parameter {name!r}")
        out[name] = p.detach().to("cpu", torch.float32, copy=True)
    return out


def restore_fp32(method: Method, originals: dict[str, torch.Tensor]) -> int:
    """Put back the fp32 values `fp32_originals` took (DeepSpeed's bf16 mode casts every parameter:
    a cast back alone would keep the bf16 rounding, e.g. of a momentum encoder's initial weights).
    Returns the number of tensors that had been cast."""
    n = 0
    for name, p in list(method.named_parameters()) + list(method.named_buffers()):
        if name in originals:
            n += p.dtype != torch.float32
            p.data = originals[name].to(p.device)
    return n


def loader_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """Input dtype that matches the engine's module dtype."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32
