#!/usr/bin/env bash
# Issue 12 evidence on one H200 with no network (see gpu/README.md for what to put in the checkout).
#
#   bash gpu/run_issue12.sh                        # default phases: isolated plan novenv  (~6.5 min)
#   PHASES="build e2e" bash gpu/run_issue12.sh     # build_flash fa3 + fa2 and the suites on those wheels,
#                                                  # then e2e in all three variants        (~7.5 min)
#
# Phases (run in this order, whichever are listed in PHASES):
#   isolated  PARITY_SYSTEM_SITE=1 nox -s patch: one env per variant on the image's packages, flash
#             wheels from .wheels/ (the image itself has no flash package), all 14 models, merge
#   plan      build_flash fa3/fa2 --dry-run: arch from the GPU, head dims from the registry, flags, jobs
#   build     build_flash fa3, the same again (cached), build_flash fa2, then patch(fa2) patch(fa3)
#             through isolated envs whose only flash wheels are the ones just built
#   novenv    both flash wheels into the image's python3, nox --no-venv -s patch: all three variants
#             in one interpreter that has every package
#   e2e       nox --no-venv -s e2e -- $E2E_MODELS (text, MoE, VLM): on one GPU the sp1 layouts of
#             every variant, compared across variants
# Knobs: TOTAL_S (phase budget), BUILD_MAX_S (build phase limit, 400), FA3_TIMEOUT, FA2_TIMEOUT (compiler limits,
# 300 s), ISOLATED_MAX_S (230), ISOLATED_REQUIRE (the --require options of the isolated run), ISOLATED_SESSIONS ("patch", or e.g. "patch(fa3)"), NOVENV_MAX_S (200), NOVENV_MODELS (all), ISOLATED_WHEELHOUSE (.wheels), BUILD_TARGETS ("fa3 fa2"), IMAGE_WHEELS (.wheels), BUILT_ISOLATE=0 (the suites on the built wheels in one process per variant, to fit one call).
# Outputs ($OUT, at most 8 files): summary.txt, <phase>.txt (key lines and merge tables), envs.txt
# (per-env packages from the records' fingerprints), logs.tar.gz (full logs, results JSON, build logs).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/.nox/issue12-out}
PHASES=${PHASES:-"isolated plan novenv"}
TOTAL_S=${TOTAL_S:-450}             # no phase starts (or runs) past this many seconds of the script
E2E_MODELS=${E2E_MODELS:-"qwen3 qwen2_vl"}
FA3_SRC=${FA3_SRC:-$ROOT/.vendor/flash-attention-3-src.tar.gz}
FA2_SRC=${FA2_SRC:-$ROOT/.vendor/flash_attn-2.8.3.post2.tar.gz}
IMAGE_WHEELS=${IMAGE_WHEELS:-.wheels}   # novenv/e2e: the flash wheels put into the image (.built/wheelhouse-built: the built ones)
W=$ROOT/.nox/issue12
BUILT=$W/wheelhouse-built
mkdir -p "$OUT" "$W/logs" "$W/results"
SUM=$OUT/summary.txt
: > "$SUM"
say() { echo "$*" | tee -a "$SUM"; }
has() { [[ " $PHASES " == *" $1 "* ]]; }

