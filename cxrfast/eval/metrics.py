"""ROC AUC, and its bootstrap over resamples of patients.

The AUC is the Mann-Whitney statistic with ties counted one half. A bootstrap resample of
patients is a weight per sample (how often its patient was drawn), so a resample's AUC is a
weighted sum over the samples sorted by score, with tied scores grouped: one sort per label, then
one pass per resample (`_resample_aucs`, compiled by numba behind `cxrfast.shards.jit`; 1,000
resamples of 25k samples x 14 labels take seconds). `weighted_auc` is the plain NumPy reference
the tests hold the loop to; with unit weights both equal `sklearn.metrics.roc_auc_score`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from cxrfast.eval.policies import MASKED
from cxrfast.shards.jit import jit

#: Resamples per chunk (bounds memory to chunk x samples floats).
CHUNK = 256


def weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Reference: AUC per row of `weights` [B, n] for `scores` [n] and boolean `positive` [n]; NaN
    for a row in which positives or negatives have zero total weight."""
    order = np.argsort(scores, kind="mergesort")
    s, pos_mask = scores[order], positive[order]
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first sample of each group of tied scores
    pos = np.add.reduceat(np.where(pos_mask, w, 0.0), starts, axis=1)
    neg = np.add.reduceat(np.where(pos_mask, 0.0, w), starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


@jit
def _resample_aucs(codes: np.ndarray, positive: np.ndarray, group_start: np.ndarray, counts: np.ndarray,
                   out: np.ndarray) -> None:  # fmt: skip
    """out[r] = AUC under weights counts[r, codes[i]] of the samples i, which are sorted by score;
    group_start[i] marks the first sample of a run of tied scores. NaN without both classes."""
    n = codes.shape[0]
    for r in range(counts.shape[0]):
        num = 0.0
        neg_below = 0.0
        pos_total = 0.0
        i = 0
        while i < n:
            gp = 0.0
            gn = 0.0
            j = i
            while True:
                w = counts[r, codes[j]]
                if positive[j]:
                    gp += w
                else:
                    gn += w
                j += 1
                if j == n or group_start[j]:
                    break
            num += gp * (neg_below + 0.5 * gn)
            neg_below += gn
            pos_total += gp
            i = j
        den = pos_total * neg_below
        out[r] = num / den if den > 0 else np.nan


def _sorted_inputs(scores: np.ndarray, positive: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, ...]:
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    group_start = np.r_[True, s[1:] != s[:-1]]
    return np.ascontiguousarray(codes[order]), np.ascontiguousarray(positive[order]), group_start


def roc_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """AUC of one label (targets 1/0, MASKED entries left out); NaN when a class is absent."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    keep = targets != MASKED
    n = int(keep.sum())
    out = np.empty(1)
    codes = np.arange(n, dtype=np.int64)
    _resample_aucs(*_sorted_inputs(scores[keep], targets[keep] == 1, codes), np.ones((1, n), dtype=np.int64), out)
    return float(out[0])


def auc_per_label(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """[L] AUCs of scores [n, L] against targets [n, L] (NaN where undefined)."""
    return np.array([roc_auc(scores[:, j], targets[:, j]) for j in range(targets.shape[1])])


def class_counts(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positives [L], negatives [L]) not counting masked entries."""
    return (targets == 1).sum(axis=0), (targets == 0).sum(axis=0)


def group_codes(groups: Sequence[str] | np.ndarray) -> tuple[np.ndarray, int]:
    """Patient ids -> integer codes 0..P-1 (sorted ids, so the same patients give the same codes)."""
    uniq, codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    return codes.astype(np.int64), int(uniq.size)


def resample_counts(n_groups: int, n_boot: int, seed: int, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """Chunks [b, n_groups] of how often each patient is drawn in each bootstrap resample (patients
    drawn with replacement, as many as there are)."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n_groups, size=(b, n_groups)) + (np.arange(b) * n_groups)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n_groups).reshape(b, n_groups)


def bootstrap_aucs(scores: np.ndarray, targets: np.ndarray, groups: Sequence[str] | np.ndarray, *, n_boot: int,
                   seed: int) -> np.ndarray:  # fmt: skip
    """Bootstrap AUCs resampling patients: scores [M, n, L] (M prediction sets on the same samples,
    e.g. draws or encoders: all get the SAME resamples, so differences are paired), targets [n, L]
    -> [M, n_boot, L] (NaN where a resample leaves a label without positives or negatives)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 2:
        scores = scores[None]
    m, n, n_labels = scores.shape
    if targets.shape != (n, n_labels) or len(groups) != n:
        raise ValueError(f"scores {scores.shape[1:]}, targets {targets.shape} and groups ({len(groups)}) disagree")
    codes, n_groups = group_codes(groups)
    out = np.full((m, n_boot, n_labels), np.nan)
    inputs = []  # per (label, prediction set): the samples sorted by score
    for j in range(n_labels):
        keep = targets[:, j] != MASKED
        inputs.append([_sorted_inputs(scores[i, keep, j], targets[keep, j] == 1, codes[keep]) for i in range(m)])
    row = 0
    for counts in resample_counts(n_groups, n_boot, seed):
        b = len(counts)
        for j in range(n_labels):
            for i in range(m):
                _resample_aucs(*inputs[j][i], counts, out[i, row : row + b, j])
        row += b
    return out


def percentile_ci(reps: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of the finite bootstrap replicates; None when fewer than half are finite."""
    reps = np.asarray(reps, dtype=np.float64)
    finite = reps[np.isfinite(reps)]
    if finite.size < max(1, reps.size // 2):
        return None
    a = (1 - level) / 2
    lo, hi = np.quantile(finite, [a, 1 - a])
    return float(lo), float(hi)
