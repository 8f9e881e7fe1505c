"""parity's own attention backends, registered into transformers' attention and mask registries.

Three names, one code path:

- ``parity_sdpa_with_sp``: ``torch.nn.functional.scaled_dot_product_attention`` with a
  block-diagonal (per packed sequence) mask. Runs on CPU, supports D_v != D_qk, GQA, fp32.
- ``parity_flash_attention_2_with_sp``: varlen FlashAttention-2, from the kernel library chosen for it:
  ``flash_attn`` (the default) or PyTorch's built-in FA2 varlen kernel ``torch.varlen_attn``
  (``torch.nn.attention.varlen.varlen_attn``).
- ``parity_flash_attention_3_with_sp``: varlen FlashAttention-3 from ``flash_attn_interface``.

Which library serves a backend is a configuration (:func:`use_kernels`), never a guess from what
happens to be importable: a process with both ``flash_attn`` and torch's varlen kernel runs exactly
the chosen one, and a chosen library that cannot run here is an error that says why (no silent
substitute; the opt-in sdpa fallback below is recorded as such).

Every call: (1) with an sp group active, Ulysses all-to-all (full sequence, 1/sp of the heads);
(2) packing metadata of the FULL sequence (explicit ``cu_seq_lens_q/k`` kwargs, else derived
from ``position_ids``, gathered over sp when sharded); (3) the kernel; (4) the inverse exchange.
The output is [B, S, H, D_v], the layout transformers' callers reshape.

Why these exact registrations:

- The mask function is transformers' ``flash_attention_mask`` (None, or the 2-D padding mask) for
  all three. The backend derives packing itself, from the full sequence; a 4-D mask built by
  transformers from a *local* sp slice would be wrong. Registering *some* mask is mandatory: for
  an unregistered name transformers returns ``attention_mask=None`` and silently drops padding.
  Exception: models whose DeepSeek-sparse-attention indexer reads the mask get sdpa's 4-D mask
  (:func:`parity_mask`), and the indexer's ``indices`` are applied or refused with the reason
  (:func:`indexer_selection_mask`), never dropped.
- Names containing "flash" fail validation at model build in transformers 5.17-5.24. Build with
  another name (e.g. "sdpa") and then set ``model.config._attn_implementation = name``; the
  functions here only depend on being looked up by name at call time.

What ran is recorded (:func:`kernel_providers_used`, :func:`kernel_call_counts`) so a caller can
tell a requested backend that ran from one that silently did not.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

from parity import settings
from parity.backend.flash_build import refuse_build_gaps, refuse_fa2_build_gaps
from parity.backend.kernel_log import KernelLog
from parity.backend.parallel_state import get_sp_group
from parity.backend.ulysses import (
    all_gather_sequence,
    gather_heads_scatter_seq,
    gather_seq_scatter_heads,
    heads_of_sp_rank,
    packed_sequence_starts,
    repeat_kv_heads_for_sp,
)

PARITY_SDPA = "parity_sdpa_with_sp"
PARITY_FA2 = "parity_flash_attention_2_with_sp"
PARITY_FA3 = "parity_flash_attention_3_with_sp"
BACKENDS = (PARITY_SDPA, PARITY_FA2, PARITY_FA3)

# Opt-in escape hatch: let the flash names run the sdpa kernel when no flash kernel can run here
# (CPU, fp32). Off by default because that is exactly the silent fallback the suites must catch;
# when used, the provider is recorded as "torch.sdpa[fallback]".
ENV_ALLOW_FALLBACK = settings.ATTN_ALLOW_SDPA_FALLBACK

# Modules with this attribute set to True never take the Ulysses path (e.g. a vision tower whose
# inputs the caller did not shard over sp).
SP_DISABLED_ATTR = "parity_sp_disabled"


# --------------------------------------------------------------------------------------------
# kernel log


_LOG = KernelLog()
#: the module API the harness reads (same for attention and experts)
kernel_providers_used = _LOG.providers_used
kernel_call_counts = _LOG.call_counts
reset_kernel_log = _LOG.reset


def _record(backend: str, provider: str) -> None:
    _LOG.record(backend, provider)


# --------------------------------------------------------------------------------------------
# packing metadata


@dataclass
class Packing:
    """Which tokens form which sequence, over the flattened [B*S] token stream of the full sequence.

    ``cu_seqlens``/``max_len``: sequence boundaries over the kept (non-padding) tokens, in the form
    varlen kernels take. ``keep``: flat indices of the kept tokens (None when nothing is padding).
    ``one_per_row``: no padding and each row is a single sequence, so plain causal attention is
    exact. ``seg_ids`` [B, S]: sequence index per token, -1 for padding (what a dense mask needs;
    computed on first use, since varlen kernels never need it).
    """

    cu_seqlens: torch.Tensor
    max_len: int
    keep: torch.Tensor | None
    one_per_row: bool
    batch: int
    seq: int
    _seg: torch.Tensor | None = None

    @property
    def seg_ids(self) -> torch.Tensor:
        if self._seg is None:
            self._seg = _seg_ids_from_cu(self.cu_seqlens, self.batch, self.seq, self.cu_seqlens.device)
        return self._seg


def _seg_ids_from_cu(cu: torch.Tensor, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    cu = cu.to(device=device, dtype=torch.long).flatten()
    total = batch * seq
    if int(cu[-1]) > total:
        raise ValueError(f"cu_seq_lens ends at {int(cu[-1])} but the batch has {total} tokens")
    if batch > 1 and not torch.isin(torch.arange(0, total, seq, device=device), cu).all():
        raise ValueError("cu_seq_lens has a sequence crossing a batch row; packed batches need B == 1")
    tok = torch.arange(total, device=device)
    seg = torch.searchsorted(cu[1:], tok, right=True)
    seg = torch.where(tok < cu[-1], seg, torch.full_like(seg, -1))  # tail beyond cu[-1]: padding
    return seg.view(batch, seq)


def build_packing(
    batch: int,
    seq: int,
    device: torch.device,
    *,
    position_ids: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    max_length: int | torch.Tensor | None = None,
) -> Packing:
    """Packing of a full [B, S] sequence from explicit cu_seqlens, else position_ids, else rows.

    ``padding_mask`` is the 2-D bool mask (True = real token) transformers hands flash-style
    backends; padded tokens are removed from every sequence.
    """
    if cu_seq_lens is not None and padding_mask is None:
        # fast path (the collator computed everything): trust it once it covers every token
        cu = cu_seq_lens.to(device=device, dtype=torch.int32).flatten()
        if int(cu[-1]) == batch * seq:
            packing = Packing(cu, 0, None, one_per_row=cu.numel() - 1 == batch, batch=batch, seq=seq)
            if batch > 1:
                packing.seg_ids  # noqa: B018 -- validates that no sequence crosses a batch row
            packing.max_len = int(max_length) if max_length is not None else int((cu[1:] - cu[:-1]).max())
            return packing

    if cu_seq_lens is not None:
        seg = _seg_ids_from_cu(cu_seq_lens, batch, seq, device)
    else:
        if position_ids is None:
            starts = torch.zeros(batch, seq, dtype=torch.bool, device=device)
            starts[:, 0] = True
        else:
            if position_ids.dim() == 3:  # mRoPE-style [rows, B, S]: row 0 is the text position
                position_ids = position_ids[0]
            starts = packed_sequence_starts(position_ids.to(device).expand(batch, seq))
        seg = starts.reshape(-1).long().cumsum(0).sub_(1).view(batch, seq)
    if padding_mask is not None:
        seg = seg.masked_fill(~padding_mask.to(device=device, dtype=torch.bool), -1)

    flat = seg.reshape(-1)
    if padding_mask is None and cu_seq_lens is None:
        keep, kept = None, flat  # every token belongs to a sequence: no host sync needed to know
    else:
        valid = flat >= 0
        keep = None if bool(valid.all()) else torch.nonzero(valid).flatten()
        kept = flat if keep is None else flat[keep]
    if kept.numel() == 0:
        counts = torch.zeros(0, dtype=torch.long, device=device)
    else:
        _, counts = torch.unique_consecutive(kept, return_counts=True)
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=device)
    cu[1:] = counts.cumsum(0)
    max_len = int(counts.max()) if counts.numel() else 0
    one_per_row = keep is None and counts.numel() == batch
    return Packing(cu, max_len, keep, one_per_row, batch=batch, seq=seq, _seg=seg)


# --------------------------------------------------------------------------------------------
# kernels: q [B, Hq, S, Dqk], k [B, Hkv, S, Dqk], v [B, Hkv, S, Dv] -> [B, S, Hq, Dv]


def _window_ok(i: torch.Tensor, j: torch.Tensor, window: int, causal: bool) -> torch.Tensor:
    return (i - j < window) if causal else ((i - j).abs() < window)


def block_mask(packing: Packing, causal: bool, window: int | None = None) -> torch.Tensor:
    """Bool [B, 1, S, S]: same sequence, non-padding key, causal/window as asked.

    Every query also sees itself, so a padding row (no valid key) gives a finite value instead of
    NaN; padding outputs are garbage by definition and never compared.
    """
    seg = packing.seg_ids
    seq = seg.shape[1]
    allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
    i = torch.arange(seq, device=seg.device)[:, None]
    j = torch.arange(seq, device=seg.device)[None, :]
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= _window_ok(i, j, window, causal)
    allowed |= i == j
    return allowed[:, None]


def _expand_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA: each kv head repeated for its group of query heads ([B, H, S, D] layout).

    Explicit rather than sdpa's ``enable_gqa``, which not every sdpa backend honours with a mask.
    """
    rep = q.shape[1] // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def _sdpa_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    packing: Packing,
    *,
    causal: bool,
    scale: float,
    dropout: float,
    window: int | None,
    dense_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    k, v = _expand_kv_heads(q, k, v)
    if dense_mask is not None:
        mask, is_causal = dense_mask, False
    elif packing.one_per_row and window is None:
        mask, is_causal = None, causal  # plain (non-)causal: lets sdpa pick its fastest kernel
    else:
        mask, is_causal = block_mask(packing, causal, window), False
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=scale
    )
    return out.transpose(1, 2).contiguous()


