"""The one place that decides which implementation runs: `impl="auto" | "triton" | "reference"`.

On CPU, Triton kernels run only in Triton's interpreter, and Triton makes that choice when it is
imported (its own `tl.*` helpers are `@triton.jit` functions decorated at import): set
`TRITON_INTERPRET=1` before anything imports triton (timm, transformers and deepspeed all do).
`tests/conftest.py` sets it for the test session.
"""

from __future__ import annotations

import os

import torch

IMPLS = ("auto", "triton", "reference")


def interpreter_active() -> bool:
    """True when Triton was imported in interpreter mode (`TRITON_INTERPRET=1` set before import)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def resolve_impl(impl: str, *tensors: torch.Tensor, op: str) -> str:
    """Return "triton" or "reference" for `impl` and the tensors an op gets.

    "auto" picks Triton when the tensors are on CUDA and the plain-PyTorch reference otherwise.
    "triton" on CPU tensors needs Triton's interpreter (`TRITON_INTERPRET=1`); anything else is a
    ValueError rather than a silent switch to the reference.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if impl == "reference":
        return "reference"
    if impl == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and interpreter_active():
        return "triton"
    raise ValueError(
        f"{op}: impl='triton' needs CUDA tensors, or CPU tensors with Triton's interpreter, which needs "
        f"TRITON_INTERPRET=1 set before triton is first imported (got device {device}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} now)"
    )
