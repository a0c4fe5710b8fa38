"""What both datasets' metadata readers share: CSV checks, label mapping by column name, views."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from cxrfast.shards.schema import LABEL_NAMES, NOT_MENTIONED

log = logging.getLogger(__name__)

#: A folder with more subfolders than this is an image tree (MIMIC's files/p10/, CheXpert's train/):
#: `find_dataset_root` does not descend into it.
_WIDE = 200

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


def _label_cell(name: str) -> pl.Expr:
    """A label cell with surrounding spaces stripped; blank (empty or only spaces) is null."""
    cell = pl.col(name).str.strip_chars()
    return pl.when(cell == "").then(None).otherwise(cell)


def label_codes_expr(path: Path) -> pl.Expr:
    """The 14 label columns (picked by NAME, in CheXpert's order) -> one list[i8] column `labels`:
    1.0/0.0/-1.0 -> 1/0/-1, blank -> -2. Run `check_label_values` first (any other value raises
    when collected)."""
    exprs = []
    for name in LABEL_NAMES:
        v = _label_cell(name).cast(pl.Float64, strict=True)
        exprs.append(pl.when(v.is_null()).then(pl.lit(NOT_MENTIONED)).otherwise(v).cast(pl.Int8))
    return pl.concat_list(exprs).alias("labels")


def row_where(row: int) -> str:
    """A 0-based data row as people count it: `row 3 (line 4)` (line 1 is the header)."""
    return f"row {row + 1} (line {row + 2})"


def check_label_values(df: pl.DataFrame, path: Path) -> None:
    """ValueError naming the file, column and row when a label cell is not 1/0/-1 or blank
    (empty or spaces only)."""
    df = df.with_row_index("_row")
    for name in LABEL_NAMES:
        cell = _label_cell(name)
        ok = cell.cast(pl.Float64, strict=False).is_in([1.0, 0.0, -1.0]).fill_null(False)
        bad = df.filter(cell.is_not_null() & ~ok)
        if bad.height:
            raise ValueError(
                f"{path}: column {name!r} holds {bad[name][0]!r} in {row_where(bad['_row'][0])}; "
                f"expected 1.0, 0.0, -1.0 or blank ({bad.height} such cells in that column)"
            )


def check_rows(df: pl.DataFrame, path: Path) -> None:
    """ValueError when a table has no data rows."""
    if df.height == 0:
        raise ValueError(f"{path}: no data rows (only a header)")


def check_unique(df: pl.DataFrame, columns: Sequence[str], path: Path) -> None:
    """ValueError naming the file, the value and both rows when `columns` repeat a row's values."""
    dup = df.select(columns).with_row_index("_row").filter(pl.struct(list(columns)).is_duplicated())
    if dup.height:
        first = dup.row(0, named=True)
        same = dup.filter(pl.all_horizontal([pl.col(c) == first[c] for c in columns]))
        what = ", ".join(f"{c}={first[c]}" for c in columns)
        rows = " and ".join(row_where(r) for r in same["_row"][:2])
        raise ValueError(f"{path}: {what} appears more than once ({rows}); expected one row per {', '.join(columns)}")


def check_views_left(df: pl.DataFrame, keep: tuple[str, ...] | None, all_views: pl.Series, path: Path | str) -> None:
    """ValueError when the `--views` filter left no rows, naming the views the table has."""
    if df.height or keep is None:
        return
    counts = all_views.fill_null("").value_counts(sort=True)
    have = ", ".join(f"{v or '(blank)'} {n}" for v, n in counts.iter_rows())
    raise ValueError(f"--views {','.join(keep)} matches no row of {path} (views there: {have})")


def find_dataset_root(root: Path, marker: str, what: str, *, max_depth: int = 4, max_dirs: int = 2000) -> Path:
    """`root` when it holds `marker` (a `.gz` marker also matches its uncompressed twin); otherwise
    the one folder below it (breadth first, at most `max_depth` levels, hidden folders and image
    trees -- folders of more than `_WIDE` subfolders -- not descended into) that does, with a
    warning. ValueError naming the folders when several at the same depth do; `root` unchanged when
    none does (the readers then name the missing file)."""
    names = {marker, marker.removesuffix(".gz")}

    def holds(d: Path) -> bool:
        return any((d / n).is_file() for n in names)

    if holds(root) or not root.is_dir():
        return root
    level, seen = [root], 0
    for _ in range(max_depth):
        found, below = [], []
        for d in level:
            try:
                subs = sorted(e.path for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
            except OSError:
                continue
            seen += len(subs)
            found += [Path(s) for s in subs if holds(Path(s))]
            if len(subs) <= _WIDE:
                below += map(Path, subs)
        if len(found) > 1:
            raise ValueError(f"--root {root} holds several {what} folders ({', '.join(map(str, found))}): pass one of them")
        if found:
            log.warning("--root %s holds no %s; using %s, which does", root, marker, found[0])
            return found[0]
        if seen > max_dirs:
            break
        level = below
    return root


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
