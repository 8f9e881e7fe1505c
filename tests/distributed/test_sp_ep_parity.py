"""Ulysses sp=2 vs sp=1 and fused-MoE ep=2 vs ep=1, two gloo processes on CPU (NCCL on GPU).

The worker (``parity.harness.checks.sp_ep_check``: the cases of ``ulysses_check`` and ``moe_ep_check``)
does the comparisons and writes one JSON per rank; these tests launch it through
``parity.harness.launch`` (watchdog, no leftover processes) and print the observed deviations. The same
worker runs once more with faults injected (``PARITY_FAULT=ulysses_swap,ep_drop``) to show the
comparisons fail when an exchange is wrong. Both faults go into one launch to save start-up time:
sp cases never call the experts and ep cases never activate an sp group, so every failing case
has exactly one fault to blame.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from parity.harness.launch import LaunchResult, launch

NPROC = 2
TIMEOUT_S = 150
SRC = Path(__file__).resolve().parents[2] / "src"
MODULE = "parity.harness.checks.sp_ep_check"
TAG = "sp_ep_check"
FAULT_CASES = (
    "ulysses/gqa_causal_positions,ulysses/qwen3_model,moe_ep/qwen3_moe_sharded_params,moe_ep/qwen3_moe_model"
)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(2 * TIMEOUT_S + 60)]


@dataclass
class Run:
    result: LaunchResult
    ranks: list[dict]

    def cases(self, prefix: str) -> list[tuple[int, dict]]:
        found = [(p["rank"], c) for p in self.ranks for c in p["cases"] if c["case"].startswith(prefix)]
        assert found, f"no {prefix} cases in the results\n{self.result.summary()}"
        return found


def _launch(root: Path, *, fault: str = "", cases: str = "") -> Run:
    out = root / "out"
    args = ["-m", MODULE, "--out", str(out)] + (["--cases", cases] if cases else [])
    pythonpath = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    env = {"PARITY_FAULT": fault, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    result = launch(args, nproc=NPROC, timeout_s=TIMEOUT_S, log_dir=root / "logs", env=env)
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob(f"{TAG}_rank_*.json"))]
    for payload in ranks:
        for case in payload["cases"]:
            devs = ", ".join(f"{c['name']}={c['max_abs']:.2e}" for c in case["comparisons"])
            print(
                f"fault={fault or 'none'} rank={payload['rank']} {case['case']}: "
                f"{'PASS' if case['passed'] else 'FAIL'} max_abs_dev={case['max_abs']:.3e} [{devs}]"
            )
    assert len(ranks) == NPROC, f"expected {NPROC} rank results, got {len(ranks)}\n{result.summary()}"
    return Run(result, ranks)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _launch(tmp_path_factory.mktemp("sp_ep_clean"))


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _launch(tmp_path_factory.mktemp("sp_ep_fault"), fault="ulysses_swap,ep_drop", cases=FAULT_CASES)


def _assert_passed(run: Run, prefix: str) -> None:
    assert run.result.status == "ok", run.result.summary()
    for rank, case in run.cases(prefix):
        assert case["passed"], f"rank {rank} {case['case']}: {case}"


def _assert_detected(run: Run, prefix: str) -> None:
    """Each faulty case must fail *because its comparison breached*, not because it crashed."""
    assert run.result.status == "crash" and run.result.returncode != 0, run.result.summary()
    for rank, case in run.cases(prefix):
        assert case["error"] is None, f"rank {rank} {case['case']} crashed: {case['error']}"
        assert not case["passed"], f"rank {rank}: the fault went unnoticed in {case['case']}"


def test_ulysses_sp2_matches_sp1(clean_run: Run) -> None:
    _assert_passed(clean_run, "ulysses/")
    for payload in clean_run.ranks:  # the parity backend really ran, on the kernel we think
        assert payload["kernel_providers"]["attention"] == {"parity_sdpa_with_sp": "torch.sdpa"}


def test_fused_moe_ep2_matches_ep1(clean_run: Run) -> None:
    _assert_passed(clean_run, "moe_ep/")
    for payload in clean_run.ranks:
        assert "fused" in payload["kernel_providers"]["experts"]


def test_wrong_ulysses_exchange_is_detected(fault_run: Run) -> None:
    _assert_detected(fault_run, "ulysses/")


def test_dropped_ep_rows_are_detected(fault_run: Run) -> None:
    _assert_detected(fault_run, "moe_ep/")
