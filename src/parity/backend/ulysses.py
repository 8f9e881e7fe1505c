"""Ulysses sequence parallelism: the two all-to-all exchanges and the sequence bookkeeping around them.

Each sp rank holds a contiguous slice of the (packed) sequence with all heads. Attention needs the
whole sequence, but heads are independent, so one all-to-all turns "local sequence, all heads"
into "full sequence, 1/sp of the heads"; attention runs unchanged on that, and the inverse
all-to-all restores the sequence slice. Both exchanges are autograd functions whose backward is
the opposite exchange, so gradients need no extra communication code.

The sequence helpers here are what the *caller* (collator, trainer, tests) uses: pad the packed
sequence to a multiple of sp, compute the packing metadata (cu_seqlens) on the FULL sequence, then
slice. Attention is always handed cu_seqlens of the full sequence, never of a slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parity.backend.parallel_state import ProcessGroup

# --------------------------------------------------------------------------------------------
# the exchanges


def _exchange(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: ProcessGroup) -> torch.Tensor:
    """Split ``x`` into sp chunks along ``scatter_dim``, send chunk j to rank j, concatenate what
    arrives along ``gather_dim`` in rank order."""
    world = dist.get_world_size(group)
    if x.shape[scatter_dim] % world:
        raise ValueError(f"dim {scatter_dim} of size {x.shape[scatter_dim]} is not divisible by sp={world}")
    send = torch.stack(x.chunk(world, dim=scatter_dim), dim=0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(list(recv.unbind(0)), dim=gather_dim)


class _UlyssesAllToAll(torch.autograd.Function):
    """Forward: scatter ``scatter_dim``, gather ``gather_dim``. Backward: the exact inverse."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        scatter_dim: int,
        gather_dim: int,
        group: ProcessGroup,
    ) -> torch.Tensor:
        ctx.scatter_dim, ctx.gather_dim, ctx.group = scatter_dim, gather_dim, group
        return _exchange(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):  # type: ignore[override]
        return _exchange(grad, ctx.gather_dim, ctx.scatter_dim, ctx.group), None, None, None


def gather_seq_scatter_heads(
    x: torch.Tensor, *, seq_dim: int, head_dim: int, group: ProcessGroup
) -> torch.Tensor:
    """[.., H, .., S/sp, ..] on every rank -> [.., H/sp, .., S, ..]: the exchange before attention."""
    if x.shape[head_dim] % dist.get_world_size(group):
        raise ValueError(f"{x.shape[head_dim]} heads are not divisible by sp={dist.get_world_size(group)}")
    return _UlyssesAllToAll.apply(x, head_dim, seq_dim, group)


def gather_heads_scatter_seq(
    x: torch.Tensor, *, head_dim: int, seq_dim: int, group: ProcessGroup
) -> torch.Tensor:
    """[.., H/sp, .., S, ..] -> [.., H, .., S/sp, ..]: the exchange after attention."""
    return _UlyssesAllToAll.apply(x, seq_dim, head_dim, group)


