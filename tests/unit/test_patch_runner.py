"""The patch runner's own guards, each with a planted fault that must fire."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from parity.harness import toy  # noqa: E402
from parity.harness.patch_runner import RunSettings, run_case  # noqa: E402
from parity.results.compare import record_failures as failures  # noqa: E402
from parity.results.modes import ModelMode, hf_modes  # noqa: E402
from parity.results.records import Tolerance, load_results_file, results_path  # noqa: E402

TOL = Tolerance(1e-2, 1e-2)
QWEN3 = "./toy_config/qwen3_toy/config.json"


@pytest.fixture
def settings(tmp_path) -> RunSettings:
    return RunSettings("eager", torch.device("cpu"), torch.float32, tmp_path)


def test_clean_case_passes_and_records_what_ran(settings):
    records = run_case("qwen3", QWEN3, hf_modes("eager", False), TOL, settings)
    assert failures(records) == []
    assert [r["resolved"]["attn_implementation"] for r in records] == ["eager", "sdpa"]
    ref, sdpa = (r["metrics"] for r in records)
    assert abs(ref["loss"] - sdpa["loss"]) < 1e-5 and ref["grad_norm"] > 0
    on_disk = load_results_file(results_path(settings.results, "patch", "eager", "qwen3"))
    assert [r["mode"]["id"] for r in on_disk.records] == ["hf_attn-eager", "hf_attn-sdpa"]
    assert on_disk.records[0]["fingerprint"]["config_hash"] == toy.config_hash(toy.config_path("qwen3"))


def test_planted_wrong_attention_is_a_breach(settings, monkeypatch):
    """An sdpa that lets packed samples attend to each other must be caught by the comparison."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def leaky(module, q, k, v, attention_mask, **kwargs):
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, "sdpa", leaky)
    records = run_case("qwen3", QWEN3, hf_modes("eager", False), TOL, settings)
    problems = failures(records)
    assert any("hf_attn-sdpa" in p and "deviates" in p for p in problems), problems
    # The same leak hides inside the bf16-sized case tolerance: why fp32 runs tighten it.
    loss_ref, loss_leak = (r["metrics"]["loss"] for r in records)
    assert TOL.allows(loss_leak, loss_ref)
    assert records[1]["tolerance"] == {"rtol": 1e-4, "atol": 1e-5}
    assert records[1]["case_tolerance"] == {"rtol": 1e-2, "atol": 1e-2}


def test_planted_silent_fallback_is_caught(settings, monkeypatch):
    """sdpa requested, eager ran (what transformers does silently): the call trace must tell."""
    real_build = toy.build_model

    def build_then_fall_back(config, **kwargs):
        model = real_build(config, **kwargs)
        model.config._attn_implementation = "eager"
        return model

    monkeypatch.setattr(toy, "build_model", build_then_fall_back)
    records = run_case("qwen3", QWEN3, hf_modes("eager", False), TOL, settings)
    problems = failures(records)
    assert any("requested 'sdpa', ran 'eager'" in p for p in problems), problems


def test_mode_that_raises_is_recorded_and_the_rest_still_run(settings):
    modes = [ModelMode("hf", "eager"), ModelMode("hf", "no_such_attention"), ModelMode("hf", "sdpa")]
    records = run_case("qwen3", QWEN3, modes, TOL, settings)
    assert [r["status"] for r in records] == ["ok", "error", "ok"]
    assert "no_such_attention" in records[1]["error"]
    assert any("hf_attn-no_such_attention raised" in p for p in failures(records))


def test_cpu_skips_flash_modes_with_a_reason(settings):
    modes = [ModelMode("hf", "eager"), ModelMode("parity", "parity_flash_attention_2_with_sp")]
    records = run_case("qwen3", QWEN3, modes, TOL, settings)
    assert records[1]["status"] == "skipped" and "needs a CUDA device" in records[1]["reason"]
    assert failures(records) == []


