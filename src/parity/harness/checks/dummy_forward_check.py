"""Rank-asymmetric multimodal batches under FSDP2: every rank finishes, and the numbers are right.

The worker of the ``dummy_forward`` suite, run on every rank::

    torchrun --nproc-per-node 2 -m parity.harness.checks.dummy_forward_check \\
        --config toy_config/qwen2_5_vl_toy --batch vlm_batch --patch-size 14 --steps 2 --out r.json

Each case runs a *schedule*: per step, one batch per rank, each with its own modalities.
``basic`` is the VeOmni shape of the bug: rank 0 gets text + images + video (+ audio for the Omni
thinkers), every other rank text only, for ``--steps`` steps. ``matrix`` continues after two such
steps with the other ways ranks come to call the encoders a different number of times
(:data:`MATRIX`): images+video vs images only (one rank enters the vision tower twice, the other
once), video only vs nothing, nothing vs everything, and for Omni images vs audio. Each rank
builds the toy model (fp32 on CPU/gloo; on GPU fp32 master weights with bf16 mixed precision),
installs :func:`parity.training.dummy_forward.enable_dummy_forward`, shards it with
:func:`parity.training.fsdp.apply_fsdp2` and runs one SGD step of forward+backward per schedule step.

What must hold on every rank: finite loss, finite gradients, the same set of parameters without a
gradient on all ranks (the SPMD invariant), a non-zero global grad norm and a non-zero gradient
on the vision tower. Per step, the encoders must be entered the same number of times on every
rank (counted by a forward pre-hook on each encoder, found by :mod:`parity.harness.towers`, not by
the hook under test), once per modality slot of the model, and the hook's dummy passes must be
exactly the slots the rank's batch leaves empty. And because the dummy passes must change no
number, rank 0 also computes a reference without FSDP and without hooks: one unsharded copy of the
model, every rank's batch in turn, gradients averaged over ranks (what FSDP's reduce-scatter
does), the same SGD steps. The per-rank losses and the global grad norm must match it.

``--control`` specs are the negative controls (hook off, one asymmetric step each), run after
the cases in pairs of child processes: see :mod:`parity.harness.checks.dummy_forward_controls`.

Rank 0 writes one JSON file per case (``--out`` / ``--out-dir``) with the per-rank numbers, the
reference, the problems found and two ready-made metric records (modes ``reference`` and
``fsdp2_asym``) for the merge, and one per control. Exit code 0 when every check passed.
``PARITY_DISABLE_DUMMY_FORWARD=1`` turns the hook off in the cases too (the launch-level negative
control): the job must then fail, and each rank prints the FSDP units it enters
(``[dummy_forward_check] rank=R enter UNIT``) so the report can say where.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from parity import settings
from parity.harness import towers, toy
from parity.harness.batches import (
    _PER_FRAME_VIDEO,
    _add_mrope,
    _audio_token_count,
    _pack,
    _pixel_row_width,
    _rope_holder,
    _Sample,
    _token_id,
    packed_batch,
)
from parity.harness.launch import stack_file
from parity.results.compare import series_deviation
from parity.results.records import Tolerance, make_record

TAG = "dummy_forward_check"
SEED = 0  # model weights
DATA_SEED = 1  # batches
TEXT_SEQ_LEN = 64
LEARNING_RATE = 0.05
_TEXT_ID_RANGE = (3, 1000)  # below the toy configs' special ids, as in parity.harness.batches

# Omni rank-0 sample: one image, one 2-frame video, one audio clip.
_OMNI_IMAGE_GRID = (1, 4, 4)
_OMNI_VIDEO_GRID = (2, 4, 4)
_OMNI_AUDIO_FRAMES = 64


# --------------------------------------------------------------------------------------------
# batches (CPU tensors; the worker moves them)


def _check_patch_size(config: Any, patch_size: int) -> None:
    """The case's patch_size documents the model (seed convention); a mismatch is a wrong case."""
    vision = config.vision_config
    actual = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    if int(actual) != int(patch_size):
        raise ValueError(
            f"{config.model_type}: case says patch_size={patch_size}, the config has {actual}; "
            "fix the case in tests/distributed/test_dummy_forward.py"
        )


def text_batch(config: Any, *, rank: int, seq_len: int = TEXT_SEQ_LEN) -> dict[str, torch.Tensor]:
    """Text only: what a rank whose samples carry no image, video or audio feeds the model."""
    gen = torch.Generator().manual_seed(DATA_SEED * 1000 + rank)
    ids = torch.randint(*_TEXT_ID_RANGE, (1, seq_len), generator=gen)
    labels = ids.clone()
    labels[:, 0] = -100
    return {"input_ids": ids, "labels": labels}


