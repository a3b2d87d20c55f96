#!/usr/bin/env bash
# Create the peers venv (.venv-peers at the repo root) for bench/peers/run_peer.py. Idempotent.
#
# The peers pin their own transformers (llmcompressor 0.14: transformers<=5.17), so they never go into .venv.
# torch==2.13.0 goes in first (the CPU build lies on this machine's disk, /opt/wheels); the peers are then installed
# with torch held at that version by a constraint, so pip fails loudly instead of pulling another (CUDA) torch.
# Checked 2026-11-25 with `pip install --dry-run`: llmcompressor 0.14.0.1 (torch>=2.10,<=2.14.0) and
# nvidia-modelopt 0.47.0 (torch>=2.8) both accept torch 2.13.0.
#
#   bash bench/peers/setup.sh            # llmcompressor + ModelOpt
#   PEERS="llmcompressor" bash bench/peers/setup.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
VENV=${PEERS_VENV:-.venv-peers}
TORCH_VERSION=2.13.0
LLMCOMPRESSOR=${LLMCOMPRESSOR:-llmcompressor==0.14.0.1}
MODELOPT=${MODELOPT:-nvidia-modelopt==0.47.0}
PEERS=${PEERS:-"llmcompressor modelopt"}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# Keep the venv out of git without touching the repository's .gitignore.
[ -f "$VENV/.gitignore" ] || echo '*' > "$VENV/.gitignore"
. "$VENV/bin/activate"
quiet() { grep -v -e "^WARNING: Location" -e "^\s*$" || true; }
python -m pip install -q --upgrade pip 2>&1 | quiet
python -m pip install -q "torch==$TORCH_VERSION" 2>&1 | quiet
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" > "$constraints"
pkgs=()
for p in $PEERS; do
  case "$p" in
    llmcompressor) pkgs+=("$LLMCOMPRESSOR") ;;
    modelopt) pkgs+=("$MODELOPT") ;;
    *) echo "unknown peer '$p' (choose from: llmcompressor modelopt)" >&2; exit 2 ;;
  esac
done
python -m pip install -q -c "$constraints" "${pkgs[@]}" 2>&1 | quiet
python - <<'EOF'
import importlib, torch
parts = [f"torch {torch.__version__}"]
for mod in ("llmcompressor", "modelopt", "transformers"):
    try:
        parts.append(f"{mod} {importlib.import_module(mod).__version__}")
    except Exception as exc:  # a peer left out via PEERS, or broken
        parts.append(f"{mod}: {type(exc).__name__}")
print("peers venv:", " | ".join(parts))
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__} in the peers venv, expected 2.13.0"
EOF