def _math_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    packing: Packing,
    *,
    causal: bool,
    scale: float,
    dropout: float,
    window: int | None,
    dense_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention written out, for what ``F.scaled_dot_product_attention`` cannot express.

    Soft-capping transforms the logits before the mask and sinks add a softmax column, neither of
    which sdpa takes; so, in the order of HF's eager functions (gemma2, gpt-oss): q @ k^T * scale,
    ``tanh(logits / softcap) * softcap``, the mask (block-diagonal per packed sequence, causal,
    window; or the caller's 4-D mask), one extra logit per head (``sinks`` [H], the heads this rank
    holds) concatenated as a last column, softmax, the sink column dropped, @ v. Logits and softmax
    are fp32 whatever the input dtype (HF's gpt-oss eager takes its softmax in the input dtype: in
    bf16 that is rounding the fp32 truth does not have).
    """
    k, v = _expand_kv_heads(q, k, v)
    logits = torch.matmul(q, k.transpose(-2, -1)).float() * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if dense_mask is not None:
        if dense_mask.dtype == torch.bool:
            logits = logits.masked_fill(~dense_mask, float("-inf"))
        else:
            logits = logits + dense_mask.float()
    elif not (packing.one_per_row and window is None and not causal):
        logits = logits.masked_fill(~block_mask(packing, causal, window), float("-inf"))
    if sinks is not None:
        if sinks.numel() != q.shape[1]:
            raise ValueError(f"{sinks.numel()} attention sinks for {q.shape[1]} query heads")
        column = sinks.float().view(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1)
        probs = torch.softmax(torch.cat([logits, column], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(logits, dim=-1)
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs.to(v.dtype), v)
    return out.transpose(1, 2).contiguous()


VarlenFn = Callable[..., torch.Tensor]


def _flash_window(window: int | None, causal: bool) -> tuple[int, int]:
    """FA-style (left, right) window; -1 = unbounded. Causal itself is the kernels' ``causal`` flag."""
    if window is None:
        return (-1, -1)
    return (window - 1, 0) if causal else (window - 1, window - 1)


