#!/usr/bin/env bash
# The test suite, as CI runs it: installs what it needs into ./.venv, then runs pytest on tests/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest tests/ -q "$@"
