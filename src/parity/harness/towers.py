"""Where a VLM / Omni model's encoders are, according to the model itself (not to the code under test).

:func:`parity.training.vlm_trainer.locate_tower` finds a tower through a list of known attribute
paths. A test that takes the expected frozen set from that same lookup agrees with any mistake the
lookup makes (a wrong tower, or only its patch embedding). This module derives the expectation
from three sources that know nothing of those paths, and requires all three to agree:

1. **the config and the class**: the outermost sub-model (a ``PreTrainedModel``) built from
   ``model.config.vision_config`` (or ``audio_config``), i.e. whose config has that config's class
   and the same fields, and whose class name says it is an encoder
   (``*VisionModel``, ``*VisionTransformer*``, ``*VisionEncoder``, ``*AudioEncoder``, ...);
2. **the parameter names**: every parameter whose name has the checkpoint component of that
   encoder (``visual`` / ``audio_tower``, the state-dict prefix of every Qwen VLM and Omni thinker)
   must lie under the module found in 1, and the other way round;
3. **the parameter count computed from the config**: a closed formula per encoder architecture
   (patch embedding, blocks, mergers; conv stack, layers, projections), written from the
   architecture and checked against nothing in parity.

Used by the ``vlm_trainer`` suite (expected frozen set) and the ``dummy_forward`` worker (which
module to count encoder entries on).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_COMPONENT",
    "Encoder",
    "EncoderMismatch",
    "encoder_numel_from_config",
    "expected_encoder",
    "expected_encoders",
]

#: The config attribute that describes each encoder kind.
CONFIG_ATTR = {"vision": "vision_config", "audio": "audio_config"}
#: Class-name shapes of encoders in transformers 5.x (Qwen2VisionTransformerPretrainedModel,
#: Qwen2_5_VisionTransformerPretrainedModel, Qwen3VLVisionModel, Qwen2_5OmniVisionEncoder,
#: Qwen2_5OmniAudioEncoder, ...).
CLASS_NAME = {
    "vision": re.compile(r"Vision(Model|Transformer\w*|Encoder)$"),
    "audio": re.compile(r"Audio(Model|Transformer\w*|Encoder)$"),
}
#: The dotted-name component under which checkpoints store each encoder.
CHECKPOINT_COMPONENT = {"vision": "visual", "audio": "audio_tower"}


class EncoderMismatch(AssertionError):
    """The model's own descriptions of an encoder disagree (or the model has none of that kind)."""


@dataclass(frozen=True)
class Encoder:
    """One encoder as the model describes it: qualified name, module, parameter names and count."""

    kind: str
    path: str  # qualified module name in ``model.named_modules()``
    module: torch.nn.Module
    param_names: frozenset[str]  # qualified parameter names (as in ``model.named_parameters()``)
    numel: int
    numel_from_config: int


# --------------------------------------------------------------------------------------------
# parameter counts from the config


