#!/usr/bin/env bash
# Create ./.venv with everything hsae_fast needs and install the package (and its C++ backend) into it.
# Idempotent: a second run only re-installs when setup.py, csrc/ or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# torch is pinned: an unpinned torch (or a range a peer asks for) would pull a CUDA build of several GB.
stamp="$VENV/.hsae_fast_installed"
want=$(cat setup.py scripts/setup_env.sh $(find csrc -type f 2>/dev/null | sort) 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    torch==2.13.0 triton==3.9.0 numpy safetensors pytest pytest-benchmark tqdm matplotlib ninja pyyaml "transformers>=5"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
