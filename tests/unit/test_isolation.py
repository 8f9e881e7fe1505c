"""A crash or hang in one model's mode is that mode's verdict; the other modes and models still run.

The faults are planted in the child process from here (``PARITY_FAULT``, tests/unit/workers/plants.py);
the negative control runs the same abort without isolation and shows it takes the run down.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from parity.harness import isolate  # noqa: E402
from parity.harness.patch_runner import RunSettings, run_case  # noqa: E402
from parity.results import merge, registry  # noqa: E402
from parity.results.modes import ModelMode  # noqa: E402
from parity.results.records import (  # noqa: E402
    RunManifest,
    Tolerance,  # noqa: E402, run_manifest_path, write_json_atomic
    run_manifest_path,
    write_json_atomic,
)

ROOT = Path(__file__).resolve().parents[2]
PLANTS = "tests.unit.workers.plants"
MODES = [ModelMode("hf", "eager"), ModelMode("hf", "sdpa"), ModelMode("parity", "parity_sdpa_with_sp")]


def _run(model: str, results: Path, isolated: bool = True) -> list[dict]:
    case = registry.case(model)
    settings = RunSettings("eager", torch.device("cpu"), torch.float32, results)
    tolerance = Tolerance(case.rtol, case.atol)
    return run_case(model, case.config, MODES, tolerance, settings, case=case, isolate=isolated)


def _verdicts(results: Path) -> dict[tuple[str, str], tuple[str, str]]:
    # the session's manifest (a results file no manifest lists is refused as stale)
    files = (results / "patch" / "eager").glob("*.json")
    models = sorted(p.stem for p in files if not p.name.startswith("_"))
    write_json_atomic(
        run_manifest_path(results, "patch", "eager"), RunManifest("patch", "eager", models, "ran").to_json()
    )
    report = merge.merge(results, suites=["patch"])
    print(merge.render_table(report.rows))
    return {(r.model, r.mode): (r.verdict, r.detail) for r in report.rows}


def test_crash_hang_and_cuda_error_stay_in_their_mode(tmp_path, monkeypatch):
    """One multi-model run through the persistent worker: an abort (llama), a hang (qwen2), a
    device-side assert (seed_oss) and a harness bug (qwen3) are each their mode's verdict; the worker
    is replaced after the first three (not after the harness bug), the rest of each model and the
    NEXT model still get their verdicts, and a worker serves several models in a row."""
    plants = ("abort_llama_sdpa", "hang_qwen2_sdpa", "cuda_error_seed_oss_sdpa", "harness_bug_qwen3_sdpa")
    monkeypatch.setenv("PARITY_FAULT", ",".join(f"{PLANTS}:{p}" for p in plants))
    monkeypatch.setenv("PARITY_MODE_TIMEOUT_S", "12")
    before = len(isolate.POOL.started)
    models = ("llama", "qwen2", "seed_oss", "qwen3")
    for model in models:
        monkeypatch.setenv("PYTEST_CURRENT_TEST", f"a test of {model}")  # pytest's: must not restart it
        _run(model, tmp_path)
    v = _verdicts(tmp_path)
    assert v[("llama", "hf_attn-sdpa")][0] == "ERROR" and "SIGABRT" in v[("llama", "hf_attn-sdpa")][1]
    assert v[("qwen2", "hf_attn-sdpa")][0] == "TIMEOUT"
    assert v[("seed_oss", "hf_attn-sdpa")][0] == "ERROR"
    assert "device-side assert triggered" in v[("seed_oss", "hf_attn-sdpa")][1]
    assert v[("qwen3", "hf_attn-sdpa")][0] == "TOOL-ERROR"
    for model in models:
        assert v[(model, "hf_attn-eager")][0] == "REF"
        assert v[(model, "parity_attn-parity_sdpa_with_sp")][0] == "PASS", v
    started = [why for _, why in isolate.POOL.started[before:]]
    # llama's sdpa kills worker 1; worker 2 runs llama's last mode and qwen2 until the hang; worker 3
    # qwen2's last mode and seed_oss until the CUDA error; worker 4 seed_oss's last mode and all of qwen3
    assert started[1:] == [
        "previous worker died",
        "previous worker hung",
        "CUDA error in seed_oss hf_attn-sdpa",
    ]
    assert len({pid for pid, _ in isolate.POOL.started[before:]}) == 4
    llama = registry.read_json(tmp_path / "patch" / "eager" / "llama.json")
    crashed = next(r for r in llama["records"] if r["mode"]["id"] == "hf_attn-sdpa")
    assert "run_mode" in crashed["error"] and "Fatal Python error: Aborted" in crashed["error"]  # the stack
    # the fresh worker recomputed the reference: the mode after the crash is still compared tensor by tensor
    resumed = next(r for r in llama["records"] if r["mode"]["id"] == "parity_attn-parity_sdpa_with_sp")
    assert resumed["evidence"]["against"] == "hf_attn-eager" and resumed["evidence"]["tensors"]
    qwen2 = registry.read_json(tmp_path / "patch" / "eager" / "qwen2.json")
    hung = next(r for r in qwen2["records"] if r["mode"]["id"] == "hf_attn-sdpa")
    assert "plants.py" in hung["error"] and "12 s" in hung["error"]  # the hung stack


def test_without_isolation_the_abort_takes_the_run_down(tmp_path):
    """Negative control: the same planted abort in-process ends the process; no later mode is recorded."""
    env = {**os.environ, "PARITY_FAULT": f"{PLANTS}:abort_llama_sdpa"}
    code = (
        "import sys; from pathlib import Path; sys.path[:0] = [sys.argv[1]]; "
        "from parity.harness import faults; from parity import settings; "
        "faults.install(settings.get('PARITY_FAULT')); import tests.unit.test_isolation as t; "
        "t._run('llama', Path(sys.argv[2]), isolated=False)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path)], env=env, cwd=ROOT)
    assert proc.returncode < 0  # killed by SIGABRT
    v = _verdicts(tmp_path)
    assert v[("llama", "hf_attn-sdpa")][0] == "MISSING"
    assert v[("llama", "parity_attn-parity_sdpa_with_sp")][0] == "MISSING"


def test_timeouts_scale_with_size(monkeypatch):
    monkeypatch.delenv("PARITY_MODE_TIMEOUT_S", raising=False)
    small = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 1000, "intermediate_size": 128}
    big = {"hidden_size": 2048, "num_hidden_layers": 24, "vocab_size": 128256, "intermediate_size": 8192}
    assert isolate.mode_timeout_s(small, "cuda") == pytest.approx(120, abs=1)
    assert 200 < isolate.mode_timeout_s(big, "cuda") < 260
    monkeypatch.setenv("PARITY_MODE_TIMEOUT_S", "7")
    assert isolate.mode_timeout_s(big, "cuda") == 7


# --------------------------------------------------------------------------------------------
# no orphan: the worker dies with the parent, however the parent dies

PARENT = """
import sys
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/src"]
from parity.harness import isolate
if sys.argv[3] == "unguarded":  # the negative control: the worker's guard patched off from here
    code = ("import sys; from parity.harness import isolate; isolate.guard_parent = lambda pid: None; "
            "sys.exit(isolate.main(sys.argv[1:]))")
    isolate.worker_command = lambda ppid, fd: [sys.executable, "-c", code, "--serve", str(ppid), str(fd)]
