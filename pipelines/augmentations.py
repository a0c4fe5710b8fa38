"""The augmentations of the published systems (DESIGN.md's table), as plain data shared by every
backend: the DALI graph (`dali_graph.py`), the DataLoader reference (`torch_loader.py`) and the
synthetic backend read the same numbers from here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cxrfast.shards.shard_set import SetSplit


INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True, kw_only=True, slots=True)
class Augmentation:
    """One augmentation; sizes are defaults that `build_loader(image_size=, text_len=)` override."""

    name: str
    #: what the augmentation does, for --help and logs
    doc: str
    #: default output side of `image` (square)
    image_size: int
    #: default token length of `ids` / `attention_mask`; None = no text outputs
    text_len: int | None = None
    #: RandomResizedCrop area range (fraction of the image); None = no random-resized crop
    scale: tuple[float, float] | None = None
    #: RandomResizedCrop aspect-ratio range (torchvision's default)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    #: random horizontal flip with p = 0.5
    flip: bool = False
    #: random rotation range in degrees (uniform in [-rotate, rotate]); 0 = none
    rotate: float = 0.0
    #: emit `target` at target_factor * image_size from the same crop (MRM)
    target_factor: int | None = None
    #: emit `image2`, a second independently augmented view of the same decode (MoCo)
    two_views: bool = False
    #: resampling filter of every resize ("bilinear" | "bicubic"), antialiased when shrinking as
    #: PIL's resize is behind torchvision's transforms on PIL images
    interpolation: str
    #: MRM: `image` is `target` halved by PyTorch's bicubic without antialiasing (MRM resizes the
    #: 448 batch tensor to 224 in its model), not the crop resized to `image_size` on its own
    image_from_target: bool = False
    #: timm RandAugment string applied after the crop and flip (e.g. "rand-m6-mstd0.5-inc1"); None = none
    rand_augment: str | None = None

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"augmentation {self.name!r}: interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.rand_augment is not None:
            from cxrfast.pipelines.rand_augment import parse_rand_augment

            parse_rand_augment(self.rand_augment)
            if self.scale is None or self.target_factor or self.two_views:
                raise ValueError(f"augmentation {self.name!r}: rand_augment follows a single random-resized crop")
        if self.image_from_target and self.target_factor != 2:
            raise ValueError(f"augmentation {self.name!r}: image_from_target halves the target, so target_factor must be 2, "
                             f"got {self.target_factor}")

    @property
    def needs_text(self) -> bool:
        return self.text_len is not None

    def sizes(self, image_size: int | None = None) -> dict[str, int]:
        """Output side per image output, e.g. {"image": 224, "target": 448}."""
        size = image_size or self.image_size
        out = {"image": size}
        if self.target_factor:
            out["target"] = size * self.target_factor
        if self.two_views:
            out["image2"] = size
        return out


@dataclass(frozen=True, slots=True)
class PixelNorm:
    """`(x / 255 - mean) / std` with (mean, std) on the 0..1 scale for each folder of a split, in
    the split's folder order: one pair repeated (constants, or a set whose folders agree) needs
    nothing per sample; different pairs are applied per sample by the sample's folder."""

    per_folder: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if not self.per_folder:
            raise ValueError("PixelNorm needs one (mean, std) per folder")
        for mean, std in self.per_folder:
            if not std > 0 or not math.isfinite(mean):
                raise ValueError(f"pixel normalisation needs a finite mean and std > 0, got mean {mean}, std {std}")

    @property
    def common(self) -> tuple[float, float] | None:
        """The one (mean, std) of every folder, or None when folders differ."""
        first = self.per_folder[0]
        return first if all(p == first for p in self.per_folder) else None


@dataclass(frozen=True, kw_only=True, slots=True)
class LoaderConfig:
    """What the DataLoader reference backend needs besides its DataLoader arguments; the DALI
    graph's `GraphConfig` adds the DALI device and output dtype."""

    augmentation: Augmentation
    split: SetSplit
    rank: int
    world_size: int
    shuffle: bool
    seed: int
    #: pixel normalisation of each folder of `split`
    norm: PixelNorm
    #: read `labels.i8` and emit `labels`
    labels: bool
    channels: int
    image_size: int
    text_len: int | None
    #: which report text `ids` holds (a name in `schema.TEXTS`); None = no text outputs
    text: str | None
    with_keys: bool


def presize(size: int) -> int:
    """The 256-for-224 rule: side before a 224 crop (MGCA's canvas, the eval resize)."""
    return round(size * 256 / 224)


