"""Single-device forward/backward parity across attention and MoE backends.

One test per model: build a fresh model per mode from identical CPU-seeded weights, run one
forward+backward on the same packed batch, and compare every mode (HF's backends, and parity's own
attention and fused MoE backends) with the reference (HF eager attention, eager experts). The case
tolerances are the seed's (sized for bf16); float32 runs (CPU) tighten them. Each backend variant
(one environment per variant, chosen by the nox session through PARITY_VARIANT) runs its own modes
plus the reference.

The cases come from the case registry (``toy_config/registry.toml``): adding a model is a registry
entry plus its toy folder. A mode the model cannot run is declared there with its reason and
recorded as unsupported; the filter block below is for ad-hoc experiments keyed on ``case_id``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from parity.harness.patch_runner import RunSettings, run_case  # noqa: E402
from parity.results import registry  # noqa: E402
from parity.results.compare import record_failures as failures  # noqa: E402
from parity.results.modes import hf_modes, parity_modes  # noqa: E402
from parity.results.records import Tolerance  # noqa: E402

TEST_CASES = [
    pytest.param(case.config_arg, case.is_moe, case.rtol, case.atol, id=case.id)
    for case in registry.cases_for("patch")
]


@pytest.mark.parametrize("config_path, is_moe, rtol, atol", TEST_CASES)
def test_models_patch_fwd_bwd(request, tmp_path_factory, config_path, is_moe, rtol, atol):
    case_id = request.node.callspec.id
    settings = RunSettings.from_env(default_results=tmp_path_factory.mktemp("results"))
    hf_model_modes = hf_modes(settings.variant, is_moe)
    parity_model_modes = parity_modes(settings.variant, is_moe)

    # Per-model filters for modes a model does not support go in the registry (with the reason, so
    # they are recorded, not dropped). For a quick local experiment, keyed on case_id:
    # if case_id == "<new_model>":
    #     hf_model_modes = [m for m in hf_model_modes if m.attn_implementation != "flash_attention_3"]

    tolerance = Tolerance(rtol, atol)
    case = registry.case(case_id)
    records = run_case(
        case_id, config_path, hf_model_modes + parity_model_modes, tolerance, settings, case=case
    )
    problems = failures(records)
    assert not problems, f"{case_id} ({settings.variant}):\n" + "\n".join(problems)
