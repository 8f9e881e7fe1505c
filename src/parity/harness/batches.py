"""Deterministic synthetic batches: several samples packed into one row, or one per forward.

Packing is where attention backends disagree most (block-diagonal masks vs cu_seqlens), so the
parity checks run packed rows, and the packing-isolation check compares a packed row with the
same samples run one by one. Both views are built from the *same* sample objects here, so any
difference comes from the model, never from the data.

Layout rules (see notes §1 "Packed sequences"/"VLM packing" and §4 "VLM inputs"):

* one row (batch size 1); text positions restart at 0 for every sample;
* labels are the input ids with -100 at each sample's first token (so no sample predicts its
  first token from the previous sample) and at every image/video/audio placeholder;
* VLMs and Omni thinkers get 4-row position ids ``[text; t; h; w]`` of shape [4, 1, S]: row 0
  drives the packed mask / cu_seqlens, rows 1..3 are the mRoPE positions computed per sample by
  the model's own ``get_rope_index``. With only 3 rows transformers cannot see sample borders.
* no ``attention_mask``: a mask would disable packed-sequence detection. ``use_cache=False`` is
  not in ``inputs`` (it is not a tensor); ``parity.harness.toy.build_model`` turns it off in the config.

Sample plan per family (sample index i, in order):

* text: random ids only;
* vlm: every sample has one image, grid (1, 8, 8) for even i and (1, 4, 8) for odd i; odd samples
  also carry a 2-frame video, grid (2, 4, 4). Qwen3-VL/Qwen3.5 place one vision_start/end pair per
  video frame with two "timestamp" text tokens before each frame, as their processor does
  (their rope index splits videos per frame);
* omni: every sample has one image (as above) and one audio clip of 64 (even i) or 48 (odd i)
  mel frames. No video: the thinker's video path needs ``video_second_per_grid`` bookkeeping and
  adds nothing the image path does not already cover for attention parity.

Omni packing: both thinkers (5.17 and 5.24) accept 4-row position ids and then build the same
block-diagonal mask as the VLMs, so packed samples are isolated in both versions; the mRoPE rows
come from the thinker's ``get_rope_index`` on each sample with an all-ones attention mask (the
thinker only computes mRoPE itself when an attention_mask is passed, which would defeat packing).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from parity.harness.toy import load_config, model_family

__all__ = ["PackedBatch", "packed_batch", "separate_batches"]

DEFAULT_SEQ_LENS: tuple[int, ...] = (96, 64)
_TEXT_ID_RANGE = (3, 1000)  # below the toy configs' special ids (1000..1006), above bos/pad/eos
_PREFIX, _GAP, _MIN_SUFFIX, _TIMESTAMP = 4, 3, 4, 2
_IMAGE_GRIDS = ((1, 8, 8), (1, 4, 8))
_VIDEO_GRID = (2, 4, 4)
_AUDIO_FRAMES = (64, 48)
# Models whose rope index splits a video into one group per temporal frame (timestamps between).
_PER_FRAME_VIDEO = frozenset({"qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"})
_MM_TYPE = {"text": 0, "image": 1, "video": 2}


@dataclass
class PackedBatch:
    """One forward's inputs plus the packing metadata the attention backends need."""

    inputs: dict[str, torch.Tensor]
    cu_seq_lens: torch.Tensor
    max_length: int
    num_samples: int
    seq_lens: tuple[int, ...] = field(default=())

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> PackedBatch:
        """Move everything; cast only float tensors so ids, grids and masks stay integers."""
        moved = {}
        for key, value in self.inputs.items():
            if value.is_floating_point() and dtype is not None:
                moved[key] = value.to(device=device, dtype=dtype)
            else:
                moved[key] = value.to(device=device)
        return PackedBatch(
            inputs=moved,
            cu_seq_lens=self.cu_seq_lens.to(device),
            max_length=self.max_length,
            num_samples=self.num_samples,
            seq_lens=self.seq_lens,
        )

    @property
    def num_loss_tokens(self) -> int:
        """Label positions HF's shifted loss averages over; weights for the isolation check."""
        labels = self.inputs["labels"]
        return int((labels[..., 1:] != -100).sum())


