"""Environment fingerprint stored in every record.

Two numbers are only comparable when they came from comparable environments; the merge uses these
fields to refuse comparisons across different configs or seeds and to explain deviations across
torch/transformers/device versions. The kernel packages present (flash_attn, flash_attn_3, and
``kernels``, through which transformers would download a hub kernel) and the environment's prefix
show which per-variant environment a record came from: the fa2 env holds flash_attn, the fa3 env
flash_attn_3, the eager env neither. Imports torch lazily so the module itself stays torch-free.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[3]


def package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_revision(root: Path = REPO_ROOT) -> str | None:
    """HEAD plus '-dirty' when the tree has local changes, so a record says which code produced it."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}-dirty" if dirty else rev


def fingerprint(*, device: Any, dtype: Any, seed: int, config_hash: str | None) -> dict[str, Any]:
    import torch

    device = torch.device(device)
    name, capability = "cpu", None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        capability = f"{major}.{minor}"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": package_version("transformers"),
        "flash_attn": package_version("flash-attn") or package_version("flash_attn"),
        "flash_attn_3": package_version("flash-attn-3") or package_version("flash_attn_3"),
        "kernels": package_version("kernels"),
        "env": sys.prefix,
        "device": name,
        "compute_capability": capability,
        "dtype": str(dtype).removeprefix("torch."),
        "seed": seed,
        "git_revision": git_revision(),
        "config_hash": config_hash,
    }
