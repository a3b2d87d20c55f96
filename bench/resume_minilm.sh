#!/bin/bash
# Resume ratio on MiniLM defaults: uninterrupted vs kill-at-half + rerun (contended 2-core machine).
# Usage: bench/resume_minilm.sh [WORK_FOLDER]   (results appended to WORK_FOLDER/times.txt)
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$REPO
PS="$REPO/.venv/bin/permsparse"
[ -x "$PS" ] || PS=permsparse
mkdir -p "${1:-out/resume}" && cd "${1:-out/resume}"
[ -f minilm.onnx ] || nice -n 5 $PS export minilm -o minilm.onnx -q
rm -rf wdA wdB full.onnx* res.onnx*
s=$(date +%s.%N); nice -n 5 $PS optimize minilm.onnx -o full.onnx --work-dir wdA -q > full.log 2>&1; echo "full rc=$? $(echo "$(date +%s.%N) - $s" | bc)" >> times.txt
s=$(date +%s.%N); setsid nice -n 5 $PS optimize minilm.onnx -o res.onnx --work-dir wdB -q > killed.log 2>&1 &
pid=$!
while kill -0 $pid 2>/dev/null; do
  d=$(python3 -c "import json,glob;f=glob.glob('wdB/blocks/*/state.json');print(json.load(open(f[0]))['done'] if f else 0)" 2>/dev/null || echo 0)
  if [ "${d:-0}" -ge 6 ]; then kill -KILL -- -$pid; break; fi
  sleep 0.5
done
wait $pid 2>/dev/null
echo "killed after block $d at $(echo "$(date +%s.%N) - $s" | bc)" >> times.txt
s=$(date +%s.%N); nice -n 5 $PS optimize minilm.onnx -o res.onnx --work-dir wdB -v > resumed.log 2>&1; echo "resumed rc=$? $(echo "$(date +%s.%N) - $s" | bc)" >> times.txt
cmp full.onnx res.onnx && echo "outputs byte-identical" >> times.txt || echo "outputs differ" >> times.txt
echo done >> times.txt
