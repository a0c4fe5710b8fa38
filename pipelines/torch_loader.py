"""The reference backend: a plain `torch.utils.data.DataLoader` over the same tars, decoding with
PIL and augmenting with torchvision transforms in worker processes, the way the published code
loads data. It yields the same batch dict as the DALI backend; it is the correctness reference
and the benchmark baseline.

Splitting: tars (of every folder of the shard set, concatenated) are dealt to ranks
(`tars[rank::world_size]`) and then to workers, so every sample is read once per epoch across
ranks and workers; ranks may see different sample counts. Each sample is normalised with the
statistics of the folder its tar belongs to. A sample is read iff its tar's DALI index lists it,
as with DALI (a subset folder, `cxrfast.shards.subset`, indexes only some samples of each tar).
Randomness: the tar order, the shuffle buffer and the transforms are seeded from
(seed, rank, epoch, worker), so the same seed gives the same batches.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cxrfast.pipelines.augmentations import LoaderConfig, presize
from cxrfast.shards.schema import TEXTS, decode_member
from cxrfast.shards.subset import index_keys

SHUFFLE_BUFFER = 1024


def _to_tensor(mean: float, std: float) -> T.Compose:
    return T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize([mean], [std])])


_INTERP = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


def timm_rand_augment(spec: str, *, mean: float, interpolation: T.InterpolationMode) -> Callable[[Image.Image], Image.Image]:
    """timm's RandAugment transform of `spec` on PIL images, with create_transform's settings: fill =
    the mean pixel, geometric ops resampled with the augmentation's filter, translations up to 45 %."""
    from timm.data.auto_augment import rand_augment_transform

    from cxrfast.pipelines.rand_augment import parse_rand_augment

    parse_rand_augment(spec)  # the sections cxrfast reproduces, as in the DALI graph
    pil = {T.InterpolationMode.BILINEAR: Image.BILINEAR, T.InterpolationMode.BICUBIC: Image.BICUBIC}[interpolation]
    return rand_augment_transform(spec, {"translate_pct": 0.45, "img_mean": round(mean * 255), "interpolation": pil})


def build_transform(cfg: LoaderConfig, mean: float, std: float) -> Callable[[Image.Image], dict[str, torch.Tensor]]:
    """PIL grayscale image -> {"image": [1,S,S], ...} per the augmentation, normalised with (mean, std) on
    the 0..1 scale (torchvision transforms; on PIL images they resize with PIL, antialiased, as the
    published code does)."""
    r, size = cfg.augmentation, cfg.image_size
    interp = _INTERP[r.interpolation]
    tensor = _to_tensor(mean, std)
    if r.scale is not None and r.target_factor:  # MRM: one crop window, emitted at two sizes
        target = size * r.target_factor

        def mrm(img: Image.Image) -> dict[str, torch.Tensor]:
            i, j, h, w = T.RandomResizedCrop.get_params(img, list(r.scale), list(r.ratio))
            big = TF.resized_crop(img, i, j, h, w, [target, target], interpolation=interp, antialias=True)
            small = None if r.image_from_target else TF.resized_crop(
                img, i, j, h, w, [size, size], interpolation=interp, antialias=True
            )
            if r.flip and torch.rand(1).item() < 0.5:
                big = TF.horizontal_flip(big)
                small = None if small is None else TF.horizontal_flip(small)
            big_t = tensor(big)
            if small is None:  # MRM's model: Resize([224, 224], BICUBIC) on the normalised 448 tensor
                small_t = F.interpolate(big_t[None], size=[size, size], mode="bicubic", align_corners=False)[0]
            else:
                small_t = tensor(small)
            return {"image": small_t, "target": big_t}

        return mrm
    if r.scale is not None:  # MAE, fine-tuning
        steps = [T.RandomResizedCrop(size, scale=r.scale, ratio=r.ratio, interpolation=interp, antialias=True)]
        steps += [T.RandomHorizontalFlip()] if r.flip else []
        steps += [timm_rand_augment(r.rand_augment, mean=mean, interpolation=interp)] if r.rand_augment else []
        mae = T.Compose([*steps, tensor])
        return lambda img: {"image": mae(img)}
    if r.two_views:  # MoCo: one decode + resize, two independent views
        base = T.Resize(size, interpolation=interp, antialias=True)
        steps = [T.RandomHorizontalFlip()] if r.flip else []
        steps += [T.RandomRotation(r.rotate)] if r.rotate else []
        view = T.Compose([*steps, T.RandomCrop(size), tensor])

        def moco(img: Image.Image) -> dict[str, torch.Tensor]:
            img = base(img)
            return {"image": view(img), "image2": view(img)}

        return moco
    if r.name in ("mgca", "pad_crop", "eval_pad", "mgca_eval"):  # long side 256, zero pad (CenterCrop pads), crop 224
        canvas = presize(size)
        crop = T.RandomCrop(size) if r.name in ("mgca", "pad_crop") else T.CenterCrop(size)
        mgca = T.Compose([T.Resize(None, max_size=canvas, interpolation=interp, antialias=True), T.CenterCrop(canvas),
                          crop, tensor])
        return lambda img: {"image": mgca(img)}
    if r.name in ("eval", "eval_full", "resize_crop"):  # short side to 256 (eval) or to the output size, then crop
        short = presize(size) if r.name == "eval" else size
        crop = T.RandomCrop(size) if r.name == "resize_crop" else T.CenterCrop(size)
        ev = T.Compose([T.Resize(short, interpolation=interp, antialias=True), crop, tensor])
        return lambda img: {"image": ev(img)}
    raise ValueError(f"augmentation {r.name!r} has no torchvision transform")


