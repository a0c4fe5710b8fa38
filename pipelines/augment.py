"""DALI augmentation steps shared by all recipes (plain functions on DataNodes).

`device` is "gpu" (decode with `mixed`, i.e. nvJPEG, then GPU ops) or "cpu" (DALI's CPU-only
mode). Images stay single-channel HWC uint8 until `normalize`, which writes CHW float.
Random parameters come from DALI's random ops, seeded by the pipeline seed.
"""

from __future__ import annotations

from nvidia.dali import fn, types
from nvidia.dali.data_node import DataNode

_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16}


def _decoder_device(device: str) -> str:
    return "mixed" if device == "gpu" else "cpu"


def decode(jpg: DataNode, device: str) -> DataNode:
    """Whole JPEG -> HW1 uint8, straight to grayscale."""
    return fn.decoders.image(jpg, device=_decoder_device(device), output_type=types.GRAY)


def decode_random_crop(
    jpg: DataNode, device: str, scale: tuple[float, float], ratio: tuple[float, float]
) -> DataNode:
    """RandomResizedCrop's window (area fraction in `scale`, aspect in `ratio`, 10 attempts, then
    a center crop), decoding only that window (fused ROI decode)."""
    return fn.decoders.image_random_crop(
        jpg,
        device=_decoder_device(device),
        output_type=types.GRAY,
        random_area=list(scale),
        random_aspect_ratio=list(ratio),
        num_attempts=10,
    )


def resize_square(img: DataNode, size: int) -> DataNode:
    """Resize to size x size (aspect not kept), bilinear with antialiasing like torchvision."""
    return fn.resize(img, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)


def resize_shorter(img: DataNode, size: int) -> DataNode:
    """Short side to `size`, aspect kept (torchvision `Resize(int)`)."""
    return fn.resize(img, resize_shorter=size, interp_type=types.INTERP_LINEAR, antialias=True)


def resize_longer(img: DataNode, size: int) -> DataNode:
    """Long side to `size`, aspect kept."""
    return fn.resize(img, resize_longer=size, interp_type=types.INTERP_LINEAR, antialias=True)


def pad_square(img: DataNode, size: int) -> DataNode:
    """Zero-pad (centered) to size x size; the image must not be larger than that."""
    return fn.crop(img, crop=[size, size], crop_pos_x=0.5, crop_pos_y=0.5, out_of_bounds_policy="pad", fill_values=0)


def rotate(img: DataNode, degrees: float) -> DataNode:
    """Rotate by a uniform angle in [-degrees, degrees], same size, zero fill, nearest neighbour:
    torchvision `RandomRotation(degrees)` with its defaults, as MoCo-CXR uses it."""
    angle = fn.random.uniform(range=[-degrees, degrees])
    return fn.rotate(img, angle=angle, keep_size=True, fill_value=0, interp_type=types.INTERP_NN)


def coin() -> DataNode:
    """A per-sample 0/1 flag with p = 0.5 (for a horizontal flip)."""
    return fn.random.coin_flip(probability=0.5)


def normalize(
    img: DataNode,
    *,
    mean: float,
    std: float,
    dtype: str,
    crop: int | None = None,
    random_crop: bool = False,
    mirror: DataNode | int = 0,
) -> DataNode:
    """Optional crop (center, or uniform random position) + optional mirror + (x/255 - mean) / std,
    HWC uint8 -> CHW `dtype`, in one fused op. `mean`/`std` are on the 0..1 scale."""
    kwargs = {}
    if crop is not None:
        pos = (fn.random.uniform(range=[0.0, 1.0]), fn.random.uniform(range=[0.0, 1.0])) if random_crop else (0.5, 0.5)
        kwargs = {"crop": [crop, crop], "crop_pos_x": pos[0], "crop_pos_y": pos[1], "out_of_bounds_policy": "pad"}
    return fn.crop_mirror_normalize(
        img,
        mean=[mean * 255.0],
        std=[std * 255.0],
        mirror=mirror,
        output_layout="CHW",
        dtype=_DTYPES[dtype],
        fill_values=[0.0],
        **kwargs,
    )


def replicate_channels(img: DataNode, channels: int) -> DataNode:
    """CHW with C=1 -> C=`channels` copies (3 for ImageNet-style backbones)."""
    if channels == 1:
        return img
    return fn.cat(*([img] * channels), axis=0)