def repeat_kv_heads_for_sp(kv: torch.Tensor, sp: int, *, head_dim: int = 1) -> torch.Tensor:
    """Make the kv head count divisible by sp so the heads can be scattered.

    With fewer kv heads than sp ranks (GQA/MQA), each kv head is repeated sp/H_kv times *in place*
    (head h becomes heads h*r .. h*r+r-1). Rank j then receives kv head j*H_kv/sp, which is exactly
    the group its query heads j*H_q/sp .. belong to, so GQA stays correct after the exchange.
    Gradients of the repeated copies sum back into the original head.
    """
    h_kv = kv.shape[head_dim]
    if h_kv >= sp:
        if h_kv % sp:
            raise ValueError(f"{h_kv} kv heads cannot be split over sp={sp}")
        return kv
    if sp % h_kv:
        raise ValueError(f"sp={sp} is not a multiple of {h_kv} kv heads")
    return kv.repeat_interleave(sp // h_kv, dim=head_dim)


def heads_of_sp_rank(t: torch.Tensor, rank: int, sp: int, *, head_dim: int = 0) -> torch.Tensor:
    """The entries of a per-head tensor (attention sinks [H], ...) that belong to sp rank ``rank``.

    :func:`gather_seq_scatter_heads` cuts the head dimension into ``sp`` contiguous blocks in rank
    order (chunk j goes to rank j), so rank j computes query heads ``j*H/sp .. (j+1)*H/sp - 1`` and
    needs exactly those entries. A view, so gradients flow back into the full tensor; each rank
    contributes the gradient of its own heads over the full sequence, and the sum over sp ranks
    (what the data-parallel reduction does) is the full gradient.
    """
    heads = t.shape[head_dim]
    if heads % sp:
        raise ValueError(f"{heads} per-head entries cannot be split over sp={sp}")
    if not 0 <= rank < sp:
        raise ValueError(f"sp rank {rank} is outside [0, {sp})")
    return t.narrow(head_dim, rank * (heads // sp), heads // sp)


# --------------------------------------------------------------------------------------------
# sequence bookkeeping (caller side)


def pad_to_multiple(x: torch.Tensor, multiple: int, *, dim: int = -1, value: float | int = 0) -> torch.Tensor:
    """Right-pad ``x`` along ``dim`` to a multiple of ``multiple`` (sp shards must be equal)."""
    length = x.shape[dim]
    extra = (-length) % multiple
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def pad_position_ids(position_ids: torch.Tensor, multiple: int) -> torch.Tensor:
    """Right-pad position ids with 0, 1, 2, ...: the padding becomes its own packed sequence.

    A fresh sequence (rather than continuing the last one or repeating 0) keeps real tokens from
    attending to padding and vice versa, under both packing rules (restart at 0 / diff != 1).
    """
    extra = (-position_ids.shape[-1]) % multiple
    if extra == 0:
        return position_ids
    tail = torch.arange(extra, device=position_ids.device, dtype=position_ids.dtype)
    tail = tail.expand(*position_ids.shape[:-1], extra)
    return torch.cat([position_ids, tail], dim=-1)


def shard_sequence(x: torch.Tensor, rank: int, world: int, *, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous slice of the sequence (the layout the Ulysses exchange assumes)."""
    if x.shape[dim] % world:
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible by sp={world}; pad first")
    return x.chunk(world, dim=dim)[rank]


def all_gather_sequence(x: torch.Tensor, group: ProcessGroup, *, dim: int = 1) -> torch.Tensor:
    """Concatenate every rank's slice along ``dim`` (no autograd: metadata and test comparisons)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def packed_sequence_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, S]: True where a packed sequence starts.

    Rule: a sequence starts at the first token of each row and wherever ``diff(position_ids) != 1``.
    That is the rule transformers' sdpa/eager mask builder uses (``find_packed_sequence_indices``),
    so parity's backends isolate exactly the sequences the HF reference isolates. (HF's flash path
    restarts only where position == min; both agree on ordinary packing where each sequence counts
    0, 1, 2, ...; they differ on gaps such as [0, 1, 2, 5, 6], which this rule splits.)
    """
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = (position_ids[:, 1:] - position_ids[:, :-1]) != 1
    return starts


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 [n+1], max_length) of the flattened [B*S] stream of a FULL sequence.

    Call this before slicing for sp: cu_seqlens must describe the whole packed sequence.
    """
    starts = packed_sequence_starts(position_ids).reshape(-1)
    total = starts.numel()
    begin = torch.nonzero(starts).flatten()
    cu = torch.cat([begin, begin.new_tensor([total])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if total else 0
    return cu, max_len


def shard_packed_inputs(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    sp_rank: int,
    sp_size: int,
    labels: torch.Tensor | None = None,
    pad_token_id: int = 0,
) -> dict[str, object]:
    """Pad a packed [B, S] batch to a multiple of sp, compute full-sequence packing metadata, slice.

    Returns the local ``input_ids`` and ``position_ids``, the FULL ``cu_seq_lens_q/k`` and
    ``max_length_q/k`` (pass them to the model so every attention layer sees the whole sequence's
    boundaries), and, when ``labels`` is given, ``shift_labels``: labels shifted by one over the
    full sequence (the next token of a slice's last token lives on the next rank), padded with
    -100, then sliced. transformers' causal-LM loss accepts ``shift_labels`` instead of ``labels``.
    """
    ids = pad_to_multiple(input_ids, sp_size, dim=-1, value=pad_token_id)
    pos = pad_position_ids(position_ids.expand_as(input_ids), sp_size)
    cu, max_len = cu_seqlens_from_position_ids(pos)
    out: dict[str, object] = {
        "input_ids": shard_sequence(ids, sp_rank, sp_size, dim=-1),
        "position_ids": shard_sequence(pos, sp_rank, sp_size, dim=-1),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max_len,
        "max_length_k": max_len,
    }
    if labels is not None:
        shifted = torch.cat([labels[..., 1:], labels.new_full((*labels.shape[:-1], 1), -100)], dim=-1)
        shifted = pad_to_multiple(shifted, sp_size, dim=-1, value=-100)
        out["shift_labels"] = shard_sequence(shifted, sp_rank, sp_size, dim=-1)
    return out
