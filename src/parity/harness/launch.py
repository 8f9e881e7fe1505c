"""Run a multi-process PyTorch job under torchrun so that a hang fails fast, says where, and leaves
nothing behind.

A rank-asymmetric collective (one rank skips an ``all_reduce``) blocks the other ranks forever.
Neither torchrun nor nox nor a bare ``subprocess.run(timeout=...)`` stops that cleanly: torchrun
starts every worker with ``start_new_session=True``, so killing torchrun's process group never
reaches the ranks, and a SIGKILLed torchrun orphans them. This module owns the whole lifecycle.

Layers, innermost fires first (see DESIGN.md, "Hangs: fail fast, say where, leave nothing behind"):

1. Collective layer: every rank builds its process group with ``timeout=PARITY_PG_TIMEOUT_S``
   (default ``min(PG_TIMEOUT_FRACTION * timeout_s, PG_TIMEOUT_MAX_S)``), plus the NCCL
   async-error-handling and flight-recorder variables, so a stuck collective raises inside the rank
   with a real error.
2. Python layer: :func:`parity.harness.rank_setup.init_rank` registers faulthandler on SIGUSR1, writing
   ``<log_dir>/stacks/rank_<r>.txt``, and a self-destruct timer (``PARITY_RANK_TIMEOUT_S``).
3. This launcher's watchdog at ``timeout_s``: snapshot every descendant pid, SIGUSR1 each rank and
   collect its stack, SIGTERM torchrun, give it a grace period, then SIGKILL every remembered
   descendant and verify none survive. The same sweep runs after *every* launch (success, crash,
   KeyboardInterrupt, SIGTERM, exception), so no process outlives ``launch()``; an interrupt is
   first forwarded to torchrun as SIGTERM (the ranks dump their stacks), then swept.
4. The guardian (:mod:`parity.harness._guardian`), torchrun's parent: a child subreaper that kills
   every descendant when the launcher dies without cleaning up (SIGKILL, ``os._exit``, nox's
   SIGTERM-then-SIGKILL 0.5 s after a Ctrl-C), within ``GUARD_GRACE_S`` plus a sweep.

Processes are found three ways, because each alone misses a case: a tree walk from torchrun
(refreshed while the job runs, so the set survives torchrun dying and the ranks being
re-parented), a marker variable ``PARITY_LAUNCH_ID`` that every process of this launch inherits
(finds orphans the tree walk can no longer reach), and the per-rank pid files that ``init_rank``
writes (which also map pids to ranks).

Outputs in ``log_dir``::

    torchrun.log              torchrun's own output, with every rank's output tee'd in ([rankN]:)
    ranks/<job>/attempt_<k>/<local_rank>/{stdout,stderr}.log   per-rank logs (torchrun --log-dir)
    stacks/rank_<r>.txt       faulthandler dumps (SIGUSR1 on timeout, fatal signals, self-destruct)
    stacks/rank_<r>.pid       written by init_rank once its SIGUSR1 handler is installed
    fr/rank_<r>               NCCL flight-recorder dumps (TORCH_FR_DUMP_TEMP_FILE), GPU only

Multi-node: pass ``nnodes``, ``rdzv_endpoint`` (host:port of the c10d rendezvous, the same on
every node) and, for static rank assignment, ``node_rank``; they go to torchrun unchanged and
each node runs its own ``launch()`` with its own watchdog. With ``nnodes == 1`` and no endpoint,
the rendezvous is ``localhost:<free port>``. Anything else torchrun accepts (``--rdzv-id``,
``--max-restarts``, ``--local-ranks-filter``...) goes in ``extra_torchrun_args``.

CLI::

    python -m parity.launch --nproc 2 --timeout 60 --log-dir DIR -- [-m] <module or script> [args...]

prints the summary and exits 0 (ok), 124 (timeout, like coreutils ``timeout``) or 1 (crash).

This module imports no torch: the launcher process stays light, and torchrun imports torch itself.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

try:
    import psutil
except ImportError:  # pragma: no cover - exercised by forcing the fallback in tests
    psutil = None

from parity import settings  # noqa: E402 - torch-free, like this launcher

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_TIMEOUT = 124

# What the launcher tells its ranks (declared with the others in parity.settings).
ENV_PG_TIMEOUT = settings.PG_TIMEOUT_S
ENV_STACK_DIR = settings.STACK_DIR
ENV_RANK_TIMEOUT = settings.RANK_TIMEOUT_S
ENV_LAUNCH_ID = settings.LAUNCH_ID

# The collective layer should fail well before the watchdog, leaving time for the failing rank to
# print its error and for torchrun to tear the rest down on its own.
PG_TIMEOUT_FRACTION = 0.5
# ... and soon after a hang begins, whatever the watchdog: no collective of a toy job legitimately
# waits a minute (start-up skew between ranks is seconds), and a hang is reported this long after it
# begins instead of half the watchdog later (150 s for a 300 s e2e run before).
PG_TIMEOUT_MAX_S = 60.0
# The rank self-destruct is armed *after* the watchdog deadline: its job is to stop ranks whose
# launcher is gone (SIGKILLed, pytest-timeout's os._exit), not to compete with the watchdog, whose
# report (all ranks' stacks, status "timeout") is more informative than one rank's exit(1).
RANK_TIMEOUT_MARGIN_S = 30.0

POLL_S = 0.5  # how often the watchdog wakes to check torchrun and remember new descendants
STACK_WAIT_S = 2.0  # upper bound for faulthandler dumps to land after SIGUSR1
TERM_GRACE_S = 5.0  # time torchrun gets to tear its workers down after SIGTERM
KILL_WAIT_S = 5.0  # time SIGKILLed processes get to disappear before we call them survivors
#: After a Ctrl-C / SIGTERM of the launcher: time torchrun gets (after our SIGTERM) before the sweep.
#: Short, because nox SIGKILLs its child 0.5 s after Ctrl-C; the guardian finishes the job then.
INTERRUPT_GRACE_S = 0.5
#: The guardian's grace between forwarding SIGTERM to torchrun and SIGKILLing every descendant.
GUARD_GRACE_S = 0.5
GUARDIAN = Path(__file__).with_name("_guardian.py")
TAIL_LINES = 25

_FAILURE_RE = re.compile(
    r"rank\s*:\s*(?P<rank>\d+)\s*\(local_rank:\s*(?P<local>\d+)\)\s*\n\s*exitcode\s*:\s*(?P<code>-?\d+)"
)


@dataclass
class LaunchResult:
    """Outcome of one launch; ``summary()`` is what a human should read first."""

    status: str  # "ok" | "crash" | "timeout"
    returncode: int  # 0 ok, 124 timeout, else torchrun's code (negative: torchrun died by signal)
    elapsed_s: float
    log_dir: Path
    hung_ranks: list[int]  # ranks (on this node) still alive at the deadline
    stacks: dict[int, str]  # rank -> faulthandler text (SIGUSR1 dump on timeout, or a fatal dump)
    survivors: list[int]  # pids alive after cleanup; non-empty is a launcher bug, reported loudly
    failed_ranks: dict[int, int] = field(default_factory=dict)  # rank -> exit code (torchrun's report)
    root_cause_ranks: list[int] = field(default_factory=list)  # torchrun's "first observed failure"
    rank_logs: dict[int, Path] = field(default_factory=dict)  # local rank -> dir of stdout/stderr.log
    timeout_s: float | None = None  # the watchdog's deadline

    @property
    def ok(self) -> bool:
        return self.status == "ok" and not self.survivors

    def summary(self) -> str:
        """Status, which ranks hung or failed, and the tail of the stack/log that explains why."""
        lines = [
            f"parity.launch: {self.status.upper()} after {self.elapsed_s:.1f}s "
            f"(returncode {self.returncode}); logs in {self.log_dir}"
        ]
        if self.status == "timeout":
            lines.append(f"  hung ranks (alive at the deadline): {self.hung_ranks}")
            for rank in sorted(self.stacks):
                lines.append(f"  --- rank {rank} stack (SIGUSR1 faulthandler dump) ---")
                lines.extend("    " + ln for ln in _tail(self.stacks[rank]))
        elif self.status == "crash":
            if self.failed_ranks:
                described = ", ".join(
                    f"rank {r}: {_describe_exit(c)}" for r, c in sorted(self.failed_ranks.items())
                )
                lines.append(f"  failed ranks: {described}")
                lines.append(f"  root cause (first failure): {self.root_cause_ranks or 'unknown'}")
            for rank in self._ranks_to_show():
                lines.extend(self._log_tail(rank))
            for rank in sorted(self.stacks):
                lines.append(f"  --- rank {rank} faulthandler output ---")
                lines.extend("    " + ln for ln in _tail(self.stacks[rank]))
        if self.survivors:
            lines.append(f"  BUG: processes survived cleanup: {self.survivors}")
        return "\n".join(lines)

    def cause(self) -> str:
        """One line naming the root cause, for tables and records: which rank, and how it failed.

        ``rank 1 killed by SIGKILL (first failure)``, ``rank 0 raised RuntimeError: ... (exit code 1)``,
        ``timeout after 60s: ranks [0, 1] hung (rank 0 in all_reduce, rank 1 in _stall_forever)``.
        The summary holds the stacks and logs; this is what a one-line report shows instead of the
        last line of a faulthandler dump.
        """
        if self.status == "ok":
            return "ok" if not self.survivors else f"ok, but processes survived cleanup: {self.survivors}"
        if self.status == "timeout":
            where = [f"rank {r} in {_innermost(self.stacks[r])}" for r in sorted(self.stacks)]
            places = f" ({', '.join(where)})" if where else ""
            after = self.timeout_s if self.timeout_s is not None else self.elapsed_s
            return f"timeout after {after:g}s: ranks {self.hung_ranks} hung{places}"
        rank = self.first_failed_rank()
        if rank is None:
            return f"torchrun exited with {_describe_exit(self.returncode)} and named no failing rank"
        code = self.failed_ranks.get(rank)
        how = _describe_exit(code) if code is not None else "failed"
        log_dir = self.rank_logs.get(rank)
        raised = _exception_line(_read_text(log_dir / "stderr.log")) if log_dir is not None else None
        if raised and (code is None or code >= 0):
            how = f"raised {raised}" + (f" ({_describe_exit(code)})" if code is not None else "")
        others = sorted(r for r in self.failed_ranks if r != rank and self.failed_ranks[r] != -signal.SIGTERM)
        also = f"; also failed: ranks {others}" if others else ""
        return f"rank {rank} {how} (first failure){also}"

    def first_failed_rank(self) -> int | None:
        """torchrun's root-cause rank (the first to fail), else the lowest failed rank, else a rank
        that raised on its own."""
        if self.root_cause_ranks:
            return self.root_cause_ranks[0]
        if self.failed_ranks:
            return min(self.failed_ranks)
        raised = [r for r in sorted(self.rank_logs) if self.raised(r)]
        return raised[0] if raised else None

    def _ranks_to_show(self) -> list[int]:
        # torchrun SIGTERMs the healthy ranks when one fails; their logs are noise, unless the rank
        # raised on its own first (a collective mismatch fails on both sides: both stacks matter).
        shown = list(self.root_cause_ranks)
        shown += [r for r, c in sorted(self.failed_ranks.items()) if r not in shown and c != -signal.SIGTERM]
        shown += [r for r in sorted(self.rank_logs) if r not in shown and self.raised(r)]
        if not shown:  # torchrun's report was unreadable: show every rank that said anything
            shown = sorted(self.rank_logs)
        return shown

    def raised(self, rank: int) -> bool:
        """Whether this rank's own stderr holds a Python traceback (it failed, not just got killed)."""
        log_dir = self.rank_logs.get(rank)
        if log_dir is None:
            return False
        return "Traceback (most recent call last)" in _read_text(log_dir / "stderr.log")

    def _log_tail(self, rank: int) -> list[str]:
        log_dir = self.rank_logs.get(rank)
        if log_dir is None:
            return [f"  --- rank {rank}: no per-rank log found ---"]
        for name in ("stderr.log", "stdout.log"):
            text = _read_text(log_dir / name)
            if text.strip():
                return [f"  --- rank {rank} {name} (tail) ---"] + ["    " + ln for ln in _tail(text)]
        return [f"  --- rank {rank}: empty logs in {log_dir} ---"]


