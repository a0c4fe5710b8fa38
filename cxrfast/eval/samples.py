"""The labelled samples of an evaluation, read from the shard folder's sample table (no tar is
opened): per split the keys, patients and targets of the task's labels under the uncertain-label
policy and the view filter. Patients must not cross splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from cxrfast.eval.policies import apply_policy, get_policy
from cxrfast.eval.tasks import FRONTAL_VIEWS, check_views
from cxrfast.shards.folder import ShardFolder

#: The splits an evaluation needs: heads are selected on validate and scored once on test.
EVAL_SPLITS: tuple[str, ...] = ("train", "validate", "test")


@dataclass(frozen=True)
class LabelledSplit:
    """One split's samples after the view filter, in sample-table order."""

    split: str
    keys: np.ndarray  # [n] str
    subjects: np.ndarray  # [n] str, the patient of each sample
    targets: np.ndarray  # [n, L] int8: 1, 0 or -1 (masked)
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, mask: np.ndarray) -> LabelledSplit:
        return LabelledSplit(self.split, self.keys[mask], self.subjects[mask], self.targets[mask], self.labels)


def check_patients_disjoint(table: pl.DataFrame, where: str) -> None:
    """ValueError naming `where` when a patient has samples in two splits."""
    shared = (
        table.group_by("subject_id").agg(pl.col("split").unique().sort().alias("splits"))
        .filter(pl.col("splits").list.len() > 1)
    )  # fmt: skip
    if shared.height:
        row = shared.sort("subject_id").row(0, named=True)
        raise ValueError(
            f"{where}: patient {row['subject_id']!r} has samples in splits {row['splits']} "
            f"({shared.height} patients cross splits); label fractions are drawn by patient and test must be "
            "patient-disjoint from train"
        )


def labelled_splits(
    folder: ShardFolder,
    labels: Sequence[str],
    *,
    policy: str,
    views: str,
    not_mentioned: str = "negative",
    splits: Sequence[str] = EVAL_SPLITS,
) -> dict[str, LabelledSplit]:
    """{split: LabelledSplit} for `splits`; ValueError naming the file for a missing split, a split
    the view filter empties, or a patient in two splits."""
    check_views(views)
    pol = get_policy(policy)
    have = set(folder.split_samples)
    for split in splits:
        if split not in have or folder.split_samples[split] == 0:
            raise ValueError(
                f"{folder.manifest_path}: no {split!r} samples (splits: {sorted(have)}); an evaluation trains on "
                "train, selects on validate and reports test"
            )
    table = folder.sample_table()
    where = str(folder.root / folder.manifest["sample_table"]["file"])
    check_patients_disjoint(table, where)
    if views == "frontal":
        table = table.filter(pl.col("view").str.to_uppercase().is_in(list(FRONTAL_VIEWS)))
    out = {}
    for split in splits:
        part = table.filter(pl.col("split") == split)
        if part.height == 0:
            raise ValueError(f"{where}: split {split!r} has no {views} views (views present: "
                             f"{sorted(folder.sample_table()['view'].unique().to_list())})")  # fmt: skip
        codes = part.select(list(labels)).to_numpy().astype(np.int8)
        targets = apply_policy(codes, labels, pol, not_mentioned=not_mentioned, where=f"{where} (split {split})")
        out[split] = LabelledSplit(
            split, part["key"].to_numpy().astype(str), part["subject_id"].to_numpy().astype(str), targets, tuple(labels)
        )
    return out
