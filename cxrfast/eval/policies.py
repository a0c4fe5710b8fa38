"""Uncertain-label policies: raw label codes (1, 0, -1 uncertain, -2 not mentioned) -> training and
scoring targets (1 positive, 0 negative, -1 masked out of the loss and the AUC).

Each published code base resolves CheXpert-labeler uncertainty its own way; each way is a named
policy (docs/evaluation.md lists the source of each):

| policy  | uncertain (-1) ->                                                         |
|---------|---------------------------------------------------------------------------|
| ones    | 1 (U-Ones; MoCo-CXR's Pleural Effusion)                                    |
| zeros   | 0 (U-Zeros)                                                               |
| ignore  | masked: not in the loss, not in the AUC (U-Ignore)                        |
| mgca    | 1 for Atelectasis, Edema, Pleural Effusion; 0 for Cardiomegaly, Consolidation |
| mae-cxr | 1 for Edema, Atelectasis; 0 for every other label                         |

"Not mentioned" (-2, a blank cell) is negative under every policy (all four code bases fill
blanks with 0), unless `not_mentioned="ignore"` masks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cxrfast.shards.schema import NEGATIVE, NOT_MENTIONED, POSITIVE, UNCERTAIN

#: Target code of a label that is masked out of the loss and the AUC.
MASKED = -1
NOT_MENTIONED_RULES: tuple[str, ...] = ("negative", "ignore")
_UNDEFINED = "undefined"


@dataclass(frozen=True, kw_only=True, slots=True)
class Policy:
    """Where uncertain labels go: per label name, else `default`."""

    name: str
    doc: str
    #: label name -> target of an uncertain label (1, 0 or MASKED)
    per_label: dict[str, int] = field(default_factory=dict)
    #: target for labels not in per_label: 1, 0, MASKED, or "undefined" (an uncertain value is an error)
    default: int | str = _UNDEFINED

    def uncertain_target(self, label: str) -> int | None:
        """Target of an uncertain `label`; None when the policy does not define it."""
        if label in self.per_label:
            return self.per_label[label]
        return None if self.default == _UNDEFINED else int(self.default)


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy(name="ones", doc="uncertain -> positive (U-Ones)", default=POSITIVE),
        Policy(name="zeros", doc="uncertain -> negative (U-Zeros)", default=NEGATIVE),
        Policy(name="ignore", doc="uncertain -> masked out of loss and AUC (U-Ignore)", default=MASKED),
        Policy(
            name="mgca",
            doc="MGCA (constants.py CHEXPERT_UNCERTAIN_MAPPINGS): Atelectasis, Edema, Pleural Effusion -> 1; "
            "Cardiomegaly, Consolidation -> 0; defined for these five labels only",
            per_label={"Atelectasis": 1, "Cardiomegaly": 0, "Consolidation": 0, "Edema": 1, "Pleural Effusion": 1},
        ),
        Policy(
            name="mae-cxr",
            doc="MAE-CXR (util/dataloader_med.py CheXpert): Edema, Atelectasis -> 1; every other label -> 0",
            per_label={"Edema": 1, "Atelectasis": 1},
            default=NEGATIVE,
        ),
    )
}


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown uncertain-label policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]


def apply_policy(
    codes: np.ndarray, labels: Sequence[str], policy: Policy, *, not_mentioned: str = "negative", where: str = "labels"
) -> np.ndarray:
    """Raw codes [n, L] (int8, columns named `labels`) -> targets [n, L] int8 in {1, 0, MASKED}.

    ValueError naming `where` for a code outside {1, 0, -1, -2}, or for an uncertain value of a label
    the policy does not define."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != len(labels):
        raise ValueError(f"{where}: label codes of shape {codes.shape}, expected [n, {len(labels)}]")
    if not_mentioned not in NOT_MENTIONED_RULES:
        raise ValueError(f"not_mentioned must be one of {NOT_MENTIONED_RULES}, got {not_mentioned!r}")
    bad = ~np.isin(codes, (POSITIVE, NEGATIVE, UNCERTAIN, NOT_MENTIONED))
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise ValueError(f"{where}: row {row}, label {labels[col]!r} has code {int(codes[row, col])}; "
                         "expected 1, 0, -1 (uncertain) or -2 (not mentioned)")  # fmt: skip
    out = codes.astype(np.int8, copy=True)
    out[codes == NOT_MENTIONED] = NEGATIVE if not_mentioned == "negative" else MASKED
    for j, name in enumerate(labels):
        unc = codes[:, j] == UNCERTAIN
        if not unc.any():
            continue
        target = policy.uncertain_target(name)
        if target is None:
            raise ValueError(
                f"{where}: {int(unc.sum())} uncertain {name!r} labels, but policy {policy.name!r} defines "
                f"uncertainty only for {sorted(policy.per_label)}; choose ones, zeros or ignore (data.policy=...)"
            )
        out[unc, j] = target
    return out
