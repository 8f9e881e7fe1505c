"""One persistent worker process runs the patch modes: a crash, abort or hang is that mode's failure.

A device-side assert poisons the CUDA context of the process it happens in, an ``os.abort`` or a
segfault in a kernel ends it, and pytest-timeout in thread mode ends the whole pytest process: each
of these used to lose every later mode and model. So the pytest process (the parent) never runs a
mode itself. It starts ``python -m parity.harness.isolate --serve PARENT_PID REPLY_FD`` once, lazily
on the first case, and sends it one JSON spec per case on its stdin; the worker runs the modes in
order (:func:`parity.harness.patch_runner.run_modes`), tells the parent through a per-case progress
file which mode it is in, writes the records into the results file as before and answers ``done`` on
the reply pipe. Imports, CUDA initialisation and kernel caches are paid once per session, not once
per model (about 13 s per model on an H200, 2.7 s on a 2-core CPU).

A worker is retired and a fresh one started for the next mode when it died (abort, segfault, exit),
hung (the per-mode or per-model deadline), or reported a mode error whose message is a CUDA error
(a device-side assert, an illegal memory access: the context is unusable afterwards, and every later
mode in it would fail for a reason that is not its own). When it died or hung, the parent writes that
mode's ``error`` record with what ended it and the worker's last stderr lines (faulthandler prints
every thread's stack on a fatal signal and on the per-mode deadline). The weights snapshot
(:mod:`parity.harness.weights`) makes a restart cheap: nothing is initialised twice. A worker also
serves only one environment: a case whose environment differs (another ``PARITY_FAULT``, results
folder, device) gets its own worker.

Timeouts (README "Timeouts"): per mode ``PARITY_MODE_TIMEOUT_S``, default 120 s plus 60 s (GPU) or
600 s (CPU) per billion parameters, twice that for the first mode of a case (it may create the
weights); per model ``PARITY_MODEL_TIMEOUT_S``, default the per-mode timeout times (modes + 1). On the
mode deadline the worker dumps its stacks and exits; on the model deadline the parent sends SIGABRT
(stacks), then SIGKILL, and records every mode not run as timed out.

No orphan: the worker must not outlive the parent, whatever ends the parent (SIGKILL, SIGTERM, nox's
Ctrl-C). It asks the kernel for SIGKILL when the parent dies (``PR_SET_PDEATHSIG``, Linux), a watchdog
thread polls its parent pid (every other platform, and the window before prctl), and an idle worker
exits when its command pipe closes. The parent kills its worker on KeyboardInterrupt and at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import faulthandler
import gc
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

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
PR_SET_PDEATHSIG = 1
PARENT_POLL_S = 0.5
#: A mode error with one of these in its message leaves the CUDA context unusable: retire the worker.
CUDA_POISON = re.compile(
    r"CUDA error|device-side assert|illegal memory access|cudaErrorLaunchFailure|CUBLAS_STATUS_EXECUTION"
    r"|unspecified launch failure|AcceleratorError",
    re.I,
)
#: Variables that change from case to case without changing what a worker would compute (pytest
#: names the running test in one): left out of the worker's environment, which decides its reuse.
VOLATILE_ENV = frozenset({"PYTEST_CURRENT_TEST"})
#: The worker's exit code after it retired itself because of a CUDA error (its records stand).
POISONED_EXIT = 3


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
    explicit = parity_settings.get(parity_settings.MODE_TIMEOUT_S)
    if explicit:
        return float(explicit)
    per_billion = 60.0 if device_type == "cuda" else 600.0
    return 120.0 + per_billion * estimate_parameters(data) / 1e9


def model_timeout_s(mode_timeout: float, n_modes: int) -> float:
    """``PARITY_MODEL_TIMEOUT_S``, or one mode timeout per mode plus one (the weights, the imports)."""
    explicit = parity_settings.get(parity_settings.MODEL_TIMEOUT_S)
    return float(explicit) if explicit else mode_timeout * (n_modes + 1)


def _describe_exit(code: int | None, killed_for_time: bool, log: str, mode_timeout: float) -> tuple[str, str]:
    """(one line saying what ended the worker, error_kind)."""
    if killed_for_time:
        limit = parity_settings.MODEL_TIMEOUT_S
        return f"the model's deadline passed ({limit}); the worker was killed", "timeout"
    if _TIMEOUT_MARK in log:
        limit = parity_settings.MODE_TIMEOUT_S
        return f"the mode ran past its timeout of {mode_timeout:g} s ({limit})", "timeout"
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        return f"the worker process died of signal {name}", "crash"
    return f"the worker process exited with code {code}", "crash"


def _append(path: Path, suite: str, variant: str, model: str, order: list[str], record: dict) -> None:
    current = load_results_file(path) if path.is_file() else ResultsFile(suite, variant, model, order, [])
    current.records.append(record)
    write_json_atomic(path, current.to_json())


# --------------------------------------------------------------------------------------------
# the parent's side: one worker per environment, reused case after case


def worker_command(parent_pid: int, reply_fd: int) -> list[str]:
    """The worker's command line (a test replaces it to start a worker with its guard patched off)."""
    return [sys.executable, "-m", "parity.harness.isolate", "--serve", str(parent_pid), str(reply_fd)]


