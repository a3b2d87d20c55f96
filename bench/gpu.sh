#!/usr/bin/env bash
# GPU benchmarks of 2:4 sparse linear layers (torch backend): ViT-B/16 and a 1B-class LLaMA-style decoder, fp16 and
# bf16, dense vs torch semi-structured (default backend) vs cuSPARSELt with algorithm search (torch._cslt_*).
# Writes bench/results/<date>-<gpu>.md (and a .jsonl beside it). Usage: bash bench/gpu.sh [--iters N] [--methods ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
ITERS=50
METHODS=(semi cslt)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --iters) ITERS="$2"; shift 2 ;;
    --methods) shift; METHODS=(); while [[ $# -gt 0 && "$1" != --* ]]; do METHODS+=("$1"); shift; done ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "bench/gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False)" >&2
  exit 2
fi
GPU=$("$PY" -c 'import torch, re; print(re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-"))')
DATE=$(date +%Y-%m-%d)
mkdir -p bench/results
OUT="bench/results/${DATE}-${GPU}.md"
JSON="bench/results/${DATE}-${GPU}.jsonl"
TMP_MD=$(mktemp); TMP_JSON=$(mktemp)
trap 'rm -f "$TMP_MD" "$TMP_JSON"' EXIT

run() {  # run LABEL SHAPE...
  local label="$1"; shift
  local args=()
  for s in "$@"; do args+=(--shape "$s"); done
  echo ">> $label" >&2
  "$PY" bench/linear_sparse.py "${args[@]}" --dtype fp16 bf16 --methods "${METHODS[@]}" \
    --iters "$ITERS" --label "$label" --md "$TMP_MD" --json "$TMP_JSON" >/dev/null
}

{
  echo "# 2:4 sparse linear layers, $(date -u +%Y-%m-%dT%H:%MZ), ${GPU}"
  echo
  echo "Dense \`F.linear\` vs 2:4 sparse, per call (median / p90 over ${ITERS} samples, CUDA events); the last row of"
  echo "each table sums medians × layer count: the model's linear-layer speed-up (attention, norms and the LLaMA"
  echo "lm_head are not included). Methods: ${METHODS[*]}."
  echo
  "$PY" bench/linear_sparse.py --shape 64x64x64 --dtype fp16 --methods semi --iters 1 --warmup 1 --env \
    | sed -n '/^| key/,/^$/p'
  echo
} > "$TMP_MD"

# ViT-B/16: 197 tokens per image, hidden 768, MLP 3072, 12 layers (q, k, v, o, fc1, fc2 per layer).
for B in 1 8 64; do
  T=$((197 * B))
  run "ViT-B/16, batch ${B} (${T} tokens)" \
    "qkvo=${T}x768x768*48" "fc1=${T}x768x3072*12" "fc2=${T}x3072x768*12"
done

# 1B-class LLaMA-style decoder (LLaMA-3.2-1B shapes): hidden 2048, 16 layers, 32 heads x 64, 8 KV heads,
# SwiGLU 8192. Per layer: q, o 2048x2048; k, v 2048x512; gate, up 2048x8192; down 8192x2048.
llama() {
  local label="$1" T="$2"
  run "$label" "q_o=${T}x2048x2048*32" "k_v=${T}x2048x512*32" "gate_up=${T}x2048x8192*32" "down=${T}x8192x2048*16"
}
llama "LLaMA-1B prefill, 2048 tokens" 2048
llama "LLaMA-1B decode, batch 1" 1
llama "LLaMA-1B decode, batch 64" 64

cp "$TMP_MD" "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
cp "$TMP_JSON" "$JSON.tmp" && mv "$JSON.tmp" "$JSON"
echo "wrote $OUT and $JSON"
