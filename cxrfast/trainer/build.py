"""Build the model, optimizer, LR schedule and DeepSpeed engine of a run from its `Config`."""

from __future__ import annotations

import logging
from typing import Any

import torch

from cxrfast.config import Config
from cxrfast.trainer.data import ShardInfo, text_model_kwargs
from cxrfast.trainer.schedule import WarmupCosine, make_scheduler

log = logging.getLogger(__name__)


def model_kwargs(cfg: Config, info: ShardInfo) -> dict[str, Any]:
    """Keyword arguments for `cxrfast.models.build_model(cfg.model.name, **kw)`."""
    m = cfg.model
    kw: dict[str, Any] = dict(
        in_chans=1, mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss, fused=m.fused,
        grad_checkpointing=m.grad_checkpointing,
    )
    if cfg.text is not None:
        kw.update(text_model_kwargs(info, cfg.recipe), mlm_prob=cfg.text.mlm_prob, mlm_all_positions=cfg.text.mlm_all_positions)
    return kw


def build_model(cfg: Config, kwargs: dict[str, Any]) -> torch.nn.Module:
    """The pre-training model; checks that the recipe and the model agree about reports."""
    from cxrfast.models import build_model as _build

    model = _build(cfg.model.name, **kwargs)
    if bool(model.needs_reports) != (cfg.text is not None):
        raise ValueError(
            f"recipe {cfg.recipe!r}: model {cfg.model.name!r} needs_reports={model.needs_reports}, but the recipe "
            f"{'has' if cfg.text is not None else 'has no'} text section"
        )
    return model


def compile_blocks(model: torch.nn.Module) -> int:
    """`torch.compile` every timm ViT block in place (names and state dict keys are unchanged)."""
    from timm.models.vision_transformer import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)


def build_optimizer(model: torch.nn.Module, cfg: Config, peak_lr: float, *, cuda: bool) -> torch.optim.Optimizer:
    """AdamW over two groups: decay, and no decay for biases, norms and `model.no_weight_decay()`.

    CUDA: torch's fused AdamW kernel. CPU: torch AdamW with the foreach implementation
    (DeepSpeed's FusedAdam needs CUDA). The choice is logged.
    """
    from timm.optim import param_groups_weight_decay

    o = cfg.optim
    groups = param_groups_weight_decay(model, o.weight_decay, no_weight_decay_list=model.no_weight_decay())
    for g in groups:
        g["lr"] = peak_lr
    impl = {"fused": True} if cuda else {"foreach": True}
    n_decay = sum(len(g["params"]) for g in groups if g["weight_decay"] > 0)
    n_all = sum(len(g["params"]) for g in groups)
    log.info("optimizer: torch.optim.AdamW(%s=True) betas=(%g, %g) wd %g on %d tensors, 0 on %d", next(iter(impl)),
             o.beta1, o.beta2, o.weight_decay, n_decay, n_all - n_decay)
    return torch.optim.AdamW(groups, lr=peak_lr, betas=(o.beta1, o.beta2), **impl)


def build_engine(model: torch.nn.Module, cfg: Config, ds_config: dict[str, Any], *, steps_per_epoch: int,
                 cuda: bool) -> tuple[Any, float]:
    """`deepspeed.initialize` with our AdamW + warmup/cosine, unless `ds_config` brings its own.

    Returns the engine and the peak learning rate.
    """
    import deepspeed

    global_batch = ds_config["train_batch_size"]
    peak_lr = cfg.optim.peak_lr(global_batch)
    factor = WarmupCosine(steps_per_epoch=steps_per_epoch, epochs=cfg.optim.epochs,
                          warmup_epochs=cfg.optim.warmup_epochs, min_lr_ratio=cfg.optim.min_lr / peak_lr)
    if "optimizer" in ds_config:
        from timm.optim import param_groups_weight_decay

        log.info("optimizer: DeepSpeed %s from --deepspeed_config", ds_config["optimizer"].get("type"))
        params = param_groups_weight_decay(model, cfg.optim.weight_decay,
                                           no_weight_decay_list=model.no_weight_decay())
        optimizer = None
    else:
        params = None
        optimizer = build_optimizer(model, cfg, peak_lr, cuda=cuda)
    scheduler = None
    if "scheduler" in ds_config:
        log.info("LR schedule: DeepSpeed %s from --deepspeed_config", ds_config["scheduler"].get("type"))
    else:
        scheduler = lambda opt: make_scheduler(opt, factor)  # noqa: E731  (DeepSpeed calls it with its optimizer)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                           lr_scheduler=scheduler, config=ds_config)
    cast_float_buffers(engine.module)
    return engine, peak_lr


def cast_float_buffers(module: torch.nn.Module) -> int:
    """Cast floating buffers (e.g. fixed sin-cos position embeddings) to the parameters' dtype.

    DeepSpeed's bf16 mode casts parameters only; an fp32 buffer added to bf16 activations would
    promote them to fp32 and break the bf16 layers that follow. Returns the number cast.
    """
    dtype = next(module.parameters()).dtype
    n = 0
    for sub in module.modules():
        for name, buf in sub.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                sub._buffers[name] = buf.to(dtype)
                n += 1
    return n


def loader_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """Input dtype that matches the engine's module dtype."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32
