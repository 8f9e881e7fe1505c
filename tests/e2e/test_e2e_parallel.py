"""e2e parallel training parity: FSDP2 + Ulysses sp (1, 2) + expert parallelism (1, 2 for MoE).

Each layout is a real training run of ``parity.train`` (2 epochs x 2 steps, AdamW) started through
``parity.launch.launch`` (watchdog, per-rank stacks on a hang, no leftover processes). Every layout
trains the same CPU-seeded weights on the same synthetic global batch, and its per-step loss and
grad norm are compared, step by step, with the ``sp1_ep1`` run through the same rules the merge
uses (``parity.compare``): dead runs (non-finite, zero grad norm, a loss that never moves, wrong
step count) are refused, a requested backend that did not run is a failure. Records are written
under ``$PARITY_RESULTS/e2e/<variant>/<model>.json`` for ``nox -s merge``.

CPU: 2 gloo ranks, fp32, ``parity_sdpa_with_sp``; the case tolerances (sized for bf16) are tightened
to ``parity.patch_runner.FP32_TOLERANCE``. GPU: one rank per GPU (``PARITY_NPROC`` overrides),
NCCL, bf16 compute over fp32 master weights, parity's FA2 backend (per ``PARITY_VARIANT``).

Adding a model: append a ``pytest.param`` to ``text_test_cases`` (or ``vlm_test_cases`` for
vision/omni models); ``max_sp_size=1`` while the model cannot take the sequence split.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from parity import toy  # noqa: E402
from parity.compare import record_failures as failures  # noqa: E402
from parity.fingerprint import REPO_ROOT, fingerprint  # noqa: E402
from parity.launch import LaunchResult, launch  # noqa: E402
from parity.modes import EXPECTED_PROVIDER, PARITY_ATTENTION  # noqa: E402
from parity.patch_runner import RunSettings, effective_tolerance  # noqa: E402
from parity.records import ResultsWriter, Tolerance  # noqa: E402

SUITE = "e2e"
_DEFAULT_RTOL = 1e-1  # the seed's e2e defaults (bf16 training); fp32 runs are tightened
_DEFAULT_ATOL = 1e-1
_SP_SIZES = (1, 2)
_EP_SIZES = (1, 2)
STEPS_PER_EPOCH, EPOCHS = 2, 2
EXPECTED_STEPS = STEPS_PER_EPOCH * EPOCHS
SEED = 0
MOE_IMPLEMENTATION = "fused"
#: Watchdog of one training run (the nox session sets it from its per-model --timeout).
RUN_TIMEOUT_S = float(os.environ.get("PARITY_E2E_RUN_TIMEOUT_S", "300"))
HANG_TIMEOUT_S = float(os.environ.get("PARITY_E2E_HANG_TIMEOUT_S", "60"))
SRC = REPO_ROOT / "src"

# No per-test timeout marker: each training run has parity.launch's watchdog, and the nox session
# passes pytest-timeout's per-model --timeout, which a marker would override.
pytestmark = [pytest.mark.distributed]

text_test_cases = [
    pytest.param(
        "llama", "./toy_config/llama_toy/config.json", False, _DEFAULT_RTOL, _DEFAULT_ATOL, None, id="llama"
    ),
    pytest.param(
        "qwen2", "./toy_config/qwen2_toy/config.json", False, _DEFAULT_RTOL, _DEFAULT_ATOL, None, id="qwen2"
    ),
    pytest.param(
        "qwen3", "./toy_config/qwen3_toy/config.json", False, _DEFAULT_RTOL, _DEFAULT_ATOL, None, id="qwen3"
    ),
    pytest.param(
        "qwen3_moe",
        "./toy_config/qwen3_moe_toy/config.json",
        True,
        _DEFAULT_RTOL,
        _DEFAULT_ATOL,
        None,
        id="qwen3_moe",
    ),
    pytest.param(
        "seed_oss",
        "./toy_config/seed_oss_toy/config.json",
        False,
        _DEFAULT_RTOL,
        _DEFAULT_ATOL,
        None,
        id="seed_oss",
    ),
    pytest.param(
        "deepseek_v3",
        "./toy_config/deepseek_v3_toy/config.json",
        True,
        _DEFAULT_RTOL,
        _DEFAULT_ATOL,
        None,
        id="deepseek_v3",
    ),
    pytest.param(
        "qwen3_5",
        "./toy_config/qwen3_5_toy/config.json",
        False,
        _DEFAULT_RTOL,
        _DEFAULT_ATOL,
        1,  # max_sp_size: the GatedDeltaNet (linear attention) layers do not take the sequence split
        id="qwen3_5",
    ),
    pytest.param(
        "qwen3_5_moe",
        "./toy_config/qwen3_5_moe_toy/config.json",
        True,
        _DEFAULT_RTOL,
        _DEFAULT_ATOL,
        1,  # max_sp_size: as qwen3_5
        id="qwen3_5_moe",
    ),
]

vlm_test_cases = [
    pytest.param(
        "qwen2_vl",
        "./toy_config/qwen2_vl_toy/config.json",
        False,
        _DEFAULT_RTOL,
        _DEFAULT_ATOL,
        None,
        id="qwen2_vl",
    ),
    pytest.param(
        "qwen2_5_vl",
        "./toy_config/qwen2_5_vl_toy/config.json",
        False,
        _DEFAULT_RTOL,
        _DEFAULT_ATOL,
        None,
        id="qwen2_5_vl",
    ),
    pytest.param(
        "qwen3_vl",
        "./toy_config/qwen3_vl_toy/config.json",
        False,
        _DEFAULT_RTOL,
        _DEFAULT_ATOL,
        None,
        id="qwen3_vl",
    ),
    pytest.param(
        "qwen3_vl_moe",
        "./toy_config/qwen3_vl_moe_toy/config.json",
        True,
        _DEFAULT_RTOL,
        _DEFAULT_ATOL,
        None,
        id="qwen3_vl_moe",
    ),
    pytest.param(
        "qwen2_5_omni",
        "./toy_config/qwen2_5_omni_toy/config.json",
        False,
        _DEFAULT_RTOL,
        _DEFAULT_ATOL,
        None,
        id="qwen2_5_omni",
    ),
    pytest.param(
        "qwen3_omni_moe",
        "./toy_config/qwen3_omni_moe_toy/config.json",
        True,
        _DEFAULT_RTOL,
        _DEFAULT_ATOL,
        None,
        id="qwen3_omni_moe",
    ),
]


# --------------------------------------------------------------------------------------------
# layouts and runs


@dataclass(frozen=True)
class ParallelMode:
    sp: int
    ep: int

    @property
    def id(self) -> str:
        return f"sp{self.sp}_ep{self.ep}"


def parallel_modes(
    is_moe: bool, max_sp_size: int | None, max_ep_size: int | None = None
) -> list[ParallelMode]:
    """sp1_ep1 (the reference) first; MoE models also get every ep size."""
    sps = [s for s in _SP_SIZES if max_sp_size is None or s <= max_sp_size]
    eps = [e for e in (_EP_SIZES if is_moe else (1,)) if max_ep_size is None or e <= max_ep_size]
    return [ParallelMode(sp, ep) for sp in sps for ep in eps]


@dataclass(frozen=True)
class E2ESettings:
    run: RunSettings  # variant, device, dtype, results folder (from the nox session's environment)
    nproc: int
    attn: str

    @classmethod
    def from_env(cls, default_results: Path) -> E2ESettings:
        run = RunSettings.from_env(default_results)
        if os.environ.get("PARITY_NPROC"):
            nproc = int(os.environ["PARITY_NPROC"])
        else:
            nproc = torch.cuda.device_count() if run.device.type == "cuda" else 2
        attn = os.environ.get("PARITY_E2E_ATTN")
        if not attn:  # CPU: the sdpa-based backend; GPU: the variant's flash backend
            attn = PARITY_ATTENTION[run.variant][-1] if run.device.type == "cuda" else "parity_sdpa_with_sp"
        return cls(run=run, nproc=nproc, attn=attn)

    @property
    def dtype_name(self) -> str:
        return str(self.run.dtype).removeprefix("torch.")

    def skip_reason(self, mode: ParallelMode) -> str | None:
        for name, size in (("sp", mode.sp), ("ep", mode.ep)):
            if self.nproc % size:
                return f"{name}={size} needs a rank count divisible by {size}; this run has {self.nproc}"
        return None


@dataclass
class LayoutRun:
    mode: ParallelMode
    result: LaunchResult
    log_dict: dict[str, Any] | None
    meta: dict[str, Any] | None


_RUNS: dict[tuple, LayoutRun] = {}  # the negative controls reuse reference runs of the same session


def _config_file(config_path: str) -> Path:
    path = Path(config_path)
    return path if path.is_absolute() or path.exists() else REPO_ROOT / path


def run_layout(
    settings: E2ESettings, config_path: str, mode: ParallelMode, work: Path, *, fault: str = ""
) -> LayoutRun:
    """One training run of one layout (cached per session by its arguments)."""
    config = _config_file(config_path)
    key = (str(config), mode, settings.attn, settings.dtype_name, settings.nproc, fault)
    if key in _RUNS:
        return _RUNS[key]
    out = work / mode.id / "out"
    args = [
        "-m", "parity.train",
        "--config", str(config),
        "--sp", str(mode.sp),
        "--ep", str(mode.ep),
        "--steps-per-epoch", str(STEPS_PER_EPOCH),
        "--epochs", str(EPOCHS),
        "--out", str(out),
        "--attn", settings.attn,
        "--moe", MOE_IMPLEMENTATION,
        "--dtype", settings.dtype_name,
        "--seed", str(SEED),
    ]  # fmt: skip
    pythonpath = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "PARITY_FAULT": fault}
    result = launch(
        args, nproc=settings.nproc, timeout_s=RUN_TIMEOUT_S, log_dir=work / mode.id / "logs", env=env
    )
    log_dict = meta = None
    if result.status == "ok":
        log_dict = json.loads((out / "log_dict.json").read_text())
        meta = json.loads((out / "run_meta.json").read_text())
    run = LayoutRun(mode, result, log_dict, meta)
    _RUNS[key] = run
    return run


# --------------------------------------------------------------------------------------------
# records and verdicts (the merge's rules)


def make_record(
    case_id: str,
    config_path: str,
    settings: E2ESettings,
    mode: ParallelMode,
    is_moe: bool,
    tolerance: Tolerance,
    case_tolerance: Tolerance,
) -> dict[str, Any]:
    requested: dict[str, Any] = {"attn_implementation": settings.attn}
    if is_moe:
        requested["moe_implementation"] = MOE_IMPLEMENTATION
    provider = EXPECTED_PROVIDER.get((settings.run.variant, settings.attn))
    if provider:
        requested["kernel_provider"] = provider
    config_hash = toy.config_hash(_config_file(config_path))
    return {
        "suite": SUITE,
        "model": case_id,
        "variant": settings.run.variant,
        "mode": {
            "id": mode.id,
            "modeling_backend": "parity",
            "attn_implementation": settings.attn,
            "moe_implementation": MOE_IMPLEMENTATION if is_moe else None,
            "sp": mode.sp,
            "ep": mode.ep,
        },
        "requested": requested,
        "expected_steps": EXPECTED_STEPS,
        "tolerance": tolerance.to_json(),
        "case_tolerance": case_tolerance.to_json(),
        "fingerprint": fingerprint(
            device=settings.run.device, dtype=settings.run.dtype, seed=SEED, config_hash=config_hash
        ),
        "nproc": settings.nproc,
    }


def fill_record(record: dict[str, Any], run: LayoutRun) -> dict[str, Any]:
    """Status, metrics and what actually ran, from the trainer's outputs (or the launch failure)."""
    record["launch"] = {
        "status": run.result.status,
        "elapsed_s": round(run.result.elapsed_s, 2),
        "log_dir": str(run.result.log_dir),
    }
    if run.log_dict is None or run.meta is None:
        record.update(status="error", error=run.result.summary(), resolved={}, metrics={})
        return record
    resolved = {
        k: v
        for k, v in run.meta["resolved"].items()
        if k in ("attn_implementation", "moe_implementation", "kernel_provider", "experts_provider")
    }
    record.update(
        status="ok",
        resolved=resolved,
        metrics={
            "loss": run.log_dict["loss"],
            "grad_norm": run.log_dict["grad_norm"],
            "wall_s": round(run.result.elapsed_s, 2),
            "train_s": run.meta["train_s"],
        },
        layout=run.meta["layout"],
        fingerprint=run.meta["fingerprint"],  # where the ranks really ran
    )
    return record