@dataclass
class _Sample:
    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long
    mm_types: torch.Tensor  # [L] long (0 text, 1 image, 2 video, 3 audio)
    mrope: torch.Tensor | None = None  # [3, L] long
    images: list[tuple[torch.Tensor, tuple[int, int, int]]] = field(default_factory=list)
    videos: list[tuple[torch.Tensor, tuple[int, int, int]]] = field(default_factory=list)
    audios: list[torch.Tensor] = field(default_factory=list)  # [mel, T] each


# ------------------------------------------------------------------------------------------
# per-config facts
# ------------------------------------------------------------------------------------------


def _token_id(config: Any, name: str) -> int:
    for attr in (f"{name}_token_id", f"{name}_token_index"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{config.model_type}: config has no {name}_token_id (needed for multimodal batches)")


def _pixel_row_width(vision: Any) -> int:
    patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    return int(vision.in_channels * vision.temporal_patch_size * patch * patch)


def _audio_token_count(config: Any, frames: int) -> int:
    """Placeholders the audio tower emits for `frames` mel frames (per thinker's conv stack)."""
    if config.model_type == "qwen3_omni_moe_thinker":
        chunk = config.audio_config.n_window * 2
        rest = frames % chunk
        feat = (rest - 1) // 2 + 1
        return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (frames // chunk) * 13
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def _rope_holder(config: Any, model: torch.nn.Module | None) -> Any:
    """The module whose `get_rope_index` computes mRoPE (inner model in 5.24, thinker in 5.17).

    Without a model, the architecture is built on the meta device: no memory, no RNG use, and the
    rope index only reads config values, so this is exact and cheap for any size.
    """
    if model is None:
        from parity.harness.toy import _auto_class

        # eager: the config may carry a project attention name that HF's build check rejects
        with torch.device("meta"):
            model = _auto_class(config).from_config(copy.deepcopy(config), attn_implementation="eager")
    for candidate in (getattr(model, "model", None), model):
        if candidate is not None and hasattr(candidate, "get_rope_index"):
            return candidate
    raise ValueError(f"{type(model).__name__}: no get_rope_index() on the model or model.model")


# ------------------------------------------------------------------------------------------
# sample construction
# ------------------------------------------------------------------------------------------


_TEXT_RANGE: list[tuple[int, int, frozenset[int]]] = []  # set per batch by _build_samples


def text_id_range(config: Any) -> tuple[int, int, frozenset[int]]:
    """(low, high, special ids) for plain text tokens: inside the vocabulary, never a special id.

    The toys' special ids sit at 1000.. and bos/pad/eos below 3, so (3, 1000) stays the draw for
    them (numbers unchanged); a tiny vocabulary (128 tokens) shrinks the range to fit, because an id
    >= vocab_size is an out-of-bounds embedding lookup (a device-side assert on a GPU).
    """
    text = getattr(config, "text_config", None) or config
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None) or _TEXT_ID_RANGE[1]
    specials = set()
    for cfg in (config, text):
        for key, value in vars(cfg).items():
            if (key.endswith("_token_id") or key.endswith("_token_index")) and isinstance(value, int):
                specials.add(value)
            elif key.endswith("_token_id") and isinstance(value, list):
                specials.update(v for v in value if isinstance(v, int))
    high = min(_TEXT_ID_RANGE[1], int(vocab))
    low = min(_TEXT_ID_RANGE[0], max(high - 1, 0))
    if all(i in specials for i in range(low, high)):
        raise ValueError(f"{config.model_type}: vocabulary of {vocab} leaves no plain text ids")
    return low, high, frozenset(specials)


def _text(n: int, gen: torch.Generator) -> list[int]:
    low, high, specials = _TEXT_RANGE[-1] if _TEXT_RANGE else (*_TEXT_ID_RANGE, frozenset())
    ids = torch.randint(low, high, (n,), generator=gen).tolist()
    allowed = [i for i in range(low, high) if i not in specials] if specials else None
    if allowed is not None and len(allowed) < high - low:
        ids = [i if i not in specials else allowed[i % len(allowed)] for i in ids]
    return ids


def _vision_segments(config: Any, index: int, gen: torch.Generator, sample: _Sample) -> list[list[tuple]]:
    """Token runs for the sample's image/video: lists of (token_id, mm_type) pairs."""
    vision = config.vision_config
    merge = vision.spatial_merge_size
    width = _pixel_row_width(vision)
    vs, ve = _token_id(config, "vision_start"), _token_id(config, "vision_end")
    segments = []

    grid = _IMAGE_GRIDS[index % 2]
    sample.images.append((torch.randn(grid[0] * grid[1] * grid[2], width, generator=gen), grid))
    n_image = grid[0] * grid[1] * grid[2] // merge**2
    image_id = _token_id(config, "image")
    segments.append([(vs, 0)] + [(image_id, _MM_TYPE["image"])] * n_image + [(ve, 0)])

    if model_family(config) == "vlm" and index % 2 == 1:
        t, h, w = _VIDEO_GRID
        sample.videos.append((torch.randn(t * h * w, width, generator=gen), _VIDEO_GRID))
        video_id = _token_id(config, "video")
        per_frame = h * w // merge**2
        if config.model_type in _PER_FRAME_VIDEO:
            run: list[tuple] = []
            for _ in range(t):
                run += [(tok, 0) for tok in _text(_TIMESTAMP, gen)]
                run += [(vs, 0)] + [(video_id, _MM_TYPE["video"])] * per_frame + [(ve, 0)]
            segments.append(run)
        else:
            segments.append([(vs, 0)] + [(video_id, _MM_TYPE["video"])] * (t * per_frame) + [(ve, 0)])
    return segments


def _audio_segment(config: Any, index: int, gen: torch.Generator, sample: _Sample) -> list[tuple]:
    frames = _AUDIO_FRAMES[index % 2]
    mel = config.audio_config.num_mel_bins
    sample.audios.append(torch.randn(mel, frames, generator=gen))
    count = _audio_token_count(config, frames)
    a_start, a_end, audio = (_token_id(config, k) for k in ("audio_start", "audio_end", "audio"))
    return [(a_start, 0)] + [(audio, 3)] * count + [(a_end, 0)]


def _make_sample(config: Any, family: str, index: int, length: int, gen: torch.Generator) -> _Sample:
    sample = _Sample(input_ids=torch.empty(0), labels=torch.empty(0), mm_types=torch.empty(0))
    segments: list[list[tuple]] = []
    if family in ("vlm", "omni"):
        segments += _vision_segments(config, index, gen, sample)
    if family == "omni":
        segments.append(_audio_segment(config, index, gen, sample))

    fixed = sum(len(s) for s in segments) + (_PREFIX + _GAP * (len(segments) - 1) if segments else 0)
    suffix = length - fixed
    if segments and suffix < _MIN_SUFFIX:
        raise ValueError(
            f"{config.model_type}: sample {index} needs at least {fixed + _MIN_SUFFIX} tokens "
            f"for its multimodal content, got seq_len {length}"
        )
    tokens: list[tuple] = []
    if segments:
        tokens += [(t, 0) for t in _text(_PREFIX, gen)]
        for k, segment in enumerate(segments):
            if k:
                tokens += [(t, 0) for t in _text(_GAP, gen)]
            tokens += segment
    tokens += [(t, 0) for t in _text(suffix, gen)]

    sample.input_ids = torch.tensor([t for t, _ in tokens], dtype=torch.long)
    sample.mm_types = torch.tensor([m for _, m in tokens], dtype=torch.long)
    sample.labels = sample.input_ids.clone()
    sample.labels[0] = -100
    sample.labels[sample.mm_types != 0] = -100
    return sample


def _add_mrope(config: Any, family: str, sample: _Sample, holder: Any) -> None:
    """mRoPE rows for one sample alone, exactly as the model computes them for an unpacked row."""
    ids = sample.input_ids[None]
    image_grid = torch.tensor([g for _, g in sample.images], dtype=torch.long) if sample.images else None
    video_grid = torch.tensor([g for _, g in sample.videos], dtype=torch.long) if sample.videos else None
    if family == "omni":
        seqlens = torch.tensor([a.shape[-1] for a in sample.audios], dtype=torch.long)
        pos, _ = holder.get_rope_index(
            ids,
            image_grid_thw=image_grid,
            video_grid_thw=video_grid,
            attention_mask=torch.ones_like(ids),
            use_audio_in_video=False,
            audio_seqlens=seqlens,
        )
    else:
        mm = torch.where(sample.mm_types == 3, 0, sample.mm_types)[None]
        pos, _ = holder.get_rope_index(
            ids, mm_token_type_ids=mm, image_grid_thw=image_grid, video_grid_thw=video_grid
        )
    sample.mrope = pos[:, 0, :].round().long()  # qwen3-omni returns float positions


def _build_samples(
    config: Any, seq_lens: tuple[int, ...], seed: int, model: torch.nn.Module | None
) -> tuple[Any, str, list[_Sample]]:
    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    if not seq_lens or any(int(n) <= 1 for n in seq_lens):
        raise ValueError(f"seq_lens must be a non-empty tuple of lengths > 1, got {seq_lens!r}")
    family = model_family(config)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    _TEXT_RANGE.append(text_id_range(config))
    try:
        samples = [_make_sample(config, family, i, int(n), gen) for i, n in enumerate(seq_lens)]
    finally:
        _TEXT_RANGE.pop()
    if family != "text":
        holder = _rope_holder(config, model)
        for sample in samples:
            _add_mrope(config, family, sample, holder)
    return config, family, samples


# ------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------


def _pack(config: Any, family: str, samples: list[_Sample]) -> PackedBatch:
    lens = [int(s.input_ids.numel()) for s in samples]
    input_ids = torch.cat([s.input_ids for s in samples])[None]
    text_pos = torch.cat([torch.arange(n, dtype=torch.long) for n in lens])[None]
    inputs: dict[str, torch.Tensor] = {
        "input_ids": input_ids,
        "labels": torch.cat([s.labels for s in samples])[None],
    }
    if family == "text":
        inputs["position_ids"] = text_pos
    else:
        mrope = torch.cat([s.mrope for s in samples], dim=1)[:, None, :]
        inputs["position_ids"] = torch.cat([text_pos[None], mrope], dim=0)
        images = [img for s in samples for img in s.images]
        if images:
            inputs["pixel_values"] = torch.cat([p for p, _ in images])
            inputs["image_grid_thw"] = torch.tensor([g for _, g in images], dtype=torch.long)
        videos = [vid for s in samples for vid in s.videos]
        if videos:
            inputs["pixel_values_videos"] = torch.cat([p for p, _ in videos])
            inputs["video_grid_thw"] = torch.tensor([g for _, g in videos], dtype=torch.long)
    if family == "vlm":
        inputs["mm_token_type_ids"] = torch.cat([s.mm_types for s in samples])[None]
    if family == "omni":
        audios = [a for s in samples for a in s.audios]
        frames = max(a.shape[-1] for a in audios)
        features = torch.zeros(len(audios), audios[0].shape[0], frames)
        mask = torch.zeros(len(audios), frames, dtype=torch.long)
        for k, audio in enumerate(audios):
            features[k, :, : audio.shape[-1]] = audio
            mask[k, : audio.shape[-1]] = 1
        inputs["input_features"] = features
        inputs["feature_attention_mask"] = mask
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), dim=0)
    return PackedBatch(
        inputs=inputs, cu_seq_lens=cu, max_length=max(lens), num_samples=len(lens), seq_lens=tuple(lens)
    )


