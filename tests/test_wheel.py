"""The built wheel is what users get: every subpackage is in it, and a non-editable install (in a
fresh virtual environment that sees only the dependencies, not the source tree) imports them all
and runs a tiny training step with `cxrfast train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _source_packages() -> set[str]:
    """Every package of the source tree, under its installed name."""
    mapped = {"shards": "cxrfast.shards", "pipelines": "cxrfast.pipelines", "kernels": "cxrfast.kernels",
              "bench": "cxrfast.bench", "cxrfast": "cxrfast"}
    out = set()
    for top, name in mapped.items():
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / top)
            out.add(".".join([name, *rel.parts]))
    return out


@pytest.mark.slow
def test_wheel_install_imports_everything_and_trains(mimic_shards: Path, tmp_path: Path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(wheels)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = wheels.glob("cxrfast-*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # The dependencies only: plain paths (no .pth processing, so no editable finder of the source tree).
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "zz_deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", str(wheel)],
                   check=True, capture_output=True, cwd=tmp_path)

    packages = sorted(_source_packages())
    check = (
        "import importlib, json, cxrfast\n"
        f"mods = {packages!r}\n"
        "for m in mods: importlib.import_module(m)\n"
        "print(json.dumps(cxrfast.__file__))\n"
    )
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(py), "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]).startswith(str(env_dir))  # not the source tree

    out = tmp_path / "run"
    proc = subprocess.run(
        [str(env_dir / "bin" / "cxrfast"), "train", "--preset", "tiny_mae", "--shards", str(mimic_shards),
         "--out", str(out), "--data", "synthetic", "epochs=1", "log_every=1"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "encoder.safetensors").is_file() and (out / "metrics.jsonl").read_text().strip()
