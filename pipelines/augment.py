"""DALI augmentation steps shared by all augmentations (plain functions on DataNodes).

`device` is "gpu" (decode with `mixed`, i.e. nvJPEG, then GPU ops) or "cpu" (DALI's CPU-only
mode). Images stay single-channel HWC uint8 until `normalize`, which writes CHW float (MRM's
encoder input, `halve_bicubic` of the target, is HWC float on the 0..255 scale before it).
Random parameters come from DALI's random ops, seeded by the pipeline seed.
"""

from __future__ import annotations

import numpy as np
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


#: The resampling filters an augmentation may name (`Augmentation.interpolation`). Both are antialiased when
#: shrinking, like PIL's resize behind torchvision's transforms on PIL images: DALI's cubic filter
#: with antialiasing matches PIL's BICUBIC within one grey level (tests/test_pipelines_crops.py).
_INTERP = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


def resize_square(img: DataNode, size: int, interpolation: str) -> DataNode:
    """Resize to size x size (aspect not kept), antialiased like torchvision on PIL images."""
    return fn.resize(img, size=[size, size], interp_type=_INTERP[interpolation], antialias=True)


def resize_shorter(img: DataNode, size: int, interpolation: str) -> DataNode:
    """Short side to `size`, aspect kept (torchvision `Resize(int)`)."""
    return fn.resize(img, resize_shorter=size, interp_type=_INTERP[interpolation], antialias=True)


def resize_longer(img: DataNode, size: int, interpolation: str) -> DataNode:
    """Long side to `size`, aspect kept."""
    return fn.resize(img, resize_longer=size, interp_type=_INTERP[interpolation], antialias=True)


def torch_bicubic_halving_taps(a: float = -0.75) -> np.ndarray:
    """The 4 weights PyTorch's bicubic (Keys kernel, a = -0.75, half-pixel centres) gives the source
    pixels 2i-1, 2i, 2i+1, 2i+2 of output pixel i when halving a side: the sampling point 2i + 0.5
    lies 1.5, 0.5, 0.5, 1.5 pixels from them."""

    def keys(x: float) -> float:
        x = abs(x)
        return (a + 2) * x**3 - (a + 3) * x**2 + 1 if x <= 1 else a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a

    return np.array([keys(1.5), keys(0.5), keys(0.5), keys(1.5)], dtype=np.float32)


def halve_bicubic(img: DataNode, size: int) -> DataNode:
    """HW1 uint8 of side 2*size -> HW1 float of side `size`, equal (to float rounding) to
    `F.interpolate(x, size, mode="bicubic", align_corners=False)` without antialiasing, i.e. MRM's
    `transforms.Resize([224, 224], BICUBIC)` on the 448 batch tensor (torchvision 0.9: no antialias
    on tensors, no clamping of floats). A 4x4 filter of those taps (edges clamped, as PyTorch clamps
    the source index), then every second pixel: nearest-neighbour at exactly half size picks source
    pixel 2i + 1, where the filter's default anchor centres the taps on 2i - 1 .. 2i + 2."""
    w = torch_bicubic_halving_taps()
    taps = fn.filter(img, np.outer(w, w), border="clamp", dtype=types.FLOAT)
    return fn.resize(taps, size=[size, size], interp_type=types.INTERP_NN, antialias=False)


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
    mean: float | DataNode,
    std: float | DataNode,
    dtype: str,
    crop: int | None = None,
    random_crop: bool = False,
    mirror: DataNode | int = 0,
) -> DataNode:
    """Optional crop (center, or uniform random position) + optional mirror + (x/255 - mean) / std,
    HWC uint8 (or float on the 0..255 scale) -> CHW `dtype`, in one fused op. `mean`/`std` are on
    the 0..1 scale: constants, or per-sample scalars (CPU DataNodes, e.g. by the sample's folder)."""
    kwargs = {}
    if crop is not None:
        pos = (fn.random.uniform(range=[0.0, 1.0]), fn.random.uniform(range=[0.0, 1.0])) if random_crop else (0.5, 0.5)
        kwargs = {"crop": [crop, crop], "crop_pos_x": pos[0], "crop_pos_y": pos[1], "out_of_bounds_policy": "pad"}
    return fn.crop_mirror_normalize(
        img,
        mean=_per_channel(mean),
        std=_per_channel(std),
        mirror=mirror,
        output_layout="CHW",
        dtype=_DTYPES[dtype],
        fill_values=[0.0],
        **kwargs,
    )


def _per_channel(value: float | DataNode) -> list[float] | DataNode:
    """A 0..1-scale mean or std as crop_mirror_normalize's one-channel 0..255 argument."""
    if isinstance(value, DataNode):
        return fn.reshape(value * 255.0, shape=[1])
    return [value * 255.0]


