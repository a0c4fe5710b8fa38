"""`cxrfast.progress`: a bar on a terminal, periodic plain lines in a log."""

from __future__ import annotations

import io

import pytest

from cxrfast.progress import LineProgress, progress, progress_kind


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_line_progress_writes_a_line_per_interval_not_per_update() -> None:
    out, clock = io.StringIO(), _Clock()
    with LineProgress("images", 1000, "img", interval_s=30, stream=out, clock=clock) as p:
        for _ in range(1000):  # 1000 updates over 125 s (binary-exact steps)
            clock.t += 0.125
            p.update(1)
    lines = out.getvalue().splitlines()
    assert lines[0] == "images: started, 1000 img"
    assert lines[1] == "images: 240/1000 img (24.0%), 8.0 img/s, 0:01:35 left"
    assert len(lines) == 6 and lines[-1] == "images: done, 1000 img in 0:02:05 (8.0 img/s)"
    assert "\r" not in out.getvalue()


def test_the_kind_follows_the_stream_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("CXRFAST_PROGRESS", raising=False)
    assert progress_kind(io.StringIO()) == "lines" and progress_kind(Tty()) == "bar"
    monkeypatch.setenv("CXRFAST_PROGRESS", "off")
    assert progress_kind(Tty()) == "off"
    monkeypatch.setenv("CXRFAST_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="CXRFAST_PROGRESS must be one of"):
        progress("x", 1)
