"""parity's fused experts: one sort, two grouped GEMMs, and (with ep) an all-to-all around them.

Registered as the experts implementation ``"fused"`` through transformers' ``ExpertsInterface``,
so any experts class decorated with ``@use_experts_implementation`` (qwen3_moe, qwen3_vl_moe,
qwen3_5_moe, qwen3_omni_moe, deepseek_v3, mixtral, ...) calls
``fused_experts_forward(module, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``
and gets [T, H] back. Same contract in transformers 5.17 and 5.24.

Data path (T tokens, k experts each, N = T*k routed rows):

1. stable sort of the N expert ids; per-expert offsets by ``searchsorted`` on the sorted ids
   (no atomics, so it is deterministic and allowed under ``use_deterministic_algorithms``);
2. gather the token rows in expert order (backward: un-permute + sum over k, no atomics);
3. with ep: exchange per-expert counts, then rows, with the owning rank (experts are split in
   contiguous blocks of E/ep); regroup the received rows by local expert;
4. grouped GEMM gate+up, activation (SiLU(gate) * up unless the module says otherwise), grouped
   GEMM down (``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``, else a loop over
   contiguous per-expert slices);
5. with ep: send the rows back;
6. un-permute and combine with the routing weights in one batched matmul per token
   ([1, k] x [k, H]): deterministic, and no fp32 [N, H] temporaries.

Backward is autograd through these steps (the all-to-alls are autograd functions); only the row
gather has a written-out backward, to replace an atomic scatter-add by a permutation and a sum.

Not supported: transformers' own expert-parallel sentinels (expert ids >= num_experts, used only
with its ``DistributedConfig(enable_expert_parallel=True)``); parity's ep uses global ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parity.backend.kernel_log import KernelLog
from parity.backend.parallel_state import all_to_all_single_autograd, ep_size, get_ep_group

FUSED = "fused"
PROVIDER_GROUPED_MM = "torch.grouped_mm"
PROVIDER_LOOP = "loop"


# --------------------------------------------------------------------------------------------
# kernel log (same API as parity.backend.attention)


_LOG = KernelLog()  # the same module API as parity.backend.attention's
kernel_providers_used, kernel_call_counts = _LOG.providers_used, _LOG.call_counts
reset_kernel_log = _LOG.reset


# --------------------------------------------------------------------------------------------
# grouped GEMM


def _native_grouped_mm():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@cache
def _native_works(device_type: str, dtype: torch.dtype) -> bool:
    """Probe once per (device, dtype): torch builds differ in which combinations have a kernel
    (torch 2.13 CPU runs fp32; older CPU builds have none; CUDA needs SM80+)."""
    fn = _native_grouped_mm()
    if fn is None:
        return False
    if device_type == "cuda" and torch.cuda.get_device_capability() < (8, 0):
        return False
    try:
        a = torch.ones(16, 16, device=device_type, dtype=dtype)
        b = torch.ones(2, 16, 16, device=device_type, dtype=dtype)
        offs = torch.tensor([8, 16], device=device_type, dtype=torch.int32)
        out = fn(a, b, offs=offs)
        return bool(torch.allclose(out.float(), torch.full((16, 16), 16.0, device=device_type)))
    except Exception:
        return False


def _loop_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-expert matmuls over contiguous row slices: the reference semantics of grouped_mm."""
    outs, start = [], 0
    for i, end in enumerate(offs.tolist()):
        if end > start:
            outs.append(x[start:end] @ w[i])
        start = end
    if not outs:
        return x.new_zeros((0, w.shape[-1]))
    return torch.cat(outs)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> tuple[torch.Tensor, str]:
    """x [N, in] (rows grouped by expert), w [E, in, out], offs int32 [E] cumulative row ends.

    Returns (out [N, out], provider). Falls back to the loop when the native kernel is missing or
    rejects the inputs (e.g. unaligned memory on CPU), and says so in the provider.
    """
    x = x.to(w.dtype)
    native = _native_works(x.device.type, w.dtype)
    if x.shape[0] == 0:  # keep every expert weight in the graph: its gradient is zero, not None
        empty = x.new_zeros((0, w.shape[-1])) + w.sum() * 0
        return empty, PROVIDER_GROUPED_MM if native else PROVIDER_LOOP
    if native:
        try:
            return _native_grouped_mm()(x, w, offs=offs), PROVIDER_GROUPED_MM
        except (RuntimeError, NotImplementedError):
            pass
    return _loop_grouped_mm(x, w, offs), PROVIDER_LOOP


