"""Which kernel library serves which backend: named per variant, never guessed from what imports.

On the GPU image the eager variant's ``parity_flash_attention_2_with_sp`` took ``flash_attn`` as soon
as it was importable (the import-order bug). Here both libraries are planted as CPU stand-ins (a fake
``flash_attn`` module and a fake ``torch.nn.attention.varlen.varlen_attn``), the CUDA/half-precision
check is waived from the test side, and each variant must run exactly its own library. Negative
controls: the old import-order rule planted back, and a hub kernel standing in for flash_attn in
transformers' own ``flash_attention_2`` path, must both fail the provider check.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from parity.backend import attention  # noqa: E402
from parity.backend.attention import PARITY_FA2, PARITY_FA3, parity_attention_forward  # noqa: E402
from parity.harness import toy  # noqa: E402
from parity.harness.patch_runner import RunSettings, run_mode  # noqa: E402
from parity.results.compare import resolution_mismatch  # noqa: E402
from parity.results.modes import (  # noqa: E402
    PARITY_ATTENTION,
    VARIANTS,
    ModelMode,
    expected_provider,
    variant_kernels,
)
from parity.results.records import Tolerance, make_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _per_sequence(q, k, v, cu, causal, scale):
    outs = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        rep = q.shape[1] // k.shape[1]
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        )
    return torch.cat(outs, dim=1).transpose(0, 1)


@pytest.fixture
def both_libraries(monkeypatch):
    """flash_attn and torch's varlen kernel both importable (CPU stand-ins); returns their call log."""
    calls: list[str] = []

    def flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, *, dropout_p, softmax_scale, causal, window_size
    ):
        calls.append("flash_attn")
        return _per_sequence(q, k, v, cu_q, causal, softmax_scale)

    fake = types.ModuleType("flash_attn")
    fake.__version__ = "9.9.9"
    fake.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", fake)

    import torch.nn.attention.varlen as varlen_mod

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        calls.append("torch.varlen_attn")
        return _per_sequence(q, k, v, cu_q, window_size == (-1, 0), scale)

    monkeypatch.setattr(varlen_mod, "varlen_attn", varlen_attn)
    attention._signature_params.cache_clear()
    monkeypatch.setattr(attention, "_device_problems", lambda q: [])  # "this is a GPU in bf16"
    yield calls
    attention._signature_params.cache_clear()
    attention.reset_kernel_choice()


def _fa2_call() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=gen) for _ in range(3))
    parity_attention_forward(PARITY_FA2, types.SimpleNamespace(is_causal=True), q, k, v, None)


def test_every_variant_names_one_known_library_for_each_backend_it_runs():
    for variant in VARIANTS:
        kernels = variant_kernels(variant)
        for backend in PARITY_ATTENTION[variant]:
            assert kernels[backend] in attention.KERNEL_LIBRARIES[backend], (variant, backend)
    assert variant_kernels("eager")[PARITY_FA2] == "torch.varlen_attn"
    assert variant_kernels("fa2")[PARITY_FA2] == "flash_attn"
    assert variant_kernels("fa3")[PARITY_FA3] == "flash_attn_interface"
    with pytest.raises(ValueError, match="cannot be served by 'flash_attn'"):
        attention.use_kernels({PARITY_FA3: "flash_attn"})
    with pytest.raises(KeyError, match="unknown parity attention backend"):
        attention.use_kernels({"parity_flash_attention_9": "flash_attn"})


@pytest.mark.parametrize("variant", ["eager", "fa2"])
def test_the_variant_library_runs_although_the_other_is_importable(both_libraries, variant):
    attention.use_kernels(variant_kernels(variant))
    attention.reset_kernel_log()
    _fa2_call()
    want = variant_kernels(variant)[PARITY_FA2]
    assert both_libraries == [want], f"{variant} ran {both_libraries}, not only {want}"
    provider = attention.kernel_providers_used()[PARITY_FA2]
    assert provider.split()[0] == want
    record = {"requested": {"kernel_provider": want}, "resolved": {"kernel_provider": provider}}
    assert resolution_mismatch(record) is None


def test_negative_control_the_import_order_rule_is_caught(both_libraries, monkeypatch):
    """The old rule (flash_attn whenever importable) planted back: the eager variant's check must fail."""

    def import_order(backend, q):
        return "flash_attn 9.9.9", attention._varlen_flash_attn

    monkeypatch.setattr(attention, "_resolve_kernel", import_order)
    attention.use_kernels(variant_kernels("eager"))
    attention.reset_kernel_log()
    _fa2_call()
    provider = attention.kernel_providers_used()[PARITY_FA2]
    record = {
        "requested": {"kernel_provider": "torch.varlen_attn"},
        "resolved": {"kernel_provider": provider},
    }
    assert (
        resolution_mismatch(record)
        == "kernel_provider: requested 'torch.varlen_attn', ran 'flash_attn 9.9.9'"
    )


