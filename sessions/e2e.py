"""The e2e session body: FSDP2 + Ulysses sp + ep training parity, one backend variant per env.

The shared suite body (:func:`sessions.suites.run_suite`: env, probe, manifest, results, merge)
does the work; what is e2e-specific lives here:

* node ids: text models run in ``test_text_parallel_align``, VLM and Omni models in
  ``test_vlm_parallel_align``; the family comes from the case registry.
* timeouts: ``--timeout S`` stays "seconds per model" as in every suite (pytest-timeout backstop);
  a model runs up to :data:`MAX_LAYOUTS` trainings, each under its own ``parity.harness.launch`` watchdog,
  so each training gets an equal share of S (``PARITY_E2E_RUN_TIMEOUT_S``, read by the test).
* ranks: CPU machines run 2 gloo ranks; GPU machines one rank per visible GPU (``PARITY_NPROC``
  overrides). With fewer ranks than a layout needs, the test records that layout as skipped with the
  reason (the merge then reports that nothing was compared), so no special case is needed here.
"""

from __future__ import annotations

import argparse

import nox

from parity import settings
from parity.results import registry
from sessions.suites import DEFAULT_TEST_TIMEOUT_S, node_id, run_suite
from sessions.variants import ROOT

SUITE = "e2e"
E2E_TEST = ROOT / "tests" / "e2e" / "test_e2e_parallel.py"
#: Which test function runs the cases of which model family.
FUNCTIONS = {
    "text": "test_text_parallel_align",
    "vlm": "test_vlm_parallel_align",
    "omni": "test_vlm_parallel_align",
}
#: sp1_ep1, sp1_ep2, sp2_ep1, sp2_ep2: the most training runs one model takes.
MAX_LAYOUTS = 4
#: Part of the per-model timeout kept for pytest itself and the cleanup between runs.
SLACK_S = 60.0


def case_functions() -> dict[str, str]:
    """case id -> the test function that runs it."""
    return {case.id: FUNCTIONS[case.family] for case in registry.cases_for(SUITE)}


def per_run_timeout(posargs: list[str]) -> float:
    """Seconds for one training run: the per-model ``--timeout`` shared by the model's layouts."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TEST_TIMEOUT_S)
    known, _ = parser.parse_known_args(posargs)  # run_suite validates the full argument list
    return max((known.timeout - SLACK_S) / MAX_LAYOUTS, 1.0)


def run_e2e(session: nox.Session, variant_name: str) -> None:
    functions = case_functions()
    session.env[settings.E2E_RUN_TIMEOUT_S] = f"{per_run_timeout(session.posargs):g}"

    def node_ids(models: list[str]) -> list[str]:
        return [node_id(E2E_TEST, functions[m], m) for m in models]

    run_suite(session, SUITE, variant_name, node_ids)
