"""DeepSeek sparse attention (DSA indexer) under parity's backends: applied exactly, or refused with why.

The DSA models (``glm_moe_dsa``, ``deepseek_v32``) hand their indexer's top-k key selection to every
attention implementation other than eager/sdpa as ``indices`` [B, S, k], next to an unmodified causal
mask. Before issue 11 parity's mask function gave them no 4-D mask (the indexer raised ``TypeError:
'NoneType' object is not subscriptable``), and a backend that ignores ``indices`` would silently run
dense attention. Model level: the registry's ``glm_moe_dsa`` toy under ``parity_sdpa_with_sp`` equals
HF sdpa (which folds the selection into its mask itself), with a negative control that drops it.
"""

from __future__ import annotations

import pytest
import torch

from parity.backend import attention
from parity.backend.attention import PARITY_FA2, PARITY_SDPA
from parity.harness import toy
from parity.harness.batches import packed_batch
from parity.harness.patch_runner import padded_batch


def _mask_and_indices(batch: int = 1, seq: int = 12, k: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None].expand(batch, 1, seq, seq)
    indices = torch.stack([torch.randperm(seq, generator=gen)[:k] for _ in range(batch * seq)])
    return causal.contiguous(), indices.view(batch, seq, k).to(torch.int32)


def test_selection_is_applied_to_the_models_mask() -> None:
    mask, indices = _mask_and_indices()
    q = torch.zeros(1, 2, 12, 8)
    out = attention.indexer_selection_mask(PARITY_SDPA, indices, mask, q, q, 1, None)
    selected = torch.zeros(1, 12, 12, dtype=torch.bool).scatter(-1, indices.long(), True)[:, None]
    assert torch.equal(out, mask & selected)
    assert out.sum() < mask.sum()  # strictly sparser than the causal mask

    additive = torch.zeros(1, 1, 12, 12).masked_fill(~mask, torch.finfo(torch.float32).min)
    out_add = attention.indexer_selection_mask(PARITY_SDPA, indices, additive, q, q, 1, None)
    assert torch.equal(out_add == 0, mask & selected)


@pytest.mark.parametrize(
    ("sp", "varlen", "words"),
    [
        (1, True, "varlen flash kernels cannot take"),
        (2, False, "before the Ulysses exchange"),
    ],
    ids=["flash", "sp2"],
)
def test_selection_that_cannot_be_carried_is_refused(sp: int, varlen: bool, words: str) -> None:
    mask, indices = _mask_and_indices()
    q = torch.zeros(1, 2, 12, 8)
    with pytest.raises(NotImplementedError, match=words):
        attention.indexer_selection_mask(
            PARITY_FA2, indices, mask, q, q, sp, (lambda *a, **k: None) if varlen else None
        )


@pytest.mark.parametrize("mask", [None, torch.ones(1, 12, dtype=torch.bool)], ids=["none", "2d"])
def test_selection_without_a_4d_mask_is_refused(mask) -> None:
    _, indices = _mask_and_indices()
    q = torch.zeros(1, 2, 12, 8)
    with pytest.raises(NotImplementedError, match="4-D causal mask"):
        attention.indexer_selection_mask(PARITY_SDPA, indices, mask, q, q, 1, None)


def test_mask_function_gives_dsa_models_the_4d_mask() -> None:
    """The indexer subscripts ``attention_mask[:, 0]``: a DSA config gets sdpa's bool mask, others flash's."""
    dsa = toy.load_config("glm_moe_dsa")
    plain = toy.load_config("qwen3")
    kwargs = dict(batch_size=1, q_length=6, kv_length=6, allow_is_causal_skip=True, device="cpu")
    dense = attention.parity_mask(config=dsa, **kwargs)
    assert dense is not None and dense.dim() == 4 and dense.dtype == torch.bool
    assert torch.equal(dense[0, 0], torch.ones(6, 6, dtype=torch.bool).tril())
    assert attention.parity_mask(config=plain, **kwargs) is None


def _logits(config, impl: str, batches: list[dict]) -> list[torch.Tensor]:
    model = toy.build_model(config, attn_implementation=impl, experts_implementation="eager")
    with torch.no_grad():
        return [model(**b, use_cache=False).logits for b in batches]


def test_glm_moe_dsa_parity_sdpa_matches_hf_sdpa(monkeypatch) -> None:
    config = toy.load_config("glm_moe_dsa")
    batches = [packed_batch(config, seq_lens=(61, 45, 54), seed=1).inputs, padded_batch(config, (37, 23), 2)]
    ref = _logits(config, "sdpa", batches)
    attention.reset_kernel_log()
    got = _logits(config, PARITY_SDPA, batches)
    assert attention.kernel_call_counts() == {PARITY_SDPA: 2 * config.num_hidden_layers}
    mask = batches[1]["attention_mask"].bool()
    assert (got[0] - ref[0]).abs().max() < 1e-5
    assert (got[1][mask] - ref[1][mask]).abs().max() < 1e-5

    # negative control: a backend that ignores the indexer's selection runs dense attention
    original = attention.parity_attention_forward

    def ignores_indices(*args, **kwargs):
        kwargs.pop("indices", None)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "parity_attention_forward", ignores_indices)
    dense = _logits(config, PARITY_SDPA, batches)
    assert (dense[0] - ref[0]).abs().max() > 1e-2


def test_glm_moe_dsa_flash_backend_is_unsupported_with_the_reason(monkeypatch) -> None:
    """On a GPU the flash names reach the model's sparse path: the mode must be UNSUPPORTED, not wrong."""
    from parity.harness.patch_runner import classify

    def stand_in(*args, **kwargs):  # a varlen kernel that must never be called with a sparse selection
        raise AssertionError("the varlen kernel ran although the indexer's selection cannot reach it")

    monkeypatch.setattr(attention, "_resolve_kernel", lambda backend, q: ("fake.varlen", stand_in))
    config = toy.load_config("glm_moe_dsa")
    model = toy.build_model(config, attn_implementation=PARITY_FA2, experts_implementation="eager")
    with pytest.raises(NotImplementedError, match="varlen flash kernels cannot take") as info:
        model(**packed_batch(config, seq_lens=(61, 45, 54), seed=1).inputs, use_cache=False)
    assert classify(info.value, "forward") == ("unsupported", "model")
