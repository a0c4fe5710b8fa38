"""The published settings behind each preset, in one declared place, and the parity table made from them.

`PUBLISHED[preset]` is the `PublishedRecipe` of a preset: the published code base (repository and
commit) and its knobs. Each `Knob` holds the published value and the line it comes from, and either

- `config`: where cxrfast keeps that value: a run-config path (`method.mask_ratio`, `optim.betas`),
  `model.FIELD` (the network the preset's `method.arch` names, `cxrfast.models.MODELS`) or
  `augmentation.NAME.FIELD` (`cxrfast.pipelines.AUGMENTATIONS`). The preset's value must equal the
  published one (or `equivalent`, where cxrfast writes it another way, e.g. one channel for three),
  unless the knob declares a deliberate difference (`differs`) and its `switch`;
- or `cxrfast`: a documented non-config aspect (precision, channel count, masking quirks), in words.

`switch` lists the `key=value` overrides that select the other behaviour (an improvement, or the way
back to the published one); they are checked against the preset. `tests/test_published.py` fails when
a preset and this table disagree, or when `docs/recipes.md` is not what `render()` writes:

    python -m cxrfast.published --write docs/recipes.md      # regenerate
    python -m cxrfast.published --check docs/recipes.md      # exit 1 when it is stale

A new preset of a published system is one more `PublishedRecipe` entry here.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrfast.methods.mae import IMAGENET_MEAN, IMAGENET_STD, gray_normalisation

if TYPE_CHECKING:
    from cxrfast.config import RunConfig

_UNSET = object()


@dataclass(frozen=True, kw_only=True)
class Knob:
    """One published setting and where cxrfast keeps it."""

    name: str  # what it is, in words
    published: Any  # the published value (a config-comparable value for `config` knobs, else words)
    source: str  # file:line(s) in the recipe's repository (another repository's file names it first)
    config: str | None = None  # where cxrfast keeps the value (see the module doc); None for a non-config aspect
    equivalent: Any = _UNSET  # the config value that represents `published` when cxrfast writes it another way
    cxrfast: str | None = None  # non-config aspect: what cxrfast does; config knob: how `equivalent` follows
    differs: str | None = None  # why cxrfast's default is not the published value (a deliberate difference, or a gap)
    switch: tuple[str, ...] = ()  # `key=value` overrides that select the other behaviour

    def __post_init__(self) -> None:
        if self.config is None and self.cxrfast is None:
            raise ValueError(f"knob {self.name!r}: give `config` (a config path) or `cxrfast` (a non-config aspect)")
        if self.config is None and self.equivalent is not _UNSET:
            raise ValueError(f"knob {self.name!r}: `equivalent` needs `config`")
        if self.config is not None and self.differs is not None and not self.switch:
            raise ValueError(f"knob {self.name!r}: a deliberate difference in the config needs its `switch`")
        if any("=" not in s for s in self.switch):
            raise ValueError(f"knob {self.name!r}: switches are key=value overrides, got {self.switch}")

    @property
    def expected(self) -> Any:
        """The config value that reproduces the published one."""
        return self.published if self.equivalent is _UNSET else self.equivalent


@dataclass(frozen=True, kw_only=True)
class PublishedRecipe:
    """The published code base a preset reproduces, and its knobs."""

    preset: str  # name in cxrfast.presets.PRESETS
    system: str  # the published system, in words
    repo: str  # owner/name of the published code
    commit: str  # the commit the file:line sources refer to
    knobs: tuple[Knob, ...] = field(default_factory=tuple)


# --- config values ------------------------------------------------------------------------------
def resolve(cfg: RunConfig, path: str) -> Any:
    """The value at `path` for the run config `cfg` (see the module doc for the three kinds of path)."""
    root, _, rest = path.partition(".")
    if root == "augmentation":
        from cxrfast.pipelines.augmentations import AUGMENTATIONS

        name, _, attr = rest.partition(".")
        if name not in AUGMENTATIONS:
            raise ValueError(f"{path}: no augmentation {name!r}")
        return getattr(AUGMENTATIONS[name], attr)
    if root == "model":
        from cxrfast.models import MODELS

        return MODELS[cfg.method.arch].value(rest)  # type: ignore[attr-defined]
    obj: Any = cfg
    for part in path.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise ValueError(f"{path}: the run config has no {part!r} there")
        obj = getattr(obj, part)
    return obj


def show(value: Any, *, override: bool = False) -> str:
    """A value for the table (floats to 6 significant digits); `override`: as a `key=value` override
    writes it (a tuple as `a,b`), else a tuple as `(a, b)`."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        items = [show(v) for v in value]
        return ",".join(items) if override else f"({', '.join(items)})"
    return str(value)


def is_override_path(path: str) -> bool:
    """Whether `path` is a run-config path (settable as an override) rather than a model/augmentation one."""
    return path.partition(".")[0] not in ("model", "augmentation")


# --- the published recipes ----------------------------------------------------------------------
_MAE_CXR_MEAN, _MAE_CXR_STD = gray_normalisation(IMAGENET_MEAN, IMAGENET_STD)
_XRAY = "main_pretrain_multi_datasets_xray.py"

_PRECISION = "bf16 compute, fp32 master weights in the optimizer (`train.precision=bf16`); the loss target stays fp32"
_BF16_WHY = "bf16 has fp32's range: no loss scaler, no skipped steps; fp32 is the other choice (fp16 is not offered)"
_ONE_CHANNEL = ("1 channel: a gray image copied to 3 channels makes the 3-channel patch embedding a 1-channel one "
                "with the filters summed (what `method.init` does to an RGB file)")


