#!/usr/bin/env bash
# One command on a bare GPU machine without network: install the carried wheels (bench/gpu/wheels,
# built by bench/gpu/build_wheels.sh) offline, then run every GPU case, each with its own timeout
# (bench/gpu/suite.py). Writes bench/gpu/results/suite.{json,md}. Whole run < 8 min on one H100/H200.
#   bench/gpu/run_all.sh             real shapes, bf16, on the GPU
#   bench/gpu/run_all.sh --dry-run   the same code on CPU with tiny shapes (CI)
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
ARGS=("$@")
need() { "$PY" -c "import diffusers, deepspeed, pydantic, hjson, peft" 2>/dev/null; }
if ! need; then
  W=bench/gpu/wheels
  if ! ls "$W"/*.whl >/dev/null 2>&1; then
    echo "run_all.sh: diffusers/deepspeed/pydantic/hjson/peft missing and no wheels in $W: run bench/gpu/build_wheels.sh where pip works, then carry $W" >&2
    exit 2
  fi
  # Into the environment when it is writable (pip's resolver sees the installed torch & co.), else a side folder.
  if ! "$PY" -m pip install -q --no-index --find-links "$W" --no-compile diffusers deepspeed pydantic hjson 2>/dev/null; then
    "$PY" -m pip install -q --no-index --find-links "$W" --no-deps --no-compile --target /tmp/raydiff-site "$W"/*.whl || exit 2
    export PYTHONPATH="/tmp/raydiff-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  need || { echo "run_all.sh: the wheels did not provide every module" >&2; exit 2; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec "$PY" bench/gpu/suite.py "${ARGS[@]}"