@dataclass
class Reply:
    """How a case ended in the worker: ``done``, ``poisoned`` (a CUDA error; the worker retires), or
    ``dead`` / ``deadline`` (no answer: the worker died, or the model's deadline passed and the parent
    killed it)."""

    status: str
    code: int | None = None
    log: str = ""
    info: dict[str, Any] = field(default_factory=dict)


class Worker:
    """One worker process, its command pipe, its reply pipe and its stderr log."""

    def __init__(self, env: dict[str, str], log_dir: Path, serial: int) -> None:
        self.env = env
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"worker-{os.getpid()}-{serial}.log"
        self._log: IO[str] = self.log_path.open("w")
        read_fd, write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                worker_command(os.getpid(), write_fd),
                stdin=subprocess.PIPE,
                stderr=self._log,
                env=env,
                pass_fds=(write_fd,),
                start_new_session=True,  # its own process group: a kill reaches its helpers too
            )
        finally:
            os.close(write_fd)  # only the worker holds the write end: EOF here means it is gone
        self._reply_fd = read_fd
        self._buffer = b""
        self.cases = 0
        self.busy = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_offset(self) -> int:
        self._log.flush()
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        """The worker's stderr since ``offset`` (its last LOG_TAIL_LINES lines): this case's part."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(offset)
                text = handle.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])

    def run(self, spec: dict[str, Any], deadline: float) -> Reply:
        """Send one case and wait for its answer, the worker's death or the deadline."""
        offset = self.log_offset()
        self.busy = True
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps(spec) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died between cases: the wait below sees it
        answer = self._wait(deadline)
        if answer is not None:
            self.busy = False
            self.cases += 1
            status = answer.get("status", "done")
            if status == "poisoned":  # it exits by itself; give it a moment, then make sure
                self.stop(kill_after=10.0)
            return Reply(status, self.proc.returncode, self.log_since(offset), answer)
        if self.alive():  # the model's deadline: stacks first (faulthandler), then SIGKILL
            self._signal(signal.SIGABRT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
            self.close()
            return Reply("deadline", self.proc.returncode, self.log_since(offset))
        self.close()
        return Reply("dead", self.proc.returncode, self.log_since(offset))

    def _wait(self, deadline: float) -> dict[str, Any] | None:
        """The worker's next reply line, or None when it died or the deadline passed."""
        while True:
            if b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                return json.loads(line)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._reply_fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(self._reply_fd, 65536)
            if not chunk:  # the write end closed: the worker is gone
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=30)
                return None
            self._buffer += chunk

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, kill_after: float = 5.0) -> None:
        """End the worker: an idle one exits on EOF, a busy one (or one that does not) is killed."""
        if self.alive():
            if not self.busy and self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=kill_after)
            if self.alive():
                self._signal(signal.SIGKILL)
                self.proc.wait()
        self.close()

    def close(self) -> None:
        for close in (getattr(self.proc.stdin, "close", None), self._log.close):
            with contextlib.suppress(OSError):
                if close is not None:
                    close()
        if self._reply_fd >= 0:
            os.close(self._reply_fd)
            self._reply_fd = -1


