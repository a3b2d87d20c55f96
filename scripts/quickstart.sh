#!/usr/bin/env bash
# Set up (if needed), then the main job end to end on the real all-MiniLM-L6-v2 weights:
# export -> optimize with its defaults (calibrate on real Wikipedia text, permutations, SparseGPT block by block, fold,
# fold check, 2:4 masks, held-out report) -> inspect.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-out}
mkdir -p "$OUT"
permsparse export minilm -o "$OUT/minilm.onnx" --exporter dynamo
permsparse optimize "$OUT/minilm.onnx" -o "$OUT/minilm.sparse.onnx" --report "$OUT/report" "$@"
permsparse inspect "$OUT/minilm.sparse.onnx" > "$OUT/inspect.txt"
head -n 2 "$OUT/inspect.txt"            # the header and its rule
echo "..."
grep -E "^[0-9]+ weights, " "$OUT/inspect.txt"   # the totals: weights, valid 2:4, closures
echo "(every weight: $OUT/inspect.txt; the report: $OUT/report/report.md)"
