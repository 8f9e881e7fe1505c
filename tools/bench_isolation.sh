#!/usr/bin/env bash
# Wall time of the patch suite (eager variant) for the same models, side by side in one run:
#   in-process (PARITY_ISOLATE=0), one child per model (the code of BASE, a worktree of e20046e),
#   one persistent worker (this checkout).
#   git worktree add /work/wt3base e20046e
#   BASE=/work/wt3base PY=/work/main/.nox/tests/bin/python bash tools/bench_isolation.sh llama qwen2 qwen3 qwen3_moe seed_oss
set -u
BASE=${BASE:-/work/wt3base}
PY=${PY:-python}
MODELS=${*:-llama qwen2 qwen3 qwen3_moe seed_oss}
HERE=$(cd "$(dirname "$0")/.." && pwd)
ids() { for m in $MODELS; do printf 'tests/models/test_models_patch.py::test_models_patch_fwd_bwd[%s] ' "$m"; done; }
run() {  # label tree isolate: wall time, and CPU time (user+sys of the whole process tree: what the
  # isolation costs, less sensitive to other load on the machine than the wall time)
  local out; out=$(mktemp -d)
  local TIMEFORMAT='%R %U %S'
  local t
  t=$( { time (cd "$2" && PYTHONPATH=$2/src:$2 HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 \
    PARITY_VARIANT=eager PARITY_RESULTS=$out PARITY_ISOLATE=$3 "$PY" -m pytest -q -p no:cacheprovider $(ids) \
    > "$out/log.txt" 2>&1) ; } 2>&1 )
  local rc=$?
  read -r real user sys <<< "$t"
  printf '%-34s wall %6.1f s  cpu %6.1f s  load %s  %s\n' "$1" "$real" "$(echo "$user + $sys" | bc)" \
    "$(cut -d' ' -f1 /proc/loadavg)" "$(tail -1 "$out/log.txt")"
  rm -rf "$out"
}
echo "models: $MODELS ($(nproc) cores)"
for round in $(seq "${ROUNDS:-1}"); do  # interleaved, so load from elsewhere hits each alike
  run "PARITY_ISOLATE=0 (in-process)" "$HERE" 0
  run "per-model child ($(git -C "$BASE" rev-parse --short HEAD))" "$BASE" 1
  run "persistent worker ($(git -C "$HERE" rev-parse --short HEAD))" "$HERE" 1
done
