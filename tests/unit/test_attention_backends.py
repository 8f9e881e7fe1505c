"""parity's attention backends against transformers' own sdpa/eager, single process, CPU fp32.

Function level: random q/k/v on a fake attention module, compared with HF's attention functions
run per packed sequence (an independent reference: no mask construction shared with parity).
Model level: tiny qwen3 / qwen3_moe under ``parity_sdpa_with_sp`` vs ``eager`` on a packed batch.
Every positive comparison has a negative control that the same comparison must catch.
The flash names' varlen plumbing runs here with a CPU stand-in kernel; the real kernels need CUDA.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.deepseek_v3.modeling_deepseek_v3 import eager_attention_forward

from parity.backend import attention
from parity.backend.attention import BACKENDS, PARITY_FA2, PARITY_FA3, PARITY_SDPA, parity_attention_forward
from parity.backend.ulysses import cu_seqlens_from_position_ids

ATOL = 2e-6
LENS = (7, 12, 5, 8)


class FakeAttention(torch.nn.Module):
    """The attributes transformers' attention modules expose to attention functions."""

    def __init__(self, heads: int, kv_heads: int, causal: bool = True) -> None:
        super().__init__()
        self.is_causal = causal
        self.num_key_value_groups = heads // kv_heads


def packed_positions(lens: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)


def qkv(heads: int, kv_heads: int, seq: int, d_qk: int, d_v: int, batch: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, d_qk, generator=gen)
    k = torch.randn(batch, kv_heads, seq, d_qk, generator=gen)
    v = torch.randn(batch, kv_heads, seq, d_v, generator=gen)
    return [t.requires_grad_() for t in (q, k, v)]


