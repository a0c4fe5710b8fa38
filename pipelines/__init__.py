"""Shards -> augmented torch batches: DALI pipelines (GPU or CPU-only mode), a DataLoader
reference and a synthetic backend behind one `build_loader`. DALI and torchvision are imported
only when a backend that needs them is built."""

from cxrfast.pipelines.augmentations import AUGMENTATIONS, Augmentation
from cxrfast.pipelines.loader import BACKENDS, Loader, build_loader
from cxrfast.pipelines.resolution import TargetResolution, require_target_resolution, target_resolution

__all__ = [
    "BACKENDS",
    "AUGMENTATIONS",
    "Loader",
    "Augmentation",
    "TargetResolution",
    "build_loader",
    "require_target_resolution",
    "target_resolution",
]