def _mae_cxr(preset: str, arch_source: str, arch: dict[str, int], datasets: str, mix: tuple[str, ...]) -> PublishedRecipe:
    """MAE-CXR (lambert-x/medical_mae): `arch` = the network's sizes, `datasets` where PRETRAIN.md lists
    them, `mix` = those datasets as cxrfast names them."""
    sizes = tuple(
        Knob(name=f"network: {name}", published=value, source=arch_source, config=f"model.{name}")
        for name, value in arch.items()
    )
    return PublishedRecipe(
        preset=preset,
        system="MAE-CXR (Xiao et al., WACV 2023, arXiv 2210.12843)",
        repo="lambert-x/medical_mae",
        commit="953a460b41534321ff9a8bbee41efe6e21877017",
        knobs=(
            Knob(name="pre-training images", published="CheXpert-v1.0-small (frontal), NIH ChestX-ray14 "
                 "(1024 px, official train list), MIMIC-CXR-JPG pre-resized to 320 px (AP/PA), concatenated",
                 source=f"{datasets}; {_XRAY}:189-198; util/dataloader_med.py:836",
                 cxrfast="one shard folder per dataset, read as their union (`--shards A B C`: each sample "
                 "once per epoch), images at `--max-size` (default 512: the 224 crops at scale >= 0.5 are never "
                 "upsampled); NIH's list: `cxrfast shard nih --validate-list val_official.txt`; CheXpert's whole "
                 "train.csv: `--validate-fraction 0`",
                 differs="medical_mae keeps MIMIC-CXR's images of the studies in mimic-cxr-2.0.0-chexpert.csv "
                 "(util/dataloader_med.py:859-866); `cxrfast shard mimic` keeps every AP/PA image of the split"),
            Knob(name="pre-training datasets", published=mix, source=datasets, config="data.datasets",
                 cxrfast="other --shards datasets are warned about; data.strict_datasets=true refuses them"),
            Knob(name="crop side", published=224, source=f"PRETRAIN.md:58; {_XRAY}:170",
                 config="augmentation.mae.image_size"),
            Knob(name="RandomResizedCrop scale", published=(0.5, 1.0), source=f"PRETRAIN.md:60; {_XRAY}:170",
                 config="augmentation.mae.scale"),
            Knob(name="RandomResizedCrop ratio", published=(3 / 4, 4 / 3), source=f"{_XRAY}:170 (torchvision's default)",
                 config="augmentation.mae.ratio"),
            Knob(name="resampling", published="bicubic", source=f"{_XRAY}:171", config="augmentation.mae.interpolation"),
            Knob(name="horizontal flip", published=True, source=f"{_XRAY}:172", config="augmentation.mae.flip"),
            Knob(name="input channels", published="RGB (`.convert('RGB')`), in_chans=3",
                 source="util/dataloader_med.py:214,484,929; models_mae.py:29", cxrfast=_ONE_CHANNEL),
            Knob(name="normalisation", published="fixed per-dataset constants", source=f"{_XRAY}:147-154",
                 config="method.pixel_norm", equivalent="published", switch=("method.pixel_norm=shards",)),
            Knob(name="pixel mean (CheXpert, MIMIC-CXR)", published=IMAGENET_MEAN, source=f"{_XRAY}:147,149",
                 config="method.mean", equivalent=_MAE_CXR_MEAN,
                 cxrfast="one channel: the mean of the three normalised channels, see "
                 "cxrfast.methods.mae.gray_normalisation"),
            Knob(name="pixel std (CheXpert, MIMIC-CXR)", published=IMAGENET_STD, source=f"{_XRAY}:151,153",
                 config="method.std", equivalent=_MAE_CXR_STD, cxrfast="1/std = the mean of 1/std_c"),
            Knob(name="pixel mean, std (NIH ChestX-ray14)", published=(0.5056, 0.252), source=f"{_XRAY}:148,152",
                 config="method.dataset_norms", equivalent=("nih:0.5056:0.252",),
                 cxrfast="`dataset:mean:std`: the samples of NIH shard folders are normalised with these, each "
                 "sample by its folder, in one run with the others"),
            Knob(name="mask ratio", published=0.90, source="PRETRAIN.md:53,74", config="method.mask_ratio"),
            Knob(name="norm-pix loss", published=False, source=f"PRETRAIN.md (no --norm_pix_loss); {_XRAY}:60-62",
                 config="method.norm_pix_loss"),
            Knob(name="initialisation", published=None, source="PRETRAIN.md:45-82 (no --resume: from scratch)",
                 config="method.init"),
            *sizes,
            Knob(name="patch size", published=16, source=arch_source, config="model.patch_size"),
            Knob(name="MLP ratio", published=4.0, source=arch_source, config="model.mlp_ratio"),
            Knob(name="LayerNorm eps", published=1e-6, source=arch_source, cxrfast="1e-6 (cxrfast.models.mae)"),
            Knob(name="sin-cos position tables", published="mae", source="util/pos_embed.py:56-58",
                 config="method.pos_embed", switch=("method.pos_embed=mrm",)),
            Knob(name="epochs", published=800, source="PRETRAIN.md:54,75", config="optim.epochs"),
            Knob(name="warmup epochs", published=40, source="PRETRAIN.md:55,76", config="optim.warmup_epochs"),
            Knob(name="base lr (lr = blr x batch / 256)", published=1.5e-4, source="PRETRAIN.md:56,77",
                 config="optim.blr"),
            Knob(name="lr batch reference", published=256, source=f"{_XRAY}:259", config="optim.lr_batch_ref"),
            Knob(name="weight decay", published=0.05, source="PRETRAIN.md:56,77", config="optim.weight_decay"),
            Knob(name="optimizer", published="adamw", source=f"{_XRAY}:273", config="optim.name"),
            Knob(name="AdamW betas", published=(0.9, 0.95), source=f"{_XRAY}:273", config="optim.betas"),
            Knob(name="AdamW eps", published=1e-8, source=f"{_XRAY}:273 (torch's default)", config="optim.eps"),
            Knob(name="weight-decay groups (timm add_weight_decay: 1-D and .bias exempt, tokens decayed)",
                 published=True, source=f"{_XRAY}:272", config="method.decay_tokens",
                 switch=("method.decay_tokens=false",)),
            Knob(name="schedule", published="per-iteration linear warmup, half-cycle cosine", equivalent="warmup_cosine",
                 source="engine_pretrain.py:41-43; util/lr_sched.py:9-23", config="optim.schedule"),
            Knob(name="min lr", published=0.0, source=f"{_XRAY}:72", config="optim.min_lr"),
            Knob(name="micro-batch per GPU", published=256, source="PRETRAIN.md:51,72", config="train.batch_size"),
            Knob(name="global batch (8 GPUs x 256)", published=2048, source="PRETRAIN.md:47,51,68,72",
                 config="train.global_batch_size"),
            Knob(name="full batches only", published=True, source=f"{_XRAY}:232",
                 cxrfast="yes (the trainer's loaders drop the last partial batch)"),
            Knob(name="gradient clipping", published=0.0, source="engine_pretrain.py:64 (no clip_grad)",
                 config="optim.clip_grad"),
            Knob(name="precision", published="fp16 autocast with a dynamic loss scaler", source="engine_pretrain.py:51,64",
                 cxrfast=_PRECISION, differs=_BF16_WHY, switch=("train.precision=fp32",)),
            Knob(name="checkpoint every N epochs", published=20, source=f"{_XRAY}:290", config="train.ckpt_every_epochs"),
            Knob(name="seed", published=0, source=f"{_XRAY}:88,128 (+ rank)", config="train.seed"),
        ),
    )


