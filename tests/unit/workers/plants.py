"""Faults planted in the patch suite's child process (``PARITY_FAULT=tests.unit.workers.plants:NAME``).

Each wraps :func:`parity.harness.patch_runner.run_mode` from outside and fires only for one model
type and the ``sdpa`` mode, so the reference and the other modes and models show what survives.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from parity.harness.faults import patch


def _on(model_type: str, attn: str, action: Callable[[], None]) -> None:
    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def run_mode(config: Any, mode: Any, *args: Any, **kwargs: Any) -> Any:
            if config.model_type == model_type and mode.attn_implementation == attn:
                action()
            return original(config, mode, *args, **kwargs)

        return run_mode

    patch("parity.harness.patch_runner", "run_mode", wrap)


def abort_llama_sdpa() -> None:
    """What a device-side assert or a kernel segfault does to the process: it ends, no exception."""
    _on("llama", "sdpa", os.abort)


def hang_qwen2_sdpa() -> None:
    """A mode that never returns (a deadlocked kernel, a wait on a lost peer)."""
    _on("qwen2", "sdpa", lambda: time.sleep(10_000))


def harness_bug_qwen3_sdpa() -> None:
    """parity's own code breaking (here: the batch builder), not the model."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def packed_batch(config: Any, *args: Any, model: Any = None, **kwargs: Any) -> Any:
            attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
            if config.model_type == "qwen3" and attn == "sdpa":
                raise KeyError("planted harness bug in packed_batch")
            return original(config, *args, model=model, **kwargs)

        return packed_batch

    patch("parity.harness.patch_runner", "packed_batch", wrap)
