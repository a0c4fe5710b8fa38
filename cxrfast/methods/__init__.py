"""Pre-training methods behind one explicit registry.

    from cxrfast.methods import METHODS, build_method
    method = build_method(cfg.method, shards)   # a `Method` (see cxrfast.methods.base)

A new method is one module with a `Method` subclass and its `MethodConfig` dataclass, one entry
in `METHODS`, and its presets in `cxrfast.presets`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cxrfast.methods.base import DataRequest, EncoderExport, Method, MethodConfig, StepContext
from cxrfast.methods.finetune import Finetune, FinetuneMethodConfig
from cxrfast.methods.mae import MAE, MAEMethodConfig
from cxrfast.methods.mgca import MGCA, MGCAMethodConfig
from cxrfast.methods.moco import MoCo, MoCoMethodConfig
from cxrfast.methods.mrm import MRM, MRMMethodConfig

if TYPE_CHECKING:
    from cxrfast.shards.shard_set import ShardSet

#: name -> Method subclass.
METHODS: dict[str, type[Method]] = {
    MAE.name: MAE,
    MRM.name: MRM,
    MoCo.name: MoCo,
    MGCA.name: MGCA,
    Finetune.name: Finetune,
}


def method_for_config(cfg: MethodConfig) -> type[Method]:
    """The registered method whose config class is exactly `type(cfg)`."""
    for method in METHODS.values():
        if type(cfg) is method.config_cls:
            return method
    raise ValueError(f"no registered method takes a {type(cfg).__name__}; registered: {sorted(METHODS)}")


def build_method(cfg: MethodConfig, shards: ShardSet) -> Method:
    """Build the method `cfg` configures, for the shard folders it trains on (a `ShardSet`; a
    `ShardFolder` serves as a set of one)."""
    return method_for_config(cfg).build(cfg, shards)


__all__ = [
    "METHODS",
    "DataRequest",
    "EncoderExport",
    "Finetune",
    "FinetuneMethodConfig",
    "MAE",
    "MAEMethodConfig",
    "MGCA",
    "MGCAMethodConfig",
    "MRM",
    "MoCo",
    "MoCoMethodConfig",
    "MRMMethodConfig",
    "Method",
    "MethodConfig",
    "StepContext",
    "build_method",
    "method_for_config",
]
