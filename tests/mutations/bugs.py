"""Realistic bugs, planted from the test side into the code under test.

Each bug is a small patch of :mod:`parity.backend` (or the trainer) that a person writing a
training stack could plausibly ship: a mask that leaks across packed samples, a kv head mapped to
the wrong query group, experts' gradients swapped in backward only, labels shifted per sequence
shard. Nothing in the library knows about them: in-process bugs are applied with pytest's
``monkeypatch``; bugs for the multi-process (e2e) runs are installed in every rank through
``PARITY_FAULT=tests.mutations.bugs:<name>`` (see :mod:`parity.harness.faults`).

The matrix (``nox -s mutations``) runs each bug on the suite that should catch it and reports which
check fired and by how much (observed / allowed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Bug:
    name: str
    klass: str  # the bug class, as the issue names them
    description: str
    model: str  # registry id the bug is run on
    suite: str  # "patch" (in-process, every parity mode of the variant) or "e2e" (a parallel layout)
    apply: Callable[[Any], None] | None = None  # patch(monkeypatch) for in-process bugs
    layout: tuple[int, int] = (1, 1)  # e2e: (sp, ep) of the layout the bug shows in


def _wrap(
    monkeypatch: Any, module: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> None:
    monkeypatch.setattr(module, name, make(getattr(module, name)))


def _wrap_experts(monkeypatch: Any, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """transformers holds the registered experts function itself: swap it there (restored after)."""
    from transformers.integrations.moe import ExpertsInterface

    from parity.backend import moe

    monkeypatch.setitem(ExpertsInterface._global_mapping, moe.FUSED, make(moe.fused_experts_forward))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward scales the gradient: a bug that exists only in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


# --------------------------------------------------------------------------------------------
# attention: packing masks, positions, heads, scaling, backward


def packing_leak(monkeypatch: Any) -> None:
    """Sample boundaries ignored: the packed row is attended as one causal sequence."""
    from parity.backend import attention

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def build_packing(batch: int, seq: int, device: Any, **kwargs: Any) -> Any:
            kwargs.update(position_ids=None, cu_seq_lens=None, max_length=None)
            return original(batch, seq, device, **kwargs)

        return build_packing

    _wrap(monkeypatch, attention, "build_packing", make)


def packing_off_by_one(monkeypatch: Any) -> None:
    """Each sample border one token late (cu_seqlens built from positions shifted by one)."""
    from parity.backend import attention

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def build_packing(batch: int, seq: int, device: Any, **kwargs: Any) -> Any:
            packing = original(batch, seq, device, **kwargs)
            if batch != 1:  # the bug lives in packed rows; a padded batch has one sequence per row
                return packing
            cu = packing.cu_seqlens.clone()
            cu[1:-1] += 1
            return attention.Packing(cu, int((cu[1:] - cu[:-1]).max()), packing.keep, packing.one_per_row,
                                     batch=batch, seq=seq)  # fmt: skip

        return build_packing

    _wrap(monkeypatch, attention, "build_packing", make)


def scaling_ignored(monkeypatch: Any) -> None:
    """The module's softmax scale replaced by 1/sqrt(head_dim) (breaks MLA and softcapped models)."""
    _drop_attention_kwarg(monkeypatch, "scaling")


def gqa_wrong_group(monkeypatch: Any) -> None:
    """kv heads expanded with repeat instead of repeat_interleave: query heads read another group's kv."""
    from parity.backend import attention

    def expand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rep = q.shape[1] // k.shape[1]
        return (k.repeat(1, rep, 1, 1), v.repeat(1, rep, 1, 1)) if rep > 1 else (k, v)

    def make_sdpa(original: Callable[..., Any]) -> Callable[..., Any]:
        def _sdpa_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            k, v = expand(q, k, v)
            return original(q, k, v, *args, **kwargs)

        return _sdpa_kernel

    def make_varlen(original: Callable[..., Any]) -> Callable[..., Any]:
        def _run_varlen(
            fn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any
        ) -> Any:
            k, v = expand(q, k, v)
            return original(fn, q, k, v, *args, **kwargs)

        return _run_varlen

    _wrap(monkeypatch, attention, "_sdpa_kernel", make_sdpa)
    _wrap(monkeypatch, attention, "_run_varlen", make_varlen)


def kv_head_detached(monkeypatch: Any) -> None:
    """One kv head detached from the graph: forward identical, its k_proj rows get no gradient."""
    from parity.backend import attention

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def parity_attention_forward(
            backend: str, module: Any, query: Any, key: Any, value: Any, *a: Any, **kw: Any
        ) -> Any:
            key = torch.cat([key[:, :1].detach(), key[:, 1:]], dim=1)
            return original(backend, module, query, key, value, *a, **kw)

        return parity_attention_forward

    _wrap(monkeypatch, attention, "parity_attention_forward", make)


