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

import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from parity import settings as parity_settings  # noqa: E402
from parity.harness import e2e_runner as e2e  # noqa: E402
from parity.harness.launch import launch  # noqa: E402
from parity.results import registry  # noqa: E402
from parity.results.compare import effective_tolerance  # noqa: E402
from parity.results.compare import record_failures as failures  # noqa: E402
from parity.results.records import Tolerance  # noqa: E402

HANG_TIMEOUT_S = parity_settings.get("PARITY_E2E_HANG_TIMEOUT_S")

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


def _check(model_name, config_path, is_moe, rtol, atol, max_sp_size, tmp_path_factory) -> None:
    settings = _settings(tmp_path_factory)
    work = tmp_path_factory.mktemp(f"e2e_{model_name}")
    records = e2e.run_case(model_name, config_path, is_moe, rtol, atol, max_sp_size, settings, work)
    problems = failures(records)
    where = f"{model_name} ({settings.run.variant}, {settings.nproc} ranks)"
    assert not problems, f"{where}:\n" + "\n".join(problems)


@pytest.mark.parametrize("model_name, config_path, is_moe, rtol, atol, max_sp_size", text_test_cases)
def test_text_parallel_align(
    tmp_path_factory, model_name, config_path, is_moe, rtol, atol, max_sp_size
) -> None:
    _check(model_name, config_path, is_moe, rtol, atol, max_sp_size, tmp_path_factory)


@pytest.mark.parametrize("model_name, config_path, is_moe, rtol, atol, max_sp_size", vlm_test_cases)
def test_vlm_parallel_align(
    tmp_path_factory, model_name, config_path, is_moe, rtol, atol, max_sp_size
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


@pytest.mark.timeout(HANG_TIMEOUT_S + 120)
def test_planted_hang_is_reported_with_stacks(tmp_path) -> None:
    """Rank 1 skips a collective: the launcher must report a timeout with both ranks' stacks and
    leave no process behind. The process-group timeout is raised above the watchdog's so the
    watchdog (not gloo's own timeout) is what stops the job."""
    args = [
        "-m", "parity.train",
        "--config", str(registry.case("llama").config),
        "--out", str(tmp_path / "out"),
        "--attn", "parity_sdpa_with_sp",
        "--dtype", "float32",
    ]  # fmt: skip
    env = e2e.child_env(
        PARITY_FAULT="skip_collective_rank1",
        PARITY_PG_TIMEOUT_S=str(10 * HANG_TIMEOUT_S),
        CUDA_VISIBLE_DEVICES="",  # CPU/gloo: the fault is about the harness, not the GPU
    )
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
