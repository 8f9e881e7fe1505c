"""Onboarding a model: ``new_model`` (the scaffold), ``checklist``, and the reports CI reads.

Each test works in a temporary toy tree (``PARITY_TOY_CONFIG_ROOT``) so nothing touches the
shipped registry. The scaffold is held to the same toy rules as the shipped toys
(``parity.harness.toy_rules``), and the checklist must fail on an incomplete model, not only pass on
a complete one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from parity.harness import checklist, scaffold, toy, toy_rules  # noqa: E402
from parity.results import registry  # noqa: E402
from parity.results.merge import Report, Row, render_markdown  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

#: A Qwen2-VL config as the Hub publishes it (transformers 4 layout: text fields at the top level,
#: legacy rope_scaling carrying the mRoPE section), trimmed to the fields that matter here.
FLAT_QWEN2_VL = {
    "model_type": "qwen2_vl",
    "_name_or_path": "Qwen/Qwen2-VL-7B-Instruct",
    "torch_dtype": "bfloat16",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "use_cache": True,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "hidden_size": 3584,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
}  # fmt: skip


@pytest.fixture
def toy_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty toy tree with an empty registry, the only one the code under test sees."""
    root = tmp_path / "toy_config"
    root.mkdir()
    (root / "registry.toml").write_text("# test registry\n")
    monkeypatch.setenv("PARITY_TOY_CONFIG_ROOT", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def _loaded(s: scaffold.Scaffold, tmp_path: Path):  # noqa: ANN202
    path = tmp_path / f"{s.case_id}_toy" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(s.config))
    return toy.load_config(path)


# ----------------------------------------------------------------------------- new_model


def test_new_model_writes_a_toy_that_follows_the_rules(toy_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert scaffold.main(["mixtral"]) == 0
    out = capsys.readouterr().out
    assert "num_hidden_layers        32 -> 2" in out and "nox -s checklist -- mixtral" in out
    folder = toy_root / "mixtral_toy"
    config = toy.load_config(folder / "config.json")
    assert toy_rules.violations(config) == []
    readme = (folder / "README.md").read_text()
    assert toy_rules.readme_violations(readme, "text") == []
    assert "| `intermediate_size` | 14336 | 128 |" in readme  # old and new value of every change
    assert checklist.readme_disagreements(readme, config)[0] == []
    case = registry.case("mixtral")  # the registry entry was appended and parses
    assert (case.family, case.is_moe, case.suites) == ("text", True, ("patch", "e2e"))
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]


@pytest.mark.parametrize(
    "model_type",
    ["llama", "qwen3_moe", "deepseek_v3", "glm4", "gemma3_text", "qwen3_5_moe", "qwen3_vl", "qwen2_5_omni"],
)
def test_shrunk_defaults_follow_the_toy_rules(toy_root: Path, tmp_path: Path, model_type: str) -> None:
    """Dense, MoE, MLA, sliding-window, linear-attention, VLM and Omni sources (no build: fast)."""
    s = scaffold.shrink(model_type, "t")
    config = _loaded(s, tmp_path)
    assert toy_rules.violations(config) == [], s.changes
    readme = scaffold.render_readme(s, "test")
    assert toy_rules.readme_violations(readme, toy_rules.family(config)) == []
    assert checklist.readme_disagreements(readme, config)[0] == []
    if model_type == "qwen3_5_moe":
        assert s.registry_fields["max_sp_size"] == 1  # linear attention: the registry says so at once


def test_flat_hub_config_is_moved_into_text_config(toy_root: Path, tmp_path: Path) -> None:
    source = tmp_path / "config.json"
    source.write_text(json.dumps(FLAT_QWEN2_VL))
    s = scaffold.shrink("qwen2_vl", "q", from_path=source)
    assert "rope_scaling" not in s.config and "hidden_size" not in s.config
    config = _loaded(s, tmp_path)
    assert toy_rules.violations(config) == []
    assert config.text_config.rope_parameters["mrope_section"] == [8, 12, 12]
    assert s.origin_link == "https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct"
    assert (config.image_token_id, config.text_config.bos_token_id) == (1000, 1)


