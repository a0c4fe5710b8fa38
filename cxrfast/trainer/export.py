"""Export the trained encoder from a DeepSpeed engine as a timm-loadable safetensors file.

The engine's module holds bf16 compute weights under bf16; the fp32 master weights live in the
(ZeRO-partitioned) optimizer. `safe_get_full_fp32_param` gathers each trainable parameter's fp32
master copy (a collective: every rank calls it, in the same order); rank 0 loads them into a
freshly built fp32 model, whose frozen tensors (fixed sin-cos position embeddings) are exact by
construction, and calls `cxrfast.models.export.export_encoder`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def fp32_trainable_state(engine: Any, *, rank: int) -> dict[str, torch.Tensor]:
    """fp32 master weights of the trainable parameters (on CPU, rank 0; empty on other ranks)."""
    from deepspeed.utils import safe_get_full_fp32_param

    state: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param)  # collective for ZeRO-1/2; None when the param is its own master
        if rank == 0:
            state[name] = (full if full is not None else param.detach()).float().cpu()
    return state


def export_trained_encoder(engine: Any, rebuild: Callable[[], torch.nn.Module], path: Path, *,
                           rank: int) -> Path | None:
    """Write `path` (rank 0) from the engine's fp32 master weights; returns the path on rank 0."""
    state = fp32_trainable_state(engine, rank=rank)
    if rank != 0:
        return None
    from cxrfast.models.export import export_encoder

    model = rebuild().float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or set(missing) & trainable:
        raise RuntimeError(f"export: rebuilt model does not match the trained one (missing trainable "
                           f"{sorted(set(missing) & trainable)[:5]}, unexpected {unexpected[:5]})")
    export_encoder(model, path)
    log.info("exported encoder -> %s", path)
    return path
