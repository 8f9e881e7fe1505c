#!/usr/bin/env bash
# Issue 11 on one GPU, no nox, the image's python3 (torch, transformers, pytest): the patch suite's
# persistent worker under planted faults, in one multi-model run of the eager variant.
#   phase "plants" (default, ~90 s on an H200): llama qwen2 qwen3 qwen3_moe seed_oss with a planted
#     hang in qwen2's sdpa mode (PARITY_MODE_TIMEOUT_S=30) and a real device-side assert (an
#     out-of-bounds index on the device) in qwen3's sdpa forward. Expected: qwen2 sdpa TIMEOUT with its
#     stack, qwen3 sdpa ERROR "CUDA error: device-side assert triggered", the worker retired after each,
#     every other mode of those models and of qwen3_moe / seed_oss (the models after them) REF/PASS/TRUTH.
#   phase "all": every registry model, no plant, eager variant: the wall time of one variant session.
#   phase "configs": the --config path on real-width configs nobody put in the registry (gpu/configs/*:
#     a 1.9B llama, a 4096-wide qwen3, a 4096-wide mistral), eager variant: per-mode wall, build time,
#     peak host and device memory, the weights created once per model (timings-configs.txt).
# PHASES="plants all" runs both. Writes to $OUT: log-<phase>.txt, merge-<phase>.txt, summary.txt.
set -u
OUT=${OUT:-/tmp/issue11_out}
PHASES=${PHASES:-plants}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 PYTHONUNBUFFERED=1
export PARITY_VARIANT=eager
PLANTS=tests.unit.workers.plants
node() { for m in "$@"; do printf 'tests/models/test_models_patch.py::test_models_patch_fwd_bwd[%s] ' "$m"; done; }
phase() {  # name timeout models...
  local name=$1 limit=$2; shift 2
  local results=$OUT/results-$name; rm -rf "$results"; mkdir -p "$results"
  local start; start=$(date +%s%N)
  PARITY_RESULTS=$results timeout "$limit" "$PY" -m pytest -s -q -p no:cacheprovider --durations=0 $(node "$@") \
    > "$OUT/log-$name.txt" 2>&1
  local rc=$?
  local wall; wall=$(( ($(date +%s%N) - start) / 1000000 ))  # ms (the image has no bc)
  "$PY" - "$results" "$@" <<'PY'
import sys
from pathlib import Path
from parity.results.records import RunManifest, run_manifest_path, write_json_atomic
write_json_atomic(run_manifest_path(Path(sys.argv[1]), "patch", "eager"),
                  RunManifest("patch", "eager", sys.argv[2:], "ran").to_json())
PY
  "$PY" -m parity.results.merge --results "$results" > "$OUT/merge-$name.txt" 2>&1
  local merge_rc=$?
  {
    printf '[%s] pytest rc=%s wall=%s ms (%s models); merge rc=%s\n' "$name" "$rc" "$wall" "$#" "$merge_rc"
    grep -E "retired|ERROR \(|TIMEOUT|passed|failed" "$OUT/log-$name.txt" | grep -v "^  File" | head -20 | sed "s/^/[$name]   /"
    grep -E "^[0-9.]+s (call|setup|teardown) " "$OUT/log-$name.txt" | head -12 | sed "s/^/[$name]   duration /"
    printf '[%s]   workers started: %s\n' "$name" "$(ls "$results"/patch/eager/.workers 2>/dev/null | wc -l)"
    grep -E "^patch|verdict=" "$OUT/merge-$name.txt" | cut -c1-200 | sed "s/^/[$name]   /"
  } | tee -a "$OUT/summary.txt"
}
: > "$OUT/summary.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/summary.txt"
for p in $PHASES; do
  case $p in
    plants)
      PARITY_FAULT="$PLANTS:hang_qwen2_sdpa,$PLANTS:cuda_error_qwen3_sdpa" PARITY_MODE_TIMEOUT_S=30 \
        phase plants 240 llama qwen2 qwen3 qwen3_moe seed_oss ;;
    all)
      phase all 500 $("$PY" -c "from parity.results import registry; print(' '.join(registry.ids('patch')))") ;;
    configs)
      work=$(mktemp -d)
      ids=$("$PY" - "$work" gpu/configs/*/config.json <<'PY'
import sys
from pathlib import Path
from parity.results import registry
cases = {}
for raw in sys.argv[2:]:
    case = registry.check_adhoc_config(raw)
    cases[case.id] = case.config
registry.write_adhoc(Path(sys.argv[1]), cases)
print(" ".join(cases))
PY
)
      PARITY_EXTRA_CASES=$work/.adhoc_cases.json phase configs "${CONFIGS_MAX_S:-150}" $ids
      "$PY" - "$OUT/results-configs" <<'PY' | tee "$OUT/timings-configs.txt"
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("patch/eager/*.json")):
    if f.name.startswith("_"):
        continue
    for r in json.loads(f.read_text()).get("records", []):
        m, w = r.get("metrics") or {}, (r.get("inputs") or {}).get("weights") or {}
        print(f"{f.stem:14} {r['mode']['id']:46} {r['status']:11} wall_s={m.get('wall_s')} "
              f"build_s={m.get('build_s')} peak_host_gib={m.get('peak_host_gib')} "
              f"peak_device_gib={m.get('peak_device_gib')} {w or ''}")
PY
      rm -rf "$work" ;;
  esac
done
