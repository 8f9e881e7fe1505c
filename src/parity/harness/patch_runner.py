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
import re
import resource
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parity import settings as parity_settings
from parity.harness import evidence, toy, weights
from parity.harness.backend_trace import trace_backends
from parity.harness.batches import packed_batch, text_id_range
from parity.harness.fingerprint import fingerprint
from parity.results.compare import effective_tolerance
from parity.results.modes import ModelMode, expected_provider, mode_skip_reason, variant_kernels
from parity.results.records import ResultsWriter, Tolerance, load_results_file, make_record, results_path
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
        device, dtype = parity_settings.device_and_dtype()
        results = parity_settings.get(parity_settings.RESULTS) or Path(default_results)
        return cls(parity_settings.get(parity_settings.VARIANT), device, dtype, results)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def total_grad_norm(model: torch.nn.Module) -> float:
    """L2 norm over every parameter gradient, accumulated in fp32 (the number a clipper would see)."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def settle_heap() -> None:
    """Collect what earlier cases left, then take every surviving object out of the collector's view.

    Why: every mode ends with a full ``gc.collect()`` (a model's reference cycles hold its weights
    until a collection runs), and a full collection walks every object the process holds. With
    torch and transformers imported that is about 0.2 s a call (CPU profile), against 0.03 s of build,
    forward and backward for a toy mode on the H200. Frozen objects (imports, registries,
    what outlives a case) are never collected, so this runs only before a case creates anything:
    what the case creates stays collectable.
    """
    gc.collect()
    gc.freeze()


def _release(device: torch.device) -> None:
    """Free what a mode left (models, activations, cached blocks) before the next one.

    After a CUDA error (a device-side assert) the context is unusable and synchronize raises the
    error again; that must not replace the mode's own record, so it is ignored here (the worker
    that runs the modes retires itself after such an error: :mod:`parity.harness.isolate`).
    """
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except RuntimeError:  # torch.AcceleratorError is one: the poisoned context again
            pass


def _parity_backends() -> tuple[Any, Any]:
    """Import (and so register) parity's attention and experts backends with transformers."""
    from parity.backend import attention, moe

    return attention, moe


#: Packed sample lengths: several samples per row, none a multiple of 64 or 128 (flash tiles), so
#: every kernel sees partial tiles and sample borders inside a tile. On a GPU the row spans several
#: tiles of every kernel (2271 tokens); on CPU it stays short (160 tokens, as many samples).
SEQ_LENS = {"cuda": (773, 1109, 389), "cpu": (61, 45, 54)}
#: Attention at initialisation should be sharp enough that masking and position bugs move the
#: numbers: target logit std ~1. Without qk-norm the logit std at init is about hidden_size *
#: initializer_range**2 (0.1 for the toys: almost uniform), so the ``scaling`` every backend receives
#: is multiplied by 1 / that, at most ATTENTION_SHARPNESS (x8 for the toys; a real-width config, hidden
#: 2048+, is already sharp and left nearly alone). Attention with qk-norm (qwen3 family) already has
#: logit std ~1 and is left alone: sharper still, bf16 rounding of q and k moved HF eager itself
#: 20-100% away from fp32 on the H200 and no bug was visible above that.
ATTENTION_SHARPNESS = 8.0


