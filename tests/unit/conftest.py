"""Builders for synthetic results folders, so merge tests plant faults in realistic records."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from parity.results import registry
from parity.results.records import SCHEMA, RunManifest, run_manifest_path, write_json_atomic

FINGERPRINT = {
    "python": "3.11.7",
    "torch": "2.13.0+cpu",
    "cuda": None,
    "transformers": "5.24.0",
    "flash_attn": None,
    "flash_attn_3": None,
    "device": "cpu",
    "compute_capability": None,
    "dtype": "float32",
    "seed": 0,
    "git_revision": "abc",
    "config_hash": "h1",  # replaced by the model's real toy-config hash in ResultsFolder.add_model
}
#: What a float32 record carries: the case tolerance capped by parity.results.compare.FP32_TOLERANCE.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def make_record(
    mode_id: str,
    attn: str,
    moe: str | None,
    loss: float,
    grad_norm: float,
    *,
    resolved_attn: str | None = None,
    resolved_moe: str | None = None,
) -> dict:
    requested = {"attn_implementation": attn} | ({"moe_implementation": moe} if moe else {})
    resolved = {"attn_implementation": resolved_attn or attn} | (
        {"moe_implementation": resolved_moe or moe} if moe else {}
    )
    return {
        "suite": "patch",
        "model": "m",
        "variant": "eager",
        "mode": {
            "id": mode_id,
            "modeling_backend": "hf",
            "attn_implementation": attn,
            "moe_implementation": moe,
        },
        "status": "ok",
        "requested": requested,
        "resolved": resolved,
        "metrics": {"loss": loss, "grad_norm": grad_norm},
        "tolerance": dict(TOLERANCE),
        "fingerprint": copy.deepcopy(FINGERPRINT),
        # per-tensor evidence against the reference: none of these synthetic records has tensors
        "evidence": {"against": "hf_attn-eager", "tensors": {}, "grad_missing": [], "grad_unexpected": []},
    }


class ResultsFolder:
    """A results folder with one patch run of a model in a variant; tests then corrupt parts of it."""

    def __init__(self, root: Path):
        self.root = root

    def add_run(
        self,
        variant: str = "eager",
        models: tuple[str, ...] = ("qwen3",),
        status: str = "ran",
        reason: str = "",
    ) -> None:
        manifest = RunManifest("patch", variant, list(models), status, reason, 0 if status == "ran" else None)
        write_json_atomic(run_manifest_path(self.root, "patch", variant), manifest.to_json())

    def add_model(
        self,
        model: str = "qwen3",
        variant: str = "eager",
        records: list[dict] | None = None,
        expected: list[str] | None = None,
    ) -> Path:
        if records is None:
            records = [
                make_record("hf_attn-eager", "eager", None, 5.5513, 1.234),
                make_record("hf_attn-sdpa", "sdpa", None, 5.5514, 1.2341),
            ]
        for r in records:
            r["model"], r["variant"] = model, variant
            if r["fingerprint"]["config_hash"] == FINGERPRINT["config_hash"]:
                r["fingerprint"]["config_hash"] = registry.config_hash(model)
        payload = {
            "schema": SCHEMA,
            "kind": "results",
            "suite": "patch",
            "variant": variant,
            "model": model,
            "expected_modes": expected if expected is not None else [r["mode"]["id"] for r in records],
            "records": records,
        }
        path = self.root / "patch" / variant / f"{model}.json"
        write_json_atomic(path, payload)
        return path

    def edit(self, path: Path, fn) -> None:
        payload = json.loads(path.read_text())
        fn(payload)
        path.write_text(json.dumps(payload))


@pytest.fixture
def folder(tmp_path: Path) -> ResultsFolder:
    return ResultsFolder(tmp_path / "results")


@pytest.fixture(autouse=True)
def _in_process_patch_runs(monkeypatch):
    """Unit tests plant bugs with monkeypatch in this process, so patch modes must run here, not in a
    child (tests/unit/test_isolation.py asks for the child explicitly)."""
    monkeypatch.setenv("PARITY_ISOLATE", "0")
