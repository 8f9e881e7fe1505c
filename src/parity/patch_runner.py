"""One forward+backward per mode on identical weights and an identical packed batch.

The patch suite's body. Each mode gets a freshly built model (same CPU seed, so bit-identical
weights), runs one forward+backward on the same packed batch, and yields a self-contained record:
what was requested, what actually ran (call trace), loss, total grad norm, tolerance and the
environment fingerprint. Records are written after every mode so a crash loses only the mode that
crashed. The test asserts on the same comparison the merge uses, so a plain pytest run fails on a
breach too.
"""

from __future__ import annotations

import gc
import os
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parity import toy
from parity.backend_trace import trace_backends
from parity.batches import packed_batch
from parity.fingerprint import REPO_ROOT, fingerprint
from parity.modes import ModelMode, expected_provider, mode_skip_reason
from parity.records import ResultsWriter, Tolerance

SUITE = "patch"
SEED = 0
DATA_SEED = 1


@dataclass(frozen=True)
class RunSettings:
    """Where and how the suite runs; filled from the environment the nox session sets."""

    variant: str
    device: torch.device
    dtype: torch.dtype
    results: Path

    @classmethod
    def from_env(cls, default_results: Path) -> RunSettings:
        device = torch.device(
            os.environ.get("PARITY_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        dtype_name = os.environ.get("PARITY_DTYPE") or ("bfloat16" if device.type == "cuda" else "float32")
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"PARITY_DTYPE={dtype_name!r} is not a torch dtype (use float32 or bfloat16)")
        results = Path(os.environ.get("PARITY_RESULTS") or default_results)
        return cls(os.environ.get("PARITY_VARIANT", "eager"), device, dtype, results)


#: Ceiling on the tolerance in float32. The case tolerances (the seed's 1e-2 defaults) are sized for
#: bf16 rounding; in fp32 the backends agree to ~1e-7, and a 1e-2 tolerance would let real bugs
#: through: attention leaking across two packed samples moved a toy qwen3's loss by only 0.23%.
FP32_TOLERANCE = Tolerance(rtol=1e-4, atol=1e-5)


def effective_tolerance(case: Tolerance, dtype: torch.dtype) -> Tolerance:
    """The case tolerance, tightened to FP32_TOLERANCE when the run is in float32."""
    if dtype != torch.float32:
        return case
    return Tolerance(min(case.rtol, FP32_TOLERANCE.rtol), min(case.atol, FP32_TOLERANCE.atol))


def total_grad_norm(model: torch.nn.Module) -> float:
    """L2 norm over every parameter gradient, accumulated in fp32 (the number a clipper would see)."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _parity_backends() -> tuple[Any, Any]:
    """Import (and so register) parity's attention and experts backends with transformers."""
    from parity import attention, moe

    return attention, moe


def run_mode(config: Any, mode: ModelMode, settings: RunSettings) -> dict[str, Any]:
    """Build, forward, backward; return requested/resolved backends and the metrics."""
    attention = moe = None
    if mode.modeling_backend == "parity":
        attention, moe = _parity_backends()
        attention.reset_kernel_log()
        moe.reset_kernel_log()
    model = toy.build_model(
        config,
        attn_implementation=mode.attn_implementation,
        experts_implementation=mode.moe_implementation,
        dtype=settings.dtype,
        device=settings.device,
        seed=SEED,
    )
    batch = packed_batch(config, seed=DATA_SEED, model=model).to(settings.device, settings.dtype)
    start = time.perf_counter()
    with trace_backends() as trace:
        out = model(**batch.inputs, use_cache=False)
        loss = out.loss
        loss.backward()
    grad_norm = total_grad_norm(model)
    if settings.device.type == "cuda":
        torch.cuda.synchronize(settings.device)
    elapsed = time.perf_counter() - start
    resolved = {"attn_implementation": trace.resolved("attention")}
    if mode.moe_implementation is not None:
        resolved["moe_implementation"] = trace.resolved("experts")
    if attention is not None:
        resolved["kernel_provider"] = attention.kernel_providers_used().get(mode.attn_implementation)
        if mode.moe_implementation == "fused":
            resolved["experts_provider"] = moe.kernel_providers_used().get("fused")
    result = {
        "resolved": resolved,
        "metrics": {
            "loss": float(loss.detach().float()),
            "grad_norm": grad_norm,
            "wall_s": round(elapsed, 4),
        },
    }
    del model, out, loss, batch
    _release(settings.device)
    return result


def run_case(
    case_id: str,
    config_path: str | Path,
    modes: Iterable[ModelMode],
    tolerance: Tolerance,
    settings: RunSettings,
) -> list[dict[str, Any]]:
    """Run every mode (reference first), writing records as we go; return the records."""
    modes = list(modes)
    case_tolerance = tolerance
    tolerance = effective_tolerance(tolerance, settings.dtype)
    path = Path(config_path)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path  # case lists use repo-relative paths; allow running from elsewhere
    config = toy.load_config(path)
    cfg_hash = toy.config_hash(toy.config_path(str(path)))
    env = fingerprint(device=settings.device, dtype=settings.dtype, seed=SEED, config_hash=cfg_hash)
    writer = ResultsWriter(settings.results, SUITE, settings.variant, case_id, [m.id for m in modes])
    records = []
    for mode in modes:
        requested = {"attn_implementation": mode.attn_implementation}
        if mode.moe_implementation:
            requested["moe_implementation"] = mode.moe_implementation
        provider = expected_provider(settings.variant, mode)
        if provider:
            requested["kernel_provider"] = provider
        record: dict[str, Any] = {
            "suite": SUITE,
            "model": case_id,
            "variant": settings.variant,
            "mode": mode.to_json(),
            "requested": requested,
            "tolerance": tolerance.to_json(),
            "case_tolerance": case_tolerance.to_json(),
            "fingerprint": env,
        }
        skip = mode_skip_reason(mode, settings.device.type, str(settings.dtype).removeprefix("torch."))
        if skip:
            record.update(status="skipped", reason=skip, resolved={}, metrics={})
            print(f"[parity] {settings.variant} {case_id} {mode.id}: skipped ({skip})", flush=True)
            writer.add(record)
            records.append(record)
            continue
        print(f"[parity] {settings.variant} {case_id} {mode.id} ...", flush=True)
        try:
            record.update(run_mode(config, mode, settings))
            record["status"] = "ok"
            m = record["metrics"]
            print(
                f"[parity]   loss={m['loss']:.8g} grad_norm={m['grad_norm']:.8g} ({m['wall_s']:.2f}s)",
                flush=True,
            )
        except Exception:  # a mode that raises is a finding about the model, recorded and reported
            record.update(status="error", error=traceback.format_exc(), resolved={}, metrics={})
            print(f"[parity]   ERROR: {record['error'].strip().splitlines()[-1]}", flush=True)
            _release(settings.device)
        writer.add(record)
        records.append(record)
    return records
