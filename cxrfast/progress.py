"""Progress of long work: a tqdm bar on a terminal, periodic plain lines anywhere else.

`progress(desc, total, unit)` is what every stage uses. When stderr is a terminal it is a tqdm
bar; when stderr is a file or a pipe (a batch job's log, `2> log`, CI) a bar would be redrawn
into the log hundreds of times, so it is `LineProgress` instead: one line when the stage starts,
then at most one every `CXRFAST_PROGRESS_SECONDS` (default 30) seconds, and one when it ends:

    images: 12000/377000 img (3.2%), 410.5 img/s, 0:14:49 left
    images: done, 377000 img in 0:15:20 (409.8 img/s)

`CXRFAST_PROGRESS=bar|lines|off` forces a kind. Both kinds take `update(n)` and `close()` and
are context managers.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

#: Seconds between two lines of `LineProgress` (environment: CXRFAST_PROGRESS_SECONDS).
DEFAULT_INTERVAL_S = 30.0
_KINDS = ("bar", "lines", "off")


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class LineProgress:
    """Plain progress lines for logs (see the module doc); `clock` is injectable for tests."""

    def __init__(
        self, desc: str, total: int | None = None, unit: str = "it", *, interval_s: float = DEFAULT_INTERVAL_S,
        stream: TextIO | None = None, clock=time.monotonic, initial: int = 0,
    ) -> None:  # fmt: skip
        self.desc, self.total, self.unit = desc, total, unit
        self.interval_s = interval_s
        self.stream = stream
        self.clock = clock
        self.n = self._start = initial
        self.closed = False
        self._postfix = ""
        self._t0 = self._last = clock()
        self._emit(f"{self.desc}: started" + (f", {self.total} {self.unit}" if self.total is not None else ""))

    def _emit(self, line: str) -> None:
        stream = self.stream or sys.stderr
        print(line, file=stream, flush=True)

    def _rate(self, now: float) -> float:
        return (self.n - self._start) / (now - self._t0) if now > self._t0 else 0.0

    def set_postfix(self, **values: object) -> None:
        """Shown at the end of the next line (as tqdm's `set_postfix`), e.g. the current loss."""
        self._postfix = ", " + ", ".join(f"{k}={v}" for k, v in values.items()) if values else ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self._last < self.interval_s:
            return
        self._last = now
        rate = self._rate(now)
        if self.total:
            left = f", {_hms((self.total - self.n) / rate)} left" if rate > 0 else ""
            pos = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.1f}%)"
        else:
            left, pos = "", f"{self.n} {self.unit}"
        self._emit(f"{self.desc}: {pos}, {rate:.1f} {self.unit}/s{left}{self._postfix}")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = self.clock()
        self._emit(f"{self.desc}: done, {self.n} {self.unit} in {_hms(now - self._t0)} "
                   f"({self._rate(now):.1f} {self.unit}/s){self._postfix}")

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: object) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_kind(stream: TextIO | None = None) -> str:
    """`bar`, `lines` or `off`: CXRFAST_PROGRESS when set, else a bar on a terminal, lines otherwise."""
    forced = os.environ.get("CXRFAST_PROGRESS", "").strip().lower()
    if forced:
        if forced not in _KINDS:
            raise ValueError(f"CXRFAST_PROGRESS must be one of {_KINDS}, got {forced!r}")
        return forced
    stream = stream or sys.stderr
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or odd stream
        return "lines"


def progress(desc: str, total: int | None = None, unit: str = "it", *, initial: int = 0,
             enabled: bool = True) -> Any:
    """A progress reporter for one stage: a tqdm bar or a `LineProgress` (see the module doc).
    `initial`: work already done (a resumed stage); `enabled=False` (e.g. on ranks > 0) reports nothing."""
    kind = progress_kind() if enabled else "off"
    if kind == "bar":
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True, initial=initial)
    if kind == "off":
        return _Off()
    interval = float(os.environ.get("CXRFAST_PROGRESS_SECONDS", DEFAULT_INTERVAL_S))
    return LineProgress(desc, total, unit, interval_s=interval, initial=initial)


__all__ = ["progress", "progress_kind", "LineProgress", "DEFAULT_INTERVAL_S"]