import tests.unit.test_isolation as t
t._run("qwen2", Path(sys.argv[2]))
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie is dead; nobody here is its parent to reap it


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _parent_with_busy_worker(tmp_path: Path, guarded: bool) -> tuple[subprocess.Popen, int]:
    """A parent (a stand-in for pytest) whose worker hangs in qwen2's first mode; (parent, worker pid)."""
    env = {**os.environ, "PARITY_FAULT": f"{PLANTS}:hang_qwen2_eager", "PARITY_MODE_TIMEOUT_S": "120"}
    log = (tmp_path / "parent.log").open("w")
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(ROOT), str(tmp_path), "guarded" if guarded else "unguarded"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    pending = tmp_path / "patch" / "eager" / ".qwen2.child" / "pending.json"
    give_up = time.monotonic() + 120
    while not pending.is_file():  # the worker announced the (hanging) first mode
        assert parent.poll() is None and time.monotonic() < give_up, (tmp_path / "parent.log").read_text()
        time.sleep(0.2)
    workers = _children(parent.pid)
    assert len(workers) == 1, workers
    return parent, workers[0]


def _gone_within(pid: int, seconds: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if not _alive(pid):
            return time.monotonic() - start
        time.sleep(0.05)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_worker_dies_with_its_parent(tmp_path, sig):
    parent, worker = _parent_with_busy_worker(tmp_path, guarded=True)
    os.kill(parent.pid, sig)
    parent.wait(timeout=30)
    took = _gone_within(worker, 5.0)
    print(f"parent killed by {sig.name}: worker {worker} gone after {took} s")
    assert took is not None, f"worker {worker} outlived its parent ({sig.name}) by 5 s"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_without_the_guard_a_busy_worker_outlives_its_parent(tmp_path):
    """Negative control: guard_parent patched off in the worker, SIGKILL to the parent: it survives."""
    parent, worker = _parent_with_busy_worker(tmp_path, guarded=False)
    try:
        parent.kill()
        parent.wait(timeout=30)
        assert _gone_within(worker, 5.0) is None, "the worker died anyway: the guard test proves nothing"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker, signal.SIGKILL)
