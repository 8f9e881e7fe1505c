"""parity.harness.launch: a hang fails fast, says where each rank was, and leaves no process behind.

Every guard is paired with a run where it must not fire (the ok worker, the PG-timeout run that
must not reach the watchdog, the escaped-session negative control), so a launcher that always
says "timeout" or always kills everything cannot pass. Real torchrun + 2 gloo ranks on CPU.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from parity.harness import launch as launch_mod
from parity.harness.launch import EXIT_CRASH, EXIT_OK, EXIT_TIMEOUT, LaunchResult, free_port, launch

REPO = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).resolve().parent / "workers"

HANG_TIMEOUT_S = 20.0  # > rank start-up (~6 s on 2 cores), so both ranks reach their hang points


def _env(**extra: str) -> dict[str, str]:
    """Ranks must import parity from this checkout, installed or not."""
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, **extra}


def _run(tmp_path: Path, worker: str, timeout_s: float, **env: str) -> LaunchResult:
    return launch(
        [str(WORKERS / worker)], nproc=2, timeout_s=timeout_s, log_dir=tmp_path / "logs", env=_env(**env)
    )


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _assert_nothing_left(result: LaunchResult) -> None:
    """Independent of the launcher's own bookkeeping: rank pids and anything naming the log dir."""
    assert result.survivors == []
    rank_pids = [int(p.read_text()) for p in (result.log_dir / "stacks").glob("rank_*.pid")]
    assert [pid for pid in rank_pids if _alive(pid)] == []
    marker = str(result.log_dir)
    leftovers = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if marker in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            leftovers.append((proc.pid, cmdline))
    assert leftovers == []


def _rank_log(result: LaunchResult, rank: int, name: str = "stderr.log") -> str:
    return (result.rank_logs[rank] / name).read_text()


