"""The best states of a run by its validation metric (`train.select=best`), as timm-loadable exports.

    keep_best = 1   OUT/encoder.safetensors is the best state (rewritten at every new best)
    keep_best = N   OUT/best/step_XXXXXXXX.safetensors for each of the N best states, and
                    OUT/encoder.safetensors a copy of the best one
    OUT/best/ranking.json   {"metric", "mode", "kept": [{"value", "step", "epoch", "file"}]}, best
                            first, files relative to OUT (rank 0 writes it, temp name + rename)

Exports are collective (every rank gathers the fp32 masters); the files are rank 0's. On resume the
folder is pruned to the checkpoint's selection: states found after the checkpoint are found again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxrfast.trainer.validate import Selection

log = logging.getLogger(__name__)

BEST_DIR = "best"
RANKING = "ranking.json"


class KeptStates:
    """Where a run's kept states go, and their ranking."""

    def __init__(self, out: Path, *, metric: str, mode: str, keep: int, rank: int) -> None:
        self.out, self.metric, self.mode, self.keep, self.rank = Path(out), metric, mode, keep, rank

    def file(self, step: int) -> Path:
        """The export of the state after `step` optimizer steps."""
        from cxrfast.models.export import ENCODER_FILE

        return self.out / ENCODER_FILE if self.keep == 1 else self.out / BEST_DIR / f"step_{step:08d}.safetensors"

    def copy_best(self, path: Path) -> None:
        """OUT/encoder.safetensors := the kept export `path` (the new best; temp name + rename)."""
        from cxrfast.models.export import ENCODER_FILE

        target = self.out / ENCODER_FILE
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(target)

    def write(self, selection: Selection, *, dropped: Sequence[int] = ()) -> None:
        """Remove the exports of `dropped` steps and write the ranking (rank 0)."""
        if self.rank != 0:
            return
        if self.keep > 1:
            for step in dropped:
                self.file(step).unlink(missing_ok=True)
        rows = [{"value": v, "step": int(s), "epoch": int(e), "file": str(self.file(int(s)).relative_to(self.out))}
                for v, s, e in selection.kept]  # fmt: skip
        path = self.out / BEST_DIR / RANKING
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"metric": self.metric, "mode": self.mode, "kept": rows}, indent=1) + "\n")
        tmp.replace(path)

    def prune(self, selection: Selection) -> None:
        """Drop kept exports the (restored) selection does not list, and rewrite the ranking (rank 0)."""
        if self.rank != 0:
            return
        folder = self.out / BEST_DIR
        if not folder.is_dir():
            return
        listed = {self.file(int(s)).name for _, s, _ in selection.kept}
        for f in folder.glob("step_*.safetensors"):
            if f.name not in listed:
                log.info("removing %s: found after the checkpoint this run resumes from", f)
                f.unlink()
        self.write(selection)


def read_ranking(out: Path) -> dict[str, Any]:
    """OUT/best/ranking.json with each file resolved under OUT; FileNotFoundError when the run kept none."""
    path = Path(out) / BEST_DIR / RANKING
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run in {out} kept no best state (train.select=best "
                                "writes it at the first validation)")
    ranking = json.loads(path.read_text())
    for row in ranking["kept"]:
        row["path"] = Path(out) / row["file"]
    return ranking
