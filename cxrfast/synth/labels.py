"""Study-level CheXpert labels with realistic prevalence, and where each finding lies.

Codes follow the label files: 1.0 positive, 0.0 negative, -1.0 uncertain, NaN blank (not
mentioned). "No Finding" is 1.0 or blank, and 1.0 only when no pathology is positive or
uncertain ("Support Devices" does not count, as in the CheXpert labeler).
"""

from __future__ import annotations

import numpy as np

from cxrfast.shards.schema import LABEL_NAMES, NUM_LABELS
from cxrfast.synth.radiograph import SIDED_LABELS, SIDES

BLANK = float("nan")
_IDX = {name: i for i, name in enumerate(LABEL_NAMES)}
NO_FINDING = _IDX["No Finding"]
SUPPORT_DEVICES = _IDX["Support Devices"]
#: Labels that make "No Finding" impossible when positive or uncertain.
PATHOLOGIES: tuple[int, ...] = tuple(i for i in range(NUM_LABELS) if i not in (NO_FINDING, SUPPORT_DEVICES))

#: (positive, uncertain, negative) rates among all studies, close to MIMIC-CXR's chexpert.csv.
MIMIC_RATES: dict[str, tuple[float, float, float]] = {
    "Enlarged Cardiomediastinum": (0.03, 0.04, 0.03),
    "Cardiomegaly": (0.20, 0.03, 0.07),
    "Lung Opacity": (0.23, 0.02, 0.02),
    "Lung Lesion": (0.03, 0.006, 0.005),
    "Edema": (0.12, 0.06, 0.12),
    "Consolidation": (0.05, 0.02, 0.12),
    "Pneumonia": (0.07, 0.08, 0.11),
    "Atelectasis": (0.20, 0.05, 0.01),
    "Pneumothorax": (0.045, 0.005, 0.19),
    "Pleural Effusion": (0.24, 0.025, 0.12),
    "Pleural Other": (0.01, 0.003, 0.001),
    "Fracture": (0.02, 0.003, 0.004),
    "Support Devices": (0.29, 0.003, 0.004),
}
MIMIC_NORMAL = 0.33  # share of studies labelled "No Finding"

#: The same for CheXpert's train.csv (sicker inpatients: more devices, opacities, effusions).
CHEXPERT_RATES: dict[str, tuple[float, float, float]] = {
    "Enlarged Cardiomediastinum": (0.05, 0.06, 0.09),
    "Cardiomegaly": (0.12, 0.04, 0.05),
    "Lung Opacity": (0.47, 0.03, 0.03),
    "Lung Lesion": (0.04, 0.006, 0.005),
    "Edema": (0.23, 0.06, 0.09),
    "Consolidation": (0.07, 0.12, 0.13),
    "Pneumonia": (0.03, 0.08, 0.01),
    "Atelectasis": (0.15, 0.15, 0.005),
    "Pneumothorax": (0.09, 0.01, 0.25),
    "Pleural Effusion": (0.39, 0.05, 0.15),
    "Pleural Other": (0.015, 0.01, 0.001),
    "Fracture": (0.04, 0.003, 0.01),
    "Support Devices": (0.52, 0.005, 0.03),
}
CHEXPERT_NORMAL = 0.10

_RATES = {"mimic": (MIMIC_RATES, MIMIC_NORMAL), "chexpert": (CHEXPERT_RATES, CHEXPERT_NORMAL)}


def sample_labels(rng: np.random.Generator, dataset: str = "mimic") -> np.ndarray:
    """One study's 14 labels (float64, CheXpert order, NaN = blank)."""
    rates, normal = _RATES[dataset]
    labels = np.full(NUM_LABELS, BLANK)
    if rng.random() < normal:
        labels[NO_FINDING] = 1.0
        for name, (_pos, _unc, neg) in rates.items():
            i = _IDX[name]
            if i == SUPPORT_DEVICES:
                labels[i] = 1.0 if rng.random() < 0.08 else BLANK
            elif rng.random() < min(0.9, neg * 2.5):  # normal reports list what is absent
                labels[i] = 0.0
        return labels
    for name, (pos, unc, neg) in rates.items():
        r = rng.random() * (1 - normal)
        labels[_IDX[name]] = 1.0 if r < pos else -1.0 if r < pos + unc else 0.0 if r < pos + unc + neg else BLANK
    # a few common co-occurrences
    if labels[_IDX["Pneumonia"]] in (1.0, -1.0) and rng.random() < 0.6:
        labels[_IDX["Lung Opacity"]] = 1.0
    if labels[_IDX["Edema"]] == 1.0 and rng.random() < 0.5:
        labels[_IDX["Cardiomegaly"]] = 1.0
    if labels[_IDX["Edema"]] == 1.0 and rng.random() < 0.4:
        labels[_IDX["Pleural Effusion"]] = 1.0
    if not np.isin(labels[list(PATHOLOGIES)], (1.0, -1.0)).any():
        names = [n for n in rates if _IDX[n] in PATHOLOGIES]
        weights = np.array([rates[n][0] for n in names])
        labels[_IDX[str(rng.choice(names, p=weights / weights.sum()))]] = 1.0
    return labels


def no_finding_consistent(labels: np.ndarray) -> bool:
    """No Finding is 1 only when no pathology is positive or uncertain, else blank."""
    sick = np.isin(labels[list(PATHOLOGIES)], (1.0, -1.0)).any()
    nf = labels[NO_FINDING]
    return bool((nf == 1.0 and not sick) or (np.isnan(nf) and sick))


def negbio_variant(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """NegBio's labels for the same report: mostly the same, with its own disagreements."""
    out = labels.copy()
    for i in PATHOLOGIES:
        r = rng.random()
        if out[i] == -1.0 and r < 0.15:
            out[i] = 1.0
        elif out[i] == 0.0 and r < 0.05:
            out[i] = BLANK
        elif np.isnan(out[i]) and r < 0.01:
            out[i] = 0.0
    sick = np.isin(out[list(PATHOLOGIES)], (1.0, -1.0)).any()
    out[NO_FINDING] = BLANK if sick else 1.0
    return out


def resolve_certain(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Expert-style labels without blanks or uncertainty (CheXpert's valid.csv): 1.0 or 0.0."""
    out = labels.copy()
    unc = out == -1.0
    out[unc] = (rng.random(int(unc.sum())) < 0.5).astype(np.float64)
    out[np.isnan(out)] = 0.0
    sick = (out[list(PATHOLOGIES)] == 1.0).any()
    out[NO_FINDING] = 0.0 if sick else 1.0
    return out


def sample_sides(labels: np.ndarray, rng: np.random.Generator) -> dict[str, str]:
    """Where each positive/uncertain one-sided finding lies (patient's right/left/bilateral)."""
    sides = {}
    for name in SIDED_LABELS:
        if labels[_IDX[name]] in (1.0, -1.0):
            bilateral = {"Pleural Effusion": 0.35, "Atelectasis": 0.35, "Pleural Other": 0.3, "Lung Opacity": 0.2,
                         "Pneumonia": 0.15, "Consolidation": 0.15}.get(name, 0.0)  # fmt: skip
            r = rng.random()
            sides[name] = "bilateral" if r < bilateral else SIDES[int(rng.random() < 0.5)]
    return sides


def format_label(value: float) -> str:
    """The label files' spelling: '1.0', '0.0', '-1.0' or '' (blank)."""
    if np.isnan(value):
        return ""
    if value not in (1.0, 0.0, -1.0):
        raise ValueError(f"label value must be 1.0, 0.0, -1.0 or blank, got {value!r}")
    return f"{value:.1f}"
