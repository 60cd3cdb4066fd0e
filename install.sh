#!/usr/bin/env bash
# One-step set-up on a fresh machine: a project virtual environment (.venv) unless one is
# already active, CPU torch first (an unpinned torch pulls a multi-GB CUDA build), then raydiff
# and its dependencies, then the import check.
# Usage: ./install.sh          # the package
#        ./install.sh --test   # plus test dependencies
# Inside an active venv or conda env it installs there; otherwise it creates ./.venv (never
# installs into a system interpreter, which Debian/Ubuntu mark EXTERNALLY-MANAGED anyway).
# On a GPU machine, install the CUDA torch you want first and pass TORCH_SPEC= (empty) to skip the pin.
set -euo pipefail
cd "$(dirname "$0")"
BASE=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
extra=""
[[ "${1:-}" == "--test" ]] && extra="[test]"

if ! command -v "$BASE" >/dev/null 2>&1; then
  echo "install.sh: $BASE not found; install Python 3.10+ (Debian/Ubuntu: apt-get install python3 python3-venv)" >&2
  exit 1
fi
"$BASE" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "install.sh: raydiff needs Python 3.10+, $BASE is $("$BASE" -V 2>&1)" >&2; exit 1; }

# In a virtual environment already? (venv/virtualenv: sys.prefix differs from base_prefix; conda: CONDA_PREFIX)
in_env=$("$BASE" -c 'import os, sys; print(int(sys.prefix != sys.base_prefix or os.path.realpath(os.environ.get("CONDA_PREFIX", "/nonexistent")) == os.path.realpath(sys.prefix)))')
if [[ "$in_env" == 1 ]]; then
  PY=$BASE
  echo "install.sh: installing into the active environment $("$BASE" -c 'import sys; print(sys.prefix)')"
else
  if [[ ! -x .venv/bin/python ]]; then
    ver=$("$BASE" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    if ! "$BASE" -m venv .venv; then
      rm -rf .venv
      echo "install.sh: '$BASE -m venv' failed: Python's venv module (with ensurepip) is missing." >&2
      echo "  Debian/Ubuntu: apt-get install python3-venv   (or python${ver}-venv), then run ./install.sh again" >&2
      exit 1
    fi
    echo "install.sh: created .venv (use .venv/bin/raydiff, .venv/bin/python, or: . .venv/bin/activate)"
  fi
  PY=.venv/bin/python
fi

if [[ -n "$TORCH_SPEC" ]]; then
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
"$PY" -m pip install -q -e ".${extra}"
"$PY" -m raydiff.warmup
