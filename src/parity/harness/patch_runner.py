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
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parity import settings
from parity.harness import evidence, toy
from parity.harness.backend_trace import trace_backends
from parity.harness.batches import packed_batch
from parity.harness.fingerprint import fingerprint
from parity.results.compare import effective_tolerance
from parity.results.modes import ModelMode, expected_provider, mode_skip_reason, variant_kernels
from parity.results.records import ResultsWriter, Tolerance, make_record
from parity.results.registry import Case

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
        device, dtype = settings.device_and_dtype()
        results = settings.get("PARITY_RESULTS") or Path(default_results)
        return cls(settings.get("PARITY_VARIANT"), device, dtype, results)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


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
    from parity.backend import attention, moe

    return attention, moe


#: Packed sample lengths: several samples per row, none a multiple of 64 or 128 (flash tiles), so
#: every kernel sees partial tiles and sample borders inside a tile. On a GPU the row spans several
#: tiles of every kernel (2271 tokens); on CPU it stays short (160 tokens, as many samples).
SEQ_LENS = {"cuda": (773, 1109, 389), "cpu": (61, 45, 54)}
#: Attention temperature multiplier applied to the ``scaling`` of attention modules without qk-norm
#: (the factor every backend receives): at initialisation their attention is almost uniform
#: (logit std ~0.1), which hides masking and position bugs; x8 gives logit std ~1. Attention with
#: qk-norm (qwen3 family) already has logit std ~1 and is left alone: sharper still, bf16 rounding
#: of q and k moves the softmax so much that HF eager itself lands 20-100% away from fp32 and no
#: bug is visible above that (measured on the H200).
ATTENTION_SHARPNESS = 8.0


#: A left-padded batch beside the packed row (text models): two rows, the shorter one padded at the
#: front, so a backend that lets real tokens attend to padding, or drops the padding mask, changes
#: the numbers; with right padding the causal mask would hide exactly that bug.
PADDED_LENS = {"cuda": (517, 301), "cpu": (37, 23)}


def padded_batch(config: Any, lens: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    """Rows of random text ids, left-padded to the longest, with ``attention_mask`` and positions
    starting at 0 on each row's first real token; pad positions carry label -100."""
    text = getattr(config, "text_config", None) or config
    pad = getattr(text, "pad_token_id", None)
    pad = int(pad) if isinstance(pad, int) else 0
    gen = torch.Generator().manual_seed(seed)
    width = max(lens)
    ids = torch.full((len(lens), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    positions = torch.zeros_like(ids)
    for row, length in enumerate(lens):
        start = width - length
        tokens = torch.randint(3, min(1000, int(text.vocab_size)), (length,), generator=gen)
        ids[row, start:] = tokens
        mask[row, start:] = 1
        labels[row, start + 1 :] = tokens[1:]
        positions[row, start:] = torch.arange(length)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}


def seq_lens_for(device: torch.device) -> tuple[int, ...]:
    return SEQ_LENS["cuda" if device.type == "cuda" else "cpu"]


def sharpen_attention(model: torch.nn.Module, factor: float | None = None) -> int:
    """Multiply the ``scaling`` of every attention module without qk-norm; return how many changed.

    Applied identically in every mode (same weights, same batch), so it changes the question only
    in one way: attention now depends strongly on which keys each query may see.
    """
    factor = ATTENTION_SHARPNESS if factor is None else factor
    changed = 0
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        if not (type(module).__name__.endswith("Attention") and isinstance(scaling, float)):
            continue
        if "q_norm" in module._modules or "k_norm" in module._modules:
            continue
        module.scaling = scaling * factor
        changed += 1
    return changed


def _round_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round fp32 weights to ``dtype`` and back: the fp32 truth runs on exactly the half-precision
    run's weights, so the two differ by compute rounding only, not by weight rounding."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() and tensor.dtype == torch.float32:
                tensor.copy_(tensor.to(dtype).to(torch.float32))


def run_mode(config: Any, mode: ModelMode, settings: RunSettings) -> tuple[dict[str, Any], evidence.Evidence]:
    """Build, forward, backward; return (requested/resolved backends and metrics, the tensors)."""
    attention = moe = None
    if mode.modeling_backend == "parity":
        attention, moe = _parity_backends()
        attention.use_kernels(variant_kernels(settings.variant))  # the variant's libraries, never a guess
        attention.reset_kernel_log()
        moe.reset_kernel_log()
    dtype = getattr(torch, mode.dtype) if mode.dtype else settings.dtype
    model = toy.build_model(
        config,
        attn_implementation=mode.attn_implementation,
        experts_implementation=mode.moe_implementation,
        dtype=dtype,
        device=settings.device,
        seed=SEED,
    )
    sharpened = sharpen_attention(model)
    batch = packed_batch(config, seq_lens=seq_lens_for(settings.device), seed=DATA_SEED, model=model)
    if mode.dtype is not None and settings.dtype != dtype:
        _round_to(model, settings.dtype)  # the truth: same (rounded) weights and inputs, fp32 compute
        batch = batch.to(settings.device, settings.dtype)
    batch = batch.to(settings.device, dtype)
    padded = None
    if toy.model_family(config) == "text":
        lens = PADDED_LENS["cuda" if settings.device.type == "cuda" else "cpu"]
        padded = {k: v.to(settings.device) for k, v in padded_batch(config, lens, DATA_SEED + 1).items()}
    start = time.perf_counter()
    with trace_backends() as trace:
        out = model(**batch.inputs, use_cache=False)
        loss = out.loss
        total = loss
        if padded is not None:  # one backward over both batches: every gradient sees both
            out_padded = model(**padded, use_cache=False)
            total = loss + out_padded.loss
        total.backward()
    grad_norm = total_grad_norm(model)
    if settings.device.type == "cuda":
        torch.cuda.synchronize(settings.device)
    elapsed = time.perf_counter() - start
    tensors = evidence.collect(model, out.logits, batch.inputs["labels"])
    if padded is not None:
        extra = evidence.collect(model, out_padded.logits, padded["labels"]).logits
        tensors.logits = torch.cat([tensors.logits, extra])
    resolved = {"attn_implementation": trace.resolved("attention")}
    if mode.moe_implementation is not None:
        resolved["moe_implementation"] = trace.resolved("experts")
    if attention is None and expected_provider(settings.variant, mode):
        resolved["kernel_provider"] = trace.flash_provider()  # transformers' flash path: which library ran
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
            **({"padded_loss": float(out_padded.loss.detach().float())} if padded is not None else {}),
        },
        "inputs": {
            "seq_lens": list(batch.seq_lens),
            "tokens": int(batch.inputs["input_ids"].numel()),
            "padded_rows": list(lens) if padded is not None else None,
            "attention_sharpness": ATTENTION_SHARPNESS,
            "sharpened_modules": sharpened,
        },
    }
    del model, out, loss, total, batch, padded
    _release(settings.device)
    return result, tensors