def attention_backward_scaled(monkeypatch: Any) -> None:
    """A custom backward that returns dV x 1.05: forward bit-identical, gradients off by 5%."""
    from parity.backend import attention

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def parity_attention_forward(
            backend: str, module: Any, query: Any, key: Any, value: Any, *a: Any, **kw: Any
        ) -> Any:
            return original(backend, module, query, key, _ScaleGrad.apply(value, 1.05), *a, **kw)

        return parity_attention_forward

    _wrap(monkeypatch, attention, "parity_attention_forward", make)


def _drop_attention_kwarg(monkeypatch: Any, name: str) -> None:
    """parity's attention backends never see ``name`` (what a backend that does not read it does)."""
    from parity.backend import attention

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def parity_attention_forward(*args: Any, **kwargs: Any) -> Any:
            kwargs.pop(name, None)
            return original(*args, **kwargs)

        return parity_attention_forward

    _wrap(monkeypatch, attention, "parity_attention_forward", make)


def sinks_dropped(monkeypatch: Any) -> None:
    """Attention sinks (gpt-oss ``s_aux``) ignored: plain softmax, no extra column per head."""
    _drop_attention_kwarg(monkeypatch, "s_aux")


def softcap_ignored(monkeypatch: Any) -> None:
    """Logit soft-capping (gemma2 ``softcap``) ignored: raw logits go into the softmax."""
    _drop_attention_kwarg(monkeypatch, "softcap")


def sliding_window_ignored(monkeypatch: Any) -> None:
    """The sliding window dropped: sliding layers attend to the whole (causal, per-sample) past."""
    _drop_attention_kwarg(monkeypatch, "sliding_window")


# --------------------------------------------------------------------------------------------
# fused MoE: routing, permutation, gate/up, combine, backward


def moe_routing_swapped(monkeypatch: Any) -> None:
    """Tokens routed to expert 0 run expert 1 and vice versa (an off-by-one in the expert order)."""
    from parity.backend import moe

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def _route(top_k_index: torch.Tensor, num_experts: int) -> Any:
            swapped = torch.where(top_k_index == 0, 1, torch.where(top_k_index == 1, 0, top_k_index))
            return original(swapped, num_experts)

        return _route

    _wrap(monkeypatch, moe, "_route", make)


def moe_gate_up_swapped(monkeypatch: Any) -> None:
    """The fused [gate; up] projection split the wrong way round: up * act(gate) becomes gate * act(up)."""
    from parity.backend import moe

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def activate(module: Any, h: torch.Tensor) -> torch.Tensor:
            if getattr(module, "has_gate", True):
                gate, up = h.chunk(2, dim=-1)
                h = torch.cat([up, gate], dim=-1)
            return original(module, h)

        return activate

    _wrap(monkeypatch, moe, "activate", make)