def vlm_batch(config: Any, *, rank: int, patch_size: int) -> dict[str, torch.Tensor]:
    """Rank 0: two packed samples, two images (grids 1x8x8, 1x4x8) and one 2-frame video; else text.

    Rank 0's batch is :func:`parity.harness.batches.packed_batch` (4-row position ids, mm_token_type_ids),
    the same inputs the patch suite validates in 5.17 and 5.24.
    """
    _check_patch_size(config, patch_size)
    if rank != 0:
        return text_batch(config, rank=rank)
    return packed_batch(config, seq_lens=(96, 64), seed=DATA_SEED).inputs


def omni_batch(config: Any, *, rank: int, patch_size: int) -> dict[str, torch.Tensor]:
    """Rank 0: one sample with an image, a 2-frame video and an audio clip; else text only.

    Built here because :func:`parity.harness.batches.packed_batch` gives Omni samples no video. The
    thinker derives the mRoPE positions itself (it does so when ``attention_mask`` is passed).
    """
    _check_patch_size(config, patch_size)
    if rank != 0:
        return text_batch(config, rank=rank)
    gen = torch.Generator().manual_seed(DATA_SEED)
    vision = config.vision_config
    merge = vision.spatial_merge_size
    width = _pixel_row_width(vision)
    vs, ve = _token_id(config, "vision_start"), _token_id(config, "vision_end")
    a_start, a_end = _token_id(config, "audio_start"), _token_id(config, "audio_end")

    def text(n: int) -> list[int]:
        return torch.randint(*_TEXT_ID_RANGE, (n,), generator=gen).tolist()

    n_image = math.prod(_OMNI_IMAGE_GRID) // merge**2
    n_video = math.prod(_OMNI_VIDEO_GRID) // merge**2
    n_audio = _audio_token_count(config, _OMNI_AUDIO_FRAMES)
    ids = (
        text(4)
        + [vs] + [_token_id(config, "image")] * n_image + [ve]
        + text(3)
        + [vs] + [_token_id(config, "video")] * n_video + [ve]
        + text(3)
        + [a_start] + [_token_id(config, "audio")] * n_audio + [a_end]
        + text(16)
    )  # fmt: skip
    input_ids = torch.tensor([ids], dtype=torch.long)
    placeholders = {_token_id(config, k) for k in ("image", "video", "audio")}
    labels = input_ids.clone()
    labels[:, 0] = -100
    labels[torch.isin(input_ids, torch.tensor(sorted(placeholders)))] = -100
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": torch.randn(math.prod(_OMNI_IMAGE_GRID), width, generator=gen),
        "image_grid_thw": torch.tensor([_OMNI_IMAGE_GRID], dtype=torch.long),
        "pixel_values_videos": torch.randn(math.prod(_OMNI_VIDEO_GRID), width, generator=gen),
        "video_grid_thw": torch.tensor([_OMNI_VIDEO_GRID], dtype=torch.long),
        # Seconds per temporal grid step; the Omni rope index needs it for every video.
        "video_second_per_grid": torch.tensor([1.0]),
        "input_features": torch.randn(1, config.audio_config.num_mel_bins, _OMNI_AUDIO_FRAMES, generator=gen),
        "feature_attention_mask": torch.ones(1, _OMNI_AUDIO_FRAMES, dtype=torch.long),
    }


#: Batch functions by name: the test's ``partial(_vlm_batch, patch_size=P)`` travels as
#: ``--batch vlm_batch --patch-size P`` (a function cannot cross the process boundary).
BATCHES: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "vlm_batch": vlm_batch,
    "omni_batch": omni_batch,
}


#: What one rank's batch holds in one step: ``"*"`` the rank-0 batch of the case's builder (every
#: modality of the family, packed), ``""`` text only, else letters: i image, v video, a audio, or
#: ``"+"`` every modality of the family in one sample.
LETTERS = {"i": "image", "v": "video", "a": "audio"}
#: The asymmetric steps, by name: (rank 0, rank 1).
SCENARIOS: dict[str, tuple[str, str]] = {
    "all_vs_none": ("*", ""),
    "iv_vs_i": ("iv", "i"),  # rank 0 enters the vision tower twice, rank 1 once
    "v_vs_none": ("v", ""),  # a video but no image: the image slot is empty on both ranks
    "none_vs_all": ("", "+"),
    "i_vs_a": ("i", "a"),  # Omni only: different encoders first
}
#: The ``matrix`` schedule: two basic steps, then every other scenario of the family.
MATRIX = ("all_vs_none", "all_vs_none", "iv_vs_i", "v_vs_none", "none_vs_all", "i_vs_a")
_OMNI_ONLY = frozenset({"i_vs_a"})


