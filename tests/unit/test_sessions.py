"""The nox layer: model ids, install-spec hashing, and the user-facing errors of the sessions."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
nox = pytest.importorskip("nox")

from parity.results import registry  # noqa: E402
from sessions import e2e, envs, vlm  # noqa: E402
from sessions.variants import VARIANTS  # noqa: E402

# The shipped ids are pinned in test_toy.py; here: the sessions take theirs from the registry.


def test_sessions_take_their_cases_from_the_registry():
    ids = registry.ids("patch")
    assert ids == registry.ids() and len(ids) == len(set(ids))
    for case in ids:
        assert (ROOT / "toy_config" / f"{case}_toy" / "config.json").is_file(), case
        assert (ROOT / "toy_config" / f"{case}_toy" / "README.md").is_file(), case
    functions = e2e.case_functions()
    assert set(functions) == set(registry.ids("e2e"))
    assert functions["qwen3"] == "test_text_parallel_align"
    assert functions["qwen2_vl"] == "test_vlm_parallel_align"
    assert set(vlm.gradient_checkpointing_cases()) == {"qwen3_vl", "qwen2_5_omni"}


def test_install_spec_changes_when_an_included_requirement_changes(tmp_path, monkeypatch):
    base = tmp_path / "base.txt"
    base.write_text("torch\n")
    top = tmp_path / "top.txt"
    top.write_text("-r base.txt\nflash-attn  # comment\n")
    cons = tmp_path / "constraints.txt"
    cons.write_text("torch==2.13.0\n")
    monkeypatch.setattr(envs, "CONSTRAINTS", cons)
    first = envs.install_spec(top, "3.11")
    assert envs.install_spec(top, "3.11") == first
    base.write_text("torch\nnumpy\n")
    assert envs.install_spec(top, "3.11") != first, "edit in an -r include must force a reinstall"
    base.write_text("torch\n")
    cons.write_text("torch==2.14.0\n")
    assert envs.install_spec(top, "3.11") != first, "constraint change must force a reinstall"
    cons.write_text("torch==2.13.0\n")
    assert envs.install_spec(top, "3.12") != first, "interpreter change must force a reinstall"


def test_every_variant_has_a_requirements_file_and_torch_is_pinned():
    for variant in VARIANTS.values():
        assert variant.requirements.is_file(), variant.requirements
    pins = (ROOT / "requirements" / "constraints.txt").read_text()
    assert "torch==2.13.0" in pins


def _nox(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("nox")
    cmd = [exe] if exe else [sys.executable, "-m", "nox"]
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_nox_lists_every_session_with_a_description():
    out = _nox("-l").stdout
    for name in ("patch(eager)", "patch(fa2)", "patch(fa3)", "merge", "tests", "lint"):
        line = next((x for x in out.splitlines() if f" {name} -> " in x), None)
        assert line and len(line.split(" -> ", 1)[1]) > 20, f"{name} missing or undocumented in nox -l"


def test_unknown_model_id_lists_the_known_ones():
    proc = _nox("--no-venv", "-s", "patch(eager)", "--", "no_such_model")
    assert proc.returncode != 0
    assert "unknown model id(s): no_such_model" in proc.stderr and "qwen3_moe" in proc.stderr


def test_bad_timeout_is_rejected():
    proc = _nox("--no-venv", "-s", "patch(eager)", "--", "qwen3", "--timeout", "-5")
    assert proc.returncode != 0 and "--timeout must be a positive number" in proc.stderr


def test_merge_session_on_missing_folder_exits_2(tmp_path):
    proc = _nox("-s", "merge", "--", "--results", str(tmp_path / "none"))
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "does not exist" in out and "exit code 2" in out
