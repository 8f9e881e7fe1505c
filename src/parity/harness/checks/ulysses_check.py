"""Ulysses attention at sp=world equals sp=1: outputs and input gradients, packed sequences.

Every rank builds the same full inputs (same seed), computes the sp=1 reference on the whole
sequence, then its own sequence slice with the sp group active, and compares the slice of output
and gradients. Cases cover derived packing (position_ids gathered over sp), explicit full
cu_seqlens, GQA, kv-head replication (fewer kv heads than sp), D_v != D_qk, non-causal attention,
attention sinks + softcap + a sliding window (each rank must take its own heads' sinks), and a
whole tiny qwen3 model fed with :func:`parity.backend.ulysses.shard_packed_inputs`.

Run: ``torchrun --nproc-per-node 2 -m parity.harness.checks.ulysses_check [--out DIR]`` (CPU: gloo, fp32,
``parity_sdpa_with_sp``); on GPUs add e.g. ``--backend parity_flash_attention_2_with_sp --dtype
bfloat16`` (and ``--attn-kernel torch.varlen_attn`` where flash_attn is not installed). Negative
control: ``PARITY_FAULT=ulysses_swap`` must make it fail.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parity.backend.attention import parity_attention_forward, set_attention_backend
from parity.backend.parallel_state import parallel_groups
from parity.backend.ulysses import (
    cu_seqlens_from_position_ids,
    pad_position_ids,
    pad_to_multiple,
    shard_packed_inputs,
    shard_sequence,
)
from parity.harness.checks import _common
from parity.harness.checks._common import SETTINGS, CaseResult

TAG = "ulysses_check"
SEQ_LENS = (5, 11, 7, 9)  # 32 tokens: not aligned with the sp slices, so sequences straddle ranks


class _FakeAttention(torch.nn.Module):
    """The attributes transformers' attention modules expose to attention functions."""

    def __init__(self, heads: int, kv_heads: int, causal: bool) -> None:
        super().__init__()
        self.is_causal = causal
        self.num_key_value_groups = heads // kv_heads


def _packed_positions(lens: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)


