"""The optimizer's fp32 master weights start from the method's fp32 initial values, not from the
bf16-cast module DeepSpeed builds them from (which would round a published initialisation)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cxrfast.config import apply_overrides
from cxrfast.presets import get_preset


def test_fp32_masters_start_from_the_fp32_init(mimic_shards: Path):
    from deepspeed.utils import safe_get_full_fp32_param

    from cxrfast.shards.folder import open_shards
    from cxrfast.trainer import deepspeed_config, distributed
    from cxrfast.trainer.build import build_engine, lr_schedule
    from cxrfast.trainer.run import make_method

    env = dict(os.environ)
    cfg = apply_overrides(get_preset("tiny_mae"), ["precision=bf16", "zero_stage=2"])
    distributed.init()
    try:
        method = make_method(cfg, open_shards(mimic_shards))
        with torch.no_grad():  # a value bf16 cannot hold
            method.net.cls_token.fill_(1.0 + 2.0**-12)
        fp32 = {n: p.detach().clone() for n, p in method.named_parameters()}
        ds = deepspeed_config.build(cfg, world_size=1)
        engine = build_engine(method, cfg.optim, ds, lr_schedule(cfg.optim, 10, 1e-3), 1e-3, cuda=False)
        assert engine.module.net.cls_token.dtype == torch.bfloat16
        for name, param in engine.module.named_parameters():
            torch.testing.assert_close(safe_get_full_fp32_param(param).cpu(), fp32[name], rtol=0, atol=0)
        assert float(safe_get_full_fp32_param(engine.module.net.cls_token)[0, 0, 0]) == 1.0 + 2.0**-12
        engine.destroy()
    finally:
        distributed.teardown()
        os.environ.clear()
        os.environ.update(env)
