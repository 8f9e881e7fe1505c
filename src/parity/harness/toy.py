"""Toy model configs: find them, load them offline, build bit-reproducible tiny models.

The suites compare the same model under different attention/MoE backends, so a toy model must
be byte-for-byte the same object whichever backend is asked for. `build_model` therefore always
builds under the seed with the neutral "eager" implementations and only afterwards switches to
the requested ones. Lookup and hashing (`known_models`, `config_path`, `config_hash`) live in the
torch-free registry (:mod:`parity.results.registry`) and are re-exported here.
"""

from __future__ import annotations

import copy
import difflib
import os
from typing import TYPE_CHECKING, Any

from parity.results.registry import ToyConfigError, config_hash, config_path, known_models
from parity.results.registry import read_json as _read_json

if TYPE_CHECKING:  # pragma: no cover - typing only; keeps the module importable without torch
    import torch
    from transformers import PretrainedConfig

__all__ = [
    "ToyConfigError",
    "build_model",
    "config_hash",
    "config_path",
    "hf_supports_sdpa",
    "is_moe",
    "known_models",
    "load_config",
    "model_family",
]

# HF's own flash names go through HF validation (so a missing package raises); any other name that
# contains "flash" is a project backend that HF's build-time check would reject (see notes §1).
_HF_FLASH_NAMES = frozenset({"flash_attention_2", "flash_attention_3", "flash_attention_4"})


# --------------------------------------------------------------------------------------------
# transformers side
# --------------------------------------------------------------------------------------------


def load_config(model_id_or_path: str | os.PathLike[str]) -> PretrainedConfig:
    """Load a toy config from the local file only, turning every failure into a ToyConfigError.

    The JSON is parsed here (not by `AutoConfig.from_pretrained`) so no hub code path is taken
    and the error names the file with a precise reason instead of a hub lookup message.
    """
    path = config_path(model_id_or_path)
    data = _read_json(path)
    model_type = data.get("model_type")
    if not model_type:
        raise ToyConfigError(f"{path}: missing 'model_type'")
    if not isinstance(model_type, str):
        raise ToyConfigError(f"{path}: 'model_type' must be a string, got {type(model_type).__name__}")

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ToyConfigError(
            f"{path}: unknown model_type {model_type!r} for this transformers version.{hint}"
        )
    config_cls = CONFIG_MAPPING[model_type]
    try:
        config = config_cls.from_dict(copy.deepcopy(data))
    except Exception as exc:  # strict-dataclass, TypeError, ValueError: all mean "bad field"
        raise ToyConfigError(f"{path}: invalid {model_type} config: {type(exc).__name__}: {exc}") from exc
    config._name_or_path = str(path.parent)
    return config


def model_family(config: PretrainedConfig) -> str:
    """Return "omni" (audio+vision thinker), "vlm" (vision tower) or "text": decides batch layout."""
    if getattr(config, "audio_config", None) is not None:
        return "omni"
    if getattr(config, "vision_config", None) is not None:
        return "vlm"
    return "text"


def _text_config(config: PretrainedConfig) -> Any:
    sub = getattr(config, "text_config", None)
    return sub if sub is not None else config


