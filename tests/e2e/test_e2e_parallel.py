"""e2e parallel training parity: FSDP2 + Ulysses sp (1, 2) + expert parallelism (1, 2 for MoE).

Each layout is a real training run of ``python -m parity.train`` (2 epochs x 2 steps, AdamW) under
the hang-safe launcher; the runner (:mod:`parity.harness.e2e_runner`) trains every layout of a model
on the same CPU-seeded weights and global batch and records it, and the test asserts the merge's
rules: every layout's per-step loss and grad norm agree with ``sp1_ep1``, no dead runs, every
requested backend ran. Records land under ``$PARITY_RESULTS/e2e/<variant>/<model>.json``.

The cases come from the case registry (``toy_config/registry.toml``): ``max_sp_size`` there limits
the sp sizes (with its reason), MoE models also get every ep size.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from parity import settings as parity_settings  # noqa: E402
from parity.harness import e2e_runner as e2e  # noqa: E402
from parity.harness.launch import launch  # noqa: E402
from parity.results import registry  # noqa: E402
from parity.results.compare import effective_tolerance  # noqa: E402
from parity.results.compare import record_failures as failures  # noqa: E402
from parity.results.merge import EXIT_BREACH, merge  # noqa: E402
from parity.results.records import RunManifest, Tolerance, run_manifest_path, write_json_atomic  # noqa: E402

HANG_TIMEOUT_S = parity_settings.get("PARITY_E2E_HANG_TIMEOUT_S")
HANG_PG_TIMEOUT_S = parity_settings.get("PARITY_E2E_HANG_PG_TIMEOUT_S")

# No per-test timeout marker: each training run has the launcher's watchdog, and the nox session
# passes pytest-timeout's per-model --timeout, which a marker would override.
pytestmark = [pytest.mark.distributed]


def _params(family: tuple[str, ...]) -> list:
    return [
        pytest.param(c.id, c.config_arg, c.is_moe, c.e2e_rtol, c.e2e_atol, c.max_sp_size, id=c.id)
        for c in registry.cases_for("e2e")
        if c.family in family
    ]


text_test_cases = _params(("text",))
vlm_test_cases = _params(("vlm", "omni"))


def _settings(tmp_path_factory: pytest.TempPathFactory) -> e2e.E2ESettings:
    """With a single rank only sp1_ep1 runs; the other layouts are recorded as skipped, with why."""
    return e2e.E2ESettings.from_env(default_results=tmp_path_factory.mktemp("results"))


def _per_test_timeout(config: pytest.Config) -> float | None:
    try:
        return config.getoption("timeout", default=None) or config.getini("timeout") or None
    except ValueError:  # pytest-timeout not installed
        return None


@pytest.fixture(scope="module")
def shared_job(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every selected model's layouts in one job, started by the first test that needs it.

    Only when no per-test timeout is in force (``nox -s tests``, plain pytest): ``nox -s e2e``
    passes ``--timeout`` per model, which one job for all models would outlast, so there each
    model gets its own job (``run_case`` starts it). Either way each test asserts on its own model.
    """
    if _per_test_timeout(request.config):
        return
    models = []
    for item in request.session.items:
        if getattr(item, "module", None) is request.module and item.originalname in (
            "test_text_parallel_align",
            "test_vlm_parallel_align",
        ):
            p = item.callspec.params
            models.append((p["config_path"], p["is_moe"], p["max_sp_size"]))
    if len(models) > 1:
        settings = _settings(tmp_path_factory)
        start = time.monotonic()
        e2e.prefetch(settings, models, tmp_path_factory.mktemp("e2e_shared"))
        print(f"\n[e2e] shared job: {len(models)} models in {time.monotonic() - start:.1f}s", file=sys.stderr)


def _check(model_name, config_path, is_moe, rtol, atol, max_sp_size, tmp_path_factory) -> None:
    settings = _settings(tmp_path_factory)
    work = tmp_path_factory.mktemp(f"e2e_{model_name}")
    records = e2e.run_case(model_name, config_path, is_moe, rtol, atol, max_sp_size, settings, work)
    problems = failures(records)
    where = f"{model_name} ({settings.run.variant}, {settings.nproc} ranks)"
    assert not problems, f"{where}:\n" + "\n".join(problems)


