"""The toy shape rules: what every toy config and its README must satisfy, as sentences to fix.

One definition, three readers: the unit tests hold every registry case to it
(``tests/unit/test_toy.py``), ``nox -s new_model`` checks the config it wrote, and
``nox -s checklist`` prints the broken rules with the fix. Each rule exists for a kernel or a
suite: flash kernels are built for head dims 64/128 and want hidden sizes in multiples of 64,
sequence parallelism 2 splits the heads, expert parallelism 2 needs >= 8 experts so every rank
holds several, the batches draw text ids from [3, 1000) so special ids sit at >= 1000, and a KV
cache or dropout would make two backends differ for reasons other than arithmetic.

Works on a loaded ``PretrainedConfig`` (``parity.harness.toy.load_config``) so derived values
(``head_dim`` absent = hidden / heads, attribute aliases) are transformers' own. The module itself
imports neither torch nor transformers.
"""

from __future__ import annotations

from typing import Any

#: Parameter budget of a toy: big enough that every kernel tiles, small enough for a 2-core CPU.
MIN_PARAMS, MAX_PARAMS = 200_000, 5_000_000
LAYERS = 2
HEAD_DIMS = (64, 128)
MAX_VOCAB = 2048
MIN_EXPERTS, TOP_K = 8, 2
#: Special token ids by family, read as ``<name>_token_id`` (Omni configs alias the ``_index`` keys).
SPECIAL_IDS = ("image", "video", "vision_start", "vision_end", "audio", "audio_start", "audio_end")
EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts")
README_ORIGIN = "huggingface.co/"
README_SECTION = "## Shrunk / changed"


def text_config(config: Any) -> Any:
    sub = getattr(config, "text_config", None)
    return sub if sub is not None else config


