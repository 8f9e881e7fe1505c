"""The case registry, the settings reader and the layering they anchor.

A new model is one registry entry plus its toy folder: these tests create one for a model type this
repo does not ship and show that every suite that applies collects it and the toy rules check it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from parity import settings
from parity.results import registry

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"

NEW_MODEL_CONFIG = """{
  "architectures": ["MistralForCausalLM"],
  "model_type": "mistral",
  "hidden_size": 256,
  "intermediate_size": 512,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "vocab_size": 1024,
  "max_position_embeddings": 2048,
  "sliding_window": null,
  "attention_dropout": 0.0,
  "use_cache": false,
  "tie_word_embeddings": false
}
"""
NEW_MODEL_README = """# mistral_new toy

From https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json (no head_dim field:
the model derives 256 / 4 = 64).

## Shrunk / changed

hidden 4096 -> 256, layers 32 -> 2, heads 32/8 -> 4/2, vocab 32000 -> 1024.
"""


@pytest.fixture
def new_model_root(tmp_path: Path) -> Path:
    """A toy tree holding one model type nobody shipped, with its registry entry."""
    folder = tmp_path / "mistral_new_toy"
    folder.mkdir()
    (folder / "config.json").write_text(NEW_MODEL_CONFIG)
    (folder / "README.md").write_text(NEW_MODEL_README)
    (tmp_path / "registry.toml").write_text("[mistral_new]\n")
    return tmp_path


def _pytest(args: list[str], toy_root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PARITY_TOY_CONFIG_ROOT=str(toy_root), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--rootdir={ROOT}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_new_model_is_collected_by_every_suite_that_applies(new_model_root: Path) -> None:
    suites = [
        "tests/models/test_models_patch.py",
        "tests/e2e/test_e2e_parallel.py",
        "tests/models/test_vlm_trainer.py",
        "tests/distributed/test_dummy_forward.py",
    ]
    result = _pytest(["--collect-only", "-q", *suites, "-k", "mistral_new"], new_model_root)
    assert result.returncode == 0, result.stdout + result.stderr
    collected = {line for line in result.stdout.splitlines() if "[mistral_new]" in line}
    assert collected == {
        "tests/models/test_models_patch.py::test_models_patch_fwd_bwd[mistral_new]",
        "tests/e2e/test_e2e_parallel.py::test_text_parallel_align[mistral_new]",
    }, result.stdout  # a text model: no VLM suite collects it


def test_new_model_is_checked_by_the_toy_rules(new_model_root: Path) -> None:
    result = _pytest(["-q", "tests/unit/test_toy.py", "-k", "mistral_new"], new_model_root)
    assert result.returncode == 0, result.stdout + result.stderr
    # shape rules, README rules and the build budget each ran on the new folder
    assert re.search(r"\b3 passed\b", result.stdout), result.stdout


def test_derived_facts_come_from_the_config(new_model_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARITY_TOY_CONFIG_ROOT", str(new_model_root))
    case = registry.case("mistral_new")
    assert (case.family, case.is_moe, case.patch_size, case.suites) == ("text", False, None, ("patch", "e2e"))
    assert (case.rtol, case.atol, case.max_sp_size) == (1e-2, 1e-2, None)
    assert registry.problems() == []
    (new_model_root / "orphan_toy").mkdir()
    (new_model_root / "orphan_toy" / "config.json").write_text('{"model_type": "llama"}')
    assert any("orphan_toy has no entry" in p for p in registry.problems())


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ("[m]\nrtol = 'big'\n", "field 'rtol' must be float"),
        ("[m]\nmax_sp_size = 1\n", "max_sp_size needs a max_sp_reason"),
        ("[m]\nmaxsp = 1\n", "unknown field 'maxsp'"),
        ("[m.unsupported]\nsdpa = ''\n", "needs a reason string"),
        ("[m]\natol = -1.0\n", "must be positive"),
        ("[m\n", "invalid TOML"),
    ],
)
def test_malformed_entries_name_file_and_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str, needle: str
) -> None:
    (tmp_path / "m_toy").mkdir()
    (tmp_path / "m_toy" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "registry.toml").write_text(entry)
    monkeypatch.setenv("PARITY_TOY_CONFIG_ROOT", str(tmp_path))
    with pytest.raises(registry.RegistryError, match=re.escape(needle)) as info:
        registry.cases()
    assert str(tmp_path / "registry.toml") in str(info.value)


def test_unsupported_mode_is_recorded_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    from parity.harness.patch_runner import RunSettings, run_case
    from parity.results.modes import hf_modes
    from parity.results.records import Tolerance

    monkeypatch.setenv("PARITY_DEVICE", "cpu")
    monkeypatch.delenv("PARITY_DTYPE", raising=False)
    monkeypatch.setenv("PARITY_RESULTS", str(tmp_path / "results"))
    base = registry.case("llama")
    case = registry.Case(**{**base.__dict__, "unsupported": {"sdpa": "planted for this test"}})
    records = run_case("llama", base.config, hf_modes("eager", False), Tolerance(1e-2, 1e-2),
                       RunSettings.from_env(tmp_path), case=case)  # fmt: skip
    by_mode = {r["mode"]["id"]: r for r in records}
    assert by_mode["hf_attn-eager"]["status"] == "ok"
    assert by_mode["hf_attn-sdpa"]["status"] == "unsupported"
    assert by_mode["hf_attn-sdpa"]["reason"] == "llama does not support sdpa: planted for this test"


def test_results_layer_and_settings_import_without_torch() -> None:
    code = (
        "import sys\n"
        "import parity.settings, parity.results.registry, parity.results.records\n"
        "import parity.results.compare, parity.results.merge, parity.results.modes\n"
        "parity.results.registry.cases()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env.pop("PARITY_TOY_CONFIG_ROOT", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_backend_has_no_fault_switches() -> None:
    """Negative controls patch the code under test from outside; nothing in there reads a switch."""
    for path in sorted((SRC / "parity" / "backend").glob("*.py")) + sorted(
        (SRC / "parity" / "training").glob("*.py")
    ):
        text = path.read_text()
        assert "PARITY_FAULT" not in text and "fault_active" not in text, path
        assert "PARITY_DISABLE" not in text, path


_ENV_READ = re.compile(r"""(os\.environ\.get\(|os\.environ\[|os\.getenv\()\s*["']PARITY_""")


def test_parity_variables_are_read_in_one_module() -> None:
    offenders = []
    for folder in ("src", "sessions", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == SRC / "parity" / "settings.py":
                continue
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if _ENV_READ.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert offenders == [], "read PARITY_* through parity.settings:\n" + "\n".join(offenders)


def test_readme_settings_table_is_the_settings_module() -> None:
    readme = (ROOT / "README.md").read_text()
    assert settings.markdown_table() in readme, (
        "regenerate the README table from parity.settings.markdown_table()"
    )


def test_bad_setting_values_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARITY_NPROC", "two")
    with pytest.raises(settings.SettingError, match="PARITY_NPROC='two'"):
        settings.get("PARITY_NPROC")
    monkeypatch.setenv("PARITY_DISABLE_DUMMY_FORWARD", "maybe")
    with pytest.raises(settings.SettingError, match="PARITY_DISABLE_DUMMY_FORWARD"):
        settings.get("PARITY_DISABLE_DUMMY_FORWARD")
    monkeypatch.setenv("PARITY_PG_TIMEOUT_S", "-3")
    with pytest.raises(settings.SettingError, match="must be positive"):
        settings.get("PARITY_PG_TIMEOUT_S")


def test_child_env_refuses_an_undeclared_name() -> None:
    """A PARITY_* name set for a child process must be declared: a typo would set what nothing reads."""
    assert settings.child_env(PARITY_RESULTS="/r", PARITY_DEVICE=None) == {"PARITY_RESULTS": "/r"}
    with pytest.raises(settings.SettingError, match="PARITY_RESULT is not a declared parity setting"):
        settings.child_env(PARITY_RESULT="/r")
