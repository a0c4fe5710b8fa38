"""The DALI pipeline of each augmentation: reader -> decode (+crop) -> its steps -> outputs.

One `@pipeline_def` for all augmentations; the augmentation's static Python `if`s pick the steps when the
graph is built. The same graph runs on the GPU (`mixed` nvJPEG decode, GPU ops) and in DALI's
CPU-only mode (`device_id=None`, cpu ops).
"""

from __future__ import annotations

from dataclasses import dataclass

from nvidia.dali import fn, pipeline_def
from nvidia.dali.data_node import DataNode

from cxrfast.pipelines import augment as A
from cxrfast.pipelines.augmentations import LoaderConfig, presize
from cxrfast.pipelines.reader import folder_flags, read_shards
from cxrfast.pipelines.text import pad_truncate


@dataclass(frozen=True, kw_only=True, slots=True)
class GraphConfig(LoaderConfig):
    """A `LoaderConfig` plus what only the DALI graph needs."""

    device: str  # "gpu" | "cpu"
    dtype: str  # "float32" | "float16"


def output_names(cfg: GraphConfig) -> list[str]:
    """Names of the pipeline outputs, in order (the iterator's output_map)."""
    names = list(cfg.augmentation.sizes(cfg.image_size)) + (["labels"] if cfg.labels else [])
    if cfg.text_len is not None:
        names += ["ids", "attention_mask"]
    if cfg.with_keys:
        names.append("key")
    return names


def _mean_std(jpg: DataNode, cfg: GraphConfig) -> tuple[float | DataNode, float | DataNode]:
    """The normalisation's (mean, std): constants, or per-sample values by the sample's folder."""
    common = cfg.norm.common
    if common is not None:
        return common
    terms = [(flag * m, flag * s) for flag, (m, s) in zip(folder_flags(jpg, cfg.split), cfg.norm.per_folder, strict=True)]
    mean, std = terms[0]
    for m, s in terms[1:]:
        mean, std = mean + m, std + s
    return mean, std


def _augment(jpg: DataNode, cfg: GraphConfig) -> dict[str, DataNode]:
    r, size, dev, interp = cfg.augmentation, cfg.image_size, cfg.device, cfg.augmentation.interpolation
    mean, std = _mean_std(jpg, cfg)
    norm = {"mean": mean, "std": std, "dtype": cfg.dtype}
    out: dict[str, DataNode] = {}
    if r.scale is not None:  # RandomResizedCrop (MAE, MRM): decode only the crop window
        crop = A.decode_random_crop(jpg, dev, r.scale, r.ratio)
        mirror = A.coin() if r.flip else 0
        if r.target_factor:  # MRM: the same crop and flip, at the target size
            big = A.resize_square(crop, size * r.target_factor, interp)
            small = A.halve_bicubic(big, size) if r.image_from_target else A.resize_square(crop, size, interp)
            out["image"] = A.normalize(small, mirror=mirror, **norm)
            out["target"] = A.normalize(big, mirror=mirror, **norm)
        else:
            img = A.resize_square(crop, size, interp)
            if r.rand_augment:  # timm's order: crop, flip, RandAugment (the flip is fused below; ops are symmetric)
                if cfg.norm.common is None:
                    raise ValueError("RandAugment fills with the mean pixel: it needs one pixel normalisation "
                                     f"across the set's folders, got {cfg.norm.per_folder}")
                img = A.rand_augment(img, r.rand_augment, fill=round(cfg.norm.common[0] * 255), size=size)
            out["image"] = A.normalize(img, mirror=mirror, **norm)
    elif r.two_views:  # MoCo: one decode, two independently augmented views
        base = A.resize_shorter(A.decode(jpg, dev), size, interp)
        for name in ("image", "image2"):
            view = A.rotate(base, r.rotate) if r.rotate else base
            mirror = A.coin() if r.flip else 0
            out[name] = A.normalize(view, crop=size, random_crop=True, mirror=mirror, **norm)
    elif r.name in ("mgca", "pad_crop", "eval_pad", "mgca_eval"):  # long side 256, zero pad to 256x256, crop 224
        canvas = presize(size)
        img = A.pad_square(A.resize_longer(A.decode(jpg, dev), canvas, interp), canvas)
        out["image"] = A.normalize(img, crop=size, random_crop=r.name in ("mgca", "pad_crop"), **norm)
    elif r.name == "eval":  # resize short side to 256, center crop 224
        img = A.resize_shorter(A.decode(jpg, dev), presize(size), interp)
        out["image"] = A.normalize(img, crop=size, random_crop=False, **norm)
    elif r.name in ("eval_full", "resize_crop"):  # short side to the output size, center or random crop
        img = A.resize_shorter(A.decode(jpg, dev), size, interp)
        out["image"] = A.normalize(img, crop=size, random_crop=r.name == "resize_crop", **norm)
    else:
        raise ValueError(f"augmentation {r.name!r} has no DALI graph")
    return {k: A.replicate_channels(v, cfg.channels) for k, v in out.items()}


@pipeline_def(enable_conditionals=False)
def cxr_pipeline(cfg: GraphConfig):
    """Outputs in `output_names(cfg)` order."""
    data = read_shards(
        cfg.split,
        rank=cfg.rank,
        world_size=cfg.world_size,
        shuffle=cfg.shuffle,
        seed=cfg.seed,
        labels=cfg.labels,
        text=cfg.text,
    )
    images = _augment(data["jpg"], cfg)
    on_gpu = cfg.device == "gpu"
    outs = list(images.values())
    if cfg.labels:
        outs.append(data["labels"].gpu() if on_gpu else data["labels"])
    if cfg.text_len is not None:
        special = cfg.split.special_ids
        ids, mask = pad_truncate(data["ids"], length=cfg.text_len, pad_id=special["pad"], sep_id=special.get("sep"))
        outs += [ids.gpu(), mask.gpu()] if on_gpu else [ids, mask]
    if cfg.with_keys:  # "tar:offset:KEY.jpg" as zero-padded bytes, decoded on the host
        outs.append(fn.pad(fn.get_property(data["jpg"], key="source_info"), axes=[0], fill_value=0))
    return tuple(outs)
