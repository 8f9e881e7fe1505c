"""A crash or hang in one model's mode is that mode's verdict; the other modes and models still run.

The faults are planted in the child process from here (``PARITY_FAULT``, tests/unit/workers/plants.py);
the negative control runs the same abort without isolation and shows it takes the run down.
"""

from __future__ import annotations

import os
import subprocess
import sys
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


def test_crash_and_hang_stay_in_their_mode(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "PARITY_FAULT", f"{PLANTS}:abort_llama_sdpa,{PLANTS}:hang_qwen2_sdpa,{PLANTS}:harness_bug_qwen3_sdpa"
    )
    monkeypatch.setenv("PARITY_MODE_TIMEOUT_S", "12")
    for model in ("llama", "qwen2", "qwen3"):
        _run(model, tmp_path)
    v = _verdicts(tmp_path)
    assert v[("llama", "hf_attn-sdpa")][0] == "ERROR" and "SIGABRT" in v[("llama", "hf_attn-sdpa")][1]
    assert v[("qwen2", "hf_attn-sdpa")][0] == "TIMEOUT"
    assert v[("qwen3", "hf_attn-sdpa")][0] == "TOOL-ERROR"
    for model in ("llama", "qwen2", "qwen3"):
        assert v[(model, "hf_attn-eager")][0] == "REF"
        assert v[(model, "parity_attn-parity_sdpa_with_sp")][0] == "PASS", v
    llama = registry.read_json(tmp_path / "patch" / "eager" / "llama.json")
    crashed = next(r for r in llama["records"] if r["mode"]["id"] == "hf_attn-sdpa")
    assert "run_mode" in crashed["error"] and "Fatal Python error: Aborted" in crashed["error"]  # the stack
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
