"""Supervised fine-tuning as a method: a timm encoder (pre-trained export, local weights or random)
with a new multi-label head, trained on the shards' labels. `cxrfast eval finetune` runs it once per
label-fraction draw on a subset folder of the draw's samples (`cxrfast.shards.subset`).

- Encoder: `encoder=RUN/encoder.safetensors` (its architecture from the export's metadata;
  `random_init=true` keeps the architecture with fresh weights), or `arch=TIMM_NAME` with
  `init=FILE` (local weights, `cxrfast.models.init_weights`) or without (random). Built without a
  classifier, then `reset_classifier(len(labels))`.
- Pooling: `gap` = MAE's / MRM's `global_pool`: the mean patch token through a fresh `fc_norm`
  (timm `global_pool="avg"`; the pre-trained final norm is dropped as MAE's fine-tuning drops it),
  or a CNN's global average pool; `cls` = the class token after the final norm.
- Targets: the raw label codes of the batch (`labels`, one per manifest label) are mapped on the
  device by the uncertain-label policy (`cxrfast.eval.policies`; a lookup table equal to
  `apply_policy`); masked targets stay out of the BCE loss and the AUC.
- Optimiser groups: layer-wise lr decay (`lr_scale` per group; a ViT by MAE's rule, other models by
  timm's `param_groups_layer_decay`), no weight decay on 1-d parameters and the model's
  `no_weight_decay()` names.
- Validation: BCE on the validate split plus per-sample probabilities, from which
  `validation_metrics` computes per-label and mean ROC AUC over every rank's samples (`val_auc`).
- Export: the fine-tuned classifier (encoder + head) as a timm model:
  `timm.create_model(arch, **kwargs)` (kwargs with num_classes and global_pool) loads it strictly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from cxrfast.eval.encoders import in_chans_of, is_vit
from cxrfast.methods.base import DataRequest, EncoderExport, Method, MethodConfig
from cxrfast.shards.folder import ShardFolder
from cxrfast.shards.shard_set import ShardSet, open_shard_set

log = logging.getLogger(__name__)

POOLINGS = ("cls", "gap")
#: Column of the policy table for each raw label code (1, 0, -1 uncertain, -2 not mentioned): code + 2.
_CODE_OFFSET = 2


@dataclass(kw_only=True)
class FinetuneMethodConfig(MethodConfig):
    """Fine-tuning of a timm encoder with a new multi-label head (what `cxrfast eval finetune` trains)."""

    encoder: str | None = None  # exported encoder.safetensors to start from (its architecture from the metadata)
    random_init: bool = False  # with encoder: keep its architecture, draw fresh weights (seeded by init_seed)
    arch: str | None = None  # a timm architecture instead of encoder (with init=FILE: local weights; else random)
    timm_kwargs: str = "{}"  # JSON object of more timm.create_model arguments for arch (in_chans defaults to 1)
    init_seed: int = 0  # torch seed of a random encoder init
    labels: tuple[str, ...] = ()  # label names to predict, looked up by name in the shards' label_names
    policy: str = "ones"  # uncertain-label policy (cxrfast.eval.policies)
    not_mentioned: str = "negative"  # blank labels: negative | ignore (masked)
    pooling: str = "gap"  # gap (mean patch token + fresh fc_norm; CNN: global pool) | cls (ViT class token)
    drop_path: float = 0.0  # stochastic depth rate (timm drop_path_rate)
    layer_decay: float | None = None  # layer-wise lr decay factor (ViT: blocks, stem); None = off
    head_init_std: float | None = None  # trunc-normal std of the new head's weight (bias 0); None = torch's Linear init
    augmentation: str = "finetune"  # pipelines augmentation of the training images
    eval_augmentation: str = "eval_full"  # pipelines augmentation of the validation images
    image_size: int = 224  # input side
    mean: float | None = None  # pixel normalisation (0..1 scale); None = the encoder file's, else the shards'
    std: float | None = None

    def __post_init__(self) -> None:
        from cxrfast.eval.policies import NOT_MENTIONED_RULES, get_policy
        from cxrfast.pipelines.augmentations import AUGMENTATIONS

        if (self.encoder is None) == (self.arch is None):
            raise ValueError("method: name the encoder one way: method.encoder=RUN/encoder.safetensors, or "
                             "method.arch=TIMM_NAME (with method.init=FILE for local weights)")  # fmt: skip
        if self.random_init and self.encoder is None:
            raise ValueError("method.random_init applies to method.encoder (arch without init is random already)")
        if self.init is not None and self.arch is None:
            raise ValueError("method.init (a weights file) applies to method.arch; an export is method.encoder")
        kwargs = json.loads(self.timm_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError(f"method.timm_kwargs must be a JSON object, got {self.timm_kwargs!r}")
        get_policy(self.policy)
        if self.not_mentioned not in NOT_MENTIONED_RULES:
            raise ValueError(f"method.not_mentioned must be one of {NOT_MENTIONED_RULES}, got {self.not_mentioned!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"method.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"method.drop_path must be in [0, 1), got {self.drop_path}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"method.layer_decay must be in (0, 1] or none, got {self.layer_decay}")
        for name in (self.augmentation, self.eval_augmentation):
            if name not in AUGMENTATIONS:
                raise ValueError(f"method augmentation {name!r} is not one of {sorted(AUGMENTATIONS)}")
        if self.image_size < 1 or (self.std is not None and self.std <= 0):
            raise ValueError("method.image_size must be >= 1 and method.std > 0")
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"method.mean and method.std go together (got mean {self.mean}, std {self.std}); "
                             "give both, or neither for the encoder file's or the shards' normalisation")


def policy_table(labels: tuple[str, ...], policy: str, not_mentioned: str) -> torch.Tensor:
    """[L, 4] int8 targets indexed by (label, raw code + 2): the uncertain-label policy as a lookup
    table (`cxrfast.eval.policies.apply_policy` on every code). An uncertain value of a label the
    policy does not define maps to masked here; `check_policy_defined` refuses such shards first."""
    from cxrfast.eval.policies import MASKED, get_policy
    from cxrfast.shards.schema import NEGATIVE, NOT_MENTIONED, POSITIVE, UNCERTAIN

    pol = get_policy(policy)
    table = torch.full((len(labels), 4), MASKED, dtype=torch.int8)
    for j, name in enumerate(labels):
        table[j, POSITIVE + _CODE_OFFSET] = POSITIVE
        table[j, NEGATIVE + _CODE_OFFSET] = NEGATIVE
        target = pol.uncertain_target(name)
        table[j, UNCERTAIN + _CODE_OFFSET] = MASKED if target is None else target
        table[j, NOT_MENTIONED + _CODE_OFFSET] = NEGATIVE if not_mentioned == "negative" else MASKED
    return table


def check_policy_defined(shards: ShardFolder, labels: tuple[str, ...], policy: str, not_mentioned: str) -> None:
    """ValueError (from `apply_policy`, naming the sample table) when the shards hold an uncertain value
    of a label the policy does not define, or a code outside {1, 0, -1, -2}."""
    from cxrfast.eval.policies import apply_policy, get_policy

    table = shards.sample_table()
    where = str(shards.root / shards.manifest["sample_table"]["file"])
    apply_policy(table.select(list(labels)).to_numpy().astype(np.int8), labels, get_policy(policy),
                 not_mentioned=not_mentioned, where=where)  # fmt: skip


def _create(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except (RuntimeError, TypeError) as e:  # unknown architecture or argument
        raise ValueError(f"timm cannot build {arch!r} with {kwargs}: {e}") from e


def build_encoder(cfg: FinetuneMethodConfig) -> tuple[nn.Module, str, dict[str, Any], dict[str, Any]]:
    """(model without classifier, arch, timm kwargs that rebuild it, metadata of an export) for `cfg`."""
    extra: dict[str, Any] = {"num_classes": 0}
    if cfg.drop_path:
        extra["drop_path_rate"] = cfg.drop_path
    if cfg.encoder is not None:
        from cxrfast.models.export import load_encoder, read_metadata

        path = Path(cfg.encoder)
        if not path.is_file():
            raise FileNotFoundError(f"method.encoder {path} does not exist (a run writes RUN/encoder.safetensors)")
        meta = read_metadata(path)
        arch, kwargs = meta["arch"], dict(meta["timm_kwargs"])
    else:
        meta, arch, kwargs = {}, str(cfg.arch), {"in_chans": 1, **json.loads(cfg.timm_kwargs)}
    with torch.device("meta"):  # only to learn what kind of model it is (nothing is allocated)
        probe = _create(arch, {**kwargs, **extra})
    if is_vit(probe):
        extra["global_pool"] = "avg" if cfg.pooling == "gap" else "token"
        if cfg.pooling == "cls" and getattr(probe, "cls_token", None) is None:
            raise ValueError(f"method.pooling=cls needs a class token; {arch} has none (use pooling=gap)")
    elif cfg.pooling == "cls":
        raise ValueError(f"method.pooling=cls needs a ViT class token; {arch} is not a ViT (use pooling=gap)")
    if cfg.encoder is not None and not cfg.random_init:
        model = load_encoder(cfg.encoder, **extra)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model = _create(arch, {**kwargs, **extra})
        if cfg.init is not None:
            from cxrfast.eval.encoders import load_weights

            if not Path(cfg.init).is_file():
                raise FileNotFoundError(f"method.init {cfg.init} does not exist (nothing is downloaded)")
            load_weights(model, arch, Path(cfg.init))
    kwargs.update({k: v for k, v in extra.items() if k not in ("num_classes", "drop_path_rate")})
    return model, arch, kwargs, meta


def vit_layer_id(name: str, depth: int) -> int:
    """MAE's `get_layer_id_for_vit` (util/lr_decay.py) for a timm ViT parameter name; `depth` = blocks + 1."""
    if name in ("cls_token", "pos_embed", "reg_token") or name.startswith(("patch_embed", "norm_pre")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth


class Finetune(Method):
    """A timm classifier trained with masked BCE on the task's labels (see the module doc)."""

    name: ClassVar[str] = "finetune"
    config_cls: ClassVar[type[MethodConfig]] = FinetuneMethodConfig

    def __init__(self, cfg: FinetuneMethodConfig, *, model: nn.Module, arch: str, kwargs: dict[str, Any],
                 label_index: list[int], mean: float, std: float) -> None:  # fmt: skip
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.arch, self.kwargs = arch, kwargs
        self.mean, self.std = mean, std
        self.labels = tuple(cfg.labels)
        self.in_chans = in_chans_of(model, kwargs)
        self.register_buffer("label_index", torch.tensor(label_index, dtype=torch.long), persistent=False)
        self.register_buffer("target_table", policy_table(self.labels, cfg.policy, cfg.not_mentioned), persistent=False)
        self._flops: float | None = None

    @classmethod
    def build(cls, cfg: MethodConfig, shards: ShardSet) -> Finetune:
        assert isinstance(cfg, FinetuneMethodConfig)
        shard_set = open_shard_set(shards)
        if len(shard_set) != 1:
            raise ValueError(f"fine-tuning reads one labelled shard folder (its draw's subset), got {shard_set.where}")
        folder = shard_set.folders[0]
        if not cfg.labels:
            raise ValueError("method.labels is empty: name the labels to predict (e.g. a task's labels)")
        have = folder.label_names
        missing = [n for n in cfg.labels if n not in have]
        if missing:
            raise ValueError(f"{folder.manifest_path}: labels {missing} are not among these shards' {list(have)}")
        check_policy_defined(folder, tuple(cfg.labels), cfg.policy, cfg.not_mentioned)
        model, arch, kwargs, meta = build_encoder(cfg)
        model.reset_classifier(len(cfg.labels))
        head = model.get_classifier()
        if cfg.head_init_std is not None:
            nn.init.trunc_normal_(head.weight, std=cfg.head_init_std)
            nn.init.zeros_(head.bias)
        if cfg.mean is not None:
            mean, std = cfg.mean, cfg.std
        elif meta.get("mean") not in (None, "") and meta.get("std") not in (None, ""):
            mean, std = float(meta["mean"]), float(meta["std"])
        else:
            mean, std = folder.pixel_stats
        return cls(cfg, model=model.train(), arch=arch, kwargs=kwargs, label_index=[have.index(n) for n in cfg.labels],
                   mean=mean, std=std)  # fmt: skip

    # --- contract --------------------------------------------------------------------------
    def data_request(self, split: str) -> DataRequest:
        aug = self.cfg.augmentation if split == "train" else self.cfg.eval_augmentation
        return DataRequest(augmentation=aug, image_size=self.cfg.image_size, mean=self.mean, std=self.std,
                           channels=self.in_chans, labels=True)  # fmt: skip

    def targets(self, codes: torch.Tensor) -> torch.Tensor:
        """Raw label codes [b, all labels] -> targets [b, L] (1, 0, -1 masked) under the policy."""
        picked = codes.index_select(1, self.label_index).long() + _CODE_OFFSET
        rows = torch.arange(len(self.labels), device=codes.device)
        return self.target_table[rows, picked]

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from cxrfast.eval.head import masked_bce

        logits = self.model(batch["image"])
        return {"loss": masked_bce(logits, self.targets(batch["labels"]))}

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from cxrfast.eval.head import masked_bce

        logits = self.model(batch["image"]).float()
        y = self.targets(batch["labels"])
        return {"loss": masked_bce(logits, y), "sample_scores": torch.sigmoid(logits), "sample_targets": y}

    def validation_metrics(self, samples: dict[str, np.ndarray]) -> dict[str, float]:
        """Per-label ROC AUC on validate and their mean over the labels defined there (NaN when none is)."""
        from cxrfast.eval.metrics import auc_per_label

        aucs = auc_per_label(samples["sample_scores"].astype(np.float64), samples["sample_targets"].astype(np.int8))
        finite = aucs[np.isfinite(aucs)]
        out = {"auc": float(finite.mean()) if finite.size else float("nan")}
        out.update({f"auc/{name}": float(a) for name, a in zip(self.labels, aucs, strict=True)})
        return out

    def flops_per_image(self) -> float:
        if self._flops is None:
            from cxrfast.models.moco import forward_flops

            self._flops = 3 * forward_flops(lambda: _create(self.arch, {**self.kwargs, "num_classes": len(self.labels)}),
                                            image_size=self.cfg.image_size, in_chans=self.in_chans)  # fmt: skip
        return self._flops

    def no_weight_decay(self) -> set[str]:
        """1-d parameters and the model's own exclusions (ViT: pos_embed, cls_token)."""
        skip = set(getattr(self.model, "no_weight_decay", set)())
        return {f"model.{n}" for n, p in self.model.named_parameters() if p.ndim <= 1 or n in skip}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Without layer decay: the default decay / no-decay groups. With it, one group per layer and
        decay kind with `lr_scale` = decay^(depth - layer): for a ViT MAE's rule (`vit_layer_id`: the
        stem is layer 0, block i layer i + 1, everything after the blocks, the final norm included,
        the top layer); for other timm models timm's `param_groups_layer_decay` (its group_matcher)."""
        if self.cfg.layer_decay is None:
            return super().param_groups(weight_decay)
        skip = set(getattr(self.model, "no_weight_decay", set)())
        if not is_vit(self.model):
            from timm.optim import param_groups_layer_decay

            groups = param_groups_layer_decay(self.model, weight_decay=weight_decay, no_weight_decay_list=tuple(skip),
                                              layer_decay=self.cfg.layer_decay)  # fmt: skip
            return [{"params": g["params"], "weight_decay": g["weight_decay"], "lr_scale": g["lr_scale"]} for g in groups]
        depth = len(self.model.blocks) + 1
        grouped: dict[tuple[int, bool], list[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                grouped.setdefault((vit_layer_id(name, depth), p.ndim > 1 and name not in skip), []).append(p)
        return [{"params": ps, "weight_decay": weight_decay if decay else 0.0,
                 "lr_scale": self.cfg.layer_decay ** (depth - layer)}
                for (layer, decay), ps in sorted(grouped.items())]  # fmt: skip

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def compile_targets(self) -> list[nn.Module]:
        return list(getattr(self.model, "blocks", []))

    def encoder_export(self) -> EncoderExport:
        """The fine-tuned classifier (encoder and head) under timm's names."""
        sd = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
              for k, v in self.model.state_dict().items()}  # fmt: skip
        return EncoderExport(arch=self.arch, kwargs={**self.kwargs, "num_classes": len(self.labels)}, state_dict=sd,
                             mean=self.mean, std=self.std)  # fmt: skip
