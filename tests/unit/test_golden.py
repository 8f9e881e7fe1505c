"""Golden metrics: export a passing merge, compare a later run, refuse another environment's file."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

from parity.results import golden, registry
from parity.results.records import (
    RunManifest,
    Tolerance,
    make_record,
    results_path,
    run_manifest_path,
    write_json_atomic,
)
from tests.unit.conftest import FINGERPRINT

ROOT = Path(__file__).resolve().parents[2]
FP = dict(FINGERPRINT, config_hash=registry.config_hash("qwen3"))  # provenance: a real registry model
GRADS = {"a.weight": [2.0, 0.5, -1.0, 0.25], "b.weight": [1.0, 0.1, 0.2, -0.3]}


def _record(mode_id: str, loss: float, grads: dict) -> dict:
    return make_record(
        suite="patch",
        model="qwen3",
        variant="eager",
        mode={"id": mode_id, "modeling_backend": "hf"},
        status="ok",
        tolerance=Tolerance(1e-4, 1e-5),
        fingerprint=FP,
        metrics={"loss": loss, "grad_norm": 2.3},
        fingerprints={"logits": [5.0, 1.0, 2.0, 3.0], "grads": grads},
        evidence={"against": "ref", "tensors": {}, "grad_missing": [], "grad_unexpected": []},
    )


def _write_run(folder: Path, grads: dict, fp: dict | None = None) -> Path:
    records = [_record("ref", 7.0, GRADS), _record("other", 7.0, grads)]
    if fp is not None:
        for r in records:
            r["fingerprint"] = fp
    payload = {
        "schema": "parity.records/2",
        "kind": "results",
        "suite": "patch",
        "variant": "eager",
        "model": "qwen3",
        "expected_modes": ["ref", "other"],
        "records": records,
    }
    write_json_atomic(results_path(folder, "patch", "eager", "qwen3"), payload)
    write_json_atomic(
        run_manifest_path(folder, "patch", "eager"), RunManifest("patch", "eager", ["qwen3"], "ran").to_json()
    )
    return folder


def _merge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "parity.merge", *args],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src")},
    )


def test_export_then_clean_compare_passes(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", GRADS)
    out = _merge("--results", str(run), "--export-golden", str(tmp_path / "golden"))
    assert "golden: wrote" in out.stdout, out.stdout + out.stderr
    files = list((tmp_path / "golden").glob("golden-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"]["device"] == "cpu"
    again = _merge("--results", str(run), "--golden", str(tmp_path / "golden"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "golden PASS patch/eager/qwen3/other" in again.stdout


def test_a_planted_change_names_model_mode_and_tensor(tmp_path: Path) -> None:
    _merge("--results", str(_write_run(tmp_path / "run", GRADS)), "--export-golden", str(tmp_path / "golden"))
    swapped = copy.deepcopy(GRADS)
    swapped["b.weight"] = [1.0, -0.1, 0.2, -0.3]  # a sign flip: same norm, another projection
    later = _write_run(tmp_path / "later", swapped)
    out = _merge("--results", str(later), "--golden", str(tmp_path / "golden"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "patch(eager) qwen3: golden: patch/eager/qwen3/other: grad b.weight off by 0.2" in out.stderr


def test_golden_for_another_environment_is_refused(tmp_path: Path) -> None:
    _merge("--results", str(_write_run(tmp_path / "run", GRADS)), "--export-golden", str(tmp_path / "golden"))
    gpu = dict(FP, device="NVIDIA H200", dtype="bfloat16")
    later = _write_run(tmp_path / "later", GRADS, fp=gpu)
    out = _merge("--results", str(later), "--golden", str(tmp_path / "golden"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "no golden metrics for device=NVIDIA H200, dtype=bfloat16" in out.stderr
    assert "device=cpu" in out.stderr  # says what the folder does hold


def test_missing_entry_is_reported(tmp_path: Path) -> None:
    payload = {"schema": golden.SCHEMA, "key": golden.env_key(FP), "entries": {}}
    (tmp_path / "golden").mkdir()
    (tmp_path / "golden" / golden._file_name(golden.env_key(FP))).write_text(json.dumps(payload))
    out = _merge("--results", str(_write_run(tmp_path / "run", GRADS)), "--golden", str(tmp_path / "golden"))
    assert out.returncode == 2 and "no golden entry for patch/eager/qwen3/ref" in out.stderr