def print_table(case_id: str, records: list[dict[str, Any]]) -> None:
    """Per layout and step: |loss - ref|, |grad_norm - ref|; wall time of each run."""
    ref = records[0]
    print(f"\n[e2e] {case_id}: per-step deviation from {ref['mode']['id']}", file=sys.stderr)
    for rec in records:
        head = f"[e2e]   {rec['mode']['id']:<8} {rec['status']:<7}"
        if rec["status"] != "ok" or ref["status"] != "ok":
            print(f"{head} {rec.get('reason') or ''}", file=sys.stderr)
            continue
        m, r = rec["metrics"], ref["metrics"]
        dl = [abs(a - b) for a, b in zip(m["loss"], r["loss"], strict=False)]
        dg = [abs(a - b) for a, b in zip(m["grad_norm"], r["grad_norm"], strict=False)]
        print(
            f"{head} wall {m['wall_s']:6.1f}s  loss {' '.join(f'{v:.8f}' for v in m['loss'])}  "
            f"|dloss| {' '.join(f'{v:.1e}' for v in dl)}  |dgnorm| {' '.join(f'{v:.1e}' for v in dg)}",
            file=sys.stderr,
        )


# --------------------------------------------------------------------------------------------
# the tests


def _settings(tmp_path_factory: pytest.TempPathFactory) -> E2ESettings:
    """With a single rank only sp1_ep1 runs; the other layouts are recorded as skipped, with why."""
    return E2ESettings.from_env(default_results=tmp_path_factory.mktemp("results"))


