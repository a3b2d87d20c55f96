#!/usr/bin/env bash
# Set up (if needed), then the main job end to end on the real all-MiniLM-L6-v2 weights:
# export -> optimize (calibrate on real Wikipedia text, learn permutations, fold, 2:4 mask, verify) -> inspect.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-out}
mkdir -p "$OUT"
permsparse export minilm -o "$OUT/minilm.onnx" --exporter dynamo
permsparse optimize "$OUT/minilm.onnx" -o "$OUT/minilm.sparse.onnx" --importance wanda --report "$OUT/report" "$@"
permsparse inspect "$OUT/minilm.sparse.onnx" | tail -n 3
