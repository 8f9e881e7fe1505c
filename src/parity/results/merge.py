"""Merge every record under a results folder into one verdict.

    python -m parity.merge --results results/ [--suite patch] [--models qwen3 ...] [--require fa2 ...]

Exit codes: 0 every comparison within tolerance; 1 a tolerance breach or a mode that raised;
2 the evidence is incomplete or untrustworthy (missing or invalid records, a required variant that
was skipped, a backend that did not actually run, a dead run, anchors that cannot be compared).
Code 2 wins over 1: a breach found on untrustworthy evidence still needs the evidence fixed first.

Torch-free: runs in nox's own interpreter.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.results.compare import (
    deviation,
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
    write_json_atomic,
)

EXIT_OK, EXIT_BREACH, EXIT_INVALID = 0, 1, 2
SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"

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

    def fail(self, code: int, message: str) -> None:
        self.problems.append((code, message))

    @property
    def exit_code(self) -> int:
        return max((code for code, _ in self.problems), default=EXIT_OK)


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
) -> Report:
    report = Report()
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
    references: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for f in sorted(files, key=lambda f: (f.suite, f.model, _anchor_key(f.variant))):
        ref = _check_file(report, f)
        if ref is not None:
            references[(f.suite, f.model)].append((f.variant, ref))
    for (suite, model), refs in sorted(references.items()):
        _check_anchors(report, suite, model, refs)
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
        if rec["status"] == "error":
            error = str(rec.get("error") or "raised").strip()
            kind = rec.get("error_kind", "model")
            first = error.splitlines()[0] if kind in ("crash", "timeout") else error.splitlines()[-1]
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
            row.verdict, row.detail = "FAIL", f"worst: {dev.worst}"
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
                "PASS" if dev.ok else "FAIL",
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
    out = [f"# parity merge: {results}", "", f"exit code: {report.exit_code}", ""]
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


def write_summary(report: Report, results: Path) -> None:
    payload = {
        "schema": "parity.summary/1",
        "exit_code": report.exit_code,
        "rows": [{c: getattr(r, c) for c in COLUMNS} for r in report.rows],
        "problems": [{"exit_code": code, "message": msg} for code, msg in report.problems],
    }
    write_json_atomic(results / SUMMARY_JSON, payload)
    (results / SUMMARY_MD).write_text(render_markdown(report, results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results", type=Path, default=Path("results"), help="results folder (default: results/)"
    )
    parser.add_argument("--suite", action="append", help="only this suite (repeatable)")
    parser.add_argument("--models", nargs="+", help="only these model ids")
    parser.add_argument(
        "--require", action="append", default=[], help="fail (exit 2) if this variant was skipped"
    )
    parser.add_argument(
        "--detail",
        action="store_true",
        help="also list every tensor of every mode (observed, allowed, ratio)",
    )
    args = parser.parse_args(argv)

    report = merge(args.results, suites=args.suite, models=args.models, require=args.require)
    if report.rows:
        print(render_table(report.rows))
    if args.detail and report.files:
        print("\n" + render_detail(args.results, report.files))
    if args.results.is_dir() and (report.rows or report.problems):
        write_summary(report, args.results)
        print(f"\nsummary: {args.results / SUMMARY_JSON}, {args.results / SUMMARY_MD}")
    for code, message in report.problems:
        print(f"[exit {code}] {message}", file=sys.stderr)
    verdict = {
        EXIT_OK: "PASS",
        EXIT_BREACH: "FAIL (tolerance breach or error)",
        EXIT_INVALID: "INVALID (missing, skipped-but-required, invalid or mismatched records)",
    }[report.exit_code]
    print(f"merge: {verdict}: {len(report.rows)} rows, {len(report.problems)} problems")
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