def _lin(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _layer_norm(dim: int) -> int:
    return 2 * dim


def _rms_norm(dim: int) -> int:
    return dim


def _patch(cfg: Any, width: int, bias: bool) -> int:
    patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
    return cfg.in_channels * cfg.temporal_patch_size * patch * patch * width + (width if bias else 0)


def _qwen2_vl_vision(cfg: Any) -> int:
    """Conv3d patch embedding (no bias), LayerNorm blocks with a GELU MLP, LayerNorm merger."""
    e, merged = cfg.embed_dim, cfg.embed_dim * cfg.spatial_merge_size**2
    hidden = int(e * cfg.mlp_ratio)
    block = 2 * _layer_norm(e) + _lin(e, 3 * e) + _lin(e, e) + _lin(e, hidden) + _lin(hidden, e)
    merger = _layer_norm(e) + _lin(merged, merged) + _lin(merged, cfg.hidden_size)
    return _patch(cfg, e, bias=False) + cfg.depth * block + merger


def _qwen2_5_vl_vision(cfg: Any) -> int:
    """Qwen2.5-VL / Qwen2.5-Omni: RMSNorm blocks with a gated MLP, RMSNorm merger, no position table."""
    e, i, merged = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size * cfg.spatial_merge_size**2
    block = 2 * _rms_norm(e) + 3 * _lin(e, e) + _lin(e, e) + 2 * _lin(e, i) + _lin(i, e)
    merger = _rms_norm(e) + _lin(merged, merged) + _lin(merged, cfg.out_hidden_size)
    return _patch(cfg, e, bias=False) + cfg.depth * block + merger


def _qwen3_vl_vision(cfg: Any) -> int:
    """Qwen3-VL / Qwen3.5 / Qwen3-Omni: biased patch conv, learned position table, DeepStack mergers."""
    e, i, merged = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size * cfg.spatial_merge_size**2
    block = 2 * _layer_norm(e) + _lin(e, 3 * e) + _lin(e, e) + _lin(e, i) + _lin(i, e)
    merger = _layer_norm(e) + _lin(merged, merged) + _lin(merged, cfg.out_hidden_size)
    deepstack = _layer_norm(merged) + _lin(merged, merged) + _lin(merged, cfg.out_hidden_size)
    n_deepstack = len(getattr(cfg, "deepstack_visual_indexes", None) or ())
    positions = cfg.num_position_embeddings * e
    return _patch(cfg, e, bias=True) + positions + cfg.depth * block + merger + n_deepstack * deepstack


def _audio_layer(d: int, ffn: int, k_bias: bool) -> int:
    attention = _lin(d, d, bias=k_bias) + 3 * _lin(d, d)  # k (bias or not), v, q, out
    return attention + 2 * _layer_norm(d) + _lin(d, ffn) + _lin(ffn, d)


def _qwen2_5_omni_audio(cfg: Any) -> int:
    """Whisper-style: two Conv1d, layers (k_proj without bias), ln_post, proj, bos/eos embedding."""
    d = cfg.d_model
    convs = (cfg.num_mel_bins * d * 3 + d) + (d * d * 3 + d)
    layers = cfg.encoder_layers * _audio_layer(d, cfg.encoder_ffn_dim, k_bias=False)
    return convs + 2 * cfg.output_dim + layers + _layer_norm(d) + _lin(d, cfg.output_dim)


def _qwen3_omni_audio(cfg: Any) -> int:
    """Three stride-2 Conv2d over (mel, time), a linear conv_out, layers, ln_post, two projections."""
    d, h = cfg.d_model, cfg.downsample_hidden_size
    freq = cfg.num_mel_bins
    for _ in range(3):  # kernel 3, stride 2, padding 1
        freq = (freq - 1) // 2 + 1
    convs = (h * 9 + h) + 2 * (h * h * 9 + h) + _lin(h * freq, d, bias=False)
    layers = cfg.encoder_layers * _audio_layer(d, cfg.encoder_ffn_dim, k_bias=True)
    return convs + layers + _layer_norm(d) + _lin(d, d) + _lin(d, cfg.output_dim)


#: Encoder config ``model_type`` -> closed parameter-count formula.
_FORMULAS: dict[str, Callable[[Any], int]] = {
    "qwen2_vl_vision": _qwen2_vl_vision,
    "qwen2_5_vl_vision": _qwen2_5_vl_vision,
    "qwen2_5_omni_vision_encoder": _qwen2_5_vl_vision,
    "qwen3_vl_vision": _qwen3_vl_vision,
    "qwen3_vl_moe_vision": _qwen3_vl_vision,
    "qwen3_5_vision": _qwen3_vl_vision,
    "qwen3_5_moe_vision": _qwen3_vl_vision,
    "qwen3_omni_moe_vision_encoder": _qwen3_vl_vision,
    "qwen2_5_omni_audio_encoder": _qwen2_5_omni_audio,
    "qwen3_omni_moe_audio_encoder": _qwen3_omni_audio,
}


def encoder_numel_from_config(config: Any) -> int:
    """Parameter count of the encoder that ``config`` (a vision or audio sub-config) describes.

    A model whose encoder architecture is not listed is an error naming its ``model_type``: add
    its formula here when onboarding it, so the frozen-set check keeps an independent count.
    """
    formula = _FORMULAS.get(config.model_type)
    if formula is None:
        raise EncoderMismatch(
            f"no parameter-count formula for encoder config {config.model_type!r}; "
            f"add one to parity.harness.towers._FORMULAS (known: {', '.join(sorted(_FORMULAS))})"
        )
    return formula(config)


# --------------------------------------------------------------------------------------------
# the module


def _same_config(candidate: Any, wanted: Any) -> bool:
    if type(candidate) is not type(wanted):
        return False
    drop = ("_attn_implementation_internal", "_name_or_path", "transformers_version", "dtype")
    a, b = candidate.to_dict(), wanted.to_dict()
    return {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def _outermost(named: list[tuple[str, torch.nn.Module]]) -> list[tuple[str, torch.nn.Module]]:
    names = [n for n, _ in named]
    return [(n, m) for n, m in named if not any(n != o and n.startswith(o + ".") for o in names)]


def expected_encoder(model: torch.nn.Module, kind: str) -> Encoder | None:
    """The ``kind`` encoder of ``model`` by config, class name, parameter names and count; None if absent.

    Raises :class:`EncoderMismatch` when the sources disagree: the check is only independent if
    each of them could have caught a lookup that found the wrong module.
    """
    from transformers import PreTrainedModel

    sub_config = getattr(getattr(model, "config", None), CONFIG_ATTR[kind], None)
    modules = list(model.named_modules())
    component = CHECKPOINT_COMPONENT[kind]
    by_prefix = {
        n for n, _ in model.named_parameters() if component in n.split(".")
    }  # the checkpoint's view
    if sub_config is None:
        if by_prefix:
            raise EncoderMismatch(
                f"{type(model).__name__}: no {CONFIG_ATTR[kind]} but parameters named {component}.*"
            )
        return None

    by_config = _outermost(
        [(n, m) for n, m in modules if isinstance(m, PreTrainedModel) and m is not model
         and _same_config(getattr(m, "config", None), sub_config)]
    )  # fmt: skip
    by_class = _outermost([(n, m) for n, m in modules if CLASS_NAME[kind].search(type(m).__name__)])
    if len(by_config) != 1:
        raise EncoderMismatch(
            f"{type(model).__name__}: expected one sub-model built from {CONFIG_ATTR[kind]}, "
            f"found {[n for n, _ in by_config]}"
        )
    path, module = by_config[0]
    if [n for n, _ in by_class] != [path]:
        raise EncoderMismatch(
            f"{type(model).__name__}: the {kind} encoder by config is {path} "
            f"({type(module).__name__}); by class name {[(n, type(m).__name__) for n, m in by_class]}"
        )
    names = frozenset(f"{path}.{n}" for n, _ in module.named_parameters())
    if names != by_prefix:
        raise EncoderMismatch(
            f"{type(model).__name__}: parameters under {path} and parameters named *.{component}.* "
            f"differ: only under the module {sorted(names - by_prefix)[:3]}, "
            f"only by name {sorted(by_prefix - names)[:3]}"
        )
    numel = sum(p.numel() for p in module.parameters())
    from_config = encoder_numel_from_config(sub_config)
    if numel != from_config:
        raise EncoderMismatch(
            f"{type(model).__name__}: {path} has {numel} parameters, its config "
            f"({sub_config.model_type}) gives {from_config}"
        )
    return Encoder(kind, path, module, names, numel, from_config)


def expected_encoders(model: torch.nn.Module) -> dict[str, Encoder]:
    """Every encoder the model has (``vision``, ``audio``), each cross-checked three ways."""
    found = {kind: expected_encoder(model, kind) for kind in CONFIG_ATTR}
    return {kind: enc for kind, enc in found.items() if enc is not None}