def head_dim(text: Any) -> int:
    """The config's head_dim, or what the model derives when the field is absent (or None)."""
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def rotary_half(text: Any) -> int:
    """Half the rotary dims: what an mRoPE section must sum to."""
    rope = getattr(text, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", None) or 1.0)
    return int(head_dim(text) * factor) // 2


def expert_count(text: Any) -> int | None:
    for key in EXPERT_COUNT_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def family(config: Any) -> str:
    if getattr(config, "audio_config", None) is not None:
        return "omni"
    if getattr(config, "vision_config", None) is not None:
        return "vlm"
    return "text"


def is_mla(text: Any) -> bool:
    """Multi-head latent attention (DeepSeek): q/k and v head dims are separate fields."""
    return (
        getattr(text, "kv_lora_rank", None) is not None
        and getattr(text, "qk_nope_head_dim", None) is not None
    )


def violations(config: Any) -> list[str]:
    """Every broken shape rule of a loaded toy config, each naming the field, its value and the rule."""
    out: list[str] = []
    text = text_config(config)
    prefix = "text_config." if text is not config else ""

    def need(ok: bool, message: str) -> None:
        if not ok:
            out.append(message)

    need(
        text.num_hidden_layers == LAYERS, f"{prefix}num_hidden_layers is {text.num_hidden_layers}, must be 2"
    )
    need(text.hidden_size % 64 == 0, f"{prefix}hidden_size {text.hidden_size} is not a multiple of 64")
    need(
        text.num_attention_heads % 2 == 0,
        f"{prefix}num_attention_heads {text.num_attention_heads} is odd (sp 2 splits heads)",
    )
    kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    need(kv % 2 == 0, f"{prefix}num_key_value_heads {kv} is odd (sp 2 splits heads)")
    need(text.vocab_size <= MAX_VOCAB, f"{prefix}vocab_size {text.vocab_size} > {MAX_VOCAB}")
    if is_mla(text):
        qk = text.qk_nope_head_dim + text.qk_rope_head_dim
        need(qk == 64, f"{prefix}qk_nope_head_dim + qk_rope_head_dim = {qk}, must be 64")
        need(text.v_head_dim != 64, f"{prefix}v_head_dim is 64: keep it different from the q/k dim (MLA)")
        need(
            bool(text.q_lora_rank and text.kv_lora_rank), f"{prefix}q_lora_rank and kv_lora_rank must be set"
        )
        for key in ("first_k_dense_replace", "n_group", "topk_group"):
            if hasattr(text, key):
                need(getattr(text, key) == 1, f"{prefix}{key} is {getattr(text, key)}, must be 1")
    else:
        need(head_dim(text) in HEAD_DIMS, f"{prefix}head_dim is {head_dim(text)}, must be 64 or 128")
    for key in ("attention_dropout", "residual_dropout"):
        value = getattr(text, key, 0.0)
        need(value == 0.0, f"{prefix}{key} is {value}, must be 0.0")
    need(text.use_cache is False, f"{prefix}use_cache is {text.use_cache}, must be false")

    experts = expert_count(text)
    if experts is not None:
        need(experts >= MIN_EXPERTS, f"{prefix}experts: {experts}, need >= {MIN_EXPERTS} (ep 2)")
        need(
            text.num_experts_per_tok == TOP_K,
            f"{prefix}num_experts_per_tok is {text.num_experts_per_tok}, must be 2",
        )

    kind = family(config)
    if kind != "text":
        section = (getattr(text, "rope_parameters", None) or {}).get("mrope_section")
        if section is None:
            out.append(f"{prefix}rope_parameters.mrope_section is missing (the VLM batches use mRoPE)")
        else:
            need(
                sum(section) == rotary_half(text),
                f"{prefix}rope_parameters.mrope_section {list(section)} sums to {sum(section)}, "
                f"must be head_dim * partial_rotary_factor / 2 = {rotary_half(text)}",
            )
        vision = config.vision_config
        width = getattr(vision, "embed_dim", None) or vision.hidden_size
        heads = getattr(vision, "num_heads", None) or getattr(vision, "num_attention_heads", 0)
        need(width % 64 == 0, f"vision_config width {width} is not a multiple of 64")
        need(heads % 2 == 0, f"vision_config.num_heads {heads} is odd")
        need(bool(heads) and width // heads == 64, f"vision head dim {width}/{heads} must be 64")
        for name in SPECIAL_IDS[: 4 if kind == "vlm" else 7]:
            value = getattr(config, f"{name}_token_id", None)
            need(
                isinstance(value, int) and 1000 <= value < text.vocab_size,
                f"{name}_token_id is {value!r}, must be in [1000, vocab_size={text.vocab_size})",
            )
    if kind == "omni":
        need(
            config.model_type.endswith("_thinker"),
            f"model_type {config.model_type!r}: Omni toys are the thinker",
        )
        audio = config.audio_config
        heads = audio.encoder_attention_heads
        need(heads % 2 == 0, f"audio_config.encoder_attention_heads {heads} is odd")
        need(audio.d_model // heads == 64, f"audio head dim {audio.d_model}/{heads} must be 64")
    layer_types = getattr(text, "layer_types", None)
    if layer_types and "linear_attention" in layer_types:
        need(
            list(layer_types) == ["linear_attention", "full_attention"],
            f"{prefix}layer_types {list(layer_types)}: one linear and one full attention layer",
        )
        for key in ("linear_num_key_heads", "linear_num_value_heads"):
            need(getattr(text, key) % 2 == 0, f"{prefix}{key} {getattr(text, key)} is odd")
    return out


def readme_violations(readme: str, kind: str) -> list[str]:
    """The README rules every toy folder follows (its content against the config: the checklist)."""
    out = []
    if README_ORIGIN not in readme:
        out.append(f"README names no origin: add a {README_ORIGIN} link to the real config")
    if README_SECTION not in readme:
        out.append(f"README has no '{README_SECTION}' section listing what was changed")
    if kind == "omni" and "Thinker only" not in readme:
        out.append("README of an Omni toy must say 'Thinker only' (the toy is the thinker, not the talker)")
    return out