_MOCO = "moco_pretraining/moco/main_moco.py"
_MOCO_RUN = "moco_pretraining/scripts/training_scripts/r8w1n416.sh"
_MOCO_GEN = "moco_pretraining/scripts/generate_moco_training_scripts.py"
_MOCO_TF = "moco_pretraining/moco/aihc_utils/image_transform.py"
_MOCO_BUILDER = "moco_pretraining/moco/moco/builder.py"
#: the ImageNet file torchvision's `pretrained=True` (MoCo-CXR's --from-imagenet) loads, per backbone
_TORCHVISION_IMAGENET = {"resnet18": "resnet18-f37072fd.pth", "resnet50": "resnet50-19c8e357.pth",
                         "densenet121": "densenet121-a639ec97.pth"}


def _moco_cxr(preset: str, arch: str) -> PublishedRecipe:
    """MoCo-CXR (stanfordmlgroup/MoCo-CXR): the published run script is ResNet18's; the other backbones
    come from the same template with `-a` changed."""
    arch_source = f"{_MOCO_RUN}:28" if arch == "resnet18" else f"{_MOCO_GEN}:33,73-75 (the run template's -a)"
    return PublishedRecipe(
        preset=preset,
        system="MoCo-CXR (Sowrirajan et al., MIDL 2021): MoCo v2 on chest X-rays",
        repo="stanfordmlgroup/MoCo-CXR",
        commit="d433acabe6518b332a1345a6a1fed49f0c23c253",
        knobs=(
            Knob(name="pre-training images", published="CheXpert training images (an ImageFolder)",
                 source=f"{_MOCO_RUN}:35; {_MOCO}:304-306", cxrfast="a CheXpert shard folder (`cxrfast shard chexpert`)"),
            Knob(name="backbone", published=arch, source=arch_source, config="method.arch"),
            Knob(name="initialisation", published="ImageNet (torchvision pretrained=True)",
                 source=f"{_MOCO_RUN}:32 (--from-imagenet); {_MOCO_BUILDER}:28-31", config="method.init",
                 equivalent=_TORCHVISION_IMAGENET[arch],
                 cxrfast=f"torchvision's {_TORCHVISION_IMAGENET[arch]} (what pretrained=True loads), a local file the "
                 "user provides; nothing is downloaded", switch=("method.init=none",)),
            Knob(name="input channels", published="RGB (ImageFolder's PIL loader), 3-channel stem",
                 source=f"{_MOCO}:304", cxrfast="1 channel: a gray image copied to 3 channels makes the 3-channel "
                 "stem a 1-channel one with the filters summed (what `method.init` does to an RGB file)"),
            Knob(name="resize: shorter side, aspect kept", published=320, source=f"{_MOCO}:119,123-126; {_MOCO_TF}:9-10",
                 config="method.image_size", cxrfast="the shorter side and the crop are both `image_size`"),
            Knob(name="random crop", published=320, source=f"{_MOCO}:121; {_MOCO_TF}:18", config="method.image_size"),
            Knob(name="resampling (torchvision Resize's default)", published="bilinear", source=f"{_MOCO_TF}:10",
                 config="augmentation.moco.interpolation"),
            Knob(name="horizontal flip", published=True, source=f"{_MOCO_TF}:16", config="augmentation.moco.flip"),
            Knob(name="random rotation (degrees)", published=10.0, source=f"{_MOCO_RUN}:34; {_MOCO_TF}:17",
                 config="augmentation.moco.rotate"),
            Knob(name="two independently augmented views", published=True, source=f"{_MOCO}:306; "
                 "moco_pretraining/moco/moco/loader.py:6-15", config="augmentation.moco.two_views"),
            Knob(name="normalisation", published="fixed constants", source=f"{_MOCO_TF}:3-4,27",
                 config="method.pixel_norm", equivalent="published", switch=("method.pixel_norm=shards",)),
            Knob(name="pixel mean", published=0.5020, source=f"{_MOCO_TF}:3", config="method.mean"),
            Knob(name="pixel std", published=0.085585, source=f"{_MOCO_TF}:4", config="method.std"),
            Knob(name="feature dimension", published=128, source=f"{_MOCO}:88", config="method.dim"),
            Knob(name="MLP head (MoCo v2)", published=True, source=f"{_MOCO_RUN}:32 (--mlp)", config="method.mlp"),
            Knob(name="queue size", published=24576, source=f"{_MOCO}:91", config="method.queue_size"),
            Knob(name="key encoder momentum", published=0.999, source=f"{_MOCO}:93", config="method.momentum"),
            Knob(name="temperature", published=0.2, source=f"{_MOCO_RUN}:32 (--moco-t 0.2)",
                 config="method.temperature"),
            Knob(name="BatchNorm groups on one GPU (shuffle-BN)", published="one: on a single GPU the key shuffle "
                 "leaves BatchNorm's statistics unchanged", source=f"{_MOCO_RUN}:8,31; {_MOCO_BUILDER}:101-126",
                 config="method.bn_splits", equivalent=1, cxrfast="0 = 2 groups on one rank, 1 on several",
                 differs="on one rank, 2 groups with the keys shuffled between them keep a key's BatchNorm "
                 "statistics apart from its query's, as several GPUs do", switch=("method.bn_splits=1",)),
            Knob(name="optimizer", published="adam", source=f"{_MOCO}:129,243-246", config="optim.name"),
            Knob(name="Adam betas", published=(0.9, 0.999), source=f"{_MOCO}:245", config="optim.betas"),
            Knob(name="Adam eps", published=1e-8, source=f"{_MOCO}:244 (torch's default)", config="optim.eps"),
            Knob(name="learning rate", published=1e-4, source=f"{_MOCO_RUN}:29", config="optim.lr"),
            Knob(name="weight decay (L2 in Adam)", published=1e-4, source=f"{_MOCO}:62,246", config="optim.weight_decay"),
            Knob(name="weight decay on every parameter", published=True, source=f"{_MOCO}:244 (model.parameters())",
                 config="method.decay_all"),
            Knob(name="schedule", published="step: x0.1 at each milestone epoch", source=f"{_MOCO}:443-453",
                 config="optim.schedule", equivalent="step", switch=("optim.schedule=warmup_cosine",)),
            Knob(name="milestones (epochs)", published=(12, 18, 24), source=f"{_MOCO}:58", config="optim.milestones"),
            Knob(name="lr factor at a milestone", published=0.1, source=f"{_MOCO}:451", config="optim.gamma"),
            Knob(name="warmup epochs", published=0, source=f"{_MOCO}:443-453 (none)", config="optim.warmup_epochs"),
            Knob(name="epochs", published=20, source=f"{_MOCO_RUN}:30", config="optim.epochs"),
            Knob(name="batch (one GPU)", published=16, source=f"{_MOCO_RUN}:8,29", config="train.global_batch_size"),
            Knob(name="micro-batch", published=16, source=f"{_MOCO_RUN}:29", config="train.batch_size"),
            Knob(name="full batches only", published=True, source=f"{_MOCO}:319",
                 cxrfast="yes (the trainer's loaders drop the last partial batch)"),
            Knob(name="precision", published="fp32", source=f"{_MOCO}:370-384 (no autocast)",
                 cxrfast="bf16 compute; the key encoder, queue and BatchNorm statistics fp32 (`train.precision=bf16`)",
                 differs="bf16 for speed; the EMA and the queue keep fp32", switch=("train.precision=fp32",)),
            Knob(name="checkpoint every N epochs", published=1, source=f"{_MOCO}:115,333-342",
                 config="train.ckpt_every_epochs"),
            Knob(name="seed", published="none (unseeded)", source=f"{_MOCO}:77,141",
                 cxrfast="`train.seed=0`: runs are reproducible and resume exactly"),
        ),
    )