# --------------------------------------------------------------------------------------------
# expert weights


@dataclass
class ExpertWeights:
    """The weights of a contiguous block of experts, as stored on the module ([E, out, in] unless
    ``transposed``, then [E, in, out]); ``up`` is gate_up_proj for gated experts, else up_proj."""

    up: torch.Tensor
    up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    transposed: bool


def _local_tensor(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor sharded over the ep mesh
    return to_local() if callable(to_local) else t


def _block(t: torch.Tensor | None, num_experts: int, first: int, count: int) -> torch.Tensor | None:
    """Experts [first, first+count) of ``t``, which holds either all experts or exactly this block."""
    if t is None:
        return None
    t = _local_tensor(t)
    if t.shape[0] == count:
        return t
    if t.shape[0] == num_experts:
        return t.narrow(0, first, count)
    raise ValueError(
        f"expert tensor with {t.shape[0]} experts is neither the full {num_experts} nor a block of {count}"
    )


def expert_weights(module: torch.nn.Module, first: int, count: int) -> ExpertWeights:
    has_gate = getattr(module, "has_gate", True)
    has_bias = getattr(module, "has_bias", False)
    up_name = "gate_up_proj" if has_gate else "up_proj"
    e = module.num_experts
    return ExpertWeights(
        up=_block(getattr(module, up_name), e, first, count),
        up_bias=_block(getattr(module, f"{up_name}_bias"), e, first, count) if has_bias else None,
        down=_block(module.down_proj, e, first, count),
        down_bias=_block(module.down_proj_bias, e, first, count) if has_bias else None,
        transposed=bool(getattr(module, "is_transposed", False)),
    )


def ep_expert_range(num_experts: int, rank: int, size: int) -> tuple[int, int]:
    """(first expert, count) owned by ep rank ``rank``: contiguous blocks of E/ep."""
    if num_experts % size:
        raise ValueError(f"{num_experts} experts cannot be split over ep={size}")
    count = num_experts // size
    return rank * count, count


def shard_experts_for_ep(module: torch.nn.Module, rank: int, size: int) -> None:
    """Replace the module's stacked expert parameters by this rank's block (in place).

    ``module.num_experts`` keeps the global count: routing produces global ids and the fused
    forward maps them to owners. After this only the ``fused`` implementation can run the module.
    """
    first, count = ep_expert_range(module.num_experts, rank, size)
    for name in (
        "gate_up_proj",
        "up_proj",
        "down_proj",
        "gate_up_proj_bias",
        "up_proj_bias",
        "down_proj_bias",
    ):
        p = getattr(module, name, None)
        if isinstance(p, torch.nn.Parameter) and p.shape[0] == module.num_experts:
            setattr(
                module, name, torch.nn.Parameter(p.detach()[first : first + count].clone(), p.requires_grad)
            )


# --------------------------------------------------------------------------------------------
# the expert MLP on rows grouped by expert


@cache
def _default_gate():
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return None
    return _default_apply_gate


def _is_silu(act: object) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def activate(module: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The experts' activation on [N, 2I] (gated) or [N, I] rows.

    Gated, concatenated [gate; up] experts with the stock gate get SiLU(gate) * up directly (the
    module's act_fn when it is not SiLU); anything else (interleaved layouts, clamped gates as in
    gpt-oss) goes through the module's own ``_apply_gate`` so its semantics are kept.
    """
    if not getattr(module, "has_gate", True):
        return module.act_fn(h)
    custom_gate = getattr(type(module), "_apply_gate", None)
    if (custom_gate is None or custom_gate is _default_gate()) and getattr(module, "is_concatenated", True):
        gate, up = h.chunk(2, dim=-1)
        act = module.act_fn
        return (F.silu(gate) if _is_silu(act) else act(gate)) * up
    return module._apply_gate(h)


def _linear(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    offs: torch.Tensor,
    counts: torch.Tensor,
    transposed: bool,
) -> tuple[torch.Tensor, str]:
    out, provider = grouped_mm(x, w if transposed else w.transpose(-2, -1), offs)
    if b is not None:
        out = out + b.repeat_interleave(counts, dim=0, output_size=x.shape[0])
    return out, provider


def expert_mlp(
    module: torch.nn.Module, x: torch.Tensor, counts: torch.Tensor, weights: ExpertWeights
) -> tuple[torch.Tensor, str]:
    """x [N, H] grouped by expert (``counts`` rows each, in order) -> [N, H]."""
    offs = counts.cumsum(0).to(torch.int32)
    h, provider = _linear(x, weights.up, weights.up_bias, offs, counts, weights.transposed)
    h = activate(module, h)
    y, _ = _linear(h, weights.down, weights.down_bias, offs, counts, weights.transposed)
    if getattr(module, "has_post_expert_norm", False):
        y = module.post_expert_norm(y)
    return y, provider


# --------------------------------------------------------------------------------------------
# permutations


class _GatherRows(torch.autograd.Function):
    """rows[i] = x[perm[i] // k]: token rows in expert order.

    Backward un-permutes (each row written once) and sums the k copies of each token, instead of
    the atomic scatter-add of ``index_select``'s backward, so gradients are bit-reproducible.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, k: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(perm)
        ctx.k, ctx.tokens = k, x.shape[0]
        return x.index_select(0, torch.div(perm, k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (perm,) = ctx.saved_tensors
        unsorted = torch.empty_like(grad).index_copy_(0, perm, grad)
        return unsorted.view(ctx.tokens, ctx.k, -1).sum(dim=1), None, None


def _route(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm: routed rows in expert order, counts [E] rows per expert)."""
    flat = top_k_index.reshape(-1)
    sorted_ids, perm = torch.sort(flat, stable=True)
    ends = torch.searchsorted(
        sorted_ids, torch.arange(num_experts, device=flat.device, dtype=sorted_ids.dtype), right=True
    )
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    return perm, counts


def _combine(y: torch.Tensor, perm: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * y[row of (t, j)]: un-permute, then one [1,k]x[k,H] bmm per token."""
    tokens, k = top_k_weights.shape
    unsorted = y.new_empty(y.shape).index_copy(0, perm, y)
    return torch.bmm(top_k_weights.to(y.dtype).unsqueeze(1), unsorted.view(tokens, k, -1)).squeeze(1)


# --------------------------------------------------------------------------------------------
# forward


def _ep_mlp(
    module: torch.nn.Module, x: torch.Tensor, counts: torch.Tensor, group: dist.ProcessGroup
) -> tuple[torch.Tensor, str]:
    """Rows in global-expert order -> owner ranks -> local expert MLP -> back, same order."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    first, n_local = ep_expert_range(module.num_experts, rank, size)
    # counts[j*n_local + e]: my rows for expert e of rank j
    # recv_counts[j*n_local + e]: rank j's rows for my expert e
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts.contiguous(), group=group)
    send_splits = counts.view(size, n_local).sum(1).tolist()
    recv_splits = recv_counts.view(size, n_local).sum(1).tolist()
    x_recv = all_to_all_single_autograd(x, group, out_splits=recv_splits, in_splits=send_splits)

    # received rows are ordered (source rank, local expert); the GEMMs need (local expert, source)
    local_expert = torch.arange(n_local, device=x.device).repeat(size)
    row_expert = torch.repeat_interleave(local_expert, recv_counts, output_size=x_recv.shape[0])
    _, regroup = torch.sort(row_expert, stable=True)
    y_local, provider = expert_mlp(
        module,
        x_recv.index_select(0, regroup),
        recv_counts.view(size, n_local).sum(0),
        expert_weights(module, first, n_local),
    )
    y_recv = y_local.new_empty(y_local.shape).index_copy(0, regroup, y_local)
    return all_to_all_single_autograd(y_recv, group, out_splits=send_splits, in_splits=recv_splits), provider


def fused_experts_forward(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers' experts contract: [T, H], [T, k] global expert ids, [T, k] weights -> [T, H].

    With an ep group active (:mod:`parity.backend.parallel_state`) each rank computes only its E/ep
    experts; the module may hold all experts (the local block is used, other experts get zero
    gradient here) or only its block (see :func:`shard_experts_for_ep`).
    """
    k = top_k_index.shape[-1]
    perm, counts = _route(top_k_index, module.num_experts)
    x = _GatherRows.apply(hidden_states, perm, k)
    group = get_ep_group()
    if group is not None and ep_size() > 1:
        y, provider = _ep_mlp(module, x, counts, group)
    else:
        y, provider = expert_mlp(module, x, counts, expert_weights(module, 0, module.num_experts))
    out = _combine(y, perm, top_k_weights).to(hidden_states.dtype)
    _LOG.record(FUSED, provider)
    return out


def register() -> None:
    """Register ``"fused"`` with transformers' ExpertsInterface (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(FUSED, fused_experts_forward)


register()
