#!/usr/bin/env bash
# Install the peers `pytest bench/` compares against (EleutherAI sparsify, SAELens) into ./.venv
# without letting either move torch: their dependency ranges would otherwise pull another build
# (several GB of CUDA wheels). Run from anywhere; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" > "$constraints"
"$PY" -m pip install -q --disable-pip-version-check -c "$constraints" eai-sparsify sae-lens psutil
"$PY" - <<'PY'
import os
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decode cannot run on CPU
from importlib.metadata import version
import torch, sparsify, sae_lens  # noqa: F401  (both must import)
print(f"peers installed: eai-sparsify {version('eai-sparsify')}, sae-lens {version('sae-lens')}, torch {torch.__version__}")
PY
