"""Record which attention and experts implementations were actually *called* during a forward.

transformers resolves implementation names late and falls back silently (sdpa -> eager, a missing
flash package -> a hub kernel, grouped_mm -> the eager loop when a class is not decorated). The
config string says what was asked for; only a call trace says what ran. We wrap every entry of the
two registries the models dispatch through for the duration of a forward/backward, and restore them
afterwards.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any


def _registries() -> list[tuple[str, Any]]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    found: list[tuple[str, Any]] = [("attention", ALL_ATTENTION_FUNCTIONS)]
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:  # a transformers without pluggable experts: only the eager loop exists
        return found
    found.append(("experts", ALL_EXPERTS_FUNCTIONS))
    return found


class BackendTrace:
    """Counts calls per registry key; anything not called through a registry is the model's eager code."""

    def __init__(self) -> None:
        self.calls: dict[str, Counter[str]] = {"attention": Counter(), "experts": Counter()}

    def _wrap(self, kind: str, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[kind][key] += 1
            return fn(*args, **kwargs)

        counted.__parity_traced__ = True  # type: ignore[attr-defined]
        return counted

    def resolved(self, kind: str) -> str:
        """The implementation(s) that ran, joined with '+' if several did (itself a finding)."""
        called = sorted(self.calls[kind])
        return "+".join(called) if called else "eager"


@contextlib.contextmanager
def trace_backends() -> Iterator[BackendTrace]:
    trace = BackendTrace()
    saved: list[tuple[Any, dict[str, Any]]] = []
    try:
        for kind, registry in _registries():
            local = registry._local_mapping
            saved.append((registry, dict(local)))
            for key in list(registry):
                fn = registry[key]
                if not getattr(fn, "__parity_traced__", False):
                    local[key] = trace._wrap(kind, key, fn)
        yield trace
    finally:
        for registry, local in saved:
            registry._local_mapping.clear()
            registry._local_mapping.update(local)
