"""DeepSpeed checkpoints at epoch boundaries, and resuming from them.

`engine.save_checkpoint` writes the module, the (ZeRO-partitioned) optimizer state and the LR
scheduler; `client_state` adds where the run stands (`epoch` = epochs completed, `step` =
optimizer steps done). Checkpoints are taken only at epoch ends, so resuming continues exactly:
the schedule from `step`, the data from the next epoch (its order depends on seed + epoch only),
the masking RNG reseeded per epoch. Saving and loading are collective: every rank calls them.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TAG_PREFIX = "epoch_"


@dataclass
class RunState:
    """Position in the schedule."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed


def tag(epoch: int) -> str:
    return f"{TAG_PREFIX}{epoch:04d}"


class Checkpointer:
    """Saves every `every_epochs` epochs and at the end of a run into `folder`, keeps the newest `keep`."""

    def __init__(self, engine: Any, folder: Path, *, every_epochs: int, keep: int, rank: int) -> None:
        self.engine = engine
        self.folder = Path(folder)
        self.every_epochs = every_epochs
        self.keep = keep
        self.rank = rank
        self.last_saved: int | None = None

    def due(self, epoch_done: int, *, last: bool) -> bool:
        if last:
            return True
        return self.every_epochs > 0 and epoch_done % self.every_epochs == 0

    def save(self, state: RunState, **extra: Any) -> Path:
        """Save now (collective); `extra` goes into the client state."""
        name = tag(state.epoch)
        client = {"epoch": state.epoch, "step": state.step, **extra}
        self.engine.save_checkpoint(str(self.folder), tag=name, client_state=client)
        self.last_saved = state.epoch
        if self.rank == 0:
            self._prune()
        log.info("checkpoint %s (epoch %d, step %d)", self.folder / name, state.epoch, state.step)
        return self.folder / name

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        tags = sorted(p for p in self.folder.glob(f"{TAG_PREFIX}*") if p.is_dir())
        for old in tags[: -self.keep]:
            shutil.rmtree(old, ignore_errors=False)

    def load(self, folder: Path) -> RunState:
        """Load the newest checkpoint in `folder` (DeepSpeed's `latest`) into the engine (collective)."""
        folder = Path(folder)
        if not (folder / "latest").is_file():
            raise FileNotFoundError(
                f"--resume: no DeepSpeed checkpoint in {folder} (expected {folder / 'latest'} and {TAG_PREFIX}NNNN/)"
            )
        path, client = self.engine.load_checkpoint(
            str(folder), load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None or client is None:
            raise RuntimeError(f"--resume: DeepSpeed could not load a checkpoint from {folder}")
        state = RunState(epoch=int(client["epoch"]), step=int(client["step"]))
        log.info("resumed from %s: %d epochs, %d steps done", path, state.epoch, state.step)
        return state