def _torch_window(window: int | None, causal: bool) -> tuple[int, int]:
    """torch varlen_attn has no causal flag: causal is a right window of 0."""
    left, right = _flash_window(window, causal)
    return (left, 0) if causal else (left, right)


def _varlen_flash_attn(q, k, v, cu, max_len, *, causal, scale, dropout, window, softcap=None) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    refuse_fa2_build_gaps(
        FLASH_ATTN,
        head_dim=q.shape[-1],
        dtype=q.dtype,
        softcap=softcap is not None,
        dropout=bool(dropout),
    )
    ws = _flash_window(window, causal)
    extra = {} if softcap is None else {"softcap": float(softcap)}  # flash_attn: 0.0 means off
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu,
        cu,
        max_len,
        max_len,
        dropout_p=dropout,
        softmax_scale=scale,
        causal=causal,
        window_size=ws,
        **extra,
    )


#: FA3 build switches (``flash_attn_config.CONFIG["build_flags"]``, written by FA3's setup.py into
#: the wheel) and what a build compiled with each cannot run.
_FA3_DISABLED_FEATURES = {
    "FLASHATTENTION_DISABLE_LOCAL": "local (sliding-window) attention",
    "FLASHATTENTION_DISABLE_SOFTCAP": "logit soft-capping (softcap)",
    "FLASHATTENTION_DISABLE_FP16": "float16",
    "FLASHATTENTION_DISABLE_BACKWARD": "a backward pass",
}
_FA3_HEAD_DIMS = (64, 96, 128, 192, 256)