def run_case(
    case_id: str,
    config_path: str | Path,
    modes: Iterable[ModelMode],
    tolerance: Tolerance,
    settings: RunSettings,
    *,
    case: Case | None = None,
) -> list[dict[str, Any]]:
    """Run every mode (reference first), writing records as we go; return the records.

    A mode the registry entry declares unsupported is recorded as such, with its reason, and not
    run; a mode this device or dtype cannot run is recorded as skipped.
    """
    modes = list(modes)
    if settings.dtype_name != "float32" and modes:
        # half precision: measure every mode from an fp32 run of the reference (same weights, batch)
        ref = modes[0]
        modes = [
            ModelMode(ref.modeling_backend, ref.attn_implementation, ref.moe_implementation, "float32"),
            *modes,
        ]
    case_tolerance = tolerance
    tolerance = effective_tolerance(tolerance, settings.dtype_name)
    path = toy.config_path(config_path)
    config = toy.load_config(path)
    env = fingerprint(
        device=settings.device, dtype=settings.dtype, seed=SEED, config_hash=toy.config_hash(path)
    )
    order = [m.id for m in modes]
    if modes and modes[0].dtype is not None:  # the merge's reference stays the first run-dtype mode
        order = [order[1], order[0], *order[2:]]
    writer = ResultsWriter(settings.results, SUITE, settings.variant, case_id, order)
    records = []
    truth: evidence.Evidence | None = None
    truth_id = modes[0].id if modes else None
    for mode in modes:
        requested = {"attn_implementation": mode.attn_implementation}
        if mode.moe_implementation:
            requested["moe_implementation"] = mode.moe_implementation
        provider = expected_provider(settings.variant, mode)
        if provider:
            requested["kernel_provider"] = provider
        common = dict(
            suite=SUITE,
            model=case_id,
            variant=settings.variant,
            mode=mode.to_json(),
            requested=requested,
            tolerance=tolerance,
            fingerprint=env,
            case_tolerance=case_tolerance.to_json(),
        )
        unsupported = (
            case.unsupported_reason(mode.attn_implementation, mode.moe_implementation) if case else None
        )
        skip = mode_skip_reason(mode, settings.device.type, settings.dtype_name)
        if unsupported or skip:
            status = "unsupported" if unsupported else "skipped"
            record = make_record(status=status, reason=unsupported or skip, **common)
            print(
                f"[parity] {settings.variant} {case_id} {mode.id}: {status} ({unsupported or skip})",
                flush=True,
            )
            writer.add(record)
            records.append(record)
            continue
        print(f"[parity] {settings.variant} {case_id} {mode.id} ...", flush=True)
        try:
            ran, tensors = run_mode(config, mode, settings)
            extra: dict[str, Any] = {"inputs": ran["inputs"], "fingerprints": tensors.fingerprints()}
            if mode.id == truth_id:
                truth = tensors
            elif truth is not None:
                extra["evidence"] = {"against": truth_id, **evidence.compare(tensors, truth)}
            del tensors
            record = make_record(
                status="ok", resolved=ran["resolved"], metrics=ran["metrics"], **common, **extra
            )
            m = record["metrics"]
            print(
                f"[parity]   loss={m['loss']:.8g} grad_norm={m['grad_norm']:.8g} ({m['wall_s']:.2f}s)",
                flush=True,
            )
        except Exception:  # a mode that raises is a finding about the model, recorded and reported
            record = make_record(status="error", error=traceback.format_exc(), **common)
            print(f"[parity]   ERROR: {record['error'].strip().splitlines()[-1]}", flush=True)
            _release(settings.device)
        writer.add(record)
        records.append(record)
    del truth
    _release(settings.device)
    return records