def packed_batch(
    config: Any,
    *,
    seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS,
    seed: int = 1,
    model: torch.nn.Module | None = None,
) -> PackedBatch:
    """All samples back to back in one row (batch size 1).

    `config` is a PretrainedConfig or a toy id/path. `model` is optional: VLM/Omni mRoPE rows
    come from the model's own `get_rope_index`; pass the built model to reuse it, otherwise the
    architecture is instantiated on the meta device just for that (no weights, no RNG use).
    `seq_lens` are whole-sample lengths including multimodal placeholders; the default (96, 64)
    gives 160 tokens, a multiple of 4 so sequence-parallel size 2 can split it evenly.
    """
    config, family, samples = _build_samples(config, tuple(seq_lens), seed, model)
    return _pack(config, family, samples)


def separate_batches(
    config: Any,
    *,
    seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS,
    seed: int = 1,
    model: torch.nn.Module | None = None,
) -> list[PackedBatch]:
    """The same samples as `packed_batch(...)` with the same arguments, one batch per sample.

    The packed loss should equal `sum(loss_i * b.num_loss_tokens) / sum(b.num_loss_tokens)`
    over these batches when packing isolates samples.
    """
    config, family, samples = _build_samples(config, tuple(seq_lens), seed, model)
    return [_pack(config, family, [s]) for s in samples]