def stack_file(stack_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` writes faulthandler output (the contract with :mod:`parity.harness.rank_setup`)."""
    return stack_dir / f"rank_{rank}.txt"


def pid_file(stack_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` writes its pid once its SIGUSR1 handler is installed."""
    return stack_dir / f"rank_{rank}.pid"


def free_port() -> int:
    """Return a TCP port that was free a moment ago (the OS picks it, so parallel runs don't clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(
    script_or_module_args: Sequence[str],
    *,
    nproc: int,
    log_dir: Path,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    node_rank: int | None = None,
    extra_torchrun_args: Sequence[str] = (),
) -> list[str]:
    """The torchrun command line ``launch()`` runs (exposed so it can be printed and tested)."""
    if rdzv_endpoint is None:
        if nnodes != 1:
            raise ValueError("multi-node launches need rdzv_endpoint (host:port, the same on every node)")
        rdzv_endpoint = f"localhost:{free_port()}"
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc),
        "--nnodes", str(nnodes),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", rdzv_endpoint,
        "--log-dir", str(log_dir / "ranks"),
        "--tee", "3",
    ]  # fmt: skip
    if node_rank is not None:
        cmd += ["--node-rank", str(node_rank)]
    return cmd + list(extra_torchrun_args) + list(script_or_module_args)


