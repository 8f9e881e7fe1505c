"""Torch-free GPU discovery, so a variant that cannot run here is skipped before we build its env.

Installing flash-attn on a machine without a GPU can mean a source build of an hour; asking
nvidia-smi first costs milliseconds and gives the exact reason to skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from sessions.variants import Variant


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: tuple[int, int]


def visible_gpus() -> tuple[list[Gpu], str]:
    """GPUs nvidia-smi reports (respecting CUDA_VISIBLE_DEVICES), and why none if empty."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return [], "CUDA_VISIBLE_DEVICES hides every GPU"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], "nvidia-smi not found"
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return [], f"nvidia-smi failed ({exc})"
    gpus = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    allowed = {v.strip() for v in visible.split(",")} if visible else None
    for line in out.strip().splitlines():
        index, name, cap = (part.strip() for part in line.split(","))
        if allowed is not None and index not in allowed:
            continue
        major, minor = cap.split(".")
        gpus.append(Gpu(name, (int(major), int(minor))))
    return gpus, "" if gpus else "nvidia-smi lists none"


def hardware_skip_reason(variant: Variant) -> str | None:
    """Why this variant cannot run on this machine's hardware, or None."""
    if not variant.needs_cuda:
        return None
    gpus, why = visible_gpus()
    if not gpus:
        return f"{variant.name} needs a CUDA GPU: {why}"
    if variant.min_capability:
        best = max(g.capability for g in gpus)
        if best < variant.min_capability:
            want = ".".join(map(str, variant.min_capability))
            have = ", ".join(f"{g.name} ({g.capability[0]}.{g.capability[1]})" for g in gpus)
            return f"{variant.name} needs compute capability >= {want}; this machine has {have}"
    return None


def gpu_arch() -> str | None:
    """The compute capability of the best visible GPU as a CUDA arch ("90" for 9.0), or None."""
    gpus, _ = visible_gpus()
    if not gpus:
        return None
    major, minor = max(g.capability for g in gpus)
    return f"{major}{minor}"
