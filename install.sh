#!/usr/bin/env bash
# One-step set-up on a fresh machine: CPU torch first (an unpinned torch pulls a multi-GB
# CUDA build), then raydiff and its dependencies, then DeepSpeed's one-time op build.
# Usage: ./install.sh          # the package
#        ./install.sh --test   # plus test dependencies
# On a GPU machine, install the CUDA torch you want first and pass TORCH_SPEC= (empty) to skip the pin.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
extra=""
[[ "${1:-}" == "--test" ]] && extra="[test]"
if [[ -n "$TORCH_SPEC" ]]; then
  $PY -m pip install -q "$TORCH_SPEC"
fi
$PY -m pip install -q -e ".${extra}"
$PY -m raydiff.warmup