def rank_env(log_dir: Path, timeout_s: float, launch_id: str, env: dict[str, str] | None) -> dict[str, str]:
    """Environment for torchrun and its ranks: ours, then the caller's ``env`` on top.

    The NCCL variables are set unconditionally: gloo ignores them, and one environment on CPU and
    GPU means the CPU tests exercise what GPU runs get. ``=3`` (not 1) for async error handling
    because flight-recorder dumps do not happen with 1 (pytorch#121055). NCCL_NVLS_ENABLE is
    deliberately left exactly as inherited.
    """
    pg_timeout_s = min(PG_TIMEOUT_FRACTION * timeout_s, PG_TIMEOUT_MAX_S)
    ours = {
        ENV_PG_TIMEOUT: f"{pg_timeout_s:g}",
        ENV_STACK_DIR: str(log_dir / "stacks"),
        ENV_RANK_TIMEOUT: f"{timeout_s + RANK_TIMEOUT_MARGIN_S:g}",
        ENV_LAUNCH_ID: launch_id,
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_BUFFER_SIZE": "2000",
        "TORCH_FR_DUMP_TEMP_FILE": str(log_dir / "fr" / "rank_"),
        "TORCH_SHOW_CPP_STACKTRACES": "1",
        "PYTHONUNBUFFERED": "1",  # so a hung rank's last prints are in its log
    }
    merged = {**os.environ, **ours, **(env or {})}
    merged[ENV_LAUNCH_ID] = launch_id  # the orphan sweep depends on it; not overridable
    return merged