def per_sequence_reference(fn, module, q, k, v, lens, *, causal: bool, scale: float):
    """HF attention run separately on every packed sequence: [B, S, H, Dv]."""
    outs, start = [], 0
    for n in lens:
        sl = slice(start, start + n)
        if fn is sdpa_attention_forward:
            out, _ = fn(module, q[:, :, sl], k[:, :, sl], v[:, :, sl], None, scaling=scale, is_causal=causal)
        else:  # eager needs an explicit additive mask
            mask = torch.zeros(n, n)
            if causal:
                mask = mask.masked_fill(
                    torch.ones(n, n, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min
                )
            out, _ = fn(module, q[:, :, sl], k[:, :, sl], v[:, :, sl], mask[None, None], scaling=scale)
        outs.append(out)
        start += n
    return torch.cat(outs, dim=1)


def max_dev(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


def fwd_bwd(fn, inputs, proj):
    out = fn(*inputs)
    (out * proj).sum().backward()
    grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    return out.detach(), grads


def compare_with_reference(
    *,
    heads,
    kv_heads,
    d_qk,
    d_v,
    causal,
    kwargs_fn,
    ref_fn=sdpa_attention_forward,
    backend=PARITY_SDPA,
    lens=LENS,
) -> float:
    """Max deviation (output and q/k/v grads) of parity vs HF run per sequence."""
    module = FakeAttention(heads, kv_heads, causal)
    inputs = qkv(heads, kv_heads, sum(lens), d_qk, d_v)
    scale = d_qk**-0.5
    proj = torch.randn(1, sum(lens), heads, d_v, generator=torch.Generator().manual_seed(3))
    pos = packed_positions(lens)

    def parity_fn(q, k, v):
        return parity_attention_forward(backend, module, q, k, v, None, scaling=scale, **kwargs_fn(pos))[0]

    def ref(q, k, v):
        return per_sequence_reference(ref_fn, module, q, k, v, lens, causal=causal, scale=scale)

    out, grads = fwd_bwd(parity_fn, inputs, proj)
    ref_out, ref_grads = fwd_bwd(ref, inputs, proj)
    assert out.shape == (1, sum(lens), heads, d_v)  # [B, S, H, Dv]: what transformers' callers reshape
    devs = [max_dev(out, ref_out)] + [max_dev(g, r) for g, r in zip(grads, ref_grads, strict=True)]
    print(
        f"{backend} vs HF per-sequence: out {devs[0]:.2e}, dq/dk/dv {devs[1]:.2e}/{devs[2]:.2e}/{devs[3]:.2e}"
    )
    return max(devs)


def positions_kwargs(pos):
    return {"position_ids": pos}


def cu_kwargs(pos):
    cu, max_len = cu_seqlens_from_position_ids(pos)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}


def no_packing_kwargs(pos):  # negative control: packing info dropped -> attention across samples
    return {}


@pytest.fixture(autouse=True)
def _clean_log():
    attention.reset_kernel_log()
    yield
    attention.reset_kernel_log()


# --------------------------------------------------------------------------------------------
# registration


def test_registered_in_attention_and_mask_registries() -> None:
    attention.register()  # idempotent
    attention.register()
    for name in BACKENDS:
        assert name in AttentionInterface._global_mapping
        # the mask registry is what keeps padding masks from being silently dropped
        assert name in AttentionMaskInterface._global_mapping


# --------------------------------------------------------------------------------------------
# function level


@pytest.mark.parametrize("kwargs_fn", [positions_kwargs, cu_kwargs], ids=["position_ids", "cu_seqlens"])
def test_packed_causal_gqa_matches_hf_sdpa(kwargs_fn) -> None:
    dev = compare_with_reference(heads=4, kv_heads=2, d_qk=16, d_v=16, causal=True, kwargs_fn=kwargs_fn)
    assert dev < ATOL
    assert attention.kernel_call_counts() == {PARITY_SDPA: 1}  # parity ran (once: one forward)
    assert attention.kernel_providers_used() == {PARITY_SDPA: "torch.sdpa"}


def test_negative_control_attention_across_samples_is_detected() -> None:
    dev = compare_with_reference(
        heads=4, kv_heads=2, d_qk=16, d_v=16, causal=True, kwargs_fn=no_packing_kwargs
    )
    assert dev > 1e3 * ATOL


def test_dv_ne_dqk_matches_hf_eager() -> None:
    """DeepSeek MLA: q/k head dim 24, v head dim 16; reference is deepseek's own eager function."""
    dev = compare_with_reference(
        heads=4,
        kv_heads=4,
        d_qk=24,
        d_v=16,
        causal=True,
        kwargs_fn=positions_kwargs,
        ref_fn=eager_attention_forward,
    )
    assert dev < ATOL


def test_non_causal_matches_hf_sdpa() -> None:
    """Vision blocks: module.is_causal False, sequences (images) given as cu_seqlens."""
    dev = compare_with_reference(heads=4, kv_heads=4, d_qk=16, d_v=16, causal=False, kwargs_fn=cu_kwargs)
    assert dev < ATOL


def test_non_causal_negative_control() -> None:
    dev = compare_with_reference(
        heads=4, kv_heads=4, d_qk=16, d_v=16, causal=False, kwargs_fn=no_packing_kwargs
    )
    assert dev > 1e3 * ATOL


def test_is_causal_kwarg_overrides_module() -> None:
    module = FakeAttention(2, 2, causal=True)
    q, k, v = qkv(2, 2, 10, 8, 8)
    out, _ = parity_attention_forward(PARITY_SDPA, module, q, k, v, None, is_causal=False)
    ref, _ = sdpa_attention_forward(module, q, k, v, None, is_causal=False)
    assert max_dev(out, ref) < ATOL


def test_padding_mask_removes_padded_keys() -> None:
    """A 2-D padding mask (what the registered mask function hands over) hides padded tokens."""
    module = FakeAttention(4, 2)
    q, k, v = qkv(4, 2, 12, 16, 16, batch=2)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :4] = False  # left padding in row 1
    out, _ = parity_attention_forward(PARITY_SDPA, module, q, k, v, mask)
    ref0, _ = sdpa_attention_forward(module, q[:1], k[:1], v[:1], None)
    ref1, _ = sdpa_attention_forward(module, q[1:, :, 4:], k[1:, :, 4:], v[1:, :, 4:], None)
    assert max_dev(out[:1], ref0) < ATOL
    assert max_dev(out[1:, 4:], ref1) < ATOL
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# the flash names' varlen plumbing, with a CPU stand-in for the kernel


