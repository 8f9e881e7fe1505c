"""Toy configs and parity.harness.toy: lookups, config shape rules, build determinism, backend wiring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parity.harness import toy, toy_rules
from parity.results import registry

#: The models this repo ships: pinned here once, so deleting one is noticed. Every rule below runs on
#: every registry case (EXPECTED_IDS), so a new toy folder is checked without editing this file.
SHIPPED = {
    "llama", "qwen2", "qwen3", "qwen3_moe", "seed_oss", "deepseek_v3", "qwen3_5", "qwen3_5_moe",
    "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen2_5_omni", "qwen3_omni_moe",
}  # fmt: skip
EXPECTED_IDS = sorted(registry.ids())
MIN_PARAMS, MAX_PARAMS = toy_rules.MIN_PARAMS, toy_rules.MAX_PARAMS


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- lookup


def test_registry_and_toy_folders_agree() -> None:
    assert registry.problems() == []
    assert toy.known_models() == EXPECTED_IDS
    assert SHIPPED <= set(EXPECTED_IDS)


def test_known_models_follows_env_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "foo_toy" / "config.json", "{}")
    (tmp_path / "bar_toy").mkdir()  # no config.json: not a model
    _write(tmp_path / "baz" / "config.json", "{}")  # no _toy suffix: not a model
    monkeypatch.setenv("PARITY_TOY_CONFIG_ROOT", str(tmp_path))
    assert toy.known_models() == ["foo"]
    assert toy.config_path("foo") == tmp_path / "foo_toy" / "config.json"


def test_unknown_id_lists_known_ids() -> None:
    with pytest.raises(toy.ToyConfigError) as info:
        toy.config_path("qwen9")
    message = str(info.value)
    assert "qwen9" in message
    for known in EXPECTED_IDS:
        assert known in message


def test_config_path_accepts_id_dir_and_file() -> None:
    by_id = toy.config_path("qwen3")
    assert by_id == registry.toy_root() / "qwen3_toy" / "config.json"
    assert toy.config_path(by_id.parent) == by_id
    assert toy.config_path(str(by_id)) == by_id
    assert toy.config_path("qwen3_toy") == by_id


@pytest.mark.parametrize(
    ("name", "text", "needles"),
    [
        (
            "invalid_json",
            '{"model_type": "qwen3",\n  "vocab_size": }\n',
            ["invalid JSON", "line 2", "column"],
        ),
        ("not_object", "[1, 2, 3]\n", ["JSON object", "list"]),
        ("missing_model_type", '{"vocab_size": 1024}\n', ["missing 'model_type'"]),
        ("unknown_model_type", '{"model_type": "qwen3x"}\n', ["unknown model_type", "qwen3x", "qwen3"]),
        (
            "bad_field_type",
            '{"model_type": "qwen3", "hidden_size": "big"}\n',
            ["invalid qwen3 config", "hidden_size"],
        ),
    ],
)
def test_bad_config_files_raise_toy_config_error(
    tmp_path: Path, name: str, text: str, needles: list[str]
) -> None:
    path = _write(tmp_path / f"{name}_toy" / "config.json", text)
    with pytest.raises(toy.ToyConfigError) as info:
        toy.load_config(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message


def test_missing_file_raises_toy_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere_toy" / "config.json"
    with pytest.raises(toy.ToyConfigError, match="missing file") as info:
        toy.load_config(missing)
    assert str(missing) in str(info.value)
    (tmp_path / "empty_toy").mkdir()
    with pytest.raises(toy.ToyConfigError, match="missing file"):
        toy.config_path(tmp_path / "empty_toy")


def test_config_hash_is_canonical(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", '{"b": 1, "a": [1, 2]}')
    b = _write(tmp_path / "b.json", '{\n  "a": [1,2],\n  "b": 1\n}\n')
    c = _write(tmp_path / "c.json", '{"a": [1, 2], "b": 2}')
    assert toy.config_hash(a) == toy.config_hash(b)
    assert toy.config_hash(a) != toy.config_hash(c)
    assert toy.config_hash("qwen3") == toy.config_hash(toy.config_path("qwen3"))
    assert len(toy.config_hash("qwen3")) == 64


def test_lookup_imports_no_torch() -> None:
    code = (
        "import sys; from parity.harness import toy; toy.known_models(); toy.config_path('llama'); "
        "toy.config_hash('qwen3'); assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    src = str(Path(toy.__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=src)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- config shape rules


def _text(config):  # noqa: ANN001, ANN202
    return toy_rules.text_config(config)


@pytest.mark.parametrize("model_id", EXPECTED_IDS)
def test_toy_config_follows_kernel_friendly_rules(model_id: str) -> None:
    """The rules live in parity.harness.toy_rules (new_model and the checklist apply the same ones)."""
    assert toy_rules.violations(toy.load_config(model_id)) == []


@pytest.mark.parametrize("model_id", EXPECTED_IDS)
def test_readme_names_origin_and_changes(model_id: str) -> None:
    readme = (toy.config_path(model_id).parent / "README.md").read_text()
    assert toy_rules.readme_violations(readme, toy.model_family(toy.load_config(model_id))) == []


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"num_hidden_layers": 4}, "num_hidden_layers is 4, must be 2"),
        ({"hidden_size": 200, "head_dim": 64}, "hidden_size 200 is not a multiple of 64"),
        ({"num_key_value_heads": 1}, "num_key_value_heads 1 is odd"),
        ({"head_dim": 96}, "head_dim is 96, must be 64 or 128"),
        ({"use_cache": True}, "use_cache is True, must be false"),
        ({"num_experts": 4}, "experts: 4, need >= 8"),
        ({"num_experts_per_tok": 4}, "num_experts_per_tok is 4, must be 2"),
        ({"vocab_size": 4096}, "vocab_size 4096 > 2048"),
    ],
)
def test_rule_violations_name_field_and_value(tmp_path: Path, edit: dict, needle: str) -> None:
    data = json.loads(toy.config_path("qwen3_moe").read_text()) | edit
    path = _write(tmp_path / "bad_toy" / "config.json", json.dumps(data))
    found = toy_rules.violations(toy.load_config(path))
    assert any(needle in v for v in found), found


def test_readme_rules_name_what_is_missing() -> None:
    found = toy_rules.readme_violations("# toy\n\nhidden 256\n", "omni")
    assert len(found) == 3 and "huggingface.co/" in found[0] and "Shrunk / changed" in found[1]


def test_family_and_moe_classification() -> None:
    """The registry's torch-free derivations agree with transformers' view of every config."""
    for case in registry.cases():
        config = toy.load_config(case.config)
        assert case.family == toy.model_family(config), case.id
        assert case.is_moe == toy.is_moe(config), case.id
        if case.family != "text":
            assert case.patch_size == config.vision_config.patch_size, case.id
    families = {c.id: c.family for c in registry.cases() if c.id in SHIPPED}
    assert {m for m, f in families.items() if f == "omni"} == {"qwen2_5_omni", "qwen3_omni_moe"}
    assert {m for m, f in families.items() if f == "text"} == {
        "llama",
        "qwen2",
        "qwen3",
        "qwen3_moe",
        "seed_oss",
        "deepseek_v3",
    }
    moe = {c.id for c in registry.cases() if c.is_moe and c.id in SHIPPED}
    assert moe == {"qwen3_moe", "deepseek_v3", "qwen3_vl_moe", "qwen3_5_moe", "qwen3_omni_moe"}


# ----------------------------------------------------------------------------- building


@pytest.mark.parametrize("model_id", EXPECTED_IDS)
def test_every_toy_builds_within_budget(model_id: str) -> None:
    config = toy.load_config(model_id)
    model = toy.build_model(config, attn_implementation="sdpa" if toy.hf_supports_sdpa(config) else "eager")
    n_params = sum(p.numel() for p in model.parameters())
    assert MIN_PARAMS <= n_params <= MAX_PARAMS, n_params
    assert type(model).__name__ == json.loads(toy.config_path(model_id).read_text())["architectures"][0]
    assert model.training
    assert all(p.device.type == "cpu" and p.dtype.is_floating_point for p in model.parameters())
    assert _text(model.config).use_cache is False


def _state(model):  # noqa: ANN001, ANN202
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_id", ["qwen3_moe", "qwen2_5_omni", "deepseek_v3"])
def test_weights_bit_identical_across_backends(model_id: str) -> None:
    import torch
    from transformers import PreTrainedModel

    config = toy.load_config(model_id)
    experts = ("eager", "grouped_mm") if toy.is_moe(config) else (None, None)
    a = toy.build_model(config, attn_implementation="eager", experts_implementation=experts[0])
    b = toy.build_model(config, attn_implementation="sdpa", experts_implementation=experts[1])
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the switch really happened on every sub-model (no silent fallback to the build implementation)
    for module in b.modules():
        if isinstance(module, PreTrainedModel):
            assert module.config._attn_implementation == "sdpa", type(module).__name__
    if experts[1]:
        assert b.config._experts_implementation == "grouped_mm"
    # and the comparison can fail: another seed gives other weights
    c = _state(toy.build_model(config, attn_implementation="eager", seed=1))
    assert not all(torch.equal(sa[k], c[k]) for k in sa)


@pytest.mark.parametrize("name", ["flash_attention_2", "flash_attention_3"])
def test_hf_flash_attention_raises_instead_of_falling_back(name: str) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; this checks the CPU-only failure")
    with pytest.raises((ImportError, ValueError), match="(?i)flash"):
        toy.build_model("qwen3", attn_implementation=name)


def test_unknown_attention_name_raises() -> None:
    with pytest.raises(ValueError, match="not supported"):
        toy.build_model("qwen3", attn_implementation="no_such_backend")
    with pytest.raises(ValueError, match="not registered"):
        toy.build_model("qwen3", attn_implementation="parity_unregistered_flash_backend")


@pytest.fixture
def flash_spy():  # noqa: ANN201
    """A registered project-style name containing "flash" that counts calls and delegates to sdpa."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    name = "parity_unit_test_flash_spy"
    calls: list[int] = []

    def spy(module, query, key, value, attention_mask, **kwargs):  # noqa: ANN001, ANN003, ANN202
        calls.append(module.layer_idx if hasattr(module, "layer_idx") else -1)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, spy)
    yield name, calls
    AttentionInterface._global_mapping.pop(name, None)


def test_custom_flash_name_bypasses_hf_build_check(flash_spy) -> None:  # noqa: ANN001
    import torch

    name, calls = flash_spy
    model = toy.build_model("qwen3", attn_implementation=name)
    assert model.config._attn_implementation == name
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert sorted(calls) == [0, 1]  # both decoder layers went through the registered function

    vlm = toy.build_model("qwen2_vl", attn_implementation=name)
    for sub in ("text_config", "vision_config"):
        assert getattr(vlm.config, sub)._attn_implementation == name


def test_per_subconfig_attention_dict() -> None:
    model = toy.build_model("qwen2_vl", attn_implementation={"text_config": "sdpa", "vision_config": "eager"})
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "eager"


def test_dtype_cast_keeps_rotary_buffers_fp32() -> None:
    import torch

    model = toy.build_model("qwen3", attn_implementation="sdpa", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    inv_freq = [b for n, b in model.named_buffers() if n.endswith("inv_freq")]
    assert inv_freq and all(b.dtype == torch.float32 for b in inv_freq)
