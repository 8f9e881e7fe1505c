"""The VLM side of the trainer: find the vision/audio towers and freeze them on request.

``freeze_vit`` is a one-line feature that breaks silently: transformers moves modules between
releases (``model.visual`` -> ``model.model.visual``; the Omni thinker's ``thinker.visual`` in
5.17 became ``thinker.model.visual`` in 5.24), and a freeze that looks up a path that no longer
exists either freezes nothing or, worse, guesses. So the lookup here tries an explicit list of
known paths, in order, and raises a ``ValueError`` naming the model class and every path it tried
when none matches, instead of training a "frozen" tower.

:func:`find_tower` is shared with :mod:`parity.training.dummy_forward`, which needs the same modules (and
the module that owns them) to keep text-only ranks in step with multimodal ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "TOWER_PATHS",
    "FreezeReport",
    "TowerLocation",
    "VLMTrainer",
    "VLMTrainingArguments",
    "find_tower",
    "locate_tower",
    "unwrap_model",
]

TowerKind = Literal["vision", "audio"]

#: Where each transformers version keeps the towers, most specific first. Relative to the
#: unwrapped model: a ForConditionalGeneration VLM, an Omni thinker, or a full Omni model.
TOWER_PATHS: dict[str, tuple[str, ...]] = {
    "vision": (
        "model.visual",  # 5.x VLMs (qwen2_vl ... qwen3_5_moe) and the 5.24 Omni thinker
        "visual",  # 5.17 Omni thinker; bare inner models (Qwen2VLModel, ...)
        "thinker.model.visual",  # full Omni model, 5.24
        "thinker.visual",  # full Omni model, 5.17
    ),
    "audio": (
        "model.audio_tower",  # 5.24 Omni thinker
        "audio_tower",  # 5.17 Omni thinker
        "thinker.model.audio_tower",
        "thinker.audio_tower",
    ),
}

# Wrapper attributes that hold the real model: PEFT (`base_model.model`, also reachable through
# get_base_model()), DDP / FSDP1 (`module`, `_fsdp_wrapped_module`), torch.compile (`_orig_mod`).
# FSDP2 does not wrap (it swaps the module's class in place), so it needs no unwrapping.
_WRAPPER_ATTRS = ("_orig_mod", "_fsdp_wrapped_module", "module")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip trivial wrappers (PEFT, DDP, FSDP1, torch.compile) until the HF model is reached."""
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        get_base = getattr(model, "get_base_model", None)  # PEFT; transformers models have none
        if callable(get_base):
            inner = get_base()
            if isinstance(inner, torch.nn.Module) and inner is not model:
                model = inner
                continue
        for attr in _WRAPPER_ATTRS:
            inner = model._modules.get(attr)
            if inner is not None:
                model = inner
                break
        else:
            break
    return model


@dataclass(frozen=True)
class TowerLocation:
    """A tower, the module that owns it (and calls it in its forward), and the path that matched."""

    path: str
    owner: torch.nn.Module
    tower: torch.nn.Module


def _get(root: torch.nn.Module, dotted: str) -> torch.nn.Module | None:
    node: object = root
    for part in dotted.split("."):
        # Modules live in `_modules`; plain getattr would also find unrelated attributes/properties.
        node = getattr(node, "_modules", {}).get(part)
        if node is None:
            return None
    return node if isinstance(node, torch.nn.Module) else None


def locate_tower(model: torch.nn.Module, kind: TowerKind = "vision") -> TowerLocation:
    """Find the ``kind`` tower of ``model`` and its owner; ValueError naming the paths tried if absent."""
    if kind not in TOWER_PATHS:
        raise ValueError(f"unknown tower kind {kind!r}; expected one of {', '.join(TOWER_PATHS)}")
    base = unwrap_model(model)
    for path in TOWER_PATHS[kind]:
        tower = _get(base, path)
        if tower is not None:
            owner_path = path.rpartition(".")[0]
            owner = _get(base, owner_path) if owner_path else base
            assert owner is not None  # the tower's parent exists when the tower does
            return TowerLocation(path=path, owner=owner, tower=tower)
    wrapped = f" (unwrapped from {type(model).__name__})" if base is not model else ""
    raise ValueError(
        f"{type(base).__name__}{wrapped} has no {kind} tower: tried "
        + ", ".join(f"model.{p}" for p in TOWER_PATHS[kind])
    )