@pytest.mark.parametrize("model_name, config_path, is_moe, rtol, atol, max_sp_size", text_test_cases)
def test_text_parallel_align(
    shared_job, tmp_path_factory, model_name, config_path, is_moe, rtol, atol, max_sp_size
) -> None:
    _check(model_name, config_path, is_moe, rtol, atol, max_sp_size, tmp_path_factory)


@pytest.mark.parametrize("model_name, config_path, is_moe, rtol, atol, max_sp_size", vlm_test_cases)
def test_vlm_parallel_align(
    shared_job, tmp_path_factory, model_name, config_path, is_moe, rtol, atol, max_sp_size
) -> None:
    _check(model_name, config_path, is_moe, rtol, atol, max_sp_size, tmp_path_factory)


# --------------------------------------------------------------------------------------------
# negative controls: the comparison must be able to fail, and a hang must be reported


_CONTROL_CONFIG = "./toy_config/qwen3_toy/config.json"


def test_planted_ulysses_fault_fails_the_comparison(tmp_path_factory) -> None:
    """PARITY_FAULT=ulysses_swap (sequence chunks reassembled in the wrong order) at sp=2 must breach."""
    settings = _settings(tmp_path_factory)
    if settings.skip_reason(e2e.ParallelMode(2, 1)):
        pytest.skip(settings.skip_reason(e2e.ParallelMode(2, 1)))
    work = tmp_path_factory.mktemp("e2e_fault")
    tolerance = effective_tolerance(Tolerance(*registry.E2E_TOLERANCE), settings.dtype_name)
    records = []
    for mode, fault in ((e2e.ParallelMode(1, 1), ""), (e2e.ParallelMode(2, 1), "ulysses_swap")):
        record = e2e.layout_record("qwen3", _CONTROL_CONFIG, settings, mode, False, tolerance, tolerance)
        e2e.fill_record(record, e2e.run_layout(settings, _CONTROL_CONFIG, mode, work, fault=fault))
        records.append(record)
    e2e.print_table("qwen3 [PARITY_FAULT=ulysses_swap at sp2]", records)
    faulty = records[1]
    assert faulty["status"] == "ok", f"the fault should corrupt numbers, not crash:\n{faulty.get('error')}"
    problems = failures(records)
    assert any("deviates" in p for p in problems), f"planted Ulysses fault went unnoticed: {problems}"


def _hang_began(log_dir, rank: int = 1) -> float | None:
    """Wall time at which the planted hang began, as the fault printed it in the rank's stdout."""
    for path in log_dir.glob(f"ranks/*/attempt_*/{rank}/stdout.log"):
        match = re.search(r"planted hang\) at t=([0-9.]+)", path.read_text(errors="replace"))
        if match:
            return float(match.group(1))
    return None


