"""Merge every record under a results folder into one verdict.

    python -m parity.merge --results results/ [--suite patch] [--models qwen3 ...] [--require fa2 ...]
        [--allow-mixed] [--detail] [--export-golden DIR] [--golden DIR]

Exit codes: 0 every comparison within tolerance; 1 a tolerance breach or a mode that raised;
2 the evidence is incomplete or untrustworthy (missing or invalid records, a required variant that
was skipped, a backend that did not actually run, a dead run, anchors that cannot be compared,
evidence whose provenance does not check out: see :func:`provenance_problems`; under
``--require VARIANT`` also any mode of that variant recorded skipped or unsupported).
Code 2 wins over 1: a breach found on untrustworthy evidence still needs the evidence fixed first.
``summary.json`` carries the same verdict as words (``"verdict": "pass" | "breach" | "invalid"``)
next to ``"exit_code"``, for CI that runs the merge through nox (which turns every failure into 1).

Torch-free: runs in nox's own interpreter.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.results import golden, registry
from parity.results.compare import (
    deviation,
    effective_tolerance,
    evidence_checks,
    first_step_problems,
    layout_problems,
    mode_evidence_problems,
    resolution_mismatch,
    roles,
    vacuity,
)
from parity.results.records import (
    RecordError,
    ResultsFile,
    RunManifest,
    Tolerance,
    load_any,
    results_path,
    run_manifest_path,
    write_json_atomic,
    write_text_atomic,
)

EXIT_OK, EXIT_BREACH, EXIT_INVALID = 0, 1, 2
SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"
#: The verdict of each exit code, as summary.json's "verdict" and the merge's last line spell it.
VERDICTS = {EXIT_OK: "pass", EXIT_BREACH: "breach", EXIT_INVALID: "invalid"}
#: Fingerprint fields every record of one comparison must share (unless --allow-mixed): numbers from
#: two revisions of the code or two library versions are not evidence about either.
ENVIRONMENT_FIELDS = ("git_revision", "torch", "transformers")
#: Which registry tolerance is the ceiling of each suite's records (the seed's per-case tolerance is
#: an absolute ceiling; fp32 runs are capped further by parity.results.compare.effective_tolerance).
CEILING_FIELDS = {
    "patch": ("rtol", "atol"),
    "vlm_trainer": ("rtol", "atol"),
    "e2e": ("e2e_rtol", "e2e_atol"),
    "dummy_forward": ("e2e_rtol", "e2e_atol"),
}

#: The variant whose reference anchors the others when several environments ran the same model.
ANCHOR_ORDER = ("eager", "fa2", "fa3")


@dataclass
class Row:
    suite: str
    model: str
    variant: str
    mode: str
    loss: str = ""
    grad_norm: str = ""
    max_abs: str = ""
    max_rel: str = ""
    tolerance: str = ""
    worst: str = ""  # the per-tensor check with the largest observed / allowed
    ratio: str = ""  # that check's observed / allowed
    verdict: str = ""
    detail: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)  # (exit code, message)
    files: list[ResultsFile] = field(default_factory=list)  # what was compared (for --detail)
    allow_mixed: bool = False

    def fail(self, code: int, message: str) -> None:
        self.problems.append((code, message))

    @property
    def exit_code(self) -> int:
        return max((code for code, _ in self.problems), default=EXIT_OK)

    @property
    def verdict(self) -> str:
        """``pass`` / ``breach`` / ``invalid``: the exit code in words, for CI that cannot see it."""
        return VERDICTS[self.exit_code]


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def discover(results: Path) -> list[Path]:
    """Every JSON file under the results folder except the merge's own outputs and temp files."""
    return sorted(
        p
        for p in results.rglob("*.json")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(results).parts)  # temp files, child work
        and p.name not in (SUMMARY_JSON,)
    )


def _anchor_key(variant: str) -> tuple[int, str]:
    return (ANCHOR_ORDER.index(variant) if variant in ANCHOR_ORDER else len(ANCHOR_ORDER), variant)


