#!/usr/bin/env bash
# Set up a virtual environment, install cxrfast with its train+dev extras, lint, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[train,dev]'
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
