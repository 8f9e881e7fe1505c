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


def deviation(metrics: dict[str, Any], reference: dict[str, Any], tol: Tolerance) -> Deviation:
    """Max abs/rel deviation over every metric (and step), and whether all are within tolerance."""
    max_abs = max_rel = 0.0
    ok = True
    worst, worst_ratio = "", -1.0
    for name in METRICS:
        values, refs = as_series(metrics[name]), as_series(reference[name])
        if len(values) != len(refs):
            return Deviation(
                math.inf, math.inf, False, f"{name}: {len(values)} values vs {len(refs)} in reference"
            )
        for step, (value, ref) in enumerate(zip(values, refs, strict=True)):
            diff = abs(value - ref)
            rel = diff / abs(ref) if ref != 0 else (0.0 if diff == 0 else math.inf)
            max_abs, max_rel = max(max_abs, diff), max(max_rel, rel)
            ratio = diff / (tol.atol + tol.rtol * abs(ref))
            if ratio > worst_ratio:
                worst_ratio = ratio
                worst = name if len(values) == 1 else f"{name}[step {step}]"
            ok = ok and tol.allows(value, ref)
    return Deviation(max_abs, max_rel, ok, worst)


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


def record_failures(records: list[dict[str, Any]]) -> list[str]:
    """What the merge would reject in one case's records (reference first), as messages.

    Used by the suites' in-test assertions so a plain pytest run fails exactly where the merge
    would: a failed or dead reference, modes that raised, backends that did not run, dead runs, and
    deviations beyond each record's own tolerance (per step for e2e).
    """
    from parity.results.records import Tolerance

    problems: list[str] = []
    ref = records[0]
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
        if rec is ref or ref_dead or dead:
            continue
        tol = Tolerance(rec["tolerance"]["rtol"], rec["tolerance"]["atol"])
        dev = deviation(rec["metrics"], ref["metrics"], tol)
        if not dev.ok or not math.isfinite(dev.max_abs):
            problems.append(
                f"{mode_id}: {dev.worst} deviates {dev.max_abs:.3g} abs / {dev.max_rel:.3g} rel from "
                f"{ref['mode']['id']} (rtol={tol.rtol:g}, atol={tol.atol:g})"
            )
    return problems