def launch(
    script_or_module_args: list[str],
    *,
    nproc: int,
    timeout_s: float,
    log_dir: Path,
    env: dict[str, str] | None = None,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    node_rank: int | None = None,
    extra_torchrun_args: Sequence[str] = (),
) -> LaunchResult:
    """Run ``torchrun ... <script_or_module_args>`` with a watchdog; never leave a process behind.

    ``script_or_module_args`` is what follows torchrun's own options: ``["train.py", "--lr", "1"]``
    or ``["-m", "pkg.module", ...]``. ``env`` overrides both the inherited environment and the
    launcher's defaults (e.g. ``{settings.PG_TIMEOUT_S: "600"}``). Returns instead of raising for
    crashes and timeouts; re-raises KeyboardInterrupt and other exceptions after cleaning up.
    """
    log_dir = Path(log_dir).resolve()
    stack_dir = log_dir / "stacks"
    for sub in (log_dir, stack_dir, log_dir / "fr", log_dir / "ranks"):
        sub.mkdir(parents=True, exist_ok=True)
    for stale in [*stack_dir.glob("rank_*.pid"), *stack_dir.glob("rank_*.txt")]:
        stale.unlink()  # a reused log_dir must not attribute an old run's pids or stacks to this one

    launch_id = uuid.uuid4().hex
    cmd = torchrun_command(
        script_or_module_args,
        nproc=nproc,
        log_dir=log_dir,
        nnodes=nnodes,
        rdzv_endpoint=rdzv_endpoint,
        node_rank=node_rank,
        extra_torchrun_args=extra_torchrun_args,
    )
    child_env = rank_env(log_dir, timeout_s, launch_id, env)
    _progress(f"launching {nproc} proc(s)/node, timeout {timeout_s:g}s, logs {log_dir}")
    _progress("command: " + " ".join(cmd))

    start = time.monotonic()
    with open(log_dir / "torchrun.log", "wb") as torchrun_log:
        proc = subprocess.Popen(
            guarded(cmd),
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=torchrun_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our signals to its group never hit us; Ctrl-C is ours to forward
        )
    tree = _ProcessTree(proc.pid, launch_id, stack_dir)
    hung: list[int] = []
    stacks: dict[int, str] = {}
    try:
        rc = _wait(proc, tree, deadline=start + timeout_s)
        if rc is None:
            _progress(f"timeout after {time.monotonic() - start:.1f}s: dumping stacks, then killing")
            hung, stacks = _dump_stacks(tree, stack_dir)
            _terminate(proc)
            status, returncode = "timeout", EXIT_TIMEOUT
        elif rc == 0:
            status, returncode = "ok", EXIT_OK
        else:
            status, returncode = "crash", rc
    except BaseException as exc:  # KeyboardInterrupt, SystemExit from a SIGTERM handler, anything
        _progress(f"{type(exc).__name__}: forwarding SIGTERM to torchrun, then killing what is left")
        tree.refresh(scan_env=True)
        _terminate(proc, grace_s=INTERRUPT_GRACE_S)
        raise
    finally:
        # Runs on success, crash, timeout, KeyboardInterrupt and any exception alike.
        survivors = _kill_everything(proc, tree)
        if survivors:
            _progress(f"BUG: processes survived cleanup: {survivors}")

    elapsed = time.monotonic() - start
    failed, root_cause = _parse_failures(_read_text(log_dir / "torchrun.log"))
    for rank, text in _read_stacks(stack_dir).items():
        stacks.setdefault(rank, text)  # fatal-signal or self-destruct dumps of crashed ranks
    result = LaunchResult(
        status=status,
        returncode=returncode,
        elapsed_s=elapsed,
        log_dir=log_dir,
        hung_ranks=hung,
        stacks=stacks if status != "ok" else {},
        survivors=survivors,
        failed_ranks=failed if status == "crash" else {},
        root_cause_ranks=root_cause if status == "crash" else [],
        rank_logs=_find_rank_logs(log_dir / "ranks"),
        timeout_s=timeout_s,
    )
    _progress(f"done: {status} in {elapsed:.1f}s")
    return result


