"""Attention sinks (gpt-oss ``s_aux``), logit soft-capping (gemma2 ``softcap``) and sliding windows.

parity_sdpa_with_sp against HF's own eager functions of the models that use them (gpt-oss for sinks,
gemma2 for softcap), CPU fp32, packed sequences with GQA, tight tolerance, outputs and every input
gradient (the sinks' included). The flash libraries: softcap reaches the kernel where the library
takes it; what a library lacks (sinks everywhere, softcap in torch.varlen_attn) is refused with a
NotImplementedError that names it, and a kernel build compiled without a feature ("does not
support") is turned into one, so the patch suite records ``unsupported`` rather than an error or a
silently wrong number. Negative controls: the same comparison must see a dropped sink or cap.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

from parity.backend import attention
from parity.backend.attention import PARITY_FA2, PARITY_FA3, PARITY_SDPA, parity_attention_forward
from parity.backend.ulysses import heads_of_sp_rank
from parity.harness import patch_runner

ATOL = 2e-6
RTOL = 1e-6  # of the largest entry: logits here are several units, gradients tens
LENS = (9, 14, 6, 11)  # 40 tokens, windows of 5 cut every sample but the shortest


class SinkAttention(torch.nn.Module):
    """What HF's eager functions read from the module: groups, causality, training, sinks."""

    def __init__(self, heads: int, kv_heads: int, seed: int = 5) -> None:
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = heads // kv_heads
        gen = torch.Generator().manual_seed(seed)
        self.sinks = torch.nn.Parameter(torch.randn(heads, generator=gen))
        self.train(False)


