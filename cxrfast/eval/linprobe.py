"""The linear probe: features of the frozen encoder (extracted once per split, cached), then a head
per label fraction and draw (seconds each), selected on validate and scored once on test.

Two entry points share one engine:
- `run_linprobe(spec, shards, task, protocol, out)`: the `cxrfast eval linprobe` command (an encoder
  named by file or timm architecture; results, table and plots in `out`; resumes draw by draw);
- `probe(encoder, shards, task, cache_key=...)`: an in-memory encoder module (the in-training
  monitor), features extracted in-process, results returned (and written when `out` is given).

`augment=True` trains the head the published way instead: every epoch runs the frozen backbone over
the train split with the protocol's train augmentation (and over validate at each evaluation).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import cxrfast
from cxrfast.eval import encoders, features, head, report, results
from cxrfast.eval.draws import Draw, all_draws
from cxrfast.eval.protocols import DataKnobs, Protocol, RunKnobs, get_protocol
from cxrfast.eval.samples import LabelledSplit, labelled_splits
from cxrfast.eval.tasks import get_task, task_labels
from cxrfast.shards.folder import ShardFolder, open_shards

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Inputs:
    """How images reach the encoder, resolved from the protocol, the encoder and the machine."""

    image_size: int
    mean: float
    std: float
    norm_source: str  # override | encoder | protocol
    channels: int
    device: str  # gpu | cpu
    precision: str  # bf16 | fp32


def resolve_inputs(data: DataKnobs, run: RunKnobs, *, img_size: int | None, mean: float | None, std: float | None,
                   channels: int, where: str) -> Inputs:  # fmt: skip
    """Input side: data.image_size, else the encoder's fixed size, else the protocol's crop. Normalisation:
    data.mean/std, else the encoder's metadata, else the protocol's constants."""
    size = data.image_size or img_size or data.crop_size
    if img_size is not None and size != img_size:
        raise ValueError(f"{where}: the encoder takes {img_size}-pixel inputs (fixed position embeddings); "
                         f"data.image_size={size} does not fit")  # fmt: skip
    if data.mean is not None or data.std is not None:
        m, s, src = data.mean if data.mean is not None else data.norm_mean, data.std or data.norm_std, "override"
    elif mean is not None and std is not None:
        m, s, src = mean, std, "encoder"
    else:
        m, s, src = data.norm_mean, data.norm_std, "protocol"
    cuda = torch.cuda.is_available()
    device = ("gpu" if cuda else "cpu") if run.device == "auto" else run.device
    if device == "gpu" and not cuda:
        raise ValueError("run.device=gpu but CUDA is not available")
    precision = ("bf16" if device == "gpu" else "fp32") if run.precision == "auto" else run.precision
    return Inputs(image_size=size, mean=float(m), std=float(s), norm_source=src, channels=channels, device=device,
                  precision=precision)  # fmt: skip


def draw_seed(base: int, fraction: float, draw: int) -> int:
    """The seed of one draw's training (head or fine-tune), from data.seed, the fraction and the draw."""
    return int(np.random.SeedSequence([base, draw, round(fraction * 1_000_000)]).generate_state(1)[0])


@dataclass(kw_only=True)
class EvalSetup:
    """What a linear probe and a fine-tune evaluation both hold: the labelled shard folder, the task,
    its splits, the protocol, the resolved inputs and the output folder."""

    folder: ShardFolder
    task: str
    labels: tuple[str, ...]
    splits: dict[str, LabelledSplit]
    protocol: Protocol
    inputs: Inputs
    out: Path
    progress: bool


@dataclass(kw_only=True)
class Engine(EvalSetup):
    """Everything one linear-probe evaluation needs, opened once."""

    model: nn.Module
    identity: str
    cache_dir: Path | None
    augment: bool

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.inputs.device == "gpu" else "cpu")

    def request(self, split: str, augmentation: str | None = None) -> features.FeatureRequest:
        i = self.inputs
        return features.FeatureRequest(
            encoder=self.identity, shards=features.shards_identity(self.folder), split=split,
            augmentation=augmentation or self.protocol.data.eval_augmentation, image_size=i.image_size, mean=i.mean, std=i.std,
            channels=i.channels, pooling=self.protocol.probe.pooling, precision=i.precision, device=i.device,
            backend=self.protocol.run.backend,
        )  # fmt: skip

    def split_features(self, split: str, *, cache: bool = True) -> np.ndarray:
        """Features of the labelled samples of `split` (rows in LabelledSplit order)."""
        run = self.protocol.run
        req = self.request(split)
        feats = features.split_features(self.model, self.folder, req, cache_dir=self.cache_dir if cache else None,
                                        batch_size=run.extract_batch_size, num_threads=run.num_threads,
                                        progress=self.progress)  # fmt: skip
        return feats.take(self.splits[split].keys, f"{self.folder.root} split {split}")

    def feature_dim(self) -> int:
        i = self.inputs
        x = torch.zeros(2, i.channels, i.image_size, i.image_size, device=self.device)
        with features.frozen(self.model, self.device), torch.inference_mode():
            return int(encoders.pooled_features(self.model, x, self.protocol.probe.pooling).shape[1])

    def tensors(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y.astype(np.int64)).to(self.device)