def moe_combine_slots_swapped(monkeypatch: Any) -> None:
    """Routing weights applied to the wrong top-k slot when the expert outputs are combined."""
    from parity.backend import moe

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def _combine(y: torch.Tensor, perm: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
            return original(y, perm, top_k_weights.flip(-1))

        return _combine

    _wrap(monkeypatch, moe, "_combine", make)


def moe_expert_grads_swapped(monkeypatch: Any) -> None:
    """Backward only: the down_proj gradients of experts 0 and 1 land on each other's weights."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def fused_experts_forward(module: Any, *args: Any, **kwargs: Any) -> Any:
            weight = module.down_proj
            if not getattr(weight, "_planted_swap", False):
                order = torch.arange(weight.shape[0], device=weight.device)
                order[0], order[1] = 1, 0
                weight.register_hook(lambda g: g.index_select(0, order))
                weight._planted_swap = True
            return original(module, *args, **kwargs)

        return fused_experts_forward

    _wrap_experts(monkeypatch, make)


def moe_router_detached(monkeypatch: Any) -> None:
    """Routing weights detached inside the experts: the router trains on the aux loss only (here: never)."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def fused_experts_forward(module: Any, hidden: Any, top_k_index: Any, top_k_weights: Any) -> Any:
            return original(module, hidden, top_k_index, top_k_weights.detach())

        return fused_experts_forward

    _wrap_experts(monkeypatch, make)


def sparse_selection_dropped(monkeypatch: Any) -> None:
    """The indexer's top-k key selection (DeepSeek sparse attention, ``indices``) ignored: dense attention."""
    _drop_attention_kwarg(monkeypatch, "indices")


# --------------------------------------------------------------------------------------------
# multi-process: installed in each rank by PARITY_FAULT=tests.mutations.bugs:<name>


def sp_label_shift_per_shard() -> None:
    """Labels shifted inside each sequence shard, not on the full row: every shard's last token is lost."""
    from parity.backend import ulysses
    from parity.harness.faults import patch

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def shard_packed_inputs(input_ids: Any, position_ids: Any, *, sp_rank: int, sp_size: int,
                                labels: Any = None, **kwargs: Any) -> Any:  # fmt: skip
            out = original(input_ids, position_ids, sp_rank=sp_rank, sp_size=sp_size, labels=labels, **kwargs)
            if labels is not None and sp_size > 1:
                local = ulysses.shard_sequence(
                    ulysses.pad_to_multiple(labels, sp_size, dim=-1, value=-100), sp_rank, sp_size, dim=-1
                )
                out["shift_labels"] = torch.cat(
                    [local[..., 1:], local.new_full((*local.shape[:-1], 1), -100)], -1
                )
            return out

        return shard_packed_inputs

    patch("parity.backend.ulysses", "shard_packed_inputs", wrap)


def sp_loss_reduced_twice() -> None:
    """The per-rank loss all-reduced over the sp group before backward: gradients x sp."""
    import torch.distributed.nn.functional as dist_fn

    from parity.backend import parallel_state
    from parity.harness.faults import patch

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def token_loss_sum(logits: Any, shift_labels: Any) -> Any:
            summed = original(logits, shift_labels)
            group = parallel_state.get_sp_group()
            return dist_fn.all_reduce(summed, group=group) if group is not None else summed

        return token_loss_sum

    patch("parity.training.train", "token_loss_sum", wrap)


PATCH_BUGS = [
    Bug(
        "packing_leak",
        "packing masks",
        "packed samples attend across their borders",
        "qwen2",
        "patch",
        packing_leak,
    ),
    Bug(
        "packing_off_by_one",
        "packing masks / position ids",
        "sample borders one token late",
        "llama",
        "patch",
        packing_off_by_one,
    ),
    Bug(
        "scaling_ignored",
        "attention kernels",
        "module softmax scale replaced by 1/sqrt(d)",
        "deepseek_v3",
        "patch",
        scaling_ignored,
    ),
    Bug(
        "gqa_wrong_group",
        "attention kernels",
        "kv heads repeated instead of interleaved",
        "qwen2",
        "patch",
        gqa_wrong_group,
    ),
    Bug(
        "kv_head_detached",
        "gradients that differ only in backward",
        "one kv head cut from the graph",
        "qwen3",
        "patch",
        kv_head_detached,
    ),
    Bug(
        "attention_backward_scaled",
        "gradients that differ only in backward",
        "dV x 1.05 in backward",
        "llama",
        "patch",
        attention_backward_scaled,
    ),
    Bug(
        "sinks_dropped",
        "attention kernels (sinks)",
        "s_aux ignored by the parity backend",
        "gpt_oss",
        "patch",
        sinks_dropped,
    ),
    Bug(
        "softcap_ignored",
        "attention kernels (softcap)",
        "tanh logit soft-capping skipped",
        "gemma2",
        "patch",
        softcap_ignored,
    ),
    Bug(
        "sliding_window_ignored",
        "attention masks (sliding window)",
        "full attention on sliding layers",
        "gemma3",
        "patch",
        sliding_window_ignored,
    ),
    Bug(
        "moe_routing_swapped",
        "fused MoE routing",
        "experts 0 and 1 exchanged",
        "qwen3_moe",
        "patch",
        moe_routing_swapped,
    ),
    Bug(
        "moe_gate_up_swapped",
        "fused MoE gate/up",
        "[gate; up] split the wrong way",
        "qwen3_moe",
        "patch",
        moe_gate_up_swapped,
    ),
    Bug(
        "moe_combine_slots_swapped",
        "fused MoE combine",
        "top-k weights applied to the wrong slot",
        "deepseek_v3",
        "patch",
        moe_combine_slots_swapped,
    ),
    Bug(
        "moe_expert_grads_swapped",
        "fused MoE permutation (backward)",
        "down_proj grads of experts 0/1 swapped",
        "qwen3_moe",
        "patch",
        moe_expert_grads_swapped,
    ),
    Bug(
        "moe_router_detached",
        "fused MoE routing (backward)",
        "router receives no gradient",
        "qwen3_moe",
        "patch",
        moe_router_detached,
    ),
    Bug(
        "sparse_selection_dropped",
        "sparse attention (DSA indexer)",
        "indexer top-k selection ignored: dense attention",
        "glm_moe_dsa",
        "patch",
        sparse_selection_dropped,
    ),
]

E2E_BUGS = [
    Bug(
        "ulysses_swap",
        "Ulysses exchange",
        "sequence chunks reassembled in reverse rank order",
        "qwen3",
        "e2e",
        layout=(2, 1),
    ),
    Bug(
        "sp_label_shift_per_shard",
        "sequence sharding",
        "labels shifted per shard, not on the full row",
        "qwen3",
        "e2e",
        layout=(2, 1),
    ),
    Bug(
        "sp_loss_reduced_twice",
        "loss normalisation across groups",
        "loss all-reduced over sp before backward",
        "qwen3",
        "e2e",
        layout=(2, 1),
    ),
    Bug(
        "ep_drop",
        "expert-parallel dispatch",
        "rows exchanged with the other rank lost",
        "qwen3_moe",
        "e2e",
        layout=(1, 2),
    ),
]

#: PARITY_FAULT spec of each e2e bug (the harness's named faults, or this module's functions).
E2E_FAULTS = {
    "ulysses_swap": "ulysses_swap",
    "ep_drop": "ep_drop",
    "sp_label_shift_per_shard": "tests.mutations.bugs:sp_label_shift_per_shard",
    "sp_loss_reduced_twice": "tests.mutations.bugs:sp_loss_reduced_twice",
}
