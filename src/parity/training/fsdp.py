"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for HF models: one unit per block, then the root.

Which modules become units is the model's own declaration, ``_no_split_modules``: the decoder
layers, the vision blocks, the audio-encoder layers (and, for the Omni thinkers, the whole
encoders). One unit per block is what gives FSDP its memory profile (only one block's full
parameters alive at a time) and is the layout the ``dummy_forward`` and ``e2e`` suites must hold
under. Everything else (embeddings, norms, lm_head, patch embedding, mergers) lands in the root
unit. Generic on purpose: the e2e trainer uses the same function.

Works with gloo on CPU (checked with torch 2.13: all-gather, reduce-scatter and even a bf16
``MixedPrecisionPolicy`` run), so every suite also runs without a GPU. The callers still pass
``mp_policy`` only on GPU: CPU runs are the fp32 reference.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

__all__ = ["apply_fsdp2", "no_split_class_names", "to_mesh"]


def no_split_class_names(model: torch.nn.Module) -> set[str]:
    """Union of ``_no_split_modules`` over the model and its sub-models (towers carry their own)."""
    names: set[str] = set()
    for module in model.modules():
        declared = getattr(module, "_no_split_modules", None)
        if declared:
            names.update(declared)
    return names


def _device_type(model: torch.nn.Module) -> str:
    for param in model.parameters():
        return param.device.type
    return "cuda" if torch.cuda.is_available() else "cpu"


def to_mesh(mesh_or_group: DeviceMesh | dist.ProcessGroup | None, device_type: str) -> DeviceMesh:
    """A 1-D mesh for a process group (``None``: the default group); a mesh is returned as is."""
    if isinstance(mesh_or_group, DeviceMesh):
        return mesh_or_group
    group = mesh_or_group if mesh_or_group is not None else dist.group.WORLD
    return DeviceMesh.from_group(group, device_type)


def apply_fsdp2(
    model: torch.nn.Module,
    mesh_or_group: DeviceMesh | dist.ProcessGroup | None = None,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
    unit_class_names: Iterable[str] | None = None,
) -> torch.nn.Module:
    """Shard ``model`` in place: ``fully_shard`` every no-split module, then the root; return it.

    ``unit_class_names`` overrides ``_no_split_modules``. Units are wrapped children first
    (reversed pre-order), as FSDP2 requires for nested units such as an Omni encoder that contains
    its own sharded layers. Parameters must already be on their device: FSDP2 shards them where
    they are. Returns the same object (FSDP2 swaps the class in place).
    """
    mesh = to_mesh(mesh_or_group, _device_type(model))
    names = set(unit_class_names) if unit_class_names is not None else no_split_class_names(model)
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy

    units = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    for module in reversed(units):  # descendants before ancestors
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model
