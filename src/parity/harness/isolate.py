"""One model's modes in a child process: a crash, abort or hang is that mode's failure, not the run's.

A device-side assert poisons the CUDA context of the process it happens in, an ``os.abort`` or a
segfault in a kernel ends it, and pytest-timeout in thread mode ends the whole pytest process: each
of these used to lose every later mode and model. Here the pytest process (the parent) starts
``python -m parity.harness.isolate SPEC`` for a case; the child runs the modes in order
(:func:`parity.harness.patch_runner.run_modes`), telling the parent through a progress file which
mode it is in. When the child dies or hangs, the parent writes that mode's ``error`` record with
what killed it and the child's last output (Python's faulthandler prints every thread's stack on a
fatal signal and on the per-mode deadline), and starts a new child at the next mode. The weights
snapshot (:mod:`parity.harness.weights`) makes the restart cheap: nothing is initialised twice.

Timeouts (README "Timeouts"): per mode ``PARITY_MODE_TIMEOUT_S``, default 120 s plus 60 s (GPU) or
600 s (CPU) per billion parameters, twice that for the mode that creates the weights; per model
``PARITY_MODEL_TIMEOUT_S``, default the per-mode timeout times (modes + 1). On the mode deadline the
child dumps its stacks and exits; on the model deadline the parent sends SIGABRT (stacks), then
SIGKILL, and records every mode not run as timed out.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from parity import settings as parity_settings
from parity.results import registry
from parity.results.records import (
    ResultsFile,
    load_results_file,
    make_record,
    results_path,
    write_json_atomic,
)

LOG_TAIL_LINES = 120
_TIMEOUT_MARK = "Timeout ("  # faulthandler's header when dump_traceback_later fires


def estimate_parameters(data: dict[str, Any]) -> float:
    """Rough parameter count of the text stack from a config dict (for timeouts only)."""
    text = registry.text_config_of(data)

    def num(key: str, default: float = 0.0) -> float:
        value = text.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default

    hidden, layers, vocab = num("hidden_size", 1024), num("num_hidden_layers", 1), num("vocab_size", 32000)
    inter = num("moe_intermediate_size") or num("intermediate_size", 4 * hidden)
    experts = max(num("num_experts"), num("n_routed_experts"), num("num_local_experts"), 1.0)
    return layers * (4 * hidden * hidden + 3 * hidden * inter * experts) + 2 * vocab * hidden


def mode_timeout_s(data: dict[str, Any], device_type: str) -> float:
    """``PARITY_MODE_TIMEOUT_S``, or scaled with the model's size (a 2B model on an H200: 240 s)."""
    explicit = parity_settings.get("PARITY_MODE_TIMEOUT_S")
    if explicit:
        return float(explicit)
    per_billion = 60.0 if device_type == "cuda" else 600.0
    return 120.0 + per_billion * estimate_parameters(data) / 1e9


def model_timeout_s(mode_timeout: float, n_modes: int) -> float:
    explicit = parity_settings.get("PARITY_MODEL_TIMEOUT_S")
    return float(explicit) if explicit else mode_timeout * (n_modes + 1)


def _describe_exit(code: int | None, killed_for_time: bool, log: str, mode_timeout: float) -> tuple[str, str]:
    """(one line saying what ended the child, error_kind)."""
    if killed_for_time:
        return "the model's deadline passed (PARITY_MODEL_TIMEOUT_S); the child was killed", "timeout"
    if _TIMEOUT_MARK in log:
        return f"the mode ran past its timeout of {mode_timeout:g} s (PARITY_MODE_TIMEOUT_S)", "timeout"
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        return f"the child process died of signal {name}", "crash"
    return f"the child process exited with code {code}", "crash"


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _append(path: Path, suite: str, variant: str, model: str, order: list[str], record: dict) -> None:
    current = load_results_file(path) if path.is_file() else ResultsFile(suite, variant, model, order, [])
    current.records.append(record)
    write_json_atomic(path, current.to_json())