_MGCA = "mgca/models/mgca/mgca_module.py"
_MGCA_ENC = "mgca/models/backbones/encoder.py"
_MGCA_BERT = "mgca/configs/bert_config.json"
_MGCA_DATA = "mgca/datasets/pretrain_dataset.py"


def _mgca(preset: str) -> PublishedRecipe:
    """MGCA (HKU-MedAI/MGCA): pre-training with mgca_module.py's argparse defaults (README.md:45)."""
    return PublishedRecipe(
        preset=preset,
        system="MGCA, Multi-Granularity Cross-modal Alignment (Wang et al., NeurIPS 2022)",
        repo="HKU-MedAI/MGCA",
        commit="680fe4a6ee0cc454ab58fd1a8b28fee81c03d742",
        knobs=(
            Knob(name="pre-training images and reports", published="MIMIC-CXR-JPG with its reports",
                 source=f"{_MGCA_DATA}:19-42", cxrfast="MIMIC-CXR shards (`cxrfast shard mimic`)"),
            Knob(name="image: long side 256, zero pad to 256 x 256", published=256,
                 source=f"{_MGCA_DATA}:20; mgca/datasets/utils.py:28-70",
                 cxrfast="256 = 224 x 256/224 (cxrfast.pipelines.augmentations.presize)"),
            Knob(name="resampling", published="cv2.INTER_AREA", source="mgca/datasets/utils.py:51-53",
                 cxrfast="bilinear, antialiased when shrinking (`augmentation.mgca.interpolation`)",
                 differs="DALI has no area filter; an antialiased bilinear shrink is the nearest"),
            Knob(name="random crop", published=224, source="mgca/datasets/transforms.py:12; "
                 "mgca/datasets/data_module.py:6", config="augmentation.mgca.image_size"),
            Knob(name="horizontal flip", published=False, source="mgca/datasets/transforms.py:11-15",
                 config="augmentation.mgca.flip"),
            Knob(name="input channels", published="RGB (`.convert('RGB')`), 3-channel patch embedding",
                 source="mgca/datasets/utils.py:78-81", cxrfast=_ONE_CHANNEL),
            Knob(name="normalisation", published="fixed constants", source="mgca/datasets/transforms.py:14",
                 config="method.pixel_norm", equivalent="published", switch=("method.pixel_norm=shards",)),
            Knob(name="pixel mean", published=0.5, source="mgca/datasets/transforms.py:14", config="method.mean"),
            Knob(name="pixel std", published=0.5, source="mgca/datasets/transforms.py:14", config="method.std"),
            Knob(name="report text: impression + findings, sentences of >= 2 \\w+ words, lower case; "
                 "studies under 3 words left out", published="MGCA's caption", source=f"{_MGCA_DATA}:70-121,139-147", config="method.text",
                 equivalent="mgca_caption", switch=("method.text=findings_impression",)),
            Knob(name="report tokens", published=112, source=f"{_MGCA_DATA}:20,149-155", config="method.text_len"),
            Knob(name="tokenizer", published="Bio_ClinicalBERT's", source=f"{_MGCA_ENC}:154,174",
                 cxrfast="the shards' tokenizer: `cxrfast shard mimic --tokenizer BIO_CLINICALBERT_FOLDER`",
                 differs="without --tokenizer the shards train a 30k WordPiece on their own reports"),
            Knob(name="image encoder", published="ViT-B/16", source=f"{_MGCA}:34; {_MGCA_ENC}:71-78",
                 config="method.image_encoder", equivalent="vit_base_patch16"),
            Knob(name="image encoder initialisation", published="DeiT-B (deit_base_patch16_224-b5f2ef4d.pth)",
                 source=f"{_MGCA_ENC}:82-86", config="method.init", equivalent="deit_base_patch16_224-b5f2ef4d.pth",
                 cxrfast="a local file the user provides; nothing is downloaded", switch=("method.init=none",)),
            Knob(name="text encoder initialisation", published="Bio_ClinicalBERT, its first 6 layers",
                 source=f"{_MGCA_ENC}:154,163-168; {_MGCA_BERT}", config="method.text_model",
                 equivalent="Bio_ClinicalBERT", cxrfast="a local Hugging Face folder the user provides (the shards "
                 "carry its token ids: `cxrfast shard mimic --tokenizer` it)", switch=("method.text_model=none",)),
            Knob(name="BERT layers", published=6, source=f"{_MGCA_BERT} (num_hidden_layers)", config="method.text_layers"),
            Knob(name="BERT width", published=768, source=f"{_MGCA_BERT} (hidden_size)", config="method.text_width"),
            Knob(name="BERT heads", published=12, source=f"{_MGCA_BERT} (num_attention_heads)", config="method.text_heads"),
            Knob(name="BERT FFN width", published=3072, source=f"{_MGCA_BERT} (intermediate_size)",
                 config="method.text_intermediate"),
            Knob(name="embedding width", published=128, source=f"{_MGCA}:36,417-418", config="method.emb_dim"),
            Knob(name="projection hidden width", published=2048, source=f"{_MGCA_ENC}:20,62", config="method.proj_hidden"),
            Knob(name="instance temperature", published=0.07, source=f"{_MGCA}:37,420", config="method.temp_instance"),
            Knob(name="token temperature", published=0.1, source=f"{_MGCA}:44", config="method.temp_local"),
            Knob(name="prototype temperature", published=0.2, source=f"{_MGCA}:45", config="method.temp_proto"),
            Knob(name="prototypes", published=500, source=f"{_MGCA}:46,425", config="method.num_prototypes"),
            Knob(name="Sinkhorn iterations", published=3, source=f"{_MGCA}:55", config="method.sinkhorn_iters"),
            Knob(name="Sinkhorn epsilon", published=0.05, source=f"{_MGCA}:56", config="method.sinkhorn_eps"),
            Knob(name="epochs with frozen prototypes", published=1, source=f"{_MGCA}:54,340-343",
                 config="method.freeze_prototypes_epochs"),
            Knob(name="instance loss weight", published=1.0, source=f"{_MGCA}:428", config="method.lambda_instance"),
            Knob(name="token loss weight", published=1.0, source=f"{_MGCA}:429", config="method.lambda_local"),
            Knob(name="prototype loss weight", published=1.0, source=f"{_MGCA}:430", config="method.lambda_proto"),
            Knob(name="instance negatives from other GPUs", published=False, source=f"{_MGCA}:101-109",
                 config="method.gather_negatives", switch=("method.gather_negatives=true",)),
            Knob(name="optimizer", published="adamw", source=f"{_MGCA}:391-396", config="optim.name"),
            Knob(name="learning rate", published=2e-5, source=f"{_MGCA}:38,421", config="optim.lr"),
            Knob(name="AdamW betas", published=(0.9, 0.999), source=f"{_MGCA}:394,422", config="optim.betas"),
            Knob(name="weight decay", published=0.05, source=f"{_MGCA}:40,423", config="optim.weight_decay"),
            Knob(name="weight decay on every parameter", published=True, source=f"{_MGCA}:392 (self.parameters())",
                 config="method.decay_all"),
            Knob(name="schedule: per-step warmup over 40% of the steps, then cosine", published="warmup_cosine",
                 source=f"{_MGCA}:397-409", config="optim.schedule"),
            Knob(name="warmup epochs (40% of 50)", published=20, source=f"{_MGCA}:403,477", config="optim.warmup_epochs"),
            Knob(name="min lr", published=1e-8, source=f"{_MGCA}:402", config="optim.min_lr"),
            Knob(name="epochs", published=50, source=f"{_MGCA}:477; README.md:47", config="optim.epochs"),
            Knob(name="micro-batch per GPU", published=72, source=f"{_MGCA}:424", config="train.batch_size"),
            Knob(name="global batch (2 GPUs x 72)", published=144, source="README.md:45,47",
                 config="train.global_batch_size"),
            Knob(name="full batches only", published=True, source="mgca/datasets/data_module.py:29",
                 cxrfast="yes (the trainer's loaders drop the last partial batch)"),
            Knob(name="validation every N epochs", published=1, source=f"{_MGCA}:507-510 (Lightning's default)",
                 config="train.validate_every_epochs"),
            Knob(name="early stopping patience (validation loss)", published=5, source=f"{_MGCA}:499-500",
                 config="train.early_stop_patience"),
            Knob(name="exported weights", published="best", source=f"{_MGCA}:497-498 (top 5 by val_loss)",
                 config="train.select"),
            Knob(name="checkpoint every N epochs", published=1, source=f"{_MGCA}:497-498", config="train.ckpt_every_epochs"),
            Knob(name="precision", published="fp32", source="README.md:45 (Lightning's default precision)",
                 cxrfast=_PRECISION.replace("; the loss target stays fp32", ""), differs="bf16 for speed and memory",
                 switch=("train.precision=fp32",)),
            Knob(name="seed", published=42, source=f"{_MGCA}:431,480", config="train.seed",
                 differs="cxrfast's presets seed with 0", switch=("train.seed=42",)),
            Knob(name="autograd anomaly detection", published="on", source=f"{_MGCA}:24",
                 cxrfast="off", differs="a debugging switch left on: it slows training and changes no result"),
        ),
    )