def pad_truncate_ids(
    ids: np.ndarray, *, length: int, pad_id: int, sep_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same rule as `text.pad_truncate`: pad with pad_id, or cut and put [SEP] last (just cut without [SEP])."""
    out = np.full(length, pad_id, dtype=np.int64)
    n = min(len(ids), length)
    out[:n] = ids[:n]
    if len(ids) > length and sep_id is not None:
        out[-1] = sep_id
    mask = np.zeros(length, dtype=np.int64)
    mask[:n] = 1
    return torch.from_numpy(out), torch.from_numpy(mask)


class TarSamples(IterableDataset):
    """This rank's tars, split over DataLoader workers, decoded and augmented sample by sample."""

    def __init__(self, cfg: LoaderConfig) -> None:
        self.cfg = cfg
        self.epoch = 0
        # one transform per distinct normalisation; each tar's samples use their folder's
        transforms = {pair: build_transform(cfg, *pair) for pair in dict.fromkeys(cfg.norm.per_folder)}
        self.transform_of_tar = {
            str(tar): transforms[cfg.norm.per_folder[f]]
            for tar, f in zip(cfg.split.tars, cfg.split.folder_of_tar, strict=True)
        }
        self.special = cfg.split.special_ids if cfg.text_len is not None else None
        self.ids_member = TEXTS[cfg.text].ids if cfg.text is not None else None

    def rank_tars(self) -> list[str]:
        tars = [str(p) for p in self.cfg.split.tars]
        if self.cfg.shuffle:
            random.Random(f"{self.cfg.seed}-{self.epoch}").shuffle(tars)  # same order on every rank
        return tars[self.cfg.rank :: self.cfg.world_size]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        tars = self.rank_tars()[wid::nw]
        stages = [wds.SimpleShardList(tars), wds.tarfile_to_samples()]
        if self.cfg.shuffle:
            rng = random.Random(f"{self.cfg.seed}-{self.cfg.rank}-{self.epoch}-{wid}")
            stages.append(wds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER, rng=rng))
        listed = {str(t): index_keys(i) for t, i in zip(self.cfg.split.tars, self.cfg.split.idxs, strict=True)
                  if str(t) in tars}  # fmt: skip
        stages.insert(2, wds.select(lambda s: s["__key__"] in listed[s["__url__"]]))
        for sample in wds.DataPipeline(*stages):
            yield self.make(sample)

    def make(self, sample: dict) -> dict:
        img = Image.open(io.BytesIO(sample["jpg"])).convert("L")
        out = self.transform_of_tar[sample["__url__"]](img)
        if self.cfg.channels != 1:
            out = {k: v.expand(self.cfg.channels, -1, -1).contiguous() for k, v in out.items()}
        if self.cfg.labels:
            out["labels"] = torch.from_numpy(decode_member("labels.i8", sample["labels.i8"]).copy())
        if self.special is not None:
            ids = decode_member(self.ids_member, sample.get(self.ids_member, b""))
            out["ids"], out["attention_mask"] = pad_truncate_ids(
                ids, length=self.cfg.text_len, pad_id=self.special["pad"], sep_id=self.special.get("sep")
            )
        if self.cfg.with_keys:
            out["key"] = sample["__key__"]
        return out


class TorchLoader:
    """One epoch per `iter()`, batches on `device` in `dtype`."""

    def __init__(
        self,
        cfg: LoaderConfig,
        *,
        batch_size: int,
        num_workers: int,
        device: torch.device,
        dtype: torch.dtype,
        fp32_outputs: tuple[str, ...] = (),
        drop_last: bool = False,
    ) -> None:
        self.cfg = cfg
        self.dataset = TarSamples(cfg)
        self.batch_size = batch_size
        self.num_workers = max(1, num_workers)  # workers seed the transforms' RNG reproducibly
        self.device = device
        self.dtype = dtype
        self.fp32_outputs = frozenset(fp32_outputs)
        self.drop_last = drop_last
        if len(cfg.split.tars) < cfg.world_size:
            raise ValueError(
                f"{cfg.split.where}: split {cfg.split.split!r} has {len(cfg.split.tars)} tars, fewer than "
                f"world_size={cfg.world_size}; the torch backend deals whole tars to ranks"
            )

    def _worker_counts(self) -> list[int]:
        """Samples per worker this epoch (whole tars per worker)."""
        n = {str(t): c for t, c in zip(self.cfg.split.tars, self.cfg.split.samples_per_tar, strict=True)}
        tars = self.dataset.rank_tars()
        return [sum(n[t] for t in tars[w :: self.num_workers]) for w in range(self.num_workers)]

    def __len__(self) -> int:
        """Batches this epoch: each worker forms its own batches, so partial ones are per worker."""
        rnd = math.floor if self.drop_last else math.ceil
        return sum(rnd(c / self.batch_size) for c in self._worker_counts())

    @property
    def epoch_samples(self) -> int:
        if self.drop_last:
            return sum(c // self.batch_size * self.batch_size for c in self._worker_counts())
        return sum(self._worker_counts())

    def __iter__(self) -> Iterator[dict]:
        seed = (self.cfg.seed * 1_000_003 + self.cfg.rank * 10_007 + self.dataset.epoch) % 2**63
        gen = torch.Generator().manual_seed(seed)  # seeds each worker's torch/random RNG
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            pin_memory=self.device.type == "cuda",
            generator=gen,
            prefetch_factor=4,
        )
        for batch in loader:
            yield {k: self._to_device(k, v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        self.dataset.epoch += 1

    def _to_device(self, name: str, t: torch.Tensor) -> torch.Tensor:
        dtype = None
        if t.is_floating_point():
            dtype = torch.float32 if name in self.fp32_outputs else self.dtype
        return t.to(self.device, non_blocking=True, dtype=dtype)
