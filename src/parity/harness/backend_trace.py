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


def hf_flash_provider() -> str | None:
    """The library transformers' flash path called last: ``flash_attn``, ``flash_attn_interface``, ...

    transformers loads its flash functions lazily into module globals of
    ``transformers.modeling_flash_attention_utils`` (``_lazy_imports``): from the flash packages, or,
    when the ``kernels`` package is installed and the flash package is not, from a hub kernel it
    downloads. A hub kernel is reported as ``hub:<repo>`` (e.g. ``hub:kernels-community/flash-attn2``),
    so it can never pass for the package the variant exists for.
    """
    try:
        from transformers import modeling_flash_attention_utils as fa_utils
    except ImportError:
        return None
    fn = getattr(fa_utils, "_flash_varlen_fn", None) or getattr(fa_utils, "_flash_fn", None)
    if fn is None:
        return None
    loaded = getattr(fa_utils, "_loaded_implementation", None)
    if isinstance(loaded, str) and "/" in loaded:
        return f"hub:{loaded}"
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return module.split(".")[0] if module else None


def refuse_what_the_flash_build_lacks(key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise NotImplementedError before transformers' flash path calls a build without the needed feature.

    transformers passes ``sliding_window`` (when the keys outrun it), ``softcap`` and the head dim
    straight to the flash library; a stable-ABI FA3 build compiled without them, and a narrowed FA2
    without the head dim, kill the process instead of raising, so the mode would be a crash of the
    tool, not the ``unsupported`` it is. FA2's record is consulted only while flash_attn is (or may
    be) the provider: a hub kernel is not that build.
    """
    if len(args) < 3 or not ("flash_attention_3" in key or "flash_attention_2" in key):
        return
    query, keys = args[1], args[2]
    if "flash_attention_2" in key:
        from parity.backend.attention import FLASH_ATTN
        from parity.backend.flash_build import refuse_fa2_build_gaps

        if hf_flash_provider() not in (None, FLASH_ATTN):
            return
        refuse_fa2_build_gaps(
            f"transformers' {key} ({FLASH_ATTN})",
            head_dim=query.shape[-1],
            dtype=query.dtype,
            softcap=kwargs.get("softcap") is not None,
            dropout=bool(kwargs.get("dropout")),
        )
        return
    from parity.backend.attention import FLASH_ATTN_INTERFACE, refuse_fa3_build_gaps

    window = kwargs.get("sliding_window")
    key_len = keys.shape[2] if getattr(keys, "dim", lambda: 0)() == 4 else None
    refuse_fa3_build_gaps(
        f"transformers' {key} ({FLASH_ATTN_INTERFACE})",
        window=window is not None and (key_len is None or key_len > window),
        softcap=kwargs.get("softcap") is not None,
        head_dim=query.shape[-1],
        dtype=query.dtype,
        backward=query.requires_grad,
    )


def _is_flash_key(key: str) -> bool:
    """transformers' own flash implementations and hub kernel names (``org/repo``), not parity's."""
    return not key.startswith("parity_") and ("flash" in key or "/" in key)


class BackendTrace:
    """Counts calls per registry key; anything not called through a registry is the model's eager code.

    Calls of transformers' flash implementations also record which library served them
    (:func:`hf_flash_provider`, read right after each call).
    """

    def __init__(self) -> None:
        self.calls: dict[str, Counter[str]] = {"attention": Counter(), "experts": Counter()}
        self.flash_providers: Counter[str] = Counter()

    def _wrap(self, kind: str, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        flash = kind == "attention" and _is_flash_key(key)

        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[kind][key] += 1
            if not flash:
                return fn(*args, **kwargs)
            refuse_what_the_flash_build_lacks(key, args, kwargs)
            try:
                out = fn(*args, **kwargs)
            except RuntimeError as exc:  # the kernel refusing the model, as parity's backends see it
                if "does not support" in str(exc):
                    raise NotImplementedError(f"transformers' {key}: {exc}") from exc
                raise
            self.flash_providers[hf_flash_provider() or "unknown"] += 1
            return out

        counted.__parity_traced__ = True  # type: ignore[attr-defined]
        return counted

    def resolved(self, kind: str) -> str:
        """The implementation(s) that ran, joined with '+' if several did (itself a finding)."""
        called = sorted(self.calls[kind])
        return "+".join(called) if called else "eager"

    def flash_provider(self) -> str | None:
        """The library (libraries, '+'-joined) that served transformers' flash calls; None if none ran."""
        return "+".join(sorted(self.flash_providers)) or None


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
