"""Every number of an evaluation, from its prediction files: per-label AUC with a bootstrap CI
over patients, the mean AUC, and over draws mean ± std.

Undefined numbers are reported as such, with a reason, never as NaN: a label whose training draw
has no positive (or no negative) is undefined for that draw; a label without both classes in the
scored split is undefined there. A draw's mean AUC averages the labels defined in it; the summary
over draws averages the labels defined in every draw of the fraction (listed as `labels_in_mean`).
Every draw of a fraction is scored on the same test patients with the same seeded resamples, so
replicates are paired across draws (and, in `compare`, across encoders): the CI of the
draw-averaged AUC is the percentile interval of the draw-averaged replicates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrfast.eval.draws import draw_indices
from cxrfast.eval.metrics import auc_per_label, bootstrap_aucs, class_counts, percentile_ci
from cxrfast.eval.results import RESULTS, draw_done, load_config, load_predictions, load_run, write_json


@dataclass
class FractionPredictions:
    """The predictions of every finished draw of one fraction on one split (aligned by key)."""

    fraction: float
    draws: list[int]
    keys: np.ndarray
    subjects: np.ndarray
    targets: np.ndarray  # [n, L]
    scores: np.ndarray  # [M, n, L]
    train_reason: list[list[str | None]]  # [M][L]: why the training draw cannot teach the label (None = it can)


def _train_reasons(run: dict[str, Any], labels: Sequence[str]) -> list[str | None]:
    out = []
    counts = run["train"]["label_counts"]
    for name in labels:
        pos, neg = counts[name]
        if pos == 0 or neg == 0:
            out.append(f"no {'positive' if pos == 0 else 'negative'} {name!r} in the training draw "
                       f"({run['train']['patients']} patients, {run['train']['images']} images)")  # fmt: skip
        else:
            out.append(None)
    return out


def load_fraction(folder: Path, cfg: dict[str, Any], fraction: float, split: str) -> FractionPredictions | None:
    """The finished draws of `fraction` in `folder` (None when none has finished)."""
    labels = cfg["labels"]
    done = [d for d in draw_indices(fraction, cfg["protocol"]["data"]["draws"]) if draw_done(folder, fraction, d)]
    if not done:
        return None
    preds = [load_predictions(folder, fraction, d, labels, split) for d in done]
    first = preds[0]
    for d, p in zip(done, preds, strict=True):
        if not np.array_equal(p.keys, first.keys) or not np.array_equal(p.targets, first.targets):
            raise ValueError(f"{folder}: draw {d} at fraction {fraction:g} scored other {split} samples than draw "
                             f"{done[0]}")  # fmt: skip
    return FractionPredictions(
        fraction, done, first.keys, first.subjects, first.targets, np.stack([p.scores for p in preds]),
        [_train_reasons(load_run(folder, fraction, d), labels) for d in done],
    )  # fmt: skip


def _split_reasons(targets: np.ndarray, labels: Sequence[str], split: str) -> list[str | None]:
    pos, neg = class_counts(targets)
    return [None if p and n else f"no {'positive' if not p else 'negative'} {name!r} in {split} ({p + n} scored)"
            for name, p, n in zip(labels, pos.tolist(), neg.tolist(), strict=True)]  # fmt: skip


def _num(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _ci(reps: np.ndarray, level: float) -> list[float] | None:
    ci = percentile_ci(reps, level)
    return None if ci is None else [ci[0], ci[1]]


def fraction_numbers(fp: FractionPredictions, labels: Sequence[str], *, split: str, boot: int, seed: int,
                     level: float, reps: np.ndarray | None = None, with_ci: bool = True) -> dict[str, Any]:  # fmt: skip
    """Records (per draw) and summary rows (over draws) of one fraction on one split."""
    m = len(fp.draws)
    split_reason = _split_reasons(fp.targets, labels, split)
    reason = [[fp.train_reason[i][j] or split_reason[j] for j in range(len(labels))] for i in range(m)]
    defined = np.array([[r is None for r in row] for row in reason])
    point = np.stack([auc_per_label(fp.scores[i], fp.targets) for i in range(m)])
    if with_ci and reps is None:
        reps = bootstrap_aucs(fp.scores, fp.targets, fp.subjects, n_boot=boot, seed=seed)
    pos, neg = class_counts(fp.targets)
    records, summary = [], []
    for i, d in enumerate(fp.draws):
        for j, name in enumerate(labels):
            ok = defined[i, j]
            records.append({
                "split": split, "fraction": fp.fraction, "draw": d, "label": name,
                "auc": _num(point[i, j]) if ok else None,
                "ci": _ci(reps[i, :, j], level) if ok and reps is not None else None,
                "positives": int(pos[j]), "negatives": int(neg[j]), "undefined": reason[i][j],
            })  # fmt: skip
        cols = np.flatnonzero(defined[i])
        records.append({
            "split": split, "fraction": fp.fraction, "draw": d, "label": "mean",
            "auc": _num(point[i, cols].mean()) if cols.size else None,
            "ci": _ci(reps[i][:, cols].mean(axis=1), level) if cols.size and reps is not None else None,
            "labels_in_mean": [labels[c] for c in cols],
            "undefined": None if cols.size else "no label is defined in this draw",
        })  # fmt: skip
    for j, name in enumerate(labels):
        rows = np.flatnonzero(defined[:, j])
        vals = point[rows, j]
        summary.append({
            "split": split, "fraction": fp.fraction, "label": name, "n_draws": int(rows.size),
            "mean": _num(vals.mean()) if rows.size else None,
            "std": _num(vals.std(ddof=1)) if rows.size > 1 else (0.0 if rows.size else None),
            "ci": _ci(reps[rows, :, j].mean(axis=0), level) if rows.size and reps is not None else None,
            "positives": int(pos[j]), "negatives": int(neg[j]),
            "undefined": None if rows.size else next(r for r in (reason[i][j] for i in range(m)) if r),
        })  # fmt: skip
    common = np.flatnonzero(defined.all(axis=0))
    per_draw = point[:, common].mean(axis=1) if common.size else np.array([])
    summary.append({
        "split": split, "fraction": fp.fraction, "label": "mean", "n_draws": m if common.size else 0,
        "mean": _num(per_draw.mean()) if common.size else None,
        "std": _num(per_draw.std(ddof=1)) if m > 1 and common.size else (0.0 if common.size else None),
        "ci": _ci(reps[:, :, common].mean(axis=2).mean(axis=0), level) if common.size and reps is not None else None,
        "labels_in_mean": [labels[c] for c in common],
        "undefined": None if common.size else "no label is defined in every draw",
    })  # fmt: skip
    return {"records": records, "summary": summary}


def summarize(folder: Path) -> dict[str, Any]:
    """Compute every number of the evaluation in `folder` and write results.json."""
    cfg = load_config(folder)
    data = cfg["protocol"]["data"]
    labels = cfg["labels"]
    out: dict[str, Any] = {
        "task": cfg["task"], "labels": labels, "policy": data["policy"], "views": data["views"],
        "not_mentioned": data["not_mentioned"], "protocol": cfg["protocol"]["name"], "encoder": cfg["encoder"]["name"],
        "mode": cfg["mode"], "boot": data["boot"], "ci_level": data["ci"], "seed": data["seed"],
        "records": [], "summary": [], "missing_draws": [],
    }  # fmt: skip
    for fraction in data["fractions"]:
        for split, with_ci in (("test", True), ("validate", False)):
            fp = load_fraction(folder, cfg, fraction, split)
            if fp is None:
                continue
            nums = fraction_numbers(fp, labels, split=split, boot=data["boot"], seed=data["seed"], level=data["ci"],
                                    with_ci=with_ci)  # fmt: skip
            out["records"] += nums["records"]
            out["summary"] += nums["summary"]
        out["missing_draws"] += [{"fraction": fraction, "draw": d}
                                 for d in draw_indices(fraction, data["draws"]) if not draw_done(folder, fraction, d)]
    for row in out["records"] + out["summary"]:  # every number carries what it was computed under
        row.update(policy=data["policy"], views=data["views"])
    write_json(folder / RESULTS, out)
    return out
