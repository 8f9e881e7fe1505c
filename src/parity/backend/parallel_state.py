"""The process groups parity's kernels exchange over: one for Ulysses sp, one for expert parallelism.

Why an explicit module-level state instead of passing groups through every call: the attention
backends and the fused experts are called *by transformers* with a fixed signature, so the only
channels left are module state or extra forward kwargs. Module state is what the trainer sets up
once per run (from its device mesh) and what a test can swap in a ``with`` block.

``None`` (the default) means "no parallelism": size 1, rank 0, and the kernels take their
single-process path without touching ``torch.distributed`` at all, so they run in a process that
never initialised a process group.

This module also holds the one differentiable collective both sp and ep need,
:func:`all_to_all_single_autograd`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup

@dataclass
class _State:
    sp_group: ProcessGroup | None = None
    ep_group: ProcessGroup | None = None


_STATE = _State()


def _size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group: ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


# --------------------------------------------------------------------------------------------
# sequence parallel (Ulysses)


def set_sp_group(group: ProcessGroup | None) -> None:
    """Make ``group`` the Ulysses group (``None`` turns sequence parallelism off)."""
    _STATE.sp_group = group


def get_sp_group() -> ProcessGroup | None:
    return _STATE.sp_group


def sp_size() -> int:
    return _size(_STATE.sp_group)


def sp_rank() -> int:
    return _rank(_STATE.sp_group)


# --------------------------------------------------------------------------------------------
# expert parallel


def set_ep_group(group: ProcessGroup | None) -> None:
    """Make ``group`` the expert-parallel group (``None`` turns expert parallelism off)."""
    _STATE.ep_group = group


def get_ep_group() -> ProcessGroup | None:
    return _STATE.ep_group


def ep_size() -> int:
    return _size(_STATE.ep_group)


def ep_rank() -> int:
    return _rank(_STATE.ep_group)


# --------------------------------------------------------------------------------------------
# activation


@contextlib.contextmanager
def parallel_groups(*, sp: ProcessGroup | None = None, ep: ProcessGroup | None = None) -> Iterator[None]:
    """Activate the given groups for the duration of the block and restore the previous ones.

    Restoring (rather than resetting to ``None``) lets a test nest an sp=1 reference run inside a
    block that has sp active.
    """
    saved = (_STATE.sp_group, _STATE.ep_group)
    _STATE.sp_group, _STATE.ep_group = sp, ep
    try:
        yield
    finally:
        _STATE.sp_group, _STATE.ep_group = saved


def groups_from_mesh(mesh: object) -> dict[str, ProcessGroup | None]:
    """Read the ``sp`` and ``ep`` groups out of a ``DeviceMesh`` with named dims.

    A dim that is missing or of size 1 maps to ``None``, so a mesh built for sp=1 gives the exact
    single-process code path rather than a degenerate one-rank exchange.
    """
    names = getattr(mesh, "mesh_dim_names", None) or ()
    out: dict[str, ProcessGroup | None] = {"sp": None, "ep": None}
    for name in out:
        if name in names and mesh[name].size() > 1:  # type: ignore[index]
            out[name] = mesh.get_group(name)  # type: ignore[attr-defined]
    return out


@contextlib.contextmanager
def parallel_groups_from_mesh(mesh: object) -> Iterator[None]:
    """:func:`parallel_groups` with the groups taken from a named ``DeviceMesh``."""
    groups = groups_from_mesh(mesh)
    with parallel_groups(sp=groups["sp"], ep=groups["ep"]):
        yield


# --------------------------------------------------------------------------------------------
# differentiable all-to-all


class _AllToAllSingle(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 whose backward is the same exchange with the splits swapped.

    Rows this rank sent to rank j come back from rank j as gradient rows in the same order, so
    the adjoint of an all-to-all is an all-to-all with input and output splits exchanged.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        out_splits: list[int] | None,
        in_splits: list[int] | None,
        group: ProcessGroup,
    ) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _all_to_all_single(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):  # type: ignore[override]
        grad_in = _all_to_all_single(grad.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group)
        return grad_in, None, None, None


def _all_to_all_single(
    x: torch.Tensor, out_splits: list[int] | None, in_splits: list[int] | None, group: ProcessGroup
) -> torch.Tensor:
    x = x.contiguous()
    rows = sum(out_splits) if out_splits is not None else x.shape[0]
    out = x.new_empty((rows, *x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    return out


def all_to_all_single_autograd(
    x: torch.Tensor,
    group: ProcessGroup,
    out_splits: list[int] | None = None,
    in_splits: list[int] | None = None,
) -> torch.Tensor:
    """Exchange rows of ``x`` (dim 0) with every rank of ``group``; gradients flow back.

    ``in_splits[j]`` rows go to rank j and ``out_splits[j]`` rows arrive from it; ``None`` means
    equal splits.
    """
    return _AllToAllSingle.apply(x, out_splits, in_splits, group)