def run_case_isolated(
    case_id: str,
    config_path: str | Path,
    modes: list[Any],
    tolerance: Any,
    settings: Any,
    *,
    case: registry.Case | None = None,
) -> list[dict[str, Any]]:
    """Run ``modes`` (already planned, truth first) in child processes; return every record."""
    from parity.harness.patch_runner import SEED, SUITE, record_order

    config = registry.config_path(config_path)
    data = registry.read_json(config)
    out = results_path(settings.results, SUITE, settings.variant, case_id)
    out.unlink(missing_ok=True)
    work = out.with_name(f".{case_id}.child")
    work.mkdir(parents=True, exist_ok=True)
    mode_timeout = mode_timeout_s(data, settings.device.type)
    deadline = time.monotonic() + model_timeout_s(mode_timeout, len(modes))
    order = record_order(modes)
    env = {
        **os.environ,
        **parity_settings.child_env(
            PARITY_RESULTS=settings.results,
            PARITY_VARIANT=settings.variant,
            PARITY_DEVICE=settings.device,
            PARITY_DTYPE=settings.dtype_name,
        ),
    }
    spec_base = {
        "case_id": case_id,
        "config": str(config),
        "modes": [
            {k: m.to_json().get(k) for k in ("modeling_backend", "attn_implementation", "moe_implementation")}
            | {"dtype": m.dtype}
            for m in modes
        ],
        "tolerance": {"rtol": tolerance.rtol, "atol": tolerance.atol},
        "unsupported": dict(case.unsupported) if case else {},
        "mode_timeout_s": mode_timeout,
    }
    start = 0
    attempt = 0
    while start < len(modes):
        attempt += 1
        spec = work / f"spec-{attempt}.json"
        pending = work / "pending.json"
        pending.unlink(missing_ok=True)
        write_json_atomic(spec, {**spec_base, "start": start, "pending": str(pending)})
        log = work / f"child-{attempt}.log"
        killed_for_time = False
        with log.open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "parity.harness.isolate", str(spec)],
                stderr=err,
                env=env,
                start_new_session=True,  # its own process group: a kill reaches its helpers too
            )
            try:
                code = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                killed_for_time = True
                os.killpg(proc.pid, signal.SIGABRT)  # faulthandler prints the stacks first
                try:
                    code = proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    code = proc.wait()
        text = _tail(log)
        if text:
            print(text, file=sys.stderr, flush=True)
        done = {r["mode"]["id"] for r in load_results_file(out).records} if out.is_file() else set()
        left = [i for i in range(start, len(modes)) if modes[i].id not in done]
        if code == 0 and not left:
            break
        if not left:
            break  # every mode recorded; the child failed on its way out (recorded modes stand)
        info = json.loads(pending.read_text()) if pending.is_file() else None
        crashed = info["index"] if info and info["index"] in left else left[0]
        why, kind = _describe_exit(code, killed_for_time, text, mode_timeout)
        if info is None:
            kind = "harness"  # the child died before it started a mode: the tool's own failure
        common = info["common"] if info and info["index"] == crashed else None
        if common is None:
            common = _fallback_common(case_id, modes[crashed], tolerance, settings, config, SUITE, SEED)
        targets = left[left.index(crashed) :] if killed_for_time else [crashed]
        for index in targets:
            if index != crashed:
                common = _fallback_common(case_id, modes[index], tolerance, settings, config, SUITE, SEED)
            message = (
                f"{modes[index].id}: {why}" if index == crashed else "not run: the model's deadline passed"
            )
            print(f"[parity]   ERROR ({kind}) {case_id} {message}", flush=True)
            record = make_record(
                status="error",
                error=f"{message}\n--- last lines of the child's stderr ---\n{text}\n"
                f"(child exit code {code})",
                error_kind=kind,
                phase="child",
                **common,
            )
            _append(out, SUITE, settings.variant, case_id, order, record)
        if killed_for_time:
            break
        start = crashed + 1
    return list(load_results_file(out).records) if out.is_file() else []


def _fallback_common(
    case_id: str, mode: Any, tolerance: Any, settings: Any, config: Path, suite: str, seed: int
) -> dict[str, Any]:
    """Record fields for a mode the child never announced (no torch needed in the parent)."""
    from parity.harness.patch_runner import common_fields
    from parity.results.compare import effective_tolerance

    env = {"config_hash": registry.config_hash(config), "seed": seed, "dtype": settings.dtype_name}
    return common_fields(
        case_id, mode, effective_tolerance(tolerance, settings.dtype_name), tolerance, settings, env
    )


def child_main(spec_path: str) -> int:
    """The child: install planted faults (negative controls), then run the modes from ``start``."""
    faulthandler.enable(file=sys.stderr, all_threads=True)
    spec = json.loads(Path(spec_path).read_text())
    from parity.harness import faults, patch_runner
    from parity.results.modes import ModelMode
    from parity.results.records import Tolerance

    faults.install(parity_settings.get("PARITY_FAULT"))
    settings = patch_runner.RunSettings.from_env(default_results=Path(spec_path).parent)
    case = registry.case_from_config(spec["case_id"], Path(spec["config"]), unsupported=spec["unsupported"])
    modes = [ModelMode(**m) for m in spec["modes"]]
    pending = Path(spec["pending"])
    timeout = float(spec["mode_timeout_s"])

    def on_mode(index: int, common: dict[str, Any]) -> None:
        tol = common["tolerance"]
        common = {**common, "tolerance": tol.to_json() if hasattr(tol, "to_json") else tol}
        write_json_atomic(pending, {"index": index, "common": common})
        first = index == spec["start"]
        faulthandler.dump_traceback_later(timeout * (2 if first else 1), exit=True)

    patch_runner.run_modes(
        spec["case_id"],
        spec["config"],
        modes,
        Tolerance(**spec["tolerance"]),
        settings,
        case=case,
        start=int(spec["start"]),
        on_mode=on_mode,
    )
    faulthandler.cancel_dump_traceback_later()
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))