AUGMENTATIONS: dict[str, Augmentation] = {
    "mae": Augmentation(
        name="mae",
        doc="MAE-CXR: RandomResizedCrop 224 (bicubic), scale (0.5, 1.0), horizontal flip",
        image_size=224,
        scale=(0.5, 1.0),
        flip=True,
        interpolation="bicubic",  # medical_mae main_pretrain_multi_datasets_xray.py:170-171
    ),
    "finetune": Augmentation(
        name="finetune",
        doc="MRM fine-tuning: RandomResizedCrop 224 (bilinear), scale (0.08, 1.0), horizontal flip",
        image_size=224,
        scale=(0.08, 1.0),
        flip=True,
        interpolation="bilinear",  # MRM NIH_ChestX-ray/utils/data_utils.py: torchvision's defaults
    ),
    "finetune_randaug": Augmentation(
        name="finetune_randaug",
        doc="MAE-CXR fine-tuning (timm create_transform): RandomResizedCrop 224 (bicubic), scale (0.08, 1.0), "
        "horizontal flip, RandAugment rand-m6-mstd0.5-inc1",
        image_size=224,
        scale=(0.08, 1.0),
        flip=True,
        interpolation="bicubic",  # medical_mae util/datasets.py build_transform: interpolation='bicubic'
        rand_augment="rand-m6-mstd0.5-inc1",  # FINETUNE.md: --aa 'rand-m6-mstd0.5-inc1'
    ),
    "mrm": Augmentation(
        name="mrm",
        doc="MRM: RandomResizedCrop 448 (bicubic), scale (0.2, 1.0), flip = target; encoder input = the "
        "target halved by bicubic (no antialias); report ids padded/truncated to 100",
        image_size=224,
        text_len=100,
        scale=(0.2, 1.0),
        flip=True,
        target_factor=2,
        interpolation="bicubic",  # MRM main_pretrain.py:128
        image_from_target=True,  # MRM model_mrm.py:236
    ),
    "mgca": Augmentation(
        name="mgca",
        doc="MGCA: long side 256, zero pad to 256x256, random crop 224, no flip; ids to 112",
        image_size=224,
        text_len=112,
        interpolation="bilinear",  # deviation: MGCA resizes with cv2.INTER_AREA (mgca/datasets/utils.py:51-52)
    ),
    "mgca_eval": Augmentation(
        name="mgca_eval",
        doc="MGCA validation: long side 256, zero pad to 256x256, center crop 224; ids to 112",
        image_size=224,
        text_len=112,
        interpolation="bilinear",  # deviation: MGCA resizes with cv2.INTER_AREA (mgca/datasets/utils.py:51-52)
    ),
    "moco": Augmentation(
        name="moco",
        doc="MoCo-CXR: short side 320, two views each with flip, rotation +-10 deg, random crop 320",
        image_size=320,
        flip=True,
        rotate=10.0,
        two_views=True,
        interpolation="bilinear",  # torchvision Resize's default (MoCo-CXR aihc_utils/image_transform.py:10)
    ),
    "eval": Augmentation(
        name="eval",
        doc="evaluation: resize short side to 256 (for 224), center crop 224, no randomness",
        image_size=224,
        interpolation="bilinear",
    ),
    "eval_pad": Augmentation(
        name="eval_pad",
        doc="evaluation (MGCA): long side 256 (for 224), zero pad to 256x256, center crop 224",
        image_size=224,
        interpolation="bilinear",  # deviation: MGCA resizes with cv2.INTER_AREA (mgca/datasets/utils.py)
    ),
    "eval_full": Augmentation(
        name="eval_full",
        doc="evaluation (MRM, MoCo-CXR): resize short side to the output size, center crop (no 256/224 margin)",
        image_size=224,
        interpolation="bilinear",  # torchvision Resize's default (MRM utils/data_utils.py, MoCo-CXR base_dataset.py)
    ),
    "pad_crop": Augmentation(
        name="pad_crop",
        doc="MGCA classifier training: the mgca geometry (long side 256, zero pad, random crop 224) without text",
        image_size=224,
        interpolation="bilinear",  # deviation: MGCA resizes with cv2.INTER_AREA (mgca/datasets/utils.py)
    ),
    "resize_crop": Augmentation(
        name="resize_crop",
        doc="MoCo-CXR classifier training: resize short side to the output size, random crop of that size, no flip",
        image_size=320,
        interpolation="bilinear",  # torchvision Resize's default (MoCo-CXR dataset/base_dataset.py)
    ),
}


def get_augmentation(name: str) -> Augmentation:
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {sorted(AUGMENTATIONS)}")
    return AUGMENTATIONS[name]
