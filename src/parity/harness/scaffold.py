"""``nox -s new_model``: shrink a real config to a toy, write its README and its registry entry.

    python -m parity.harness.scaffold MODEL_TYPE [--from config.json] [--id ID] [--origin URL] [--force]

Adding a model by hand took a new user most of half an hour, mostly spent on the toy rules
(``parity.harness.toy_rules``) and on keeping dependent fields consistent: mRoPE sections that must
sum to the rotary half of the new head dim, special token ids that must fit the shrunk vocabulary,
``layer_types`` that must list one entry per layer, window/index fields that point at layers that
no longer exist. This module does that mechanically and says what it changed and why:

1. source: the given ``config.json`` or transformers' defaults for the model type
   (``CONFIG_MAPPING[model_type]()``); an Omni model is reduced to its thinker (the trainable part);
2. shrink: every rule below writes a field only when the source value breaks the toy shape, and
   records (field, old, new, why), which becomes the README's ``## Shrunk / changed`` table;
3. check, in a scratch folder before anything is written: transformers loads it, the toy rules hold,
   the model builds with the architecture written in the config, has a toy-sized parameter count,
   and a forward+backward on the suites' own packed batch gives a finite loss and non-zero grads;
4. write ``<id>_toy/config.json`` + ``README.md`` and append ``[<id>]`` to ``registry.toml``.

Exit codes: 0 written; 1 the shrunk config fails a check (nothing written; the scratch copy is kept
and named); 2 refused (unknown or unsupported model type, existing folder without ``--force``,
bad arguments).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import math
import re
import shutil
import sys
import tempfile
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity.harness import toy_rules
from parity.results import registry

EXIT_OK, EXIT_CHECK_FAILED, EXIT_REFUSED = 0, 1, 2

#: The toy shape (see the README's "Common to every parity toy"): the shipped toys use these too.
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 256, 512, 2, 4, 2, 64
VOCAB, MAX_POSITIONS, EXPERTS, TOP_K, EXPERT_WIDTH = 1024, 4096, 8, 2, 128
VISION_WIDTH, VISION_HEADS, VISION_FFN, AUDIO_WIDTH, AUDIO_HEADS, AUDIO_FFN = 128, 2, 256, 128, 2, 256
#: Packed samples of the suites are 96 and 64 tokens: a window below both really masks.
SLIDING_WINDOW = 32
#: Multimodal placeholders sit above the text ids the batches draw from [3, 1000).
SPECIAL_TOKEN_IDS = {
    "image_token_id": 1000,
    "image_token_index": 1000,
    "video_token_id": 1001,
    "video_token_index": 1001,
    "vision_start_token_id": 1002,
    "vision_end_token_id": 1003,
    "audio_token_id": 1004,
    "audio_token_index": 1004,
    "audio_start_token_id": 1005,
    "audio_end_token_id": 1006,
}
TEXT_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
FIRST_FREE_TOKEN_ID = 1007
#: Bookkeeping of PretrainedConfig that says nothing about the architecture.
NOISE_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "dtype",
        "torch_dtype",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "problem_type",
        "id2label",
        "label2id",
        "auto_map",
        "quantization_config",
        "architectures",
        "use_return_dict",
        "_attn_implementation_autoset",
        "_commit_hash",
    }
)
_ID_RE = re.compile(r"^[a-z][a-z0-9_]*$")
MISSING = object()


class ScaffoldError(Exception):
    """A refusal or a failed check; ``code`` is the exit code, the message says what to do."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Change:
    path: str
    old: Any
    new: Any
    why: str
    #: the source had no such field: ``old`` is transformers' default
    defaulted: bool = False


@dataclass
class Scaffold:
    """What was decided: the toy config, every change with its reason, and where it came from."""

    case_id: str
    requested_type: str
    model_type: str
    config_class: str
    family: str
    architecture: str
    auto_class: str
    origin: str
    origin_link: str
    config: dict[str, Any]
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    registry_fields: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)
    #: the source is a config file (so "(default)" marks fields it did not have)
    from_file: bool = False


# --------------------------------------------------------------------------------------------
# source


def _transformers() -> tuple[Any, Any, str]:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING, transformers.PretrainedConfig, transformers.__version__


