"""What a FlashAttention-2 build says it holds, read before a call it cannot take.

A flash-attn wheel narrowed to the head dims and dtypes in use (``nox -s build_flash -- fa2``) has a
dispatch that refuses the others with a TORCH_CHECK, yet on the H200 a call into a left-out head dim
(96, 128 on a head-dim-64 build; varlen and dense alike) killed the process with SIGSEGV instead of
raising, while the same build's dtype refusal did raise. A crash is the tool's failure, not the
``unsupported`` verdict it is, so the backend refuses from the build's own record before calling.

The record is a module inside the wheel (``flash_attn/build_config.py``, ``CONFIG``), written by the
build into the source tree before compiling. A flash-attn without it (the PyPI build, a full build)
is not second-guessed. Torch-free: the build session (nox's interpreter) writes what this reads.
"""

from __future__ import annotations

import importlib
from typing import Any

#: The record's module and, relative to the package root of a source tree or site-packages, its file.
FA2_RECORD_MODULE = "flash_attn.build_config"
FA2_RECORD_FILE = ("flash_attn", "build_config.py")

#: The ``-D`` switches of a narrowed build and what a build compiled with each cannot run.
FA2_DISABLED_FEATURES = {
    "FLASHATTENTION_DISABLE_SOFTCAP": "logit soft-capping (softcap)",
    "FLASHATTENTION_DISABLE_DROPOUT": "dropout",
    "FLASHATTENTION_DISABLE_ALIBI": "ALiBi slopes",
}


def fa2_record_text(head_dims: list[int], dtypes: list[str], defines: list[str]) -> str:
    """The record module's source, as the build writes it."""
    config = {
        "head_dims": sorted(int(d) for d in head_dims),
        "dtypes": sorted(dtypes),
        "defines": list(defines),
        "built_by": "nox -s build_flash -- fa2",
    }
    return (
        '"""What this flash-attn build was compiled for (written by `nox -s build_flash -- fa2`).\n\n'
        "A head dim or dtype outside these has no kernel here; parity refuses it before the call.\n"
        '"""\n\n'
        f"CONFIG = {config!r}\n"
    )


def fa2_build_record() -> dict[str, Any] | None:
    """The installed flash-attn's record; None when the build does not say (a full build)."""
    try:
        module = importlib.import_module(FA2_RECORD_MODULE)
    except ImportError:
        return None
    config = getattr(module, "CONFIG", None)
    return config if isinstance(config, dict) else None


def fa2_build_gaps(
    *, head_dim: int | None, dtype: object | None, softcap: bool, dropout: bool = False
) -> list[str]:
    """What of this call the installed FA2 build was compiled without (empty: it can run it).

    FA2 runs a head dim on the smallest compiled head-dim kernel at least as wide, as its dispatch does.
    ``dtype`` is a torch dtype or its name (``torch.bfloat16``, ``bfloat16``); this module stays torch-free.
    """
    record = fa2_build_record()
    if not record:
        return []
    gaps = []
    kernels = sorted(int(d) for d in record.get("head_dims") or [])
    if head_dim is not None and kernels and not any(head_dim <= k for k in kernels):
        gaps.append(f"head dim {head_dim} (built for head dims {', '.join(map(str, kernels))})")
    dtypes = list(record.get("dtypes") or [])
    name = None if dtype is None else str(dtype).removeprefix("torch.")
    if name is not None and dtypes and name not in dtypes:
        gaps.append(f"{name} (built for {', '.join(dtypes)})")
    defines = set(record.get("defines") or [])
    wanted = {"FLASHATTENTION_DISABLE_SOFTCAP": softcap, "FLASHATTENTION_DISABLE_DROPOUT": dropout}
    gaps += [f"{FA2_DISABLED_FEATURES[d]} ({d})" for d, needed in wanted.items() if needed and d in defines]
    return gaps


def refuse_build_gaps(provider: str, build: str, gaps: list[str], record: str, remedy: str) -> None:
    """NotImplementedError naming what a flash build lacks (from its ``record``), before the call.

    NotImplementedError is what makes the mode ``unsupported``: the build cannot run the model, which
    is neither the model's fault nor the tool's.
    """
    if gaps:
        raise NotImplementedError(
            f"{provider}: this {build} build was compiled without {'; '.join(gaps)} ({record}); {remedy}"
        )


def refuse_fa2_build_gaps(provider: str, **call: Any) -> None:
    """Refuse what the installed FA2 build lacks, before a call that would kill the process."""
    refuse_build_gaps(
        provider,
        "flash-attn",
        fa2_build_gaps(**call),
        FA2_RECORD_MODULE,
        "rebuild with `nox -s build_flash -- fa2` (add `--config PATH` for a model outside the registry, "
        "or `--full` for every head dim)",
    )
