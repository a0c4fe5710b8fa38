"""cxrfast.eval units without shards: uncertain-label policies, patient draws, tasks by label name,
protocol presets and overrides, refusal to select on test, and the head recovering a planted signal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from cxrfast.eval import head
from cxrfast.eval.draws import all_draws, draw_patients
from cxrfast.eval.metrics import roc_auc
from cxrfast.eval.policies import MASKED, apply_policy, get_policy
from cxrfast.eval.protocols import (
    PROTOCOLS,
    ProbeKnobs,
    Steps,
    check_fractions,
    get_protocol,
    moco_cxr_epochs,
    moco_cxr_eval_every_samples,
    mrm_steps,
    refuse_test_selection,
)
from cxrfast.eval.samples import check_patients_disjoint
from cxrfast.eval.tasks import CHEXPERT5, NIH14, get_task, task_labels
from cxrfast.shards.folder import ShardFolder

# --- uncertain-label policies -----------------------------------------------------------------
LABELS = CHEXPERT5  # Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion
P, N, U, B, M = 1, 0, -1, -2, MASKED
#: policy -> target of an uncertain value per label (in LABELS order)
UNCERTAIN_TO = {
    "ones": [P, P, P, P, P],
    "zeros": [N, N, N, N, N],
    "ignore": [M, M, M, M, M],
    "mgca": [P, N, N, P, P],  # MGCA constants.py: Atelectasis, Edema, Effusion -> 1
    "mae-cxr": [P, N, N, P, N],  # medical_mae dataloader_med.py: Edema, Atelectasis -> 1
}


@pytest.mark.parametrize("policy", sorted(UNCERTAIN_TO))
def test_policy_table(policy: str) -> None:
    codes = np.array([[P] * 5, [N] * 5, [U] * 5, [B] * 5, [P, N, U, B, U]], dtype=np.int8)
    out = apply_policy(codes, LABELS, get_policy(policy))
    want_u = UNCERTAIN_TO[policy]
    assert out[0].tolist() == [P] * 5 and out[1].tolist() == [N] * 5
    assert out[2].tolist() == want_u
    assert out[3].tolist() == [N] * 5  # not mentioned -> negative under every policy
    assert out[4].tolist() == [P, N, want_u[2], N, want_u[4]]
    masked = apply_policy(codes, LABELS, get_policy(policy), not_mentioned="ignore")
    assert masked[3].tolist() == [M] * 5


def test_policy_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"policy 'mgca' defines uncertainty only for"):
        apply_policy(np.array([[U]], dtype=np.int8), ("Pneumonia",), get_policy("mgca"), where="x.parquet")
    # a label mgca does not define is fine while it has no uncertain value
    assert apply_policy(np.array([[P], [B]], dtype=np.int8), ("Pneumonia",), get_policy("mgca")).ravel().tolist() == [P, N]
    with pytest.raises(ValueError, match=r"x.parquet: row 1, label 'Edema' has code 3"):
        apply_policy(np.array([[P], [3]], dtype=np.int8), ("Edema",), get_policy("ones"), where="x.parquet")
    with pytest.raises(ValueError, match="unknown uncertain-label policy"):
        get_policy("u-ones")


# --- draws by patient -------------------------------------------------------------------------
def _patients(n: int) -> np.ndarray:
    return np.repeat([f"pt{i:04d}" for i in range(n)], 3)  # three images each


def test_draws_by_patient_sizes_reproducible_and_nested() -> None:
    train = _patients(500)
    a = all_draws(train, (0.01, 0.1, 1.0), draws=5, seed=3)
    b = all_draws(train, (0.01, 0.1, 1.0), draws=5, seed=3)
    assert [d.patients for d in a] == [d.patients for d in b]  # reproducible per seed
    assert [d.patients for d in all_draws(train, (0.1,), 5, seed=4)] != [d.patients for d in a if d.fraction == 0.1]
    by = {(d.fraction, d.index): d for d in a}
    assert len([d for d in a if d.fraction == 1.0]) == 1 and len(by[(1.0, 0)].patients) == 500
    for i in range(5):
        small, big = set(by[(0.01, i)].patients), set(by[(0.1, i)].patients)
        assert len(small) == 5 and len(big) == 50 and small <= big and small <= set(train)
    assert len({by[(0.1, i)].patients for i in range(5)}) == 5  # the draws differ
    # images follow their patients: the image share is the patient share
    n_img = np.isin(train, by[(0.1, 2)].patients).sum()
    assert n_img == 3 * 50


def test_draw_keeps_at_least_one_patient_and_rejects_bad_fractions() -> None:
    assert len(draw_patients(_patients(20), 0.001, 0, seed=0).patients) == 1
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            check_fractions([0.1, bad])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        draw_patients(_patients(5), 1.2, 0, seed=0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        get_protocol("mgca", ["fractions=0.5,2"])


def test_patients_in_two_splits_are_an_error() -> None:
    table = pl.DataFrame({"subject_id": ["a", "b", "b", "c"], "split": ["train", "train", "test", "validate"]})
    with pytest.raises(ValueError, match=r"samples.parquet: patient 'b' has samples in splits \['test', 'train'\]"):
        check_patients_disjoint(table, "samples.parquet")
    check_patients_disjoint(table.filter(pl.col("subject_id") != "b"), "samples.parquet")


# --- tasks: labels by name ---------------------------------------------------------------------
def _folder(labels: tuple[str, ...], dataset: str = "nih") -> ShardFolder:
    return ShardFolder(Path("/shards/x"), {"dataset": dataset, "label_names": list(labels), "splits": {}})


def test_task_labels_are_found_by_name_in_any_order() -> None:
    shuffled = tuple(reversed(NIH14))
    assert task_labels(get_task("nih14"), _folder(shuffled)) == NIH14
    with pytest.raises(ValueError, match=r"/shards/x/manifest.json: task 'chexpert5' needs labels \['Pleural Effusion'\]"):
        task_labels(get_task("chexpert5"), _folder(NIH14))
    with pytest.raises(ValueError, match="unknown task"):
        get_task("chexpert13")


# --- protocols and overrides -------------------------------------------------------------------
def test_presets_build_and_overrides_apply() -> None:
    for name in PROTOCOLS:
        assert get_protocol(name).name == name
    p = get_protocol("mrm", ["policy=ones", "probe.lr=0.1", "finetune.drop_path=0.3", "fractions=1,0.5"])
    assert (p.data.policy, p.probe.lr, p.finetune.drop_path, p.data.fractions) == ("ones", 0.1, 0.3, (0.5, 1.0))
    assert PROTOCOLS["mrm"].data.policy == "mgca"  # presets are not mutated
    with pytest.raises(ValueError, match=r"unknown config key 'probe.lrr'"):
        get_protocol("mgca", ["probe.lrr=1"])
    with pytest.raises(ValueError, match=r"unknown config key 'lr'.*finetune.lr.*probe.lr"):  # ambiguous bare name
        get_protocol("mrm", ["lr=1"])
    with pytest.raises(ValueError, match="not a setting"):
        get_protocol("mgca", ["name=mrm"])
    with pytest.raises(ValueError, match="expected a int"):
        get_protocol("mgca", ["draws=two"])
    with pytest.raises(ValueError, match="has no fine-tune settings"):
        get_protocol("mgca", ["finetune.lr=1"])


def test_selecting_on_test_is_refused() -> None:
    with pytest.raises(ValueError, match="refused: choosing the epoch or checkpoint by its test score"):
        refuse_test_selection("test", "probe.select_split")
    with pytest.raises(ValueError, match="probe.select_split=test is refused"):
        get_protocol("mae-cxr", ["probe.select_split=test"])
    with pytest.raises(ValueError, match="finetune.select_split=test is refused"):
        get_protocol("mae-cxr", ["finetune.select_split=test"])
    k = get_protocol("mgca").probe
    k.select_split = "test"  # even when a caller bypasses validation, the trainer refuses
    with pytest.raises(ValueError, match="refused"):
        head.fit_head(k, head.Schedule(1, 0, 1e-3, 1, 1), None, None, dim=2, n_labels=1, seed=0,
                      device=torch.device("cpu"))  # fmt: skip


def test_schedule_rules() -> None:
    assert [moco_cxr_epochs(f) for f in (0.001, 0.01, 0.1, 0.5, 1.0)] == [500, 107, 23, 7, 5]
    assert [moco_cxr_eval_every_samples(f) for f in (0.001, 0.01, 1.0)] == [131, 1310, 8192]
    assert mrm_steps("nih14", 0.01) == Steps(3000, 50, 3e-2)
    with pytest.raises(ValueError, match="publishes step counts for fractions"):
        mrm_steps("chexpert5", 0.5)
    mgca = get_protocol("mgca").probe
    s = head.resolve_schedule(mgca, n_train=100, fraction=1.0, task="chexpert5")
    assert (s.steps_per_epoch, s.steps, s.eval_every_steps, s.lr) == (2, 100, 2, 5e-4)  # 100 // 48, drop_last
    tiny = head.resolve_schedule(mgca, n_train=10, fraction=0.01, task="chexpert5")
    assert tiny.steps_per_epoch == 1  # a draw smaller than a batch still trains
    lars = head.resolve_schedule(get_protocol("mae-cxr").probe, n_train=5000, fraction=1.0, task="chexpert5")
    assert lars.lr == pytest.approx(0.1 * 512 / 256) and lars.warmup_steps == 10 * 9


# --- the head ---------------------------------------------------------------------------------
def _fit(x: np.ndarray, y: np.ndarray, protocol: str = "mgca", **over) -> tuple[np.ndarray, head.FitResult]:
    k = get_protocol(protocol, [f"probe.{a}={b}" for a, b in over.items()]).probe
    n = len(x) // 2
    xt, yt = torch.from_numpy(x[:n]), torch.from_numpy(y[:n])
    xv, yv = torch.from_numpy(x[n:]), torch.from_numpy(y[n:])
    sched = head.resolve_schedule(k, n_train=n, fraction=1.0, task="chexpert5")
    fit = head.fit_head(k, sched, head.TensorFeed(xt, yt, k.batch_size, k.drop_last, seed=0), lambda: (xv, yv),
                        dim=x.shape[1], n_labels=y.shape[1], seed=0, device=torch.device("cpu"))  # fmt: skip
    return head.predict(fit.heads, xv), fit


#: Each protocol's head and optimiser, with a learning rate that converges on 200 samples (the published
#: rates are tuned for 10^4-10^5 images).
HEAD_CASES = {
    "mgca": {"lr": 1e-2},  # AdamW, linear head, selection on validate loss
    "mae-cxr": {"blr": 5.0, "epochs": 400},  # LARS, BatchNorm + linear head
    "moco-cxr": {"lr": 1e-2},  # Adam, top-10 ensemble
    "mrm": {"schedule_rule": "fixed", "lr": 0.5, "epochs": 50},  # SGD, warmup-cosine, grad clip
}


@pytest.mark.parametrize("protocol", sorted(HEAD_CASES))
def test_head_recovers_a_planted_signal_and_not_noise(protocol: str) -> None:
    rng = np.random.default_rng(0)
    n, dim = 400, 16
    y = (rng.random((n, 2)) < 0.3).astype(np.int64)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[:, 0] += 3.0 * y[:, 0]  # label 0 is written into feature 0; label 1 into nothing
    probs, fit = _fit(x, y, protocol, **HEAD_CASES[protocol])
    assert roc_auc(probs[:, 0], y[n // 2 :, 0]) > 0.95
    assert abs(roc_auc(probs[:, 1], y[n // 2 :, 1]) - 0.5) < 0.12
    assert fit.selected and len(fit.heads) == len(fit.selected)


def test_early_stopping_and_masked_targets() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = (rng.random((200, 1)) < 0.5).astype(np.int64)  # pure noise: the validate loss stops improving
    _, fit = _fit(x, y, epochs=200, patience=3, lr=0.5)
    assert fit.stopped_early and fit.steps_run < 200 * 2
    assert len(fit.history) >= 4
    logits = torch.tensor([[5.0, -5.0]])
    assert head.masked_bce(logits, torch.tensor([[1, MASKED]])) == pytest.approx(
        float(torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(5.0), torch.tensor(1.0))))


def test_probe_knobs_validate() -> None:
    with pytest.raises(ValueError, match="set exactly one of lr and blr"):
        ProbeKnobs(pooling="cls", optimizer="adam", batch_size=8, select_metric="val_auc", augmentation="eval")
    with pytest.raises(ValueError, match="probe.pooling"):
        get_protocol("mgca", ["pooling=avg"])
