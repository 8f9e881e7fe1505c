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


def hang_qwen2_eager() -> None:
    """The reference mode never returns: the worker is busy from its first mode on (orphan tests)."""
    _on("qwen2", "eager", lambda: time.sleep(10_000))


_FIRE_IN_FORWARD: list[bool] = []


def _cuda_error_in_forward(model_type: str, attn: str) -> None:
    """A device-side assert raised from inside the forward pass of one mode.

    On CUDA it is a real one (an out-of-bounds index on the device, then a synchronize: the context
    is poisoned afterwards); on CPU the same error text is raised, which exercises the worker's
    retirement rule (:func:`parity.harness.isolate.poisons_context`) without a GPU.
    """

    def fire() -> None:
        import torch

        from parity import settings

        if settings.device_and_dtype()[0].type == "cuda":
            table = torch.zeros(4, device="cuda")
            table[torch.tensor([1 << 20], device="cuda")] += 1  # index out of bounds: device-side assert
            torch.cuda.synchronize()
        raise RuntimeError("CUDA error: device-side assert triggered (planted on CPU)")

    def wrap_run_mode(original: Callable[..., Any]) -> Callable[..., Any]:
        def run_mode(config: Any, mode: Any, *args: Any, **kwargs: Any) -> Any:
            _FIRE_IN_FORWARD[:] = [config.model_type == model_type and mode.attn_implementation == attn]
            return original(config, mode, *args, **kwargs)

        return run_mode

    def wrap_trace(original: Callable[..., Any]) -> Callable[..., Any]:
        def trace_backends(*args: Any, **kwargs: Any) -> Any:
            if _FIRE_IN_FORWARD and _FIRE_IN_FORWARD[0]:
                fire()
            return original(*args, **kwargs)

        return trace_backends

    patch("parity.harness.patch_runner", "run_mode", wrap_run_mode)
    patch("parity.harness.patch_runner", "trace_backends", wrap_trace)


def cuda_error_seed_oss_sdpa() -> None:
    """seed_oss's sdpa mode hits a device-side assert in its forward pass."""
    _cuda_error_in_forward("seed_oss", "sdpa")


def cuda_error_qwen3_sdpa() -> None:
    """qwen3's sdpa mode hits a device-side assert in its forward pass."""
    _cuda_error_in_forward("qwen3", "sdpa")