# --------------------------------------------------------------------------------------------
# Watchdog steps


def _wait(proc: subprocess.Popen, tree: _ProcessTree, deadline: float) -> int | None:
    """torchrun's return code, or None at the deadline; remembers descendants while waiting."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            return proc.wait(timeout=min(POLL_S, remaining))
        except subprocess.TimeoutExpired:
            tree.refresh()


def _dump_stacks(tree: _ProcessTree, stack_dir: Path) -> tuple[list[int], dict[int, str]]:
    """SIGUSR1 every live rank that has installed its handler; return (hung ranks, stacks).

    Ranks without a pid file are not signalled: without the faulthandler registration SIGUSR1's
    default action kills the process and we would learn nothing.
    """
    table = tree.refresh(scan_env=True)
    ranks = tree.rank_pids(table)
    offsets: dict[int, int] = {}
    stacks: dict[int, str] = {}
    for rank, pid in sorted(ranks.items()):
        if _read_pid(pid_file(stack_dir, rank)) != pid:
            stacks[rank] = f"<no stack: rank {rank} (pid {pid}) never reached init_rank(); not signalled>"
            continue
        path = stack_file(stack_dir, rank)
        offsets[rank] = path.stat().st_size if path.exists() else 0
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            del offsets[rank]

    # A dump is complete once its file has grown and then stopped growing.
    sizes = dict.fromkeys(offsets, -1)
    give_up = time.monotonic() + STACK_WAIT_S
    while offsets and time.monotonic() < give_up:
        time.sleep(0.2)
        now = {r: _size(stack_file(stack_dir, r)) for r in offsets}
        if all(now[r] > offsets[r] and now[r] == sizes[r] for r in offsets):
            break
        sizes = now
    for rank, offset in offsets.items():
        text = _read_text(stack_file(stack_dir, rank))[offset:]
        stacks[rank] = text if text.strip() else f"<no stack: rank {rank} did not answer SIGUSR1>"
    return sorted(ranks), stacks


def _terminate(proc: subprocess.Popen, grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM the guardian's group (guardian and torchrun) and give torchrun a grace period to shut
    its workers down itself (each dumps its stack on SIGTERM)."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass


def _kill_everything(proc: subprocess.Popen, tree: _ProcessTree) -> list[int]:
    """SIGKILL every process of this launch still alive; return the survivors.

    Deepest first, the guardian last: if this process is itself killed half-way, the guardian is
    still there to finish the job (it is the subreaper of whatever we did not reach).
    """
    tree.refresh(scan_env=True)
    tree.signal_all(signal.SIGKILL, skip=(proc.pid,))
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGKILL)
    tree.signal_all(signal.SIGKILL)
    try:
        proc.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        pass
    give_up = time.monotonic() + KILL_WAIT_S
    while True:
        # Re-scan: a process forked between the snapshot and the kill is caught here.
        tree.refresh(scan_env=True)
        alive = tree.alive()
        if not alive or time.monotonic() > give_up:
            return alive
        tree.signal_all(signal.SIGKILL)
        time.sleep(0.1)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def guarded(cmd: list[str]) -> list[str]:
    """``cmd`` (torchrun) run under the guardian, which outlives an abrupt end of this process.

    The guardian (:mod:`parity.harness._guardian`) gets SIGTERM when the launcher dies
    (PR_SET_PDEATHSIG), is the subreaper of torchrun's ranks (so orphans stay findable), forwards
    SIGTERM to torchrun and SIGKILLs every descendant after :data:`GUARD_GRACE_S`. It covers the
    exits no ``finally`` sees: the launcher SIGKILLed, ``os._exit``-ed (pytest-timeout's thread
    method), or killed by nox 0.5 s into a Ctrl-C. ``python -S``: standard library only, fast start.
    """
    return [sys.executable, "-S", str(GUARDIAN), str(os.getpid()), f"{GUARD_GRACE_S:g}", "--", *cmd]


# --------------------------------------------------------------------------------------------
# Process bookkeeping (psutil when importable, else /proc)


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    started: float  # start stamp; (pid, started) identifies a process across pid reuse
    zombie: bool


def _process_table() -> dict[int, _Proc]:
    if psutil is not None:
        table = {}
        for p in psutil.process_iter(["ppid", "create_time", "status"]):
            info = p.info
            if info["ppid"] is None or info["create_time"] is None:
                continue
            table[p.pid] = _Proc(p.pid, info["ppid"], info["create_time"], info["status"] == "zombie")
        return table
    return _process_table_procfs()


def _process_table_procfs() -> dict[int, _Proc]:
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after "(comm)": state ppid ... starttime is the 20th (field 22 of proc(5)).
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = _Proc(int(entry), int(fields[1]), float(fields[19]), fields[0] == "Z")
    return table


def _environ(pid: int) -> dict[str, str]:
    if psutil is not None:
        try:
            return psutil.Process(pid).environ()
        except psutil.Error:
            return {}
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _descendants(table: dict[int, _Proc], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class _ProcessTree:
    """Every process this launch started, remembered for the whole run.

    The snapshot is kept (not recomputed at kill time) because by then torchrun may be dead and
    its workers re-parented to init, where a fresh tree walk can no longer see them.
    """

    def __init__(self, root: int, launch_id: str, stack_dir: Path) -> None:
        self.root = root
        self.launch_id = launch_id
        self.stack_dir = stack_dir
        self.known: dict[int, float] = {}

    def refresh(self, *, scan_env: bool = False) -> dict[int, _Proc]:
        table = _process_table()
        if self.root in table:
            self.known.setdefault(self.root, table[self.root].started)
        for pid in _descendants(table, self.root):
            self.known.setdefault(pid, table[pid].started)
        if scan_env:
            me = os.getpid()
            for pid, p in table.items():
                if pid not in self.known and pid != me and not p.zombie:
                    if _environ(pid).get(ENV_LAUNCH_ID) == self.launch_id:
                        self.known[pid] = p.started
        return table

    def alive(self, table: dict[int, _Proc] | None = None) -> list[int]:
        table = _process_table() if table is None else table
        return sorted(
            pid
            for pid, started in self.known.items()
            if pid in table and table[pid].started == started and not table[pid].zombie
        )

    def signal_all(self, sig: int, skip: Iterable[int] = ()) -> None:
        skipped = set(skip)
        for pid in self.alive():
            if pid in skipped:
                continue
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def rank_pids(self, table: dict[int, _Proc]) -> dict[int, int]:
        """rank -> pid of each live rank: from init_rank's pid files, else torchrun's children's RANK."""
        alive = set(self.alive(table))
        ranks: dict[int, int] = {}
        for pid_file in self.stack_dir.glob("rank_*.pid"):
            pid = _read_pid(pid_file)
            if pid in alive:
                ranks[int(pid_file.stem.removeprefix("rank_"))] = pid
        # Ranks are torchrun's children (the guardian's grandchildren), or the guardian's own
        # children once torchrun died (it is their subreaper); torchrun itself has no RANK.
        parents = {self.root} | {pid for pid in alive if table[pid].ppid == self.root}
        for pid in alive:
            if table[pid].ppid in parents and pid not in ranks.values():
                rank = _environ(pid).get("RANK")
                if rank is not None and rank.isdigit():
                    ranks.setdefault(int(rank), pid)
        return ranks


