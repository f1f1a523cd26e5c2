#!/usr/bin/env bash
# Run the test suite (and ruff), installing what it needs into ./.venv when no environment is active.
# Extra arguments go to pytest, e.g. ./test.sh -k convert
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh ".[dev]"
ruff check .
ruff format --check .
python -m pytest "$@"
