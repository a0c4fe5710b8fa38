#!/usr/bin/env bash
# The main job on a built-in default: set up, synthesize a small MIMIC-layout dataset, shard it,
# inspect it, pre-train a tiny MAE-CXR and a tiny MRM model on it, then evaluate what they learned:
# a linear probe of each pre-trained encoder against the same architecture with random weights, on
# a separate synthetic CheXpert at three label fractions (CPU is enough; about 6 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[train]'
export PATH="$PWD/.venv/bin:$PATH"
OUT=${OUT:-demo}

# Pre-training data: 300 studies (about 270 frontal train images), sharded at 384 px: the long side tiny MRM's 128-px target needs (no crop upsampled).
cxrfast synth mimic --out "$OUT/MIMIC-CXR-JPG" --studies 300 --seed 0 --size-min 400 --size-max 600
cxrfast shard mimic --root "$OUT/MIMIC-CXR-JPG" --reports "$OUT/MIMIC-CXR-JPG/mimic-cxr-reports.zip" \
    --out "$OUT/shards/mimic" --max-size 384
cxrfast inspect "$OUT/shards/mimic" --sheet "$OUT/contact_sheet.png"
# 60 epochs each of tiny MAE-CXR (image only) and tiny MRM (image + report); micro-batch 16 instead of
# the presets' 4 for CPU throughput.
cxrfast train --preset tiny_mae --shards "$OUT/shards/mimic" --out "$OUT/runs/tiny_mae" epochs=60 batch_size=16
cxrfast train --preset tiny_mrm --shards "$OUT/shards/mimic" --out "$OUT/runs/tiny_mrm" epochs=60 batch_size=16

# Evaluation data: a synthetic CheXpert (600 patients: about 440 train, 40 validate, 120 test), patients
# disjoint from pre-training; valid.csv becomes test, validate is held out of train by patient.
cxrfast synth chexpert --out "$OUT/CheXpert" --patients 600 --seed 1
cxrfast shard chexpert --root "$OUT/CheXpert/CheXpert-v1.0-small" --out "$OUT/shards/chexpert" --max-size 256
# MGCA's linear probe with two knobs adapted to a few hundred images: lr 1e-2 (the published 5e-4 is
# tuned for ~200k images and barely moves the head in 50 epochs here) and MAE's BatchNorm before the
# linear layer. Three patient draws at 10% and 30% of the train patients, and all of them.
PROBE=(--shards "$OUT/shards/chexpert" --task chexpert5 --protocol mgca --fractions 0.1,0.3,1 --draws 3
       probe.lr=1e-2 probe.head=bn_linear)
cxrfast eval linprobe "${PROBE[@]}" --encoder "$OUT/runs/tiny_mae/encoder.safetensors" --out "$OUT/eval/tiny_mae"
cxrfast eval linprobe "${PROBE[@]}" --encoder "$OUT/runs/tiny_mrm/encoder.safetensors" --out "$OUT/eval/tiny_mrm"
# The baseline: both tiny encoders are the same ViT; random weights, with tiny MAE-CXR's normalisation.
cxrfast eval linprobe "${PROBE[@]}" --encoder "$OUT/runs/tiny_mae/encoder.safetensors" --init random \
    --out "$OUT/eval/random_init"
cxrfast eval compare "$OUT/eval/random_init" "$OUT/eval/tiny_mae" "$OUT/eval/tiny_mrm" --out "$OUT/eval/compare"
