"""The nox layer: model ids, install-spec hashing, and the user-facing errors of the sessions."""

from __future__ import annotations

import os
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


@pytest.mark.parametrize(
    ("plant", "verdict", "code"),
    [(None, "pass", 0), ("breach", "breach", 1), ("invalid", "invalid", 2)],
)
def test_merge_session_ends_with_the_verdict_in_words(tmp_path, plant, verdict, code):
    """nox turns every failure into exit 1; its last lines and summary.json still tell them apart."""
    import json

    from conftest import ResultsFolder

    folder = ResultsFolder(tmp_path / "results")
    folder.add_run()
    path = folder.add_model()
    if plant == "breach":
        folder.edit(path, lambda p: p["records"][1]["metrics"].update(loss=99.0))
    elif plant == "invalid":
        folder.edit(path, lambda p: p["records"][1]["metrics"].update(loss=["abc"]))
    proc = _nox("-s", "merge", "--", "--results", str(folder.root))
    assert proc.returncode == (0 if code == 0 else 1)
    out = proc.stdout + proc.stderr
    assert f"merge verdict: {verdict} (python -m parity.merge exit code {code};" in out
    summary = json.loads((folder.root / "summary.json").read_text())
    assert (summary["verdict"], summary["exit_code"]) == (verdict, code)


class _FakeSession:
    """Just enough of nox.Session for run_suite to reach its hardware check and skip."""

    class Skipped(Exception):
        pass

    name = "patch(fa2)"
    venv_backend = "none"

    def __init__(self, posargs: list[str]) -> None:
        self.posargs = posargs
        self.notified: list = []

    def notify(self, name: str, posargs: list[str]) -> None:
        self.notified.append((name, posargs))

    def error(self, message: str) -> None:
        raise AssertionError(message)

    def skip(self, reason: str) -> None:
        raise self.Skipped(reason)


def test_a_run_removes_the_previous_summary_before_it_starts(tmp_path, monkeypatch):
    """An interrupted run must not leave the previous summary.json saying PASS."""
    from sessions import suites

    results = tmp_path / "results"
    results.mkdir()
    (results / "summary.json").write_text('{"verdict": "pass", "exit_code": 0}')
    (results / "summary.md").write_text("verdict: pass")
    monkeypatch.setattr(suites, "hardware_skip_reason", lambda variant: "no GPU here (test)")
    session = _FakeSession(["qwen3", "--results", str(results)])
    with pytest.raises(_FakeSession.Skipped):
        suites.run_suite(session, "patch", "fa2", lambda models: [])
    assert not (results / "summary.json").exists() and not (results / "summary.md").exists()
    assert session.notified and session.notified[0][0] == "merge"


def test_bench_default_output_is_outside_results():
    from sessions import suites

    assert suites.DEFAULT_RESULTS not in suites.DEFAULT_BENCH_OUT.parents
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(suites.DEFAULT_BENCH_OUT)], cwd=ROOT, capture_output=True
    )
    assert ignored.returncode == 0, "artifacts/ must be gitignored"


# --------------------------------------------------------------------------------------------
# --config: bad input stops the whole invocation with exit 2 and the file named, before anything runs


class _LoggingSession(_FakeSession):
    name = "patch(eager)"

    def __init__(self, posargs: list[str]) -> None:
        super().__init__(posargs)
        self.logged: list[str] = []

    def log(self, message: str) -> None:
        self.logged.append(message)


def _bad_configs(tmp_path: Path) -> dict[str, Path]:
    """One config.json per bad input the README names, each in its own folder (the id)."""
    made = {}
    contents = {
        "invalid_json": '{"model_type": "llama", "num_attention_heads": 4,',
        "unknown_type": '{"model_type": "lama", "num_attention_heads": 4, "hidden_size": 64}',
        "no_heads": '{"model_type": "llama", "hidden_size": 64}',
    }
    for name, text in contents.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        made[name] = tmp_path / name / "config.json"
    made["missing"] = tmp_path / "missing" / "config.json"  # never written
    return made


@pytest.mark.parametrize(
    "bad, why",
    [
        ("missing", "--config: no such file"),
        ("invalid_json", "invalid JSON"),
        ("unknown_type", "transformers does not know model_type 'lama'. Did you mean llama"),
        ("no_heads", "--config: no attention heads"),
    ],
)
def test_bad_config_stops_the_session_with_exit_2_naming_the_file(tmp_path, monkeypatch, bad, why):
    """Through run_suite (the patch session's body): a registry model and a good --config in the same
    invocation are rejected with it, before anything runs or any earlier result is cleared: a typo in
    one path must not turn into a merge of the rest that looks like a verdict on what was asked."""
    from sessions import suites

    results = tmp_path / "results"
    earlier = results / "patch" / "eager" / "qwen3.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}")  # an earlier run's record: must survive a rejected invocation
    (tmp_path / "good_llama").mkdir()  # a good --config beside the bad one (its own id)
    good = tmp_path / "good_llama" / "config.json"
    good.write_text((ROOT / "toy_config" / "llama_toy" / "config.json").read_text())
    monkeypatch.setattr(suites, "hardware_skip_reason", lambda variant: pytest.fail("the session went on"))
    path = _bad_configs(tmp_path)[bad]
    session = _LoggingSession(
        ["qwen3", "--config", str(good), "--config", str(path), "--results", str(results)]
    )
    with pytest.raises(SystemExit) as exit_info:
        suites.run_suite(session, "patch", "eager", lambda models: pytest.fail("pytest was started"))
    assert exit_info.value.code == 2
    message = "\n".join(session.logged)
    assert str(path) in message and why in message, message
    assert not session.notified  # no merge queued
    assert earlier.is_file()


def test_bad_config_in_the_variant_env_check_is_exit_2_naming_the_file(tmp_path):
    """The same checks as the variant env runs them (``python -m parity.results.registry``), where
    transformers is importable even when nox's interpreter has none."""
    configs = _bad_configs(tmp_path)
    for bad, path in configs.items():
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "parity.results.registry",
                str(ROOT / "toy_config" / "llama_toy"),
                str(path),
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2, (bad, proc.stdout, proc.stderr)
        assert str(path) in proc.stdout, (bad, proc.stdout)