def train_counts(split: LabelledSplit, draw: Draw, mask: np.ndarray) -> dict[str, Any]:
    """The draw's patients, images and positives/negatives per label (what results.json's undefined
    reasons are computed from)."""
    t = split.targets[mask]
    return {
        "patients": len(draw.patients), "images": int(mask.sum()),
        "label_counts": {n: [int((t[:, j] == 1).sum()), int((t[:, j] == 0).sum())] for j, n in enumerate(split.labels)},
    }  # fmt: skip


def run_draw(eng: Engine, draw: Draw, cached: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """Train, select and score the head of one draw; writes its predictions and record."""
    t0 = time.perf_counter()
    k, data = eng.protocol.probe, eng.protocol.data
    train = eng.splits["train"]
    mask = np.isin(train.subjects, np.asarray(draw.patients))
    seed = draw_seed(data.seed, draw.fraction, draw.index)
    sched = head.resolve_schedule(k, n_train=int(mask.sum()), fraction=draw.fraction, task=eng.task)
    if eng.augment:
        from cxrfast.eval.augment_probe import BackboneFeed

        feed = BackboneFeed(eng, rows={key: t for key, t in zip(train.keys[mask], train.targets[mask], strict=True)},
                            seed=seed)  # fmt: skip

        def val() -> tuple[torch.Tensor, torch.Tensor]:  # the published way: validate through the backbone
            return eng.tensors(eng.split_features("validate", cache=False), eng.splits["validate"].targets)
    else:
        xv, yv = eng.tensors(cached["validate"], eng.splits["validate"].targets)
        x, y = eng.tensors(cached["train"][mask], train.targets[mask])
        feed = head.TensorFeed(x, y, k.batch_size, k.drop_last, seed)

        def val() -> tuple[torch.Tensor, torch.Tensor]:
            return xv, yv

    dim = int(cached["validate"].shape[1]) if cached else eng.feature_dim()
    fit = head.fit_head(k, sched, feed, val, dim=dim, n_labels=len(eng.labels), seed=seed, device=eng.device,
                        progress=eng.progress)  # fmt: skip
    preds = {}
    for split in ("validate", "test"):
        xs = cached[split] if cached else eng.split_features(split, cache=False)
        s = eng.splits[split]
        preds[split] = results.SplitScores(s.keys, s.subjects, head.predict(fit.heads, eng.tensors(xs, s.targets)[0]),
                                           s.targets)  # fmt: skip
    record = {"fraction": draw.fraction, "draw": draw.index, "seed": seed, "train": train_counts(train, draw, mask),
              "schedule": asdict(sched), "fit": fit.record(), "seconds": time.perf_counter() - t0}  # fmt: skip
    results.save_draw(eng.out, draw, eng.labels, preds, record)
    sel = fit.selected[0]
    log.info("%s: %d patients, %d images, %d/%d steps, selected step %d (val loss %.4f, val AUC %s), %.1f s",
             draw.name, len(draw.patients), int(mask.sum()), fit.steps_run, sched.steps, sel.step, sel.val_loss,
             "n/a" if sel.val_auc is None else f"{sel.val_auc:.3f}", record["seconds"])  # fmt: skip
    return record


def evaluate(eng: Engine) -> dict[str, Any]:
    """Every draw of every fraction (finished ones skipped), then results.json and the plots."""
    data = eng.protocol.data
    train = eng.splits["train"]
    draws = all_draws(train.subjects, data.fractions, data.draws, data.seed)
    todo = [d for d in draws if not results.draw_done(eng.out, d.fraction, d.index)]
    if len(todo) < len(draws):
        log.info("resuming %s: %d of %d draws already done", eng.out, len(draws) - len(todo), len(draws))
    t0 = time.perf_counter()
    cached = None
    if todo and not eng.augment:
        cached = {s: eng.split_features(s) for s in ("train", "validate", "test")}
    t1 = time.perf_counter()
    for draw in todo:
        run_draw(eng, draw, cached)
    t2 = time.perf_counter()
    res = report.finish(eng.out)
    # the cost of this call (a resumed evaluation counts only what it computed)
    res["seconds"] = {"features": t1 - t0, "heads": t2 - t1, "metrics_and_plots": time.perf_counter() - t2,
                      "draws_computed": len(todo)}  # fmt: skip
    results.write_json(eng.out / results.RESULTS, res)
    return res


def folder_config(*, mode: str, task: str, labels: tuple[str, ...], folder: ShardFolder,
                  splits: dict[str, LabelledSplit], encoder: dict[str, Any], protocol: Protocol,
                  inputs: Inputs) -> dict[str, Any]:  # fmt: skip
    """config.json of an evaluation folder: what every number in it was computed under."""
    return {
        "cxrfast_version": cxrfast.__version__,
        "mode": mode,
        "task": task,
        "labels": list(labels),
        "shards": {"path": str(folder.root.resolve()), "dataset": folder.dataset,
                   "manifest_sha256": features.shards_identity(folder)},
        "split_sizes": {s: {"images": len(v), "patients": int(np.unique(v.subjects).size)} for s, v in splits.items()},
        "encoder": encoder,
        "protocol": protocol.to_dict(),
        "inputs": asdict(inputs),
        "command_line": " ".join(sys.argv),
    }  # fmt: skip


def _config(eng: Engine, encoder: dict[str, Any]) -> dict[str, Any]:
    return folder_config(mode="linprobe-augment" if eng.augment else "linprobe", task=eng.task, labels=eng.labels,
                         folder=eng.folder, splits=eng.splits, encoder=encoder, protocol=eng.protocol,
                         inputs=eng.inputs)  # fmt: skip


def _engine(model: nn.Module, identity: str, shards: Path | str | ShardFolder, task: str, protocol: Protocol, *,
            out: Path, img_size: int | None, mean: float | None, std: float | None, channels: int, augment: bool,
            progress: bool) -> Engine:  # fmt: skip
    folder = open_shards(shards)
    labels = task_labels(get_task(task), folder)
    data = protocol.data
    splits = labelled_splits(folder, labels, policy=data.policy, views=data.views, not_mentioned=data.not_mentioned)
    inputs = resolve_inputs(data, protocol.run, img_size=img_size, mean=mean, std=std, channels=channels,
                            where=str(folder.root))  # fmt: skip
    cache = Path(protocol.run.cache_dir) if protocol.run.cache_dir else out / "features"
    return Engine(model=model, identity=identity, folder=folder, task=task, labels=labels, splits=splits,
                  protocol=protocol, inputs=inputs, out=out, cache_dir=cache, augment=augment, progress=progress)


def run_linprobe(spec: encoders.EncoderSpec, shards: Path, task: str, protocol: Protocol, out: Path, *,
                 augment: bool = False, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """`cxrfast eval linprobe`: evaluate the encoder `spec` names; returns the results (also in out/results.json)."""
    enc = encoders.load(spec)
    eng = _engine(enc.module, enc.identity, shards, task, protocol, out=out, img_size=enc.img_size, mean=enc.mean,
                  std=enc.std, channels=enc.in_chans, augment=augment, progress=progress)  # fmt: skip
    results.prepare_folder(out, _config(eng, {"name": enc.name, **enc.source}), overwrite=overwrite)
    return evaluate(eng)


def probe(encoder: nn.Module, shards: Path | str | ShardFolder, task: str, *, cache_key: str,
          protocol: str | Protocol = "mgca", overrides: tuple[str, ...] = (), out: Path | None = None,
          name: str = "encoder", progress: bool = False) -> dict[str, Any]:  # fmt: skip
    """Linear-probe an in-memory encoder: a timm model (ViT or CNN), e.g. the one being trained rebuilt
    as `timm.create_model(model.timm_name, **model.timm_kwargs)` with `model.encoder_state_dict_timm()`.

    cache_key identifies the weights (e.g. "RUN@epoch-5"): features are cached under it in
    `run.cache_dir` (when set), so use a new key whenever the weights change. The input size comes
    from data.image_size or the module (ViT patch_embed), the normalisation from data.mean/std (pass
    the pre-training one) or the protocol. Results are returned; `out` keeps the evaluation folder
    (otherwise a temporary one is used and removed). The module's training mode is restored."""
    proto = get_protocol(protocol, overrides) if isinstance(protocol, str) else protocol
    size, channels = encoders.img_size_of(encoder), encoders.in_chans_of(encoder)
    with tempfile.TemporaryDirectory(prefix="cxrfast-probe-") as tmp:
        folder_out = Path(out) if out is not None else Path(tmp)
        eng = _engine(encoder, f"key:{cache_key}", shards, task, proto, out=folder_out, img_size=size, mean=None,
                      std=None, channels=channels, augment=False, progress=progress)  # fmt: skip
        if proto.run.cache_dir is None:
            eng.cache_dir = None
        results.prepare_folder(folder_out, _config(eng, {"name": name, "kind": "module", "identity": eng.identity}),
                               overwrite=out is None)  # fmt: skip
        return evaluate(eng)
