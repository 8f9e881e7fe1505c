#!/usr/bin/env bash
# The patch suite's wall time (eager variant, persistent worker) for the same models in several trees
# of this repo, side by side and interleaved per round, so load from elsewhere hits each alike:
#   git worktree add ../before <rev>
#   PY=.nox/tests/bin/python ROUNDS=3 bash tools/bench_trees.sh ../before . -- llama qwen2 qwen3 qwen3_moe seed_oss
# Prints per tree and round: wall and CPU time (user+sys of the process tree) and pytest's summary line.
set -u
PY=${PY:-python}
[[ $PY == */* && $PY != /* ]] && PY=$PWD/$PY  # absolute, not resolved: a venv python is a symlink
trees=()
while (($#)) && [[ $1 != -- ]]; do trees+=("$(realpath "$1")"); shift; done
(($#)) && shift
MODELS=${*:-llama qwen2 qwen3 qwen3_moe seed_oss}
ids() { for m in $MODELS; do printf 'tests/models/test_models_patch.py::test_models_patch_fwd_bwd[%s] ' "$m"; done; }
run() {  # tree
  local out; out=$(mktemp -d)
  local TIMEFORMAT='%R %U %S' t label
  t=$( { time (cd "$1" && PYTHONPATH=$1/src:$1 HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 \
    PARITY_VARIANT=eager PARITY_RESULTS=$out PARITY_ISOLATE=1 "$PY" -m pytest -q -p no:cacheprovider $(ids) \
    > "$out/log.txt" 2>&1) ; } 2>&1 )
  read -r real user sys <<< "$t"
  label="$(basename "$1") $(git -C "$1" rev-parse --short HEAD)$(git -C "$1" diff --quiet HEAD -- src || echo +changes)"
  printf '%-34s wall %6.1f s  cpu %6.1f s  load %s  %s\n' "$label" "$real" "$(echo "$user + $sys" | bc)" \
    "$(cut -d' ' -f1 /proc/loadavg)" "$(tail -1 "$out/log.txt")"
  rm -rf "$out"
}
echo "models: $MODELS ($(nproc) cores)"
for round in $(seq "${ROUNDS:-1}"); do
  for tree in "${trees[@]}"; do run "$tree"; done
done
