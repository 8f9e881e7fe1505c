"""Keep rank-asymmetric multimodal batches SPMD under FSDP2: run idle encoders on a dummy input.

The problem. Under FSDP2 every vision block and audio-encoder layer is its own sharded unit: its
forward all-gathers the parameters and its backward reduce-scatters the gradients, over *all*
ranks. transformers' VLMs only call the vision tower ``if pixel_values is not None``. When rank 0
has an image and rank 1 has text only, rank 0 enters the ViT's all-gather and rank 1 enters the
first decoder layer's: the collectives no longer pair up, and the job hangs (NCCL) or fails on a
size mismatch (gloo), or, when two buffers happen to have the same size, silently mixes weights.
The PyTorch maintainers' position (pytorch/pytorch#152964) is that FSDP2 will not paper over this:
the model must stay SPMD. Same bug in transformers#37186, torchtitan, prime-rl, NeMo Automodel.

The fix, as a hook rather than a patched modeling file. :func:`enable_dummy_forward` installs:

1. a forward pre-hook on the *owner* (the module that holds ``visual`` / ``audio_tower`` and
   decides whether to call them) that records which modalities this forward really has;
2. wrappers around the owner's ``get_image_features`` / ``get_video_features`` /
   ``get_audio_features``: before a real encoder call, every *missing* modality that the model
   would have encoded earlier runs its dummy pass first;
3. a forward pre-hook on the language model that runs the dummy passes still missing and adds
   ``0.0 * sum(dummy outputs)`` to ``inputs_embeds``.

So every rank calls the encoders the same number of times, in the model's own order (audio,
image, video for the Omni thinkers; image, video for the VLMs), all before the first decoder layer:
the same all-gathers in forward and, since the zero-weighted outputs are on the loss path, the
same reduce-scatters in backward. Joining through ``inputs_embeds`` (not the loss) matters: a
dummy attached after the decoder would make its encoder's backward run *before* the decoder
layers' on text-only ranks, and after them on multimodal ranks. Numbers do not change: the dummy
contributes an exact zero to the loss and to every gradient.

Each dummy is one minimal valid input: an image grid ``(1, 2*merge, 2*merge)`` of zeros, or a short
all-zero mel clip. Zeros keep every activation finite, so ``0 * out`` is exactly 0 (``0 * inf``
would be NaN). Dummy passes are local to the rank: sequence parallelism is switched off around
them (no sequence split, no Ulysses exchange) and gradient checkpointing is off for them, because
a recomputation during backward would happen outside that switch. With checkpointing on, the real
passes are still checkpointed; FSDP2 issues the same collectives either way.

``enable_dummy_forward(model, enabled=False)`` installs nothing (the
negative control of the ``dummy_forward`` suite: the same job must then hang or fail).

Install the hooks before or after ``fully_shard``; the owner and the language model must not be
FSDP units themselves (:func:`parity.training.fsdp.apply_fsdp2` wraps only blocks/layers/encoders and the
root), because their own all-gathers would then run before the dummy passes.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from parity.backend import parallel_state
from parity.training.vlm_trainer import locate_tower, unwrap_model

__all__ = [
    "MODALITIES",
    "DummyForward",
    "dummy_forward",
    "dummy_inputs",
    "enable_dummy_forward",
]

#: Mel frames of the dummy audio clip: one partial chunk, a few output tokens after the conv stack.
DUMMY_AUDIO_FRAMES = 16

_INSTALLED_ATTR = "_parity_dummy_forward"


@dataclass(frozen=True)
class Modality:
    """One encoder input slot of a multimodal forward."""

    name: str  # "image" | "video" | "audio"
    tower: str  # "vision" | "audio" (key of TOWER_PATHS)
    input_key: str  # forward kwarg that carries the real input
    method: str  # owner method that runs the encoder for this slot (public HF API in 5.x)


MODALITIES: dict[str, Modality] = {
    "image": Modality("image", "vision", "pixel_values", "get_image_features"),
    "video": Modality("video", "vision", "pixel_values_videos", "get_video_features"),
    "audio": Modality("audio", "audio", "input_features", "get_audio_features"),
}
# The order in which the models' forwards call the encoders (5.17 and 5.24 alike). Checked at run
# time: a real call out of this order raises instead of pairing the wrong collectives.
_ORDER_WITH_AUDIO = ("audio", "image", "video")
_ORDER_VISION_ONLY = ("image", "video")


# --------------------------------------------------------------------------------------------
# the dummy pass itself


def _first_param(module: torch.nn.Module) -> torch.Tensor:
    for param in module.parameters():
        return param
    raise ValueError(f"{type(module).__name__} has no parameters to take a device from")


def dummy_inputs(tower: torch.nn.Module, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two positional arguments of the owner's ``get_<modality>_features`` for a minimal input.

    vision: ``(pixel rows [4*merge^2, C*T*P*P] of zeros, grid [[1, 2*merge, 2*merge]])``: height
    and width must be multiples of the merge size; 2*merge gives a 2x2 grid of merged tokens, so
    window partitions and position-embedding interpolation see more than one token. audio:
    ``(features [1, mel, DUMMY_AUDIO_FRAMES] of zeros, feature_attention_mask of ones)``.
    Inputs are float32: every encoder casts its input to its own weight dtype.
    """
    cfg = tower.config
    device = _first_param(tower).device
    if MODALITIES[modality].tower == "vision":
        merge = int(cfg.spatial_merge_size)
        patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        width = int(cfg.in_channels * cfg.temporal_patch_size * patch * patch)
        side = 2 * merge
        pixels = torch.zeros(side * side, width, device=device)
        grid = torch.tensor([[1, side, side]], dtype=torch.long, device=device)
        return pixels, grid
    features = torch.zeros(1, int(cfg.num_mel_bins), DUMMY_AUDIO_FRAMES, device=device)
    mask = torch.ones(1, DUMMY_AUDIO_FRAMES, dtype=torch.long, device=device)
    return features, mask