_MRM_NET = "model_mrm.py:245-248"
_MRM_BERT = "bert/bert_encoder.py:65-84"

PUBLISHED: dict[str, PublishedRecipe] = {
    "mae_cxr_vits": _mae_cxr(
        "mae_cxr_vits", "PRETRAIN.md:52; models_mae.py:304-309",
        dict(embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=512, decoder_depth=2, decoder_num_heads=16),
        "PRETRAIN.md:61 (chexpert chestxray_nih)", ("chexpert", "nih")),
    "mae_cxr_vitb": _mae_cxr(
        "mae_cxr_vitb", "PRETRAIN.md:73; models_mae.py:328-333",
        dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
        "PRETRAIN.md:82 (chexpert chestxray_nih mimic_cxr)", ("chexpert", "nih", "mimic")),
    "mrm_vitb": PublishedRecipe(
        preset="mrm_vitb",
        system="MRM, Masked Record Modeling (Zhou et al., ICLR 2023)",
        repo="RL4M/MRM-pytorch",
        commit="3730ba49a678eda870284205178bfe25627aaed8",
        knobs=(
            Knob(name="pre-training images", published="MIMIC-CXR-JPG at full resolution (training.csv: image_path, "
                 "report_content)", source="README.md:40-48",
                 cxrfast="MIMIC-CXR shards; shard at `--max-size 1280`, where no 448 crop is upsampled (README)"),
            Knob(name="shards too small for the 448 crops", published="never (full-resolution images)",
                 source="main_pretrain.py:128", cxrfast="refused, naming the size to re-shard at "
                 "(`method.on_small_shards=error`)", switch=("method.on_small_shards=warn",)),
            Knob(name="RandomResizedCrop side (= the target)", published=448, source="main_pretrain.py:128",
                 config="augmentation.mrm.target_factor", equivalent=2, cxrfast="448 = 2 x the 224 input"),
            Knob(name="RandomResizedCrop scale", published=(0.2, 1.0), source="main_pretrain.py:128",
                 config="augmentation.mrm.scale"),
            Knob(name="RandomResizedCrop ratio", published=(3 / 4, 4 / 3), source="main_pretrain.py:128 (torchvision's "
                 "default)", config="augmentation.mrm.ratio"),
            Knob(name="resampling", published="bicubic", source="main_pretrain.py:128", config="augmentation.mrm.interpolation"),
            Knob(name="horizontal flip", published=True, source="main_pretrain.py:129", config="augmentation.mrm.flip"),
            Knob(name="encoder input: the 448 tensor resized (bicubic) to 224", published=True, source="model_mrm.py:236",
                 config="augmentation.mrm.image_from_target"),
            Knob(name="encoder input side", published=224, source="model_mrm.py:236; main_pretrain.py:53",
                 config="model.img_size"),
            Knob(name="input channels", published="Grayscale(3), in_chans=3", source="main_pretrain.py:130; "
                 "model_mrm.py:246", cxrfast=_ONE_CHANNEL + "; the same constants on all three make the loss the same"),
            Knob(name="normalisation", published="fixed constants", source="main_pretrain.py:132",
                 config="method.pixel_norm", equivalent="published", switch=("method.pixel_norm=shards",)),
            Knob(name="pixel mean", published=0.4978, source="main_pretrain.py:132", config="method.mean"),
            Knob(name="pixel std", published=0.2449, source="main_pretrain.py:132", config="method.std"),
            Knob(name="report text", published="the whole report ('FINAL REPORT EXAMINATION: ...')",
                 source="README.md:42-47; util/pretrain_datasets.py:58-59", config="method.text", equivalent="report",
                 switch=("method.text=findings_impression",)),
            Knob(name="report tokens ([CLS] + text, truncated/padded)", published=100,
                 source="util/pretrain_datasets.py:24,59-61", config="model.text_len"),
            Knob(name="tokenizer", published="mimic_wordpiece.json (30k WordPiece; [PAD] [UNK] [CLS] [MASK], no [SEP])",
                 source="util/pretrain_datasets.py:30", cxrfast="the shards' tokenizer: `cxrfast shard mimic "
                 "--tokenizer mimic_wordpiece.json` uses MRM's file",
                 differs="without --tokenizer the shards train a 30k WordPiece on their own reports (with [SEP])"),
            Knob(name="MLM: share of words masked", published=0.5, source="util/pretrain_datasets.py:49-51",
                 config="method.mlm_prob"),
            Knob(name="MLM: masked tokens written as [MASK]", published=1.0, source="util/pretrain_datasets.py:43,51",
                 config="method.mlm_replace_mask",
                 switch=("method.mlm_replace_mask=0.8", "method.mlm_replace_random=0.1")),
            Knob(name="MLM: masked tokens replaced by a random id", published=0.0, source="util/pretrain_datasets.py:36-53",
                 config="method.mlm_replace_random"),
            Knob(name="MLM: whole words", published="'##' pieces follow their word", source="util/pretrain_datasets.py:42-47",
                 cxrfast="the same (cxrfast.kernels.mask_tokens)"),
            Knob(name="MLM: which tokens may be masked", published="positions 1 .. L-2 of the padded row up to the "
                 "first [PAD]; [UNK] maskable", source="util/pretrain_datasets.py:38-40",
                 cxrfast="every word of the report; special tokens ([CLS], [PAD], [UNK], ...) never",
                 differs="the last real token of a 100-token report is maskable; [UNK] is not"),
            Knob(name="MLM loss over every position (labels = unmasked ids, [PAD] included)", published=True,
                 source="util/pretrain_datasets.py:96-99; bert/bert.py:190-191", config="method.mlm_all_positions",
                 switch=("method.mlm_all_positions=false",)),
            Knob(name="BERT layers", published=6, source=_MRM_BERT, config="model.text_depth"),
            Knob(name="BERT width", published=384, source=_MRM_BERT, config="model.text_width"),
            Knob(name="BERT heads", published=6, source=_MRM_BERT, config="model.text_heads"),
            Knob(name="BERT FFN width", published=1536, source=_MRM_BERT, config="model.text_intermediate"),
            Knob(name="BERT dropout", published=0.1, source=_MRM_BERT, config="model.text_dropout"),
            Knob(name="BERT init (xavier on every Linear, embeddings N(0, 0.02))", published="mrm",
                 source="model_mrm.py:63,87-97", config="method.text_init", switch=("method.text_init=bert",)),
            Knob(name="MLM decoder tied to the word embeddings", published=False, source="bert/bert.py:141-143",
                 config="method.text_tie_decoder", switch=("method.text_tie_decoder=true",)),
            Knob(name="image feature: mean visible patch token -> 384, added after the embedding LayerNorm",
                 published="embeddings_out", source="model_mrm.py:203-204; bert/bert.py:112",
                 config="model.text_feature_at"),
            Knob(name="loss", published="image loss + text loss", source="engine_pretrain.py:46-48",
                 cxrfast="the same (`loss_image` + `loss_text`)"),
            Knob(name="mask ratio", published=0.75, source="run.sh:7", config="method.mask_ratio"),
            Knob(name="norm-pix loss", published=True, source="run.sh:6", config="method.norm_pix_loss"),
            Knob(name="encoder", published="ViT-B/16", source=_MRM_NET, config="method.arch",
                 equivalent="mrm_vit_base_patch16"),
            Knob(name="network: embed_dim", published=768, source=_MRM_NET, config="model.embed_dim"),
            Knob(name="network: depth", published=12, source=_MRM_NET, config="model.depth"),
            Knob(name="network: num_heads", published=12, source=_MRM_NET, config="model.num_heads"),
            Knob(name="network: decoder_embed_dim", published=768, source=_MRM_NET, config="model.decoder_embed_dim"),
            Knob(name="network: decoder_depth", published=4, source=_MRM_NET, config="model.decoder_depth"),
            Knob(name="network: decoder_num_heads", published=6, source=_MRM_NET, config="model.decoder_num_heads"),
            Knob(name="predicted patch: 32 x 32 of the 448 target", published=2, source="model_mrm.py:60,105",
                 config="model.target_scale"),
            Knob(name="sin-cos position tables (omega = i / D / 2)", published="mrm", source="util/pos_embed.py:56-58",
                 config="method.pos_embed", switch=("method.pos_embed=mae",)),
            Knob(name="initialisation (encoder; decoder and BERT random)", published="mae_pretrain_vit_base.pth",
                 source="run.sh:11; README.md:53; util/misc.py:315-327", config="method.init",
                 cxrfast="a local file the user passes, nothing is downloaded; its pos_embed becomes the encoder's "
                 "table", switch=("method.init=none",)),
            Knob(name="epochs", published=200, source="run.sh:8", config="optim.epochs"),
            Knob(name="warmup epochs", published=40, source="run.sh:9", config="optim.warmup_epochs"),
            Knob(name="base lr (lr = blr x batch / 256)", published=1.5e-4, source="run.sh:10", config="optim.blr"),
            Knob(name="lr batch reference", published=256, source="main_pretrain.py:174", config="optim.lr_batch_ref"),
            Knob(name="weight decay", published=0.05, source="run.sh:10", config="optim.weight_decay"),
            Knob(name="optimizer", published="adamw", source="main_pretrain.py:189", config="optim.name"),
            Knob(name="AdamW betas", published=(0.9, 0.95), source="main_pretrain.py:189", config="optim.betas"),
            Knob(name="AdamW eps", published=1e-8, source="main_pretrain.py:189 (torch's default)", config="optim.eps"),
            Knob(name="weight-decay groups (timm add_weight_decay: 1-D and .bias exempt; tokens and BERT "
                 "embeddings decayed)", published=True, source="main_pretrain.py:188", config="method.decay_tokens",
                 switch=("method.decay_tokens=false",)),
            Knob(name="schedule", published="per-iteration linear warmup, half-cycle cosine", equivalent="warmup_cosine",
                 source="engine_pretrain.py:40-42; util/lr_sched.py:9-23", config="optim.schedule"),
            Knob(name="min lr", published=0.0, source="main_pretrain.py:71", config="optim.min_lr"),
            Knob(name="global batch (4 GPUs x 32 x 2 accumulation)", published=256, source="run.sh:1,3,4",
                 config="train.global_batch_size"),
            Knob(name="micro-batch per GPU", published=32, source="run.sh:4", config="train.batch_size",
                 differs="64 is the micro-batch of cxrfast's 12 GB-per-GPU goal; the accumulation follows from the "
                 "world size, so the global batch (and the schedule) is the published one",
                 switch=("train.batch_size=32",)),
            Knob(name="full batches only", published=True, source="main_pretrain.py:159",
                 cxrfast="yes (the trainer's loaders drop the last partial batch)"),
            Knob(name="gradient clipping", published=0.0, source="engine_pretrain.py:50 (no clip_grad)",
                 config="optim.clip_grad"),
            Knob(name="precision", published="fp16 autocast with a dynamic loss scaler", source="engine_pretrain.py:43,50",
                 cxrfast=_PRECISION, differs=_BF16_WHY, switch=("train.precision=fp32",)),
            Knob(name="checkpoint every N epochs", published=20, source="main_pretrain.py:206",
                 config="train.ckpt_every_epochs"),
            Knob(name="seed", published=0, source="main_pretrain.py:87,120 (+ rank)", config="train.seed"),
        ),
    ),
    **{p: _moco_cxr(p, arch) for p, arch in
       (("moco_cxr_r18", "resnet18"), ("moco_cxr_r50", "resnet50"), ("moco_cxr_d121", "densenet121"))},
    "mgca_vitb": _mgca("mgca_vitb"),
}