def attention_sharpness(config: Any) -> float:
    """The factor for this config's attention without qk-norm (see ATTENTION_SHARPNESS)."""
    text = getattr(config, "text_config", None) or config
    hidden = getattr(text, "hidden_size", None)
    std = getattr(text, "initializer_range", None) or 0.02
    if not isinstance(hidden, int) or hidden <= 0:
        return 1.0
    return max(1.0, min(ATTENTION_SHARPNESS, 1.0 / (hidden * std * std)))


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
    low, high, specials = text_id_range(config)
    allowed = torch.tensor([i for i in range(low, high) if i not in specials])
    limit = getattr(text, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 1:
        lens = tuple(min(n, limit) for n in lens)
    gen = torch.Generator().manual_seed(seed)
    width = max(lens)
    ids = torch.full((len(lens), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    positions = torch.zeros_like(ids)
    for row, length in enumerate(lens):
        start = width - length
        tokens = allowed[torch.randint(0, allowed.numel(), (length,), generator=gen)]
        ids[row, start:] = tokens
        mask[row, start:] = 1
        labels[row, start + 1 :] = tokens[1:]
        positions[row, start:] = torch.arange(length)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": positions}


def seq_lens_for(device: torch.device, config: Any = None) -> tuple[int, ...]:
    """The packed sample lengths; each sample shortened to the config's max_position_embeddings
    (positions restart per sample, so that is the longest position any sample reaches)."""
    lens = SEQ_LENS["cuda" if device.type == "cuda" else "cpu"]
    text = getattr(config, "text_config", None) or config
    limit = getattr(text, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 1:
        lens = tuple(min(n, limit) for n in lens)
    return lens


def sharpen_attention(model: torch.nn.Module, factor: float | None = None) -> int:
    """Multiply the ``scaling`` of every attention module without qk-norm; return how many changed.

    Applied identically in every mode (same weights, same batch), so it changes the question only
    in one way: attention now depends strongly on which keys each query may see.
    """
    factor = attention_sharpness(model.config) if factor is None else factor
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


#: transformers' own words when a model cannot take a backend (raised while building or switching)
# not "is not supported": that is transformers rejecting an unknown name (a bad name, not the model)
_MODEL_UNSUPPORTED = re.compile(r"does not support|doesn.t support", re.I)


class Phase:
    """Where a mode is (build, inputs, forward...): decides whose error an exception is."""

    def __init__(self) -> None:
        self.name = "setup"

    def __call__(self, name: str) -> Phase:
        self.name = name
        return self


def routed_to_hub_kernel(exc: BaseException) -> bool:
    """Whether transformers' hub-kernel loader raised this (``integrations/hub_kernels.py``).

    For some models (gpt-oss: its sinks) transformers serves ``flash_attention_2/3`` from a kernel it
    downloads through the ``kernels`` package, never from the installed flash library. Without that
    package the build raises ImportError there: the model cannot run the installed kernel, which is
    ``unsupported`` (with ``--require`` a failure), not an error in the model. Where the hub kernel
    does load, the provider check fails the mode instead (a substituted kernel).
    """
    tb = exc.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).name == "hub_kernels.py":
            return True
        tb = tb.tb_next
    return False


def unsupported_reason(exc: BaseException) -> str:
    """The reason an ``unsupported`` record carries: the exception, and where transformers sent it."""
    reason = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ImportError) and routed_to_hub_kernel(exc):
        reason = (
            "transformers serves this model's flash attention from a hub kernel (the `kernels` package, "
            f"downloaded at run time), not from the installed flash library: {reason}"
        )
    return reason


def classify(exc: BaseException, phase: str) -> tuple[str, str]:
    """(status, error_kind) of an exception raised in ``phase``.

    A backend the model or kernel cannot run (transformers' "does not support" while building or
    switching; a NotImplementedError from a backend) is ``unsupported``. An exception in the model
    (its build, forward or backward) is the model's ``error``. Anything else (inputs, evidence,
    weights file, records) is the tool's: ``error`` with error_kind ``harness``, shown as TOOL-ERROR.
    """
    if isinstance(exc, NotImplementedError) and phase in ("build", "forward"):
        return "unsupported", "model"
    if phase == "build" and isinstance(exc, ImportError) and routed_to_hub_kernel(exc):
        return "unsupported", "model"
    if (
        phase == "build"
        and isinstance(exc, (ValueError, ImportError))
        and _MODEL_UNSUPPORTED.search(str(exc))
    ):
        return "unsupported", "model"
    if phase in ("build", "forward", "weights"):
        return "error", "model"
    return "error", "harness"


def run_mode(
    config: Any,
    mode: ModelMode,
    settings: RunSettings,
    state: dict[str, torch.Tensor] | None = None,
    phase: Phase | None = None,
) -> tuple[dict[str, Any], evidence.Evidence]:
    """Build (from the case's weights snapshot), forward, backward; return metrics and the tensors."""
    phase = phase or Phase()
    attention = moe = None
    phase("setup")
    if mode.modeling_backend == "parity":
        attention, moe = _parity_backends()
        attention.use_kernels(variant_kernels(settings.variant))  # the variant's libraries, never a guess
        attention.reset_kernel_log()
        moe.reset_kernel_log()
    dtype = getattr(torch, mode.dtype) if mode.dtype else settings.dtype
    if settings.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(settings.device)
    build_start = time.perf_counter()
    phase("build")
    model = toy.build_model(
        config,
        attn_implementation=mode.attn_implementation,
        experts_implementation=mode.moe_implementation,
        dtype=dtype,
        device=settings.device,
        seed=SEED,
        state=state,
    )
    build_s = time.perf_counter() - build_start
    phase("inputs")
    sharpened = sharpen_attention(model)
    batch = packed_batch(config, seq_lens=seq_lens_for(settings.device, config), seed=DATA_SEED, model=model)
    if mode.dtype is not None and settings.dtype != dtype:
        if state is None:
            _round_to(model, settings.dtype)  # the truth: same (rounded) weights and inputs, fp32 compute
        batch = batch.to(settings.device, settings.dtype)
    batch = batch.to(settings.device, dtype)
    padded = None
    if toy.model_family(config) == "text":
        lens = PADDED_LENS["cuda" if settings.device.type == "cuda" else "cpu"]
        padded = {k: v.to(settings.device) for k, v in padded_batch(config, lens, DATA_SEED + 1).items()}
    start = time.perf_counter()
    phase("forward")
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
    phase("evidence")
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
            "build_s": round(build_s, 4),
            # peak resident memory of this process so far (the weights snapshot included), and device
            "peak_host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            **(
                {"peak_device_gib": round(torch.cuda.max_memory_allocated(settings.device) / 2**30, 3)}
                if settings.device.type == "cuda"
                else {}
            ),
            **({"padded_loss": float(out_padded.loss.detach().float())} if padded is not None else {}),
        },
        "inputs": {
            "seq_lens": list(batch.seq_lens),
            "tokens": int(batch.inputs["input_ids"].numel()),
            "padded_rows": list(lens) if padded is not None else None,
            "attention_sharpness": round(attention_sharpness(model.config), 3),
            "sharpened_modules": sharpened,
            **({"masks_see_positions": True} if getattr(model, toy.MASK_POSITIONS_ATTR, False) else {}),
        },
    }
    del model, out, loss, total, batch, padded
    _release(settings.device)
    return result, tensors


