"""Export the trained encoder from a DeepSpeed engine as a timm-loadable safetensors file.

The engine's module holds bf16 compute weights under bf16; the fp32 master weights live in the
(ZeRO-partitioned) optimizer. `safe_get_full_fp32_param` gathers each trainable parameter's fp32
master copy (a collective: every rank calls it, in the same order); rank 0 loads them, with every
frozen parameter and buffer of the engine's module (BatchNorm statistics, momentum encoders,
fixed tables), into a freshly built fp32 method and writes `method.encoder_export()` plus the
method's extra exports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cxrfast.methods.base import Method

log = logging.getLogger(__name__)


def fp32_state(engine: Any, *, rank: int) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the engine's module as fp32 CPU tensors (rank 0; empty on the
    others), trainable parameters from the optimizer's fp32 masters (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    state: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param) if param.requires_grad else None  # collective for ZeRO-1/2
        if rank == 0:
            value = full if full is not None else param.detach()
            state[name] = value.float().cpu() if value.is_floating_point() else value.cpu()
    if rank == 0:
        for name, buf in engine.module.named_buffers():
            state[name] = buf.detach().float().cpu() if buf.is_floating_point() else buf.detach().cpu()
    return state


def load_full_state(method: Method, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (every parameter and buffer by name, persistent or not) into `method`."""
    own = dict(method.named_parameters()) | dict(method.named_buffers())
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise RuntimeError(f"export: the rebuilt method does not match the trained one (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    with torch.no_grad():
        for name, tensor in own.items():
            if tensor.shape != state[name].shape:
                raise RuntimeError(f"export: {name} is {tuple(state[name].shape)}, rebuilt {tuple(tensor.shape)}")
            tensor.copy_(state[name])


def export_trained(engine: Any, rebuild: Callable[[], Method], out: Path, *, rank: int,
                   metadata: dict[str, str], write_extra: Callable[[Method], list[Path]],
                   file: Path | None = None) -> Path | None:
    """Write `file` (default `out/encoder.safetensors`) + the method's extra exports from the engine;
    rank 0 returns the path."""
    state = fp32_state(engine, rank=rank)
    if rank != 0:
        return None
    from cxrfast.models.export import ENCODER_FILE, write_encoder

    method = rebuild().float().eval()
    load_full_state(method, state)
    path = write_encoder(method.encoder_export(), file or out / ENCODER_FILE, metadata=metadata)
    for extra in write_extra(method):
        log.info("exported %s", extra)
    log.info("exported encoder -> %s", path)
    return path
