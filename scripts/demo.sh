#!/usr/bin/env bash
# The main job on a built-in default: set up, synthesize a small MIMIC-layout dataset, shard it,
# inspect it, and pre-train a tiny MRM model on it for a few steps (CPU is enough).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[train]'
export PATH="$PWD/.venv/bin:$PATH"
OUT=${OUT:-demo}
cxrfast synth mimic --out "$OUT/MIMIC-CXR-JPG" --studies 60 --seed 0
cxrfast shard mimic --root "$OUT/MIMIC-CXR-JPG" --reports "$OUT/MIMIC-CXR-JPG/mimic-cxr-reports.zip" --out "$OUT/shards/mimic"
cxrfast inspect "$OUT/shards/mimic" --sheet "$OUT/contact_sheet.png"
cxrfast train --preset tiny_mrm --shards "$OUT/shards/mimic" --out "$OUT/runs/tiny_mrm" epochs=20
