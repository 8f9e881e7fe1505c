"""GPU benchmark of parity's kernels next to transformers' own, in one process, bf16, fwd+bwd.

    python -m parity.harness.bench --out bench.json

MoE: one experts module (Qwen3-MoE layout, 64 experts, top-8, hidden 2048, expert intermediate 768,
16384 tokens, random router top-k) run with ``fused`` (parity), ``grouped_mm`` and ``eager``
(transformers). Attention: 8192 tokens packed from several sequences, parity's FA2 backend called
through its registered function (packing derivation and the sp code path included, at sp=1), the
raw varlen kernel alone, and transformers' ``sdpa`` with the block-diagonal packing mask that
transformers builds for packed sequences (FA3 too when ``flash_attn_interface`` is installed).

Each measurement: warmup, then CUDA-event timings of ``iters`` runs; median (p10/p90) ms, useful
TFLOP/s (causal FLOPs only for attention), peak memory above the inputs. A table is printed and
everything, with the environment, is written as JSON. Without CUDA it exits 2 and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_NO_CUDA = 2


# --------------------------------------------------------------------------------------------
# timing


def measure(fn: Callable[[], None], *, warmup: int, iters: int, flops: float) -> dict[str, float]:
    """Median/p10/p90 ms of ``fn`` over ``iters`` CUDA-event-timed runs, TFLOP/s, peak memory."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    events = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    median = statistics.median(times)
    return {
        "median_ms": median,
        "p10_ms": times[int(0.1 * (len(times) - 1))],
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "tflops": flops / (median * 1e-3) / 1e12,
        "peak_mem_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
        "iters": iters,
    }


# --------------------------------------------------------------------------------------------
# MoE


