"""What every parity check worker shares: rank setup, comparisons that report deviations, results."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from parity import settings
from parity.harness import tiny as _tiny


@dataclass
class Settings:
    """Where the checks run. CPU: fp32, gloo, sdpa-based backend. GPU: any backend and dtype.

    Tolerances follow the dtype: fp32 results of sp/ep runs agree to rounding; bf16 leaves room
    for the different accumulation orders of kernels that see different head or row counts.
    """

    backend: str = "parity_sdpa_with_sp"
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def atol(self) -> float:
        return 1e-6 if self.dtype == torch.float32 else 1e-2

    @property
    def rtol(self) -> float:
        return 1e-5 if self.dtype == torch.float32 else 2e-2

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """Move to the check's device; floating tensors also take its dtype."""
        return t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device)


SETTINGS = Settings()


@dataclass
class Comparison:
    """One tensor compared with its reference: passes when max|a-b| <= atol + rtol * max|ref|."""

    name: str
    max_abs: float
    ref_max: float
    atol: float
    rtol: float

    @property
    def bound(self) -> float:
        return self.atol + self.rtol * self.ref_max

    @property
    def passed(self) -> bool:
        # A NaN deviation or an all-zero reference proves nothing.
        return math.isfinite(self.max_abs) and self.ref_max > 0 and self.max_abs <= self.bound


@dataclass
class CaseResult:
    case: str
    comparisons: list[Comparison] = field(default_factory=list)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.comparisons) and all(c.passed for c in self.comparisons)

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.comparisons), default=float("nan"))

    def compare(self, name: str, got: torch.Tensor, ref: torch.Tensor, *, atol: float, rtol: float) -> None:
        if got is None or ref is None:
            raise AssertionError(f"{self.case}/{name}: missing tensor (got {got is None}, ref {ref is None})")
        got, ref = got.detach().double(), ref.detach().double()
        if got.shape != ref.shape:
            raise AssertionError(
                f"{self.case}/{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
            )
        self.comparisons.append(
            Comparison(name, float((got - ref).abs().max()), float(ref.abs().max()), atol, rtol)
        )


def parse_args(description: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=None, help="directory for rank_<r>.json results")
    parser.add_argument("--cases", default="", help="comma-separated subset of cases (default: all)")
    parser.add_argument(
        "--backend", default="parity_sdpa_with_sp", help="parity attention backend for the sp cases"
    )
    parser.add_argument(
        "--attn-kernel",
        default=None,
        help="kernel library serving --backend, e.g. flash_attn or torch.varlen_attn (default: its default)",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    return parser.parse_args(argv)


def init(args: argparse.Namespace) -> tuple[int, int]:
    """Join the process group through parity.harness.rank_setup (hang diagnostics, timeouts) and fill
    :data:`SETTINGS`: NCCL and this rank's GPU when CUDA is available, else gloo on CPU."""
    from parity.harness.rank_setup import init_rank

    if torch.cuda.is_available():
        rank, world = init_rank(backend="nccl")
        SETTINGS.device = torch.device("cuda", torch.cuda.current_device())
    else:
        torch.set_num_threads(1)  # two ranks on a two-core machine: oversubscription makes gloo crawl
        rank, world = init_rank(backend="gloo")
    SETTINGS.backend = args.backend
    if getattr(args, "attn_kernel", None):
        from parity.backend import attention

        attention.use_kernels({args.backend: args.attn_kernel})
    SETTINGS.dtype = getattr(torch, args.dtype)
    return rank, world


def finish(tag: str, rank: int, results: list[CaseResult], out: Path | None) -> int:
    """Print one line per case and comparison, write JSON, return the process exit code."""
    from parity.backend import attention, moe

    fault = ",".join(settings.get(settings.FAULT))
    providers = {"attention": attention.kernel_providers_used(), "experts": moe.kernel_providers_used()}
    print(
        f"[{tag}] rank={rank} backend={SETTINGS.backend} dtype={SETTINGS.dtype} device={SETTINGS.device} "
        f"kernels={providers}",
        flush=True,
    )
    for res in results:
        status = "PASS" if res.passed else "FAIL"
        if res.error:
            print(f"[{tag}] rank={rank} case={res.case} {status} error: {res.error}", flush=True)
            continue
        print(f"[{tag}] rank={rank} case={res.case} {status} max_abs_dev={res.max_abs:.3e}", flush=True)
        for c in res.comparisons:
            flag = "ok" if c.passed else "BREACH"
            print(
                f"[{tag}]   rank={rank} {res.case}/{c.name}: max_abs={c.max_abs:.3e} "
                f"bound={c.bound:.3e} (ref max {c.ref_max:.3e}) {flag}",
                flush=True,
            )
    ok = bool(results) and all(r.passed for r in results)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "check": tag,
            "rank": rank,
            "fault": fault,
            "backend": SETTINGS.backend,
            "dtype": str(SETTINGS.dtype),
            "device": str(SETTINGS.device),
            "kernel_providers": providers,
            "passed": ok,
            "cases": [
                {
                    "case": r.case,
                    "passed": r.passed,
                    "error": r.error,
                    "max_abs": r.max_abs,
                    "comparisons": [
                        asdict(c) | {"passed": c.passed, "bound": c.bound} for c in r.comparisons
                    ],
                }
                for r in results
            ],
        }
        (out / f"{tag}_rank_{rank}.json").write_text(json.dumps(payload, indent=2))
    print(f"[{tag}] rank={rank} {'PASSED' if ok else 'FAILED'} (fault={fault or 'none'})", flush=True)
    return 0 if ok else 1


def run_cases(cases: dict[str, Callable[[CaseResult], None]], selected: str) -> list[CaseResult]:
    """Run each case; an exception becomes a failed case (every rank must still reach the end)."""
    names = [n for n in selected.split(",") if n] or list(cases)
    results = []
    for name in names:
        res = CaseResult(name)
        try:
            cases[name](res)
        except Exception as exc:  # reported per case; a crash in one case must not hide the others
            res.error = f"{type(exc).__name__}: {exc}"
            print(f"case {name} raised:", exc, file=sys.stderr, flush=True)
        results.append(res)
    return results


def main(tag: str, cases: dict[str, Callable[[CaseResult], None]], doc: str, argv: list[str] | None) -> int:
    """The whole life of a check worker: parse, join the group, run the cases, leave, report."""
    args = parse_args(doc.splitlines()[0], argv)
    rank, _ = init(args)
    try:
        results = run_cases(cases, args.cases)
    finally:
        from parity.harness.rank_setup import shutdown

        shutdown()
    return finish(tag, rank, results, args.out)


tiny_text_config = _tiny.tiny_text_config  # kept under its old name for the check modules