def _inputs(heads: int, kv_heads: int, seq: int, dim: int = 16, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = ((1, heads, seq, dim), (1, kv_heads, seq, dim), (1, kv_heads, seq, dim))
    return [(2 * torch.randn(*s, generator=gen)).requires_grad_() for s in shapes]


def _hf_mask(lens: tuple[int, ...], window: int | None) -> torch.Tensor:
    """The additive [1, 1, S, S] mask HF's mask builders give eager: per sample, causal, window."""
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
    pos = torch.arange(seg.numel())
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


def _positions(lens: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)


def _fwd_bwd(fn, tensors: list[torch.Tensor], proj: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = fn()
    (out * proj).sum().backward()
    grads = [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out.detach(), grads


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs deviation relative to the reference's largest entry (fp32 rounding is relative)."""
    return float((x - ref).abs().max()) / max(float(ref.abs().max()), 1.0)


def _compare(*, sinks: bool, softcap: float | None, window: int | None, drop: str | None = None) -> float:
    """Max relative deviation (output, dq, dk, dv, dsinks) of parity sdpa vs HF eager.

    ``drop``: a negative control, the named input withheld from parity.
    """
    heads, kv_heads, seq = 4, 2, sum(LENS)
    module = SinkAttention(heads, kv_heads)
    q, k, v = _inputs(heads, kv_heads, seq)
    tensors = [q, k, v] + ([module.sinks] if sinks else [])
    proj = torch.randn(1, seq, heads, 16, generator=torch.Generator().manual_seed(3))
    scale = 0.7  # sharp: logits of several units, so the cap and the sinks matter
    mask = _hf_mask(LENS, window)
    extra = {"s_aux": module.sinks} if sinks else {}
    if softcap is not None:
        extra["softcap"] = softcap
    parity_kwargs = {key: value for key, value in extra.items() if key != drop}

    def parity():
        out, _ = parity_attention_forward(
            PARITY_SDPA, module, q, k, v, None, scaling=scale, sliding_window=window,
            position_ids=_positions(LENS), **parity_kwargs,
        )  # fmt: skip
        return out

    def hf():
        if sinks:  # gpt-oss eager has no softcap; gemma2 eager has no sinks
            assert softcap is None
            return gpt_oss_eager(module, q, k, v, mask, scaling=scale)[0]
        return gemma2_eager(module, q, k, v, mask, scaling=scale, softcap=softcap)[0]

    out, grads = _fwd_bwd(parity, tensors, proj)
    ref, ref_grads = _fwd_bwd(hf, tensors, proj)
    devs = [_rel(out, ref)] + [_rel(g, r) for g, r in zip(grads, ref_grads, strict=True)]
    shown = " ".join(f"{d:.1e}" for d in devs)
    print(f"sinks={sinks} softcap={softcap} window={window} drop={drop}: {shown}")
    return max(devs)


@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
def test_sinks_match_gpt_oss_eager(window: int | None) -> None:
    assert _compare(sinks=True, softcap=None, window=window) < RTOL


@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
def test_softcap_matches_gemma2_eager(window: int | None) -> None:
    assert _compare(sinks=False, softcap=2.0, window=window) < RTOL


@pytest.mark.parametrize(
    ("sinks", "softcap", "drop"), [(True, None, "s_aux"), (False, 2.0, "softcap")], ids=["sinks", "softcap"]
)
def test_negative_control_dropped_sinks_or_cap_are_seen(sinks, softcap, drop) -> None:
    assert _compare(sinks=sinks, softcap=softcap, window=5, drop=drop) > 1e3 * RTOL


def test_negative_control_ignored_window_is_seen() -> None:
    module = SinkAttention(4, 2)
    q, k, v = _inputs(4, 2, sum(LENS))
    kwargs = {"scaling": 0.7, "position_ids": _positions(LENS), "s_aux": module.sinks}
    windowed, _ = parity_attention_forward(PARITY_SDPA, module, q, k, v, None, sliding_window=5, **kwargs)
    full, _ = parity_attention_forward(PARITY_SDPA, module, q, k, v, None, **kwargs)
    assert _rel(windowed.detach(), full.detach()) > 1e-2


def test_sinks_with_left_padding_match_per_row_reference() -> None:
    """The 2-D padding mask path (what transformers hands parity's mask function) with sinks."""
    module = SinkAttention(4, 2)
    q, k, v = (t.detach().expand(2, -1, -1, -1)[:, :, :12].contiguous() for t in _inputs(4, 2, 12))
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[1, :5] = False
    out, _ = parity_attention_forward(PARITY_SDPA, module, q, k, v, pad, scaling=0.7, s_aux=module.sinks)
    for row, start in ((0, 0), (1, 5)):
        n = 12 - start
        causal = torch.zeros(n, n).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -1e30)[None, None]
        sl = (slice(row, row + 1), slice(None), slice(start, None))
        ref, _ = gpt_oss_eager(module, q[sl], k[sl], v[sl], causal, scaling=0.7)
        assert _rel(out[row : row + 1, start:], ref) < RTOL


def test_sdpa_path_without_sinks_or_cap_is_unchanged(monkeypatch) -> None:
    """The math path is taken only when needed: plain models keep torch's fused sdpa kernel."""
    calls = []
    original = attention._math_kernel
    monkeypatch.setattr(attention, "_math_kernel", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    module = SinkAttention(4, 2)
    q, k, v = _inputs(4, 2, 16)
    parity_attention_forward(PARITY_SDPA, module, q, k, v, None)
    assert calls == []
    parity_attention_forward(PARITY_SDPA, module, q, k, v, None, softcap=3.0)
    assert calls == [1]


# --------------------------------------------------------------------------------------------
# Ulysses: each sp rank takes the sinks of its own heads


@pytest.mark.parametrize("sp", [2, 4])
def test_heads_of_sp_rank_follow_the_head_exchange(sp: int) -> None:
    """Rank j of gather_seq_scatter_heads receives head chunk j: its sinks are the same block."""
    heads = 8
    tagged = torch.arange(heads, dtype=torch.float32)
    # what _exchange sends to rank j along the head dim of [B, H, S, D]
    q = tagged.view(1, heads, 1, 1).expand(1, heads, 3, 2)
    sent = torch.stack(q.chunk(sp, dim=1), dim=0)
    for rank in range(sp):
        own = heads_of_sp_rank(tagged, rank, sp)
        assert torch.equal(own, sent[rank][0, :, 0, 0]), (rank, own)
    with pytest.raises(ValueError, match="cannot be split"):
        heads_of_sp_rank(torch.zeros(6), 0, 4)


def test_heads_of_sp_rank_passes_gradients_to_its_block_only() -> None:
    sinks = torch.zeros(4, requires_grad=True)
    heads_of_sp_rank(sinks, 1, 2).sum().backward()
    assert sinks.grad.tolist() == [0.0, 0.0, 1.0, 1.0]


# --------------------------------------------------------------------------------------------
# the flash libraries: CPU stand-ins for flash_attn, flash_attn_interface and torch's varlen kernel


def _per_sequence(q, k, v, cu, causal, scale, softcap=None):
    """Varlen semantics with optional softcap, [T, H, D]: what the real kernels compute."""
    outs = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        rep = q.shape[1] // k.shape[1]
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        logits = qs @ ks.transpose(-2, -1) * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        if causal:
            n = e - s
            logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(torch.softmax(logits, -1) @ vs)
    return torch.cat(outs, dim=1).transpose(0, 1)


@pytest.fixture
def fake_flash(monkeypatch):
    """flash_attn (2.8.3-like, takes softcap) and flash_attn_interface (FA3, takes softcap) on CPU."""
    seen: dict[str, object] = {}
    refuse: dict[str, str] = {}

    def fa2(q, k, v, cu_q, cu_k, max_q, max_k, *, dropout_p, softmax_scale, causal, window_size, softcap=0.0):
        seen["flash_attn"] = softcap
        if "flash_attn" in refuse:
            raise RuntimeError(refuse["flash_attn"])
        return _per_sequence(q, k, v, cu_q, causal, softmax_scale, softcap)

    def fa3(q, k, v, cu_q, cu_k, max_q, max_k, *, softmax_scale, causal, window_size, softcap=0.0):
        seen["flash_attn_interface"] = softcap
        if "flash_attn_interface" in refuse:
            raise RuntimeError(refuse["flash_attn_interface"])
        return _per_sequence(q, k, v, cu_q, causal, softmax_scale, softcap), None

    for name, fn in (("flash_attn", fa2), ("flash_attn_interface", fa3)):
        mod = types.ModuleType(name)
        mod.__version__ = "2.8.3"
        mod.flash_attn_varlen_func = fn
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(attention, "_device_problems", lambda q: [])  # "this is a GPU in bf16"
    attention.reset_kernel_log()
    yield seen, refuse
    attention.reset_kernel_choice()
    attention.reset_kernel_log()


def _never_called(*args, **kwargs):
    pytest.fail("the kernel was called although the library cannot take the inputs")


def _flash_call(backend: str, dim: int = 16, **kwargs) -> torch.Tensor:
    module = SinkAttention(4, 2)
    q, k, v = (t.detach() for t in _inputs(4, 2, sum(LENS), dim=dim))
    out, _ = parity_attention_forward(
        backend, module, q, k, v, None, scaling=0.7, position_ids=_positions(LENS), **kwargs
    )
    return out


@pytest.mark.parametrize(
    ("backend", "library"), [(PARITY_FA2, "flash_attn"), (PARITY_FA3, "flash_attn_interface")]
)
def test_flash_libraries_receive_softcap(fake_flash, backend: str, library: str) -> None:
    seen, _ = fake_flash
    attention.use_kernels({backend: library})
    out = _flash_call(backend, softcap=2.0)
    assert seen == {library: 2.0}
    ref = _flash_call(PARITY_SDPA, softcap=2.0)
    assert float((out - ref).abs().max()) < ATOL
    seen.clear()
    _flash_call(backend)  # no softcap: the kernel is called exactly as before (its default, off)
    assert seen == {library: 0.0}


@pytest.mark.parametrize(
    ("backend", "library", "provider"),
    [
        (PARITY_FA2, "flash_attn", "flash_attn 2.8.3"),
        (PARITY_FA2, "torch.varlen_attn", "torch.varlen_attn"),
        (PARITY_FA3, "flash_attn_interface", "flash_attn_interface"),
    ],
)
def test_no_flash_library_takes_sinks(fake_flash, monkeypatch, backend, library, provider) -> None:
    seen, _ = fake_flash
    import torch.nn.attention.varlen as varlen_mod

    monkeypatch.setattr(varlen_mod, "varlen_attn", _never_called, raising=False)
    attention.use_kernels({backend: library})
    module = SinkAttention(4, 2)
    with pytest.raises(NotImplementedError) as err:
        _flash_call(backend, s_aux=module.sinks)
    message = str(err.value)
    assert f"{provider} has no attention-sink input (s_aux)" in message
    assert f"{PARITY_SDPA} run it" in message  # which kernel can
    assert seen == {} and attention.kernel_call_counts() == {}  # refused before any kernel ran


def test_torch_varlen_refuses_softcap_and_names_who_can(fake_flash, monkeypatch) -> None:
    import torch.nn.attention.varlen as varlen_mod

    monkeypatch.setattr(varlen_mod, "varlen_attn", _never_called, raising=False)
    attention.use_kernels({PARITY_FA2: "torch.varlen_attn"})
    with pytest.raises(NotImplementedError) as err:
        _flash_call(PARITY_FA2, softcap=2.0)
    message = str(err.value)
    assert "torch.varlen_attn has no logit soft-capping input (softcap)" in message
    assert f"{PARITY_FA2} on flash_attn" in message and f"{PARITY_FA3} on flash_attn_interface" in message


@pytest.mark.parametrize(
    ("backend", "library", "message"),
    [
        (PARITY_FA2, "flash_attn", "This flash attention build does not support softcap."),
        (PARITY_FA3, "flash_attn_interface", "This flash attention build does not support local attention."),
        (PARITY_FA3, "flash_attn_interface", "This flash attention build does not support tanh softcapping."),
    ],
)
def test_a_kernel_build_without_the_feature_is_unsupported(fake_flash, backend, library, message) -> None:
    _, refuse = fake_flash
    refuse[library] = message
    attention.use_kernels({backend: library})
    with pytest.raises(NotImplementedError) as err:
        _flash_call(backend, softcap=2.0, sliding_window=5)
    assert str(err.value).startswith(library) and message in str(err.value)
    status, _ = patch_runner.classify(err.value, "forward")
    assert status == "unsupported"


def test_other_kernel_errors_stay_errors(fake_flash) -> None:
    _, refuse = fake_flash
    refuse["flash_attn"] = "CUDA error: an illegal memory access was encountered"
    attention.use_kernels({PARITY_FA2: "flash_attn"})
    with pytest.raises(RuntimeError, match="illegal memory access") as err:
        _flash_call(PARITY_FA2)
    assert not isinstance(err.value, NotImplementedError)
    assert patch_runner.classify(err.value, "forward")[0] == "error"


# the FA3 build's own record of its switches (flash_attn_config.CONFIG): a stable-ABI build dies on
# its "does not support" checks instead of raising, so parity must refuse from the record, before the call

_PREBUILT_FA3 = {  # the switches of ../shared/wheels' FA3 wheel that matter here
    "FLASHATTENTION_DISABLE_LOCAL": True,
    "FLASHATTENTION_DISABLE_SOFTCAP": True,
    "FLASHATTENTION_DISABLE_HDIM96": True,
    "FLASHATTENTION_DISABLE_HDIM192": True,
    "FLASHATTENTION_DISABLE_HDIM256": True,
    "FLASHATTENTION_DISABLE_HDIM64": False,
    "FLASHATTENTION_DISABLE_HDIM128": False,
    "FLASHATTENTION_DISABLE_BACKWARD": False,
}


def _fa3_config(monkeypatch, **flags: bool) -> None:
    mod = types.ModuleType("flash_attn_config")
    mod.CONFIG = {"build_flags": {**_PREBUILT_FA3, **flags}}
    monkeypatch.setitem(sys.modules, "flash_attn_config", mod)


def _fa3_dies(*args, **kwargs):
    pytest.fail("the FA3 kernel was called with a feature its build lacks (on the GPU: SIGSEGV)")


@pytest.mark.parametrize(
    ("call", "named"),
    [
        ({"sliding_window": 5}, "local (sliding-window) attention (FLASHATTENTION_DISABLE_LOCAL)"),
        ({"softcap": 2.0}, "logit soft-capping (softcap) (FLASHATTENTION_DISABLE_SOFTCAP)"),
    ],
)
def test_fa3_build_without_the_feature_is_refused_before_the_call(
    fake_flash, monkeypatch, call, named
) -> None:
    _fa3_config(monkeypatch)
    monkeypatch.setattr(sys.modules["flash_attn_interface"], "flash_attn_varlen_func", _fa3_dies)
    attention.use_kernels({PARITY_FA3: "flash_attn_interface"})
    with pytest.raises(NotImplementedError) as err:
        _flash_call(PARITY_FA3, **call)
    assert named in str(err.value) and "build_flash -- fa3" in str(err.value)
    assert patch_runner.classify(err.value, "forward")[0] == "unsupported"


def test_fa3_build_with_the_features_runs_them(fake_flash, monkeypatch) -> None:
    """Control: the same calls on a build that has local and softcap reach the kernel and match sdpa."""
    seen, _ = fake_flash
    _fa3_config(monkeypatch, FLASHATTENTION_DISABLE_LOCAL=False, FLASHATTENTION_DISABLE_SOFTCAP=False)
    attention.use_kernels({PARITY_FA3: "flash_attn_interface"})
    out = _flash_call(PARITY_FA3, softcap=2.0)
    assert seen == {"flash_attn_interface": 2.0}
    assert float((out - _flash_call(PARITY_SDPA, softcap=2.0)).abs().max()) < ATOL


def test_fa3_head_dim_outside_the_build_is_refused(monkeypatch) -> None:
    _fa3_config(monkeypatch)
    gaps = attention.fa3_build_gaps(window=False, softcap=False, head_dim=96, dtype=torch.bfloat16)
    assert gaps == ["head dim 96 (built for head dims 64, 128)"]
    assert attention.fa3_build_gaps(window=False, softcap=False, head_dim=48, dtype=torch.bfloat16) == []
    _fa3_config(monkeypatch, FLASHATTENTION_DISABLE_FP16=True)
    assert attention.fa3_build_gaps(window=False, softcap=False, head_dim=64, dtype=torch.float16) == [
        "float16 (FLASHATTENTION_DISABLE_FP16)"
    ]


def test_fa3_without_a_config_record_is_not_second_guessed(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn_config", None)  # import fails: an older FA3
    assert attention.fa3_build_flags() is None
    assert attention.fa3_build_gaps(window=True, softcap=True, head_dim=512, dtype=torch.float16) == []


def test_transformers_fa3_path_is_refused_before_the_call(monkeypatch) -> None:
    """transformers' flash_attention_3 hands sliding_window to the build: the trace refuses first."""
    from parity.harness import backend_trace

    _fa3_config(monkeypatch)
    q = torch.zeros(1, 4, 40, 64, requires_grad=True)
    k = v = torch.zeros(1, 2, 40, 64)
    traced = backend_trace.BackendTrace()._wrap("attention", "flash_attention_3", _fa3_dies)
    with pytest.raises(NotImplementedError, match="FLASHATTENTION_DISABLE_LOCAL") as err:
        traced(None, q, k, v, None, sliding_window=32)
    assert "transformers' flash_attention_3" in str(err.value)
    assert patch_runner.classify(err.value, "forward")[0] == "unsupported"
    # a window the keys do not outrun is never passed on by transformers: nothing to refuse
    ran = []
    ok = backend_trace.BackendTrace()._wrap("attention", "flash_attention_3", lambda *a, **kw: ran.append(1))
    ok(None, q, k, v, None, sliding_window=64)
    assert ran == [1]


def test_transformers_flash_refusal_error_is_unsupported() -> None:
    from parity.harness import backend_trace

    def refuses(*args, **kwargs):
        raise RuntimeError("This flash attention build does not support softcap.")

    traced = backend_trace.BackendTrace()._wrap("attention", "flash_attention_2", refuses)
    with pytest.raises(NotImplementedError, match="does not support softcap") as err:
        traced(None, torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), None)
    assert patch_runner.classify(err.value, "forward")[0] == "unsupported"

    def crashes(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    traced = backend_trace.BackendTrace()._wrap("attention", "flash_attention_2", crashes)
    with pytest.raises(RuntimeError) as err:
        traced(None, torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), None)
    assert not isinstance(err.value, NotImplementedError)


# a narrowed FA2 (nox -s build_flash -- fa2) says what it holds in flash_attn/build_config.py: on the
# H200 a head dim it left out died with SIGSEGV although its dispatch has a TORCH_CHECK for it


def _fa2_record(monkeypatch, head_dims=(64,), dtypes=("bfloat16", "float32"), defines=()) -> None:
    from parity.backend import flash_build

    mod = types.ModuleType(flash_build.FA2_RECORD_MODULE)
    exec(flash_build.fa2_record_text(list(head_dims), list(dtypes), list(defines)), mod.__dict__)
    monkeypatch.setitem(sys.modules, flash_build.FA2_RECORD_MODULE, mod)


def _fa2_dies(*args, **kwargs):
    pytest.fail("the FA2 kernel was called with a head dim its build lacks (on the GPU: SIGSEGV)")


def test_fa2_build_without_the_head_dim_is_refused_before_the_call(fake_flash, monkeypatch) -> None:
    _fa2_record(monkeypatch)
    monkeypatch.setattr(sys.modules["flash_attn"], "flash_attn_varlen_func", _fa2_dies)
    attention.use_kernels({PARITY_FA2: "flash_attn"})
    with pytest.raises(NotImplementedError) as err:
        _flash_call(PARITY_FA2, dim=96)
    message = str(err.value)
    assert "head dim 96 (built for head dims 64)" in message and "build_flash -- fa2" in message
    assert "--config PATH" in message  # how a model outside the registry gets its kernels
    assert patch_runner.classify(err.value, "forward")[0] == "unsupported"


def test_fa2_build_with_the_head_dim_runs_it(fake_flash, monkeypatch) -> None:
    """Control: a head dim the build covers (on the next wider kernel, as FA2 dispatches) runs."""
    seen, _ = fake_flash
    _fa2_record(monkeypatch, head_dims=(32, 64))
    attention.use_kernels({PARITY_FA2: "flash_attn"})
    out = _flash_call(PARITY_FA2, dim=48)
    assert "flash_attn" in seen
    assert _rel(out, _flash_call(PARITY_SDPA, dim=48)) < 1e-5  # two fp32 paths; logits of tens at dim 48


def test_fa2_build_record_names_dtype_and_softcap(monkeypatch) -> None:
    from parity.backend import flash_build

    _fa2_record(monkeypatch, dtypes=("bfloat16",), defines=("FLASHATTENTION_DISABLE_SOFTCAP",))
    assert flash_build.fa2_build_gaps(head_dim=64, dtype="float16", softcap=True) == [
        "float16 (built for bfloat16)",
        "logit soft-capping (softcap) (FLASHATTENTION_DISABLE_SOFTCAP)",
    ]
    assert flash_build.fa2_build_gaps(head_dim=64, dtype="bfloat16", softcap=False) == []


def test_fa2_without_a_build_record_is_not_second_guessed(fake_flash, monkeypatch) -> None:
    """The PyPI / full builds have every head dim: no record, nothing refused (the fake module has none)."""
    from parity.backend import flash_build

    monkeypatch.delitem(sys.modules, flash_build.FA2_RECORD_MODULE, raising=False)
    assert flash_build.fa2_build_record() is None
    assert flash_build.fa2_build_gaps(head_dim=512, dtype="float16", softcap=True) == []
    attention.use_kernels({PARITY_FA2: "flash_attn"})
    _flash_call(PARITY_FA2, dim=96)


def test_transformers_fa2_path_is_refused_before_the_call(monkeypatch) -> None:
    """transformers' flash_attention_2 on flash_attn: the trace refuses what the build lacks first."""
    from parity.harness import backend_trace

    _fa2_record(monkeypatch, dtypes=("bfloat16",))
    q = torch.zeros(1, 4, 40, 128, dtype=torch.bfloat16, requires_grad=True)
    k = v = torch.zeros(1, 2, 40, 128, dtype=torch.bfloat16)
    monkeypatch.setattr(backend_trace, "hf_flash_provider", lambda: "flash_attn")
    traced = backend_trace.BackendTrace()._wrap("attention", "flash_attention_2", _fa2_dies)
    with pytest.raises(NotImplementedError, match="head dim 128 \\(built for head dims 64\\)") as err:
        traced(None, q, k, v, None)
    assert "transformers' flash_attention_2 (flash_attn)" in str(err.value)
    assert patch_runner.classify(err.value, "forward")[0] == "unsupported"
    # a hub kernel serving transformers is not that build: its call goes through (the provider check
    # then fails the mode for not being the variant's library)
    monkeypatch.setattr(backend_trace, "hf_flash_provider", lambda: "hub:kernels-community/flash-attn2")
    ran = []
    hub = backend_trace.BackendTrace()._wrap("attention", "flash_attention_2", lambda *a, **kw: ran.append(1))
    hub(None, q, k, v, None)
    assert ran == [1]