finish() {
    python3 - "$W" > "$OUT/envs.txt" 2>&1 <<'PY'
import glob, json, os, sys
w = sys.argv[1]
print("per-record fingerprints (first record of each results file):")
seen = set()
for path in sorted(glob.glob(f"{w}/results/*/*/*/*.json")):
    if path.endswith(("_run.json", "summary.json")):
        continue
    try:
        data = json.load(open(path))
        fp = data["records"][0]["fingerprint"]
    except Exception:
        continue
    run = os.path.relpath(path, f"{w}/results").split(os.sep)
    key = (run[0], run[1], run[2], fp.get("env"), fp.get("flash_attn"), fp.get("flash_attn_3"))
    if key in seen:
        continue
    seen.add(key)
    print(f"  {run[0]:<9} {run[1]:<6} {run[2]:<6} env={fp.get('env')} flash_attn={fp.get('flash_attn')} "
          f"flash_attn_3={fp.get('flash_attn_3')} kernels={fp.get('kernels')} torch={fp.get('torch')} "
          f"transformers={fp.get('transformers')} device={fp.get('device')}")
print("packages installed in each PARITY_SYSTEM_SITE env itself (not from the image):")
for pth in sorted(glob.glob(".nox/*/lib/python*/site-packages/_parity_system_site.pth")):
    site = os.path.dirname(pth)
    own = sorted(d[: -len(".dist-info")] for d in os.listdir(site) if d.endswith(".dist-info"))
    own = [d for d in own if not d.startswith(("pip-", "setuptools-", "wheel-"))]
    print(f"  {site.split('/')[1]:<14} {', '.join(own) or '(none)'}")
PY
    for f in "$W"/*.txt; do [[ -e $f ]] && cp "$f" "$OUT/"; done
    tar -czf "$OUT/logs.tar.gz" --exclude=weights --exclude="*.pt" -C "$W" logs results \
        $(cd "$W" && ls -d wheelhouse-built/*.json wheelhouse-built/flash*.whl wheelhouse-built/logs 2>/dev/null) 2>/dev/null
    say "total wall ${SECONDS}s"
}
trap finish EXIT

# run_phase NAME MAX_SECONDS CMD...: bounded by what is left of TOTAL_S; key lines into $W/NAME.txt
run_phase() {
    local name=$1 max=$2 left t0 rc
    shift 2
    left=$((TOTAL_S - SECONDS))
    if ((left < 45)); then say "[$name] SKIPPED: time budget (${SECONDS}s of ${TOTAL_S}s used)"; return 0; fi
    ((max > left)) && max=$left
    t0=$SECONDS
    say "[$name] start (limit ${max}s): $*"
    timeout -k 10 "$max" "$@" >> "$W/logs/$name.log" 2>&1
    rc=$?
    grep -aE '^=+ .*(passed|failed|error).* in [0-9.]+s|^(nox > |merge: |\[exit |summary: )|^(patch|e2e) +[a-z0-9_]+ +(eager|fa2|fa3) |^suite +model|build_flash|^E +|Error' \
        "$W/logs/$name.log" | grep -av 'Running session\|uv binary' | cut -c1-700 >> "$W/$name.txt"
    say "[$name] rc=$rc wall=$((SECONDS - t0))s $( ((rc == 124)) && echo '(TIMED OUT)')"
    grep -aE '^=+ .* in [0-9.]+s|^nox > \* |^merge: |^\[exit |^nox > build_flash [a-z0-9]+: (built|cached|narrowed|dry run)|^nox > Session build_flash (skipped|failed)' \
        "$W/logs/$name.log" | sed "s/^/[$name]   /" | cut -c1-400 | tee -a "$SUM"
    return $rc
}

image_flash() {
    python3 -c 'import importlib.metadata as m
for d in ("flash-attn", "flash-attn-3", "kernels", "einops", "ninja"):
    try: v = m.version(d)
    except m.PackageNotFoundError: v = None
    print(f"{d}={v}", end=" ")'
}

say "issue12 GPU run: phases [$PHASES], $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null)"
say "device: $(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>&1 | head -1)"
say "python3: $(command -v python3) $(python3 -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)' 2>&1)"
say "nvcc: $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo none); cores $(nproc); $(grep MemAvailable /proc/meminfo)"
ls .wheels .whl .vendor > "$W/logs/carried.txt" 2>&1
python3 -m pip install -q --disable-pip-version-check --no-index --find-links .whl nox > "$W/logs/setup.log" 2>&1 \
    || { say "cannot install nox from .whl/: $(tail -2 "$W/logs/setup.log")"; exit 1; }
say "nox: $(python3 -m nox --version 2>&1 | tail -1); image before: $(image_flash)"
export HF_HUB_OFFLINE=1
if has isolated || has build; then  # a warm machine may still hold the novenv phase's flash packages
    python3 -m pip uninstall -y -q flash-attn flash-attn-3 > /dev/null 2>&1 && say "image cleaned: $(image_flash)"
fi

if has isolated; then
    run_phase isolated "${ISOLATED_MAX_S:-230}" env PARITY_SYSTEM_SITE=1 PARITY_WHEELHOUSE="${ISOLATED_WHEELHOUSE:-$ROOT/.wheels}" \
        python3 -m nox -s ${ISOLATED_SESSIONS:-patch} -- --results "$W/results/isolated" ${ISOLATED_REQUIRE---require fa2 --require fa3}
    say "[isolated]   image after (must be unchanged): $(image_flash)"
    # the same records held to --require: every fa2/fa3 mode recorded skipped or unsupported is named
    PYTHONPATH=$ROOT/src timeout 60 python3 -m parity.merge --results "$W/results/isolated" \
        --require fa2 --require fa3 > "$W/isolated-require.txt" 2>&1
    say "[isolated]   merge --require fa2 --require fa3: exit $?; $(grep -ac 'require' "$W/isolated-require.txt") lines name a required mode"
    grep -a 'require\|verdict=' "$W/isolated-require.txt" | cut -c1-300 | head -30 | sed 's/^/[isolated]     /' | tee -a "$SUM"
fi

if has plan; then
    mkdir -p "$BUILT" && cp .wheels/einops-*.whl .wheels/ninja-*.whl .wheels/wheel-*.whl "$BUILT/" 2>/dev/null
    run_phase plan 90 bash -c "
        export PARITY_SYSTEM_SITE=1 PARITY_WHEELHOUSE='$BUILT'
        python3 -m nox -s build_flash -- fa3 --source '$FA3_SRC' --dry-run &&
        python3 -m nox -s build_flash -- fa2 --source '$FA2_SRC' --dry-run"
fi

if has build; then
    mkdir -p "$BUILT" && cp .wheels/einops-*.whl .wheels/ninja-*.whl .wheels/wheel-*.whl "$BUILT/" 2>/dev/null
    # wheels build_flash made on an earlier machine, carried back (.built/wheelhouse-built: the wheel and its
    # <wheel>.json): the same (source, torch, CUDA, arch, flags) key makes build_flash answer "cached"
    if compgen -G ".built/wheelhouse-built/flash*.whl" > /dev/null; then
        cp -n .built/wheelhouse-built/flash*.whl .built/wheelhouse-built/flash*.whl.json "$BUILT/"
        say "[build] seeded from .built/wheelhouse-built: $(cd .built/wheelhouse-built && ls flash*.whl | tr '\n' ' ')"
    fi
    BUILD_TARGETS=${BUILD_TARGETS:-"fa3 fa2"}   # which wheels to build (the first is also rebuilt: cached)
    first=${BUILD_TARGETS%% *}
    steps=""
    for t in $BUILD_TARGETS; do
        src=$FA3_SRC; lim=${FA3_TIMEOUT:-300}
        [[ $t == fa2 ]] && { src=$FA2_SRC; lim=${FA2_TIMEOUT:-300}; }
        steps+="python3 -m nox -s build_flash -- $t --source '$src' --timeout $lim; "
        [[ $t == "$first" ]] && steps+="python3 -m nox -s build_flash -- $t --source '$src'; "
    done
    sessions=$(for t in $BUILD_TARGETS; do printf "'patch(%s)' " "$t"; done)
    requires=$(for t in $BUILD_TARGETS; do printf -- "--require %s " "$t"; done)
    run_phase build ${BUILD_MAX_S:-400} bash -c "
        export PARITY_SYSTEM_SITE=1 PARITY_WHEELHOUSE='$BUILT'
        $steps
        ls -la '$BUILT'
        PARITY_ISOLATE=${BUILT_ISOLATE:-1} python3 -m nox -s $sessions -- --results '$W/results/built' $requires"
    grep -ahE '"build_s"|"wheel"|"jobs"|"head_dims"' "$BUILT"/*.whl.json 2>/dev/null | tr -s ' ' | tee -a "$W/build.txt" | sed 's/^/[build]   /' >> "$SUM"
fi

if has novenv || has e2e; then
    python3 -m pip install -q --disable-pip-version-check --no-index --no-deps \
        "$IMAGE_WHEELS"/flash_attn-2*.whl "$IMAGE_WHEELS"/flash_attn_3-*.whl > "$W/logs/image_install.log" 2>&1
    say "image now holds: $(image_flash)"
fi

if has novenv; then
    run_phase novenv "${NOVENV_MAX_S:-200}" python3 -m nox --no-venv -s patch -- ${NOVENV_MODELS:-} --results "$W/results/novenv" --require fa2 --require fa3
fi

if has e2e; then
    # shellcheck disable=SC2086
    run_phase e2e 150 python3 -m nox --no-venv -s e2e -- $E2E_MODELS --results "$W/results/e2e" --timeout 300 \
        --require fa2 --require fa3
fi
