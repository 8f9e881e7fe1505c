"""Every ``PARITY_*`` environment variable, read here and nowhere else.

The nox sessions set most of these for the processes they start; a user sets the rest to steer a
run by hand. Each one is declared once below with its default and meaning, the README's settings
table is generated from the same list (a unit test holds the two together), and a malformed value
is an error that names the variable instead of a stack trace three modules later.

Values are read at call time, not import time: tests and launchers change them between runs.
This module imports no torch (the sessions and the merge read it); :func:`device_and_dtype`
imports torch only when called.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


class SettingError(ValueError):
    """A PARITY_* variable holds a value that cannot be used; the message names it."""


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # "str" | "float" | "int" | "bool" | "path" | "list"
    default: str | None
    meaning: str
    who: str  # "user" (set it yourself) or "internal" (set by the sessions/launcher for children)


#: The variables' names, the only place they are spelled: every other module refers to these
#: constants, so a misspelt name is an AttributeError at import, not a variable nothing reads.
RESULTS = "PARITY_RESULTS"
VARIANT = "PARITY_VARIANT"
DEVICE = "PARITY_DEVICE"
DTYPE = "PARITY_DTYPE"
NPROC = "PARITY_NPROC"
E2E_ATTN = "PARITY_E2E_ATTN"
E2E_RUN_TIMEOUT_S = "PARITY_E2E_RUN_TIMEOUT_S"
E2E_HANG_TIMEOUT_S = "PARITY_E2E_HANG_TIMEOUT_S"
E2E_HANG_PG_TIMEOUT_S = "PARITY_E2E_HANG_PG_TIMEOUT_S"
DUMMY_FORWARD_CASE_TIMEOUT_S = "PARITY_DUMMY_FORWARD_CASE_TIMEOUT_S"
DISABLE_DUMMY_FORWARD = "PARITY_DISABLE_DUMMY_FORWARD"
FAULT = "PARITY_FAULT"
ATTN_ALLOW_SDPA_FALLBACK = "PARITY_ATTN_ALLOW_SDPA_FALLBACK"
SYSTEM_SITE = "PARITY_SYSTEM_SITE"
WHEELHOUSE = "PARITY_WHEELHOUSE"
TOY_CONFIG_ROOT = "PARITY_TOY_CONFIG_ROOT"
EXTRA_CASES = "PARITY_EXTRA_CASES"
ISOLATE = "PARITY_ISOLATE"
MODE_TIMEOUT_S = "PARITY_MODE_TIMEOUT_S"
MODEL_TIMEOUT_S = "PARITY_MODEL_TIMEOUT_S"
PG_TIMEOUT_S = "PARITY_PG_TIMEOUT_S"
RANK_TIMEOUT_S = "PARITY_RANK_TIMEOUT_S"
STACK_DIR = "PARITY_STACK_DIR"
LAUNCH_ID = "PARITY_LAUNCH_ID"

_ALL = (
    Setting(RESULTS, "path", None, "results folder a suite writes its records into", "internal"),
    Setting(
        VARIANT, "str", "eager", "backend variant this process runs (eager, fa2, fa3)", "internal"
    ),
    Setting(
        DEVICE,
        "str",
        None,
        "device the suites run on (default: cuda when torch sees a GPU, else cpu)",
        "user",
    ),
    Setting(DTYPE, "str", None, "compute dtype (default: bfloat16 on cuda, float32 on cpu)", "user"),
    Setting(
        NPROC, "int", None, "ranks per e2e training run (default: GPUs visible, or 2 on CPU)", "user"
    ),
    Setting(
        E2E_ATTN,
        "str",
        None,
        "attention backend of the e2e trainings (default: parity_sdpa_with_sp on CPU, the variant's flash "
        "backend on GPU)",
        "user",
    ),
    Setting(
        E2E_RUN_TIMEOUT_S,
        "float",
        "300",
        "watchdog of one e2e training run (the e2e session sets it from --timeout)",
        "internal",
    ),
    Setting(
        E2E_HANG_TIMEOUT_S,
        "float",
        "120",
        "watchdog of the planted-hang control (a backstop, counted from the launch)",
        "user",
    ),
    Setting(
        E2E_HANG_PG_TIMEOUT_S,
        "float",
        "10",
        "process-group timeout of the planted-hang control: the collective layer must report the hang, "
        "with every rank's stack, this long after it begins",
        "user",
    ),
    Setting(
        DUMMY_FORWARD_CASE_TIMEOUT_S,
        "float",
        None,
        "per-case deadline inside the shared dummy_forward job",
        "user",
    ),
    Setting(
        DISABLE_DUMMY_FORWARD,
        "bool",
        "0",
        "turn the dummy_forward hook off (the negative control: the asymmetric job must then fail)",
        "user",
    ),
    Setting(
        FAULT,
        "list",
        "",
        "planted faults for negative controls: names from parity.harness.faults or module:function "
        "specs, comma-separated; installed by each rank at start",
        "user",
    ),
    Setting(
        ATTN_ALLOW_SDPA_FALLBACK,
        "bool",
        "0",
        "let parity's flash backends run sdpa where no flash kernel can (recorded as a fallback, which "
        "the merge refuses)",
        "user",
    ),
    Setting(
        SYSTEM_SITE,
        "bool",
        "0",
        "build each variant's env on top of the packages of the interpreter running nox (GPU images: "
        "torch, transformers from the image) and install only the variant's own packages (flash-attn, "
        "flash-attn-3) from the wheelhouse, with no index",
        "user",
    ),
    Setting(
        WHEELHOUSE,
        "path",
        None,
        "folder of prebuilt wheels every variant env takes its flash packages from first, and where "
        "`nox -s build_flash` puts what it builds (default: .nox/wheelhouse)",
        "user",
    ),
    Setting(
        TOY_CONFIG_ROOT,
        "path",
        None,
        "folder of <id>_toy/config.json toy configs (default: the repo's toy_config/)",
        "user",
    ),
    Setting(
        EXTRA_CASES,
        "path",
        None,
        "JSON file of ad-hoc cases (`--config` entries: id -> config path) that the registry adds to its "
        "cases (the suites write it into the results folder)",
        "internal",
    ),
    Setting(
        ISOLATE,
        "bool",
        "1",
        "run the patch modes in a persistent worker process (started once per session, replaced after a "
        "crash, a hang or a CUDA error), so a crash, abort or hang is that mode's error and the other modes "
        "and models still run",
        "user",
    ),
    Setting(
        MODE_TIMEOUT_S,
        "float",
        None,
        "deadline of one patch mode in the worker (default: 120 s + 60 s per billion parameters on a GPU, "
        "600 s on CPU; twice that for the mode that creates the weights); `--mode-timeout` sets it",
        "user",
    ),
    Setting(
        MODEL_TIMEOUT_S,
        "float",
        None,
        "deadline of one model's patch modes (default: the mode timeout x (modes + 1)); `--timeout` sets it",
        "user",
    ),
    Setting(
        PG_TIMEOUT_S,
        "float",
        "300",
        "process-group timeout of a rank (the launcher sets it)",
        "internal",
    ),
    Setting(
        RANK_TIMEOUT_S,
        "float",
        None,
        "self-destruct deadline of a rank, with a stack dump (the launcher sets it)",
        "internal",
    ),
    Setting(
        STACK_DIR,
        "path",
        None,
        "where each rank writes its stack dumps (the launcher sets it)",
        "internal",
    ),
    Setting(
        LAUNCH_ID, "str", None, "tags every process of one launch for the orphan sweep", "internal"
    ),
)

SETTINGS: dict[str, Setting] = {s.name: s for s in _ALL}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def raw(name: str) -> str | None:
    """The variable's text, or its default; unknown names are a programming error."""
    setting = SETTINGS[name]
    value = os.environ.get(name)
    if value is None or value == "":
        return setting.default
    return value