def run_case(
    case_id: str,
    config_path: str,
    is_moe: bool,
    rtol: float,
    atol: float,
    max_sp_size: int | None,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    settings = _settings(tmp_path_factory)
    case_tolerance = Tolerance(rtol, atol)
    tolerance = effective_tolerance(case_tolerance, settings.run.dtype)
    modes = parallel_modes(is_moe, max_sp_size)
    writer = ResultsWriter(settings.run.results, SUITE, settings.run.variant, case_id, [m.id for m in modes])
    work = tmp_path_factory.mktemp(f"e2e_{case_id}")
    records = []
    for mode in modes:
        record = make_record(case_id, config_path, settings, mode, is_moe, tolerance, case_tolerance)
        reason = settings.skip_reason(mode)
        if reason:
            record.update(status="skipped", reason=reason, resolved={}, metrics={})
        else:
            fill_record(record, run_layout(settings, config_path, mode, work))
        writer.add(record)
        records.append(record)
    print_table(case_id, records)
    problems = failures(records)
    assert not problems, f"{case_id} ({settings.run.variant}, {settings.nproc} ranks):\n" + "\n".join(
        problems
    )


@pytest.mark.parametrize("model_name, config_path, is_moe, rtol, atol, max_sp_size", text_test_cases)
def test_text_parallel_align(
    tmp_path_factory, model_name, config_path, is_moe, rtol, atol, max_sp_size
) -> None:
    run_case(model_name, config_path, is_moe, rtol, atol, max_sp_size, tmp_path_factory)


@pytest.mark.parametrize("model_name, config_path, is_moe, rtol, atol, max_sp_size", vlm_test_cases)
def test_vlm_parallel_align(
    tmp_path_factory, model_name, config_path, is_moe, rtol, atol, max_sp_size
) -> None:
    run_case(model_name, config_path, is_moe, rtol, atol, max_sp_size, tmp_path_factory)


# --------------------------------------------------------------------------------------------
# negative controls: the comparison must be able to fail, and a hang must be reported


_CONTROL_CONFIG = "./toy_config/qwen3_toy/config.json"


def test_planted_ulysses_fault_fails_the_comparison(tmp_path_factory) -> None:
    """PARITY_FAULT=ulysses_swap (sequence chunks reassembled in the wrong order) at sp=2 must breach."""
    settings = _settings(tmp_path_factory)
    if settings.skip_reason(ParallelMode(2, 1)):
        pytest.skip(settings.skip_reason(ParallelMode(2, 1)))
    work = tmp_path_factory.mktemp("e2e_fault")
    tolerance = effective_tolerance(Tolerance(_DEFAULT_RTOL, _DEFAULT_ATOL), settings.run.dtype)
    records = []
    for mode, fault in ((ParallelMode(1, 1), ""), (ParallelMode(2, 1), "ulysses_swap")):
        record = make_record("qwen3", _CONTROL_CONFIG, settings, mode, False, tolerance, tolerance)
        fill_record(record, run_layout(settings, _CONTROL_CONFIG, mode, work, fault=fault))
        records.append(record)
    print_table("qwen3 [PARITY_FAULT=ulysses_swap at sp2]", records)
    faulty = records[1]
    assert faulty["status"] == "ok", f"the fault should corrupt numbers, not crash:\n{faulty.get('error')}"
    problems = failures(records)
    assert any("deviates" in p for p in problems), f"planted Ulysses fault went unnoticed: {problems}"


@pytest.mark.timeout(HANG_TIMEOUT_S + 120)
def test_planted_hang_is_reported_with_stacks(tmp_path) -> None:
    """Rank 1 skips a collective: the launcher must report a timeout with both ranks' stacks and
    leave no process behind. The process-group timeout is raised above the watchdog's so the
    watchdog (not gloo's own timeout) is what stops the job."""
    args = [
        "-m", "parity.train",
        "--config", str(_config_file("./toy_config/llama_toy/config.json")),
        "--out", str(tmp_path / "out"),
        "--attn", "parity_sdpa_with_sp",
        "--dtype", "float32",
    ]  # fmt: skip
    pythonpath = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    env = {
        "PYTHONPATH": pythonpath,
        "OMP_NUM_THREADS": "1",
        "PARITY_FAULT": "skip_collective_rank1",
        "PARITY_PG_TIMEOUT_S": str(10 * HANG_TIMEOUT_S),
        "CUDA_VISIBLE_DEVICES": "",  # CPU/gloo: the fault is about the harness, not the GPU
    }
    result = launch(args, nproc=2, timeout_s=HANG_TIMEOUT_S, log_dir=tmp_path / "logs", env=env)
    print(result.summary(), file=sys.stderr)
    print(
        f"[e2e] hang control: status={result.status} elapsed={result.elapsed_s:.1f}s "
        f"hung_ranks={result.hung_ranks} survivors={result.survivors}",
        file=sys.stderr,
    )
    assert result.status == "timeout", result.summary()
    assert result.survivors == [], result.summary()
    assert sorted(result.stacks) == [0, 1], result.summary()
    assert "_stall_forever" in result.stacks[1], (
        f"rank 1 never reached the planted hang within {HANG_TIMEOUT_S:g}s "
        f"(raise PARITY_E2E_HANG_TIMEOUT_S on a slow machine):\n{result.summary()}"
    )
    assert "total_grad_norm" in result.stacks[0], (
        f"rank 0 is not waiting in the collective:\n{result.summary()}"
    )