def family_modalities(family: str) -> tuple[str, ...]:
    """The encoder slots of a family, in the order its forward encodes them."""
    return ("audio", "image", "video") if family == "omni" else ("image", "video")


def scenario_names(schedule: str, family: str, steps: int) -> list[str]:
    """The scenario of every step of a schedule (``basic``: ``all_vs_none`` ``steps`` times)."""
    if schedule == "basic":
        return ["all_vs_none"] * steps
    if schedule == "matrix":
        return [name for name in MATRIX if family == "omni" or name not in _OMNI_ONLY]
    raise ValueError(f"unknown schedule {schedule!r}; known: basic, matrix")


def modalities_of(mods: str, family: str) -> tuple[str, ...]:
    """The modality names a batch spec (``"*"``, ``"+"``, ``""``, letters) stands for, in model order."""
    if mods in ("*", "+"):
        return family_modalities(family)
    wanted = {LETTERS[c] for c in mods}
    if "audio" in wanted and family != "omni":
        raise ValueError(f"audio in batch spec {mods!r} for a {family} model")
    return tuple(m for m in family_modalities(family) if m in wanted)


def modal_batch(config: Any, mods: str, *, seed: int) -> dict[str, torch.Tensor]:
    """One sample holding exactly the modalities ``mods`` names (``"+"``: all), with text around them.

    Image grid (1, 4, 4), a 2-frame video (2, 4, 4) and 64 audio frames: small, but every encoder
    sees more than one merged token. VLMs get 4-row position ids from the model's own rope index
    and ``mm_token_type_ids``; Omni thinkers an attention mask (they compute mRoPE themselves).
    """
    family = toy.model_family(config)
    wanted = modalities_of(mods, family)
    gen = torch.Generator().manual_seed(seed)
    if family == "omni":
        return _omni_sample(config, wanted, gen)
    vision = config.vision_config
    merge = vision.spatial_merge_size
    width = _pixel_row_width(vision)
    vs, ve = _token_id(config, "vision_start"), _token_id(config, "vision_end")
    tokens: list[tuple[int, int]] = [(t, 0) for t in _text(4, gen)]
    sample = _Sample(input_ids=torch.empty(0), labels=torch.empty(0), mm_types=torch.empty(0))
    if "image" in wanted:
        grid = _OMNI_IMAGE_GRID
        sample.images.append((torch.randn(math.prod(grid), width, generator=gen), grid))
        tokens += [(vs, 0)] + [(_token_id(config, "image"), 1)] * (math.prod(grid) // merge**2) + [(ve, 0)]
        tokens += [(t, 0) for t in _text(3, gen)]
    if "video" in wanted:
        t, h, w = grid = _OMNI_VIDEO_GRID
        sample.videos.append((torch.randn(math.prod(grid), width, generator=gen), grid))
        video_id, per_frame = _token_id(config, "video"), h * w // merge**2
        if config.model_type in _PER_FRAME_VIDEO:  # one vision_start/end per frame, timestamps before
            for _ in range(t):
                tokens += [(tok, 0) for tok in _text(2, gen)]
                tokens += [(vs, 0)] + [(video_id, 2)] * per_frame + [(ve, 0)]
        else:
            tokens += [(vs, 0)] + [(video_id, 2)] * (t * per_frame) + [(ve, 0)]
    tokens += [(t, 0) for t in _text(16, gen)]
    sample.input_ids = torch.tensor([t for t, _ in tokens], dtype=torch.long)
    sample.mm_types = torch.tensor([m for _, m in tokens], dtype=torch.long)
    sample.labels = sample.input_ids.clone()
    sample.labels[0] = -100
    sample.labels[sample.mm_types != 0] = -100
    _add_mrope(config, "vlm", sample, _rope_holder(config, None))
    return _pack(config, "vlm", [sample]).inputs


def _text(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(*_TEXT_ID_RANGE, (n,), generator=gen).tolist()


def _omni_sample(config: Any, wanted: tuple[str, ...], gen: torch.Generator) -> dict[str, torch.Tensor]:
    vision = config.vision_config
    merge = vision.spatial_merge_size
    width = _pixel_row_width(vision)
    vs, ve = _token_id(config, "vision_start"), _token_id(config, "vision_end")
    ids = _text(4, gen)
    out: dict[str, torch.Tensor] = {}
    if "image" in wanted:
        ids += [vs] + [_token_id(config, "image")] * (math.prod(_OMNI_IMAGE_GRID) // merge**2) + [ve]
        ids += _text(3, gen)
        out["pixel_values"] = torch.randn(math.prod(_OMNI_IMAGE_GRID), width, generator=gen)
        out["image_grid_thw"] = torch.tensor([_OMNI_IMAGE_GRID], dtype=torch.long)
    if "video" in wanted:
        ids += [vs] + [_token_id(config, "video")] * (math.prod(_OMNI_VIDEO_GRID) // merge**2) + [ve]
        ids += _text(3, gen)
        out["pixel_values_videos"] = torch.randn(math.prod(_OMNI_VIDEO_GRID), width, generator=gen)
        out["video_grid_thw"] = torch.tensor([_OMNI_VIDEO_GRID], dtype=torch.long)
        out["video_second_per_grid"] = torch.tensor([1.0])
    if "audio" in wanted:
        a_start, a_end = _token_id(config, "audio_start"), _token_id(config, "audio_end")
        n_audio = _audio_token_count(config, _OMNI_AUDIO_FRAMES)
        ids += [a_start] + [_token_id(config, "audio")] * n_audio + [a_end] + _text(3, gen)
        mel = config.audio_config.num_mel_bins
        out["input_features"] = torch.randn(1, mel, _OMNI_AUDIO_FRAMES, generator=gen)
        out["feature_attention_mask"] = torch.ones(1, _OMNI_AUDIO_FRAMES, dtype=torch.long)
    ids += _text(16, gen)
    input_ids = torch.tensor([ids], dtype=torch.long)
    placeholders = torch.tensor(sorted(_token_id(config, k) for k in ("image", "video", "audio")))
    labels = input_ids.clone()
    labels[:, 0] = -100
    labels[torch.isin(input_ids, placeholders)] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels, **out}


def step_batch(
    config: Any, builder: str, patch_size: int, mods: str, *, rank: int, step: int
) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s batch of one schedule step (CPU tensors)."""
    if mods == "*":
        return BATCHES[builder](config, rank=0, patch_size=patch_size)
    if mods == "":
        return text_batch(config, rank=rank)
    _check_patch_size(config, patch_size)
    return modal_batch(config, mods, seed=DATA_SEED * 1000 + 10 * step + rank + 100)


def batch_modalities(batch: dict[str, torch.Tensor]) -> list[str]:
    """Which encoder slots a batch really fills (what the model's forward will see), in model order."""
    keys = {"audio": "input_features", "image": "pixel_values", "video": "pixel_values_videos"}
    return [m for m, k in keys.items() if k in batch]


# --------------------------------------------------------------------------------------------
# numbers


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """fp32 FSDP vs unsharded differ by reduction order only; bf16 mixed precision by rounding."""
    if dtype == torch.float32:
        return {"rtol": 1e-4, "atol": 1e-5}
    return {"rtol": 2e-2, "atol": 2e-2}


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _sq_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Sum of squared gradient entries over this rank's (local) shards, in fp32."""
    total = torch.zeros((), dtype=torch.float32)
    for p in params:
        if p.grad is not None:
            total = total + _local(p.grad).detach().float().pow(2).sum().cpu()
    return total


def _reference(config: Any, steps: list[list[dict[str, torch.Tensor]]], device: torch.device) -> dict:
    """Unsharded model, no hooks: per step, every rank's loss and the norm of the averaged grads."""
    model = toy.build_model(
        config, attn_implementation="eager", dtype=torch.float32, device=device, seed=SEED
    )
    vision = _vision_params(model)
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    losses: list[list[float]] = [[] for _ in steps[0]]
    grad_norms, vision_norms = [], []
    for batches in steps:
        for rank, batch in enumerate(batches):
            loss = model(**_to(batch, device)).loss
            (loss / len(batches)).backward()  # FSDP's reduce-scatter averages over ranks
            losses[rank].append(float(loss.detach()))
        grad_norms.append(float(_sq_norm(list(model.parameters())).sqrt()))
        vision_norms.append(float(_sq_norm(vision).sqrt()))
        opt.step()
        opt.zero_grad(set_to_none=True)
    del model, opt
    return {"losses_by_rank": losses, "grad_norm": grad_norms, "vision_grad_norm": vision_norms}


def _vision_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The vision tower's parameters, by the model's own description (not the lookup under test)."""
    vision = towers.expected_encoder(model, "vision")
    assert vision is not None, f"{type(model).__name__} has no vision encoder"
    return list(vision.module.parameters())


class EncoderCounter:
    """Counts entries into each encoder (forward pre-hooks), and optionally names each FSDP unit entered.

    The encoders are found by :func:`parity.harness.towers.expected_encoders`, so the count does
    not depend on the lookup the hook under test uses.
    """

    def __init__(self, model: torch.nn.Module, *, trace: Callable[[str], None] | None = None) -> None:
        self.entries: dict[str, int] = {}
        self._handles = []
        for kind, encoder in towers.expected_encoders(model).items():
            self.entries[kind] = 0
            self._handles.append(encoder.module.register_forward_pre_hook(self._counter(kind)))
        self._trace = trace

    def _counter(self, kind: str) -> Callable[..., None]:
        def count(module: torch.nn.Module, args: tuple) -> None:
            self.entries[kind] += 1

        return count

    def trace_units(self, model: torch.nn.Module) -> None:
        """After ``fully_shard``: report every FSDP unit before its own pre-forward (its all-gather) runs."""
        from torch.distributed.fsdp import FSDPModule

        assert self._trace is not None
        for name, module in model.named_modules():
            if isinstance(module, FSDPModule):
                label = name or "<root>"

                def enter(mod: torch.nn.Module, args: tuple, kwargs: dict, label: str = label) -> None:
                    self._trace(label)

                self._handles.append(module.register_forward_pre_hook(enter, prepend=True, with_kwargs=True))

    def take(self) -> dict[str, int]:
        """The counts since the last call."""
        out, self.entries = self.entries, dict.fromkeys(self.entries, 0)
        return out




# --------------------------------------------------------------------------------------------
# the distributed run


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing of every layer, through whichever API this transformers has.

    5.24 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old
    name warns) and checkpoints each layer's ``forward`` instead of its ``__call__``, so FSDP2's
    hooks no longer rerun on recomputation; 5.17 only has the old name.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@dataclass(frozen=True)
class Case:
    """One model to check: id (file name of its result), config, rank-0 batch builder, options."""

    id: str
    config: str
    batch: str
    patch_size: int
    gradient_checkpointing: bool = False
    schedule: str = "basic"  # basic | matrix (see scenario_names)

    @classmethod
    def parse(cls, spec: str) -> Case:
        """``id=qwen2_vl,config=PATH,batch=vlm_batch,patch_size=14[,gc=1][,schedule=matrix]``."""
        fields = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
        missing = [k for k in ("id", "config", "batch", "patch_size") if k not in fields]
        if missing:
            raise ValueError(f"--case {spec!r}: missing {', '.join(missing)}")
        if fields["batch"] not in BATCHES:
            raise ValueError(
                f"--case {spec!r}: unknown batch {fields['batch']!r}; known: {', '.join(BATCHES)}"
            )
        return cls(
            id=fields["id"],
            config=fields["config"],
            batch=fields["batch"],
            patch_size=int(fields["patch_size"]),
            gradient_checkpointing=fields.get("gc", "0") in ("1", "true", "yes"),
            schedule=fields.get("schedule", "basic"),
        )

    def to_spec(self) -> str:
        gc = ",gc=1" if self.gradient_checkpointing else ""
        return (
            f"id={self.id},config={self.config},batch={self.batch},patch_size={self.patch_size}{gc}"
            f",schedule={self.schedule}"
        )


def _schedule_batches(case: Case, config: Any, steps: int, world: int) -> list[list[dict[str, torch.Tensor]]]:
    """Every step's batches, one per rank, from the case's schedule (same on every rank)."""
    names = scenario_names(case.schedule, toy.model_family(config), steps)
    out = []
    for step, name in enumerate(names):
        mods = SCENARIOS[name]
        if world != len(mods):
            raise ValueError(f"scenario {name} is written for {len(mods)} ranks, the job has {world}")
        out.append(
            [
                step_batch(config, case.batch, case.patch_size, mods[r], rank=r, step=step)
                for r in range(world)
            ]
        )
    return out


def _run_rank(
    case: Case, args: argparse.Namespace, rank: int, world: int, device: torch.device
) -> dict[str, Any]:
    """Build, hook, shard, train one step per schedule step; return this rank's numbers and problems."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from parity.training.dummy_forward import enable_dummy_forward
    from parity.training.fsdp import apply_fsdp2

    config = toy.load_config(case.config)
    family = toy.model_family(config)
    names_by_step = scenario_names(case.schedule, family, args.steps)
    batches = [_to(b[rank], device) for b in _schedule_batches(case, config, args.steps, world)]
    model = toy.build_model(
        config, attn_implementation=args.attn, dtype=torch.float32, device=device, seed=SEED
    )
    if case.gradient_checkpointing:
        enable_activation_checkpointing(model)
    enabled = not settings.get(settings.DISABLE_DUMMY_FORWARD)
    hooks = enable_dummy_forward(model, enabled=enabled)
    # Hook off (the launch-level negative control): say which FSDP unit each collective is for.
    trace = None if enabled else (lambda unit: print(f"[{TAG}] rank={rank} enter {unit}", flush=True))
    counter = EncoderCounter(model, trace=trace)
    mp = None
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    apply_fsdp2(model, None, mp_policy=mp)
    if trace is not None:
        counter.trace_units(model)
        print(f"[{TAG}] rank={rank} ready", flush=True)
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    vision = [p for p in _vision_params(model) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LEARNING_RATE)

    out: dict[str, Any] = {
        "rank": rank,
        "modalities": [batch_modalities(b) for b in batches],  # per step
        "dummy_forward_enabled": hooks.enabled,
        "losses": [],
        "grad_norm": [],
        "vision_grad_norm": [],
        "dummy_calls": [],  # per step: the hook's dummy passes, by modality
        "encoder_entries": [],  # per step: entries into each encoder, counted independently
        "no_grad_params": [],
        "problems": [],
    }
    for step, batch in enumerate(batches):
        before = dict(hooks.calls)
        loss = model(**batch).loss
        loss.backward()
        delta = {m: n - before.get(m, 0) for m, n in hooks.calls.items()}
        out["dummy_calls"].append({m: n for m, n in delta.items() if n})
        out["encoder_entries"].append(counter.take())
        value = float(loss.detach().float())
        out["losses"].append(value)
        where = f"rank {rank} step {step} ({names_by_step[step]})"
        if not math.isfinite(value):
            out["problems"].append(f"{where}: non-finite loss {value}")
        if step == 0:
            out["no_grad_params"] = sorted(names[id(p)] for p in params if p.grad is None)
        bad = sorted(
            names[id(p)] for p in params if p.grad is not None and not _local(p.grad).isfinite().all()
        )
        if bad:
            out["problems"].append(f"{where}: non-finite grads in {bad[:5]}")
        norms = torch.stack([_sq_norm(params), _sq_norm(vision)]).to(device)
        dist.all_reduce(norms)  # shards are disjoint: the sum of squares over ranks is the global one
        total, vision_total = (float(x) for x in norms.sqrt().cpu())
        out["grad_norm"].append(total)
        out["vision_grad_norm"].append(vision_total)
        if not (math.isfinite(total) and total > 0):
            out["problems"].append(f"{where}: global grad norm {total}")
        if not vision_total > 0:
            out["problems"].append(f"{where}: the vision tower got no gradient ({vision_total})")
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(
        f"[{TAG}] case={case.id} rank={rank} modalities={out['modalities']} dummy_calls={out['dummy_calls']} "
        f"encoder_entries={out['encoder_entries']} losses={out['losses']} grad_norm={out['grad_norm']}",
        flush=True,
    )
    return out


def check_calls(summary: dict[str, Any], family: str) -> list[str]:
    """Per step: every rank entered each encoder equally often, once per slot, dummies filling the gaps.

    The counts after the hook are what FSDP2 pairs up: a rank that enters the vision tower twice
    while its peer enters once all-gathers one unit more. Returns the problems found.
    """
    problems = []
    slots = family_modalities(family)
    expected_entries = {"vision": sum(m in ("image", "video") for m in slots)}
    if "audio" in slots:
        expected_entries["audio"] = 1
    ranks = summary["ranks"]
    for step, name in enumerate(summary["scenarios"]):
        entries = [r["encoder_entries"][step] for r in ranks]
        if len({tuple(sorted(e.items())) for e in entries}) > 1:
            problems.append(f"step {step} ({name}): encoder entries differ across ranks: {entries}")
        for r in ranks:
            real = r["modalities"][step]
            want_dummy = {m: 1 for m in slots if m not in real}
            if r["dummy_calls"][step] != want_dummy:
                problems.append(
                    f"step {step} ({name}) rank {r['rank']}: real {real}, dummy passes "
                    f"{r['dummy_calls'][step]}, expected {want_dummy}"
                )
            if r["encoder_entries"][step] != expected_entries:
                problems.append(
                    f"step {step} ({name}) rank {r['rank']}: encoder entries {r['encoder_entries'][step]}, "
                    f"expected {expected_entries} (one per slot)"
                )
    return problems


def _records(summary: dict[str, Any], case: Case, device: torch.device, dtype: torch.dtype) -> list:
    """The two metric records the merge compares: the unsharded reference and the FSDP2 run."""
    from parity.harness.fingerprint import fingerprint

    fp = fingerprint(device=device, dtype=dtype, seed=SEED, config_hash=toy.config_hash(case.config))
    common = {
        "world_size": summary["world_size"],
        "steps": summary["steps"],
        "schedule": case.schedule,
        "scenarios": summary["scenarios"],
        "batch": case.batch,
        "gradient_checkpointing": case.gradient_checkpointing,
        "attn_implementation": summary["attn_implementation"],
    }
    records = []
    base = {
        "suite": "dummy_forward",
        "model": case.id,
        "variant": settings.get(settings.VARIANT),
        "tolerance": summary["tolerance"],
        "fingerprint": fp,
        "expected_steps": summary["steps"],
    }
    ref = summary.get("reference")
    if ref is not None:
        records.append(
            make_record(
                mode={"id": "reference", "fsdp": False, "dummy_forward": False, **common},
                status="ok",
                metrics={"loss": ref["losses_by_rank"][0], "grad_norm": ref["grad_norm"]},
                **base,
            )
        )
    ranks = summary["ranks"]
    records.append(
        make_record(
            mode={
                "id": "fsdp2_asym",
                "fsdp": True,
                "dummy_forward": ranks[0]["dummy_forward_enabled"],
                **common,
            },
            status="ok" if summary["passed"] else "error",
            metrics={
                "loss": ranks[0]["losses"],
                "grad_norm": ranks[0]["grad_norm"],
                "losses_by_rank": [r["losses"] for r in ranks],
                "dummy_calls_by_rank": [r["dummy_calls"] for r in ranks],
                "encoder_entries_by_rank": [r["encoder_entries"] for r in ranks],
            },
            error=None if summary["passed"] else "; ".join(summary["problems"]) or "failed",
            **base,
        )
    )
    return records


def _compare(summary: dict[str, Any]) -> None:
    """Hold the FSDP2 numbers against the unsharded reference; append problems to the summary."""
    ref, tol, ranks = summary["reference"], summary["tolerance"], summary["ranks"]
    devs: dict[str, list[float]] = {}
    for r in ranks:
        name = f"loss[rank {r['rank']}]"
        dev = series_deviation(name, r["losses"], ref["losses_by_rank"][r["rank"]], Tolerance(**tol))
        devs[name] = [dev.max_abs, dev.max_rel]
        if not dev.ok:
            summary["problems"].append(
                f"{name} {r['losses']} != reference {ref['losses_by_rank'][r['rank']]}"
            )
    for key in ("grad_norm", "vision_grad_norm"):
        dev = series_deviation(key, ranks[0][key], ref[key], Tolerance(**tol))
        devs[key] = [dev.max_abs, dev.max_rel]
        if not dev.ok:
            summary["problems"].append(f"{key} {ranks[0][key]} != reference {ref[key]}")
    summary["max_deviation"] = devs  # name -> [max abs, max rel]


def run_case(
    case: Case, args: argparse.Namespace, rank: int, world: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """One model on every rank; returns the summary (complete on rank 0)."""
    start = time.monotonic()
    print(f"[{TAG}] case={case.id} rank={rank} start ({case.to_spec()})", flush=True)
    reference = None
    config = toy.load_config(case.config)
    family = toy.model_family(config)
    if rank == 0 and not args.no_reference:
        reference = _reference(config, _schedule_batches(case, config, args.steps, world), device)
    mine = _run_rank(case, args, rank, world, device)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)

    scenarios = scenario_names(case.schedule, family, args.steps)
    problems = [p for r in gathered for p in r["problems"]]
    no_grad = {r["rank"]: r["no_grad_params"] for r in gathered}
    if len({tuple(v) for v in no_grad.values()}) > 1:
        problems.append(f"parameters without a gradient differ across ranks (not SPMD): {no_grad}")
    summary: dict[str, Any] = {
        "check": TAG,
        "case": case.id,
        "config": case.config,
        "world_size": world,
        "steps": len(scenarios),
        "schedule": case.schedule,
        "scenarios": scenarios,
        "batches": [list(SCENARIOS[n]) for n in scenarios],
        "batch": case.batch,
        "gradient_checkpointing": case.gradient_checkpointing,
        "attn_implementation": args.attn,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "tolerance": tolerance(dtype),
        "ranks": gathered,
        "reference": reference,
        "problems": problems,
    }
    if gathered[0]["dummy_forward_enabled"]:
        summary["problems"] += check_calls(summary, family)
    if reference is not None:
        _compare(summary)
    summary["passed"] = not summary["problems"]
    summary["elapsed_s"] = round(time.monotonic() - start, 2)
    if rank == 0:
        summary["records"] = _records(summary, case, device, dtype)
        for line in summary["problems"]:
            print(f"[{TAG}] case={case.id} PROBLEM: {line}", flush=True)
        verdict = "PASSED" if summary["passed"] else "FAILED"
        print(
            f"[{TAG}] case={case.id} {verdict} in {summary['elapsed_s']}s "
            f"max_deviation={summary.get('max_deviation')}",
            flush=True,
        )
    return summary


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def _arm_case_deadline(seconds: float | None, rank: int) -> None:
    """Per-case self-destruct: dump every thread's stack to the rank's stack file, then exit(1).

    Several cases share one job to save start-up time, so the launcher's watchdog covers all of
    them; this deadline keeps "a hang fails fast" true per case. It replaces init_rank's job-wide
    timer (faulthandler holds one); ``shutdown()`` cancels it.
    """
    if not seconds:
        return
    stack_dir = settings.get(settings.STACK_DIR)
    out = sys.stderr
    if stack_dir:
        global _deadline_file
        if _deadline_file is None:
            _deadline_file = open(stack_file(Path(stack_dir), rank), "a", buffering=1)
        out = _deadline_file
    faulthandler.dump_traceback_later(seconds, exit=True, file=out)


_deadline_file: Any = None  # faulthandler keeps only the descriptor: the file must stay open


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    single = parser.add_argument_group("one case")
    single.add_argument("--config", help="toy config id, dir or config.json")
    single.add_argument("--batch", default="vlm_batch", choices=sorted(BATCHES))
    single.add_argument("--patch-size", type=int, help="the model's vision patch size")
    single.add_argument("--gradient-checkpointing", action="store_true")
    single.add_argument("--out", type=Path, default=None, help="JSON file rank 0 writes")
    several = parser.add_argument_group("several cases in one process group (saves start-up time)")
    several.add_argument(
        "--case",
        action="append",
        default=[],
        metavar="SPEC",
        help="id=ID,config=PATH,batch=vlm_batch|omni_batch,patch_size=P[,gc=1]; repeatable",
    )
    several.add_argument("--out-dir", type=Path, default=None, help="rank 0 writes <case id>.json here")
    several.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="SPEC",
        help="negative control, run after the cases (needs --out-dir): "
        "id=ID,config=PATH,batch=B,patch_size=P,scenario=NAME; repeatable",
    )
    parser.add_argument("--steps", type=int, default=2, help="steps of the basic schedule (matrix: fixed)")
    parser.add_argument("--attn", default="eager", help="attention implementation of the FSDP2 run")
    parser.add_argument("--no-reference", action="store_true", help="skip the unsharded reference")
    parser.add_argument(
        "--case-timeout",
        type=float,
        default=None,
        help="seconds per case before a rank dumps its stack and exits (a hang fails fast, per case)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.config and args.case:
        parser.error("give either --config (one case) or --case (one or more)")
    if not (args.config or args.case or args.control):
        parser.error("nothing to run: give --config, --case or --control")
    if args.control and args.out_dir is None:
        parser.error("--control needs --out-dir")
    from parity.harness.checks.dummy_forward_controls import Control

    try:
        args.cases = [Case.parse(spec) for spec in args.case]
        args.controls = [Control.parse(spec) for spec in args.control]
    except ValueError as exc:
        parser.error(str(exc))
    if args.config:
        if args.patch_size is None:
            parser.error("--config needs --patch-size")
        name = Path(args.config).name.removesuffix(".json").removesuffix("_toy") or "case"
        args.cases = [Case(name, args.config, args.batch, args.patch_size, args.gradient_checkpointing)]
    return args


def _use_gpus() -> bool:
    """NCCL when every local rank gets its own GPU, else gloo on CPU (``PARITY_DEVICE=cpu`` forces it).

    Two ranks on one GPU would need NCCL to share a device; the CPU run checks the same thing.
    """
    if (settings.get(settings.DEVICE) or "").startswith("cpu") or not torch.cuda.is_available():
        return False
    return torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def main(argv: list[str] | None = None) -> int:
    from parity.harness.rank_setup import init_rank, shutdown

    args = parse_args(argv)
    if _use_gpus():
        rank, world = init_rank(backend="nccl")
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    else:
        torch.set_num_threads(1)  # two ranks on a two-core machine: oversubscription makes gloo crawl
        rank, world = init_rank(backend="gloo")
        device, dtype = torch.device("cpu"), torch.float32
    passed = True
    if args.controls:
        from parity.harness.checks import dummy_forward_controls as controls

        controls.start_forkserver([c.config for c in args.controls])  # imports overlap with the cases
    try:
        for case in args.cases:
            _arm_case_deadline(args.case_timeout, rank)
            # An exception propagates and ends the job: the peer would be stuck in the next collective.
            summary = run_case(case, args, rank, world, device, dtype)
            passed = passed and summary["passed"]
            if rank == 0:
                if args.out is not None:
                    _write_json(args.out, summary)
                if args.out_dir is not None:
                    _write_json(args.out_dir / f"{case.id}.json", summary)
            gc.collect()
        if args.controls:
            rearm = lambda: _arm_case_deadline(args.case_timeout, rank)  # noqa: E731 - per batch
            for result in controls.run_controls(args.controls, rank, world, args.out_dir, rearm):
                passed = passed and result["verdict"] == "caught"
                _write_json(args.out_dir / f"{result['control']}.json", result)
    finally:
        shutdown()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