def plan_modes(modes: Iterable[ModelMode], settings: RunSettings) -> list[ModelMode]:
    """The modes in run order: half precision adds the fp32 truth of the reference first."""
    modes = list(modes)
    if settings.dtype_name != "float32" and modes:
        # half precision: measure every mode from an fp32 run of the reference (same weights, batch)
        ref = modes[0]
        modes = [
            ModelMode(ref.modeling_backend, ref.attn_implementation, ref.moe_implementation, "float32"),
            *modes,
        ]
    return modes


def record_order(modes: list[ModelMode]) -> list[str]:
    """The results file's expected modes: the merge's reference stays the first run-dtype mode."""
    order = [m.id for m in modes]
    if modes and modes[0].dtype is not None:
        order = [order[1], order[0], *order[2:]]
    return order


def common_fields(
    case_id: str,
    mode: ModelMode,
    tolerance: Tolerance,
    case_tolerance: Tolerance,
    settings: RunSettings,
    env: dict[str, Any],
) -> dict[str, Any]:
    """What every record of this mode carries whatever its status (make_record's keyword arguments)."""
    requested = {"attn_implementation": mode.attn_implementation}
    if mode.moe_implementation:
        requested["moe_implementation"] = mode.moe_implementation
    provider = expected_provider(settings.variant, mode)
    if provider:
        requested["kernel_provider"] = provider
    return dict(
        suite=SUITE,
        model=case_id,
        variant=settings.variant,
        mode=mode.to_json(),
        requested=requested,
        tolerance=tolerance,
        fingerprint=env,
        case_tolerance=case_tolerance.to_json(),
    )


def run_case(
    case_id: str,
    config_path: str | Path,
    modes: Iterable[ModelMode],
    tolerance: Tolerance,
    settings: RunSettings,
    *,
    case: Case | None = None,
    isolate: bool | None = None,
) -> list[dict[str, Any]]:
    """Run every mode (reference first), writing records as we go; return the records.

    ``isolate`` (default: ``PARITY_ISOLATE``) runs the modes in the persistent worker process
    (:mod:`parity.harness.isolate`): a crash, abort or hang there becomes that mode's error record
    with its stack and a fresh worker runs the modes after it. A mode the registry entry declares
    unsupported is recorded as such, with its reason, and not run; a mode this device or dtype
    cannot run is recorded as skipped.
    """
    planned = plan_modes(modes, settings)
    if isolate is None:
        isolate = bool(parity_settings.get(parity_settings.ISOLATE))
    if isolate:
        from parity.harness import isolate as isolation

        return isolation.run_case_isolated(case_id, config_path, planned, tolerance, settings, case=case)
    return run_modes(case_id, config_path, planned, tolerance, settings, case=case)