# --- the checks ---------------------------------------------------------------------------------
#: Presets that reproduce no published run (test-sized networks): they need no recipe.
TEST_PRESET_PREFIX = "tiny_"


def disagreements(recipe: PublishedRecipe, cfg: RunConfig | None = None) -> list[str]:
    """Where `cfg` (default: the recipe's preset) and the published values disagree: a config knob whose
    value is not the published one and is not declared a difference, a declared difference that is none,
    or a switch the preset refuses or that changes nothing."""
    from cxrfast.config import apply_overrides
    from cxrfast.presets import get_preset

    cfg = cfg if cfg is not None else get_preset(recipe.preset)
    out: list[str] = []
    for k in recipe.knobs:
        where = f"{recipe.preset}: {k.name} ({recipe.repo} {k.source})"
        if k.config is not None:
            value = resolve(cfg, k.config)
            if k.differs is None and value != k.expected:
                out.append(f"{where}: {k.config} is {show(value)}, published {show(k.expected)}")
            elif k.differs is not None and value == k.expected:
                out.append(f"{where}: declared a difference, but {k.config} is the published {show(value)}")
        if not k.switch:
            continue
        try:
            switched = apply_overrides(cfg, list(k.switch))
        except ValueError as e:
            out.append(f"{where}: the preset refuses the switch {' '.join(k.switch)}: {e}")
            continue
        keys = [s.partition("=")[0] for s in k.switch]
        if all(resolve(switched, key) == resolve(cfg, key) for key in keys):
            out.append(f"{where}: the switch {' '.join(k.switch)} changes nothing")
    return out


