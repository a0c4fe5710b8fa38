"""Frozen-encoder features of a whole split, extracted once through the DALI pipeline and cached.

The cache key (`FeatureRequest.digest`) covers everything that changes a feature: the encoder's
identity (its file's sha256), the shard folder (its manifest's sha256), the split, the pipeline
augmentation, input size, normalisation, channels, pooling, precision, device and loader backend. A
changed encoder file therefore never reuses a stale cache. Files: `CACHE/{split}-{digest}.npz`
(keys + float32 features) beside `{split}-{digest}.json` (the request), written to a temp name and
renamed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxrfast.eval.encoders import pooled_features
from cxrfast.shards.folder import ShardFolder

log = logging.getLogger(__name__)

#: Bumped when the cache file layout or the pooling code changes meaning.
FEATURE_FORMAT = 1


def shards_identity(folder: ShardFolder) -> str:
    """sha256 of the folder's manifest.json (it lists every tar's sha256)."""
    return hashlib.sha256(folder.manifest_path.read_bytes()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class FeatureRequest:
    """Everything that changes the features of one split: the cache key."""

    encoder: str  # encoder identity: sha256:<file hash>, random:<arch...>, or a caller's cache key
    shards: str  # sha256 of manifest.json
    split: str
    augmentation: str  # pipelines augmentation (eval geometry)
    image_size: int
    mean: float
    std: float
    channels: int
    pooling: str
    precision: str  # bf16 | fp32
    device: str  # gpu | cpu
    backend: str  # dali | torch
    format: int = FEATURE_FORMAT

    def digest(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Features:
    """Features of one split, one row per sample key."""

    keys: np.ndarray  # [n] str
    values: np.ndarray  # [n, D] float32

    def take(self, keys: np.ndarray, where: str) -> np.ndarray:
        """Rows for `keys`, in that order; ValueError naming `where` for a key without features."""
        index = {k: i for i, k in enumerate(self.keys.tolist())}
        missing = [k for k in keys.tolist() if k not in index]
        if missing:
            raise ValueError(f"{where}: {len(missing)} samples of the sample table have no features "
                             f"(e.g. {missing[:3]}); the tars and samples.parquet disagree")  # fmt: skip
        return self.values[[index[k] for k in keys.tolist()]]


@contextmanager
def frozen(model: nn.Module, device: torch.device):
    """`model` in eval mode on `device` for the block; its training flag restored afterwards (the
    in-training monitor hands in a module that is being trained)."""
    was_training = model.training
    model.eval()
    try:
        yield model.to(device)
    finally:
        model.train(was_training)


def extract(model: nn.Module, folder: ShardFolder, req: FeatureRequest, *, batch_size: int, num_threads: int,
            progress: bool = True) -> Features:  # fmt: skip
    """Run the frozen `model` over every sample of `req.split` (no shuffle, one rank)."""
    from cxrfast.pipelines import build_loader
    from cxrfast.progress import progress as reporter

    loader = build_loader(
        folder, req.split, req.augmentation, batch_size=batch_size, backend=req.backend, device=req.device, seed=0,
        rank=0, world_size=1, shuffle=False, num_threads=num_threads, channels=req.channels, mean=req.mean,
        std=req.std, image_size=req.image_size, with_keys=True,
    )  # fmt: skip
    device = torch.device("cuda" if req.device == "gpu" else "cpu")
    keys: list[str] = []
    chunks: list[torch.Tensor] = []
    t0 = time.perf_counter()
    total = folder.split_samples[req.split]
    with frozen(model, device), torch.inference_mode(), reporter(f"features {req.split}", total, "img",
                                                                 enabled=progress) as bar:
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=req.precision == "bf16"):
                f = pooled_features(model, x, req.pooling)
            chunks.append(f.float().cpu())
            keys.extend(batch["key"])
            bar.update(len(batch["key"]))
    values = torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), np.float32)
    if len(keys) != total or len(set(keys)) != len(keys):
        raise ValueError(f"{folder.manifest_path}: split {req.split!r} yielded {len(keys)} samples "
                         f"({len(set(keys))} distinct keys), the manifest lists {total}")  # fmt: skip
    dt = time.perf_counter() - t0
    (log.debug if progress else log.info)("features %s: %d x %d in %.1f s (%.0f img/s)", req.split, *values.shape, dt,
                                          len(keys) / max(dt, 1e-9))  # fmt: skip
    return Features(np.asarray(keys, dtype=str), values.astype(np.float32, copy=False))


def cache_paths(cache_dir: Path, req: FeatureRequest) -> tuple[Path, Path]:
    stem = f"{req.split}-{req.digest()}"
    return cache_dir / f"{stem}.npz", cache_dir / f"{stem}.json"


def load_cached(cache_dir: Path, req: FeatureRequest) -> Features | None:
    """The cached features of `req`, or None when there are none (or they do not match the request)."""
    npz, meta = cache_paths(cache_dir, req)
    if not (npz.is_file() and meta.is_file()):
        return None
    if json.loads(meta.read_text()) != dataclasses.asdict(req):
        log.warning("%s does not describe this request; recomputing", meta)
        return None
    with np.load(npz) as z:
        return Features(z["keys"].astype(str), z["values"])


def save_cached(cache_dir: Path, req: FeatureRequest, feats: Features) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    npz, meta = cache_paths(cache_dir, req)
    tmp = npz.with_name(f".{npz.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, keys=feats.keys, values=feats.values)
    tmp.replace(npz)
    tmp_meta = meta.with_name(f".{meta.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(dataclasses.asdict(req), indent=2, sort_keys=True) + "\n")
    tmp_meta.replace(meta)
    return npz


def split_features(model: nn.Module, folder: ShardFolder, req: FeatureRequest, *, cache_dir: Path | None,
                   batch_size: int, num_threads: int, progress: bool = True) -> Features:  # fmt: skip
    """Features of `req.split`: from `cache_dir` when cached, else extracted (and cached)."""
    if cache_dir is not None:
        hit = load_cached(cache_dir, req)
        if hit is not None:
            log.info("features %s: cached (%s)", req.split, cache_paths(cache_dir, req)[0])
            return hit
    feats = extract(model, folder, req, batch_size=batch_size, num_threads=num_threads, progress=progress)
    if cache_dir is not None:
        save_cached(cache_dir, req, feats)
    return feats
