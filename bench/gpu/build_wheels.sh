#!/usr/bin/env bash
# Build/download, where pip reaches PyPI, the wheels bench/gpu/run_all.sh installs offline on a bare
# GPU machine (Python 3.12, x86_64 manylinux; its image already has torch, transformers, peft, numpy...).
# Versions are those of the local environment, so the GPU run uses the code the tests ran.
#   bench/gpu/build_wheels.sh            -> bench/gpu/wheels/*.whl (git-ignored; `carry` it to the device)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
W=wheels
mkdir -p "$W"
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# Pure Python. DeepSpeed ships only an sdist: DS_BUILD_OPS=0 gives a pure wheel (ops would JIT-build;
# the suite uses torch_adam so none is built).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$W" \
  "deepspeed==$(ver deepspeed)" "diffusers==$(ver diffusers)" "hjson==$(ver hjson)" "pydantic==$(ver pydantic)" \
  "annotated-types==$(ver annotated-types)" "typing-inspection==$(ver typing-inspection)" \
  "importlib-metadata==$(ver importlib-metadata)" "lazy-importer==$(ver lazy-importer)"
# Compiled: pydantic-core for CPython 3.12 on manylinux x86_64.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$W" "pydantic-core==$(ver pydantic-core)"
ls -1 "$W"
du -sh "$W"
