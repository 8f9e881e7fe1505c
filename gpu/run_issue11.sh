#!/usr/bin/env bash
# Issue 11 on one GPU, no nox: --config-style runs of three real-width configs (gpu/configs/*), eager
# variant, each model's modes in a child process, weights created once per model. Writes <= 8 files
# to $OUT: log.txt, timings.txt, merge.txt, summary.json, summary.md, patch/eager/<id>.json x3.
set -u
OUT=${OUT:-/tmp/issue11_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 PYTHONUNBUFFERED=1
export PARITY_VARIANT=eager PARITY_RESULTS=$OUT/results
WORK=$(mktemp -d)
python - "$WORK/.adhoc_cases.json" gpu/configs/*/config.json <<'PY'
import sys
from pathlib import Path
from parity.results import registry
cases = {}
for raw in sys.argv[2:]:
    case = registry.check_adhoc_config(raw)
    cases[case.id] = case.config
registry.write_adhoc(Path(sys.argv[1]).parent, cases)
print("cases:", ", ".join(cases))
PY
export PARITY_EXTRA_CASES=$WORK/.adhoc_cases.json
start=$(date +%s)
timeout 170 python -m pytest -s -q -p no:cacheprovider tests/models/test_models_patch.py \
  -k "llama_2b or qwen3_4096 or mistral_4096" > "$OUT/log.txt" 2>&1
echo "pytest exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/log.txt"
grep '^\[parity\]' "$OUT/log.txt" | tail -60
python -m parity.results.merge --results "$OUT/results" > "$OUT/merge.txt" 2>&1; echo "merge exit $?" >> "$OUT/merge.txt"
cat "$OUT/merge.txt"
python - "$OUT/results" <<'PY' | tee "$OUT/timings.txt"
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("patch/eager/*.json")):
    for r in json.loads(f.read_text())["records"]:
        m, w = r.get("metrics", {}), r.get("inputs", {}).get("weights", {})
        print(f"{f.stem:14} {r['mode']['id']:40} {r['status']:11} wall_s={m.get('wall_s')} build_s={m.get('build_s')} "
              f"peak_host_gib={m.get('peak_host_gib')} peak_device_gib={m.get('peak_device_gib')} {w or ''}")
PY
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader >> "$OUT/timings.txt" 2>&1
mv "$OUT/results/summary.json" "$OUT/results/summary.md" "$OUT/" 2>/dev/null
mkdir -p "$OUT/patch/eager" && mv "$OUT"/results/patch/eager/*.json "$OUT/patch/eager/" 2>/dev/null
rm -rf "$OUT/results" "$WORK"
