"""Process-group set-up and tear-down for the DeepSpeed launcher and for a single process.

Under `deepspeed` (or torchrun) the launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT.
Run directly (`python cxrfast/train.py`, benchmarks) those are absent and DeepSpeed would look
for MPI; `init()` then declares a world of one on a free local port.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init() -> tuple[int, int]:
    """Select this rank's accelerator and initialise the process group; returns (rank, world size)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        log.info("no launcher environment: running as a single process (world size 1)")
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed()
    return dist.get_rank(), dist.get_world_size()


def teardown() -> None:
    """Destroy the process group (without it, CPU runs of the launcher can abort at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class RankZeroError(ValueError):
    """Raised on the other ranks when work done on rank 0 alone failed (the message is rank 0's)."""


def on_rank_zero(work: Callable[[], T], *, rank: int) -> T | None:
    """Run `work` on rank 0 while the other ranks wait; returns its result on rank 0 (None elsewhere).
    An exception on rank 0 is raised there as it is and on every other rank as `RankZeroError`, so no
    rank is left waiting in a collective that will never come (a collective: every rank calls it)."""
    import torch.distributed as dist

    result: T | None = None
    failure: BaseException | None = None
    if rank == 0:
        try:
            result = work()
        except Exception as e:  # re-raised below, after the other ranks have heard of it
            failure = e
    box = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[0] is not None:
        raise RankZeroError(f"rank 0 failed: {box[0]}")
    return result