def missing_recipes() -> list[str]:
    """Presets of published runs (every preset but the test ones) without a recipe here, and recipes of
    presets that do not exist."""
    from cxrfast.presets import PRESETS

    published = {p for p in PRESETS if not p.startswith(TEST_PRESET_PREFIX)}
    return [f"preset {p!r} has no PublishedRecipe in cxrfast/published.py" for p in sorted(published - set(PUBLISHED))] + [
        f"PUBLISHED[{p!r}] names no preset" for p in sorted(set(PUBLISHED) - set(PRESETS))]


# --- the table ----------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _overrides(switch: tuple[str, ...]) -> str:
    return " ".join(f"`{s}`" for s in switch)


def render_recipe(recipe: PublishedRecipe, cfg: RunConfig) -> str:
    """The section of docs/recipes.md for one preset."""
    lines = [
        f"## `{recipe.preset}`: {recipe.system}",
        "",
        f"Published code: {recipe.repo} at commit {recipe.commit[:12]} (sources are paths and lines in that tree).",
        "",
        "| knob | published | source | cxrfast default | switch |",
        "|---|---|---|---|---|",
    ]
    for k in recipe.knobs:
        published = show(k.published)
        if k.config:
            ours = f"`{k.config}={show(resolve(cfg, k.config), override=is_override_path(k.config))}`"
            if k.cxrfast:
                ours += f" ({k.cxrfast})"
        else:
            ours = str(k.cxrfast)
        if k.differs:
            ours += f"; **differs:** {k.differs}"
        lines.append("| " + " | ".join(_cell(c) for c in (k.name, published, k.source, ours, _overrides(k.switch))) + " |")
    return "\n".join(lines) + "\n"