def get(name: str) -> Any:
    """The parsed value (None where unset and without default)."""
    setting = SETTINGS[name]
    text = raw(name)
    if setting.kind == "bool":
        word = (text or "").strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise SettingError(f"{name}={text!r}: expected one of 1/0, true/false, yes/no, on/off")
    if setting.kind == "list":
        return [part.strip() for part in (text or "").split(",") if part.strip()]
    if text is None:
        return None
    if setting.kind in ("float", "int"):
        try:
            value = float(text) if setting.kind == "float" else int(text)
        except ValueError:
            raise SettingError(
                f"{name}={text!r}: expected a{'n integer' if setting.kind == 'int' else ' number'}"
            ) from None
        if not value > 0:
            raise SettingError(f"{name}={text!r}: must be positive")
        return value
    if setting.kind == "path":
        return Path(text).expanduser()
    return text


def declared(name: str) -> str:
    """``name``, once checked against the declarations above: every PARITY_* name the code spells
    (to read it here or to set it for a child process) must be one of them, so a typo fails loudly
    instead of setting a variable nothing reads."""
    if name not in SETTINGS:
        raise SettingError(f"{name} is not a declared parity setting (see parity.settings)")
    return name


def child_env(values: Mapping[str, object] | None = None, **named: object) -> dict[str, str]:
    """PARITY_* variables for a child process, keyed by the constants above (or by name as keywords),
    each name checked by :func:`declared`; None is left out."""
    merged = {**(values or {}), **named}
    return {declared(name): str(value) for name, value in merged.items() if value is not None}


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    """The one place that decides where and in what precision the suites compute.

    cuda when torch sees a GPU (bf16 there), else cpu in fp32; ``PARITY_DEVICE`` and ``PARITY_DTYPE``
    override either.
    """
    import torch

    device = torch.device(get("PARITY_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = get("PARITY_DTYPE") or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise SettingError(f"PARITY_DTYPE={dtype_name!r} is not a torch dtype (use float32 or bfloat16)")
    return device, dtype


def markdown_table() -> str:
    """The README's settings table (kept identical to it by a unit test)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for s in _ALL:
        default = f"`{s.default}`" if s.default not in (None, "") else "unset"
        who = " (set by parity for its child processes)" if s.who == "internal" else ""
        lines.append(f"| `{s.name}` | {default} | {s.meaning}{who} |")
    return "\n".join(lines)
