"""Process-group set-up and tear-down for the DeepSpeed launcher and for a single process.

Under `deepspeed` (or torchrun) the launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT.
Run directly (`python cxrfast/train.py`, benchmarks) those are absent and DeepSpeed would look
for MPI; `init()` then declares a world of one on a free local port.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


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
