#!/usr/bin/env bash
# Set up (if needed) and run the test suite. GPU tests skip cleanly without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -m "not slow" "$@"
