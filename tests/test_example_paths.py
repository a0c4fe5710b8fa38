"""Examples and defaults write data into a data folder, never into the source tree."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Folders that are source (packages, tests, docs): nothing may write data into them.
SOURCE_DIRS = {"shards", "pipelines", "kernels", "cxrfast", "bench", "tests", "docs", "scripts"}
_PATH_OPTION = re.compile(r"--(?:out|shards|cache|root|reports)[ =]\"?([^\s\"\]]+)")


def _documented_paths() -> list[tuple[str, str]]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md")), *sorted((REPO / "scripts").glob("*.sh"))]
    files += [REPO / "cxrfast/train.py", *sorted((REPO / "bench").glob("*.py"))]
    return [(f.name, m.group(1)) for f in files for m in _PATH_OPTION.finditer(f.read_text())]


def test_examples_write_into_data_folders_not_the_source_tree() -> None:
    paths = _documented_paths()
    assert len(paths) >= 8  # the README's shard, inspect and train examples at least
    bad = [(f, p) for f, p in paths if p.split("/")[0] in SOURCE_DIRS]
    assert not bad, f"examples writing into the source tree: {bad}"


def test_benchmark_output_defaults_to_a_data_folder() -> None:
    from cxrfast.bench.common import BENCH_OUT

    assert BENCH_OUT.parts[0] not in SOURCE_DIRS
    assert "/data/" in (REPO / ".gitignore").read_text().splitlines()