def test_scale_section_and_layer_types() -> None:
    assert scaffold.scale_section([16, 24, 24], 32) == [8, 12, 12]
    assert scaffold.scale_section([11, 11, 10], 8) == [3, 3, 2]
    assert sum(scaffold.scale_section([24, 20, 20], 13)) == 13
    assert scaffold.shrink_layer_types(["linear_attention"] * 3 + ["full_attention"]) == [
        "linear_attention",
        "full_attention",
    ]
    assert scaffold.shrink_layer_types(["full_attention"] * 28) == ["full_attention", "full_attention"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["no_such_type"], "unknown model type 'no_such_type'"),
        (["mixtral", "--id", "Bad-Id"], "use lower case letters"),
        (["llava"], "VLM without mRoPE"),
        (["mixtral", "--from", "/nonexistent/config.json"], "no such file"),
    ],
)
def test_new_model_refusals_exit_2(
    toy_root: Path, capsys: pytest.CaptureFixture, args: list, needle: str
) -> None:
    assert scaffold.main(args) == scaffold.EXIT_REFUSED
    assert needle in capsys.readouterr().err
    assert sorted(p.name for p in toy_root.iterdir()) == ["registry.toml"]  # nothing written


def test_existing_folder_needs_force(toy_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (toy_root / "glm4_toy").mkdir()
    assert scaffold.main(["glm4"]) == scaffold.EXIT_REFUSED
    assert "exists: pick another --id, or pass --force" in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"model_type": "llama"}))
    assert scaffold.main(["glm4", "--id", "g", "--from", str(wrong)]) == scaffold.EXIT_REFUSED
    assert "has model_type 'llama', not 'glm4'" in capsys.readouterr().err
    assert scaffold.main(["glm4", "--force"]) == 0
    assert (toy_root / "registry.toml").read_text().count("[glm4]") == 1
    assert scaffold.main(["glm4", "--force"]) == 0  # again: the entry is kept, not duplicated
    assert (toy_root / "registry.toml").read_text().count("[glm4]") == 1