# --------------------------------------------------------------------------------------------
# Reading what the run left behind


def _parse_failures(torchrun_output: str) -> tuple[dict[int, int], list[int]]:
    """(rank -> exit code, root-cause ranks) from torchrun's ChildFailedError report."""
    failed: dict[int, int] = {}
    root: list[int] = []
    marker = "Root Cause"
    root_at = torchrun_output.rfind(marker)
    for m in _FAILURE_RE.finditer(torchrun_output):
        rank = int(m["rank"])
        failed[rank] = int(m["code"])
        if root_at != -1 and m.start() > root_at and rank not in root:
            root.append(rank)
    return failed, root


def _find_rank_logs(torchrun_log_dir: Path) -> dict[int, Path]:
    """local rank -> directory with its stdout.log/stderr.log, from the newest job and attempt."""
    attempts = sorted(torchrun_log_dir.glob("*/attempt_*"), key=lambda p: p.stat().st_mtime)
    if not attempts:
        return {}
    return {int(d.name): d for d in attempts[-1].iterdir() if d.is_dir() and d.name.isdigit()}


def _read_stacks(stack_dir: Path) -> dict[int, str]:
    stacks = {}
    for path in stack_dir.glob("rank_*.txt"):
        text = _read_text(path)
        if text.strip():
            stacks[int(path.stem.removeprefix("rank_"))] = text
    return stacks


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tail(text: str, n: int = TAIL_LINES) -> list[str]:
    return text.rstrip().splitlines()[-n:]


