"""Comparison rules: what makes two runs agree, and what makes a run unfit to compare.

Torch-free on purpose (the merge runs in nox's interpreter). Every comparison reports its observed
max absolute and relative deviation, pass or fail, so tolerances can be tightened from data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from parity.results.records import Tolerance

METRICS = ("loss", "grad_norm")

#: Ceiling on the tolerance in float32. The case tolerances (the seed's defaults) are sized for bf16
#: rounding; in fp32 the backends agree to ~1e-7, and a 1e-2 tolerance would let real bugs through:
#: attention leaking across two packed samples moved a toy qwen3's loss by only 0.23%.
FP32_TOLERANCE = Tolerance(rtol=1e-4, atol=1e-5)


def effective_tolerance(case: Tolerance, dtype: str) -> Tolerance:
    """The case tolerance, tightened to :data:`FP32_TOLERANCE` when the run is in float32."""
    if str(dtype).removeprefix("torch.") != "float32":
        return case
    return Tolerance(min(case.rtol, FP32_TOLERANCE.rtol), min(case.atol, FP32_TOLERANCE.atol))


@dataclass
class Deviation:
    max_abs: float
    max_rel: float
    ok: bool
    worst: str  # which metric (and step) gave the largest tolerance ratio
    ratio: float = 0.0  # that metric's |x - ref| / (atol + rtol |ref|): observed over allowed


def as_series(value: Any) -> list[float]:
    """A metric is a scalar (patch suite) or a per-step list (e2e); compare both as lists."""
    if isinstance(value, list):
        return [float(v) for v in value]
    return [float(value)]


def vacuity(metrics: dict[str, Any], *, expected_steps: int | None = None) -> str | None:
    """Why a run proves nothing, or None if it is alive.

    Two dead runs agree perfectly, so a dead run is never compared: non-finite loss, zero or
    non-finite grad norm, a loss that does not move across steps, or the wrong number of steps.
    """
    loss = as_series(metrics["loss"])
    grad = as_series(metrics["grad_norm"])
    if expected_steps is not None and (len(loss) != expected_steps or len(grad) != expected_steps):
        return f"expected {expected_steps} steps, got loss {len(loss)} / grad_norm {len(grad)}"
    if not loss or not grad:
        return "no values"
    if not all(math.isfinite(v) for v in loss):
        return f"non-finite loss {loss}"
    if not all(math.isfinite(v) for v in grad):
        return f"non-finite grad_norm {grad}"
    if any(v == 0.0 for v in grad):
        return f"zero grad_norm {grad}"
    if len(loss) > 1 and max(loss) == min(loss):
        return f"loss does not move across {len(loss)} steps ({loss[0]})"
    return None


def series_deviation(name: str, values: list[float], refs: list[float], tol: Tolerance) -> Deviation:
    """The comparison rule on one series (a scalar is a series of one): max abs/rel deviation, whether
    every value is within ``|x - ref| <= atol + rtol * |ref|``, and the worst step."""
    if len(values) != len(refs):
        return Deviation(
            math.inf, math.inf, False, f"{name}: {len(values)} values vs {len(refs)} in reference", math.inf
        )
    max_abs = max_rel = 0.0
    ok, worst, worst_ratio = True, "", -1.0
    for step, (value, ref) in enumerate(zip(values, refs, strict=True)):
        diff = abs(value - ref)
        rel = diff / abs(ref) if ref != 0 else (0.0 if diff == 0 else math.inf)
        max_abs, max_rel = max(max_abs, diff), max(max_rel, rel)
        ratio = diff / (tol.atol + tol.rtol * abs(ref))
        if ratio > worst_ratio:
            worst_ratio, worst = ratio, name if len(values) == 1 else f"{name}[step {step}]"
        ok = ok and tol.allows(value, ref)
    return Deviation(max_abs, max_rel, ok, worst, worst_ratio)


def deviation(metrics: dict[str, Any], reference: dict[str, Any], tol: Tolerance) -> Deviation:
    """Max abs/rel deviation over every metric (and step), and whether all are within tolerance."""
    parts = [series_deviation(n, as_series(metrics[n]), as_series(reference[n]), tol) for n in METRICS]
    bad = next((d for d in parts if math.isinf(d.ratio) and d.max_abs == math.inf), None)
    if bad is not None:
        return bad
    worst = max(parts, key=lambda d: d.ratio)
    return Deviation(
        max(d.max_abs for d in parts),
        max(d.max_rel for d in parts),
        all(d.ok for d in parts),
        worst.worst,
        worst.ratio,
    )


# --------------------------------------------------------------------------------------------
# per-tensor evidence


@dataclass(frozen=True)
class EvidenceRule:
    """How far a mode's tensors may be from the truth (the reference in fp32, or itself in fp32).

    float32 runs: ``allowed = rel + abs_frac * G / |t_ref|`` (G: the truth's total grad norm), a
    tight absolute rule. Half precision: ``allowed = k * noise + rel + abs_frac * G / |t_ref|``,
    where noise is the same tensor's error of HF eager in the same half precision: a mode may be k
    times as far from fp32 as the reference implementation is, plus a floor.
    """

    k: float
    rel: float
    abs_frac: float


#: float32: backends agree to ~1e-6 relative per tensor on CPU; the worst clean ratio under this
#: rule over the 14 toy models is 0.03 (README "Tolerances").
FP32_RULE = EvidenceRule(k=0.0, rel=1e-4, abs_frac=1e-7)
#: Half precision, from clean bf16 runs on the H200 (all 14 toy models, variants eager, fa2, fa3,
#: 2271-token packed rows): the largest observed/noise ratio of any tensor of any mode was 1.34,
#: so k = 2 leaves 1.5x headroom (worst clean ratio under this rule: 0.67); floor 2e-3 relative
#: plus 1e-4 of the total gradient norm for tensors whose gradient is ~0 (k biases).
HALF_RULE = EvidenceRule(k=2.0, rel=2e-3, abs_frac=1e-4)


@dataclass
class Check:
    """One evidence comparison: what was observed, what was allowed, and their ratio."""

    name: str
    observed: float
    allowed: float

    @property
    def ratio(self) -> float:
        if self.allowed > 0:
            return self.observed / self.allowed
        return 0.0 if self.observed == 0 else math.inf

    @property
    def ok(self) -> bool:
        return math.isfinite(self.observed) and self.ratio <= 1.0


def rule_for(dtype: str) -> EvidenceRule:
    return FP32_RULE if str(dtype).removeprefix("torch.") == "float32" else HALF_RULE


def _grad_total(truth: dict[str, Any] | None) -> float:
    if truth is None:
        return 0.0
    value = truth.get("metrics", {}).get("grad_norm")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and not math.isnan(x)


def evidence_shape_problem(ev: dict[str, Any]) -> str | None:
    """What is wrong with the shape of a record's ``evidence`` (a hand-edited or truncated file), or None.

    A malformed evidence block is a reason to reject the record, never a crash of the merge and never
    a silently skipped comparison.
    """
    tensors = ev.get("tensors", {})
    if not isinstance(tensors, dict):
        return "'tensors' is not a mapping"
    for name, values in tensors.items():
        if not (isinstance(values, list) and len(values) == 3 and all(_is_number(v) for v in values)):
            return f"tensor {name!r}: expected [relative error, max abs error, reference norm]"
    for key in ("grad_missing", "grad_unexpected"):
        names = ev.get(key, [])
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            return f"{key!r} is not a list of parameter names"
    logits = ev.get("logits", {})
    if not isinstance(logits, dict):
        return "'logits' is not a mapping"
    if not all(_is_number(logits[k]) for k in ("rel", "max_abs") if k in logits):
        return "'logits' holds a value that is not a number"
    return None


def evidence_checks(
    record: dict[str, Any], noise: dict[str, Any] | None, truth: dict[str, Any] | None
) -> tuple[list[Check], list[str]]:
    """Every per-tensor comparison of one mode, and the structural failures (missing gradients).

    ``noise`` is the reference mode's record in the same half precision (its own evidence against
    the truth is the noise yardstick), None in fp32. ``truth`` is the record the evidence was taken
    against (for the total grad norm in the floor).
    """
    ev = record.get("evidence")
    if not isinstance(ev, dict):
        return [], []
    malformed = evidence_shape_problem(ev)
    if malformed:
        return [], [f"malformed evidence: {malformed}"]
    rule = rule_for(record.get("fingerprint", {}).get("dtype", "float32"))
    noise_ev = (noise or {}).get("evidence") if rule.k > 0 and noise is not record else None
    noise_ev = noise_ev if isinstance(noise_ev, dict) and not evidence_shape_problem(noise_ev) else {}
    total = _grad_total(truth)
    checks: list[Check] = []
    structural = []
    if ev.get("grad_missing"):
        structural.append(f"no gradient where the truth has one: {', '.join(ev['grad_missing'])}")
    if ev.get("grad_unexpected"):
        structural.append(f"a gradient where the truth has none: {', '.join(ev['grad_unexpected'])}")

    def allowed(noise_rel: float, ref_norm: float) -> float:
        floor = rule.rel + (rule.abs_frac * total / ref_norm if ref_norm > 0 else math.inf)
        return rule.k * noise_rel + floor

    logits = ev.get("logits") or {}
    if "rel" in logits:
        noise_rel = float((noise_ev.get("logits") or {}).get("rel", 0.0))
        floor = rule.k * noise_rel + rule.rel
        checks.append(Check("logits", float(logits["rel"]), floor))
    # Scalars: one sample of the reference's error is no yardstick (it can be 0 by luck). Use
    # bounds that follow from the reference's per-tensor evidence instead: |d|g|| <= |dg| (the norm
    # of the whole gradient difference), and |d loss| <= 2 max|d logit| (cross-entropy is
    # 2-Lipschitz in the max norm of the logits).
    noise_scalar = {"loss": 0.0, "grad_norm": 0.0}
    if noise_ev:
        noise_scalar["grad_norm"] = math.sqrt(
            sum((float(v[0]) * float(v[2])) ** 2 for v in (noise_ev.get("tensors") or {}).values()
                if all(math.isfinite(float(x)) for x in v))
        )  # fmt: skip
        noise_scalar["loss"] = 2.0 * float((noise_ev.get("logits") or {}).get("max_abs", 0.0))
    for metric in ("loss", "grad_norm"):
        value = record.get("metrics", {}).get(metric)
        ref_value = (truth or {}).get("metrics", {}).get(metric)
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (value, ref_value)):
            continue
        limit = rule.k * noise_scalar[metric] + rule.rel * abs(ref_value)
        checks.append(Check(metric, abs(value - ref_value), limit))
    noise_tensors = noise_ev.get("tensors") or {}
    for name, values in (ev.get("tensors") or {}).items():
        rel, _max_abs, ref_norm = (float(v) for v in values)
        noise_rel = float(noise_tensors[name][0]) if name in noise_tensors else 0.0
        checks.append(Check(f"grad {name}", rel, allowed(noise_rel, ref_norm)))
    return checks, structural


def fingerprint_checks(
    got: dict[str, Any], ref: dict[str, Any], tol: Tolerance, label: str = "grad"
) -> tuple[list[Check], list[str]]:
    """Per-parameter fingerprints ([norm, p_1..p_k]) of one run against another's, element-wise
    ``|x - x_ref| <= atol + rtol * |t_ref|`` (the tensor's norm scales every projection)."""
    checks, structural = [], []
    for name in sorted(set(got) | set(ref)):
        a, b = got.get(name), ref.get(name)
        if (a is None) != (b is None):
            structural.append(
                f"{label} {name}: gradient in one run only ({'missing here' if a is None else 'extra here'})"
            )
            continue
        if a is None or b is None:
            continue
        norm = abs(float(b[0]))
        worst_diff = max(abs(float(x) - float(y)) for x, y in zip(a, b, strict=True))
        checks.append(Check(f"{label} {name}", worst_diff, tol.atol * 1e-3 + tol.rtol * norm))
    return checks, structural


def layout_problems(record: dict[str, Any], reference: dict[str, Any] | None) -> list[str]:
    """Does what every rank ran match the layout's name (sp, ep)? A layout that silently trained
    as another one (sp ignored, experts not split) agrees with the reference and proves nothing."""
    ranks = record.get("layout_evidence")
    if not isinstance(ranks, list) or not ranks:
        return []
    mode = record["mode"]
    sp, ep = int(mode.get("sp", 1)), int(mode.get("ep", 1))
    problems = []
    if record.get("nproc") is not None and len(ranks) != record["nproc"]:
        problems.append(f"{len(ranks)} ranks reported, the run had {record['nproc']}")
    sp_ranks = {r.get("sp_rank") for r in ranks}
    if len(sp_ranks) != sp:
        problems.append(f"sp={sp} but the ranks report {len(sp_ranks)} distinct sp ranks")
    lens = {r.get("local_seq_len") for r in ranks}
    ref_ranks = (reference or {}).get("layout_evidence") or []
    ref_lens = {r.get("local_seq_len") for r in ref_ranks}
    if len(ref_lens) == 1 and len(lens) == 1:
        full, local = next(iter(ref_lens)), next(iter(lens))
        if local != -(-full // sp):
            problems.append(
                f"sp={sp}: each rank saw {local} tokens of a {full}-token row (expected {-(-full // sp)})"
            )
    blocks = {tuple(r["expert_block"]) for r in ranks if r.get("expert_block")}
    if blocks:
        counts = {b[1] for b in blocks}
        total = sum(b[1] for b in blocks)
        if len(blocks) != ep or len(counts) != 1 or total != next(iter(counts)) * ep:
            problems.append(f"ep={ep} but the ranks hold expert blocks {sorted(blocks)}")
    return problems


def first_step_problems(record: dict[str, Any], reference: dict[str, Any]) -> tuple[list[str], Check | None]:
    """Step 0 of a layout against the reference layout (or a single-process run): every parameter's
    gradient fingerprint, not only the total norm."""
    got, ref = record.get("first_step"), reference.get("first_step")
    if not isinstance(got, dict) or not isinstance(ref, dict):
        return [], None
    tol = Tolerance(record["tolerance"]["rtol"], record["tolerance"]["atol"])
    checks, structural = fingerprint_checks(got.get("fingerprints") or {}, ref.get("fingerprints") or {}, tol)
    if isinstance(got.get("loss"), int | float) and isinstance(ref.get("loss"), int | float):
        checks.append(
            Check("step-0 loss", abs(got["loss"] - ref["loss"]), tol.atol + tol.rtol * abs(ref["loss"]))
        )
    problems = list(structural)
    problems += [
        f"step 0 {c.name}: observed {c.observed:.3g}, allowed {c.allowed:.3g} (ratio {c.ratio:.3g})"
        for c in checks
        if not c.ok
    ]
    return problems, worst(checks)


def worst(checks: list[Check]) -> Check | None:
    return max(checks, key=lambda c: c.ratio, default=None)


def resolution_mismatch(record: dict[str, Any]) -> str | None:
    """A requested backend that did not actually run is a failure, never a pass.

    transformers falls back silently (sdpa -> eager, flash -> hub kernels, grouped_mm -> eager), so
    the suites record what was *called*; any difference from the request is reported here.
    """
    requested, resolved = record["requested"], record["resolved"]
    problems = []
    for key in sorted(set(requested) | set(resolved)):
        want, got = requested.get(key), resolved.get(key)
        if want is None:
            continue
        if key == "kernel_provider":
            # resolved carries a version ("flash_attn 2.8.3"); a fallback is a different word
            # ("torch.sdpa[fallback]"), so compare the library name exactly.
            if not isinstance(got, str) or got.split()[0] != want:
                problems.append(f"{key}: requested {want!r}, ran {got!r}")
        elif want != got:
            problems.append(f"{key}: requested {want!r}, ran {got!r}")
    return "; ".join(problems) or None


def roles(records: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(reference, truth): the first mode in the run's dtype, and the record evidence is taken from.

    In fp32 the reference is its own truth; in half precision the truth is the fp32 run of the
    reference implementation (``mode.role == "truth"``).
    """
    ref = next((r for r in records if r["mode"].get("role") not in ("truth", "anchor")), None)
    truth = next((r for r in records if r["mode"].get("role") == "truth"), ref)
    return ref, truth


def mode_evidence_problems(
    rec: dict[str, Any], ref: dict[str, Any] | None, truth: dict[str, Any] | None
) -> tuple[list[str], Check | None]:
    """Failures of one mode's per-tensor evidence, and its worst check (for the report)."""
    if rec is truth or (rec is ref and truth is not ref):
        return [], None  # the truth itself, or the noise yardstick: nothing to hold them against
    if truth is None or truth.get("status") != "ok":
        return (
            [f"no usable truth record to hold {rec['mode']['id']} against"] if "evidence" in rec else []
        ), None
    has_evidence = isinstance(rec.get("evidence"), dict)
    if rec.get("suite") == "patch" and rec.get("status") == "ok" and not has_evidence:
        # every patch mode but the truth is compared tensor by tensor; one without evidence would
        # pass on loss and grad norm alone (a resumed worker that lost the truth did exactly that)
        against = truth["mode"]["id"]
        return [f"no per-tensor evidence against {against}: compared on loss and grad norm only"], None
    checks, structural = evidence_checks(rec, ref, truth)
    problems = list(structural)
    for check in checks:
        if not check.ok:
            problems.append(
                f"{check.name}: observed {check.observed:.3g}, allowed {check.allowed:.3g} "
                f"(ratio {check.ratio:.3g})"
            )
    return problems, worst(checks)


def record_failures(records: list[dict[str, Any]]) -> list[str]:
    """What the merge would reject in one case's records, as messages.

    Used by the suites' in-test assertions so a plain pytest run fails exactly where the merge
    would: a failed or dead reference, modes that raised, backends that did not run, dead runs,
    scalar deviations beyond each record's own tolerance (per step for e2e), and per-tensor evidence
    beyond the calibrated rule (or a gradient that exists in one run and not the other).
    """
    problems: list[str] = []
    ref, truth = roles(records)
    if ref is None:
        return ["no reference record"]
    if ref["status"] != "ok":
        return [f"reference {ref['mode']['id']} raised:\n{ref.get('error', '')}"]
    ref_dead = vacuity(ref["metrics"], expected_steps=ref.get("expected_steps"))
    if ref_dead:
        problems.append(f"reference {ref['mode']['id']} is a dead run: {ref_dead}")
    for rec in records:
        mode_id = rec["mode"]["id"]
        if rec["status"] in ("skipped", "unsupported"):
            continue
        if rec["status"] != "ok":
            problems.append(f"{mode_id} raised:\n{rec.get('error', '')}")
            continue
        mismatch = resolution_mismatch(rec)
        if mismatch:
            problems.append(f"{mode_id}: requested backend did not run: {mismatch}")
        dead = vacuity(rec["metrics"], expected_steps=rec.get("expected_steps"))
        if dead:
            problems.append(f"{mode_id}: dead run: {dead}")
        evidence_problems, _ = mode_evidence_problems(rec, ref, truth)
        problems += [f"{mode_id}: {p}" for p in evidence_problems]
        problems += [f"{mode_id}: layout: {p}" for p in layout_problems(rec, ref)]
        anchor = next((r for r in records if r["mode"].get("role") == "anchor"), None)
        if rec["mode"].get("role") == "anchor":
            pass
        elif rec is ref and anchor is not None and anchor.get("status") == "ok":
            problems += [
                f"{mode_id} vs {anchor['mode']['id']}: {p}" for p in first_step_problems(rec, anchor)[0]
            ]
        elif rec is not ref:
            problems += [f"{mode_id}: {p}" for p in first_step_problems(rec, ref)[0]]
        if rec is ref or ref_dead or dead or rec["mode"].get("role") in ("truth", "anchor"):
            continue
        tol = Tolerance(rec["tolerance"]["rtol"], rec["tolerance"]["atol"])
        dev = deviation(rec["metrics"], ref["metrics"], tol)
        if not dev.ok or not math.isfinite(dev.max_abs):
            problems.append(
                f"{mode_id}: {dev.worst} deviates {dev.max_abs:.3g} abs / {dev.max_rel:.3g} rel from "
                f"{ref['mode']['id']} (rtol={tol.rtol:g}, atol={tol.atol:g})"
            )
    return problems
