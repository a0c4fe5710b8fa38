"""What both datasets' metadata readers share: CSV checks, label mapping by column name, views."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from cxrfast.shards.schema import LABEL_NAMES, NOT_MENTIONED

#: Columns of the per-row table every metadata reader returns (one row per image), in order.
ROW_COLUMNS: tuple[str, ...] = (
    "key", "subject_id", "study_id", "image_id", "view", "split", "sex", "age", "source_path", "labels",
)  # fmt: skip


def require_csv(path: Path, required: Sequence[str]) -> list[str]:
    """The header of a CSV (.csv or .csv.gz); ValueError naming the file and missing columns."""
    if not path.is_file():
        raise ValueError(f"missing CSV {path}")
    try:
        columns = pl.read_csv(path, n_rows=0, infer_schema_length=0).columns
    except Exception as e:  # polars raises several error types for unreadable input
        raise ValueError(f"cannot read CSV {path}: {e}") from e
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (has {columns})")
    return columns


def read_csv(path: Path, columns: Sequence[str]) -> pl.DataFrame:
    """Read only `columns` of a checked CSV, everything as strings (we parse what we use)."""
    require_csv(path, columns)
    return pl.read_csv(path, columns=list(columns), infer_schema_length=0)


def label_codes_expr(path: Path) -> pl.Expr:
    """The 14 label columns (picked by NAME, in CheXpert's order) -> one list[i8] column `labels`:
    1.0/0.0/-1.0 -> 1/0/-1, blank -> -2. Any other value raises when collected."""
    exprs = []
    for name in LABEL_NAMES:
        v = pl.col(name).str.strip_chars().cast(pl.Float64, strict=True)
        exprs.append(pl.when(v.is_null()).then(pl.lit(NOT_MENTIONED)).otherwise(v).cast(pl.Int8))
    return pl.concat_list(exprs).alias("labels")


def check_label_values(df: pl.DataFrame, path: Path) -> None:
    """ValueError naming the file and column when a label cell is not 1/0/-1/blank."""
    for name in LABEL_NAMES:
        col = df[name].str.strip_chars()
        bad = df.filter(col.is_not_null() & (col != "") & ~col.cast(pl.Float64, strict=False).is_in([1.0, 0.0, -1.0]))
        if bad.height:
            raise ValueError(
                f"{path}: column {name!r} holds {bad[name][0]!r} (row {bad.row(0)}); expected 1.0, 0.0, -1.0 or blank"
            )


def parse_views(views: str | Sequence[str]) -> tuple[str, ...] | None:
    """'PA,AP' -> ('PA', 'AP'); 'all' -> None (keep every view)."""
    if isinstance(views, str):
        views = [v for v in views.split(",")]
    vs = tuple(v.strip().upper() for v in views if v.strip())
    if not vs:
        raise ValueError("--views is empty; use e.g. PA,AP or all")
    if "ALL" in vs:
        return None
    return vs


def check_keys(df: pl.DataFrame, path: Path) -> None:
    """ValueError naming the file and key when a sample key is not a valid WebDataset key."""
    from cxrfast.shards.schema import check_key

    bad = df.filter(~pl.col("key").str.contains(r"^[A-Za-z0-9_\-]+$"))
    if bad.height:
        check_key(bad["key"][0])  # raises with the rule
    dup = df.filter(pl.col("key").is_duplicated())
    if dup.height:
        raise ValueError(f"{path}: sample key {dup['key'][0]!r} appears more than once")
