"""Label fractions drawn by patient from the train split.

Draw d of every fraction takes a prefix of the same seeded permutation of the train patients
(sorted ids, then `numpy.random.default_rng([seed, d])`), so draws are reproducible per seed, the
1% patients of draw d are among its 10% patients, and no patient outside train is ever drawn.
A fraction keeps round(fraction x patients) patients (at least one) with all their images;
fraction 1 is drawn once (all patients).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True, slots=True)
class Draw:
    """One training subset: its fraction, draw index and patients (sorted)."""

    fraction: float
    index: int
    patients: tuple[str, ...]

    @property
    def name(self) -> str:
        """`fraction-0.01_draw-2`: the file stem of everything written for this draw."""
        return draw_name(self.fraction, self.index)


def draw_name(fraction: float, index: int) -> str:
    return f"fraction-{fraction:g}_draw-{index}"


def draw_indices(fraction: float, draws: int) -> range:
    """Draws made at `fraction`: `draws` of them below 1, one at 1 (every patient)."""
    return range(1) if fraction >= 1.0 else range(draws)


def draw_patients(patients: Sequence[str], fraction: float, index: int, seed: int) -> Draw:
    """Draw `index` at `fraction` from the train patients `patients` (any order, duplicates allowed)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    unique = np.unique(np.asarray(patients, dtype=str))
    if unique.size == 0:
        raise ValueError("no train patients to draw from")
    if fraction >= 1.0:
        return Draw(fraction, index, tuple(unique.tolist()))
    order = np.random.default_rng([seed, index]).permutation(unique.size)
    k = max(1, int(round(fraction * unique.size)))
    return Draw(fraction, index, tuple(sorted(unique[order[:k]].tolist())))


def all_draws(patients: Sequence[str], fractions: Sequence[float], draws: int, seed: int) -> list[Draw]:
    return [draw_patients(patients, f, d, seed) for f in fractions for d in draw_indices(f, draws)]


def write_draw(folder: Path, draw: Draw) -> Path:
    """`folder/fraction-F_draw-D.txt`: the draw's patient ids, one per line (temp name + rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{draw.name}.txt"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{p}\n" for p in draw.patients))
    tmp.replace(path)
    return path