def _attention_case(
    res: CaseResult,
    *,
    heads: int,
    kv_heads: int,
    d_qk: int,
    d_v: int,
    causal: bool,
    explicit_cu: bool,
    sinks: bool = False,
    softcap: float | None = None,
    window: int | None = None,
) -> None:
    """sp=world vs sp=1 on one attention call; with ``sinks`` each rank must use its own heads' sinks
    (their gradients, summed over the ranks, must equal the sp=1 gradient)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    put, backend, atol, rtol = SETTINGS.put, SETTINGS.backend, SETTINGS.atol, SETTINGS.rtol
    gen = torch.Generator().manual_seed(1234)
    seq = sum(SEQ_LENS)
    q = put(torch.randn(1, heads, seq, d_qk, generator=gen))
    k = put(torch.randn(1, kv_heads, seq, d_qk, generator=gen))
    v = put(torch.randn(1, kv_heads, seq, d_v, generator=gen))
    proj = put(torch.randn(1, seq, heads, d_v, generator=gen))  # random cotangent: every grad non-trivial
    pos = put(_packed_positions(SEQ_LENS))
    module = _FakeAttention(heads, kv_heads, causal)
    scale = d_qk**-0.5
    sink_ref = put(torch.randn(heads, generator=gen)).requires_grad_() if sinks else None
    sink_loc = sink_ref.detach().clone().requires_grad_() if sinks else None

    def extra(s_aux: torch.Tensor | None) -> dict:
        out: dict = {"sliding_window": window}
        if s_aux is not None:
            out["s_aux"] = s_aux
        if softcap is not None:
            out["softcap"] = softcap
        return out

    def kwargs_for(position_ids: torch.Tensor) -> dict:
        if not explicit_cu:
            return {"position_ids": position_ids}
        cu, max_len = cu_seqlens_from_position_ids(pos)  # always the FULL sequence
        return {
            "position_ids": position_ids,
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": max_len,
            "max_length_k": max_len,
        }

    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    with parallel_groups():
        ref_out, _ = parity_attention_forward(
            backend, module, *ref_in, None, scaling=scale, **kwargs_for(pos), **extra(sink_ref)
        )
    (ref_out * proj).sum().backward()

    loc_in = [shard_sequence(t, rank, world, dim=2).clone().requires_grad_() for t in (q, k, v)]
    with parallel_groups(sp=dist.group.WORLD):
        out, _ = parity_attention_forward(
            backend,
            module,
            *loc_in,
            None,
            scaling=scale,
            **kwargs_for(shard_sequence(pos, rank, world, dim=1)),
            **extra(sink_loc),
        )
    (out * shard_sequence(proj, rank, world, dim=1)).sum().backward()
    if sinks:  # rank j's gradient covers its heads over the full sequence: the sum is the full one
        grad = sink_loc.grad.clone()
        dist.all_reduce(grad)
        res.compare("dsinks", grad, sink_ref.grad, atol=atol, rtol=rtol)

    res.compare("out", out, shard_sequence(ref_out, rank, world, dim=1), atol=atol, rtol=rtol)
    for name, loc, ref in zip(("dq", "dk", "dv"), loc_in, ref_in, strict=True):
        res.compare(name, loc.grad, shard_sequence(ref.grad, rank, world, dim=2), atol=atol, rtol=rtol)


def _tiny_qwen3() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = _common.tiny_text_config("qwen3")
    torch.manual_seed(0)
    # built with sdpa, then switched: names containing "flash" fail transformers' build validation
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    set_attention_backend(model, SETTINGS.backend)
    return model.to(SETTINGS.device, SETTINGS.dtype).eval()


def _model_case(res: CaseResult) -> None:
    """Whole model: sharded input_ids/position_ids + full cu_seqlens at sp=world vs sp=1."""
    rank, world = dist.get_rank(), dist.get_world_size()
    lens = (9, 14, 6)  # 29 tokens: shard_packed_inputs pads them to a multiple of sp
    put = SETTINGS.put
    atol, rtol = max(1e-5, SETTINGS.atol), max(1e-5, SETTINGS.rtol)
    gen = torch.Generator().manual_seed(7)
    ids = put(torch.randint(0, 128, (1, sum(lens)), generator=gen))
    pos = put(_packed_positions(lens))
    # the reference sees the same padded sequence (padding is its own packed sequence)
    ref_ids = pad_to_multiple(ids, world, dim=-1)
    ref_pos = pad_position_ids(pos, world)
    proj = put(torch.randn(1, ref_ids.shape[-1], 128, generator=gen))

    ref_model, model = _tiny_qwen3(), _tiny_qwen3()
    with parallel_groups():
        ref_logits = ref_model(input_ids=ref_ids, position_ids=ref_pos).logits
    (ref_logits * proj).sum().backward()

    local = shard_packed_inputs(ids, pos, sp_rank=rank, sp_size=world)
    with parallel_groups(sp=dist.group.WORLD):
        logits = model(**local).logits
    (logits * shard_sequence(proj, rank, world, dim=1)).sum().backward()

    res.compare("logits", logits, shard_sequence(ref_logits, rank, world, dim=1), atol=atol, rtol=rtol)
    worst: tuple[float, str, torch.Tensor, torch.Tensor] | None = None
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        grad = p.grad.clone()
        dist.all_reduce(grad)  # each rank holds the gradient of its own tokens; the sum is the full one
        dev = float((grad - p_ref.grad).abs().max())
        if worst is None or dev > worst[0]:
            worst = (dev, name, grad, p_ref.grad)
    assert worst is not None
    res.compare(f"grad[{worst[1]}](worst)", worst[2], worst[3], atol=atol, rtol=rtol)


CASES = {
    "gqa_causal_positions": lambda r: _attention_case(
        r, heads=4, kv_heads=2, d_qk=16, d_v=16, causal=True, explicit_cu=False
    ),
    "gqa_causal_cu_seqlens": lambda r: _attention_case(
        r, heads=4, kv_heads=2, d_qk=16, d_v=16, causal=True, explicit_cu=True
    ),
    "mqa_kv_replicated_dv_ne_dqk": lambda r: _attention_case(
        r, heads=4, kv_heads=1, d_qk=24, d_v=16, causal=True, explicit_cu=False
    ),
    "noncausal_cu_seqlens": lambda r: _attention_case(
        r, heads=4, kv_heads=4, d_qk=16, d_v=16, causal=False, explicit_cu=True
    ),
    "gqa_sinks_softcap_window": lambda r: _attention_case(
        r, heads=4, kv_heads=2, d_qk=16, d_v=16, causal=True, explicit_cu=False,
        sinks=True, softcap=3.0, window=6,
    ),  # fmt: skip
    "qwen3_model": _model_case,
}


def main(argv: list[str] | None = None) -> int:
    return _common.main(TAG, CASES, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