def fa3_build_flags() -> dict[str, bool] | None:
    """The switches the installed FA3 was compiled with; None when the build does not say.

    Why read them: FA3 built against torch's stable ABI does not raise its own "this flash attention
    build does not support local attention" check as a Python error; the process dies (SIGSEGV on
    the H200 with the prebuilt wheel and gemma3's sliding window). So the refusal has to come before
    the call, from what the build says about itself.
    """
    try:
        from flash_attn_config import CONFIG
    except ImportError:
        return None
    flags = CONFIG.get("build_flags") if isinstance(CONFIG, dict) else None
    return {str(k): bool(v) for k, v in flags.items()} if isinstance(flags, dict) else None


def fa3_build_gaps(
    *, window: bool, softcap: bool, head_dim: int | None, dtype: torch.dtype | None, backward: bool = True
) -> list[str]:
    """What of this call the installed FA3 build was compiled without (empty: it can run it)."""
    flags = fa3_build_flags()
    if not flags:
        return []
    wanted = {
        "FLASHATTENTION_DISABLE_LOCAL": window,
        "FLASHATTENTION_DISABLE_SOFTCAP": softcap,
        "FLASHATTENTION_DISABLE_FP16": dtype == torch.float16,
        "FLASHATTENTION_DISABLE_BACKWARD": backward,
    }
    gaps = [
        f"{what} ({flag})"
        for flag, what in _FA3_DISABLED_FEATURES.items()
        if wanted[flag] and flags.get(flag)
    ]
    if head_dim is not None:
        bucket = next((h for h in _FA3_HEAD_DIMS if head_dim <= h), None)
        if bucket is None or flags.get(f"FLASHATTENTION_DISABLE_HDIM{bucket}"):
            built = [str(h) for h in _FA3_HEAD_DIMS if not flags.get(f"FLASHATTENTION_DISABLE_HDIM{h}")]
            gaps.append(f"head dim {head_dim} (built for head dims {', '.join(built) or 'none'})")
    return gaps


def refuse_fa3_build_gaps(provider: str, **call: Any) -> None:
    """Refuse what the installed FA3 build lacks, before a call that would kill the process."""
    refuse_build_gaps(
        provider,
        "FA3",
        fa3_build_gaps(**call),
        "flash_attn_config.CONFIG",
        "rebuild with `nox -s build_flash -- fa3`, which keeps what the registry's models need",
    )


def _varlen_fa3(q, k, v, cu, max_len, *, causal, scale, dropout, window, softcap=None) -> torch.Tensor:
    import flash_attn_interface

    if dropout:
        raise NotImplementedError("flash_attn_interface (FA3) has no dropout; set attention_dropout=0")
    refuse_fa3_build_gaps(
        FLASH_ATTN_INTERFACE,
        window=window is not None,
        softcap=softcap is not None,
        head_dim=q.shape[-1],
        dtype=q.dtype,
        backward=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
    )
    extra = {} if softcap is None else {"softcap": float(softcap)}
    out = flash_attn_interface.flash_attn_varlen_func(
        q,
        k,
        v,
        cu,
        cu,
        max_len,
        max_len,
        softmax_scale=scale,
        causal=causal,
        window_size=_flash_window(window, causal),
        **extra,
    )
    return out[0] if isinstance(out, tuple) else out