_FRAME_RE = re.compile(r'File "[^"]*", line \d+ in (?P<name>\S+)')


def _innermost(stack: str) -> str:
    """The innermost Python function of a faulthandler dump (of the thread that took the signal)."""
    text = stack
    current = stack.rfind("Current thread")
    if current != -1:
        text = stack[current:]
    match = _FRAME_RE.search(text)
    return match["name"] if match else "an unknown place (no stack)"


_RANK_PREFIX_RE = re.compile(r"^\[(?:default)?rank\d+\]:[ ]?", re.MULTILINE)


def _exception_line(stderr: str) -> str | None:
    """``ExceptionType: message`` of the last Python traceback in a rank's stderr, if any (torchrun's
    ``[rankN]:`` line prefixes removed)."""
    text = _RANK_PREFIX_RE.sub("", stderr)
    at = text.rfind("Traceback (most recent call last):")
    if at == -1:
        return None
    for line in text[at:].splitlines()[1:]:
        if line.strip() and not line[0].isspace():
            return line.strip()[:300]
    return None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _progress(message: str) -> None:
    print(f"[parity.launch] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# CLI


def _parse_args(argv: Iterable[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    if "--" not in argv:
        raise SystemExit(
            "usage: python -m parity.launch [options] -- <script or -m module> [args...]"
        )
    split = argv.index("--")
    parser = argparse.ArgumentParser(
        prog="python -m parity.launch", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--nproc", type=int, required=True, help="ranks per node")
    parser.add_argument("--timeout", type=float, required=True, help="watchdog timeout, seconds")
    parser.add_argument("--log-dir", type=Path, required=True)
    parser.add_argument("--pg-timeout", type=float, default=None, help="process-group timeout, seconds")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--rdzv-endpoint", default=None)
    parser.add_argument("--node-rank", type=int, default=None)
    args = parser.parse_args(argv[:split])
    job = argv[split + 1 :]
    if not job:
        parser.error("nothing to run after --")
    return args, job


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through launch()'s finally, which kills the job


def install_signal_handlers() -> None:
    """Own SIGINT and SIGTERM whatever was inherited.

    A process started with SIGINT ignored (``nohup``, a background job of a non-interactive shell,
    many CI runners) inherits SIG_IGN, and Python then installs no KeyboardInterrupt handler: a
    Ctrl-C or ``kill -INT`` would be dropped and the job left running. Both signals unwind through
    :func:`launch`, which forwards SIGTERM to torchrun and sweeps every descendant.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)


def main(argv: Sequence[str] | None = None) -> int:
    args, job = _parse_args(sys.argv[1:] if argv is None else argv)
    install_signal_handlers()
    env = {ENV_PG_TIMEOUT: f"{args.pg_timeout:g}"} if args.pg_timeout is not None else None
    try:
        result = launch(
            job,
            nproc=args.nproc,
            timeout_s=args.timeout,
            log_dir=args.log_dir,
            env=env,
            nnodes=args.nnodes,
            rdzv_endpoint=args.rdzv_endpoint,
            node_rank=args.node_rank,
        )
    except KeyboardInterrupt:
        # launch() has already killed the job on its way out.
        _progress("interrupted; job killed")
        return 128 + signal.SIGINT
    print(result.summary(), flush=True)
    if result.status == "ok" and not result.survivors:
        return EXIT_OK
    return EXIT_TIMEOUT if result.status == "timeout" else EXIT_CRASH


if __name__ == "__main__":
    sys.exit(main())