def test_new_model_session_exits_2_on_refusal() -> None:
    """Through nox: the library's exit code 2 is nox's exit code (nox itself would say 1)."""
    nox = shutil.which("nox")
    cmd = [nox] if nox else [sys.executable, "-m", "nox"]
    proc = subprocess.run(
        [*cmd, "--no-venv", "-s", "new_model", "--", "no_such_type"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "unknown model type 'no_such_type'" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- checklist


@pytest.fixture
def mixtral_root(toy_root: Path) -> Path:
    assert scaffold.main(["mixtral"]) == 0
    return toy_root


def _by_name(items: list[checklist.Item]) -> dict[str, checklist.Item]:
    return {i.name: i for i in items}


def test_checklist_passes_a_complete_model(mixtral_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert checklist.main(["mixtral"]) == 0
    out = capsys.readouterr().out
    assert "checklist mixtral: PASS" in out
    assert "PASS   collection: 2 cases collected in this env" in out
    items = _by_name(checklist.run_checklist("mixtral", collection=False))
    assert items["MoE fields"].status == "PASS" and items["freeze-ViT case"].status == "n/a"
    assert items["patch + e2e pass"].status == "SKIP"
    assert checklist.run_checklist("mixtral", queued=True, collection=False)[-1].status == "QUEUED"


def test_checklist_fails_an_incomplete_model(mixtral_root: Path, capsys: pytest.CaptureFixture) -> None:
    readme = mixtral_root / "mixtral_toy" / "README.md"
    readme.write_text(
        readme.read_text().replace("| `num_hidden_layers` | 32 | 2 |", "| `num_hidden_layers` | 32 | 4 |")
    )
    (mixtral_root / "registry.toml").write_text("# the entry was never added\n")
    assert checklist.main(["mixtral"]) == 1
    out = capsys.readouterr().out
    assert "FAIL   toy README: README says num_hidden_layers = 4, config.json has 2" in out
    assert "FAIL   registry entry: no [mixtral] table" in out
    assert "add a [mixtral] table to" in out
    assert "FAIL   collection: 0 tests collected in this env" in out
    assert "checklist mixtral: FAIL (toy README, registry entry, collection)" in out


@pytest.mark.parametrize(
    ("entry", "item", "needle"),
    [
        (
            '[mixtral.unsupported]\nflash_attn_9 = "x"\n',
            "unsupported modes",
            "'flash_attn_9' is no mode name",
        ),
        ('[mixtral.unsupported]\neager = "x"\n', "unsupported modes", "'eager' is the reference"),
    ],
)
def test_checklist_flags_bad_registry_fields(mixtral_root: Path, entry: str, item: str, needle: str) -> None:
    (mixtral_root / "registry.toml").write_text(f"[mixtral]\n{entry}")
    found = _by_name(checklist.run_checklist("mixtral", collection=False))[item]
    assert found.status == "FAIL" and needle in found.detail, found


def test_checklist_wants_max_sp_size_for_linear_attention(toy_root: Path) -> None:
    assert scaffold.main(["qwen3_next", "--id", "qn"]) == 0
    assert _by_name(checklist.run_checklist("qn", collection=False))["max_sp_size"].status == "PASS"
    (toy_root / "registry.toml").write_text("[qn]\n")  # the scaffold's max_sp_size = 1 removed
    found = _by_name(checklist.run_checklist("qn", collection=False))["max_sp_size"]
    assert found.status == "FAIL" and "linear-attention" in found.detail and "max_sp_size = 1" in found.fix


def test_checklist_collection_of_nothing_fails(mixtral_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pytest without torch collects 0 tests and exits 5: that is a failure, not a pass."""
    monkeypatch.setattr(checklist, "collect", lambda case_id, files: (5, [], "no tests ran in 0.01s"))
    found = _by_name(checklist.run_checklist("mixtral"))["collection"]
    assert found.status == "FAIL" and "0 tests collected" in found.detail


def test_checklist_expects_what_the_sessions_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The node ids the checklist expects are the parametrized ones each session runs."""
    pytest.importorskip("nox")
    from sessions import e2e, onboard, suites, vlm

    captured: list[str] = []

    def fake_run_suite(session, suite, variant, node_ids) -> None:  # noqa: ANN001
        captured.extend(node_ids([case.id]))

    class FakeSession:
        posargs: list[str] = []
        env: dict[str, str] = {}

    for module in (suites, e2e, vlm):
        monkeypatch.setattr(module, "run_suite", fake_run_suite)
    for case in registry.cases():
        captured.clear()
        for body in (lambda s: suites.run_patch(s, "eager"), lambda s: e2e.run_e2e(s, "eager")):
            body(FakeSession())
        if case.family != "text":
            vlm.run_vlm_trainer(FakeSession())
            vlm.run_dummy_forward(FakeSession())
        per_model = {n for n in captured if n.endswith("]")}
        assert per_model == set(checklist.expected_nodes(case)), case.id
        queued = onboard.checklist_sessions(case)
        assert queued[:3] == ["patch(eager)", "patch(fa2)", "patch(fa3)"]
        assert ("dummy_forward" in queued) == (case.family != "text")


# ----------------------------------------------------------------------------- CI reports


def test_junit_names_and_skipped_session_file(tmp_path: Path) -> None:
    pytest.importorskip("nox")
    from sessions.suites import junit_path, write_skipped_junit

    assert junit_path(tmp_path, "patch(fa2)") == tmp_path / "junit" / "patch-fa2.xml"
    path = junit_path(tmp_path, "patch(fa2)")
    write_skipped_junit(path, "patch(fa2)", 'fa2 needs a CUDA GPU: nvidia-smi not found <"&">')
    case = ET.parse(path).getroot().find("testsuite/testcase")
    assert case.get("name") == "patch(fa2)"
    assert case.find("skipped").get("message") == 'fa2 needs a CUDA GPU: nvidia-smi not found <"&">'


def test_summary_markdown_leads_with_the_verdict(tmp_path: Path) -> None:
    report = Report(rows=[
        Row("patch", "qwen3", "eager", "hf_attn-eager", verdict="REF"),
        Row("patch", "qwen3", "eager", "hf_attn-sdpa", verdict="FAIL", detail="worst: loss\nline two | x"),
        Row("patch", "qwen3", "fa2", "-", verdict="SKIPPED", detail="fa2 needs a CUDA GPU"),
    ])  # fmt: skip
    report.fail(1, "patch(eager) qwen3 mode hf_attn-sdpa: loss off")
    md = render_markdown(report, tmp_path)
    lines = md.splitlines()
    assert lines[4].startswith("**FAIL: a tolerance breach") and "FAIL 1, REF 1, SKIPPED 1" in lines[4]
    assert "| patch | qwen3 | eager, fa2 | FAIL 1, REF 1, SKIPPED 1 |" in md
    assert "| worst: loss line two \\| x |" in md  # one row per comparison, even with newlines and pipes
    assert md.index("## By model") < md.index("## All comparisons") < md.index("## Problems")