def replicate_channels(img: DataNode, channels: int) -> DataNode:
    """CHW with C=1 -> C=`channels` copies (3 for ImageNet-style backbones)."""
    if channels == 1:
        return img
    return fn.cat(*([img] * channels), axis=0)


#: Levels are quantised to 0.2 (timm draws them continuously): 51 bins over [0, 10]. Finer bins cost graph-build
#: time (the parameter tables are built per bin, and the trainer builds a loader per epoch): 101 bins ~1.7x.
_RA_BINS = 51


def _posterize_increasing(magnitude: float) -> np.ndarray:
    """timm PosterizeIncreasing: keep 4 - int(level * 0.4) bits (magnitude = level * 0.4); as an AND mask."""
    bits = 4 - int(magnitude + 1e-6)  # the bins are a linspace: guard int() against 1.9999...
    return np.array(np.uint8(255) ^ np.uint8(2 ** (8 - bits) - 1), dtype=np.uint8)


def _solarize_increasing(magnitude: float) -> np.ndarray:
    """timm SolarizeIncreasing: threshold 256 - min(256, int(level * 25.6)) (magnitude = level * 25.6)."""
    return np.array(256 - min(256, int(magnitude + 1e-6)), dtype=np.int32)


def _solarize_add(magnitude: float) -> np.ndarray:
    """timm SolarizeAdd: add min(128, int(level * 11)) below 128 (magnitude = level * 11)."""
    return np.array(min(128, int(magnitude + 1e-6)), dtype=np.uint8)


def rand_augment_ops(channels: int = 1) -> list:
    """timm's increasing RandAugment op set (`_RAND_INCREASING_TRANSFORMS`), in its order, as DALI
    `auto_aug` augmentations whose magnitude range at level 10 is timm's. Color (saturation) leaves a
    grayscale image unchanged, so on one channel it is the identity (kept, so every op is chosen
    with timm's probability)."""
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.pipeline import do_not_convert

    # The magnitude -> parameter tables are plain NumPy, computed once per bin while the graph is built:
    # kept out of AutoGraph's conversion (which would make the build several times slower).
    enhance, kernel = do_not_convert(a.shift_enhance_range), do_not_convert(a.sharpness_kernel)
    return [
        a.auto_contrast,
        a.equalize,
        a.invert,
        a.rotate.augmentation((0, 30), True),
        a.posterize.augmentation((0, 4), False, do_not_convert(_posterize_increasing)),
        a.solarize.augmentation((0, 256), False, do_not_convert(_solarize_increasing)),
        a.solarize_add.augmentation((0, 110), False, do_not_convert(_solarize_add)),
        a.color.augmentation((0, 0.9), True, enhance) if channels == 3 else a.identity,
        a.contrast.augmentation((0, 0.9), True, enhance),
        a.brightness.augmentation((0, 0.9), True, enhance),
        a.sharpness.augmentation((0, 0.9), True, kernel),
        a.shear_x.augmentation((0, 0.3), True),
        a.shear_y.augmentation((0, 0.3), True),
        a.translate_x.augmentation((0, 0.45), True),
        a.translate_y.augmentation((0, 0.45), True),
    ]


def rand_augment(img: DataNode, spec: str, *, fill: int, size: int) -> DataNode:
    """timm's RandAugment `spec` (e.g. rand-m6-mstd0.5-inc1) on HWC uint8 images of side `size`: per
    layer, one op chosen uniformly, applied with probability p at level m (+ Gaussian noise mstd,
    clipped to [0, 10]) with a random sign; geometric ops fill with `fill` (timm: the mean pixel) and
    interpolate bilinearly. Needs a pipeline built with `enable_conditionals=True`."""
    from nvidia.dali import math as dmath
    from nvidia.dali.auto_aug.core import select, signed_bin

    from cxrfast.pipelines.rand_augment import LEVEL_MAX, parse_rand_augment

    s = parse_rand_augment(spec)
    ops = rand_augment_ops()
    scale = (_RA_BINS - 1) / LEVEL_MAX
    for _ in range(s.n):
        op = fn.random.uniform(values=list(range(len(ops))), dtype=types.INT32)
        if s.magnitude_std > 0:
            level = dmath.clamp(fn.random.normal(mean=s.magnitude, stddev=s.magnitude_std), 0.0, LEVEL_MAX)
            level_bin = fn.cast(level * scale + 0.5, dtype=types.INT32)
        else:
            level_bin = int(round(s.magnitude * scale))
        magnitude = signed_bin(level_bin)
        if fn.random.coin_flip(probability=s.prob):
            img = select(ops, op, img, magnitude_bin=magnitude, num_magnitude_bins=_RA_BINS, fill_value=fill,
                         shape=[size, size], interp_type=types.INTERP_LINEAR)
    return img