def is_moe(config: PretrainedConfig) -> bool:
    """True when the text stack has routed experts (the MoE backends only apply then)."""
    text = _text_config(config)
    for key in ("num_experts", "n_routed_experts", "num_local_experts"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return True
    return False


def _auto_class(config: PretrainedConfig) -> Any:
    """AutoModelForImageTextToText maps every VLM and both Omni thinkers in 5.17 and 5.24."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForCausalLM if model_family(config) == "text" else AutoModelForImageTextToText


def hf_supports_sdpa(config: PretrainedConfig) -> bool:
    """Whether transformers lets this model run its own ``sdpa`` (gpt-oss and gemma2 say no: their
    sinks / soft-capping are beyond it). Read from the model class, nothing is built."""
    model_class = _auto_class(config)._model_mapping[type(config)]
    return bool(getattr(model_class, "_supports_sdpa", False))


def _is_custom_flash(name: str) -> bool:
    return "flash" in name and name not in _HF_FLASH_NAMES and "|" not in name and "/" not in name


def _is_project_sdpa(name: Any, registry: Any) -> bool:
    """A registered attention function with "sdpa" in its name that is not transformers' own sdpa."""
    return isinstance(name, str) and "sdpa" in name and name != "sdpa" and name in registry.valid_keys()


def _forget_failed_flash_import() -> None:
    """Undo the mark transformers leaves behind when loading a flash implementation failed.

    ``lazy_import_flash_attention`` (5.17) records the implementation as loaded *before* importing it,
    so after one failed load (gpt-oss: flash_attention_2 is routed to a hub kernel and the ``kernels``
    package is missing) the next build in the same process passes validation with the hub kernel's
    name and fails only in forward, with an unrelated KeyError. Measured on an H200: the second
    gpt_oss FA2 mode failed that way. Forgetting the mark makes every build validate afresh.
    """
    try:
        from transformers import modeling_flash_attention_utils as fa_utils
    except ImportError:
        return
    if hasattr(fa_utils, "_loaded_implementation"):
        fa_utils._loaded_implementation = None


def _apply_attn_implementation(model: Any, requested: str | dict[str, str]) -> None:
    """Switch attention after the build; HF validates its own names, project flash names bypass it.

    HF's build-time check rejects any unregistered-kernel name containing "flash", so such project
    backends are written straight into the config (its setter propagates to sub-configs). They
    must be registered first, otherwise the model would silently fall back to eager attention.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    as_dict = dict(requested) if isinstance(requested, dict) else {"": requested}
    custom = {k: v for k, v in as_dict.items() if isinstance(v, str) and _is_custom_flash(v)}
    native = {k: v for k, v in as_dict.items() if k not in custom}
    for key, name in custom.items():
        if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
            where = f" (for {key})" if key else ""
            raise ValueError(
                f"attention implementation {name!r}{where} is not registered in AttentionInterface; "
                "register it before build_model, otherwise transformers silently runs eager attention"
            )
    if native:
        try:
            model.set_attn_implementation(native[""] if set(native) == {""} else native)
        except ValueError as exc:
            # transformers refuses any name containing "sdpa" for a model whose own sdpa path cannot
            # express it (gpt-oss: sinks; gemma2: softcap). A project backend that merely has "sdpa"
            # in its name (parity_sdpa_with_sp runs sinks and softcap itself) is written straight
            # into the config; HF's own "sdpa" stays refused with transformers' message.
            project = {k: v for k, v in native.items() if _is_project_sdpa(v, ALL_ATTENTION_FUNCTIONS)}
            if not project or "scaled_dot_product_attention" not in str(exc) or len(project) != len(native):
                raise
            custom.update(project)
    if custom:
        model.config._attn_implementation = custom[""] if set(custom) == {""} else custom


def _configs(config: Any) -> list[Any]:
    """The config and all nested sub-configs (vision/audio/text), depth first."""
    found, stack = [], [config]
    while stack:
        current = stack.pop()
        found.append(current)
        for key in getattr(current, "sub_configs", None) or {}:
            sub = getattr(current, key, None)
            if sub is not None:
                stack.append(sub)
    return found


def _cast(model: Any, dtype: torch.dtype, device: str | torch.device) -> None:
    """Cast parameters/persistent buffers, keep derived constants (rotary inv_freq) in fp32.

    HF's `from_pretrained(dtype=bf16)` computes non-persistent buffers in fp32; a blanket
    `model.to(bf16)` would round them and make the toy diverge from how real runs load.
    """
    keep: list[tuple[Any, str, torch.Tensor]] = []
    for module in model.modules():
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            buf = module._buffers.get(name)
            if buf is not None and buf.is_floating_point():
                keep.append((module, name, buf))
    model.to(device=device, dtype=dtype)
    for module, name, buf in keep:
        module._buffers[name] = buf.to(device=device)


#: Model types whose base model builds its attention masks WITHOUT ``position_ids`` (gpt_oss in
#: transformers 5.17 and 5.24: its forward's ``mask_kwargs`` lack them, where llama/qwen/gemma pass
#: them). transformers' mask builders only see packed-sequence borders through ``position_ids``, so
#: under eager/sdpa/flex such a model lets the samples of a packed row attend to each other: the HF
#: reference itself would be wrong for packed training. :func:`pass_positions_to_masks` fixes the
#: inputs, not the model: it builds the very masks the forward would build, with the positions.
MASKS_WITHOUT_POSITIONS = frozenset({"gpt_oss"})
MASK_POSITIONS_ATTR = "_parity_masks_see_positions"


def pass_positions_to_masks(model: Any) -> bool:
    """Make the base model's attention masks packing-aware; True when a hook was installed.

    A forward pre-hook on the base model (the module holding ``embed_tokens``) computes the
    forward's own mask mapping, ``{"full_attention": create_causal_mask(...),
    "sliding_attention": create_sliding_window_causal_mask(...)}`` with the same functions from the
    model's own module, adding only ``position_ids``, and passes it as the prepared
    ``attention_mask`` dict the forward accepts as is. Every attention implementation sees the mask
    its mask function builds (parity's backends: None or the 2-D padding mask, unchanged), so all
    modes keep identical inputs.
    """
    import sys

    import torch

    base = getattr(model, "model", None)
    if getattr(model.config, "model_type", None) not in MASKS_WITHOUT_POSITIONS or base is None:
        return False
    namespace = sys.modules[type(base).__module__]
    full, sliding = namespace.create_causal_mask, namespace.create_sliding_window_causal_mask

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict]:
        positions, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
        embeds, ids = kwargs.get("inputs_embeds"), kwargs.get("input_ids", args[0] if args else None)
        if positions is None or isinstance(mask, dict) or (embeds is None and ids is None):
            return args, kwargs
        if embeds is None:  # the mask builders read only its shape, dtype and device
            weight = module.embed_tokens.weight
            embeds = torch.empty(*ids.shape, weight.shape[-1], dtype=weight.dtype, device=ids.device)
        config = module.config
        kwargs["attention_mask"] = {
            "full_attention": full(config, embeds, mask, None, position_ids=positions),
            "sliding_attention": sliding(config, embeds, mask, None, position_ids=positions),
        }
        return args, kwargs

    base.register_forward_pre_hook(hook, with_kwargs=True)
    setattr(model, MASK_POSITIONS_ATTR, True)
    return True


def build_model(
    config: PretrainedConfig | str | os.PathLike[str],
    *,
    attn_implementation: str | dict[str, str],
    experts_implementation: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    init_device: str | torch.device = "cpu",
    state: dict[str, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """Build the toy model with weights that never depend on the requested backends.

    Steps: seed, build on CPU in fp32 with eager attention (and eager experts for MoE), then
    switch to the requested implementations through HF's setters (so HF still validates and a
    missing flash package raises ImportError instead of falling back), cast, move, train mode,
    and `use_cache=False` everywhere (a cache silently disables packed-sequence masks). Models
    whose masks ignore ``position_ids`` get them passed (:func:`pass_positions_to_masks`).
    `experts_implementation=None` keeps transformers' default for MoE models (grouped_mm).
    `dtype=None` means float32 (the default is not spelled `torch.float32` so that this module
    stays importable without torch). The Omni ids build the thinker class itself: it is the
    trainable model. `set_attn_implementation`/`set_experts_implementation` exist with the same
    behaviour in 5.17 and 5.24 for this use (5.17 matches sub-models by config identity and
    keeps a temporary marker while propagating; each setter is called once here, so the
    difference does not show).

    ``init_device``: where the seeded initialisation runs (a GPU initialises a 2B model in well under a
    second where the CPU needs more than a minute; the weights then differ from a CPU build, so one
    run must use one snapshot throughout, see :mod:`parity.harness.weights`). ``state``: a snapshot
    from :func:`parity.harness.weights.snapshot`; the architecture is then built on the meta device
    (no memory, no initialisation) and filled from it on ``device`` in ``dtype``.
    """
    import torch

    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    config = copy.deepcopy(config)
    dtype = torch.float32 if dtype is None else dtype
    moe = is_moe(config)

    build_kwargs: dict[str, Any] = {"attn_implementation": "eager"}
    if moe and experts_implementation is not None:
        build_kwargs["experts_implementation"] = "eager"
    torch.manual_seed(seed)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        if state is not None:
            from parity.harness import weights

            with weights.meta_build():
                model = _auto_class(config).from_config(config, **build_kwargs)
            model.to_empty(device=device)
        else:
            with torch.device(init_device):
                model = _auto_class(config).from_config(config, **build_kwargs)
    finally:
        torch.set_default_dtype(previous_dtype)

    try:
        _apply_attn_implementation(model, attn_implementation)
    except Exception:
        _forget_failed_flash_import()
        raise
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)

    _cast(model, dtype, device)
    if state is not None:
        from parity.harness import weights

        weights.fill(model, state)
    pass_positions_to_masks(model)
    model.train()
    for cfg in _configs(model.config):
        if hasattr(cfg, "use_cache"):
            cfg.use_cache = False
    return model