def _varlen_torch(q, k, v, cu, max_len, *, causal, scale, dropout, window, softcap=None) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn, adapting to the signature of the installed torch.

    torch 2.11 has ``window_size`` (causal = (-1, 0)) and ``scale`` but no ``enable_gqa``; 2.13
    adds ``enable_gqa``. Older signatures with ``is_causal`` are handled too.
    """
    from torch.nn.attention.varlen import varlen_attn

    if dropout:
        raise NotImplementedError("torch varlen_attn has no dropout; set attention_dropout=0")
    if softcap is not None:
        raise NotImplementedError(_missing_feature_message(TORCH_VARLEN, "softcap"))
    params = _signature_params(varlen_attn)
    kwargs: dict[str, Any] = {}
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
    if "window_size" in params:
        kwargs["window_size"] = _torch_window(window, causal)
    elif window is not None:
        raise NotImplementedError("this torch varlen_attn has no window_size; sliding windows unsupported")
    else:
        kwargs["is_causal"] = causal
    if "scale" in params:
        kwargs["scale"] = scale
    else:
        q = q * (scale * q.shape[-1] ** 0.5)  # kernel applies 1/sqrt(D); fold the requested scale into q
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@cache
def _signature_params(fn: Callable[..., Any]) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def _run_varlen(
    fn: VarlenFn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    packing: Packing,
    *,
    causal: bool,
    scale: float,
    dropout: float,
    window: int | None,
    softcap: float | None = None,
    provider: str = "the varlen kernel",
) -> torch.Tensor:
    """[B, H, S, D] -> flattened [T, H, D] (padding removed) -> varlen kernel -> [B, S, H, D_v].

    FA kernels need one head dim for q, k and v: with D_v < D_qk (DeepSeek MLA) v is zero-padded
    and the output sliced back, which is exact. ``softcap`` reaches the kernel only when set (a
    kernel without the argument never sees it). A kernel build compiled without a feature (the
    prebuilt FA2 wheels without softcap, FA3 without softcap and local attention) raises a
    RuntimeError saying "does not support" at call time; that is the kernel refusing the model, not
    a wrong answer, so it becomes a NotImplementedError carrying the kernel's message and the
    provider (the patch suite then records the mode ``unsupported``).
    """
    b, hq, s, d = q.shape
    dv = v.shape[-1]

    def flat(t: torch.Tensor) -> torch.Tensor:
        t = t.transpose(1, 2).reshape(b * s, t.shape[1], t.shape[-1])
        return t if packing.keep is None else t.index_select(0, packing.keep)

    qf, kf, vf = flat(q), flat(k), flat(v)
    if dv != d:
        if dv > d:
            raise NotImplementedError(f"value head dim {dv} > query/key head dim {d}")
        vf = F.pad(vf, (0, d - dv))
    extra = {} if softcap is None else {"softcap": softcap}
    try:
        out = fn(
            qf,
            kf,
            vf,
            packing.cu_seqlens,
            packing.max_len,
            causal=causal,
            scale=scale,
            dropout=dropout,
            window=window,
            **extra,
        )
    except RuntimeError as exc:
        if "does not support" in str(exc):
            raise NotImplementedError(f"{provider}: {exc}") from exc
        raise
    out = out[..., :dv]
    if packing.keep is not None:
        out = out.new_zeros(b * s, hq, dv).index_copy(0, packing.keep, out)
    return out.reshape(b, s, hq, dv)


# --------------------------------------------------------------------------------------------
# kernel choice and provider resolution

TORCH_SDPA = "torch.sdpa"
TORCH_VARLEN = "torch.varlen_attn"
FLASH_ATTN = "flash_attn"
FLASH_ATTN_INTERFACE = "flash_attn_interface"

#: The kernel libraries each backend can be served by (the first is its default).
KERNEL_LIBRARIES: dict[str, tuple[str, ...]] = {
    PARITY_SDPA: (TORCH_SDPA,),
    PARITY_FA2: (FLASH_ATTN, TORCH_VARLEN),
    PARITY_FA3: (FLASH_ATTN_INTERFACE,),
}
_CHOSEN: dict[str, str] = {}


def use_kernels(choice: dict[str, str]) -> None:
    """Choose the kernel library of one or more backends for this process (the rest keep theirs).

    ``use_kernels({"parity_flash_attention_2_with_sp": "torch.varlen_attn"})`` makes the FA2 name run
    PyTorch's varlen kernel even where ``flash_attn`` is installed. Unknown names are an error, so a
    typo cannot silently leave the default in place.
    """
    for backend, library in choice.items():
        if backend not in KERNEL_LIBRARIES:
            known = ", ".join(KERNEL_LIBRARIES)
            raise KeyError(f"unknown parity attention backend {backend!r}; known: {known}")
        if library not in KERNEL_LIBRARIES[backend]:
            known = ", ".join(KERNEL_LIBRARIES[backend])
            raise ValueError(f"{backend} cannot be served by {library!r}; choose one of {known}")
    _CHOSEN.update(choice)


def kernel_choice() -> dict[str, str]:
    """backend name -> the kernel library it uses (chosen with :func:`use_kernels`, else the default)."""
    return {backend: _CHOSEN.get(backend, libraries[0]) for backend, libraries in KERNEL_LIBRARIES.items()}


def reset_kernel_choice() -> None:
    """Back to the defaults (tests and long-lived processes that switch configurations)."""
    _CHOSEN.clear()


def _import_problem(module: str, attribute: str) -> str | None:
    """Why ``module.attribute`` cannot be used here, or None (an ABI-mismatched build raises here too)."""
    try:
        mod = __import__(module, fromlist=[attribute])
    except Exception as exc:
        return f"{module} is not importable: {type(exc).__name__}: {exc}"
    if not hasattr(mod, attribute):
        return f"{module} has no {attribute}"
    return None


def _library_problem(library: str) -> str | None:
    if library == FLASH_ATTN:
        return _import_problem("flash_attn", "flash_attn_varlen_func")
    if library == FLASH_ATTN_INTERFACE:
        return _import_problem("flash_attn_interface", "flash_attn_varlen_func")
    if library == TORCH_VARLEN:
        problem = _import_problem("torch.nn.attention.varlen", "varlen_attn")
        return f"{problem} (needs torch>=2.10)" if problem else None
    return None


def _provider_name(library: str) -> str:
    """What the kernel log records: the library, with its version where it has one."""
    if library == FLASH_ATTN:
        import flash_attn

        return f"{FLASH_ATTN} {getattr(flash_attn, '__version__', '?')}"
    return library


_VARLEN_FNS: dict[str, VarlenFn] = {
    FLASH_ATTN: _varlen_flash_attn,
    FLASH_ATTN_INTERFACE: _varlen_fa3,
    TORCH_VARLEN: _varlen_torch,
}

#: The optional attention inputs each varlen library takes. None takes attention sinks: flash_attn
#: 2.8.3 and flash_attn_interface (FA3 hopper) have no sink argument, torch.varlen_attn has neither
#: sinks nor softcap. parity_sdpa_with_sp takes both (its explicit math path).
LIBRARY_FEATURES: dict[str, frozenset[str]] = {
    FLASH_ATTN: frozenset({"softcap"}),
    FLASH_ATTN_INTERFACE: frozenset({"softcap"}),
    TORCH_VARLEN: frozenset(),
}
_FEATURE_NAMES = {"softcap": "logit soft-capping input (softcap)", "s_aux": "attention-sink input (s_aux)"}


def _missing_feature_message(library: str, feature: str, provider: str | None = None) -> str:
    """'<provider> has no <feature>; <which parity kernels run it>' (the unsupported mode's reason)."""
    able = [PARITY_SDPA] + [
        f"{backend} on {lib}"
        for backend, libs in KERNEL_LIBRARIES.items()
        for lib in libs
        if feature in LIBRARY_FEATURES.get(lib, frozenset())
    ]
    return f"{provider or library} has no {_FEATURE_NAMES[feature]}; {', '.join(able)} run it"


def refuse_missing_features(
    backend: str, provider: str, *, softcap: float | None, s_aux: torch.Tensor | None
) -> None:
    """Raise NotImplementedError when the library chosen for ``backend`` cannot take these inputs.

    Before any exchange or kernel call: silently dropping a sink or a soft-cap would be a wrong
    answer that passes for a right one, so the mode must be refused with the reason instead.
    """
    library = kernel_choice()[backend]
    if library == TORCH_SDPA or provider.startswith(TORCH_SDPA):  # sdpa and its fallback: the math path
        return
    wanted = [name for name, value in (("softcap", softcap), ("s_aux", s_aux)) if value is not None]
    missing = [name for name in wanted if name not in LIBRARY_FEATURES.get(library, frozenset())]
    if missing:
        raise NotImplementedError(
            f"{backend}: " + "; ".join(_missing_feature_message(library, name, provider) for name in missing)
        )


def _device_problems(q: torch.Tensor) -> list[str]:
    """Why no FlashAttention kernel (of any library) can take these inputs: CUDA and half precision."""
    problems = []
    if not q.is_cuda:
        problems.append(f"it needs a CUDA device (got {q.device.type})")
    if q.dtype not in (torch.float16, torch.bfloat16):
        problems.append(f"it needs float16/bfloat16 (got {str(q.dtype).removeprefix('torch.')})")
    return problems


def _fallback_allowed() -> bool:
    return bool(settings.get(ENV_ALLOW_FALLBACK))


def _resolve_kernel(backend: str, q: torch.Tensor) -> tuple[str, VarlenFn | None]:
    """(provider name, varlen fn) of the library chosen for ``backend``; fn None means the sdpa kernel.

    The chosen library runs or the call fails with the reason; nothing else is tried.
    """
    if backend not in KERNEL_LIBRARIES:
        raise KeyError(backend)
    library = kernel_choice()[backend]
    if library == TORCH_SDPA:
        return TORCH_SDPA, None
    problems = _device_problems(q)
    missing = _library_problem(library)
    if missing:
        problems.append(missing)
    if not problems:
        return _provider_name(library), _VARLEN_FNS[library]
    others = [lib for lib in KERNEL_LIBRARIES[backend] if lib != library]
    choose = (
        f" (another library: parity.backend.attention.use_kernels({{{backend!r}: {others[0]!r}}}))"
        if others
        else ""
    )
    reason = f"the kernel library chosen for it, {library}, cannot run here: " + "; ".join(problems) + choose
    if _fallback_allowed():
        return "torch.sdpa[fallback]", None
    raise RuntimeError(
        f"{backend}: {reason}. FlashAttention kernels need CUDA and half precision; set "
        f"{ENV_ALLOW_FALLBACK}=1 to run sdpa instead (recorded as a fallback)."
    )


# --------------------------------------------------------------------------------------------
# the attention function


def _gather_if_local(
    t: torch.Tensor | None, local_len: int, full_len: int, group: Any
) -> torch.Tensor | None:
    """Gather a per-token tensor over sp when it covers only this rank's slice."""
    if t is None or t.shape[-1] == full_len or group is None:
        return t
    if t.shape[-1] != local_len:
        raise ValueError(f"per-token tensor of length {t.shape[-1]} fits neither {local_len} nor {full_len}")
    if t.dtype == torch.bool:  # gloo has no bool collectives
        return all_gather_sequence(t.to(torch.uint8), group, dim=t.dim() - 1).bool()
    return all_gather_sequence(t, group, dim=t.dim() - 1)


def indexer_selection_mask(
    backend: str,
    indices: torch.Tensor,
    attention_mask: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    sp: int,
    varlen_fn: VarlenFn | None,
) -> torch.Tensor:
    """The dense mask of DeepSeek sparse attention: the model's 4-D mask AND the indexer's top-k keys.

    Why: DSA models (``deepseek_v32``, ``glm_moe_dsa``) fold the indexer's selection into the mask only
    for "eager" and "sdpa"; for any other implementation name they pass the unmodified causal mask and
    the selection as ``indices`` [B, S, k] (key positions per query, meant for flash-mla). A backend
    that ignores ``indices`` computes dense attention: a wrong answer that looks right. So the
    selection is applied here exactly as the model's sdpa path does, or the call is refused with why.
    The 4-D mask itself comes from :func:`parity_mask` (these models' indexers read it).
    """
    if varlen_fn is not None:
        raise NotImplementedError(
            f"{backend}: the indexer's top-k key selection (DeepSeek sparse attention, passed as `indices`) "
            "is a different key subset per query, which varlen flash kernels cannot take; "
            f"{PARITY_SDPA} runs it at sp=1"
        )
    if sp > 1:
        raise NotImplementedError(
            f"{backend}: the indexer's top-k key selection was made before the Ulysses exchange, over this "
            "rank's sequence slice only, so it cannot be carried to the full sequence; sparse attention "
            "runs at sp=1 only"
        )
    batch, seq, kv_len = query.shape[0], query.shape[2], key.shape[2]
    if indices.dim() != 3 or tuple(indices.shape[:2]) != (batch, seq):
        raise NotImplementedError(
            f"{backend}: `indices` of shape {tuple(indices.shape)} is not a top-k key selection "
            f"[batch={batch}, seq={seq}, k]"
        )
    if attention_mask is None or attention_mask.dim() != 4:
        got = "none" if attention_mask is None else f"a {attention_mask.dim()}-D one"
        raise NotImplementedError(
            f"{backend}: sparse attention (`indices`) needs the model's 4-D causal mask, got {got}"
        )
    selected = torch.zeros(batch, seq, kv_len, dtype=torch.bool, device=query.device)
    selected = selected.scatter(-1, indices.long(), True)[:, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask & selected
    return attention_mask.masked_fill(~selected, torch.finfo(attention_mask.dtype).min)


def parity_attention_forward(
    backend: str,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | torch.Tensor | None = None,
    max_length_k: int | torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The body shared by the three registered names (transformers' attention-function contract).

    ``softcap`` (gemma2-style logit soft-capping) and ``s_aux`` (gpt-oss attention sinks, one logit per
    query head) are honoured exactly as HF's eager functions do; the sdpa name runs them on its math
    path, a flash library that lacks one refuses the call (:func:`refuse_missing_features`).
    """
    softcap = kwargs.get("softcap")
    s_aux = kwargs.get("s_aux")
    if query.shape[2] != key.shape[2]:
        raise NotImplementedError(
            f"{backend} is a training backend: query and key lengths differ "
            f"({query.shape[2]} vs {key.shape[2]}); pass use_cache=False"
        )
    if cu_seq_lens_k is not None and cu_seq_lens_q is not None and cu_seq_lens_k is not cu_seq_lens_q:
        if not torch.equal(cu_seq_lens_q.cpu(), cu_seq_lens_k.cpu()):
            raise NotImplementedError(f"{backend}: different cu_seq_lens for q and k are not supported")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    provider, varlen_fn = _resolve_kernel(backend, query)
    refuse_missing_features(backend, provider, softcap=softcap, s_aux=s_aux)

    group = None if getattr(module, SP_DISABLED_ATTR, False) else get_sp_group()
    sp = 1 if group is None else torch.distributed.get_world_size(group)
    local_len = query.shape[2]
    dense_mask = None
    padding_mask = None
    selection = kwargs.get("indices")  # DeepSeek sparse attention: the indexer's top-k keys
    if selection is not None:
        dense_mask = indexer_selection_mask(backend, selection, attention_mask, query, key, sp, varlen_fn)
    elif attention_mask is not None:
        if attention_mask.dim() == 4:
            if sp > 1 or varlen_fn is not None:
                raise NotImplementedError(
                    f"{backend}: a 4-D attention mask is only supported by sdpa at sp=1"
                )
            dense_mask = attention_mask
        else:
            padding_mask = attention_mask
    if sp > 1:
        key = repeat_kv_heads_for_sp(key, sp)
        value = repeat_kv_heads_for_sp(value, sp)
        query, key, value = (
            gather_seq_scatter_heads(t, seq_dim=2, head_dim=1, group=group) for t in (query, key, value)
        )
        if s_aux is not None:  # this rank now holds a contiguous block of the heads: take their sinks
            s_aux = heads_of_sp_rank(s_aux, torch.distributed.get_rank(group), sp, head_dim=0)
    batch, full_len = query.shape[0], query.shape[2]
    if cu_seq_lens_q is None:
        position_ids = _gather_if_local(position_ids, local_len, full_len, group)
    padding_mask = _gather_if_local(padding_mask, local_len, full_len, group)

    packing = build_packing(
        batch,
        full_len,
        query.device,
        position_ids=position_ids,
        padding_mask=padding_mask,
        cu_seq_lens=cu_seq_lens_q,
        max_length=max_length_q,
    )
    common: dict[str, Any] = {"causal": causal, "scale": scale, "dropout": dropout, "window": sliding_window}
    if varlen_fn is not None:
        out = _run_varlen(varlen_fn, query, key, value, packing, softcap=softcap, provider=provider, **common)
    elif softcap is not None or s_aux is not None:  # sdpa has neither: the explicit math path
        out = _math_kernel(
            query, key, value, packing, dense_mask=dense_mask, softcap=softcap, sinks=s_aux, **common
        )
    else:
        out = _sdpa_kernel(query, key, value, packing, dense_mask=dense_mask, **common)
    if sp > 1:
        out = gather_heads_scatter_seq(out, head_dim=2, seq_dim=1, group=group)
    _record(backend, provider)
    return out, None


def _bind(backend: str) -> Callable[..., tuple[torch.Tensor, None]]:
    def attention_fn(module, query, key, value, attention_mask, **kwargs):  # transformers' contract
        return parity_attention_forward(backend, module, query, key, value, attention_mask, **kwargs)

    attention_fn.__name__ = backend
    attention_fn.__qualname__ = backend
    return attention_fn


parity_sdpa_with_sp = _bind(PARITY_SDPA)
parity_flash_attention_2_with_sp = _bind(PARITY_FA2)
parity_flash_attention_3_with_sp = _bind(PARITY_FA3)
_FUNCTIONS = {
    PARITY_SDPA: parity_sdpa_with_sp,
    PARITY_FA2: parity_flash_attention_2_with_sp,
    PARITY_FA3: parity_flash_attention_3_with_sp,
}


def reads_dense_mask(config: Any) -> bool:
    """Whether the model itself reads the 4-D mask before attention: DeepSeek sparse attention (DSA).

    The DSA indexer (``deepseek_v32``, ``glm_moe_dsa``: configs with ``index_topk``) masks its scores
    with ``attention_mask[:, 0]`` to pick top-k keys inside each causal, packed, unpadded sequence. With
    the flash-style mask (None or 2-D) that raised ``TypeError: 'NoneType' object is not subscriptable``.
    """
    return getattr(config, "index_topk", None) is not None


def parity_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The mask function of parity's names: transformers' flash mask, or sdpa's 4-D one where the model
    reads the mask itself (:func:`reads_dense_mask`).

    The flash mask (None, or the 2-D padding mask) lets the backend derive packing from the full
    sequence; a DSA model needs the materialised 4-D bool mask, which transformers builds from the full
    sequence at sp=1 (causal, packed samples, padding), and parity's sdpa then takes it as given.
    """
    from transformers.masking_utils import flash_attention_mask, sdpa_mask

    if reads_dense_mask(kwargs.get("config")):
        kwargs["allow_is_causal_skip"] = False  # the indexer subscripts it: never None
        return sdpa_mask(*args, **kwargs)
    return flash_attention_mask(*args, **kwargs)


def register() -> None:
    """Register the three backends and their mask function with transformers (idempotent).

    Both registrations go through the classmethods, which write the class-wide ``_global_mapping``:
    the mask early-exit check in transformers reads only that mapping.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, fn in _FUNCTIONS.items():
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, parity_mask)


def set_attention_backend(model: torch.nn.Module, name: str) -> None:
    """Switch a built model to ``name`` without transformers' build-time validation.

    Needed for names containing "flash" (validation would look for a hub kernel and fail); the
    config setter copies the value into every sub-config (vision, text, audio).
    """
    register()
    model.config._attn_implementation = name


register()
