"""Can this environment run a backend variant? Runs inside the variant's env, prints one JSON line.

    python -m parity.harness.probe [--needs-cuda] [--min-capability 9.0] [--module flash_attn ...]

Exit 0 when it can, 3 when it cannot (the JSON 'reason' says exactly what is missing). The nox
session turns exit 3 into a skip with that reason, so a variant is never silently passed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import sys
from typing import Any

CANNOT_RUN = 3
#: Distributions whose presence decides which kernels an env can serve (``kernels``: transformers'
#: hub-kernel downloads).
KERNEL_DISTRIBUTIONS = ("flash-attn", "flash-attn-3", "kernels")


def package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe(needs_cuda: bool, min_capability: tuple[int, int] | None, modules: list[str]) -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0], "ok": False, "reason": ""}
    try:
        import torch
        import transformers
    except ImportError as exc:
        info["reason"] = f"cannot import {exc.name}: {exc}"
        return info
    info.update(torch=torch.__version__, transformers=transformers.__version__, cuda=torch.version.cuda)
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    if needs_cuda and not torch.cuda.is_available():
        info["reason"] = f"needs a CUDA GPU; torch {torch.__version__} sees none"
        return info
    if min_capability and torch.cuda.get_device_capability(0) < min_capability:
        info["reason"] = (
            f"needs compute capability >= {min_capability[0]}.{min_capability[1]}; "
            f"{info['device']} has {info['capability']}"
        )
        return info
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # an ABI-mismatched kernel raises ImportError or OSError
            info["reason"] = f"package module {name!r} is not importable here: {type(exc).__name__}: {exc}"
            return info
        info[f"{name}_version"] = getattr(module, "__version__", "unknown")
    # which kernel packages this env holds (the per-variant isolation, visible in the session log)
    info["packages"] = {name: package_version(name) for name in KERNEL_DISTRIBUTIONS}
    try:
        import pytest_timeout  # noqa: F401

        info["pytest_timeout"] = True
    except ImportError:
        info["pytest_timeout"] = False
    info["ok"] = True
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity.harness.probe")
    parser.add_argument("--needs-cuda", action="store_true")
    parser.add_argument("--min-capability", help="e.g. 9.0")
    parser.add_argument("--module", action="append", default=[])
    args = parser.parse_args(argv)
    cap = tuple(int(x) for x in args.min_capability.split(".")) if args.min_capability else None
    info = probe(args.needs_cuda, cap, args.module)  # type: ignore[arg-type]
    print(json.dumps(info, sort_keys=True))
    return 0 if info["ok"] else CANNOT_RUN


if __name__ == "__main__":
    sys.exit(main())