def run_modes(
    case_id: str,
    config_path: str | Path,
    modes: list[ModelMode],
    tolerance: Tolerance,
    settings: RunSettings,
    *,
    case: Case | None = None,
    start: int = 0,
    on_mode: Callable[[int, dict[str, Any]], None] | None = None,
    on_record: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``modes[start:]`` in this process (``start > 0``: resume the results file a crashed worker
    left); ``on_mode(index, common)`` is told before each mode runs (the worker's progress marker),
    ``on_record(index, record)`` after its record is written (the worker retires itself there when
    the record is a CUDA error; an exception it raises ends the run after that record)."""
    settle_heap()
    case_tolerance = tolerance
    tolerance = effective_tolerance(tolerance, settings.dtype_name)
    path = toy.config_path(config_path)
    config = toy.load_config(path)
    cfg_hash = toy.config_hash(path)
    env = fingerprint(device=settings.device, dtype=settings.dtype, seed=SEED, config_hash=cfg_hash)
    earlier = results_path(settings.results, SUITE, settings.variant, case_id)
    kept = list(load_results_file(earlier).records) if start and earlier.is_file() else []
    writer = ResultsWriter(settings.results, SUITE, settings.variant, case_id, record_order(modes))
    if kept:  # a fresh worker resuming a case: the modes before ``start`` stay as recorded
        writer.file.records = kept
        writer.flush()
    records = []
    truth_id = modes[0].id if modes else None
    truth: evidence.Evidence | None = None
    # A fresh worker resuming after a crash recomputes the truth (one mode) rather than reading it
    # from disk: saving it for every case cost a write of every parameter's fp32 gradient (7.6 GB for a
    # 1.9B model) to guard against a crash that rarely comes.
    recompute_truth = bool(start) and any(
        r["mode"]["id"] == truth_id and r["status"] == "ok" for r in kept
    )
    state: dict[str, torch.Tensor] | None = None
    weights_info: dict[str, Any] = {}
    state_error: str | None = None
    for index in range(start, len(modes)):
        mode = modes[index]
        common = common_fields(case_id, mode, tolerance, case_tolerance, settings, env)
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
        if on_mode is not None:
            on_mode(index, common)
        phase = Phase()
        try:
            if state is None and state_error is None:
                phase("weights")
                wfile = weights.weights_file(
                    settings.results, case_id, cfg_hash, SEED, settings.device.type, settings.dtype_name
                )
                state, weights_info = weights.load_or_create(
                    wfile, config, seed=SEED, device=settings.device, store_dtype=settings.dtype
                )
                print(f"[parity]   weights {weights_info}", flush=True)
            if recompute_truth:
                recompute_truth = False
                phase("truth")
                _, truth = run_mode(config, modes[0], settings, state, Phase())
                print(f"[parity]   {truth_id} recomputed for the modes after the crash", flush=True)
            ran, tensors = run_mode(config, mode, settings, state, phase)
            phase("records")
            extra: dict[str, Any] = {"inputs": ran["inputs"], "fingerprints": tensors.fingerprints()}
            if weights_info:
                extra["inputs"]["weights"], weights_info = weights_info, {}
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
                f"[parity]   loss={m['loss']:.8g} grad_norm={m['grad_norm']:.8g} "
                f"({m['wall_s']:.2f}s, build {m['build_s']:.2f}s)",
                flush=True,
            )
        except Exception as exc:  # recorded with its stack; whose error it is decides the verdict
            status, kind = classify(exc, phase.name)
            stack = traceback.format_exc()
            if status == "unsupported":
                record = make_record(status=status, reason=unsupported_reason(exc), error=stack, **common)
                print(f"[parity]   UNSUPPORTED: {record['reason']}", flush=True)
            else:
                record = make_record(status="error", error=stack, error_kind=kind, phase=phase.name, **common)
                word = "TOOL ERROR" if kind == "harness" else "ERROR"
                print(f"[parity]   {word} ({phase.name}): {stack.strip().splitlines()[-1]}", flush=True)
            _release(settings.device)
        writer.add(record)
        records.append(record)
        if on_record is not None:
            on_record(index, record)
    del truth
    _release(settings.device)
    return records