def test_a_chosen_library_that_cannot_run_fails_with_the_reason(both_libraries, monkeypatch):
    """flash_attn chosen but broken (an ABI mismatch): an error naming it, never torch's kernel instead."""
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ImportError
    monkeypatch.delenv(attention.ENV_ALLOW_FALLBACK, raising=False)
    attention.use_kernels({PARITY_FA2: "flash_attn"})
    attention.reset_kernel_log()
    with pytest.raises(
        RuntimeError, match=r"flash_attn, cannot run here: flash_attn is not importable"
    ) as err:
        _fa2_call()
    assert "torch.varlen_attn" in str(err.value)  # the way out is named
    assert both_libraries == [] and attention.kernel_call_counts() == {}


# --------------------------------------------------------------------------------------------
# transformers' own flash path: the package, or a hub kernel it downloads instead


REPO = "kernels-community/flash-attn2"


def _fake_flash_path(monkeypatch, *, serve_as: str, module: str) -> None:
    """transformers' routing of flash_attention_2, planted: ``serve_as`` is the name the model ends up
    with (``flash_attention_2``, or the hub repo when ``kernels`` stands in for a missing flash_attn),
    and the flash functions it loads come from ``module``.
    """
    from transformers import AttentionInterface, PreTrainedModel
    from transformers import modeling_flash_attention_utils as fa_utils
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    def varlen(*args, **kwargs):  # stands for the kernel's flash_attn_varlen_func
        raise AssertionError("not called: the attention function below computes with sdpa")

    varlen.__module__ = module

    def attention_fn(mod, q, k, v, mask, **kwargs):  # what transformers registered under serve_as
        monkeypatch.setattr(fa_utils, "_loaded_implementation", serve_as)
        monkeypatch.setattr(fa_utils, "_flash_varlen_fn", varlen)
        return sdpa_attention_forward(mod, q, k, v, None, is_causal=True, scaling=kwargs.get("scaling"))

    original = PreTrainedModel._check_and_adjust_attn_implementation

    def check_and_adjust(self, attn_implementation, *args, **kwargs):
        if attn_implementation == "flash_attention_2":
            AttentionInterface.register(serve_as, attention_fn)
            AttentionMaskInterface.register(serve_as, flash_attention_mask)
            return serve_as
        return original(self, attn_implementation, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "_check_and_adjust_attn_implementation", check_and_adjust)


def _hf_fa2_record(tmp_path) -> dict:
    mode = ModelMode("hf", "flash_attention_2")
    settings = RunSettings("fa2", torch.device("cpu"), torch.float32, tmp_path)
    ran, _tensors = run_mode(toy.load_config(toy.config_path("qwen3")), mode, settings)
    requested = {
        "attn_implementation": mode.attn_implementation,
        "kernel_provider": expected_provider("fa2", mode),
    }
    return make_record(
        suite="patch",
        model="qwen3",
        variant="fa2",
        mode=mode.to_json(),
        status="ok",
        requested=requested,
        resolved=ran["resolved"],
        metrics=ran["metrics"],
        tolerance=Tolerance(1e-2, 1e-2),
        fingerprint={},
    )


def test_hf_flash_attention_2_served_by_flash_attn_passes_the_provider_check(tmp_path, monkeypatch):
    _fake_flash_path(monkeypatch, serve_as="flash_attention_2", module="flash_attn.flash_attn_interface")
    record = _hf_fa2_record(tmp_path)
    assert record["resolved"]["kernel_provider"] == "flash_attn"
    assert resolution_mismatch(record) is None


def test_hf_flash_attention_2_routed_to_a_hub_kernel_fails_the_provider_check(tmp_path, monkeypatch):
    """transformers with ``kernels`` installed and no flash_attn downloads kernels-community/flash-attn2."""
    _fake_flash_path(monkeypatch, serve_as=REPO, module="flash_attn2_hub_build")
    record = _hf_fa2_record(tmp_path)
    assert record["resolved"]["kernel_provider"] == f"hub:{REPO}"
    mismatch = resolution_mismatch(record) or ""
    assert f"kernel_provider: requested 'flash_attn', ran 'hub:{REPO}'" in mismatch
    assert f"attn_implementation: requested 'flash_attention_2', ran '{REPO}'" in mismatch


def test_e2e_ranks_get_the_variant_library_explicitly():
    """Every training rank is told the library (``--attn-kernel``): nothing is left to its imports."""
    from parity.harness.e2e_runner import E2ESettings
    from parity.training.train import parse_args

    def kernel(variant: str, attn: str) -> str | None:
        run = RunSettings(variant, torch.device("cuda"), torch.bfloat16, ROOT)
        return E2ESettings(run=run, nproc=1, attn=attn).kernel

    assert kernel("eager", PARITY_FA2) == "torch.varlen_attn"
    assert kernel("fa2", PARITY_FA2) == "flash_attn"
    assert kernel("fa3", PARITY_FA3) == "flash_attn_interface"
    assert kernel("eager", "parity_sdpa_with_sp") == "torch.sdpa"
    cfg = parse_args(
        ["--config", "qwen3", "--out", "x", "--attn", PARITY_FA2, "--attn-kernel", "torch.varlen_attn"]
    )
    assert (cfg.attn, cfg.attn_kernel) == (PARITY_FA2, "torch.varlen_attn")
