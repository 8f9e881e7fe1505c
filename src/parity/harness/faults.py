"""Planted faults for the negative controls, applied to the code under test from outside.

A check that cannot fail proves nothing, so each guard is run once with a known bug planted. The
bugs are patches installed here (or by a test), never switches inside :mod:`parity.backend` or
:mod:`parity.training`: the code under test stays exactly what a training stack would ship.

Multi-process runs name their faults in ``PARITY_FAULT`` (comma-separated); every rank installs
them in :func:`parity.harness.rank_setup.init_rank`, before any model code runs. A name is either
one of :data:`FAULTS` below or a ``package.module:function`` spec, so a test can plant a bug of its
own in a worker process: the function is called with no arguments and patches what it likes.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from parity import settings


class FaultError(ValueError):
    """A fault name that is neither known nor an importable ``module:function``."""


def patch(module_name: str, attr: str, wrap: Callable[[Any], Any]) -> None:
    """Replace ``module.attr`` by ``wrap(original)`` wherever a loaded module holds that object.

    Modules that did ``from x import f`` hold their own reference, and a module started with
    ``python -m`` is a second copy under ``__main__``: each of them must see the planted bug.
    """
    original = getattr(importlib.import_module(module_name), attr)
    wrapped = wrap(original)
    for loaded in list(sys.modules.values()):
        if isinstance(loaded, ModuleType) and getattr(loaded, attr, None) is original:
            setattr(loaded, attr, wrapped)


# --------------------------------------------------------------------------------------------
# the named faults


def ulysses_swap() -> None:
    """Sequence chunks put back in reversed rank order after the pre-attention exchange."""
    import torch
    import torch.distributed as dist

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def gather_seq_scatter_heads(x: Any, *, seq_dim: int, head_dim: int, group: Any) -> Any:
            out = original(x, seq_dim=seq_dim, head_dim=head_dim, group=group)
            parts = list(out.chunk(dist.get_world_size(group), dim=seq_dim))
            return torch.cat(parts[::-1], dim=seq_dim)

        return gather_seq_scatter_heads

    patch("parity.backend.attention", "gather_seq_scatter_heads", wrap)


def ep_drop() -> None:
    """Expert parallelism loses every row exchanged with another rank (dispatch and combine)."""
    import torch
    import torch.distributed as dist

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def all_to_all_single_autograd(x: Any, group: Any, *, out_splits: Any, in_splits: Any) -> Any:
            out = original(x, group, out_splits=out_splits, in_splits=in_splits)
            size, rank = dist.get_world_size(group), dist.get_rank(group)
            src = torch.repeat_interleave(
                torch.arange(size, device=out.device), torch.tensor(out_splits, device=out.device)
            )
            return out * (src == rank).unsqueeze(-1).to(out.dtype)

        return all_to_all_single_autograd

    patch("parity.backend.moe", "all_to_all_single_autograd", wrap)


def _stall_forever() -> None:
    """The planted hang: this rank never reaches the collective its peers are waiting in."""
    print(
        f"[parity.faults] rank 1: skipping the grad-norm all-reduce (planted hang) at t={time.time():.3f}",
        flush=True,
    )
    while True:
        time.sleep(1.0)


def skip_collective_rank1() -> None:
    """Rank 1 never joins the trainer's grad-norm all-reduce: a hang the launcher must report."""
    import torch.distributed as dist

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def total_grad_norm(*args: Any, **kwargs: Any) -> Any:
            if dist.get_rank() == 1:
                _stall_forever()
            return original(*args, **kwargs)

        return total_grad_norm

    patch("parity.training.train", "total_grad_norm", wrap)


def sigkill_rank1() -> None:
    """Rank 1 dies by SIGKILL at its first grad-norm reduction (no traceback, no faulthandler dump):
    the crash whose one-line report must say "rank 1 killed by SIGKILL"."""
    import os
    import signal

    import torch.distributed as dist

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def total_grad_norm(*args: Any, **kwargs: Any) -> Any:
            if dist.get_rank() == 1:
                print("[parity.faults] rank 1: SIGKILL to itself (planted crash)", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        return total_grad_norm

    patch("parity.training.train", "total_grad_norm", wrap)


def wrong_tower_lookup(original: Callable[..., Any]) -> Callable[..., Any]:
    """A tower lookup that returns the language model next to the tower (the wrong module)."""
    from parity.training.vlm_trainer import TowerLocation

    def locate_tower(model: Any, kind: str = "vision") -> Any:
        real = original(model, kind)
        prefix = real.path.rpartition(".")[0]
        for attr in ("language_model", "model"):
            other = real.owner._modules.get(attr)
            if other is not None and other is not real.tower:
                path = f"{prefix}.{attr}" if prefix else attr
                return TowerLocation(path=path, owner=real.owner, tower=other)
        raise RuntimeError(f"planted fault: no language model next to {real.path}")

    return locate_tower


def partial_tower_lookup(original: Callable[..., Any]) -> Callable[..., Any]:
    """A tower lookup that returns only the tower's first sub-module (the patch embedding, a conv)."""
    from parity.training.vlm_trainer import TowerLocation

    def locate_tower(model: Any, kind: str = "vision") -> Any:
        real = original(model, kind)
        children = [(n, m) for n, m in real.tower.named_children() if any(True for _ in m.parameters())]
        name, sub = next(((n, m) for n, m in children if n == "patch_embed"), children[0])
        return TowerLocation(path=f"{real.path}.{name}", owner=real.tower, tower=sub)

    return locate_tower


def freeze_wrong_tower() -> None:
    """``locate_tower`` finds the language model instead of the vision/audio tower."""
    patch("parity.training.vlm_trainer", "locate_tower", wrong_tower_lookup)


def freeze_partial_tower() -> None:
    """``locate_tower`` finds only part of the tower (its patch embedding / first conv)."""
    patch("parity.training.vlm_trainer", "locate_tower", partial_tower_lookup)


FAULTS: dict[str, Callable[[], None]] = {
    "ulysses_swap": ulysses_swap,
    "ep_drop": ep_drop,
    "skip_collective_rank1": skip_collective_rank1,
    "sigkill_rank1": sigkill_rank1,
    "freeze_wrong_tower": freeze_wrong_tower,
    "freeze_partial_tower": freeze_partial_tower,
}


def install(names: list[str]) -> list[str]:
    """Plant each named fault (or ``module:function`` spec); return what was installed."""
    for name in names:
        if name in FAULTS:
            FAULTS[name]()
            continue
        module_name, sep, function = name.partition(":")
        if not sep:
            raise FaultError(
                f"{settings.FAULT}: unknown fault {name!r}; known: {', '.join(FAULTS)} or module:function"
            )
        try:
            fn = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError) as exc:
            raise FaultError(f"{settings.FAULT}: cannot load {name!r}: {exc}") from exc
        fn()
    return list(names)
