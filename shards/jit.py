"""The single numba switch (STYLE.md "All numba behind one switch").

Every per-pixel loop in `cxrfast.shards` is decorated with `jit`. With the environment
variable `CXRFAST_NUMBA=0` the loops run as plain Python (debugging, coverage); otherwise they
are compiled with `numba.njit(cache=True, nogil=True)`. Compiled functions keep the plain
Python function as `.py_func`, so tests can run both and compare them with a NumPy reference.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

#: True when loops are compiled; decided once, at import, from CXRFAST_NUMBA.
NUMBA_ENABLED: bool = os.environ.get("CXRFAST_NUMBA", "1").strip().lower() not in ("0", "false", "no", "off")


def jit(fn: F) -> F:
    """Compile `fn` with numba (nopython, cached, GIL released) unless CXRFAST_NUMBA=0."""
    if not NUMBA_ENABLED:
        return fn
    import numba

    return numba.njit(cache=True, nogil=True)(fn)


def py_func(fn: Callable) -> Callable:
    """The plain-Python body of a `jit` function (the function itself when numba is off)."""
    return getattr(fn, "py_func", fn)