def find_tower(model: torch.nn.Module, kind: TowerKind = "vision") -> torch.nn.Module:
    """The vision (ViT) or audio encoder module of a VLM / Omni model, wherever this version keeps it."""
    return locate_tower(model, kind).tower


@dataclass
class VLMTrainingArguments:
    """The freezing switches of a VLM run (the rest of the training arguments live in the trainer)."""

    freeze_vit: bool = False
    freeze_audio: bool = False


@dataclass(frozen=True)
class FreezeReport:
    """What ``_freeze_model_module`` did, in numbers a test or a log line can check."""

    frozen_params: int  # number of parameter elements with requires_grad False
    trainable_params: int
    frozen_paths: tuple[str, ...]  # tower paths that were frozen, e.g. ("model.visual",)
    # Elements frozen although no requested tower holds them: the model arrived with them frozen
    # (a PEFT/LoRA base), and freeze_vit says nothing about them.
    kept_frozen_params: int = 0


#: Attribute on the unwrapped model: names of the parameters the last call froze (and only those
#: may be made trainable again by a later call).
_FROZEN_BY_TRAINER = "_parity_frozen_by_trainer"


class VLMTrainer:
    """Minimal VLM trainer: holds the model and its arguments and applies the freezing policy.

    The full training loop lives elsewhere; this class exists so that the freezing policy has one
    implementation that the trainer and the ``vlm_trainer`` suite both call.
    """

    def __init__(self, model: torch.nn.Module, args: VLMTrainingArguments) -> None:
        self.model = model
        self.args = args

    def _freeze_model_module(self) -> FreezeReport:
        """Freeze exactly the requested towers; leave every other parameter as the model arrived.

        Only the freezing of an earlier call is undone first (its parameter names are kept on the
        unwrapped model), so calling this twice with different arguments gives the same result as
        calling it once, on any trainer holding the same model. Nothing else is made trainable: a
        blanket ``requires_grad_(True)`` would unfreeze the base of a PEFT/LoRA model, which arrives
        with only its adapters trainable, and train the whole network. Then each requested tower
        has every parameter frozen (adapters inside the tower included). A requested tower that the
        model does not have is an error: a freeze that silently does nothing would train the ViT
        the user asked to keep fixed.

        Call it before ``fully_shard``: FSDP2 keeps each parameter's ``requires_grad`` when it
        shards, and its reduce-scatters are planned from them.
        """
        model = self.model
        base = unwrap_model(model)
        named = dict(base.named_parameters())
        for name in getattr(base, _FROZEN_BY_TRAINER, ()):
            if name in named:
                named[name].requires_grad_(True)
        frozen_paths = []
        frozen_here: set[str] = set()
        for kind, wanted in (("vision", self.args.freeze_vit), ("audio", self.args.freeze_audio)):
            if not wanted:
                continue
            location = locate_tower(model, kind)  # raises ValueError naming the paths tried
            for name, param in location.tower.named_parameters():
                if param.requires_grad:
                    frozen_here.add(f"{location.path}.{name}")
            location.tower.requires_grad_(False)
            frozen_paths.append(location.path)
        base.__dict__[_FROZEN_BY_TRAINER] = frozenset(frozen_here)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        kept = sum(
            p.numel()
            for n, p in named.items()
            if not p.requires_grad and not any(n.startswith(path + ".") for path in frozen_paths)
        )
        return FreezeReport(
            frozen_params=frozen,
            trainable_params=trainable,
            frozen_paths=tuple(frozen_paths),
            kept_frozen_params=kept,
        )
