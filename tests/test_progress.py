"""`cxrfast.progress`: a bar on a terminal, periodic plain lines in a log."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from shard_tiny import make_tiny_mimic
from typer.testing import CliRunner

from cxrfast.cli import app
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


def test_sharding_into_a_log_prints_lines_not_bars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CXRFAST_PROGRESS", raising=False)
    raw = tmp_path / "raw"
    make_tiny_mimic(raw, studies=3)
    args = ["shard", "mimic", "--root", str(raw), "--reports", str(raw / "mimic-cxr-reports.zip")]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out"), "--workers", "1", "--vocab-size", "200"])
    assert r.exit_code == 0, r.output
    for stage in ("metadata", "tokenizer", "images"):
        assert f"{stage}: started" in r.stderr and f"{stage}: done" in r.stderr
    assert "\r" not in r.stderr and "it/s]" not in r.stderr
