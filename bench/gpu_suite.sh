#!/usr/bin/env bash
# The GPU one-shot suite, as one device call (at most 10 minutes on one H100/H200).
#
# Here, once:   bash ../shared/device/stage-wheels.sh      (DALI, webdataset, deepspeed, polars, ... as
#               wheel parts under .dev/; see that script), then one device call per part to put them.
# Then, in the same warm machine, one call:
#   carry [".dev/p0"], timeout_s 600, command: bash bench/gpu_suite.sh
# It installs the carried wheels and cxrfast itself (no dependencies: the machine's torch stays),
# runs `cxrfast bench gpu` with a budget that leaves time to write the results, and leaves
# gpu_suite.json and gpu_suite.png in $OUT. Back here: cxrfast bench gpu --record <files_at>/gpu_suite.json
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?OUT must name the folder whose files come back}"
if [ -x .dev/p0/install.sh ]; then
  bash .dev/p0/install.sh
fi
site=/tmp/cxrfast-site
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target "$site" . 2>&1 | grep -v "WARNING: Location" || true
export PYTHONPATH="$site:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import cxrfast.pipelines, nvidia.dali, deepspeed, polars, webdataset" \
  || { echo "missing packages: carry the wheel parts (bench/gpu_suite.sh header)"; exit 2; }
python3 -m cxrfast.cli bench gpu --out "$OUT" --budget-s "${BUDGET_S:-480}" "$@" 2>&1 | tee "$OUT/gpu_suite.log"
