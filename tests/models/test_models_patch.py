"""Single-device forward/backward parity across attention and MoE backends.

One test per model: build a fresh model per mode from identical CPU-seeded weights, run one
forward+backward on the same packed batch (two samples in one row, position ids restarting), and
compare loss and total grad norm of every mode (HF's backends, and parity's own attention and
fused MoE backends) with the reference (HF eager attention, eager experts) within the case's
(rtol, atol). The defaults are sized for bf16; float32 runs (CPU) tighten them to
parity.patch_runner.FP32_TOLERANCE, since fp32 backends agree to ~1e-7. Each backend variant (one
environment per variant, chosen by the nox session through PARITY_VARIANT) runs its own modes plus
the reference.

Adding a model: append a pytest.param below (its id is the model id used by `nox -s patch -- <id>`),
and filter the modes it does not support in `test_models_patch_fwd_bwd`, keyed on `case_id`.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from parity.compare import record_failures as failures  # noqa: E402
from parity.modes import hf_modes, parity_modes  # noqa: E402
from parity.patch_runner import RunSettings, run_case  # noqa: E402
from parity.records import Tolerance  # noqa: E402

_DEFAULT_RTOL = 1e-2
_DEFAULT_ATOL = 1e-2

TEST_CASES = [
    pytest.param("./toy_config/llama_toy/config.json", False, _DEFAULT_RTOL, _DEFAULT_ATOL, id="llama"),
    pytest.param("./toy_config/qwen2_toy/config.json", False, _DEFAULT_RTOL, _DEFAULT_ATOL, id="qwen2"),
    pytest.param("./toy_config/qwen3_toy/config.json", False, _DEFAULT_RTOL, _DEFAULT_ATOL, id="qwen3"),
    pytest.param(
        "./toy_config/qwen3_moe_toy/config.json", True, _DEFAULT_RTOL, _DEFAULT_ATOL, id="qwen3_moe"
    ),
    pytest.param("./toy_config/seed_oss_toy/config.json", False, _DEFAULT_RTOL, _DEFAULT_ATOL, id="seed_oss"),
    pytest.param(
        "./toy_config/deepseek_v3_toy/config.json", True, _DEFAULT_RTOL, _DEFAULT_ATOL, id="deepseek_v3"
    ),
    pytest.param("./toy_config/qwen3_5_toy/config.json", False, _DEFAULT_RTOL, _DEFAULT_ATOL, id="qwen3_5"),
    pytest.param(
        "./toy_config/qwen3_5_moe_toy/config.json", True, _DEFAULT_RTOL, _DEFAULT_ATOL, id="qwen3_5_moe"
    ),
    pytest.param("./toy_config/qwen2_vl_toy/config.json", False, _DEFAULT_RTOL, _DEFAULT_ATOL, id="qwen2_vl"),
    pytest.param(
        "./toy_config/qwen2_5_vl_toy/config.json", False, _DEFAULT_RTOL, _DEFAULT_ATOL, id="qwen2_5_vl"
    ),
    pytest.param("./toy_config/qwen3_vl_toy/config.json", False, _DEFAULT_RTOL, _DEFAULT_ATOL, id="qwen3_vl"),
    pytest.param(
        "./toy_config/qwen3_vl_moe_toy/config.json", True, _DEFAULT_RTOL, _DEFAULT_ATOL, id="qwen3_vl_moe"
    ),
    pytest.param(
        "./toy_config/qwen2_5_omni_toy/config.json", False, _DEFAULT_RTOL, _DEFAULT_ATOL, id="qwen2_5_omni"
    ),
    pytest.param(
        "./toy_config/qwen3_omni_moe_toy/config.json", True, _DEFAULT_RTOL, _DEFAULT_ATOL, id="qwen3_omni_moe"
    ),
]


@pytest.mark.parametrize("config_path, is_moe, rtol, atol", TEST_CASES)
def test_models_patch_fwd_bwd(request, tmp_path_factory, config_path, is_moe, rtol, atol):
    case_id = request.node.callspec.id
    settings = RunSettings.from_env(default_results=tmp_path_factory.mktemp("results"))
    hf_model_modes = hf_modes(settings.variant, is_moe)
    parity_model_modes = parity_modes(settings.variant, is_moe)

    # Per-model filters for modes a model does not support yet go here, keyed on case_id, e.g.
    # if case_id == "<new_model>":
    #     hf_model_modes = [m for m in hf_model_modes if m.attn_implementation != "flash_attention_3"]
    #     parity_model_modes = [
    #         m for m in parity_model_modes if m.attn_implementation != "parity_flash_attention_3_with_sp"
    #     ]

    tolerance = Tolerance(rtol, atol)
    records = run_case(case_id, config_path, hf_model_modes + parity_model_modes, tolerance, settings)
    problems = failures(records)
    assert not problems, f"{case_id} ({settings.variant}):\n" + "\n".join(problems)