def _float_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every floating tensor in an encoder output (ModelOutput, tuple, list, dict, tensor).

    All of them, not just ``pooler_output``: Qwen3-VL's DeepStack mergers only feed
    ``deepstack_features``; leaving those out would give their parameters no gradient on dummy
    ranks and a real one on multimodal ranks, i.e. a reduce-scatter on one side only.
    """
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, dict):  # ModelOutput is an OrderedDict of its non-None fields
        for value in obj.values():
            yield from _float_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _float_tensors(value)


def _zero_weighted(output: Any) -> torch.Tensor | None:
    """``0.0 * (sum of every output element)``: an exact zero that still carries the graph."""
    parts = [t.float().sum() for t in _float_tensors(output)]
    if not parts:
        return None
    return torch.stack(parts).sum() * 0.0


@contextlib.contextmanager
def _local_pass(tower: torch.nn.Module) -> Iterator[None]:
    """No sequence parallelism and no gradient checkpointing inside ``tower`` for this block.

    sp off: the dummy input is the same on every rank of an sp group and must not be split or
    exchanged. Checkpointing off: a recomputation in backward would run outside this block, i.e.
    with sp back on, and recompute something else than the forward did.
    """
    saved = [
        (m, m.gradient_checkpointing)
        for m in tower.modules()
        if isinstance(getattr(m, "gradient_checkpointing", None), bool)
    ]
    for module, _ in saved:
        module.gradient_checkpointing = False
    try:
        with parallel_state.parallel_groups(sp=None, ep=parallel_state.get_ep_group()):
            yield
    finally:
        for module, value in saved:
            module.gradient_checkpointing = value


def dummy_forward(model: torch.nn.Module, modality: str) -> torch.Tensor | None:
    """Run ``model``'s encoder for ``modality`` once on its minimal input; return 0 * its output.

    The building block of the hooks, usable on its own (e.g. to add to a loss by hand). Goes
    through the owner's ``get_<modality>_features`` so the model's own preprocessing (audio
    chunking, Qwen3-VL DeepStack) runs exactly as for a real input.
    """
    spec = MODALITIES[modality]
    location = locate_tower(model, spec.tower)
    method = getattr(location.owner, spec.method)
    original = getattr(method, "__parity_original__", method)
    with _local_pass(location.tower):
        output = original(*dummy_inputs(location.tower, modality))
    return _zero_weighted(output)


# --------------------------------------------------------------------------------------------
# the hooks


class DummyForward:
    """The hooks :func:`enable_dummy_forward` installs on one model; ``remove()`` takes them off.

    ``calls`` counts the dummy passes per modality (what a test or a log line can check);
    ``enabled`` is False when the caller asked for the unprotected behaviour.
    """

    def __init__(self, model: torch.nn.Module, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.calls: Counter[str] = Counter()
        self._handles: list[Any] = []
        self._wrapped: list[str] = []
        self._originals: dict[str, Callable[..., Any]] = {}
        self._towers: dict[str, torch.nn.Module] = {}
        self._plan: dict[str, bool] | None = None  # modality -> has a real input; None: idle
        self._done: set[str] = set()
        self._pending: list[torch.Tensor] = []
        self._inside = False  # inside a wrapped call: nested calls (video -> image) pass through

        base = unwrap_model(model)
        vision = locate_tower(base, "vision")  # ValueError for a text-only model
        self.owner = vision.owner
        self._towers["vision"] = vision.tower
        try:
            audio = locate_tower(base, "audio")
        except ValueError:
            audio = None
        if audio is not None:
            if audio.owner is not self.owner:
                raise ValueError(
                    f"{type(base).__name__}: vision tower ({vision.path}) and audio tower "
                    f"({audio.path}) have different owners; cannot order their dummy passes"
                )
            self._towers["audio"] = audio.tower
        self.order = _ORDER_WITH_AUDIO if audio is not None else _ORDER_VISION_ONLY
        self.language_model = self._find_language_model()
        self._signature = inspect.signature(self.owner.forward)
        if not enabled:
            return
        if getattr(self.owner, _INSTALLED_ATTR, None) is not None:
            raise RuntimeError(f"{type(self.owner).__name__}: dummy_forward hooks are already installed")
        for name in self.order:
            self._wrap(MODALITIES[name])
        self._handles.append(self.owner.register_forward_pre_hook(self._plan_forward, with_kwargs=True))
        self._handles.append(self.owner.register_forward_hook(self._check_flushed))
        self._handles.append(
            self.language_model.register_forward_pre_hook(self._flush, with_kwargs=True, prepend=True)
        )
        setattr(self.owner, _INSTALLED_ATTR, self)

    # -- setup ----------------------------------------------------------------------------

    def _find_language_model(self) -> torch.nn.Module:
        """The module the owner feeds ``inputs_embeds`` to (``language_model``; 5.17 Omni: ``model``)."""
        for attr in ("language_model", "model"):
            module = self.owner._modules.get(attr)
            if module is not None:
                return module
        raise ValueError(
            f"{type(self.owner).__name__}: no language model found at .language_model or .model; "
            "cannot attach the dummy outputs to the loss path"
        )

    def _wrap(self, spec: Modality) -> None:
        original = getattr(self.owner, spec.method, None)
        if original is None:
            raise ValueError(
                f"{type(self.owner).__name__} has no {spec.method}(); cannot sequence {spec.name}"
            )

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._plan is None or self._inside:
                return original(*args, **kwargs)
            self._before_real_call(spec.name)
            self._inside = True
            try:
                return original(*args, **kwargs)
            finally:
                self._inside = False

        wrapper.__parity_original__ = original  # type: ignore[attr-defined]
        wrapper.__name__ = spec.method
        self._originals[spec.name] = original
        setattr(self.owner, spec.method, wrapper)  # instance attribute: shadows the class method
        self._wrapped.append(spec.method)

    def remove(self) -> None:
        """Take every hook and wrapper off again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for method in self._wrapped:
            self.owner.__dict__.pop(method, None)
        self._wrapped.clear()
        if getattr(self.owner, _INSTALLED_ATTR, None) is self:
            delattr(self.owner, _INSTALLED_ATTR)

    # -- per forward ----------------------------------------------------------------------

    def _plan_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._plan = {
            name: self._argument(args, kwargs, MODALITIES[name].input_key) is not None for name in self.order
        }
        self._done = set()
        self._pending = []
        self._inside = False

    def _argument(self, args: tuple, kwargs: dict, key: str) -> Any:
        if key in kwargs or not args:
            return kwargs.get(key)
        try:
            return self._signature.bind_partial(*args, **kwargs).arguments.get(key)
        except TypeError:
            return None

    def _run_dummy(self, name: str) -> None:
        spec = MODALITIES[name]
        tower = self._towers[spec.tower]
        self._inside = True
        try:
            with _local_pass(tower):
                output = self._originals[name](*dummy_inputs(tower, name))
        finally:
            self._inside = False
        zero = _zero_weighted(output)
        if zero is not None:
            self._pending.append(zero)
        self._done.add(name)
        self.calls[name] += 1

    def _before_real_call(self, name: str) -> None:
        """Run the dummies the model would have run before ``name``; refuse out-of-order calls."""
        assert self._plan is not None
        if name in self._done:
            raise RuntimeError(
                f"dummy_forward: {MODALITIES[name].method}() called twice in one forward of "
                f"{type(self.owner).__name__}; the hooks assume one encoder call per modality"
            )
        if not self._plan[name]:
            raise RuntimeError(
                f"dummy_forward: {MODALITIES[name].method}() ran although the forward got no "
                f"{MODALITIES[name].input_key}; the hooks cannot tell which input it encodes"
            )
        for earlier in self.order[: self.order.index(name)]:
            if earlier in self._done:
                continue
            if self._plan[earlier]:
                raise RuntimeError(
                    f"dummy_forward: {type(self.owner).__name__} encoded {name} before {earlier}, "
                    f"not in the expected order {self.order}; the collectives would not pair up"
                )
            self._run_dummy(earlier)
        self._done.add(name)

    def _flush(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Language-model pre-hook: remaining dummies, then put them on the loss path."""
        if self._plan is None:
            return None
        for name in self.order:
            if name in self._done:
                continue
            if self._plan[name]:
                raise RuntimeError(
                    f"dummy_forward: {type(self.owner).__name__} got {MODALITIES[name].input_key} "
                    f"but never called {MODALITIES[name].method}(); the hooks cannot see its encoder"
                )
            self._run_dummy(name)
        pending, self._pending, self._plan = self._pending, [], None
        if not pending:
            return None
        embeds = kwargs.get("inputs_embeds")
        if not isinstance(embeds, torch.Tensor):
            raise RuntimeError(
                f"dummy_forward: {type(module).__name__} was called without inputs_embeds; "
                "cannot attach the dummy encoder outputs to the loss path"
            )
        zero = torch.stack(pending).sum()
        kwargs["inputs_embeds"] = embeds + zero.to(embeds.dtype)
        return args, kwargs

    def _check_flushed(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._plan is not None:
            self._plan = None
            raise RuntimeError(
                f"dummy_forward: {type(self.owner).__name__}.forward finished without calling its "
                "language model; the dummy passes were not attached to the loss"
            )


def enable_dummy_forward(model: torch.nn.Module, *, enabled: bool = True) -> DummyForward:
    """Install the dummy-forward hooks on a VLM / Omni model (see the module docstring).

    Returns the handle (``.remove()``, ``.calls``). With ``enabled=False`` nothing is installed
    (the negative control's unprotected run) and the handle says so. Raises ValueError for a model without a
    vision tower, naming the paths tried.
    """
    return DummyForward(model, enabled=enabled)