def bench_moe(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from parity.backend import moe

    dtype = torch.bfloat16
    cfg = Qwen3MoeConfig(
        hidden_size=args.hidden,
        moe_intermediate_size=args.moe_inter,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
    )
    torch.manual_seed(0)
    module = Qwen3MoeExperts(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        module.gate_up_proj.normal_(std=0.02)
        module.down_proj.normal_(std=0.02)
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    logits = torch.randn(args.tokens, args.experts, device=device)
    weights, idx = torch.topk(logits.softmax(-1), args.top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype).requires_grad_()
    grad_out = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)
    rows = args.tokens * args.top_k
    flops = 3 * 6 * rows * args.hidden * args.moe_inter  # fwd: 2*N*H*2I + 2*N*I*H; bwd = 2x fwd

    def step(impl: str) -> Callable[[], None]:
        def run() -> None:
            module.config._experts_implementation = impl
            module.zero_grad(set_to_none=True)
            x.grad = weights.grad = None
            module(x, idx, weights).backward(grad_out)

        return run

    outputs = {}
    with torch.no_grad():
        for impl in ("fused", "grouped_mm"):
            module.config._experts_implementation = impl
            outputs[impl] = module(x, idx, weights).float()
    moe.reset_kernel_log()
    results = {}
    for impl in ("fused", "grouped_mm", "eager"):
        iters = args.iters if impl != "eager" else max(3, args.iters // 4)
        results[impl] = measure(step(impl), warmup=args.warmup, iters=iters, flops=flops)
    return {
        "config": {
            "tokens": args.tokens,
            "experts": args.experts,
            "top_k": args.top_k,
            "hidden": args.hidden,
            "moe_intermediate": args.moe_inter,
            "dtype": "bfloat16",
        },
        "results": results,
        "fused_provider": moe.kernel_providers_used().get("fused"),
        "speedup_fused_vs_grouped_mm": results["grouped_mm"]["median_ms"] / results["fused"]["median_ms"],
        "speedup_fused_vs_eager": results["eager"]["median_ms"] / results["fused"]["median_ms"],
        "max_abs_diff_fused_vs_grouped_mm": float((outputs["fused"] - outputs["grouped_mm"]).abs().max()),
    }


# --------------------------------------------------------------------------------------------
# attention


def _seq_lens(total: int) -> list[int]:
    """A mixed packing of ``total`` tokens: long and short sequences, as a real packer produces."""
    fractions = (0.25, 0.125, 0.0625, 0.1875, 0.125, 0.25)
    lens = [max(1, int(total * f)) for f in fractions]
    lens[-1] += total - sum(lens)
    return lens


class _Attn:
    """The module attributes attention functions read."""

    def __init__(self, heads: int, kv_heads: int) -> None:
        self.is_causal = True
        self.num_key_value_groups = heads // kv_heads
        self.training = True


def bench_attention(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import create_causal_mask

    from parity.backend import attention
    from parity.backend.attention import PARITY_FA2, PARITY_FA3, build_packing
    from parity.results.modes import variant_kernels

    dtype = torch.bfloat16
    lens = _seq_lens(args.attn_tokens)
    seq, heads, kv_heads, d = args.attn_tokens, args.heads, args.kv_heads, args.head_dim
    module = _Attn(heads, kv_heads)
    gen = torch.Generator(device=device).manual_seed(0)

    def leaf(h: int) -> torch.Tensor:
        return torch.randn(1, h, seq, d, device=device, dtype=dtype, generator=gen).requires_grad_()

    q, k, v = leaf(heads), leaf(kv_heads), leaf(kv_heads)
    grad_out = torch.randn(1, seq, heads, d, device=device, dtype=dtype, generator=gen)
    pos = torch.cat([torch.arange(n, device=device) for n in lens]).unsqueeze(0)
    flops = 3.5 * 2 * sum(n * n for n in lens) * heads * d  # causal fwd 2*sum(L^2)*H*D, bwd 2.5x fwd
    scale = d**-0.5

    # transformers' own packed-sequence mask (4-D block-diagonal bool), built once like a model does
    cfg = AutoConfig.for_model(
        "qwen3", hidden_size=heads * d, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=d
    )
    cfg._attn_implementation = "sdpa"
    embeds = torch.empty(1, seq, 8, device=device, dtype=dtype)
    mask = create_causal_mask(cfg, embeds, None, None, pos)

    def step(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            q.grad = k.grad = v.grad = None
            fn().backward(grad_out)

        return run

    candidates: dict[str, Callable[[], torch.Tensor]] = {
        "parity_fa2": lambda: attention.parity_flash_attention_2_with_sp(
            module, q, k, v, None, scaling=scale, position_ids=pos
        )[0],
        "hf_sdpa_packed_mask": lambda: sdpa_attention_forward(module, q, k, v, mask, scaling=scale)[0],
    }
    # the bench runs in the eager variant's env: its FA2 library, named (never picked by import order)
    attention.use_kernels(variant_kernels("eager"))
    attention.reset_kernel_log()
    candidates["parity_fa2"]()  # resolve the provider before timing (raises if no FA2 kernel here)
    fa2_provider = attention.kernel_providers_used()[PARITY_FA2]
    packing = build_packing(1, seq, device, position_ids=pos)
    kernel = attention._resolve_kernel(PARITY_FA2, q)[1]
    if kernel is not None:  # the raw kernel on pre-flattened [T, H, D] inputs: the wrapper's floor

        def raw() -> torch.Tensor:
            qf, kf, vf = (t.transpose(1, 2).reshape(seq, t.shape[1], d) for t in (q, k, v))
            out = kernel(
                qf,
                kf,
                vf,
                packing.cu_seqlens,
                packing.max_len,
                causal=True,
                scale=scale,
                dropout=0.0,
                window=None,
            )
            return out.view(1, seq, heads, d)

        candidates["raw_fa2_kernel"] = raw
    if attention._library_problem(attention.FLASH_ATTN_INTERFACE) is None:
        candidates["parity_fa3"] = lambda: attention.parity_flash_attention_3_with_sp(
            module, q, k, v, None, scaling=scale, position_ids=pos
        )[0]
    with torch.no_grad():
        ref = candidates["hf_sdpa_packed_mask"]().float()
        diffs = {name: float((fn().float() - ref).abs().max()) for name, fn in candidates.items()}
    results = {
        name: measure(step(fn), warmup=args.warmup, iters=args.iters, flops=flops)
        for name, fn in candidates.items()
    }
    return {
        "config": {
            "tokens": seq,
            "seq_lens": lens,
            "heads": heads,
            "kv_heads": kv_heads,
            "head_dim": d,
            "dtype": "bfloat16",
            "causal": True,
        },
        "results": results,
        "providers": attention.kernel_providers_used() | {PARITY_FA2: fa2_provider},
        "speedup_parity_fa2_vs_sdpa_mask": results["hf_sdpa_packed_mask"]["median_ms"]
        / results["parity_fa2"]["median_ms"],
        "max_abs_diff_vs_sdpa_mask": diffs,
        "fa3": PARITY_FA3 if "parity_fa3" in candidates else None,
    }


# --------------------------------------------------------------------------------------------
# report


def environment() -> dict[str, Any]:
    import torch
    import transformers

    try:
        import flash_attn

        fa = getattr(flash_attn, "__version__", "?")
    except Exception:
        fa = None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "flash_attn": fa,
        "device": torch.cuda.get_device_name(),
        "compute_capability": list(torch.cuda.get_device_capability()),
    }


def print_table(title: str, results: dict[str, dict[str, float]], baseline: str) -> None:
    print(f"\n{title}")
    header = f"{'impl':<22}{'median ms':>11}{'p10':>9}{'p90':>9}{'TFLOP/s':>10}{'peak GiB':>10}"
    print(f"  {header}  vs {baseline}")
    base = results[baseline]["median_ms"]
    for name, r in results.items():
        print(
            f"  {name:<22}{r['median_ms']:>11.3f}{r['p10_ms']:>9.3f}{r['p90_ms']:>9.3f}{r['tflops']:>10.1f}"
            f"{r['peak_mem_gib']:>10.2f}{base / r['median_ms']:>9.2f}x"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--only", choices=("moe", "attention"), default=None)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--moe-inter", type=int, default=768)
    p.add_argument("--attn-tokens", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "parity.harness.bench needs CUDA: no GPU is visible to torch, so nothing was measured "
            "(the benchmark is bf16 grouped GEMMs and flash kernels).",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA
    report: dict[str, Any] = {"environment": environment()}
    if args.only in (None, "moe"):
        report["moe"] = bench_moe(args, torch.device("cuda"))
        m = report["moe"]
        print_table("MoE experts fwd+bwd (bf16)", m["results"], baseline="grouped_mm")
        speedup = m["speedup_fused_vs_grouped_mm"]
        verdict = "met" if speedup >= 1.2 else "NOT met"
        print(
            f"  fused provider: {m['fused_provider']}; fused vs grouped_mm {speedup:.2f}x "
            f"(target 1.2x: {verdict}); max |fused - grouped_mm| {m['max_abs_diff_fused_vs_grouped_mm']:.2e}"
        )
    if args.only in (None, "attention"):
        report["attention"] = bench_attention(args, torch.device("cuda"))
        a = report["attention"]
        print_table("Packed causal attention fwd+bwd (bf16)", a["results"], baseline="hf_sdpa_packed_mask")
        print(f"  providers: {a['providers']}; max |diff| vs sdpa+mask: {a['max_abs_diff_vs_sdpa_mask']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