@pytest.mark.distributed
@pytest.mark.timeout(60, method="thread")
def test_ok_all_reduce(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")  # must reach the ranks exactly as inherited
    result = _run(tmp_path, "ok.py", timeout_s=60)
    assert result.status == "ok", result.summary()
    assert result.returncode == EXIT_OK
    assert result.hung_ranks == [] and result.stacks == {} and result.failed_ranks == {}
    for rank in (0, 1):
        out = _rank_log(result, rank, "stdout.log")
        assert "all_reduce ok: 3.0" in out
        assert "env PARITY_PG_TIMEOUT_S=30" in out  # default: half the launcher timeout
        assert "env NCCL_NVLS_ENABLE=0" in out
        assert "env TORCH_NCCL_ASYNC_ERROR_HANDLING=3" in out
    assert result.summary().startswith("parity.launch: OK")
    _assert_nothing_left(result)


@pytest.mark.distributed
@pytest.mark.timeout(60, method="thread")
def test_crash_reports_failing_rank(tmp_path: Path) -> None:
    result = _run(tmp_path, "crash.py", timeout_s=60)
    assert result.status == "crash", result.summary()
    assert result.returncode != 0
    assert result.root_cause_ranks == [1]
    assert result.failed_ranks[1] == 1
    assert "deliberate crash on rank 1" in result.summary()
    assert result.cause() == (
        "rank 1 raised RuntimeError: parity-test: deliberate crash on rank 1 (exit code 1) (first failure)"
    )
    assert result.hung_ranks == []
    _assert_nothing_left(result)


@pytest.mark.distributed
@pytest.mark.timeout(60, method="thread")
def test_rank_killed_by_signal_is_not_ok(tmp_path: Path) -> None:
    result = _run(tmp_path, "sigkill.py", timeout_s=60)
    assert result.status == "crash", result.summary()
    assert result.returncode != 0
    assert result.failed_ranks[1] == -signal.SIGKILL
    assert "rank 1: killed by SIGKILL" in result.summary()
    assert result.cause() == "rank 1 killed by SIGKILL (first failure)"
    _assert_nothing_left(result)


@pytest.mark.distributed
@pytest.mark.timeout(HANG_TIMEOUT_S + 40, method="thread")
def test_hang_watchdog_dumps_every_rank_and_kills_all(tmp_path: Path) -> None:
    # PG timeout far above the launcher's, so only the watchdog can end this run.
    result = _run(tmp_path, "hang.py", timeout_s=HANG_TIMEOUT_S, PARITY_PG_TIMEOUT_S="600")
    summary = result.summary()
    assert result.status == "timeout", summary
    assert result.returncode == EXIT_TIMEOUT
    assert result.hung_ranks == [0, 1]
    assert sorted(result.stacks) == [0, 1]
    # Each rank's stack names the function it was stuck in, and only that one.
    assert "block_in_all_reduce" in result.stacks[0] and "in all_reduce" in result.stacks[0]
    assert "sleep_forever" in result.stacks[1]
    assert "sleep_forever" not in result.stacks[0] and "block_in_all_reduce" not in result.stacks[1]
    assert "hung ranks (alive at the deadline): [0, 1]" in summary
    assert result.cause().startswith("timeout after 20s: ranks [0, 1] hung (rank 0 in ")
    assert "rank 1 in sleep_forever" in result.cause()
    assert HANG_TIMEOUT_S <= result.elapsed_s < HANG_TIMEOUT_S + 15
    _assert_nothing_left(result)


@pytest.mark.distributed
@pytest.mark.timeout(150, method="thread")
def test_pg_timeout_fires_before_watchdog(tmp_path: Path) -> None:
    # Same hang, but the collective layer's timeout is far below the launcher's.
    # A generous watchdog costs nothing when the PG timeout works, and keeps a loaded machine's
    # slow start-up from being mistaken for a watchdog firing.
    result = _run(tmp_path, "hang.py", timeout_s=120, PARITY_PG_TIMEOUT_S="3")
    assert result.status == "crash", result.summary()
    assert result.root_cause_ranks == [0]
    assert "timed out" in _rank_log(result, 0).lower()
    assert result.cause().startswith("rank 0 raised RuntimeError: ") and "timed out" in result.cause().lower()
    assert result.elapsed_s < 60  # nowhere near the 120 s watchdog
    assert result.hung_ranks == [] and result.returncode != EXIT_TIMEOUT
    _assert_nothing_left(result)


def _ignore_sigint() -> None:
    """How nohup'ed and background jobs of a non-interactive shell start: SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _job_processes(log_dir: Path) -> list[int]:
    """Every live process of the job under ``log_dir``, found independently of the launcher:
    by command line (torchrun, the guardian's argv) or by the stack dir the ranks inherited."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])
        try:
            stack_dir = proc.environ().get("PARITY_STACK_DIR", "")
        except psutil.Error:
            stack_dir = ""
        if str(log_dir) in cmdline or stack_dir.startswith(str(log_dir)):
            found.append(proc.pid)
    return found


def _wait_for_ranks(log_dir: Path, owner: subprocess.Popen, give_up_s: float = 40) -> list[int]:
    pid_files = [log_dir / "stacks" / f"rank_{r}.pid" for r in (0, 1)]
    give_up = time.monotonic() + give_up_s
    while not all(p.exists() and p.read_text().strip() for p in pid_files):
        assert time.monotonic() < give_up, "ranks never started"
        assert owner.poll() is None, owner.communicate()[0]
        time.sleep(0.2)
    return [int(p.read_text()) for p in pid_files]


def _gone_within(log_dir: Path, seconds: float, since: float) -> tuple[list[int], float]:
    """(processes still alive at ``since + seconds``, when the last one disappeared)."""
    while True:
        left = _job_processes(log_dir)
        now = time.monotonic()
        if not left or now - since > seconds:
            return left, now - since
        time.sleep(0.05)


@pytest.mark.distributed
@pytest.mark.timeout(90, method="thread")
@pytest.mark.parametrize(
    ("start", "sig"),
    [("normal", signal.SIGINT), ("sigint_ignored", signal.SIGINT)],
    ids=["normal-SIGINT", "sigint_ignored-SIGINT"],
)
def test_cli_interrupt_kills_the_job(tmp_path: Path, start: str, sig: int) -> None:
    """Ctrl-C / kill on the CLI: torchrun is in its own session and never sees it; we must forward it.

    ``sigint_ignored`` is how nohup and CI runners start jobs: the CLI inherits SIGINT ignored, and
    must install its own handler anyway (it used to drop the signal and run on to its timeout).
    """
    log_dir = tmp_path / "logs"
    cmd = [sys.executable, "-m", "parity.launch", "--nproc", "2", "--timeout", "120", "--pg-timeout", "600",
           "--log-dir", str(log_dir), "--", str(WORKERS / "hang.py")]  # fmt: skip
    cli = subprocess.Popen(
        cmd,
        env={**os.environ, **_env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_ignore_sigint if start == "sigint_ignored" else None,
    )
    try:
        rank_pids = _wait_for_ranks(log_dir, cli)
        assert all(_alive(pid) for pid in rank_pids)
        sent = time.monotonic()
        cli.send_signal(sig)
        out, _ = cli.communicate(timeout=20)
        left, took = _gone_within(log_dir, 2.0, sent)
    finally:
        if cli.poll() is None:
            cli.kill()
    name = signal.Signals(sig).name
    print(f"[launch] {start} + {name}: CLI exit {cli.returncode}, job gone {took:.2f}s after the signal")
    assert cli.returncode == 128 + sig, out
    assert [pid for pid in rank_pids if _alive(pid)] == []
    assert left == [], f"alive {took:.1f}s after {signal.Signals(sig).name}: {left}\n{out.decode()}"
    # Forwarded, not only swept: torchrun passed SIGTERM on and every rank dumped its stack.
    for rank in (0, 1):
        assert "File " in (log_dir / "stacks" / f"rank_{rank}.txt").read_text(), out.decode()


_FAKE_CLI = """
import sys
from parity.harness import launch as L
agent, pids_file, log_dir = sys.argv[1:4]
L.torchrun_command = lambda args, **kw: [sys.executable, agent, pids_file, "--log-dir", log_dir]
sys.exit(L.main(["--nproc", "2", "--timeout", "120", "--log-dir", log_dir, "--", "x.py"]))
"""


@pytest.mark.timeout(30, method="thread")
def test_cli_sigterm_started_with_sigint_ignored_kills_the_job(tmp_path: Path) -> None:
    """SIGTERM (kill, CI cancelling a job) on the CLI, torchrun replaced by an agent that ignores
    SIGTERM: the CLI exits 143 and nothing is left 2 s later (its sweep and the guardian)."""
    pids_file, log_dir = tmp_path / "pids", tmp_path / "logs"
    cli = subprocess.Popen(
        [sys.executable, "-c", _FAKE_CLI, str(WORKERS / "fake_agent.py"), str(pids_file), str(log_dir)],
        env={**os.environ, **_env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_ignore_sigint,
    )
    pids: list[int] = []
    try:
        give_up = time.monotonic() + 15
        while not pids_file.exists():
            assert time.monotonic() < give_up and cli.poll() is None, "fake agent never started"
            time.sleep(0.05)
        pids = [int(p) for p in pids_file.read_text().split()]
        sent = time.monotonic()
        cli.terminate()
        out, _ = cli.communicate(timeout=15)
        while any(_alive(p) for p in pids) and time.monotonic() - sent < 2.0:
            time.sleep(0.05)
        assert cli.returncode == 128 + signal.SIGTERM, out
        assert [p for p in pids if _alive(p)] == [], out.decode()
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


_IN_PROCESS_LAUNCHER = """
import sys
from pathlib import Path
from parity.harness.launch import launch
launch([sys.argv[1]], nproc=2, timeout_s=120, log_dir=Path(sys.argv[2]), env={"PARITY_PG_TIMEOUT_S": "600"})
"""


@pytest.mark.distributed
@pytest.mark.timeout(90, method="thread")
def test_nox_ctrl_c_leaves_nothing_alive_after_2s(tmp_path: Path) -> None:
    """What nox does on Ctrl-C to the pytest it runs (in which launch() runs in-process): SIGINT,
    then SIGTERM 0.3 s later, SIGKILL 0.2 s after that, cutting the launcher's cleanup short. The
    guardian finishes it: no process of the job is alive 2 s after the Ctrl-C."""
    log_dir = tmp_path / "logs"
    owner = subprocess.Popen(
        [sys.executable, "-c", _IN_PROCESS_LAUNCHER, str(WORKERS / "hang.py"), str(log_dir)],
        env={**os.environ, **_env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for_ranks(log_dir, owner)
        sent = time.monotonic()
        owner.send_signal(signal.SIGINT)
        time.sleep(0.3)  # nox.popen.DEFAULT_INTERRUPT_TIMEOUT
        owner.terminate()
        time.sleep(0.2)  # nox.popen.DEFAULT_TERMINATE_TIMEOUT
        owner.kill()
        owner.wait(timeout=10)
        left, took = _gone_within(log_dir, 2.0, sent)
    finally:
        if owner.poll() is None:
            owner.kill()
    print(f"[launch] nox-style Ctrl-C: job gone {took:.2f}s after SIGINT")
    assert left == [], f"alive {took:.1f}s after the Ctrl-C: {left}"


_FAKE_LAUNCHER = """
import sys
from pathlib import Path
from parity.harness import launch as L
agent, pids_file, log_dir, guarded = sys.argv[1:5]
L.torchrun_command = lambda args, **kw: [sys.executable, agent, pids_file, "--log-dir", log_dir]
if guarded == "0":
    L.guarded = lambda cmd: cmd  # the negative control: torchrun started without its guardian
L.launch(["x.py"], nproc=2, timeout_s=120, log_dir=Path(log_dir))
"""


@pytest.mark.timeout(30, method="thread")
@pytest.mark.parametrize("guarded", [True, False], ids=["guardian", "no_guardian_negative_control"])
def test_launcher_sigkilled_leaves_nothing_behind(tmp_path: Path, guarded: bool) -> None:
    """The launcher dies with no chance to clean up (SIGKILL, os._exit); the "torchrun" ignores
    SIGTERM and its "ranks" run in their own sessions. With the guardian all of them are gone within
    2 s; without it (negative control) they all survive, so the guardian is what did it."""
    pids_file = tmp_path / "pids"
    owner = subprocess.Popen(
        [sys.executable, "-c", _FAKE_LAUNCHER, str(WORKERS / "fake_agent.py"), str(pids_file),
         str(tmp_path / "logs"), "1" if guarded else "0"],
        env={**os.environ, **_env()},
    )  # fmt: skip
    pids: list[int] = []
    try:
        give_up = time.monotonic() + 15
        while not pids_file.exists():
            assert time.monotonic() < give_up and owner.poll() is None, "fake agent never started"
            time.sleep(0.05)
        pids = [int(p) for p in pids_file.read_text().split()]
        killed = time.monotonic()
        owner.kill()
        owner.wait(timeout=10)
        while any(_alive(p) for p in pids) and time.monotonic() - killed < 2.0:
            time.sleep(0.05)
        alive = [p for p in pids if _alive(p)]
        if guarded:
            took = time.monotonic() - killed
            assert alive == [], f"alive {took:.1f}s after the launcher's SIGKILL: {alive}"
        else:
            assert alive == pids, "negative control: without the guardian these should have survived"
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_guardian_mirrors_the_exit_status_and_reaps_orphans(tmp_path: Path) -> None:
    """Exit code and death-by-signal of the supervised command reach the launcher unchanged, and what
    the command left behind in another session is killed (the guardian is its subreaper)."""
    guardian = [sys.executable, "-S", str(launch_mod.GUARDIAN), str(os.getpid()), "1", "--"]
    assert subprocess.run([*guardian, sys.executable, "-c", "raise SystemExit(3)"]).returncode == 3
    killed = subprocess.run([*guardian, sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"])
    assert killed.returncode == -signal.SIGKILL
    leak = tmp_path / "orphan.pid"
    leaver = (
        "import subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
        "start_new_session=True); "
        f"open({str(leak)!r}, 'w').write(str(p.pid))"
    )
    assert subprocess.run([*guardian, sys.executable, "-c", leaver], timeout=20).returncode == 0
    orphan = int(leak.read_text())
    give_up = time.monotonic() + 5
    while _alive(orphan) and time.monotonic() < give_up:
        time.sleep(0.05)
    try:
        assert not _alive(orphan)
    finally:
        if _alive(orphan):
            os.kill(orphan, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------
# Fast checks without torchrun


_ESCAPER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(30, method="thread")
@pytest.mark.parametrize("use_psutil", [True, False], ids=["psutil", "procfs"])
def test_sweep_reaches_processes_in_their_own_session(
    use_psutil: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What torchrun does to its workers, reproduced in miniature: a grandchild in a new session."""
    if not use_psutil:
        monkeypatch.setattr(launch_mod, "psutil", None)
    launch_id = "test-sweep"
    env = {**os.environ, launch_mod.ENV_LAUNCH_ID: launch_id}
    parent = subprocess.Popen([sys.executable, "-c", _ESCAPER], env=env, stdout=subprocess.PIPE,
                              start_new_session=True, text=True)  # fmt: skip
    grandchild = int(parent.stdout.readline())
    try:
        tree = launch_mod._ProcessTree(parent.pid, launch_id, Path("/nonexistent"))
        tree.refresh()
        assert grandchild in tree.known
        # Negative control: killing the parent's process group does not reach the grandchild ...
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        time.sleep(0.2)
        assert _alive(grandchild)
        # ... and a fresh tree walk from the (dead) parent cannot find it any more; the sweep can.
        assert grandchild not in launch_mod._descendants(launch_mod._process_table(), parent.pid)
        assert launch_mod._kill_everything(parent, tree) == []
        assert not _alive(grandchild)
    finally:
        if _alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


@pytest.mark.timeout(30, method="thread")
def test_sweep_finds_orphans_by_launch_marker() -> None:
    """A process that was never seen in the tree (re-parented before the first poll) is found by env."""
    launch_id = "test-marker"
    env = {**os.environ, launch_mod.ENV_LAUNCH_ID: launch_id}
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env)
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    root = subprocess.Popen([sys.executable, "-c", "pass"])
    root.wait()
    try:
        tree = launch_mod._ProcessTree(root.pid, launch_id, Path("/nonexistent"))
        assert launch_mod._kill_everything(root, tree) == []
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert unrelated.poll() is None  # negative control: the sweep is not indiscriminate
    finally:
        for proc in (orphan, unrelated):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


_FAKE_AGENT = """
import os, subprocess, sys, time
rank0 = '''
import faulthandler, os, signal, sys, time
faulthandler.register(signal.SIGUSR1, file=open(sys.argv[1] + "/rank_0.txt", "a"), all_threads=True)
open(sys.argv[1] + "/rank_0.pid", "w").write(str(os.getpid()))
def waiting_here():
    time.sleep(600)
waiting_here()
'''
rank1 = "import time; time.sleep(600)"  # never installs a handler, like a rank still importing torch
for rank, code in enumerate((rank0, rank1)):
    subprocess.Popen([sys.executable, "-c", code, sys.argv[1]], env={**os.environ, "RANK": str(rank)},
                     start_new_session=True)
time.sleep(600)
"""


@pytest.mark.timeout(30, method="thread")
def test_dump_stacks_signals_only_ranks_with_a_handler(tmp_path: Path) -> None:
    """SIGUSR1 kills a process without the faulthandler registration, so such ranks are skipped."""
    agent = subprocess.Popen([sys.executable, "-c", _FAKE_AGENT, str(tmp_path)], start_new_session=True)
    tree = launch_mod._ProcessTree(agent.pid, "test-dump", tmp_path)
    try:
        give_up = time.monotonic() + 15
        while (
            len(launch_mod._descendants(launch_mod._process_table(), agent.pid)) < 2
            or not (tmp_path / "rank_0.pid").exists()
        ):
            assert time.monotonic() < give_up
            time.sleep(0.1)
        tree.refresh()
        ranks = tree.rank_pids(launch_mod._process_table())
        hung, stacks = launch_mod._dump_stacks(tree, tmp_path)
        assert hung == [0, 1]
        assert "waiting_here" in stacks[0]
        assert "never reached init_rank" in stacks[1]
        assert _alive(ranks[1])  # not killed by an unhandled SIGUSR1
    finally:
        assert launch_mod._kill_everything(agent, tree) == []


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_torchrun_command_single_and_multi_node(tmp_path: Path) -> None:
    single = launch_mod.torchrun_command(["-m", "pkg.mod", "--x"], nproc=2, log_dir=tmp_path)
    assert single[1:3] == ["-m", "torch.distributed.run"]
    assert single[-3:] == ["-m", "pkg.mod", "--x"]
    assert single[single.index("--rdzv-endpoint") + 1].startswith("localhost:")
    multi = launch_mod.torchrun_command(
        ["train.py"], nproc=8, log_dir=tmp_path, nnodes=2, rdzv_endpoint="node0:29500", node_rank=1
    )
    for flag, value in (("--nnodes", "2"), ("--rdzv-endpoint", "node0:29500"), ("--node-rank", "1")):
        assert multi[multi.index(flag) + 1] == value
    with pytest.raises(ValueError):
        launch_mod.torchrun_command(["train.py"], nproc=8, log_dir=tmp_path, nnodes=2)


def test_rank_env_defaults_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # known to break flight-recorder dumps
    env = launch_mod.rank_env(tmp_path, 60, "id", {"PARITY_PG_TIMEOUT_S": "5"})
    assert env["PARITY_PG_TIMEOUT_S"] == "5"
    assert float(env["PARITY_RANK_TIMEOUT_S"]) > 60
    assert env["NCCL_NVLS_ENABLE"] == "1"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "fr" / "rank_")
    assert launch_mod.rank_env(tmp_path, 60, "id", None)["PARITY_PG_TIMEOUT_S"] == "30"
    # capped: a hang in a long job is still reported a minute after it begins
    assert launch_mod.rank_env(tmp_path, 900, "id", None)["PARITY_PG_TIMEOUT_S"] == "60"


@pytest.mark.parametrize(
    ("status", "survivors", "exit_code"),
    [
        ("ok", [], EXIT_OK),
        ("ok", [4242], EXIT_CRASH),
        ("crash", [], EXIT_CRASH),
        ("timeout", [], EXIT_TIMEOUT),
    ],
)
def test_cli_exit_codes(
    status: str, survivors: list[int], exit_code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = LaunchResult(status, 0, 1.0, tmp_path, [], {}, survivors)
    monkeypatch.setattr(launch_mod, "launch", lambda *a, **k: fake)
    monkeypatch.setattr(launch_mod.signal, "signal", lambda *a: None)
    assert (
        launch_mod.main(["--nproc", "2", "--timeout", "5", "--log-dir", str(tmp_path), "--", "x.py"])
        == exit_code
    )