def merge(
    results: Path,
    *,
    suites: list[str] | None = None,
    models: list[str] | None = None,
    require: list[str] | None = None,
    allow_mixed: bool = False,
) -> Report:
    """Read, check and compare every record under ``results``; the report holds rows and problems.

    ``allow_mixed`` compares records from different git revisions or torch/transformers versions
    instead of refusing them (each such row says so).
    """
    report = Report(allow_mixed=allow_mixed)
    results = Path(results)
    if not results.is_dir():
        report.fail(
            EXIT_INVALID, f"results folder {results} does not exist (run a suite first, e.g. nox -s patch)"
        )
        return report

    manifests: list[RunManifest] = []
    files: list[ResultsFile] = []
    for path in discover(results):
        try:
            loaded = load_any(path)
        except RecordError as exc:
            report.fail(EXIT_INVALID, f"invalid record: {exc}")
            continue
        if suites and loaded.suite not in suites:
            continue
        if isinstance(loaded, RunManifest):
            manifests.append(loaded)
        elif models is None or loaded.model in models:
            files.append(loaded)

    if not manifests and not files:
        where = f" for suite(s) {', '.join(suites)}" if suites else ""
        report.fail(EXIT_INVALID, f"no parity records under {results}{where}")
        return report

    report.files = files
    by_key = {(f.suite, f.variant, f.model): f for f in files}
    _check_manifests(report, manifests, by_key, models, require or [])
    cases = _RegistryView(results)
    for m in manifests:
        for problem in manifest_problems(m, results):
            report.fail(EXIT_INVALID, problem)
    references: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for f in sorted(files, key=lambda f: (f.suite, f.model, _anchor_key(f.variant))):
        untrusted = provenance_problems(f, results, manifests, cases, allow_mixed=allow_mixed)
        if untrusted:
            report.rows.append(Row(f.suite, f.model, f.variant, "-", verdict="INVALID", detail=untrusted[0]))
            for problem in untrusted:
                report.fail(EXIT_INVALID, problem)
            continue
        try:
            ref = _check_file(report, f)
        except Exception as exc:  # noqa: BLE001 - evidence the checks above missed; never a traceback
            report.fail(EXIT_INVALID, f"{f.path}: cannot be merged: {type(exc).__name__}: {exc}")
            continue
        if ref is not None:
            references[(f.suite, f.model)].append((f.variant, ref))
    _check_required_modes(report, files, require or [], cases)
    for (suite, model), refs in sorted(references.items()):
        try:
            _check_anchors(report, suite, model, refs)
        except Exception as exc:  # noqa: BLE001
            why = f"{type(exc).__name__}: {exc}"
            report.fail(EXIT_INVALID, f"{suite} {model}: anchors cannot be compared: {why}")
    if not any(row.verdict in ("PASS", "FAIL") for row in report.rows) and not report.problems:
        report.fail(EXIT_INVALID, "nothing was compared: every variant was skipped or ran only its reference")
    return report


def _check_manifests(
    report: Report,
    manifests: list[RunManifest],
    by_key: dict[tuple[str, str, str], ResultsFile],
    models: list[str] | None,
    require: list[str],
) -> None:
    seen_variants = {m.variant for m in manifests}
    for variant in require:
        if variant not in seen_variants:
            report.fail(
                EXIT_INVALID, f"required variant {variant!r} has no run record in this results folder"
            )
    for m in manifests:
        wanted = [x for x in m.models if models is None or x in models]
        if m.status == "skipped":
            for model in wanted:
                report.rows.append(Row(m.suite, model, m.variant, "-", verdict="SKIPPED", detail=m.reason))
            if m.variant in require:
                report.fail(EXIT_INVALID, f"{m.suite}({m.variant}) was skipped but is required: {m.reason}")
            continue
        if m.status == "failed":
            report.fail(EXIT_INVALID, f"{m.suite}({m.variant}) failed before producing results: {m.reason}")
        for model in wanted:
            if (m.suite, m.variant, model) not in by_key:
                code = f" (pytest exit code {m.exit_code})" if m.exit_code is not None else ""
                report.rows.append(
                    Row(m.suite, model, m.variant, "-", verdict="MISSING", detail="no results file")
                )
                report.fail(EXIT_INVALID, f"{m.suite}({m.variant}) {model}: no results were written{code}")


