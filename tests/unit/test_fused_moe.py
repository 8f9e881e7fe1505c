"""parity's fused experts against each model's own eager experts loop, single process, CPU fp32.

For every experts class the models under test use, the same module (same weights) runs once with
``eager`` and once with ``fused``; outputs and the gradients of hidden states, routing weights and
expert weights must agree. gpt-oss covers the layout flags (transposed weights, biases, an
interleaved custom gate). The loop fallback (torch builds without a CPU grouped_mm) is checked
against the same reference, and a negative control shows the comparison catches a broken combine.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from parity.backend import attention, moe
from parity.harness.checks._common import tiny_text_config
from parity.harness.tiny import tiny_experts

ATOL, RTOL = 1e-6, 1e-6  # bound = ATOL + RTOL * max|reference|


experts_module = tiny_experts


def routing(tokens: int, experts: int, k: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=gen)
    scores[:, 0] += 0.3  # an over-subscribed expert and (likely) an idle one
    weights, idx = torch.topk(scores.softmax(-1), k, dim=-1)
    return idx, weights


def run_impl(module: torch.nn.Module, impl: str, x, idx, w, proj) -> dict[str, torch.Tensor]:
    module.config._experts_implementation = impl
    module.zero_grad(set_to_none=True)
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = module(x, idx, w)
    (out * proj).sum().backward()
    res = {"out": out.detach(), "d_hidden": x.grad, "d_weights": w.grad}
    res |= {f"d_{n}": p.grad.clone() for n, p in module.named_parameters()}
    return res


def deviations(name: str, top_k: int = 2) -> dict[str, tuple[float, float]]:
    """name -> (max |fused - eager|, max |eager|) for the output and every gradient."""
    module = experts_module(name)
    k = 3 if name == "deepseek_v3" else top_k
    hidden = 32
    gen = torch.Generator().manual_seed(2)
    x, proj = torch.randn(40, hidden, generator=gen), torch.randn(40, hidden, generator=gen)
    idx, w = routing(40, module.num_experts, k)
    ref = run_impl(module, "eager", x, idx, w, proj)
    got = run_impl(module, "fused", x, idx, w, proj)
    assert ref.keys() == got.keys()
    missing = [key for key in ref if got[key] is None or ref[key] is None]
    assert not missing, f"no gradient for {missing}"
    return {key: (float((got[key] - ref[key]).abs().max()), float(ref[key].abs().max())) for key in ref}


def assert_close(devs: dict[str, tuple[float, float]]) -> None:
    breaches = {k: d for k, (d, scale) in devs.items() if not d <= ATOL + RTOL * scale}
    assert not breaches, breaches


@pytest.fixture(autouse=True)
def _clean_log():
    moe.reset_kernel_log()
    yield
    moe.reset_kernel_log()


def test_registered() -> None:
    from transformers.integrations.moe import ExpertsInterface

    moe.register()
    assert ExpertsInterface._global_mapping[moe.FUSED] is moe.fused_experts_forward


@pytest.mark.parametrize(
    "name",
    ["qwen3_moe", "qwen3_vl_moe", "qwen3_5_moe", "qwen3_omni_moe", "deepseek_v3", "mixtral", "gpt_oss"],
)
def test_fused_matches_eager(name: str) -> None:
    devs = deviations(name)
    print(f"{name} fused vs eager: " + ", ".join(f"{k}={d:.1e}" for k, (d, _) in devs.items()))
    assert_close(devs)
    assert moe.kernel_call_counts() == {moe.FUSED: 1}  # fused really ran (eager is not in the log)


def test_loop_fallback_matches_eager(monkeypatch) -> None:
    """torch builds without a CPU grouped_mm (e.g. torch 2.11 CPU) take the per-expert loop."""
    monkeypatch.setattr(moe, "_native_works", lambda device_type, dtype: False)
    assert_close(deviations("qwen3_moe"))
    assert moe.kernel_providers_used() == {moe.FUSED: moe.PROVIDER_LOOP}


def test_native_grouped_mm_used_when_available() -> None:
    deviations("qwen3_moe")
    expected = moe.PROVIDER_GROUPED_MM if moe._native_works("cpu", torch.float32) else moe.PROVIDER_LOOP
    assert moe.kernel_providers_used() == {moe.FUSED: expected}


def test_negative_control_unweighted_combine_is_detected(monkeypatch) -> None:
    def unweighted(y, perm, top_k_weights):
        return _orig_combine(y, perm, 0 * top_k_weights + 1)  # routing weights ignored

    _orig_combine = moe._combine
    monkeypatch.setattr(moe, "_combine", unweighted)
    devs = deviations("qwen3_moe")
    assert devs["out"][0] > 1e-2


def test_backward_is_deterministic() -> None:
    """The gather/combine have no atomics: two runs give bit-identical gradients."""
    a, b = deviations("qwen3_moe"), deviations("qwen3_moe")
    assert a == b


def test_whole_qwen3_moe_model_matches_eager() -> None:
    cfg = tiny_text_config(
        "qwen3_moe",
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        head_dim=64,
    )
    lens = (11, 17, 12)
    ids = torch.randint(0, 128, (1, sum(lens)), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    results = []
    for attn, experts in (("eager", "eager"), (attention.PARITY_SDPA, moe.FUSED)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            cfg, attn_implementation=attn, experts_implementation=experts
        )
        out = model(input_ids=ids, labels=ids, position_ids=pos, use_cache=False)
        out.loss.backward()
        results.append((out.logits.detach(), float(out.loss.detach()), [p.grad for p in model.parameters()]))
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = results
    grad_dev = max(float((g - r).abs().max()) for g, r in zip(grads, ref_grads, strict=True))
    logit_dev = float((logits - ref_logits).abs().max())
    print(
        f"qwen3_moe parity (sdpa_with_sp + fused) vs eager/eager: logits {logit_dev:.1e}, "
        f"loss {abs(loss - ref_loss):.1e}, grads {grad_dev:.1e}"
    )
    assert logit_dev < 1e-5
    assert abs(loss - ref_loss) < 1e-5
    assert grad_dev < 1e-5
    assert moe.kernel_call_counts() == {moe.FUSED: cfg.num_hidden_layers}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal path")
def test_bench_refuses_to_run_without_cuda(tmp_path, capsys) -> None:
    from parity.harness import bench

    out = tmp_path / "bench.json"
    assert bench.main(["--out", str(out)]) == bench.EXIT_NO_CUDA
    assert "needs CUDA" in capsys.readouterr().err
    assert not out.exists()
