"""The planted-bug matrix: every realistic bug class must be caught, and the clean code must pass.

Run with ``nox -s mutations`` (or ``pytest tests/mutations``). For each bug of
:mod:`tests.mutations.bugs`: apply it from outside the code under test, run the suite that guards
against it (the patch suite's modes for in-process bugs, one parallel layout against ``sp1_ep1``
for the e2e ones), judge the records with the merge's own rules, and print one line: caught or not,
by which check, and the margin (observed / allowed; ``structural`` when a gradient vanished). The
unmutated runs of the same models are controls: they must pass, and their worst ratio is printed.

Each row also lands in ``artifacts/mutations-<device>-<dtype>.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from parity.harness import e2e_runner as e2e  # noqa: E402
from parity.harness.fingerprint import REPO_ROOT  # noqa: E402
from parity.harness.patch_runner import RunSettings, run_case  # noqa: E402
from parity.results import registry  # noqa: E402
from parity.results.compare import deviation, mode_evidence_problems, record_failures, roles  # noqa: E402
from parity.results.modes import hf_modes, parity_modes  # noqa: E402
from parity.results.records import Tolerance  # noqa: E402
from tests.mutations import bugs  # noqa: E402

pytestmark = [pytest.mark.mutations]

ROWS: list[dict[str, Any]] = []


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if not ROWS:
        return
    print(
        f"\n[mutations] {'bug':<26} {'class':<40} {'verdict':<8} check / margin"
    )
    for row in ROWS:
        print(
            f"[mutations] {row['bug']:<26} {row['class']:<40} {row['verdict']:<8} "
            f"{row['check']} {row['margin']}"
        )
    device, dtype = ROWS[0]["device"], ROWS[0]["dtype"]
    out = REPO_ROOT / "artifacts" / f"mutations-{device}-{dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(ROWS, indent=2) + "\n")
    print(f"[mutations] wrote {out}")


def _settings(tmp_path: Path) -> RunSettings:
    """The run's device, dtype and variant; records kept under artifacts/ to re-judge them later."""
    settings = RunSettings.from_env(default_results=tmp_path)
    results = REPO_ROOT / "artifacts" / f"mutation-records-{settings.device.type}-{settings.dtype_name}"
    return RunSettings(settings.variant, settings.device, settings.dtype, results / tmp_path.name)


def _patch_modes(case: registry.Case, variant: str) -> list:
    """The reference and the parity modes: the planted bugs live in parity's backend."""
    return [hf_modes(variant, case.is_moe)[0], *parity_modes(variant, case.is_moe)]


def _patch_verdict(records: list[dict[str, Any]]) -> tuple[bool, str, float]:
    """(any failure, worst failing check, its ratio) over the parity modes of one run."""
    ref, truth = roles(records)
    worst_name, worst_ratio, caught = "", 0.0, False
    for rec in records:
        if rec["status"] != "ok" or rec["mode"]["modeling_backend"] != "parity":
            continue
        problems, worst = mode_evidence_problems(rec, ref, truth)
        if problems and worst is not None:
            caught = True
            structural = [p for p in problems if p.startswith(("no gradient", "a gradient"))]
            ratio = math.inf if structural else worst.ratio
            name = structural[0] if structural else worst.name
            if ratio > worst_ratio:
                worst_name, worst_ratio = f"{rec['mode']['id']}: {name}", ratio
        elif worst is not None and worst.ratio > worst_ratio and not caught:
            worst_name, worst_ratio = f"{rec['mode']['id']}: {worst.name}", worst.ratio
    return caught, worst_name, worst_ratio


def _row(bug: bugs.Bug | None, settings: RunSettings, caught: bool, check: str, ratio: float) -> dict:
    margin = "structural" if math.isinf(ratio) else f"{ratio:.3g}x"
    row = {
        "bug": bug.name if bug else "(none: clean control)",
        "class": bug.klass if bug else "",
        "model": bug.model if bug else "",
        "verdict": ("CAUGHT" if caught else "MISSED") if bug else ("PASS" if not caught else "FAIL"),
        "check": check,
        "margin": margin,
        "ratio": None if math.isinf(ratio) else ratio,
        "device": settings.device.type,
        "dtype": settings.dtype_name,
    }
    ROWS.append(row)
    print(f"[mutations] {row['bug']}: {row['verdict']} by {check} ({margin})")
    return row


@pytest.mark.parametrize("model", sorted({b.model for b in bugs.PATCH_BUGS}))
def test_clean_patch_control(tmp_path: Path, model: str) -> None:
    """The unmutated parity modes of every model the matrix uses pass, with their worst ratio."""
    settings = _settings(tmp_path)
    case = registry.case(model)
    modes = _patch_modes(case, settings.variant)
    records = run_case(model, case.config, modes, Tolerance(case.rtol, case.atol), settings, case=case)
    caught, check, ratio = _patch_verdict(records)
    _row(None, settings, caught, f"{model} worst {check}", ratio)
    assert not record_failures(records)


@pytest.mark.parametrize("bug", bugs.PATCH_BUGS, ids=lambda b: b.name)
def test_patch_bug_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bug: bugs.Bug) -> None:
    settings = _settings(tmp_path)
    case = registry.case(bug.model)
    bug.apply(monkeypatch)
    records = run_case(bug.model, case.config, _patch_modes(case, settings.variant),
                       Tolerance(case.rtol, case.atol), settings, case=case)  # fmt: skip
    errors = [r for r in records if r["status"] == "error"]
    assert not errors, f"the planted bug should corrupt numbers, not crash:\n{errors[0].get('error')}"
    caught, check, ratio = _patch_verdict(records)
    _row(bug, settings, caught, check, ratio)
    assert caught, f"{bug.name} ({bug.description}) was not caught; worst {check} at {ratio:.3g}x"


@pytest.mark.distributed
@pytest.mark.parametrize("bug", bugs.E2E_BUGS, ids=lambda b: b.name)
def test_e2e_bug_is_caught(tmp_path_factory: pytest.TempPathFactory, bug: bugs.Bug) -> None:
    settings = e2e.E2ESettings.from_env(default_results=tmp_path_factory.mktemp("results"))
    layout = e2e.ParallelMode(*bug.layout)
    if settings.skip_reason(layout):
        pytest.skip(settings.skip_reason(layout))
    case = registry.case(bug.model)
    tolerance = e2e.effective_tolerance(Tolerance(case.e2e_rtol, case.e2e_atol), settings.dtype_name)
    work = tmp_path_factory.mktemp(f"mut_{bug.name}")
    records = []
    for mode, fault in ((e2e.ParallelMode(1, 1), ""), (layout, bugs.E2E_FAULTS[bug.name])):
        record = e2e.layout_record(
            bug.model, case.config_arg, settings, mode, case.is_moe, tolerance, tolerance
        )
        e2e.fill_record(record, e2e.run_layout(settings, case.config_arg, mode, work, fault=fault))
        records.append(record)
    faulty = records[1]
    assert faulty["status"] == "ok", (
        f"the planted bug should corrupt numbers, not crash:\n{faulty.get('error')}"
    )
    dev = deviation(faulty["metrics"], records[0]["metrics"], tolerance)
    caught = bool(record_failures(records))
    _row(bug, settings.run, caught, f"{layout.id} vs sp1_ep1: {dev.worst}", dev.ratio)
    assert caught, f"{bug.name} ({bug.description}) was not caught: {dev}"