def _check_required_modes(
    report: Report, files: list[ResultsFile], require: list[str], cases: _RegistryView
) -> None:
    """``--require VARIANT``: every mode of that variant must have run, not only the variant.

    The issue's rule: a backend the model does not support is recorded as unsupported and counts as
    a skip, and ``--require`` turns it into a failure. That holds for a mode this machine cannot run
    (``skipped``), for one transformers or a kernel refused while running (``unsupported``) and for one
    the registry declares unsupported: each means the required variant's backend was not exercised
    for that model, which is what ``--require`` exists to rule out on the machines where it must run.
    A declared one says so, so the fix is clear (drop the model from the required run, or the
    declaration from the registry). Exit 2, like a skipped required variant: the evidence is missing.
    """
    failing: list[str] = []
    for f in files:
        if f.variant not in require:
            continue
        case, _ = cases.case(f.model)
        for rec in f.records:
            if rec.get("status") not in ("skipped", "unsupported"):
                continue
            mode = rec["mode"]
            declared = (
                case.unsupported_reason(str(mode.get("attn_implementation")), mode.get("moe_implementation"))
                if case is not None and rec["status"] == "unsupported"
                else None
            )
            reason = " ".join(str(rec.get("reason") or "").split())
            origin = " (declared in the registry)" if declared else ""
            report.fail(
                EXIT_INVALID,
                f"{f.suite}({f.variant}) {f.model} mode {mode['id']}: {rec['status']}{origin} but "
                f"--require {f.variant} needs every mode of {f.variant} to run: {reason}",
            )
            for row in report.rows:
                if (row.suite, row.model, row.variant, row.mode) == (f.suite, f.model, f.variant, mode["id"]):
                    row.detail = f"required (--require {f.variant}): {row.detail}"
            failing.append(f"{f.model} {mode['id']} ({rec['status']})")
    if failing:
        report.fail(
            EXIT_INVALID,
            f"--require {', '.join(require)}: {len(failing)} mode(s) did not run: {'; '.join(failing)}",
        )


# --------------------------------------------------------------------------------------------
# provenance: is this evidence what it says it is?


class _RegistryView:
    """The case registry, read once per merge; config hashes computed once per model."""

    def __init__(self, results: Path | None = None) -> None:
        self._results = results
        self._cases: dict[str, registry.Case] | None = None
        self._error: str | None = None
        self._hashes: dict[str, str] = {}

    def case(self, model: str) -> tuple[registry.Case | None, str | None]:
        """(case, None) or (None, why not)."""
        if self._cases is None and self._error is None:
            try:
                self._cases = {c.id: c for c in registry.cases()}
                if self._results is not None:  # the --config cases the run was given
                    self._cases.update({c.id: c for c in registry.adhoc_cases(self._results)})
            except (registry.RegistryError, registry.ToyConfigError, OSError) as exc:
                self._error = f"the case registry cannot be read: {exc}"
        if self._error is not None:
            return None, self._error
        assert self._cases is not None
        if model not in self._cases:
            return None, f"model {model!r} is not in the case registry ({', '.join(self._cases)})"
        return self._cases[model], None

    def owner_of(self, config_hash: str) -> str | None:
        """The registry model whose toy config hashes to this (a record copied from it), if any."""
        for case in (self._cases or {}).values():
            current, _ = self.config_hash(case)
            if current == config_hash:
                return case.id
        return None

    def config_hash(self, case: registry.Case) -> tuple[str | None, str | None]:
        if case.id not in self._hashes:
            try:
                self._hashes[case.id] = registry.config_hash(case.config)
            except registry.ToyConfigError as exc:
                return None, str(exc)
        return self._hashes[case.id], None