def test_bad_dtype_setting_is_rejected(monkeypatch, tmp_path):
    monkeypatch.setenv("PARITY_DTYPE", "float33")
    with pytest.raises(ValueError, match="not a torch dtype"):
        RunSettings.from_env(tmp_path)


def _raise_from(filename: str) -> ImportError:
    """An ImportError whose innermost frame is in ``filename`` (as transformers' loader raises it)."""
    scope: dict = {}
    source = "def load():\n    raise ImportError('`kernels` is either not installed')\n"
    exec(compile(source, filename, "exec"), scope)
    try:
        scope["load"]()
    except ImportError as exc:
        return exc
    raise AssertionError("unreachable")


def test_hub_kernel_routing_at_build_is_unsupported_with_the_reason():
    from parity.harness.patch_runner import classify, unsupported_reason

    routed = _raise_from("/site-packages/transformers/integrations/hub_kernels.py")
    assert classify(routed, "build") == ("unsupported", "model")
    assert "hub kernel" in unsupported_reason(routed) and "`kernels`" in unsupported_reason(routed)
    # control: the same ImportError from anywhere else stays the model's error, and outside build a tool's
    elsewhere = _raise_from("/site-packages/transformers/modeling_utils.py")
    assert classify(elsewhere, "build") == ("error", "model")
    assert classify(routed, "inputs") == ("error", "harness")


def test_failed_flash_load_mark_is_forgotten(monkeypatch):
    """transformers marks a flash implementation loaded before loading it; a failed build must not keep it."""
    from transformers import modeling_flash_attention_utils as fa_utils

    monkeypatch.setattr(fa_utils, "_loaded_implementation", "kernels-community/some-kernel", raising=False)

    def refuse(model, requested):
        raise ImportError("`kernels` is either not installed")

    monkeypatch.setattr(toy, "_apply_attn_implementation", refuse)
    with pytest.raises(ImportError):
        toy.build_model(QWEN3, attn_implementation="flash_attention_2")
    assert fa_utils._loaded_implementation is None


def _built_models(monkeypatch) -> list:
    """Weak references to every model the case builds, each tied into a reference cycle, so that only
    the cyclic collector can free it (what holds a real model's weights after its mode)."""
    import weakref

    from parity.harness import patch_runner

    built = []
    real_build = patch_runner.toy.build_model

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.__dict__["_parity_test_cycle"] = model
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(patch_runner.toy, "build_model", build)
    return built


def test_models_of_a_case_are_collected_although_the_heap_is_frozen(settings, monkeypatch):
    """settle_heap freezes the survivors before a case (a full collection per mode cost ~0.2 s); what the
    case builds must still be freed by the collections after each mode."""
    import gc

    built = _built_models(monkeypatch)
    run_case("qwen3", QWEN3, hf_modes("eager", False), TOL, settings, isolate=False)
    assert len(built) >= 2 and gc.get_freeze_count() > 0  # the weights snapshot's model and one per mode
    assert [ref() is None for ref in built] == [True] * len(built)


def test_negative_control_freezing_inside_a_case_keeps_its_models(settings, monkeypatch):
    """A freeze while a case's model is uncollected garbage (here: planted at the start of the per-mode
    release, before its collection) pins that model for good: the check above sees it."""
    import gc

    from parity.harness import patch_runner

    built = _built_models(monkeypatch)
    real_release = patch_runner._release

    def freeze_then_release(device):
        gc.freeze()
        real_release(device)

    monkeypatch.setattr(patch_runner, "_release", freeze_then_release)
    try:
        records = run_case("qwen3", QWEN3, hf_modes("eager", False), TOL, settings, isolate=False)
        assert failures(records) == []
        assert any(ref() is not None for ref in built)  # pinned by the misplaced freeze
    finally:
        gc.unfreeze()
        gc.collect()
    assert all(ref() is None for ref in built)