@pytest.mark.timeout(HANG_TIMEOUT_S + 120)
def test_planted_hang_is_reported_with_stacks(tmp_path) -> None:
    """Rank 1 skips a collective: the job must fail with every rank's stack, soon after the hang
    begins, and leave no process behind.

    Production's defence reports it: the process-group timeout (``PARITY_E2E_HANG_PG_TIMEOUT_S``,
    gloo raises / the NCCL watchdog aborts the rank and dumps the flight recorder), then torchrun
    SIGTERMs the other rank, whose faulthandler dumps its stack. The launcher's watchdog
    (``PARITY_E2E_HANG_TIMEOUT_S``) is the backstop; its own path is tested in test_launch.py.
    Measured: seconds from the hang to the report (target: 60 on CPU, 30 on GPUs). Runs on NCCL when
    two GPUs are visible, else on gloo."""
    on_gpus = torch.cuda.device_count() >= 2
    args = [
        "-m", "parity.train",
        "--config", str(registry.case("llama").config),
        "--out", str(tmp_path / "out"),
        "--attn", "parity_sdpa_with_sp",
        "--dtype", "float32",
    ]  # fmt: skip
    env = e2e.child_env(
        PARITY_FAULT="skip_collective_rank1",
        PARITY_PG_TIMEOUT_S=f"{HANG_PG_TIMEOUT_S:g}",
        **({} if on_gpus else {"CUDA_VISIBLE_DEVICES": ""}),  # CPU: gloo
    )
    result = launch(args, nproc=2, timeout_s=HANG_TIMEOUT_S, log_dir=tmp_path / "logs", env=env)
    reported = time.time()
    began = _hang_began(result.log_dir)
    print(result.summary(), file=sys.stderr)
    took = reported - began if began is not None else math.nan
    fr_dumps = sorted(p.name for p in (result.log_dir / "fr").glob("*"))
    print(
        f"[e2e] hang control ({'nccl' if on_gpus else 'gloo'}): status={result.status} "
        f"hang-to-report={took:.1f}s (pg timeout {HANG_PG_TIMEOUT_S:g}s) launch={result.elapsed_s:.1f}s "
        f"cause: {result.cause()}; flight-recorder dumps: {fr_dumps or 'none'}; survivors={result.survivors}",
        file=sys.stderr,
    )
    assert began is not None, (
        f"rank 1 never reached the planted hang within {HANG_TIMEOUT_S:g}s "
        f"(raise PARITY_E2E_HANG_TIMEOUT_S on a slow machine):\n{result.summary()}"
    )
    assert result.status == "crash", f"the collective layer did not report the hang:\n{result.summary()}"
    assert result.survivors == [], result.summary()
    assert "_stall_forever" in result.stacks.get(1, ""), f"rank 1's stack is missing:\n{result.summary()}"
    rank0 = result.stacks.get(0, "") + _read(result.rank_logs.get(0), "stderr.log")
    assert "total_grad_norm" in rank0, f"rank 0 is not shown waiting in the collective:\n{result.summary()}"
    target = 30.0 if on_gpus else 60.0
    assert took <= target, f"hang reported {took:.1f}s after it began (target {target:g}s)"


def _read(folder, name: str) -> str:
    if folder is None:
        return ""
    try:
        return (folder / name).read_text(errors="replace")
    except OSError:
        return ""


def test_reference_failure_stops_the_model_and_names_the_cause(tmp_path_factory, tmp_path) -> None:
    """Rank 1 SIGKILLed in sp1_ep1 (PARITY_FAULT=sigkill_rank1): the other layouts are not trained,
    they read "reference sp1_ep1 failed: rank 1 killed by SIGKILL", and the merge's one-line detail
    names that root cause instead of the last line of a faulthandler dump."""
    settings = _settings(tmp_path_factory)
    if settings.nproc < 2:
        pytest.skip("the planted crash is on rank 1: needs 2 ranks")
    results = tmp_path / "results"  # never the session's folder: these records are a planted failure
    settings = dataclasses.replace(settings, run=dataclasses.replace(settings.run, results=results))
    case = registry.case("qwen3_moe")
    work = tmp_path / "work"
    start = time.monotonic()
    records = e2e.run_case(
        case.id, case.config_arg, case.is_moe, case.e2e_rtol, case.e2e_atol, case.max_sp_size,
        settings, work, fault="sigkill_rank1",
    )  # fmt: skip
    took = time.monotonic() - start
    print(f"[e2e] reference crash: {len(records)} layouts recorded in {took:.1f}s", file=sys.stderr)
    ref, rest = records[0], records[1:]
    assert ref["status"] == "error", ref
    assert ref["cause"] == "rank 1 killed by SIGKILL (first failure)", ref["cause"]
    assert rest and all(r["status"] in ("not_run", "skipped") for r in rest), [r["status"] for r in rest]
    for rec in rest:
        if rec["status"] == "not_run":
            assert rec["reason"] == "reference sp1_ep1 failed: rank 1 killed by SIGKILL (first failure)"
    assert sorted(p.name for p in work.iterdir()) == ["sp1_ep1"], "layouts after the failed reference ran"

    manifest = RunManifest("e2e", settings.run.variant, [case.id], "ran", exit_code=1)
    write_json_atomic(run_manifest_path(results, "e2e", settings.run.variant), manifest.to_json())
    report = merge(results, suites=["e2e"])
    rows = {r.mode: r for r in report.rows}
    assert rows["sp1_ep1"].verdict == "ERROR"
    assert rows["sp1_ep1"].detail == "rank 1 killed by SIGKILL (first failure)"
    assert rows["sp2_ep2"].verdict in ("REF-FAILED", "SKIPPED")
    assert report.exit_code == EXIT_BREACH, report.problems
