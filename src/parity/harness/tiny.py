"""Tiny in-memory modules for the kernel checks and their unit tests: built from configs in code,
never from toy_config files, so a check does not depend on what the registry holds."""

from __future__ import annotations

import torch
from transformers import AutoConfig


def _text(model_type: str, **kw):  # noqa: ANN003, ANN202
    return AutoConfig.for_model(model_type, text_config=kw).text_config


def tiny_experts(name: str) -> torch.nn.Module:
    """A standalone stacked-experts module of this model type (8 experts, hidden 32), weights N(0, 0.2)."""
    common = {"hidden_size": 32, "moe_intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 2}
    if name == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls

        cfg = AutoConfig.for_model("qwen3_moe", **common)
    elif name == "qwen3_vl_moe":
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts as cls

        cfg = _text("qwen3_vl_moe", **common)
    elif name == "qwen3_5_moe":
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeExperts as cls

        cfg = _text("qwen3_5_moe", **common)
    elif name == "qwen3_omni_moe":
        from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
            Qwen3OmniMoeThinkerTextExperts as cls,
        )

        cfg = Qwen3OmniMoeTextConfig(**common)
    elif name == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts as cls

        cfg = AutoConfig.for_model(
            "deepseek_v3",
            hidden_size=32,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_group=1,
            topk_group=1,
        )
    elif name == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls

        cfg = AutoConfig.for_model("mixtral", hidden_size=32, intermediate_size=16, num_local_experts=8)
    elif name == "gpt_oss":  # transposed [E, in, out] weights, biases, interleaved clamped gate
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls

        cfg = AutoConfig.for_model(
            "gpt_oss", hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2
        )
    else:
        raise KeyError(name)
    torch.manual_seed(0)
    module = cls(cfg)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.2)
    return module


def tiny_text_config(model_type: str, **extra: object) -> object:
    """A tiny in-memory config (head_dim 16, 2 layers): checks must not depend on toy_config files."""
    base = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        use_cache=False,
    )
    return AutoConfig.for_model(model_type, **(base | extra))