def fake_varlen_kernel(q, k, v, cu, max_len, *, causal, scale, dropout, window):
    """Varlen semantics on [T, H, D] with per-sequence sdpa: what flash_attn_varlen_func computes."""
    assert q.shape[-1] == v.shape[-1], "FA kernels take one head dim; parity must pad v"
    assert cu.dtype == torch.int32 and int(cu[-1]) == q.shape[0]
    assert max_len == int((cu[1:] - cu[:-1]).max())
    outs = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        ks = ks.repeat_interleave(q.shape[1] // k.shape[1], 0)
        vs = vs.repeat_interleave(q.shape[1] // k.shape[1], 0)
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        )
    return torch.cat(outs, dim=1).transpose(0, 1)


@pytest.fixture
def cpu_varlen(monkeypatch):
    def resolve(backend, q):
        return "fake.varlen", fake_varlen_kernel

    monkeypatch.setattr(attention, "_resolve_kernel", resolve)


@pytest.mark.parametrize("kwargs_fn", [positions_kwargs, cu_kwargs], ids=["position_ids", "cu_seqlens"])
def test_varlen_path_matches_hf(cpu_varlen, kwargs_fn) -> None:
    dev = compare_with_reference(
        heads=4,
        kv_heads=2,
        d_qk=24,
        d_v=16,
        causal=True,
        kwargs_fn=kwargs_fn,
        backend=PARITY_FA2,
        ref_fn=eager_attention_forward,
    )
    assert dev < ATOL
    assert attention.kernel_providers_used() == {PARITY_FA2: "fake.varlen"}


def test_varlen_path_with_padding(cpu_varlen) -> None:
    module = FakeAttention(4, 2)
    q, k, v = qkv(4, 2, 12, 16, 16, batch=2)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :4] = False
    out, _ = parity_attention_forward(PARITY_FA2, module, q, k, v, mask)
    ref1, _ = sdpa_attention_forward(module, q[1:, :, 4:], k[1:, :, 4:], v[1:, :, 4:], None)
    assert max_dev(out[1:, 4:], ref1) < ATOL
    assert float(out[1, :4].detach().abs().max()) == 0.0  # padded rows are not computed


@pytest.mark.parametrize("torch_version", ["2.11", "2.13"])
def test_torch_varlen_adapter_matches_signature(monkeypatch, torch_version) -> None:
    """The torch.varlen_attn adapter: causal via window_size=(-1, 0), GQA expanded unless enable_gqa."""
    import torch.nn.attention.varlen as varlen_mod

    seen = {}

    def varlen_211(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        *,
        return_aux=None,
        scale=None,
        window_size=(-1, -1),
    ):
        seen.update(window=window_size, kv_heads=key.shape[1])
        assert window_size in ((-1, 0), (-1, -1))
        return fake_varlen_kernel(
            query,
            key,
            value,
            cu_seq_q,
            max_q,
            causal=window_size == (-1, 0),
            scale=scale,
            dropout=0.0,
            window=None,
        )

    def varlen_213(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        *,
        return_aux=None,
        scale=None,
        window_size=(-1, -1),
        enable_gqa=False,
    ):
        seen.update(gqa=enable_gqa)
        return varlen_211(
            query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size
        )

    monkeypatch.setattr(varlen_mod, "varlen_attn", varlen_211 if torch_version == "2.11" else varlen_213)
    monkeypatch.setattr(
        attention, "_resolve_kernel", lambda backend, q: ("torch.varlen_attn", attention._varlen_torch)
    )
    attention._signature_params.cache_clear()
    try:
        dev = compare_with_reference(
            heads=4, kv_heads=2, d_qk=16, d_v=16, causal=True, kwargs_fn=positions_kwargs, backend=PARITY_FA2
        )
    finally:
        attention._signature_params.cache_clear()
    assert dev < ATOL
    assert seen["window"] == (-1, 0)
    if torch_version == "2.11":
        assert seen["kv_heads"] == 4  # expanded by parity: 2.11 has no enable_gqa
    else:
        assert seen["gqa"] is True and seen["kv_heads"] == 2


