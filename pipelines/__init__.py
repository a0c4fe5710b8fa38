"""Shards -> augmented torch batches: DALI pipelines (GPU or CPU-only mode), a DataLoader
reference and a synthetic backend behind one `build_loader`. DALI and torchvision are imported
only when a backend that needs them is built."""

from cxrfast.pipelines.loader import BACKENDS, Loader, build_loader
from cxrfast.pipelines.recipes import RECIPES, Recipe

__all__ = ["BACKENDS", "RECIPES", "Loader", "Recipe", "build_loader"]
