"""The evaluation folder: what is written, where, and how an interrupted evaluation resumes.

    EVAL/config.json                    resolved protocol, task, labels, encoder and shard identity
    EVAL/draws/fraction-F_draw-D.txt    the draw's train patients, one per line
    EVAL/predictions/fraction-F_draw-D.parquet
                                        per validate/test sample: split, key, subject_id, and per label
                                        `score::LABEL` (probability) and `target::LABEL` (1, 0, -1 masked)
    EVAL/runs/fraction-F_draw-D.json    the draw's training record (written last: the draw is done)
    EVAL/train/fraction-F_draw-D/       fine-tune only: the draw's trainer run (its subset shard folder,
                                        config, metrics, checkpoints, best states)
    EVAL/results.json                   every number with its split, fraction, draw, policy and views
    EVAL/label_efficiency.png, EVAL/roc.png

Everything is independent of how predictions were made: `save_draw` takes per-sample scores (a
linear probe or the fine-tune runner), and `cxrfast.eval.summary` computes all metrics from the
prediction files. A folder holding another evaluation is refused unless `overwrite`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cxrfast.eval.draws import Draw, draw_name, write_draw

log = logging.getLogger(__name__)

CONFIG = "config.json"
RESULTS = "results.json"
#: Entries of an evaluation folder that `overwrite` may remove (the feature cache stays: it is keyed).
OWNED = (CONFIG, RESULTS, "draws", "predictions", "runs", "train", "label_efficiency.png", "roc.png")
#: config.json keys that may differ when resuming (they do not change any number).
NEUTRAL_KEYS = frozenset({"protocol.run.extract_batch_size", "protocol.run.num_threads", "protocol.run.cache_dir",
                          "protocol.run.log_every", "protocol.run.ckpt_every_epochs", "protocol.run.ckpt_every_steps",
                          "command_line", "cxrfast_version"})  # fmt: skip


def _finite(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (JSON has no NaN; a diverged loss is null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> Path:
    """`path` via a temp name + rename (non-finite floats written as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_finite(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every setting that differs (neutral keys ignored)."""
    a, b = _flatten(old), _flatten(json.loads(json.dumps(new)))
    keys = sorted((set(a) | set(b)) - NEUTRAL_KEYS)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def prepare_folder(out: Path, config: dict[str, Any], *, overwrite: bool) -> bool:
    """Make `out` an evaluation folder for `config`. Returns True when resuming the same evaluation.

    ValueError when `out` holds another evaluation (listing what differs) or other files, unless
    `overwrite` (which removes only the entries an evaluation writes)."""
    cfg_path = out / CONFIG
    resume = False
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: unreadable ({e}); pass --overwrite to replace the evaluation") from e
        diff = config_differences(old, config)
        if not diff:
            resume = True
        elif not overwrite:
            raise ValueError(
                f"{out} holds another evaluation ({'; '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}); "
                "pass --overwrite to replace it, or choose another --out"
            )
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} is not empty and holds no {CONFIG}; choose an empty --out (or pass --overwrite)")
    if not resume and out.is_dir():
        for name in OWNED:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_json(cfg_path, config)
    return resume


def load_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not an evaluation folder")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class SplitScores:
    """Per-sample predictions of one split: keys, patients, scores [n, L] and targets [n, L]."""

    keys: np.ndarray
    subjects: np.ndarray
    scores: np.ndarray
    targets: np.ndarray

    def sorted(self) -> SplitScores:
        order = np.argsort(self.keys, kind="mergesort")
        return SplitScores(self.keys[order], self.subjects[order], self.scores[order], self.targets[order])


def predictions_path(folder: Path, fraction: float, index: int) -> Path:
    return folder / "predictions" / f"{draw_name(fraction, index)}.parquet"


def run_path(folder: Path, fraction: float, index: int) -> Path:
    return folder / "runs" / f"{draw_name(fraction, index)}.json"


def draw_done(folder: Path, fraction: float, index: int) -> bool:
    return run_path(folder, fraction, index).is_file() and predictions_path(folder, fraction, index).is_file()


def save_draw(folder: Path, draw: Draw, labels: Sequence[str], preds: dict[str, SplitScores],
              record: dict[str, Any]) -> None:  # fmt: skip
    """Write one draw: its patients, its per-sample predictions (validate, test), then its record."""
    write_draw(folder / "draws", draw)
    frames = []
    for split, p in preds.items():
        cols: dict[str, Any] = {"split": [split] * len(p.keys), "key": p.keys, "subject_id": p.subjects}
        for j, name in enumerate(labels):
            cols[f"score::{name}"] = p.scores[:, j].astype(np.float32)
            cols[f"target::{name}"] = p.targets[:, j].astype(np.int8)
        frames.append(pl.DataFrame(cols))
    path = predictions_path(folder, draw.fraction, draw.index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pl.concat(frames).write_parquet(tmp)
    tmp.replace(path)
    write_json(run_path(folder, draw.fraction, draw.index), record)


def load_predictions(folder: Path, fraction: float, index: int, labels: Sequence[str], split: str) -> SplitScores:
    """One draw's predictions of `split`, sorted by key; ValueError naming the file when it lacks a label."""
    path = predictions_path(folder, fraction, index)
    df = pl.read_parquet(path).filter(pl.col("split") == split)
    need = [f"{kind}::{name}" for name in labels for kind in ("score", "target")]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: lacks columns {missing}")
    if df.height == 0:
        raise ValueError(f"{path}: no {split!r} predictions")
    return SplitScores(
        df["key"].to_numpy().astype(str), df["subject_id"].to_numpy().astype(str),
        df.select([f"score::{n}" for n in labels]).to_numpy().astype(np.float64),
        df.select([f"target::{n}" for n in labels]).to_numpy().astype(np.int8),
    ).sorted()  # fmt: skip


def load_run(folder: Path, fraction: float, index: int) -> dict[str, Any]:
    return json.loads(run_path(folder, fraction, index).read_text())
