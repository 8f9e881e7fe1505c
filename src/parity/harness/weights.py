"""Create a model's weights once per case and rebuild every mode from them in milliseconds.

Initialising a 2B-parameter model on the CPU takes more than a minute, and the patch suite used to
pay that for every mode. Here the weights are created once (seeded, fp32, on the run's device:
the GPU initialises a 2B llama in a fraction of a second), rounded to the run's dtype, kept as a
CPU snapshot of every parameter and buffer (non-persistent ones too, so nothing is recomputed
differently) and saved in the results folder; each mode (each child process, each variant env)
builds the architecture on the ``meta`` device and fills it from the snapshot. The fp32 truth mode
reads the same rounded values into fp32 tensors: it differs from the half-precision run by compute
rounding only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def _no_init() -> contextlib.AbstractContextManager[Any]:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _non_persistent(model: torch.nn.Module) -> set[str]:
    names = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            names.add(f"{prefix}.{name}" if prefix else name)
    return names


def snapshot(model: torch.nn.Module, store_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, on the CPU; floats rounded to ``store_dtype``.

    Non-persistent float buffers (rotary ``inv_freq``) stay in their own dtype: every mode keeps
    them in fp32, as ``from_pretrained`` does.
    """
    keep = _non_persistent(model)
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}  # tied weights stay one tensor (one copy in the file)
    for name, tensor in _tensors(model):
        if id(tensor) not in seen:
            t = tensor.detach()
            if store_dtype is not None and t.is_floating_point() and name not in keep:
                t = t.to(store_dtype)
            seen[id(tensor)] = t.to("cpu", copy=True)
        out[name] = seen[id(tensor)]
    return out


def fill(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy the snapshot into a model of the same architecture (any device or dtype); strict."""
    names = {name for name, _ in _tensors(model)}
    missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
    if missing or unexpected:
        raise ValueError(
            f"weights snapshot does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, tensor in _tensors(model):
            tensor.copy_(state[name])


@contextlib.contextmanager
def meta_build() -> Iterator[None]:
    """Build the architecture without memory or initialisation cost (filled by :func:`fill`)."""
    with torch.device("meta"), _no_init():
        yield


def create(
    config: Any, *, seed: int, device: torch.device, store_dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], float]:
    """Initialise the model once (seeded, fp32, on ``device``); return its snapshot and the seconds."""
    from parity.harness import toy

    start = time.perf_counter()
    model = toy.build_model(
        config, attn_implementation="eager", dtype=torch.float32, device=device, seed=seed, init_device=device
    )
    state = snapshot(model, store_dtype)
    del model
    return state, time.perf_counter() - start


def weights_file(results: Path, case_id: str, config_hash: str, seed: int, device: str, dtype: str) -> Path:
    """One file per (config, seed, device type, dtype) in the results folder, shared by every variant."""
    key = hashlib.sha256(f"{config_hash}|{seed}|{device}|{dtype}".encode()).hexdigest()[:16]
    return Path(results) / "weights" / f"{case_id}-{key}.pt"


def load_or_create(
    path: Path, config: Any, *, seed: int, device: torch.device, store_dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The snapshot from ``path``, or created now and saved there (atomically) for the next process."""
    start = time.perf_counter()
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return state, {"weights": "loaded", "weights_s": round(time.perf_counter() - start, 3)}
    state, created_s = create(config, seed=seed, device=device, store_dtype=store_dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return state, {
        "weights": "created",
        "weights_create_s": round(created_s, 3),
        "weights_s": round(time.perf_counter() - start, 3),
        "parameters": sum(t.numel() for t in {id(v): v for v in state.values()}.values()),  # + buffers
    }
