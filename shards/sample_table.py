"""The sample table: one row per written sample, readable with polars without opening a tar.

Columns, in order: `key`, `split`, `tar` (file name), `subject_id` (the patient), `study_id`,
`image_id`, `view`, `sex`, `age`, then one Int8 column per label, named as the manifest's
`label_names` and in that order (codes 1 positive, 0 negative, -1 uncertain, -2 not mentioned).
Rows are in tar order, and within a tar in sample order. Label fractions are drawn by patient
from it (`cxrfast eval`).
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from cxrfast.shards.schema import SAMPLE_TABLE_COLUMNS


def build_sample_table(
    planned: pl.DataFrame, plans: Sequence, skipped_keys: set[str], label_names: Sequence[str]
) -> pl.DataFrame:
    """The rows of `planned` (the planned, shuffled metadata table, tars are contiguous slices of it
    as `plans` say) that were written, i.e. whose key is not in `skipped_keys`."""
    tar_col = [""] * planned.height
    for p in plans:
        tar_col[p.start : p.stop] = [p.name] * p.size
    table = planned.with_columns(pl.Series("tar", tar_col, dtype=pl.Utf8))
    if skipped_keys:
        table = table.filter(~pl.col("key").is_in(list(skipped_keys)))
    labels = [pl.col("labels").list.get(i).cast(pl.Int8).alias(name) for i, name in enumerate(label_names)]
    fixed = [pl.col(c).cast(pl.Utf8) for c in SAMPLE_TABLE_COLUMNS if c != "age"]
    out = table.select(*fixed, pl.col("age").cast(pl.Int32), *labels)
    return out.select(*SAMPLE_TABLE_COLUMNS, *label_names)


def check_sample_table(table: pl.DataFrame, label_names: Sequence[str], where: str) -> None:
    """ValueError naming `where` when the table lacks a column of the contract."""
    missing = [c for c in (*SAMPLE_TABLE_COLUMNS, *label_names) if c not in table.columns]
    if missing:
        raise ValueError(f"{where}: sample table lacks columns {missing} (has {table.columns})")
