"""The published evaluation protocols as presets: every knob of each, overridable by `key=value`
(`cxrfast.config.apply_overrides`: `section.field`, or a bare field name unique in the tree).

A `Protocol` has four sections: `data` (labels, views, fractions, images), `probe` (the linear
head on frozen features), `finetune` (full fine-tuning; read by the fine-tune runner, None where
the paper has none) and `run` (where and how features are computed). Sources, per preset:

- mgca: HKU-MedAI/MGCA `mgca/models/mgca/mgca_finetuner.py`, `models/ssl_finetuner.py`,
  `datasets/classification_dataset.py`, `datasets/transforms.py`, `constants.py`.
- mrm: RL4M/MRM-pytorch `NIH_ChestX-ray/train.py`, `finetuning_{1,10,100}percent.sh`,
  `utils/data_utils.py`, README "More fine-tuning hyperparameters" (step counts per dataset).
- mae-cxr: lambert-x/medical_mae `main_linprobe_chestxray.py`, `main_finetune_chestxray.py`,
  `FINETUNE.md`, `util/datasets.py`, `util/dataloader_med.py`.
- moco-cxr: stanfordmlgroup/MoCo-CXR `chexpert_supervised/chexpert-model/` (`train.py`, `args/`,
  `sbatch/gen_sbatch.py`, `dataset/base_dataset.py`, `select_ensemble.py`) and
  `moco_pretraining/scripts/reorganize_files.py`.

docs/evaluation.md tabulates them and lists every deliberate difference.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cxrfast.config import apply_overrides, override_keys
from cxrfast.eval.policies import NOT_MENTIONED_RULES, get_policy
from cxrfast.eval.tasks import check_views
from cxrfast.pipelines.augmentations import AUGMENTATIONS

POOLINGS = ("cls", "gap")
HEADS = ("linear", "bn_linear")
OPTIMIZERS = ("adamw", "adam", "sgd", "lars")
SCHEDULE_RULES = ("fixed", "mrm", "moco-cxr")
LR_SCHEDULES = ("constant", "cosine")
SELECT_METRICS = ("val_loss", "val_auc")
#: ImageNet mean/std averaged over RGB (a single-channel input replicated to 3 channels).
IMAGENET_GRAY = (0.449, 0.226)


def refuse_test_selection(split: str, where: str) -> None:
    """Selecting a model on `test` is refused, whatever the published code did."""
    if split == "test":
        raise ValueError(
            f"{where}=test is refused: choosing the epoch or checkpoint by its test score makes the reported "
            "test number an optimistic, selected maximum (the published MAE-CXR code reports the best test "
            "AUC over epochs). cxrfast selects on `validate` and evaluates `test` once with the selected head."
        )
    if split != "validate":
        raise ValueError(f"{where} must be 'validate', got {split!r}")


def _check_common(sec: str, k: Any) -> None:
    if k.optimizer not in OPTIMIZERS:
        raise ValueError(f"{sec}.optimizer must be one of {OPTIMIZERS}, got {k.optimizer!r}")
    if (k.lr is None) == (k.blr is None) and k.schedule_rule != "mrm":
        raise ValueError(f"{sec}: set exactly one of lr and blr (got lr={k.lr}, blr={k.blr})")
    if k.schedule_rule not in SCHEDULE_RULES:
        raise ValueError(f"{sec}.schedule_rule must be one of {SCHEDULE_RULES}, got {k.schedule_rule!r}")
    if k.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"{sec}.lr_schedule must be one of {LR_SCHEDULES}, got {k.lr_schedule!r}")
    if k.select_metric not in SELECT_METRICS:
        raise ValueError(f"{sec}.select_metric must be one of {SELECT_METRICS}, got {k.select_metric!r}")
    refuse_test_selection(k.select_split, f"{sec}.select_split")
    if k.pooling not in POOLINGS:
        raise ValueError(f"{sec}.pooling must be one of {POOLINGS}, got {k.pooling!r}")
    if k.batch_size < 1 or k.epochs < 1 or (k.steps is not None and k.steps < 1):
        raise ValueError(f"{sec}: batch_size, epochs and steps must be >= 1")
    if k.eval_every_epochs <= 0 or k.ensemble_top_k < 1:
        raise ValueError(f"{sec}: eval_every_epochs must be > 0 and ensemble_top_k >= 1")
    if min(k.weight_decay, k.warmup_epochs, k.min_lr, k.clip_grad) < 0:
        raise ValueError(f"{sec}: weight_decay, warmup_epochs, min_lr and clip_grad must be >= 0")


@dataclass(kw_only=True)
class DataKnobs:
    """What is evaluated: labels, views, label fractions and the input images."""

    policy: str  # uncertain-label policy (cxrfast.eval.policies)
    views: str  # frontal (PA/AP only) | all
    fractions: tuple[float, ...]  # label fractions: shares of the train split's patients, each in (0, 1]
    draws: int  # patient draws per fraction below 1 (fraction 1 is drawn once)
    eval_augmentation: str  # pipelines augmentation that makes the features / validate / test inputs
    crop_size: int  # the protocol's input side, used when the encoder does not fix one
    norm_mean: float  # the protocol's normalisation (0..1 scale), used when the encoder file has none
    norm_std: float
    not_mentioned: str = "negative"  # blank labels: negative | ignore (masked)
    seed: int = 0  # seeds the draws, the head's init and batch order, and the bootstrap
    image_size: int | None = None  # input side; None = the encoder's img_size, else crop_size
    mean: float | None = None  # overrides the encoder's and the protocol's mean
    std: float | None = None  # overrides the encoder's and the protocol's std
    boot: int = 1000  # bootstrap resamples of patients for the confidence intervals
    ci: float = 0.95  # confidence level of the intervals

    def __post_init__(self) -> None:
        get_policy(self.policy)
        check_views(self.views)
        if self.not_mentioned not in NOT_MENTIONED_RULES:
            raise ValueError(f"data.not_mentioned must be one of {NOT_MENTIONED_RULES}, got {self.not_mentioned!r}")
        self.fractions = check_fractions(self.fractions)
        if self.draws < 1:
            raise ValueError(f"data.draws must be >= 1, got {self.draws}")
        if self.eval_augmentation not in AUGMENTATIONS:
            raise ValueError(f"data.eval_augmentation must be a pipelines augmentation ({', '.join(AUGMENTATIONS)}), got {self.eval_augmentation!r}")
        if self.norm_std <= 0 or (self.std is not None and self.std <= 0):
            raise ValueError("data.norm_std and data.std must be > 0")
        if self.boot < 100 or not 0.5 < self.ci < 1:
            raise ValueError(f"data.boot must be >= 100 and data.ci in (0.5, 1), got {self.boot}, {self.ci}")


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """Sorted unique fractions, each in (0, 1]; ValueError otherwise."""
    fr = tuple(float(f) for f in fractions)
    bad = [f for f in fr if not (0.0 < f <= 1.0) or math.isnan(f)]
    if not fr or bad:
        raise ValueError(f"label fractions must be in (0, 1] (e.g. 0.01 for 1%), got {list(fr)}")
    return tuple(sorted(set(fr)))


@dataclass(kw_only=True)
class ProbeKnobs:
    """The linear probe: a head trained on frozen (cached) encoder features."""

    pooling: str  # cls (class token after the final norm) | gap (mean patch token + LayerNorm; CNNs: global pool)
    optimizer: str  # adamw | adam | sgd | lars (LARS as MAE's linear probe)
    batch_size: int  # head training batch
    select_metric: str  # val_loss | val_auc: what picks the head among the evaluations
    augmentation: str  # pipelines augmentation of --augment (the per-epoch probe through the backbone)
    head: str = "linear"  # linear | bn_linear (BatchNorm1d without affine, then Linear: MAE's linear probe)
    head_init_std: float | None = None  # trunc-normal std of the head weight; None = torch's nn.Linear init
    dropout: float = 0.0  # dropout before the head
    lr: float | None = None  # absolute learning rate
    blr: float | None = None  # base learning rate: lr = blr * batch_size / 256
    weight_decay: float = 0.0
    beta1: float = 0.9  # Adam(W) betas
    beta2: float = 0.999
    momentum: float = 0.9  # SGD / LARS momentum
    drop_last: bool = False  # full batches only (never drops the only batch of a tiny draw)
    schedule_rule: str = "fixed"  # fixed (the fields below) | mrm (steps/warmup/lr per dataset and fraction) | moco-cxr
    epochs: int = 50  # training length (fixed rule; ignored when steps is set)
    steps: int | None = None  # training length in optimizer steps (fixed rule)
    warmup_epochs: float = 0.0  # linear warmup from 0 (fixed rule)
    lr_schedule: str = "constant"  # constant | cosine (decay to min_lr after the warmup)
    min_lr: float = 0.0
    clip_grad: float = 0.0  # gradient-norm clip; 0 = off
    eval_every_epochs: float = 1.0  # evaluate validate every N epochs (fixed rule)
    patience: int | None = None  # stop after N evaluations without improvement; None = train to the end
    ensemble_top_k: int = 1  # average the probabilities of the k best heads (MoCo-CXR: 10)
    select_split: str = "validate"  # the only split selection may use (test is refused)

    def __post_init__(self) -> None:
        _check_common("probe", self)
        if self.head not in HEADS:
            raise ValueError(f"probe.head must be one of {HEADS}, got {self.head!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"probe.dropout must be in [0, 1), got {self.dropout}")
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"probe.augmentation must be a pipelines augmentation, got {self.augmentation!r}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"probe.patience must be >= 1 or none, got {self.patience}")


@dataclass(kw_only=True)
class FinetuneKnobs:
    """Full fine-tuning (read by the fine-tune runner; the linear probe ignores this section)."""

    pooling: str  # cls | gap (global average + fc_norm, MAE/MRM's global_pool)
    optimizer: str  # sgd | adamw | adam
    batch_size: int  # global batch (all ranks)
    select_metric: str  # val_auc | val_loss
    train_augmentation: str  # pipelines augmentation of the training images (crop, flip, RandAugment: see pipelines/augmentations.py)
    lr: float | None = None
    blr: float | None = None  # lr = blr * batch_size / 256
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    momentum: float = 0.9
    layer_decay: float | None = None  # layer-wise lr decay (ViT); None = off
    drop_path: float = 0.0  # stochastic depth rate
    schedule_rule: str = "fixed"  # fixed | mrm | moco-cxr (as in the probe)
    epochs: int = 1
    steps: int | None = None
    warmup_epochs: float = 0.0
    lr_schedule: str = "cosine"
    min_lr: float = 0.0
    clip_grad: float = 0.0
    head_init_std: float | None = None  # trunc-normal std of the new head's weight
    eval_every_epochs: float = 1.0
    ensemble_top_k: int = 1
    select_split: str = "validate"

    def __post_init__(self) -> None:
        _check_common("finetune", self)
        if self.optimizer == "lars":
            raise ValueError("finetune.optimizer lars is not a published fine-tune optimiser")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"finetune.layer_decay must be in (0, 1] or none, got {self.layer_decay}")
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"finetune.drop_path must be in [0, 1), got {self.drop_path}")
        if self.train_augmentation not in AUGMENTATIONS:
            raise ValueError(f"finetune.train_augmentation must be a pipelines augmentation, got {self.train_augmentation!r}")


@dataclass(kw_only=True)
class RunKnobs:
    """Where features are computed (not part of the published protocol)."""

    backend: str = "dali"  # loader of the images: dali (GPU or DALI CPU mode) | torch (DataLoader reference)
    device: str = "auto"  # auto (gpu when CUDA is available) | gpu | cpu
    precision: str = "auto"  # encoder precision: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    extract_batch_size: int = 64  # images per encoder forward when extracting features (and fine-tune predictions)
    num_threads: int = 4  # DALI threads / DataLoader workers
    cache_dir: str | None = None  # feature cache folder; None = EVAL/features
    micro_batch_size: int | None = None  # fine-tune: images per rank per forward; None = finetune.batch_size / ranks
    zero_stage: int = 2  # fine-tune: DeepSpeed ZeRO stage
    log_every: int = 20  # fine-tune: optimizer steps between metric lines
    ckpt_every_epochs: int = 1  # fine-tune: checkpoint every N epochs (and at the end; a draw resumes from it)
    ckpt_every_steps: int = 0  # fine-tune: also checkpoint every N optimizer steps; 0 = off

    def __post_init__(self) -> None:
        if self.backend not in ("dali", "torch"):
            raise ValueError(f"run.backend must be dali or torch, got {self.backend!r}")
        if self.device not in ("auto", "gpu", "cpu") or self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"run.device must be auto|gpu|cpu and run.precision auto|bf16|fp32, got "
                             f"{self.device!r}, {self.precision!r}")  # fmt: skip
        if self.extract_batch_size < 1 or self.num_threads < 1:
            raise ValueError("run.extract_batch_size and run.num_threads must be >= 1")
        if (self.micro_batch_size is not None and self.micro_batch_size < 1) or self.zero_stage not in (0, 1, 2):
            raise ValueError("run.micro_batch_size must be >= 1 (or none) and run.zero_stage 0, 1 or 2")
        if self.log_every < 1 or min(self.ckpt_every_epochs, self.ckpt_every_steps) < 0:
            raise ValueError("run.log_every must be >= 1 and run.ckpt_every_epochs / ckpt_every_steps >= 0")


#: Keys of the `run` section that do not change any number (left out when a folder is resumed).
RUN_ONLY_KEYS: frozenset[str] = frozenset({"run.extract_batch_size", "run.num_threads", "run.cache_dir", "run.log_every",
                                           "run.ckpt_every_epochs", "run.ckpt_every_steps"})


@dataclass(kw_only=True)
class Protocol:
    """One evaluation protocol: a preset name plus its sections."""

    name: str
    doc: str
    data: DataKnobs
    probe: ProbeKnobs
    finetune: FinetuneKnobs | None
    run: RunKnobs = dataclasses.field(default_factory=RunKnobs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- step tables ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Steps:
    """A fixed-length schedule: optimizer steps, linear warmup steps, peak lr."""

    steps: int
    warmup: int
    lr: float


#: MRM's published fine-tune schedules (README "More fine-tuning hyperparameters"; NIH from
#: finetuning_{1,10,100}percent.sh), per dataset row and label fraction.
MRM_STEPS: dict[str, dict[float, Steps]] = {
    "nih": {0.01: Steps(3000, 50, 3e-2), 0.1: Steps(30000, 500, 3e-3), 1.0: Steps(200000, 5000, 3e-3)},
    "chexpert": {0.01: Steps(2000, 150, 3e-3), 0.1: Steps(60000, 1500, 5e-4), 1.0: Steps(200000, 15000, 5e-4)},
    "rsna": {0.01: Steps(2000, 50, 3e-3), 0.1: Steps(10000, 200, 5e-4), 1.0: Steps(50000, 2000, 5e-4)},
}
#: Which MRM row a task uses (MRM publishes NIH, CheXpert and RSNA; the CheXpert-labeler tasks use CheXpert's).
MRM_ROW = {"nih14": "nih", "rsna": "rsna", "chexpert5": "chexpert", "chexpert14": "chexpert",
           "mimic14": "chexpert", "pleural_effusion": "chexpert"}  # fmt: skip


def mrm_steps(task: str, fraction: float) -> Steps:
    """MRM's schedule for `task` at `fraction`; ValueError for a fraction MRM did not publish."""
    row = MRM_STEPS[MRM_ROW[task]]
    if fraction not in row:
        raise ValueError(
            f"protocol mrm publishes step counts for fractions {sorted(row)} only, not {fraction}; use "
            "probe.schedule_rule=fixed with probe.steps=N probe.lr=LR (and finetune.* likewise)"
        )
    return row[fraction]


