#!/usr/bin/env bash
# One script for the GPU machine (issue 16): cuSPARSELt below torch, per-layer 2:4 vs dense, whole models on the torch
# evaluator (ViT-B/16, SmolLM2-135M shapes, a 1B LLaMA, BERT-base), `optimize` on CUDA vs CPU (when this checkout's
# optimize has --device), TensorRT-RTX (when its wheel parts were carried). Writes bench/results/<date>-<gpu>.md (and
# .jsonl beside it) with the tables and the environment (driver, CUDA, torch, cuSPARSELt). Every step has a time
# budget and a failure in one step never stops the others; the status table says what ran, failed or was skipped.
#
#   bash bench/gpu.sh [--dry-run] [--iters N] [--work DIR] [--out FILE] [--skip STEP ...] [--budget-s S]
#
# --dry-run: the CPU rehearsal, end to end on tiny shapes (same scripts, same flags, --device cpu), written to
# out/gpu-dry-run/ instead of bench/results/. Steps: env cusparselt layers models whole optimize gputests tensorrt.
# Needs on the GPU machine only what its image has (torch+CUDA, onnx, onnxruntime, transformers) plus this repo.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DRY=0
ITERS=30
WORK=""
OUT=""
SKIP=" "
BUDGET=480
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --iters) ITERS="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --budget-s) BUDGET="$2"; shift 2 ;;
    --skip) shift; while [[ $# -gt 0 && "$1" != --* ]]; do SKIP+="$1 "; shift; done ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

DATE=$(date +%Y-%m-%d)
if [[ $DRY == 1 ]]; then
  DEVICE=cpu; TINY=--tiny; PREC=fp32; [[ $ITERS == 30 ]] && ITERS=2
  GPU=cpu-dry-run
  OUT=${OUT:-out/gpu-dry-run/${DATE}-${GPU}.md}
  WORK=${WORK:-out/gpu-dry-run/work}
else
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False); use --dry-run for the CPU rehearsal" >&2
    exit 2
  fi
  DEVICE=cuda; TINY=""; PREC=fp16
  GPU=$("$PY" -c 'import torch, re; print(re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-"))')
  OUT=${OUT:-bench/results/${DATE}-${GPU}.md}
  WORK=${WORK:-/tmp/permsparse-gpu}
fi
mkdir -p "$WORK" "$(dirname "$OUT")"
PARTS="$WORK/parts"; rm -rf "$PARTS"; mkdir -p "$PARTS"
STATUS="$PARTS/status.md"
T0=$(date +%s)

# step NAME BUDGET_S COMMAND...: run with a time limit, its Markdown goes to $PARTS/NAME.md, its log to $WORK/NAME.log.
step() {
  local name="$1" budget="$2"; shift 2
  if [[ "$SKIP" == *" $name "* ]]; then echo "| $name | skipped (--skip) | – |" >> "$STATUS"; return 0; fi
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  (( budget > left )) && budget=$left
  if (( budget < 5 )); then echo "| $name | skipped: the ${BUDGET} s budget is spent | – |" >> "$STATUS"; return 0; fi
  echo ">> $name (budget ${budget} s)" >&2
  local t=$(date +%s) rc=0
  timeout --kill-after=10 "$budget" "$@" > "$WORK/$name.log" 2>&1 || rc=$?
  local what="ok"
  (( rc == 124 || rc == 137 )) && what="stopped at its ${budget} s budget"
  (( rc != 0 && rc != 124 && rc != 137 )) && what="failed (exit $rc): $(grep -v '^\s*$' "$WORK/$name.log" | tail -1 | cut -c1-200 | tr '|' '/')"
  echo "| $name | $what | $(( $(date +%s) - t )) s |" >> "$STATUS"
  return 0
}

# ---- environment -----------------------------------------------------------------------------------------------
env_md() {
  "$PY" - <<'EOF'
import platform, subprocess, sys
rows = {"python": sys.version.split()[0], "machine": platform.machine()}
try:
    from permsparse.runtime.torch_sparse import env_info
    rows.update(env_info())
except Exception as exc:
    rows["torch"] = f"unavailable ({exc})"
for mod in ("onnx", "onnxruntime", "transformers"):
    try:
        rows[mod] = __import__(mod).__version__
    except Exception:
        rows[mod] = "absent"
try:
    rows["nvidia-smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip() or "no output"
except Exception as exc:
    rows["nvidia-smi"] = f"not available ({type(exc).__name__})"
try:
    rows["permsparse commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                               timeout=10).stdout.strip() or "?"
except Exception:
    rows["permsparse commit"] = "?"
print("## Environment\n\n| key | value |\n|---|---|")
for k, v in rows.items():
    print(f"| {k} | {v} |")
EOF
}
step env 60 bash -c "$(declare -f env_md); PY='$PY' env_md > '$PARTS/1-env.md'"

# ---- models (background: CPU-bound exports overlap the GPU-bound micro-benchmarks) -------------------------------
MODELS_JSON="$WORK/models.jsonl"
if [[ "$SKIP" != *" models "* ]]; then
  ( timeout 300 "$PY" bench/gpu/make_models.py --out "$WORK/models" $TINY > "$MODELS_JSON" 2> "$WORK/models.log";
    echo $? > "$WORK/models.rc" ) &
  MODELS_PID=$!
fi

# ---- cuSPARSELt below torch ------------------------------------------------------------------------------------
CSLT_SHAPES=()
[[ $DRY == 1 ]] && CSLT_SHAPES=(--shapes 64x64x64)
step cusparselt 90 "$PY" bench/gpu/cusparselt_check.py --iters "$ITERS" "${CSLT_SHAPES[@]}" --timeout 40 \
  --md "$PARTS/2-cusparselt.md" --json "$WORK/cusparselt.jsonl"

# ---- per-layer 2:4 vs dense ------------------------------------------------------------------------------------
layers() {
  local dev="$1" tiny="$2" iters="$3" md="$4" json="$5"
  local dtypes=(fp16 bf16) methods=(semi cslt)
  [[ -n "$tiny" ]] && dtypes=(fp32) && methods=(semi)
  run() {  # LABEL [--cuda-graph] SHAPE...
    local label="$1"; shift
    local graph=(); [[ "${1:-}" == --cuda-graph ]] && { graph=(--cuda-graph); shift; }
    local args=(); for s in "$@"; do args+=(--shape "$s"); done
    "$PY" bench/linear_sparse.py "${args[@]}" "${graph[@]}" --dtype "${dtypes[@]}" --methods "${methods[@]}" --device "$dev" \
      --iters "$iters" --warmup 3 --label "$label" --md "$md" --json "$json" > /dev/null \
      || { echo "- $label: exit $?" >> "$md"; FAILED=1; }
  }
  FAILED=0
  {
    echo "## Linear layers: 2:4 vs dense, per call"
    echo
    echo "Dense \`F.linear\` vs torch's 2:4 paths (semi: to_sparse_semi_structured; cslt: _cslt_sparse_mm), median / p90"
    echo "ms per call over ${iters} samples; the last row of each table is the model's linear-layer total (sum of medians × count)."
    echo
  } >> "$md"
  if [[ -n "$tiny" ]]; then run "tiny rehearsal" "a=16x64x64*2" "b=16x64x256"; run "tiny, graph flag" --cuda-graph "a=16x64x64"; return $FAILED; fi
  local T
  # Eager calls (host work per call included) once, for ViT-B/16 batch 64; every other table replays CUDA graphs.
  run "ViT-B/16 batch 64 (12608 tokens), eager" "qkvo=12608x768x768*48" "fc1=12608x768x3072*12" "fc2=12608x3072x768*12"
  for B in 1 8 64; do T=$((197 * B)); run "ViT-B/16 batch $B ($T tokens)" --cuda-graph "qkvo=${T}x768x768*48" "fc1=${T}x768x3072*12" "fc2=${T}x3072x768*12"; done
  # TinyLlama-1.1B shapes (the 1B model below): hidden 2048, 22 layers, 32 heads, 4 KV heads x 64, SwiGLU 5632.
  for T in 2048 1 64; do
    run "LLaMA-1B $([[ $T == 2048 ]] && echo prefill 2048 || echo decode batch $T)" --cuda-graph "q_o=${T}x2048x2048*44" \
      "k_v=${T}x2048x256*44" "gate_up=${T}x2048x5632*44" "down=${T}x5632x2048*22"
  done
  # SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 KV heads x 64, SwiGLU 1536.
  run "SmolLM2-135M prefill 2048" --cuda-graph "q_o=2048x576x576*60" "k_v=2048x576x192*60" "gate_up=2048x576x1536*60" "down=2048x1536x576*30"
  for B in 16 128; do T=$((128 * B)); run "BERT-base batch $B x 128 ($T tokens)" --cuda-graph "qkvo=${T}x768x768*48" "fc1=${T}x768x3072*12" "fc2=${T}x3072x768*12"; done
  return $FAILED
}
step layers 140 bash -c "$(declare -f layers); PY='$PY' layers '$DEVICE' '$TINY' '$ITERS' '$PARTS/3-layers.md' '$WORK/layers.jsonl'"

# ---- whole models ----------------------------------------------------------------------------------------------
if [[ -n "${MODELS_PID:-}" ]]; then
  wait "$MODELS_PID"
  echo "| models | $([[ "$(cat "$WORK/models.rc" 2>/dev/null)" == 0 ]] && echo ok || echo "failed or partial: see models.log") | – |" >> "$STATUS"
  { echo "## Models made for this run"; echo; echo '```'; cat "$MODELS_JSON"; echo '```'; } > "$PARTS/4-models.md"
fi
COMPILE=(--compile vit-b64)
step whole 250 "$PY" bench/gpu/whole_model.py --models-json "$MODELS_JSON" --device "$DEVICE" --precision "$PREC" \
  --iters "$ITERS" --warmup 3 $TINY "${COMPILE[@]}" --budget-s 230 --md "$PARTS/5-whole.md" --json "$WORK/whole.jsonl"

# ---- optimize on CUDA vs CPU -----------------------------------------------------------------------------------
optimize_md() {
  local dev="$1" work="$2" tiny="$3"
  echo "## permsparse optimize: defaults on CUDA vs CPU"; echo
  if ! "$PY" -m permsparse.cli optimize --help 2>/dev/null | grep -q -- "--device"; then
    echo "skipped: this checkout's \`permsparse optimize\` has no --device option (issue 13's recovery stage adds it)."
    return 0
  fi
  echo "| model | device | seconds | result |"; echo "|---|---|---|---|"
  local devices=(cpu); [[ "$dev" == cuda ]] && devices=(cuda cpu)
  for m in smollm2 llama1b; do
    for d in "${devices[@]}"; do
      [[ "$m" == llama1b && "$d" == cpu && -z "$tiny" ]] && { echo "| $m | cpu | – | not run: over this script's budget (see README's Scale table) |"; continue; }
      local t=$(date +%s) rc=0
      timeout 150 "$PY" -m permsparse.cli optimize "$work/models/$m.onnx" -o "$work/opt-$m-$d.onnx" --device "$d" -q \
        > "$work/opt-$m-$d.log" 2>&1 || rc=$?
      echo "| $m | $d | $(( $(date +%s) - t )) | $([[ $rc == 0 ]] && echo ok || echo "exit $rc: $(tail -1 "$work/opt-$m-$d.log" | cut -c1-120 | tr '|' '/')") |"
    done
  done
}
step optimize 150 bash -c "$(declare -f optimize_md); PY='$PY' optimize_md '$DEVICE' '$WORK' '$TINY' > '$PARTS/6-optimize.md'"

# ---- the gpu-marked tests: optimize's torch stages and recovery on CUDA vs the CPU (tests/test_devices.py) --------
gputests_md() {
  echo "## gpu-marked tests (CUDA vs CPU numerics)"; echo
  echo '```'
  "$PY" -m pytest -q -m gpu tests/test_devices.py tests/test_recover.py -p no:cacheprovider 2>&1 | tail -15
  echo '```'
}
step gputests 120 bash -c "$(declare -f gputests_md); PY='$PY' gputests_md > '$PARTS/7-gputests.md'"

# ---- TensorRT-RTX ----------------------------------------------------------------------------------------------
trt_md() {
  local dev="$1" work="$2" tiny="$3" iters="$4"
  echo "## TensorRT-RTX"; echo
  if ! "$PY" -c "import tensorrt_rtx" 2>/dev/null && ! "$PY" -c "import tensorrt" 2>/dev/null; then
    local parts=""
    for d in "${TRT_PARTS:-/tmp/trt-parts}" .trt; do ls "$d"/*.part* > /dev/null 2>&1 && { parts=$d; break; }; done
    if [[ -n "$parts" ]]; then
      bash bench/gpu/trt_rtx_parts.sh install "$parts" /tmp/trt-site || { echo "reassembly/install of the carried parts failed"; return 0; }
      export PYTHONPATH="/tmp/trt-site:$PYTHONPATH"
    else
      echo "skipped: neither tensorrt nor tensorrt_rtx imports, and no wheel parts were carried (.trt/; see bench/gpu/trt_rtx_parts.sh)."
      return 0
    fi
  fi
  if [[ "$dev" != cuda ]]; then echo "rehearsal: TensorRT imports; engines are built and timed only on the GPU."; return 0; fi
  local shapes="pixel_values:64x3x224x224"
  timeout 240 "$PY" -m permsparse.cli bench "$work/models/vit.sparse.onnx" --dense "$work/models/vit.onnx" \
    --backend tensorrt --precision fp16 --shapes "$shapes" --iters "$iters" --no-plot 2>&1 | tail -20 | sed 's/^/    /'
}
step tensorrt 200 bash -c "$(declare -f trt_md); PY='$PY' trt_md '$DEVICE' '$WORK' '$TINY' '$ITERS' > '$PARTS/8-tensorrt.md'"

# ---- assemble --------------------------------------------------------------------------------------------------
TMP="$OUT.tmp"
{
  echo "# 2:4 sparsity on ${GPU}: cuSPARSELt, linear layers, whole models, optimize, TensorRT — $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  [[ $DRY == 1 ]] && echo "**CPU dry run** (tiny shapes, --device cpu): a rehearsal of the script; its timings mean nothing." && echo
  echo "Made by \`bash bench/gpu.sh$([[ $DRY == 1 ]] && echo ' --dry-run')\` in $(( $(date +%s) - T0 )) s (budget ${BUDGET} s)."
  echo
  echo "| step | status | time |"; echo "|---|---|---|"
  cat "$STATUS"
  echo
  for f in "$PARTS"/[0-9]-*.md; do [[ -f "$f" ]] && cat "$f" && echo; done
} > "$TMP" && mv "$TMP" "$OUT"
for f in whole layers cusparselt; do [[ -f "$WORK/$f.jsonl" ]] && cat "$WORK/$f.jsonl"; done > "${OUT%.md}.jsonl.tmp"
mv "${OUT%.md}.jsonl.tmp" "${OUT%.md}.jsonl"
echo "wrote $OUT (and ${OUT%.md}.jsonl) in $(( $(date +%s) - T0 )) s"
