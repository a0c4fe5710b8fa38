"""Fused Triton kernels for ViT masking and reconstruction, each with its plain-PyTorch reference.

Every op takes `impl="auto" | "triton" | "reference"`; "auto" runs Triton on CUDA tensors and the
reference elsewhere. The references (`*_reference`) are the single source of truth for tests and
benchmarks.
"""

from .masked_patch_mse import masked_patch_mse, masked_patch_mse_reference, patchify
from .mlm_masking import IGNORE_INDEX, mask_tokens, mask_tokens_reference
from .random_masking import Masked, keep_count, random_masking, random_masking_reference

__all__ = [
    "IGNORE_INDEX",
    "Masked",
    "keep_count",
    "mask_tokens",
    "mask_tokens_reference",
    "masked_patch_mse",
    "masked_patch_mse_reference",
    "patchify",
    "random_masking",
    "random_masking_reference",
]
