"""DeepSpeed checkpoints at epoch ends and every N steps, and exact resumption from them.

`engine.save_checkpoint` writes the module, the (ZeRO-partitioned) optimizer state and the LR
scheduler; the client state adds where the run stands (`epoch` = epochs completed, `step` =
optimizer steps done, `micro` = micro-batches consumed in the current epoch), the preset and the
schedule. Each rank's data position (the DALI loader checkpoint) is written into the tag folder
as `data_rank{r}.bin` before DeepSpeed writes its files and moves `latest`, so `latest` never names
a checkpoint that lacks a part. Saving and loading are collective: every rank calls them.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TAG_PREFIX = "step_"
_TAG_RE = re.compile(rf"^{TAG_PREFIX}\d+$")
MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass
class RunState:
    """Position in the schedule."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    micro: int = 0  # micro-batches of epoch `epoch` already consumed (0 at an epoch boundary)


def tag(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def data_file(folder: Path, rank: int) -> Path:
    return folder / f"data_rank{rank}.bin"


#: The client state, readable without loading the checkpoint (what a resume checks first).
RUN_STATE = "run_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and the alternatives."""


def _tags(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob(f"{TAG_PREFIX}*") if p.is_dir() and _TAG_RE.match(p.name))


def resolve(path: Path) -> tuple[Path, str]:
    """(checkpoint folder, tag) for `path`: a checkpoints folder (its `latest`) or one tag folder in it."""
    path = Path(path)
    if (path / MODEL_STATES).is_file() or _TAG_RE.match(path.name):
        return path.parent, path.name
    latest = path / "latest"
    if not latest.is_file():
        raise FileNotFoundError(
            f"no DeepSpeed checkpoint in {path} (expected {latest} and {TAG_PREFIX}NNNNNNNN/ folders)"
        )
    return path, latest.read_text().strip()


class Checkpointer:
    """Saves at the due points into `folder` and keeps the newest `keep` checkpoints."""

    def __init__(self, engine: Any, folder: Path, *, every_epochs: int, every_steps: int, keep: int, rank: int,
                 world_size: int) -> None:
        self.engine = engine
        self.folder = Path(folder)
        self.every_epochs = every_epochs
        self.every_steps = every_steps
        self.keep = keep
        self.rank = rank
        self.world_size = world_size

    def due_at_epoch_end(self, epoch_done: int, *, last: bool) -> bool:
        return last or (self.every_epochs > 0 and epoch_done % self.every_epochs == 0)

    def due_at_step(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, state: RunState, data_state: bytes | None = None, **extra: Any) -> Path:
        """Save now (collective); `extra` goes into the client state."""
        import torch.distributed as dist

        name = tag(state.step)
        where = self.folder / name
        where.mkdir(parents=True, exist_ok=True)
        if data_state is not None:
            tmp = data_file(where, self.rank).with_suffix(".tmp")
            tmp.write_bytes(data_state)
            tmp.replace(data_file(where, self.rank))
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        client = {"epoch": state.epoch, "step": state.step, "micro": state.micro,
                  "data_state": data_state is not None, **extra}
        if self.rank == 0:
            tmp = where / (RUN_STATE + ".tmp")
            tmp.write_text(json.dumps(client, indent=1, sort_keys=True) + "\n")
            tmp.replace(where / RUN_STATE)
        self.engine.save_checkpoint(str(self.folder), tag=name, client_state=client)
        if self.rank == 0:
            self._prune()
        log.info("checkpoint %s (epoch %d, step %d%s)", where, state.epoch, state.step,
                 f", micro-batch {state.micro} of the epoch" if state.micro else "")
        return where

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        for old in _tags(self.folder)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=False)

    def load(self, path: Path, check: Callable[[dict[str, Any]], None] | None = None,
             ) -> tuple[RunState, dict[str, Any], bytes | None]:
        """Load the checkpoint at `path` (a checkpoints folder -> its latest, or a tag folder) into the
        engine (collective). `check(client_state)` runs first, before any weight is loaded (e.g. to
        refuse another preset's checkpoint). Returns the state, the client state and this rank's data
        position. The LR scheduler's state is not loaded: the caller rebuilds the schedule."""
        folder, name = resolve(path)
        where = folder / name
        if check is not None:
            try:
                peek = json.loads((where / RUN_STATE).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(self._damaged(where, f"{where / RUN_STATE} is unreadable ({e})")) from e
            check(peek)
        try:
            loaded, client = self.engine.load_checkpoint(
                str(folder), tag=name, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        except Exception as e:  # a truncated or corrupt file surfaces as torch/pickle/zip errors
            raise CheckpointError(self._damaged(where, f"{type(e).__name__}: {e}")) from e
        if loaded is None or client is None:
            raise CheckpointError(self._damaged(where, "DeepSpeed could not load it"))
        data_state = None
        if client.get("data_state"):
            f = data_file(where, self.rank)
            if not f.is_file():
                raise CheckpointError(self._damaged(where, f"{f.name} (this rank's data position) is missing"))
            data_state = f.read_bytes()
        state = RunState(epoch=int(client["epoch"]), step=int(client["step"]), micro=int(client.get("micro", 0)))
        log.info("resumed from %s: %d epochs, %d steps done%s", where, state.epoch, state.step,
                 f", {state.micro} micro-batches into epoch {state.epoch + 1}" if state.micro else "")
        return state, client, data_state

    def _damaged(self, where: Path, why: str) -> str:
        older = [t for t in _tags(where.parent) if t.name < where.name]
        hint = (f"; the previous checkpoint is {older[-1]}: resume from it with --resume-from {older[-1]}"
                if older else "; there is no earlier checkpoint in that folder")
        return f"checkpoint {where} is damaged: {why}{hint}"
