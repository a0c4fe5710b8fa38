"""cxrfast.eval.metrics: AUC against scikit-learn, the patient bootstrap (deterministic, paired,
covering the true AUC), on fixed and simulated arrays (no shards)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from cxrfast.eval import metrics
from cxrfast.eval.policies import MASKED
from cxrfast.shards.jit import py_func

# Fixed cases: ties across classes, all tied, perfect, inverted.
CASES = [
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]),
    ([0.5, 0.5, 0.5, 0.2, 0.9, 0.5], [1, 0, 1, 0, 1, 0]),
    ([1.0, 1.0, 1.0], [0, 1, 1]),
    ([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]),
    ([0.9, 0.8, 0.1], [0, 0, 1]),
]


@pytest.mark.parametrize(("scores", "targets"), CASES)
def test_auc_matches_sklearn_on_fixed_arrays(scores, targets) -> None:
    s, t = np.array(scores), np.array(targets)
    want = roc_auc_score(t, s)
    assert metrics.roc_auc(s, t) == pytest.approx(want, abs=1e-12)
    assert metrics.weighted_auc(s, t == 1, np.ones((1, len(s))))[0] == pytest.approx(want, abs=1e-12)


def test_auc_random_arrays_masked_entries_and_plain_python_loop() -> None:
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=300), 1)  # many ties
    t = (rng.random(300) < 0.3).astype(np.int8)
    t[::7] = MASKED
    keep = t != MASKED
    want = roc_auc_score(t[keep], s[keep])
    assert metrics.roc_auc(s, t) == pytest.approx(want, abs=1e-12)
    # the same loop run as plain Python (CXRFAST_NUMBA=0 runs it this way)
    codes, pos, start = metrics._sorted_inputs(s[keep], t[keep] == 1, np.arange(int(keep.sum())))
    out = np.empty(1)
    py_func(metrics._resample_aucs)(codes, pos, start, np.ones((1, len(codes)), dtype=np.int64), out)
    assert out[0] == pytest.approx(want, abs=1e-12)


def test_undefined_auc_is_nan_not_an_error() -> None:
    assert np.isnan(metrics.roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))
    assert np.isnan(metrics.roc_auc(np.array([0.1, 0.2]), np.array([MASKED, 0])))


def test_a_resample_equals_sklearn_on_the_resampled_samples() -> None:
    rng = np.random.default_rng(1)
    patients = np.repeat([f"p{i:02d}" for i in range(30)], 3)  # 3 images per patient
    s = rng.normal(size=90)
    t = (rng.random(90) < 0.4).astype(np.int8)
    codes, n_patients = metrics.group_codes(patients)
    counts = next(metrics.resample_counts(n_patients, 4, seed=3))
    reps = metrics.bootstrap_aucs(s[:, None], t[:, None], patients, n_boot=4, seed=3)[0, :, 0]
    for r in range(4):
        idx = np.repeat(np.arange(90), counts[r, codes])  # each image as often as its patient was drawn
        assert reps[r] == pytest.approx(roc_auc_score(t[idx], s[idx]), abs=1e-12)


def test_bootstrap_is_deterministic_per_seed_and_paired_across_prediction_sets() -> None:
    rng = np.random.default_rng(2)
    patients = np.array([f"p{i}" for i in rng.integers(0, 40, 120)])
    s = rng.normal(size=(120, 2))
    t = (rng.random((120, 2)) < 0.3).astype(np.int8)
    a = metrics.bootstrap_aucs(s, t, patients, n_boot=300, seed=7)
    b = metrics.bootstrap_aucs(s, t, patients, n_boot=300, seed=7)
    c = metrics.bootstrap_aucs(s, t, patients, n_boot=300, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    both = metrics.bootstrap_aucs(np.stack([s, s + 0.0]), t, patients, n_boot=300, seed=7)
    np.testing.assert_array_equal(both[0], both[1])  # same resamples for every prediction set
    np.testing.assert_array_equal(both[0], a[0])
    # the patient order of the input does not change the resamples (codes come from sorted ids)
    perm = rng.permutation(120)
    np.testing.assert_allclose(metrics.bootstrap_aucs(s[perm], t[perm], patients[perm], n_boot=300, seed=7), a)


def test_bootstrap_ci_covers_the_true_auc_on_simulated_data() -> None:
    """Binormal scores (AUC = Phi(d / sqrt 2)), 2 correlated images per patient: the 95% patient
    bootstrap interval covers the true AUC in most of 40 simulated test sets."""
    d = 1.0
    true_auc = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(4)
    covered = 0
    for _ in range(40):
        n_pat = 80
        y_pat = (rng.random(n_pat) < 0.4).astype(np.int8)
        y = np.repeat(y_pat, 2)
        shared = np.repeat(rng.normal(size=n_pat), 2)  # a patient effect shared by the two images
        s = d * y + (0.6 * shared + 0.8 * rng.normal(size=2 * n_pat))
        reps = metrics.bootstrap_aucs(s[:, None], y[:, None], np.repeat(np.arange(n_pat).astype(str), 2),
                                      n_boot=300, seed=int(rng.integers(1 << 30)))[0, :, 0]  # fmt: skip
        lo, hi = metrics.percentile_ci(reps, 0.95)
        covered += lo <= true_auc <= hi
    assert covered >= 34  # nominal 38 of 40


def test_percentile_ci_needs_finite_replicates() -> None:
    assert metrics.percentile_ci(np.array([np.nan] * 8 + [0.5, 0.6])) is None
    lo, hi = metrics.percentile_ci(np.linspace(0, 1, 1001), 0.9)
    assert lo == pytest.approx(0.05) and hi == pytest.approx(0.95)