def moco_cxr_epochs(fraction: float) -> int:
    """MoCo-CXR gen_sbatch.py: int(5 * 4 ** log_8(1 / fraction)) epochs (5 at 100%, 500 at 0.1%)."""
    return int(5 * 4 ** math.log(1 / fraction, 8))


def moco_cxr_eval_every_samples(fraction: float) -> int:
    """MoCo-CXR gen_sbatch.py: validate every min(2^17 * fraction, 8192) training samples."""
    return max(1, min(int(2**17 * fraction), 8192))


# --- presets --------------------------------------------------------------------------------
CHEXPERT_FRACTIONS = (0.01, 0.1, 1.0)

PROTOCOLS: dict[str, Protocol] = {
    "mgca": Protocol(
        name="mgca",
        doc="MGCA linear classification: frozen ViT, CLS -> Linear, AdamW 5e-4 wd 1e-6, batch 48, <= 50 epochs, "
        "early stop (patience 10) and selection on validate loss; uncertain labels per MGCA; frontal views",
        data=DataKnobs(policy="mgca", views="frontal", fractions=CHEXPERT_FRACTIONS, draws=1, eval_augmentation="eval_pad",
                       crop_size=224, norm_mean=0.5, norm_std=0.5),
        probe=ProbeKnobs(pooling="cls", optimizer="adamw", lr=5e-4, weight_decay=1e-6, batch_size=48, drop_last=True,
                         epochs=50, select_metric="val_loss", patience=10, augmentation="pad_crop"),
        finetune=None,
    ),
    "mrm": Protocol(
        name="mrm",
        doc="MRM fine-tuning: global average pool + fc_norm, SGD momentum 0.9, warmup-cosine, fixed step counts "
        "per dataset and fraction, batch 96, DropPath 0.1, grad clip 1, selection on validate mean AUC; the "
        "linear probe trains the head alone with the same optimiser and schedule (MRM publishes no linear probe)",
        data=DataKnobs(policy="mgca", views="all", fractions=CHEXPERT_FRACTIONS, draws=1, eval_augmentation="eval_full",
                       crop_size=224, norm_mean=0.4978, norm_std=0.2449),
        probe=ProbeKnobs(pooling="gap", optimizer="sgd", momentum=0.9, weight_decay=0.0, batch_size=96,
                         schedule_rule="mrm", lr_schedule="cosine", clip_grad=1.0, head_init_std=2e-5,
                         select_metric="val_auc", augmentation="mae"),
        finetune=FinetuneKnobs(pooling="gap", optimizer="sgd", momentum=0.9, weight_decay=0.0, batch_size=96,
                               schedule_rule="mrm", lr_schedule="cosine", clip_grad=1.0, drop_path=0.1,
                               head_init_std=2e-5, train_augmentation="finetune", select_metric="val_auc"),
    ),
    "mae-cxr": Protocol(
        name="mae-cxr",
        doc="MAE-CXR: linear probe as main_linprobe_chestxray.py (CLS, BatchNorm + Linear, LARS blr 0.1, batch 512, "
        "90 epochs, warmup 10); fine-tune with GAP, layer decay 0.55, RandAug m6, DropPath 0.2, AdamW blr 2.5e-4, "
        "75 epochs, warmup 5; selection on validate (the published code selects on test)",
        data=DataKnobs(policy="mae-cxr", views="frontal", fractions=(1.0,), draws=1, eval_augmentation="eval",
                       crop_size=224, norm_mean=0.5056, norm_std=0.252),
        probe=ProbeKnobs(pooling="cls", head="bn_linear", head_init_std=0.01, optimizer="lars", blr=0.1,
                         weight_decay=0.0, momentum=0.9, batch_size=512, drop_last=True, epochs=90, warmup_epochs=10,
                         lr_schedule="cosine", eval_every_epochs=10, select_metric="val_auc", augmentation="mae"),
        finetune=FinetuneKnobs(pooling="gap", optimizer="adamw", blr=2.5e-4, weight_decay=0.05, beta2=0.999,
                               layer_decay=0.55, drop_path=0.2, batch_size=1024, epochs=75, warmup_epochs=5,
                               lr_schedule="cosine", min_lr=1e-5, head_init_std=2e-5, eval_every_epochs=10,
                               select_metric="val_auc", train_augmentation="finetune_randaug"),
    ),
    "moco-cxr": Protocol(
        name="moco-cxr",
        doc="MoCo-CXR: linear (fc only) and full fine-tune, Adam lr 1e-4, batch 16, epochs and validate interval "
        "by fraction, U-Ones, all views, 5 draws by patient, mean of the 10 best validate checkpoints",
        data=DataKnobs(policy="ones", views="all", fractions=(0.001, 0.01, 0.1, 0.5, 1.0), draws=5,
                       eval_augmentation="eval_full", crop_size=320, norm_mean=IMAGENET_GRAY[0], norm_std=IMAGENET_GRAY[1]),
        probe=ProbeKnobs(pooling="gap", optimizer="adam", lr=1e-4, weight_decay=0.0, batch_size=16,
                         schedule_rule="moco-cxr", select_metric="val_auc", ensemble_top_k=10,
                         augmentation="resize_crop"),
        finetune=FinetuneKnobs(pooling="gap", optimizer="adam", lr=1e-4, weight_decay=0.0, batch_size=16,
                               schedule_rule="moco-cxr", lr_schedule="constant", select_metric="val_auc",
                               ensemble_top_k=10, train_augmentation="resize_crop"),
    ),
}  # fmt: skip


def get_protocol(name: str, overrides: Sequence[str] = ()) -> Protocol:
    """A fresh copy of preset `name` with `key=value` overrides applied (unknown keys: ValueError)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    proto = copy.deepcopy(PROTOCOLS[name])
    index = override_keys(proto)
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.startswith("finetune") and proto.finetune is None:
            raise ValueError(f"protocol {name!r} has no fine-tune settings (the paper publishes a linear probe "
                             f"only); cannot apply {item!r}")  # fmt: skip
        if index.get(key) in ("name", "doc", "finetune"):
            raise ValueError(f"{key!r} is not a setting; choose the protocol with --protocol")
    return apply_overrides(proto, list(overrides))