@pytest.mark.parametrize("backend", [PARITY_FA2, PARITY_FA3])
def test_flash_names_refuse_to_fall_back_silently(backend, monkeypatch) -> None:
    monkeypatch.delenv(attention.ENV_ALLOW_FALLBACK, raising=False)
    q, k, v = qkv(2, 2, 8, 16, 16)
    with pytest.raises(RuntimeError, match="FlashAttention"):
        parity_attention_forward(backend, FakeAttention(2, 2), q, k, v, None)
    assert attention.kernel_call_counts() == {}
    monkeypatch.setenv(attention.ENV_ALLOW_FALLBACK, "1")
    parity_attention_forward(backend, FakeAttention(2, 2), q, k, v, None)
    assert attention.kernel_providers_used() == {backend: "torch.sdpa[fallback]"}


# --------------------------------------------------------------------------------------------
# whole models


BASE = {
    "vocab_size": 128,
    "hidden_size": 128,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 256,
}
CONFIGS = {
    "qwen3": {"model_type": "qwen3", **BASE},
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        **BASE,
        "moe_intermediate_size": 32,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "norm_topk_prob": True,
    },
}


def build(model_type: str, attn: str) -> torch.nn.Module:
    cfg = dict(CONFIGS[model_type])
    cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    kwargs = {"experts_implementation": "eager"} if model_type == "qwen3_moe" else {}
    if "flash" in attn:  # flash names fail transformers' build-time validation: build, then switch
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", **kwargs)
        attention.set_attention_backend(model, attn)
    else:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, **kwargs)
    return model


def packed_batch(lens=(13, 20, 15)):
    ids = torch.randint(0, 128, (1, sum(lens)), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids, "position_ids": packed_positions(lens), "use_cache": False}


def run(model, **batch):
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), float(out.loss.detach()), grads


@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_moe"])
def test_model_packed_matches_eager(model_type) -> None:
    batch = packed_batch()
    ref_logits, ref_loss, ref_grads = run(build(model_type, "eager"), **batch)
    model = build(model_type, PARITY_SDPA)
    logits, loss, grads = run(model, **batch)
    grad_dev = max(max_dev(grads[n], ref_grads[n]) for n in ref_grads)
    print(
        f"{model_type} {PARITY_SDPA} vs eager: logits {max_dev(logits, ref_logits):.2e}, "
        f"loss {abs(loss - ref_loss):.2e}, grads {grad_dev:.2e}"
    )
    assert max_dev(logits, ref_logits) < 1e-5
    assert abs(loss - ref_loss) < 1e-5
    assert grad_dev < 1e-5
    assert attention.kernel_call_counts() == {PARITY_SDPA: model.config.num_hidden_layers}

    # negative control: one sequence spanning the whole pack (same RoPE positions) must be caught
    cu = torch.tensor([0, batch["input_ids"].shape[1]], dtype=torch.int32)
    leaked = model(**batch, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=48, max_length_k=48).logits
    assert max_dev(leaked, ref_logits) > 1e-2


def test_model_left_padding_mask_is_honoured() -> None:
    """The crucial registration trap: without a registered mask function, padding is dropped."""
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0
    ref = build("qwen3", "sdpa")(input_ids=ids, attention_mask=mask, use_cache=False).logits.detach()
    model = build("qwen3", PARITY_SDPA)
    out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.detach()
    assert max_dev(out[0], ref[0]) < 1e-5
    assert max_dev(out[1, 5:], ref[1, 5:]) < 1e-5
    unmasked = model(input_ids=ids, use_cache=False).logits.detach()  # negative control
    assert max_dev(unmasked[1, 5:], ref[1, 5:]) > 1e-3


def test_flash_name_set_after_build_runs_parity_function(monkeypatch) -> None:
    """Built as sdpa, switched to the flash name: the parity function (not HF's) must run."""
    monkeypatch.setenv(attention.ENV_ALLOW_FALLBACK, "1")
    batch = packed_batch()
    ref_logits, _, _ = run(build("qwen3", "eager"), **batch)
    model = build("qwen3", PARITY_FA2)
    assert model.config._attn_implementation == PARITY_FA2
    logits, _, _ = run(model, **batch)
    assert max_dev(logits, ref_logits) < 1e-5
    assert attention.kernel_call_counts() == {PARITY_FA2: model.config.num_hidden_layers}
    assert attention.kernel_providers_used() == {PARITY_FA2: "torch.sdpa[fallback]"}