class WorkerPool:
    """The parent's current worker (at most one: cases run one after another) and what it started.

    ``started`` lists every worker's pid with the reason it was started (``first case``,
    ``environment changed``, ``previous worker died``, ``previous worker hung``, ``CUDA error``), so
    a test can see that a worker is reused and when it is replaced.
    """

    def __init__(self) -> None:
        self.current: Worker | None = None
        self.started: list[tuple[int, str]] = []
        self._serial = 0
        self._why_next = "first case"

    def get(self, env: dict[str, str], log_dir: Path) -> Worker:
        worker = self.current
        if worker is not None and (worker.env != env or not worker.alive()):
            why = "environment changed" if worker.env != env else "previous worker exited between cases"
            self.retire(why)
        if self.current is None:
            self._serial += 1
            self.current = Worker(env, log_dir, self._serial)
            self.started.append((self.current.pid, self._why_next))
        return self.current

    def retire(self, why_next: str) -> None:
        """Stop the current worker; the next case's worker is started for ``why_next``."""
        if self.current is not None:
            self.current.stop()
            self.current = None
        self._why_next = why_next

    def shutdown(self) -> None:
        self.retire("first case")


POOL = WorkerPool()
atexit.register(POOL.shutdown)


def run_case_isolated(
    case_id: str,
    config_path: str | Path,
    modes: list[Any],
    tolerance: Any,
    settings: Any,
    *,
    case: registry.Case | None = None,
) -> list[dict[str, Any]]:
    """Run ``modes`` (already planned, truth first) in the worker; return every record.

    Resumes at the mode after one that killed, hung or poisoned the worker, with a fresh worker; a
    passed model deadline records every mode not run as timed out and ends the case.
    """
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
        **{k: v for k, v in os.environ.items() if k not in VOLATILE_ENV},
        **parity_settings.child_env(
            {
                parity_settings.RESULTS: settings.results,
                parity_settings.VARIANT: settings.variant,
                parity_settings.DEVICE: settings.device,
                parity_settings.DTYPE: settings.dtype_name,
            }
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
    log_dir = out.parent / ".workers"
    pending = work / "pending.json"
    start = 0
    try:
        while start < len(modes):
            pending.unlink(missing_ok=True)
            worker = POOL.get(env, log_dir)
            reply = worker.run({**spec_base, "start": start, "pending": str(pending)}, deadline)
            if reply.log:
                print(reply.log, file=sys.stderr, flush=True)
            done = {r["mode"]["id"] for r in load_results_file(out).records} if out.is_file() else set()
            left = [i for i in range(start, len(modes)) if modes[i].id not in done]
            if reply.status == "done":
                break  # every mode from ``start`` ran (recorded, whatever its status)
            if reply.status == "poisoned":
                POOL.retire(f"CUDA error in {case_id} {reply.info.get('mode')}")
                print(
                    f"[parity]   worker {worker.pid} retired after a CUDA error in {case_id} "
                    f"{reply.info.get('mode')}; a fresh worker runs the next mode",
                    flush=True,
                )
                start = int(reply.info["index"]) + 1
                continue
            killed_for_time = reply.status == "deadline"
            why, kind = _describe_exit(reply.code, killed_for_time, reply.log, mode_timeout)
            POOL.retire("previous worker hung" if kind == "timeout" else "previous worker died")
            if not left:
                break  # every mode recorded; the worker failed on its way out (recorded modes stand)
            info = json.loads(pending.read_text()) if pending.is_file() else None
            crashed = info["index"] if info and info["index"] in left else left[0]
            if info is None:
                kind = "harness"  # the worker died before it started a mode: the tool's own failure
            common = info["common"] if info and info["index"] == crashed else None
            if common is None:
                common = _fallback_common(case_id, modes[crashed], tolerance, settings, config, SUITE, SEED)
            targets = left[left.index(crashed) :] if killed_for_time else [crashed]
            for index in targets:
                if index != crashed:
                    common = _fallback_common(case_id, modes[index], tolerance, settings, config, SUITE, SEED)
                message = (
                    f"{modes[index].id}: {why}"
                    if index == crashed
                    else "not run: the model's deadline passed"
                )
                print(f"[parity]   ERROR ({kind}) {case_id} {message}", flush=True)
                record = make_record(
                    status="error",
                    error=f"{message}\n--- last lines of the worker's stderr ---\n{reply.log}\n"
                    f"(worker pid {worker.pid}, exit code {reply.code})",
                    error_kind=kind,
                    phase="child",
                    **common,
                )
                _append(out, SUITE, settings.variant, case_id, order, record)
            if killed_for_time:
                break
            start = crashed + 1
    except BaseException:  # KeyboardInterrupt (nox's Ctrl-C), pytest-timeout: never leave it running
        POOL.retire("previous case was interrupted")
        raise
    return list(load_results_file(out).records) if out.is_file() else []


def _fallback_common(
    case_id: str, mode: Any, tolerance: Any, settings: Any, config: Path, suite: str, seed: int
) -> dict[str, Any]:
    """Record fields for a mode the worker never announced (no torch needed in the parent)."""
    from parity.harness.patch_runner import common_fields
    from parity.results.compare import effective_tolerance

    env = {"config_hash": registry.config_hash(config), "seed": seed, "dtype": settings.dtype_name}
    return common_fields(
        case_id, mode, effective_tolerance(tolerance, settings.dtype_name), tolerance, settings, env
    )


# --------------------------------------------------------------------------------------------
# the worker's side


def _prctl_pdeathsig(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies; False where that is not there."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl: the poll remains
        return False


def guard_parent(parent_pid: int) -> None:
    """Die with the parent: SIGKILL from the kernel when it dies (prctl), and a thread that polls the
    parent pid (other platforms, and a parent that died before prctl was in place) and then kills
    this worker's process group."""
    _prctl_pdeathsig(signal.SIGKILL)

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                with contextlib.suppress(OSError):
                    os.killpg(os.getpgid(0), signal.SIGKILL)
                os._exit(1)
            time.sleep(PARENT_POLL_S)

    threading.Thread(target=watch, name="parity-parent-watch", daemon=True).start()


class _Poisoned(Exception):
    """A mode error was a CUDA error: stop the case here, the worker retires."""

    def __init__(self, index: int, mode: str, line: str) -> None:
        super().__init__(line)
        self.index, self.mode, self.line = index, mode, line


def poisons_context(record: dict[str, Any]) -> bool:
    """Whether a mode's record says the process's CUDA context is unusable now.

    Matched on the error text, whatever the device: a CUDA error message only arises on CUDA, and a
    planted one on CPU exercises the same retirement (tests/unit/test_isolation.py).
    """
    return record.get("status") == "error" and bool(CUDA_POISON.search(str(record.get("error") or "")))


def _run_spec(spec: dict[str, Any]) -> None:
    """One case in this worker: the spec's modes from ``start``, with the per-mode deadline."""
    import torch

    from parity.harness import patch_runner
    from parity.results.modes import ModelMode
    from parity.results.records import Tolerance

    settings = patch_runner.RunSettings.from_env(default_results=Path(spec["pending"]).parent)
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

    def on_record(index: int, record: dict[str, Any]) -> None:
        faulthandler.cancel_dump_traceback_later()
        if poisons_context(record):
            lines = [x for x in str(record.get("error")).splitlines() if x.strip()]
            raise _Poisoned(index, modes[index].id, lines[-1] if lines else "CUDA error")

    try:
        patch_runner.run_modes(
            spec["case_id"],
            spec["config"],
            modes,
            Tolerance(**spec["tolerance"]),
            settings,
            case=case,
            start=int(spec["start"]),
            on_mode=on_mode,
            on_record=on_record,
        )
    finally:
        faulthandler.cancel_dump_traceback_later()  # an idle worker has no deadline
        gc.collect()  # the case's weights, truth tensors and models go before the next case
        if settings.device.type == "cuda":
            with contextlib.suppress(RuntimeError):
                torch.cuda.empty_cache()


def serve(parent_pid: int, reply_fd: int) -> int:
    """The worker: guard against outliving the parent, install planted faults, then serve cases."""
    guard_parent(parent_pid)
    if os.getppid() != parent_pid:  # the parent died before the guard was in place
        return 1
    faulthandler.enable(file=sys.stderr, all_threads=True)
    from parity.harness import faults, patch_runner  # noqa: F401 - torch and transformers, once

    faults.install(parity_settings.get(parity_settings.FAULT))
    reply = os.fdopen(reply_fd, "w", buffering=1)
    while True:
        line = sys.stdin.readline()
        if not line:  # the parent closed the pipe (or died): nothing more to serve
            return 0
        spec = json.loads(line)
        try:
            _run_spec(spec)
        except _Poisoned as poisoned:
            print(f"[parity]   CUDA error in {poisoned.mode}: {poisoned.line}", file=sys.stderr, flush=True)
            reply.write(
                json.dumps({"status": "poisoned", "index": poisoned.index, "mode": poisoned.mode}) + "\n"
            )
            reply.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(POISONED_EXIT)  # no interpreter teardown in a poisoned CUDA context
        reply.write(json.dumps({"status": "done"}) + "\n")
        reply.flush()


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--serve":
        return serve(int(argv[1]), int(argv[2]))
    print("usage: python -m parity.harness.isolate --serve PARENT_PID REPLY_FD", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
