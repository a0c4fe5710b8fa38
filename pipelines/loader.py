"""`build_loader`: one entry point for the three interchangeable backends (dali, torch, synthetic)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Protocol

import torch

from cxrfast.pipelines.augmentations import LoaderConfig, PixelNorm, get_augmentation
from cxrfast.shards.schema import DEFAULT_TEXT
from cxrfast.shards.shard_set import ShardsArg, ShardSet, open_shard_set

log = logging.getLogger(__name__)

BACKENDS = ("dali", "torch", "synthetic")
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "float32"}  # DALI output dtype


class Loader(Protocol):
    """One epoch per `iter()`; `len()` = batches per epoch on this rank."""

    epoch_samples: int

    def __iter__(self): ...

    def __len__(self) -> int: ...


def dist_env(rank: int | None, world_size: int | None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the arguments, else RANK / WORLD_SIZE / LOCAL_RANK (as the
    deepspeed and torchrun launchers set them), else (0, 1, 0)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}")
    return rank, world_size, local_rank


def rank_share(samples: int, rank: int, world_size: int) -> int:
    """Samples of part `rank` when `samples` are cut into `world_size` contiguous parts (DALI's rule)."""
    return (rank + 1) * samples // world_size - rank * samples // world_size


def pixel_norm(shards: ShardSet, mean: float | None, std: float | None,
               dataset_norms: Mapping[str, tuple[float, float]] | None = None) -> PixelNorm:
    """Each folder's normalisation: its dataset's pair in `dataset_norms`, else `mean` / `std` where
    given, else the folder's measured statistics."""
    by_dataset = dataset_norms or {}
    return PixelNorm(tuple(
        by_dataset.get(f.dataset) or (m if mean is None else mean, s if std is None else std)
        for f, (m, s) in zip(shards.folders, shards.pixel_stats_by_folder, strict=True)
    ))


def build_loader(
    shards: ShardsArg,
    split: str,
    augmentation: str,
    *,
    batch_size: int,
    backend: str = "dali",
    device: str | None = None,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle: bool = True,
    num_threads: int = 4,
    dtype: torch.dtype = torch.float32,
    fp32_outputs: tuple[str, ...] = (),
    channels: int = 1,
    mean: float | None = None,
    std: float | None = None,
    text_len: int | None = None,
    text: str | None = None,
    image_size: int | None = None,
    dataset_norms: Mapping[str, tuple[float, float]] | None = None,
    labels: bool = True,
    with_keys: bool = False,
    drop_last: bool = False,
    checkpointing: bool = False,
    checkpoint: bytes | None = None,
) -> Loader:
    """Batches of `split` of the shard folder `shards`, augmented by `augmentation`, as dicts of tensors.

    shards: a shard folder, or several (a sequence, or a `ShardSet`): their union, every sample
    of every folder once per epoch across ranks.

    backend: "dali" (GPU `mixed` decode, or DALI CPU-only mode), "torch" (DataLoader + webdataset +
    PIL/torchvision, the reference), "synthetic" (random tensors of the same shapes).
    device: "gpu" | "cpu" (default "gpu" when CUDA is available). num_threads: DALI CPU threads,
    or DataLoader workers for the torch backend. drop_last: full batches only (else the last
    batch of an epoch is partial and every sample is seen exactly once per epoch across ranks).
    checkpointing: the DALI backend can report its position (`loader.state()`, DALI's pipeline
    checkpoint: reader position and every random generator); `checkpoint` restores such a state,
    so the loader continues exactly where the saved one stopped.
    text: which report text becomes `ids` for augmentations with text outputs, a name in
    `cxrfast.shards.schema.TEXTS`: "findings_impression" (default) or "report" (the whole report,
    MRM's text).
    dtype: the floating outputs' dtype, except the image outputs named in `fp32_outputs`, which stay
    float32 (a loss target, e.g. MRM's "target", kept in full precision under bf16 training).
    mean / std: pixel normalisation on the 0..1 scale; None = each folder's measured statistics
    (`manifest.json` pixel_stats), applied to each sample by its folder. dataset_norms: {dataset:
    (mean, std)} for the folders of those datasets, over mean/std (MAE-CXR's NIH constants).
    labels: read `labels.i8` and yield `labels` (int8, one code per label name); the folders must
    share their label names. Pre-training asks for none (`DataRequest.labels`).
    """
    r = get_augmentation(augmentation)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if device is None:
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if text_len is not None and not r.needs_text:
        raise ValueError(f"augmentation {augmentation!r} has no text outputs; text_len={text_len} does not apply")
    if text is not None and not r.needs_text:
        raise ValueError(f"augmentation {augmentation!r} has no text outputs; text={text!r} does not apply")
    text_len = (text_len or r.text_len) if r.needs_text else None
    text = (text or DEFAULT_TEXT) if r.needs_text else None
    image_size = image_size or r.image_size
    outputs = r.sizes(image_size)
    unknown = sorted(set(fp32_outputs) - set(outputs))
    if unknown:
        raise ValueError(f"fp32_outputs {unknown} are not image outputs of augmentation {augmentation!r} "
                         f"({sorted(outputs)})")
    fp32_outputs = tuple(sorted(set(fp32_outputs)))
    rank, world_size, local_rank = dist_env(rank, world_size)
    torch_device = torch.device(f"cuda:{local_rank}") if device == "gpu" else torch.device("cpu")
    shards = open_shard_set(shards)
    label_names = shards.require_same_labels("build_loader(labels=True)") if labels else None
    if text is not None:
        shards.require_text(f"augmentation {augmentation!r}", text)

    if backend == "synthetic":
        from cxrfast.pipelines.synthetic import SyntheticLoader

        return SyntheticLoader(
            r,
            samples=rank_share(shards.count(split), rank, world_size),
            batch_size=batch_size,
            num_labels=None if label_names is None else len(label_names),
            device=torch_device,
            dtype=dtype,
            fp32_outputs=fp32_outputs,
            channels=channels,
            image_size=image_size,
            text_len=text_len,
            vocab_size=shards.vocab_size if text is not None else None,
            special_ids=shards.special_ids if text is not None else None,
            seed=seed + rank,
            with_keys=with_keys,
            drop_last=drop_last,
        )

    if std is not None and std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    sp = shards.split(split)
    common = dict(
        augmentation=r, split=sp, rank=rank, world_size=world_size, shuffle=shuffle, seed=seed,
        norm=pixel_norm(shards, mean, std, dataset_norms), labels=labels, channels=channels, image_size=image_size,
        text_len=text_len, text=text, with_keys=with_keys,
    )
    if backend == "torch":
        from cxrfast.pipelines.torch_loader import TorchLoader

        return TorchLoader(
            LoaderConfig(**common), batch_size=batch_size, num_workers=num_threads, device=torch_device,
            dtype=dtype, fp32_outputs=fp32_outputs, drop_last=drop_last,
        )
    from cxrfast.pipelines.dali_graph import GraphConfig
    from cxrfast.pipelines.dali_loader import DaliLoader

    graph_dtype = "float32" if fp32_outputs else _DTYPES[dtype]  # fp32 outputs: the rest is cast after
    cfg = GraphConfig(device=device, dtype=graph_dtype, **common)
    log.debug("DALI %s pipeline on %s: rank %d/%d, %d samples from %d folder(s)", augmentation, device, rank,
              world_size, sp.samples, len(shards))
    share = rank_share(sp.samples, rank, world_size)
    if drop_last and share < batch_size:
        raise ValueError(
            f"{shards.where}: split {split!r} gives rank {rank} of {world_size} {share} samples, fewer than one "
            f"batch of {batch_size} (full batches only); use a smaller batch size or fewer ranks"
        )
    return DaliLoader(
        cfg, batch_size=batch_size, num_threads=num_threads, device_id=local_rank if device == "gpu" else None,
        out_dtype=dtype, fp32_outputs=fp32_outputs, drop_last=drop_last, checkpointing=checkpointing or checkpoint is not None,
        checkpoint=checkpoint,
    )