def mixed_environment(record: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """The :data:`ENVIRONMENT_FIELDS` in which two records differ, as ``"torch 2.13.0 vs 2.12.0"``."""
    a, b = record["fingerprint"], reference["fingerprint"]
    return [f"{key} {a.get(key)} vs {b.get(key)}" for key in ENVIRONMENT_FIELDS if a.get(key) != b.get(key)]


def error_line(record: dict[str, Any]) -> str:
    """One line that says why a mode failed: the record's ``cause`` (e.g. "rank 1 killed by SIGKILL"),
    else the last non-blank line of its error (a Python traceback ends with the exception)."""
    cause = record.get("cause")
    if isinstance(cause, str) and cause.strip():
        return cause.strip().splitlines()[0]
    lines = [line.strip() for line in str(record.get("error") or "").splitlines() if line.strip()]
    # a CUDA error's message ends with advice ("Compile with `TORCH_USE_CUDA_DSA` ..."): name the error
    cuda = [line for line in lines if "CUDA error" in line]
    return cuda[-1] if cuda else lines[-1] if lines else "raised (no error text)"


def tolerance_ceiling(case: registry.Case, suite: str, dtype: str) -> Tolerance | None:
    """The largest tolerance a record of ``suite`` may carry for ``case`` (None: the suite has none)."""
    fields = CEILING_FIELDS.get(suite)
    if fields is None:
        return None
    return effective_tolerance(Tolerance(getattr(case, fields[0]), getattr(case, fields[1])), dtype)


def manifest_problems(m: RunManifest, results: Path) -> list[str]:
    """A run manifest must sit where its suite and variant say (a copied ``_run.json`` would vouch for
    files of another run)."""
    path = m.path
    if path is None:
        return []
    expected = run_manifest_path(results, m.suite, m.variant)
    if Path(path).resolve() != expected.resolve():
        return [f"{path}: run manifest of {m.suite}({m.variant}) found outside {expected}"]
    return []


def provenance_problems(
    f: ResultsFile,
    results: Path,
    manifests: list[RunManifest],
    cases: _RegistryView,
    *,
    allow_mixed: bool = False,
) -> list[str]:
    """Why this file cannot be trusted as evidence of what it claims; empty when it can.

    A record is evidence about one model, one suite, one variant and one config: the file's path,
    the file's own fields, every record in it, the run manifest of its (suite, variant) and the case
    registry must all agree on them; the config hash must be the toy config's current hash; a mode
    appears once; its tolerance is no looser than the registry's; and one file holds one revision
    and one torch/transformers (unless ``allow_mixed``). Each message names the file.
    """
    where = str(f.path)
    found: list[str] = []
    if f.path is not None:
        expected = results_path(results, f.suite, f.variant, f.model)
        if Path(f.path).resolve() != expected.resolve():
            found.append(
                f"{where}: holds {f.suite}({f.variant}) {f.model} but that belongs in {expected} "
                "(a copied or renamed file)"
            )
    listed = [m for m in manifests if m.suite == f.suite and m.variant == f.variant]
    if not listed:
        found.append(f"{where}: no run manifest for {f.suite}({f.variant}): a file from another run")
    elif f.model not in listed[0].models:
        found.append(
            f"{where}: {f.model} is not in the run manifest of {f.suite}({f.variant}) "
            f"(it ran {', '.join(listed[0].models) or 'nothing'}): a stale file from an earlier run"
        )
    elif listed[0].status == "skipped":
        found.append(f"{where}: the run manifest says {f.suite}({f.variant}) was skipped: a stale file")

    seen: dict[str, int] = {}
    for index, rec in enumerate(f.records):
        mode_id = rec["mode"]["id"]
        if mode_id in seen:
            found.append(f"{where}: mode {mode_id} is recorded twice (records {seen[mode_id]} and {index})")
        seen.setdefault(mode_id, index)
        for key in ("suite", "variant", "model"):
            if rec[key] != getattr(f, key):
                found.append(
                    f"{where}: record {index} ({mode_id}) says {key} {rec[key]!r} but the file is for "
                    f"{getattr(f, key)!r} (a relabelled record)"
                )

    case, why = cases.case(f.model)
    if case is None:
        found.append(f"{where}: {why}")
    else:
        if f.suite not in case.suites:
            found.append(
                f"{where}: suite {f.suite!r} does not apply to {f.model} (a {case.family} model: "
                f"{', '.join(case.suites)})"
            )
        current, why = cases.config_hash(case)
        if current is None:
            found.append(f"{where}: the toy config of {f.model} cannot be hashed: {why}")
        for index, rec in enumerate(f.records):
            mode_id = rec["mode"]["id"]
            recorded = rec["fingerprint"]["config_hash"]
            if current is not None and recorded != current:
                owner = cases.owner_of(recorded)
                hint = f"; it is the toy config of {owner}: a relabelled record" if owner else ""
                found.append(
                    f"{where}: record {index} ({mode_id}): stale: config changed since this record "
                    f"(config_hash {recorded[:12]} recorded, {case.config} now hashes to "
                    f"{current[:12]}{hint})"
                )
            ceiling = tolerance_ceiling(case, f.suite, rec["fingerprint"]["dtype"])
            tol = rec["tolerance"]
            if ceiling is not None and (tol["rtol"] > ceiling.rtol or tol["atol"] > ceiling.atol):
                found.append(
                    f"{where}: record {index} ({mode_id}): tolerance "
                    f"rtol={tol['rtol']:g} atol={tol['atol']:g} is looser than the registry allows "
                    f"for {f.model} in {f.suite} "
                    f"({rec['fingerprint']['dtype']}: rtol={ceiling.rtol:g} atol={ceiling.atol:g})"
                )
    if not allow_mixed and f.records:
        first = f.records[0]
        for index, rec in enumerate(f.records[1:], start=1):
            mixed = mixed_environment(rec, first)
            if mixed:
                found.append(
                    f"{where}: record {index} ({rec['mode']['id']}) comes from another environment than "
                    f"record 0 ({'; '.join(mixed)}); rerun, or pass --allow-mixed"
                )
    return found


def _check_file(report: Report, f: ResultsFile) -> dict[str, Any] | None:
    """Compare every mode of one (suite, variant, model) with its reference; return the reference record."""
    label = f"{f.suite}({f.variant}) {f.model}"
    recs = {r["mode"]["id"]: r for r in f.records}
    for missing in [m for m in f.expected_modes if m not in recs]:
        report.rows.append(
            Row(f.suite, f.model, f.variant, missing, verdict="MISSING", detail="mode did not finish")
        )
        report.fail(
            EXIT_INVALID, f"{label} mode {missing}: no record (the run stopped before this mode finished)"
        )
    if not f.expected_modes:
        report.fail(EXIT_INVALID, f"{label}: results file lists no expected modes ({f.path})")
        return None
    ref_id = f.expected_modes[0]
    ref = recs.get(ref_id)
    ref_ok = ref is not None and ref["status"] == "ok"
    truth = next((r for r in f.records if r["mode"].get("role") == "truth"), ref)

    hashes = {r["fingerprint"].get("config_hash") for r in f.records}
    if len(hashes) > 1:
        report.fail(
            EXIT_INVALID,
            f"{label}: records from different configs mixed in one file: {sorted(map(str, hashes))}",
        )

    for mode_id, rec in recs.items():
        row = Row(f.suite, f.model, f.variant, mode_id)
        report.rows.append(row)
        tol = Tolerance(rec["tolerance"]["rtol"], rec["tolerance"]["atol"])
        row.tolerance = f"rtol={tol.rtol:g} atol={tol.atol:g}"
        if rec["status"] in ("skipped", "unsupported"):
            row.verdict, row.detail = rec["status"].upper(), str(rec["reason"]).splitlines()[0]
            if mode_id == ref_id:
                report.fail(
                    EXIT_INVALID,
                    f"{label}: the reference mode {mode_id} was {rec['status']}: {rec['reason']}",
                )
            continue
        mixed = mixed_environment(rec, ref) if ref is not None else []
        if mixed:  # only reachable with --allow-mixed: provenance_problems refuses it otherwise
            row.detail = "mixed: " + "; ".join(mixed)
        if rec["status"] == "not_run":
            row.verdict, row.detail = "REF-FAILED", f"not run: {rec['reason']}"
            if mode_id == ref_id or ref is None or ref["status"] != "error":
                report.fail(
                    EXIT_INVALID,
                    f"{label} mode {mode_id}: recorded as not run ({rec['reason']}) but its reference "
                    f"{ref_id} did not fail ({f.path})",
                )
            continue
        if rec["status"] == "error":
            error = str(rec.get("error") or "raised").strip()
            kind = rec.get("error_kind", "model")
            first = error.splitlines()[0] if kind in ("crash", "timeout") else error_line(rec)
            if kind == "harness":
                # the tool broke, not the model: the evidence is missing, not against the model
                row.verdict, row.detail = "TOOL-ERROR", first
                report.fail(EXIT_INVALID, f"{label} mode {mode_id}: harness error (parity's bug): {first}")
            else:
                row.verdict = "TIMEOUT" if kind == "timeout" else "ERROR"
                row.detail = first
                report.fail(
                    EXIT_BREACH, f"{label} mode {mode_id} {kind if kind != 'model' else 'raised'}: {first}"
                )
            continue
        metrics = rec["metrics"]
        row.loss, row.grad_norm = _fmt(metrics["loss"]), _fmt(metrics["grad_norm"])
        mismatch = resolution_mismatch(rec)
        if mismatch:
            row.verdict, row.detail = "NOT-RUN", mismatch
            report.fail(EXIT_INVALID, f"{label} mode {mode_id}: requested backend did not run: {mismatch}")
            continue
        dead = vacuity(metrics, expected_steps=rec.get("expected_steps"))
        if dead:
            row.verdict, row.detail = "DEAD", dead
            report.fail(EXIT_INVALID, f"{label} mode {mode_id}: dead run, nothing to compare: {dead}")
            continue
        if rec["mode"].get("role") == "anchor":
            # the single-process run of the e2e suite: the reference layout's step 0 is held against it
            problems, worst_fp = first_step_problems(ref, rec) if ref_ok else ([], None)
            row.worst, row.ratio = (worst_fp.name, f"{worst_fp.ratio:.3g}") if worst_fp else ("", "")
            row.verdict = "FAIL" if problems else "ANCHOR"
            row.detail = problems[0] if problems else f"independent single-process step 0 vs {ref_id}"
            for problem in problems:
                report.fail(EXIT_BREACH, f"{label} mode {ref_id} vs {mode_id}: {problem}")
            continue
        layout = layout_problems(rec, ref)
        if layout:
            row.verdict, row.detail = "NOT-RUN", f"layout: {layout[0]}"
            for problem in layout:
                report.fail(EXIT_INVALID, f"{label} mode {mode_id}: did not run as its name says: {problem}")
            continue
        ev_problems, worst = mode_evidence_problems(rec, ref, truth)
        if mode_id != ref_id and ref_ok and "first_step" in rec:
            fs_problems, fs_worst = first_step_problems(rec, ref)
            ev_problems = ev_problems + fs_problems
            worst = fs_worst if worst is None or (fs_worst and fs_worst.ratio > worst.ratio) else worst
        if worst is not None:
            row.worst, row.ratio = worst.name, f"{worst.ratio:.3g}"
        if ev_problems:
            row.verdict, row.detail = "FAIL", ev_problems[0]
            for problem in ev_problems:
                report.fail(EXIT_BREACH, f"{label} mode {mode_id}: {problem}")
            continue
        if rec["mode"].get("role") == "truth":
            row.verdict, row.detail = "TRUTH", "fp32 run of the reference: what errors are measured from"
            continue
        if mode_id == ref_id:
            row.verdict, row.detail = "REF", "reference"
            continue
        if not ref_ok:
            row.verdict, row.detail = "NO-REF", f"reference {ref_id} unusable"
            report.fail(EXIT_INVALID, f"{label} mode {mode_id}: reference {ref_id} is missing or failed")
            continue
        if vacuity(ref["metrics"], expected_steps=ref.get("expected_steps")):
            row.verdict, row.detail = "NO-REF", f"reference {ref_id} is dead"
            continue
        dev = deviation(metrics, ref["metrics"], tol)
        row.max_abs, row.max_rel = f"{dev.max_abs:.3g}", f"{dev.max_rel:.3g}"
        if dev.ok:
            row.verdict = "PASS"
        else:
            row.verdict = "FAIL"
            row.detail = "; ".join(d for d in (f"worst: {dev.worst}", row.detail) if d)
            report.fail(
                EXIT_BREACH,
                f"{label} mode {mode_id}: {dev.worst} off by {dev.max_abs:.3g} abs / {dev.max_rel:.3g} rel "
                f"vs {ref_id} (allowed rtol={tol.rtol:g} atol={tol.atol:g})",
            )
    return ref if ref_ok and not vacuity(ref["metrics"], expected_steps=ref.get("expected_steps")) else None


def _check_anchors(report: Report, suite: str, model: str, refs: list[tuple[str, dict[str, Any]]]) -> None:
    """Each environment's reference must agree with the first one's: otherwise the environments differ."""
    if len(refs) < 2:
        return
    anchor_variant, anchor = refs[0]
    for variant, ref in refs[1:]:
        label = f"{suite} {model}: reference of variant {variant} vs variant {anchor_variant}"
        a, b = anchor["fingerprint"], ref["fingerprint"]
        mixed = mixed_environment(ref, anchor)
        if mixed and not report.allow_mixed:
            report.fail(
                EXIT_INVALID,
                f"{label}: mixed environments ({'; '.join(mixed)}); rerun both, or pass --allow-mixed",
            )
            continue
        for key in ("config_hash", "seed", "dtype", "device"):
            if a.get(key) != b.get(key):
                report.fail(
                    EXIT_INVALID, f"{label}: not comparable, {key} differs ({a.get(key)!r} vs {b.get(key)!r})"
                )
                break
        else:
            tol = Tolerance(ref["tolerance"]["rtol"], ref["tolerance"]["atol"])
            dev = deviation(ref["metrics"], anchor["metrics"], tol)
            row = Row(
                suite,
                model,
                variant,
                f"anchor vs {anchor_variant}",
                _fmt(ref["metrics"]["loss"]),
                _fmt(ref["metrics"]["grad_norm"]),
                f"{dev.max_abs:.3g}",
                f"{dev.max_rel:.3g}",
                f"rtol={tol.rtol:g} atol={tol.atol:g}",
                verdict="PASS" if dev.ok else "FAIL",
                detail="mixed: " + "; ".join(mixed) if mixed else "",
            )
            report.rows.append(row)
            if not dev.ok:
                versions = ", ".join(
                    f"{k} {a.get(k)} vs {b.get(k)}" for k in ("torch", "transformers") if a.get(k) != b.get(k)
                )
                report.fail(
                    EXIT_INVALID,
                    f"{label}: references disagree by {dev.max_abs:.3g} abs ({dev.worst})"
                    + (f"; environments differ: {versions}" if versions else ""),
                )


COLUMNS = (
    "suite",
    "model",
    "variant",
    "mode",
    "loss",
    "grad_norm",
    "max_abs",
    "max_rel",
    "tolerance",
    "worst",
    "ratio",
    "verdict",
    "detail",
)


def render_detail(results: Path, files: list[ResultsFile]) -> str:
    """Every per-tensor comparison of every mode: observed, allowed, ratio (``--detail``)."""
    lines = []
    for f in files:
        ref, truth = roles(f.records)
        for rec in f.records:
            if rec.get("status") != "ok" or "evidence" not in rec:
                continue
            checks, structural = evidence_checks(rec, ref, truth)
            lines.append(
                f"{f.suite}({f.variant}) {f.model} {rec['mode']['id']} vs {rec['evidence'].get('against')}"
            )
            lines += [f"    STRUCTURAL {s}" for s in structural]
            for c in sorted(checks, key=lambda c: -c.ratio):
                verdict = "ok " if c.ok else "BAD"
                lines.append(
                    f"    {verdict} {c.name:<64} observed {c.observed:<10.3g} "
                    f"allowed {c.allowed:<10.3g} ratio {c.ratio:.3g}"
                )
    return "\n".join(lines)


def render_table(rows: list[Row]) -> str:
    cells = [COLUMNS] + [tuple(str(getattr(r, c)) for c in COLUMNS) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(report: Report, results: Path) -> str:
    """The summary for a human and for a CI step summary (``cat summary.md >> $GITHUB_STEP_SUMMARY``).

    Verdict first, then one line per (suite, model) with its verdict counts, then every comparison,
    then the problems: a reader sees in two lines whether to scroll, and which model to scroll to.
    """
    headline = {
        EXIT_OK: "PASS: every comparison within tolerance",
        EXIT_BREACH: "FAIL: a tolerance breach or a mode that raised",
        EXIT_INVALID: "INVALID: missing, skipped-but-required, invalid or mismatched evidence",
    }.get(report.exit_code, "unknown exit code")
    counts: dict[str, int] = defaultdict(int)
    for r in report.rows:
        counts[r.verdict or "-"] += 1
    tally = ", ".join(f"{verdict} {n}" for verdict, n in sorted(counts.items())) or "no rows"
    out = [f"# parity merge: {results}", "", f"verdict: {report.verdict} (exit code {report.exit_code})", ""]
    if report.allow_mixed:
        out += [MIXED_NOTE, ""]
    out += [f"**{headline}** ({tally}; {len(report.problems)} problem(s))", ""]

    by_model: dict[tuple[str, str], dict[str, Any]] = {}
    for r in report.rows:
        entry = by_model.setdefault((r.suite, r.model), {"variants": set(), "verdicts": defaultdict(int)})
        entry["variants"].add(r.variant)
        entry["verdicts"][r.verdict or "-"] += 1
    if by_model:
        out += ["## By model", "", "| suite | model | variants | verdicts |", "|---|---|---|---|"]
        for (suite, model), entry in sorted(by_model.items()):
            verdicts = ", ".join(f"{v} {n}" for v, n in sorted(entry["verdicts"].items()))
            out.append(f"| {suite} | {model} | {', '.join(sorted(entry['variants']))} | {verdicts} |")
        out += ["", "## All comparisons", ""]

    def cell(value: Any) -> str:
        return " ".join(str(value).split()).replace("|", "\\|")

    out.append("| " + " | ".join(COLUMNS) + " |")
    out.append("|" + "---|" * len(COLUMNS))
    for r in report.rows:
        out.append("| " + " | ".join(cell(getattr(r, c)) for c in COLUMNS) + " |")
    if report.problems:
        out += ["", "## Problems", ""] + [f"- (exit {code}) {msg}" for code, msg in report.problems]
    return "\n".join(out) + "\n"


MIXED_NOTE = (
    "--allow-mixed: records from different git revisions or torch/transformers versions were compared; "
    "rows marked 'mixed' say which"
)


def write_summary(report: Report, results: Path) -> None:
    """``summary.json`` (``verdict`` and ``exit_code`` first: what CI reads) and ``summary.md``."""
    payload = {
        "schema": "parity.summary/1",
        "verdict": report.verdict,
        "exit_code": report.exit_code,
        "allow_mixed": report.allow_mixed,
        "rows": [{c: getattr(r, c) for c in COLUMNS} for r in report.rows],
        "problems": [{"exit_code": code, "message": msg} for code, msg in report.problems],
    }
    write_json_atomic(results / SUMMARY_JSON, payload)
    write_text_atomic(results / SUMMARY_MD, render_markdown(report, results))


def remove_summary(results: Path) -> None:
    """A run starts by deleting the previous verdict, so an interrupted run cannot leave a stale PASS."""
    for name in (SUMMARY_JSON, SUMMARY_MD):
        (Path(results) / name).unlink(missing_ok=True)


def last_line(report: Report) -> str:
    """The merge's closing line, in summary.json's words: ``parity merge: verdict=breach exit=1 ...``."""
    return (
        f"parity merge: verdict={report.verdict} exit={report.exit_code} "
        f"({len(report.rows)} rows, {len(report.problems)} problems)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results", type=Path, default=Path("results"), help="results folder (default: results/)"
    )
    parser.add_argument("--suite", action="append", help="only this suite (repeatable)")
    parser.add_argument("--models", nargs="+", help="only these model ids")
    parser.add_argument(
        "--require",
        action="append",
        default=[],
        help="fail (exit 2) if this variant was skipped, or any of its modes was skipped or unsupported",
    )
    parser.add_argument(
        "--detail",
        action="store_true",
        help="also list every tensor of every mode (observed, allowed, ratio)",
    )
    parser.add_argument(
        "--export-golden", type=Path, metavar="DIR", help="save the merged metrics and fingerprints as golden"
    )
    parser.add_argument(
        "--golden", type=Path, metavar="DIR", help="also compare every record with the golden metrics in DIR"
    )
    parser.add_argument(
        "--allow-mixed",
        action="store_true",
        help="compare records from different git revisions or torch/transformers versions (marked 'mixed')",
    )
    args = parser.parse_args(argv)

    try:
        report = merge(
            args.results,
            suites=args.suite,
            models=args.models,
            require=args.require,
            allow_mixed=args.allow_mixed,
        )
    except Exception as exc:  # noqa: BLE001 - the contract is 0/1/2 with a message, never a traceback
        report = Report(allow_mixed=args.allow_mixed)
        report.fail(EXIT_INVALID, f"the merge could not read {args.results}: {type(exc).__name__}: {exc}")
    if args.golden is not None:
        check_golden(report, args.golden)
    if report.allow_mixed:
        print(MIXED_NOTE)
    if report.rows:
        print(render_table(report.rows))
    if args.detail and report.files:
        print("\n" + render_detail(args.results, report.files))
    if args.results.is_dir() and (report.rows or report.problems):
        write_summary(report, args.results)
        print(f"\nsummary: {args.results / SUMMARY_JSON}, {args.results / SUMMARY_MD}")
    sys.stdout.flush()
    for code, message in report.problems:
        print(f"[exit {code}] {message}", file=sys.stderr)
    sys.stderr.flush()
    explain = {
        EXIT_OK: "every comparison within tolerance",
        EXIT_BREACH: "a tolerance breach or a mode that raised",
        EXIT_INVALID: "missing, stale, relabelled, malformed or untrustworthy evidence",
    }[report.exit_code]
    if args.export_golden is not None:
        if report.exit_code != EXIT_OK:
            print(f"golden: not exported: the merge did not pass (exit {report.exit_code})", file=sys.stderr)
        else:
            for path in golden.export(report.files, args.export_golden):
                print(f"golden: wrote {path}")
    print(f"{last_line(report)}: {explain}", flush=True)
    return report.exit_code


def check_golden(report: Report, folder: Path) -> None:
    """Hold every results file against the golden file of its own environment (device, dtype, versions)."""
    for f in report.files:
        ok = [r for r in f.records if r.get("status") == "ok"]
        if not ok:
            continue
        try:
            payload = golden.load(folder, golden.env_key(ok[0]["fingerprint"]))
        except golden.GoldenError as exc:
            report.fail(EXIT_INVALID, f"{f.suite}({f.variant}) {f.model}: golden: {exc}")
            continue
        lines, failures = golden.render(golden.compare_file(f, payload))
        for line in lines:
            print(line)
        for message in failures:
            missing = "no golden entry" in message or "config changed" in message
            report.fail(
                EXIT_INVALID if missing else EXIT_BREACH,
                f"{f.suite}({f.variant}) {f.model}: golden: {message}",
            )


if __name__ == "__main__":
    sys.exit(main())
