"""Fused MoE at ep=world equals ep=1: outputs, token/routing-weight gradients and expert gradients.

Every rank builds the same experts module and the same full token batch (same seed) and computes
the ep=1 reference on all tokens. Then each rank takes its own slice of tokens (as data-parallel
ranks would) and runs them with the ep group active, holding either all experts (only its block
is used) or, after :func:`parity.backend.moe.shard_experts_for_ep`, only its block. Compared: the output
and the gradients of the rank's tokens and routing weights, and the gradients of the rank's expert
block (which collects contributions from every rank's tokens through the all-to-all backward).

Run: ``torchrun --nproc-per-node 2 -m parity.harness.checks.moe_ep_check [--out DIR]`` (CPU: gloo, fp32;
with CUDA: NCCL, add ``--dtype bfloat16`` for the GPU grouped GEMM);
negative control: ``PARITY_FAULT=ep_drop`` (rows computed for another rank are lost) must fail.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from parity.backend.moe import ep_expert_range, shard_experts_for_ep
from parity.backend.parallel_state import parallel_groups
from parity.harness.checks import _common
from parity.harness.checks._common import SETTINGS, CaseResult
from parity.harness.tiny import tiny_experts

TAG = "moe_ep_check"
TOKENS_PER_RANK = 24


def _experts(model_type: str) -> torch.nn.Module:
    """A standalone experts module of ``model_type`` with the fused implementation selected."""
    module = tiny_experts(model_type)
    module.config._experts_implementation = "fused"
    return module.to(SETTINGS.device, SETTINGS.dtype)


def _case(res: CaseResult, *, model_type: str, top_k: int, shard_params: bool) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    put, atol, rtol = SETTINGS.put, SETTINGS.atol, SETTINGS.rtol
    ref_mod = _experts(model_type)
    n_exp, hidden = ref_mod.num_experts, ref_mod.gate_up_proj.shape[-1]
    gen = torch.Generator().manual_seed(99)
    total = TOKENS_PER_RANK * world
    x = put(torch.randn(total, hidden, generator=gen))
    # skewed routing: expert 0 is popular, so ranks send unequal row counts to each other
    scores = torch.rand(total, n_exp, generator=gen)
    scores[:, 0] += 0.5
    weights, idx = (put(t) for t in torch.topk(scores.softmax(-1), top_k, dim=-1))
    proj = put(torch.randn(total, hidden, generator=gen))

    # reference: ep=1, all tokens
    ref_x, ref_w = x.clone().requires_grad_(), weights.clone().requires_grad_()
    with parallel_groups():
        ref_out = ref_mod(ref_x, idx, ref_w)
    (ref_out * proj).sum().backward()

    # ep=world: this rank's tokens, this rank's experts
    mod = copy.deepcopy(ref_mod)
    mod.zero_grad(set_to_none=True)
    if shard_params:
        shard_experts_for_ep(mod, rank, world)
    rows = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
    loc_x, loc_w = x[rows].clone().requires_grad_(), weights[rows].clone().requires_grad_()
    with parallel_groups(ep=dist.group.WORLD):
        out = mod(loc_x, idx[rows], loc_w)
    (out * proj[rows]).sum().backward()

    first, count = ep_expert_range(n_exp, rank, world)
    block = slice(first, first + count)

    def local_block(grad: torch.Tensor) -> torch.Tensor:
        return grad if shard_params else grad[block]

    res.compare("out", out, ref_out[rows], atol=atol, rtol=rtol)
    res.compare("d_hidden", loc_x.grad, ref_x.grad[rows], atol=atol, rtol=rtol)
    res.compare("d_routing_weights", loc_w.grad, ref_w.grad[rows], atol=atol, rtol=rtol)
    res.compare(
        "d_gate_up_proj[local]",
        local_block(mod.gate_up_proj.grad),
        ref_mod.gate_up_proj.grad[block],
        atol=atol,
        rtol=rtol,
    )
    res.compare(
        "d_down_proj[local]",
        local_block(mod.down_proj.grad),
        ref_mod.down_proj.grad[block],
        atol=atol,
        rtol=rtol,
    )
    if not shard_params:  # experts owned by other ranks must get exactly zero gradient here
        others = torch.ones(n_exp, dtype=torch.bool, device=SETTINGS.device)
        others[block] = False
        leaked = float(mod.gate_up_proj.grad[others].abs().max()) + float(
            mod.down_proj.grad[others].abs().max()
        )
        if leaked != 0.0:
            raise AssertionError(f"non-local experts received gradient {leaked}")


def _tiny_qwen3_moe() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = _common.tiny_text_config(
        "qwen3_moe",
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        norm_topk_prob=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", experts_implementation="fused")
    return model.to(SETTINGS.device, SETTINGS.dtype).eval()


def _model_case(res: CaseResult) -> None:
    """Whole qwen3_moe: rank r runs batch row r with its expert block; reference runs all rows."""
    rank, world = dist.get_rank(), dist.get_world_size()
    put = SETTINGS.put
    atol, rtol = max(1e-5, SETTINGS.atol), max(1e-5, SETTINGS.rtol)
    gen = torch.Generator().manual_seed(5)
    ids = put(torch.randint(0, 128, (world, 16), generator=gen))
    ref_model, model = _tiny_qwen3_moe(), _tiny_qwen3_moe()
    with parallel_groups():
        ref_logits = ref_model(input_ids=ids).logits
    proj = put(torch.randn(ref_logits.shape, generator=gen))
    (ref_logits * proj).sum().backward()

    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj")]
    for m in experts:
        shard_experts_for_ep(m, rank, world)
    with parallel_groups(ep=dist.group.WORLD):
        logits = model(input_ids=ids[rank : rank + 1]).logits
    (logits * proj[rank : rank + 1]).sum().backward()

    res.compare("logits", logits, ref_logits[rank : rank + 1], atol=atol, rtol=rtol)
    first, count = ep_expert_range(8, rank, world)
    worst: tuple[float, str, torch.Tensor, torch.Tensor] | None = None
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        if name.endswith(("gate_up_proj", "down_proj")) and ".experts." in name:
            grad, ref = p.grad, p_ref.grad[first : first + count]  # ep already summed over ranks
        else:
            grad, ref = p.grad.clone(), p_ref.grad
            dist.all_reduce(grad)  # replicated parameter: the data-parallel sum
        dev = float((grad - ref).abs().max())
        if worst is None or dev > worst[0]:
            worst = (dev, name, grad, ref)
    assert worst is not None
    res.compare(f"grad[{worst[1]}](worst)", worst[2], worst[3], atol=atol, rtol=rtol)


CASES = {
    "qwen3_moe_full_params": lambda r: _case(r, model_type="qwen3_moe", top_k=2, shard_params=False),
    "qwen3_moe_sharded_params": lambda r: _case(r, model_type="qwen3_moe", top_k=2, shard_params=True),
    "deepseek_v3_sharded_params": lambda r: _case(r, model_type="deepseek_v3", top_k=3, shard_params=True),
    "qwen3_moe_model": _model_case,
}


def main(argv: list[str] | None = None) -> int:
    return _common.main(TAG, CASES, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