_INTRO = """# Recipes: the presets against the published code

Generated by `python -m cxrfast.published --write docs/recipes.md` from `cxrfast/published.py` and
`cxrfast/presets.py`; `tests/test_published.py` fails when this file, a preset and the published values
disagree. Do not edit it by hand.

Every published knob is the preset's default. A row's **switch** is the override (`key=value` after
`cxrfast train ...`) that selects the other behaviour: a cxrfast improvement where the default is the
published value, the way back to the published value where cxrfast differs (marked **differs**,
with the reason). In the cxrfast column, `path=value` is where the value
lives: a run-config path, `model.FIELD` (the network `method.arch` names) or `augmentation.NAME.FIELD`
(the augmentation the method asks the pipelines for). Rows without a path are aspects that are not
config values (precision, channel count, data).
"""


def render() -> str:
    """docs/recipes.md: the intro and one section per preset in `PUBLISHED`."""
    from cxrfast.presets import get_preset

    parts = [_INTRO]
    for preset, recipe in PUBLISHED.items():
        parts.append(render_recipe(recipe, get_preset(preset)))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cxrfast.published", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, metavar="PATH", help="write the table to PATH (docs/recipes.md)")
    mode.add_argument("--check", type=Path, metavar="PATH", help="exit 1 when PATH differs from the generated table")
    args = p.parse_args(argv)
    text = render()
    if args.write:
        tmp = args.write.with_name(f".{args.write.name}.tmp")
        tmp.write_text(text)
        tmp.replace(args.write)
        print(f"wrote {args.write} ({len(PUBLISHED)} presets, {sum(len(r.knobs) for r in PUBLISHED.values())} knobs)")
        return 0
    problems = missing_recipes() + [m for r in PUBLISHED.values() for m in disagreements(r)]
    current = args.check.read_text() if args.check.is_file() else ""
    if current != text:
        problems.append(f"{args.check} is stale: run `python -m cxrfast.published --write {args.check}`")
    for m in problems:
        print(m, file=sys.stderr)
    if problems:
        return 1
    print(f"{args.check} is up to date; the presets match the published values")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