def _config_class(model_type: str) -> Any:
    mapping, _, version = _transformers()
    if model_type not in mapping:
        close = difflib.get_close_matches(model_type, list(mapping.keys()), n=5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ScaffoldError(
            EXIT_REFUSED,
            f"unknown model type {model_type!r} for transformers {version}.{hint} "
            "(the type is the `model_type` of a config.json, e.g. mixtral, glm4, qwen2_vl)",
        )
    return mapping[model_type]


def _significant(full: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Fields that say something about this architecture: not bookkeeping, not PretrainedConfig's default."""
    out = {}
    for key, value in full.items():
        if key in NOISE_KEYS or value is None or (key in base and base[key] == value and key != "model_type"):
            continue  # None: the class default, so leaving the field out says the same
        out[key] = _significant(value, base) if isinstance(value, dict) and "model_type" in value else value
    return out


def load_source(model_type: str, from_path: Path | None) -> tuple[str, dict[str, Any], str]:
    """(model type, source fields, origin sentence); an Omni config is reduced to its thinker."""
    cls = _config_class(model_type)
    _, base_cls, version = _transformers()
    base = base_cls().to_dict()
    if from_path is not None:
        try:
            data = registry.read_json(from_path)
        except registry.ToyConfigError as exc:
            raise ScaffoldError(EXIT_REFUSED, f"--from: {exc}") from exc
        file_type = data.get("model_type")
        if file_type != model_type:
            raise ScaffoldError(
                EXIT_REFUSED, f"--from {from_path} has model_type {file_type!r}, not {model_type!r}"
            )
        source = {k: v for k, v in data.items() if k not in NOISE_KEYS}
        origin = f"`{from_path}`"
    else:
        source = _significant(cls().to_dict(), base)
        origin = (
            f"transformers {version} defaults of `{cls.__name__}` (`AutoConfig.for_model({model_type!r})`)"
        )
    if "thinker_config" in (getattr(cls, "sub_configs", None) or {}):
        thinker = source.get("thinker_config")
        if not isinstance(thinker, dict):
            thinker = _significant(cls.sub_configs["thinker_config"]().to_dict(), base)
        thinker = {k: v for k, v in thinker.items() if k not in NOISE_KEYS}
        thinker.setdefault("model_type", cls.sub_configs["thinker_config"].model_type)
        return thinker["model_type"], thinker, origin + ", thinker_config only"
    source["model_type"] = model_type
    return model_type, source, origin


def origin_link(model_type: str, source_file: dict[str, Any] | None, explicit: str | None) -> str:
    """A huggingface.co link for the README: the given one, the checkpoint the file names, or the docs."""
    if explicit:
        return explicit
    name = (source_file or {}).get("_name_or_path") or ""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return f"https://huggingface.co/{name}"
    return f"https://huggingface.co/docs/transformers/model_doc/{model_type.removesuffix('_thinker')}"


# --------------------------------------------------------------------------------------------
# shrinking


class _Editor:
    """Reads the effective value (source or transformers' default), writes the toy, records the change."""

    def __init__(
        self, toy: dict, effective: dict, source: dict, prefix: str, changes: list[Change], from_file: bool
    ) -> None:
        self.toy, self.eff, self.src, self.prefix, self.changes = toy, effective, source, prefix, changes
        self.from_file = from_file

    def __contains__(self, key: str) -> bool:
        return key in self.eff

    def get(self, key: str, default: Any = None) -> Any:
        return self.eff.get(key, default)

    def set(self, key: str, value: Any, why: str) -> None:
        old = self.eff.get(key, MISSING)
        if old is not MISSING and old == value:
            return
        self.toy[key] = value
        self.eff[key] = value
        self.changes.append(
            Change(self.prefix + key, None if old is MISSING else old, value, why, key not in self.src)
        )

    def drop(self, key: str) -> None:
        self.toy.pop(key, None)

    def sub(self, key: str) -> _Editor | None:
        if not isinstance(self.eff.get(key), dict):
            return None
        toy = self.toy.setdefault(key, {})
        src = self.src.get(key) if isinstance(self.src.get(key), dict) else {}
        return _Editor(toy, self.eff[key], src, f"{self.prefix}{key}.", self.changes, self.from_file)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def scale_section(section: list[int], total: int) -> list[int]:
    """Rescale an mRoPE section to a new sum, keeping the proportions (largest remainders get the rest)."""
    old = sum(section)
    raw = [s * total / old for s in section]
    out = [math.floor(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    return out


def shrink_layer_types(layer_types: list[str]) -> list[str]:
    """One layer of each kind, in order of first appearance (two kinds at most: the toy has 2 layers)."""
    kinds = list(dict.fromkeys(layer_types))
    return (kinds + kinds * LAYERS)[:LAYERS] if len(kinds) < LAYERS else kinds[:LAYERS]


_MROPE_DEFAULT = re.compile(r"""rope_parameters\.get\(\s*["']mrope_section["']\s*,\s*(\[[\d,\s]+\])""")


def modeling_mrope_default(config_class: Any) -> list[int] | None:
    """The mRoPE section a Qwen-VL-style model uses when its config has none.

    transformers keeps this default in the modeling code (``rope_parameters.get("mrope_section",
    [16, 24, 24])``), not in the config: shrinking the head dim without writing a section would
    leave the full-size default on a toy head. Read from the modeling file's text, not imported.
    """
    import importlib.util

    module = config_class.__module__.replace(".configuration_", ".modeling_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    match = _MROPE_DEFAULT.search(Path(spec.origin).read_text(encoding="utf-8"))
    return json.loads(match.group(1)) if match else None


def _shrink_text(t: _Editor, notes: list[str], *, mm: bool, mrope_default: list[int] | None = None) -> None:
    old_layers = t.get("num_hidden_layers") or LAYERS
    t.set(
        "num_hidden_layers",
        LAYERS,
        "two layers: FSDP shards per block, and a mixed stack keeps one of each kind",
    )
    t.set("hidden_size", HIDDEN, "multiple of 64, small enough for a 2-core CPU")
    heads, kv = t.get("num_attention_heads"), t.get("num_key_value_heads")
    t.set("num_attention_heads", HEADS, "even (sp 2 splits heads); 256 / 4 = head dim 64")
    if kv is not None:
        mha = kv == heads
        why = "kept multi-head (kv = q heads)" if mha else "grouped-query attention kept, even for sp 2"
        t.set("num_key_value_heads", HEADS if mha else KV_HEADS, why)
    mla = _is_int(t.get("kv_lora_rank")) and "qk_nope_head_dim" in t
    experts_key = next((k for k in toy_rules.EXPERT_COUNT_KEYS if _is_int(t.get(k)) and t.get(k) > 0), None)
    if mla:
        t.set("qk_nope_head_dim", 48, "MLA: q/k head dim nope 48 + rope 16 = 64 (a flash head dim)")
        t.set("qk_rope_head_dim", 16, "MLA: rotary part of the q/k head")
        t.set("v_head_dim", 32, "MLA: v head dim differs from q/k (64), as in the real model")
        t.set("kv_lora_rank", 64, "MLA latent rank, shrunk with the width")
        if t.get("q_lora_rank"):
            t.set("q_lora_rank", 128, "MLA query rank, shrunk with the width")
        for derived in ("head_dim", "qk_head_dim"):
            t.drop(derived)
        notes.append("MLA: `head_dim` / `qk_head_dim` are not written; the config class derives them.")
    elif t.get("head_dim") is not None:
        t.set("head_dim", HEAD_DIM, "flash kernels are built for head dims 64 and 128")
    else:
        notes.append(
            f"No `head_dim` field: the model derives hidden_size / num_attention_heads = {HIDDEN} / {HEADS} "
            f"= {HIDDEN // HEADS}."
        )
    if _is_int(t.get("intermediate_size")):
        if experts_key and "moe_intermediate_size" not in t:
            t.set(
                "intermediate_size",
                EXPERT_WIDTH,
                f"the expert FFN width (no moe_intermediate_size): {EXPERTS} experts x {LAYERS} layers "
                "stay within the parameter budget",
            )
        else:
            t.set("intermediate_size", INTERMEDIATE, "2 x hidden")
    t.set("vocab_size", VOCAB, "text ids [3, 1000) plus the special ids >= 1000")
    if _is_int(t.get("max_position_embeddings")) and t.get("max_position_embeddings") > MAX_POSITIONS:
        t.set("max_position_embeddings", MAX_POSITIONS, "well above the suites' 160-token rows")

    if experts_key:
        t.set(experts_key, EXPERTS, "expert parallelism 2 gives each rank 4 experts")
        t.set("num_experts_per_tok", TOP_K, "top-2 routing: every token reaches two experts")
        for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
            if _is_int(t.get(key)):
                t.set(key, EXPERT_WIDTH, "expert FFN width, shrunk with the hidden size")
        if _is_int(t.get("n_shared_experts")) and t.get("n_shared_experts") > 1:
            t.set("n_shared_experts", 1, "one shared expert keeps the shared path")
        for key in ("n_group", "topk_group"):
            if _is_int(t.get(key)) and t.get(key) != 1:
                t.set(key, 1, "group-limited routing collapses to one group of 8 experts")
        if _is_int(t.get("first_k_dense_replace")) and t.get("first_k_dense_replace") > 1:
            t.set("first_k_dense_replace", 1, "layer 0 dense, layer 1 MoE: both kinds of block stay")
        if _is_int(t.get("decoder_sparse_step")) and t.get("decoder_sparse_step") > 1:
            t.set("decoder_sparse_step", 1, "every layer MoE (with 2 layers a larger step may leave none)")
        if isinstance(t.get("mlp_only_layers"), list) and any(i >= LAYERS for i in t.get("mlp_only_layers")):
            t.set(
                "mlp_only_layers",
                [i for i in t.get("mlp_only_layers") if i < LAYERS],
                "layers >= 2 do not exist",
            )
    jitter = t.get("router_jitter_noise")
    if isinstance(jitter, (int, float)) and not isinstance(jitter, bool) and jitter != 0:
        t.set("router_jitter_noise", 0.0, "random router noise would make two backends differ")

    for key, value in (
        ("linear_key_head_dim", 64),
        ("linear_value_head_dim", 64),
        ("linear_num_key_heads", 2),
        ("linear_num_value_heads", 4),
    ):
        if _is_int(t.get(key)):
            t.set(key, value, "linear-attention heads: even counts, head dim 64")
    layer_types = t.get("layer_types")
    if isinstance(layer_types, list) and layer_types:
        if len(set(layer_types)) > 1 or (t.from_file and "layer_types" in t.src):
            t.set("layer_types", shrink_layer_types(layer_types), "one entry per layer, one layer per kind")
        else:
            t.drop("layer_types")  # one kind only: the config class derives it from the layer count
    _shrink_indexer(t)
    if _is_int(t.get("max_window_layers")):
        new = max(0, min(LAYERS, round(t.get("max_window_layers") * LAYERS / old_layers)))
        t.set("max_window_layers", new, "scaled with the layer count")
    window = t.get("sliding_window")
    if _is_int(window) and window > SLIDING_WINDOW and t.get("use_sliding_window", True):
        t.set(
            "sliding_window",
            SLIDING_WINDOW,
            "below every packed sample of the suites (CPU 45-61 tokens, GPU 389-1109), so the window masks",
        )

    rope = t.get("rope_parameters")
    if isinstance(rope, dict):
        new_rope = copy.deepcopy(rope)
        changed = []
        current = rope.get("mrope_section")
        if mm and not isinstance(current, list) and mrope_default:
            current = mrope_default
            notes.append(
                f"The source has no `mrope_section`; the modeling code's default {mrope_default} is for the "
                "full head dim, so the toy writes its own."
            )
        if isinstance(current, list):
            factor = rope.get("partial_rotary_factor", t.get("partial_rotary_factor") or 1.0)
            half = int(HEAD_DIM * factor) // 2
            section = scale_section(list(current), half)
            if section != rope.get("mrope_section"):
                new_rope["mrope_section"] = section
                changed.append(
                    (
                        "mrope_section",
                        current,
                        section,
                        f"sums to head_dim x partial_rotary_factor / 2 = {half}",
                    )
                )
        if rope.get("rope_type") == "llama3" and (rope.get("original_max_position_embeddings") or 0) > 1024:
            new_rope["original_max_position_embeddings"] = 1024
            old = rope["original_max_position_embeddings"]
            why = "at head dim 64 all three llama3 frequency bands then occur"
            changed.append(("original_max_position_embeddings", old, 1024, why))
        if changed:
            t.toy["rope_parameters"] = new_rope
            t.eff["rope_parameters"] = new_rope
            for key in ("rope_scaling", "rope_theta"):  # legacy spellings folded into rope_parameters
                t.drop(key)
            for key, old, new, why in changed:
                t.changes.append(Change(f"{t.prefix}rope_parameters.{key}", old, new, why))
    elif mm:
        notes.append("No rope_parameters: the VLM suites need mRoPE (rope_parameters.mrope_section).")


#: DeepSeek sparse attention (indexer): top-k below every CPU sample of the suites (packed 61/45/54,
#: padded 37/23; the scaffold's check 96/64), so most queries see more keys than the indexer keeps.
INDEX_TOPK, INDEX_HEAD_DIM = 16, 64


def _shrink_indexer(t: _Editor) -> None:
    """DeepSeek sparse attention (``index_topk``): shrink the indexer and its per-layer lists.

    A top-k of 2048 over 160-token rows selects every key, so the sparse path would never be
    exercised; 78-entry per-layer lists fail validation on a 2-layer toy. ``mlp_layer_types`` is
    derived by the config class from ``first_k_dense_replace``, so it is dropped unless the source
    file spells it. ``indexer_types`` (glm_moe_dsa) keeps one layer of each kind.
    """
    if not _is_int(t.get("index_topk")):
        return
    t.set("index_topk", INDEX_TOPK, "below the suites' sample lengths, so the indexer really drops keys")
    if _is_int(t.get("index_head_dim")):
        t.set("index_head_dim", INDEX_HEAD_DIM, "indexer head: rope part (16) + 48, shrunk with the width")
    # index_n_heads is kept: the indexer sums ReLU scores over its heads, so with few heads many keys
    # score exactly 0 and the top-k boundary falls in that tie (4 heads: a packed row and the same
    # sample alone picked different keys). 32 heads (GLM-5) make an all-zero key vanishingly rare.
    mlp_types = t.get("mlp_layer_types")
    if isinstance(mlp_types, list) and len(mlp_types) != LAYERS:
        if t.from_file and "mlp_layer_types" in t.src:
            t.set("mlp_layer_types", shrink_layer_types(mlp_types), "one entry per layer, one layer per kind")
        else:
            t.drop("mlp_layer_types")  # derived from first_k_dense_replace by the config class
    if isinstance(t.get("indexer_types"), list):
        t.set(
            "indexer_types",
            ["full", "shared"],
            "layer 0 runs the indexer, layer 1 reuses its top-k: both paths, and the only top-k is computed "
            "before any attention backend runs, so every mode selects the same keys (no near-tie flips)",
        )


def _shrink_token_ids(editors: list[_Editor], vocab: int) -> None:
    """Special ids to 1000..1006 (what the batches place), text ids to 0/1/2, anything else in range."""
    next_free = FIRST_FREE_TOKEN_ID
    for e in editors:
        for key in list(e.eff):
            value = e.get(key)
            if not (key.endswith(("_token_id", "_token_index", "_token_ids"))):
                continue
            if key in SPECIAL_TOKEN_IDS and _is_int(value):
                e.set(key, SPECIAL_TOKEN_IDS[key], "placeholder ids sit above the text ids [3, 1000)")
            elif key in TEXT_TOKEN_IDS and value is not None:
                too_big = any(
                    v >= vocab for v in (value if isinstance(value, list) else [value]) if _is_int(v)
                )
                if too_big:
                    new = [TEXT_TOKEN_IDS[key]] if isinstance(value, list) else TEXT_TOKEN_IDS[key]
                    e.set(key, new, f"must be < vocab_size {vocab}")
            elif _is_int(value) and value >= vocab and next_free < vocab:
                e.set(key, next_free, f"must be < vocab_size {vocab}; above the text and placeholder ids")
                next_free += 1


def _shrink_vision(v: _Editor, text_hidden: int) -> None:
    for key in ("depth", "num_hidden_layers", "num_layers"):
        if _is_int(v.get(key)):
            v.set(key, LAYERS, "two vision blocks (one windowed, one full where the model has both)")
    if _is_int(v.get("embed_dim")):
        v.set("embed_dim", VISION_WIDTH, "vision width: 2 heads of 64")
        if _is_int(v.get("hidden_size")):
            v.set("hidden_size", text_hidden, "merger output = text hidden size")
    elif _is_int(v.get("hidden_size")):
        v.set("hidden_size", VISION_WIDTH, "vision width: 2 heads of 64")
        if _is_int(v.get("out_hidden_size")):
            v.set("out_hidden_size", text_hidden, "merger output = text hidden size")
    for key in ("num_heads", "num_attention_heads"):
        if _is_int(v.get(key)):
            v.set(key, VISION_HEADS, "vision head dim 64")
    if _is_int(v.get("intermediate_size")):
        v.set("intermediate_size", VISION_FFN, "2 x vision width")
    if _is_int(v.get("mlp_ratio")) and v.get("mlp_ratio") != 2:
        v.set("mlp_ratio", 2, "2 x vision width")
    if isinstance(v.get("fullatt_block_indexes"), list):
        v.set("fullatt_block_indexes", [LAYERS - 1], "block 0 windowed, block 1 full attention")
    if isinstance(v.get("deepstack_visual_indexes"), list):
        v.set("deepstack_visual_indexes", [0], "one deepstack tap, inside the 2 blocks")
    for key in list(v.eff):
        value = v.get(key)
        if (
            key.endswith("_indexes")
            and isinstance(value, list)
            and any(_is_int(i) and i >= LAYERS for i in value)
        ):
            v.set(key, [i for i in value if i < LAYERS], "indexes of blocks >= 2 no longer exist")
    merge = v.get("spatial_merge_size")
    if _is_int(merge) and 4 % merge:
        v.set("spatial_merge_size", 2, "the suites' image grids (8 x 8, 4 x 8 patches) must divide by it")
    temporal = v.get("temporal_patch_size")
    if _is_int(temporal) and 2 % temporal:
        v.set("temporal_patch_size", 2, "the suites' 2-frame videos must divide by it")
    if _is_int(v.get("num_position_embeddings")) and v.get("num_position_embeddings") > 64:
        v.set("num_position_embeddings", 64, "a perfect square (8 x 8) covering the suites' 8 x 8 grids")


def _shrink_audio(a: _Editor, text_hidden: int) -> None:
    for key, value, why in (
        ("encoder_layers", LAYERS, "two audio encoder layers"),
        ("num_hidden_layers", LAYERS, "two audio encoder layers"),
        ("d_model", AUDIO_WIDTH, "audio width: 2 heads of 64"),
        ("encoder_attention_heads", AUDIO_HEADS, "audio head dim 64"),
        ("encoder_ffn_dim", AUDIO_FFN, "2 x audio width"),
        ("output_dim", text_hidden, "audio projection output = text hidden size"),
    ):
        if _is_int(a.get(key)):
            a.set(key, value, why)
    if _is_int(a.get("downsample_hidden_size")) and a.get("downsample_hidden_size") > 32:
        a.set("downsample_hidden_size", 32, "conv downsampler width, shrunk with the encoder")


def _no_randomness(e: _Editor) -> None:
    for key in list(e.eff):
        value = e.get(key)
        if ("dropout" in key or key == "drop_path_rate") and isinstance(value, (int, float)) and value:
            e.set(key, 0.0, "dropout would make two backends differ by randomness, not arithmetic")


def _family(effective: dict[str, Any]) -> str:
    return registry.family_of(effective)


def _architecture(model_type: str, family: str) -> tuple[str, str]:
    from transformers.models.auto import modeling_auto

    if family == "text":
        names, auto = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "AutoModelForCausalLM"
    else:
        names, auto = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, "AutoModelForImageTextToText"
    if model_type not in names:
        raise ScaffoldError(
            EXIT_REFUSED,
            f"model type {model_type!r} ({family}) has no {auto} class in this transformers: parity builds "
            "text models as causal LMs and VLM/Omni models as image-text-to-text models",
        )
    return names[model_type], auto


def _normalize_flat_text(source: dict[str, Any], cls: Any) -> list[str]:
    """Old-style VLM configs keep text fields at the top level; transformers 5 reads them from text_config."""
    if "text_config" not in (getattr(cls, "sub_configs", None) or {}):
        return []
    default = cls()  # the sub-config class may be AutoConfig (llava-style): take the instance's
    text_keys = set(default.text_config.to_dict())
    top_keys = set(default.to_dict())
    flat = [
        k
        for k in source
        if k in text_keys and k not in top_keys and k not in NOISE_KEYS and k != "model_type"
    ]
    if not flat and not any(k in source for k in ("rope_scaling", "rope_theta")):
        return []
    text = source.setdefault("text_config", {})
    for key in flat:
        text.setdefault(key, source.pop(key))
    moved = list(flat)
    legacy = {k: source.pop(k) for k in ("rope_scaling", "rope_theta") if k in source}
    if legacy and "rope_parameters" not in text:
        rope = dict(legacy.get("rope_scaling") or {})
        kind = rope.pop("type", None)
        rope.setdefault("rope_type", "default" if kind in (None, "mrope") else kind)
        if "rope_theta" in legacy:
            rope.setdefault("rope_theta", legacy["rope_theta"])
        text["rope_parameters"] = rope
        moved.append(" + ".join(legacy) + " (as text_config.rope_parameters)")
    return [
        f"Moved top-level text fields into `text_config` (the transformers 5 layout): {', '.join(moved)}."
    ]


def shrink(
    requested_type: str,
    case_id: str,
    *,
    from_path: Path | None = None,
    origin: str | None = None,
) -> Scaffold:
    """Decide the toy config (nothing is written here)."""
    model_type, source, origin_text = load_source(requested_type, from_path)
    cls = _config_class(model_type)
    notes = _normalize_flat_text(source, cls)
    try:
        effective = cls.from_dict(copy.deepcopy(source)).to_dict()
    except Exception as exc:  # noqa: BLE001 - any failure here means the source config is unusable
        raise ScaffoldError(
            EXIT_REFUSED, f"transformers cannot read the source config: {type(exc).__name__}: {exc}"
        ) from exc
    family = _family(effective)
    architecture, auto_class = _architecture(model_type, family)
    toy = {"model_type": model_type, "architectures": [architecture]}
    toy.update({k: copy.deepcopy(v) for k, v in source.items() if k != "model_type"})
    changes: list[Change] = []
    top = _Editor(toy, effective, source, "", changes, from_path is not None)
    text = top.sub("text_config") if family != "text" else top
    if text is None:
        raise ScaffoldError(
            EXIT_REFUSED, f"{model_type}: a {family} config without text_config is not supported"
        )
    _shrink_text(text, notes, mm=family != "text", mrope_default=modeling_mrope_default(cls))
    vision = top.sub("vision_config")
    audio = top.sub("audio_config")
    if vision is not None:
        _shrink_vision(vision, HIDDEN)
        if not isinstance((text.get("rope_parameters") or {}).get("mrope_section"), list):
            raise ScaffoldError(
                EXIT_REFUSED,
                f"{model_type} is a VLM without mRoPE: parity's VLM suites (batches with image_grid_thw, "
                "dummy_forward) cover Qwen-VL-style models (rope_parameters.mrope_section)",
            )
    if audio is not None:
        _shrink_audio(audio, HIDDEN)
    _shrink_token_ids([top] if text is top else [top, text], VOCAB)
    if family != "text":
        for name in toy_rules.SPECIAL_IDS[: 4 if family == "vlm" else 7]:
            if not any(_is_int(top.get(f"{name}{suffix}")) for suffix in ("_token_id", "_token_index")):
                top.set(
                    f"{name}_token_id",
                    SPECIAL_TOKEN_IDS[f"{name}_token_id"],
                    "the batches and the rope index need it; the source keeps it elsewhere",
                )
    for editor in {id(e): e for e in (top, text, vision, audio) if e is not None}.values():
        _no_randomness(editor)
    text.set("use_cache", False, "a KV cache silently disables packed-sequence masks")
    if text is not top and "use_cache" in top:
        top.set("use_cache", False, "a KV cache silently disables packed-sequence masks")

    registry_fields: dict[str, Any] = {}
    if "linear_attention" in (text.get("layer_types") or []):
        registry_fields = {
            "max_sp_size": 1,
            "max_sp_reason": "the linear-attention layers do not take the sequence split",
        }
    if _is_int(text.get("index_topk")):
        registry_fields = {
            "max_sp_size": 1,
            "max_sp_reason": "the sparse-attention indexer picks its top-k keys before the Ulysses "
            "exchange, from the local sequence slice only",
        }
    if requested_type != model_type:
        notes.append(f"Thinker only: `{model_type}` is the trainable part of `{requested_type}`.")
    link = origin_link(model_type, registry.read_json(from_path) if from_path else None, origin)
    return Scaffold(
        case_id=case_id,
        requested_type=requested_type,
        model_type=model_type,
        config_class=cls.__name__,
        family=family,
        architecture=architecture,
        auto_class=auto_class,
        origin=origin_text,
        origin_link=link,
        config=toy,
        changes=changes,
        notes=notes,
        registry_fields=registry_fields,
        from_file=from_path is not None,
    )


# --------------------------------------------------------------------------------------------
# checking


def check(scaffold: Scaffold, folder: Path) -> dict[str, Any]:
    """Load, apply the toy rules, build, and run one forward+backward on the suites' packed batch."""
    import torch

    from parity.harness import toy
    from parity.harness.batches import packed_batch

    path = folder / "config.json"
    started = time.perf_counter()
    try:
        config = toy.load_config(path)
    except toy.ToyConfigError as exc:
        raise ScaffoldError(EXIT_CHECK_FAILED, f"transformers does not load the toy: {exc}") from exc
    broken = toy_rules.violations(config)
    if broken:
        raise ScaffoldError(EXIT_CHECK_FAILED, "the toy breaks the toy rules:\n  - " + "\n  - ".join(broken))
    # sdpa for speed, eager where transformers refuses sdpa (gpt-oss: sinks; gemma2: softcap)
    model = toy.build_model(config, attn_implementation="sdpa" if toy.hf_supports_sdpa(config) else "eager")
    built = time.perf_counter()
    n_params = sum(p.numel() for p in model.parameters())
    if type(model).__name__ != scaffold.architecture:
        raise ScaffoldError(
            EXIT_CHECK_FAILED, f"built {type(model).__name__}, config says {scaffold.architecture}"
        )
    if not toy_rules.MIN_PARAMS <= n_params <= toy_rules.MAX_PARAMS:
        raise ScaffoldError(
            EXIT_CHECK_FAILED,
            f"{n_params:,} parameters, outside the toy budget "
            f"[{toy_rules.MIN_PARAMS:,}, {toy_rules.MAX_PARAMS:,}]",
        )
    batch = packed_batch(config, model=model)
    loss = model(**batch.inputs).loss
    loss.backward()
    loss_value = float(loss.detach())
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    grad_norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
    done = time.perf_counter()
    if not math.isfinite(loss_value) or not (math.isfinite(grad_norm) and grad_norm > 0):
        raise ScaffoldError(
            EXIT_CHECK_FAILED, f"dead forward/backward: loss {loss_value}, grad norm {grad_norm}"
        )
    return {
        "params": n_params,
        "loss": loss_value,
        "grad_norm": grad_norm,
        "tokens": int(batch.inputs["input_ids"].numel()),
        "build_s": built - started,
        "fwd_bwd_s": done - built,
    }


# --------------------------------------------------------------------------------------------
# writing


def _fmt(value: Any) -> str:
    if isinstance(value, list) and len(value) > 8:
        counts = Counter(json.dumps(v).strip('"') for v in value)
        return f"{len(value)} entries ({', '.join(f'{n} x {v}' for v, n in counts.items())})"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return (
        json.dumps(value)
        if isinstance(value, (list, dict, str))
        else f"{value:g}"
        if isinstance(value, float)
        else str(value)
    )


def render_readme(s: Scaffold, command: str) -> str:
    """The toy's README: origin, every changed field (old -> new, why), notes; what the checklist reads."""
    lines = [
        f"# `{s.case_id}` toy — {s.config_class} (`{s.model_type}`)",
        "",
        f"Shrunk from {s.origin}: {s.origin_link}  ",
        f"Builds as `{s.architecture}` via `{s.auto_class}`. Written by `{command}`; this directory's",
        "config.json is authoritative.",
        "",
        "## Shrunk / changed",
        "",
        '"upstream" is the source\'s value ("(default)": the source had no such field, transformers\'',
        "default shown). Every other field is kept as in the source.",
        "",
        "| field | upstream | toy | why |",
        "|---|---|---|---|",
    ]
    for c in s.changes:
        old = _fmt(c.old) + (" (default)" if c.defaulted and s.from_file else "")
        lines.append(f"| `{c.path}` | {old} | {_fmt(c.new)} | {c.why} |")
    if s.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in s.notes]
    lines += [
        "",
        "## Common to every parity toy",
        "",
        "- Fields that are not in config.json take transformers' defaults for the config class.",
        "- Sized for a 2-core CPU yet kernel friendly: attention head dim 64, hidden sizes multiples of 64,",
        "  even head counts so sequence-parallel size 2 can split heads; MoE: 8 experts, top-2.",
        "- `use_cache: false` and all dropouts 0: a KV cache silently disables packed-sequence masks",
        "  and dropout would make two backends differ by randomness, not by arithmetic.",
        "- Vocabulary 1024. Text ids used by the batches are drawn from [3, 1000); special ids sit at",
        "  >= 1000.",
        "- Builds offline from this file; weights are seeded, not loaded.",
    ]
    return "\n".join(lines) + "\n"


def registry_entry(case_id: str, fields: dict[str, Any], command: str) -> str:
    out = [f"# {case_id}: added by `{command}`", f"[{case_id}]"]
    for key, value in fields.items():
        out.append(f"{key} = {json.dumps(value)}")
    return "\n".join(out) + "\n"


def write(s: Scaffold, root: Path, command: str, *, force: bool) -> tuple[Path, bool]:
    """Write the folder and append the registry entry (unless one exists); return (folder, entry added)."""
    folder = root / f"{s.case_id}{registry.SUFFIX}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(s.config, indent=2) + "\n")
    (folder / "README.md").write_text(render_readme(s, command))
    reg = root / registry.REGISTRY_FILE
    text = reg.read_text() if reg.is_file() else ""
    try:
        present = s.case_id in tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScaffoldError(EXIT_CHECK_FAILED, f"{reg}: invalid TOML, entry not added: {exc}") from exc
    if not present:
        sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        reg.write_text(text + sep + registry_entry(s.case_id, s.registry_fields, command))
    return folder, not present


# --------------------------------------------------------------------------------------------
# command line


def _print_decisions(s: Scaffold) -> None:
    print(
        f"new_model: {s.requested_type} -> id {s.case_id!r} ({s.family}, {s.config_class}, {s.architecture})"
    )
    print(f"  source: {s.origin}")
    width = max((len(c.path) for c in s.changes), default=10)
    for c in s.changes:
        old = _fmt(c.old) + (" (default)" if c.defaulted and s.from_file else "")
        print(f"  {c.path:<{width}}  {old} -> {_fmt(c.new)}   ({c.why})")
    for note in s.notes:
        print(f"  note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nox -s new_model --", description="Shrink a config to a parity toy and register it."
    )
    parser.add_argument("model_type", help="transformers model type, e.g. mixtral, glm4, qwen2_vl")
    parser.add_argument(
        "--from", dest="from_path", type=Path, help="real config.json to shrink (default: defaults)"
    )
    parser.add_argument("--id", dest="case_id", help="case id (default: the model type)")
    parser.add_argument("--origin", help="huggingface.co link of the real config, for the README")
    parser.add_argument("--force", action="store_true", help="overwrite an existing toy folder")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_REFUSED if exc.code else EXIT_OK
    case_id = args.case_id or args.model_type
    command = "nox -s new_model -- " + " ".join(argv if argv is not None else sys.argv[1:])
    root = registry.toy_root()
    try:
        if not _ID_RE.match(case_id):
            raise ScaffoldError(
                EXIT_REFUSED, f"id {case_id!r}: use lower case letters, digits and _ (a TOML key)"
            )
        folder = root / f"{case_id}{registry.SUFFIX}"
        if folder.exists() and not args.force:
            raise ScaffoldError(
                EXIT_REFUSED, f"{folder} exists: pick another --id, or pass --force to overwrite its files"
            )
        if args.from_path is not None and not args.from_path.is_file():
            raise ScaffoldError(EXIT_REFUSED, f"--from {args.from_path}: no such file")
        scaffold = shrink(args.model_type, case_id, from_path=args.from_path, origin=args.origin)
        _print_decisions(scaffold)
        scratch = Path(tempfile.mkdtemp(prefix=f"parity-new-{case_id}-")) / f"{case_id}{registry.SUFFIX}"
        scratch.mkdir()
        (scratch / "config.json").write_text(json.dumps(scaffold.config, indent=2) + "\n")
        try:
            scaffold.check = check(scaffold, scratch)
        except ScaffoldError as exc:
            raise ScaffoldError(
                exc.code, f"{exc}\n  nothing written; the candidate config is {scratch / 'config.json'}"
            ) from exc
        shutil.rmtree(scratch.parent, ignore_errors=True)
        c = scaffold.check
        print(
            f"  check: loads, toy rules hold, {c['params']:,} params, build {c['build_s']:.1f} s, "
            f"fwd+bwd on {c['tokens']} packed tokens {c['fwd_bwd_s']:.1f} s (loss {c['loss']:.4f}, "
            f"grad norm {c['grad_norm']:.4f})"
        )
        folder, added = write(scaffold, root, command, force=args.force)
    except ScaffoldError as exc:
        print(f"new_model: {exc}", file=sys.stderr)
        return exc.code
    reg = root / registry.REGISTRY_FILE
    print(f"  wrote {folder / 'config.json'}, {folder / 'README.md'}")
    print(
        f"  registry: {'added' if added else 'kept the existing'} [{case_id}] in {reg}"
        + (
            f" ({', '.join(f'{k} = {v!r}' for k, v in scaffold.registry_fields.items())})"
            if added and scaffold.registry_fields
            else ""
        )
    )
    suites = registry.SUITES_BY_FAMILY[scaffold.family]
    print("next:")
    print(f"  nox -s checklist -- {case_id}          # the onboarding checklist, seconds")
    print(f"  nox -s checklist -- {case_id} --run    # + {', '.join(suites)}, then the merged table")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
