#!/usr/bin/env bash
# The main job on the embedded default: train an HSAE and the matched flat SAE on the synthetic
# hierarchy (known ground truth, no downloads, CPU) and print the comparison table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/hsae train --data synthetic --out "${1:-runs/demo}" --baseline flat "${@:2}"
