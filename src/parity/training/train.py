"""The e2e trainer: a toy model trained for a few steps under FSDP2 + Ulysses SP + expert parallelism.

    torchrun --nproc-per-node 2 -m parity.train --config toy_config/qwen3_moe_toy --sp 2 --ep 2 \
        --steps-per-epoch 2 --epochs 2 --out OUT [--attn parity_sdpa_with_sp] [--moe fused]

(in the suites it is started through :func:`parity.harness.launch.launch`, which adds the hang watchdog).
``--plan FILE`` runs several such trainings one after the other in one job (see :func:`read_plan`).
Rank 0 writes ``OUT/log_dict.json`` (``{"loss": [...], "grad_norm": [...]}``, one value per
optimizer step) and ``OUT/run_meta.json`` (layout, what actually ran, environment fingerprint).

The e2e suite runs this once per parallel layout and compares the per-step numbers with the
``sp=1, ep=1`` run. For that comparison to mean something, everything except the layout is fixed:
CPU-seeded weights (:func:`parity.harness.toy.build_model`), the same synthetic global batch every step for
every layout, the same attention and experts implementation, the same optimizer. What remains
are the parallel mechanisms under test.

Layout (``W`` ranks; ``W % sp == 0`` and ``W % ep == 0``):

* ``dp_sp`` mesh ``(dp, sp) = (W/sp, sp)``, row-major, so an sp group is ``sp`` consecutive ranks.
  The sp group runs the Ulysses exchanges; ``dp`` indexes the data shard.
* ``fsdp`` mesh: all ``W`` ranks. Every parameter except routed experts is sharded over it. The sp
  ranks belong to it too (torchtitan's "dp_shard_cp"): they hold the same parameters and each
  computes the gradient of its own sequence slice, so the reduction over sp is exactly the sum
  the full-sequence gradient needs.
* ``ep`` mesh ``(efsdp, ep) = (W/ep, ep)``: expert blocks are split over ``ep`` (contiguous blocks
  of E/ep experts, :func:`parity.backend.moe.shard_experts_for_ep`) *before* FSDP, and each experts module
  is its own FSDP unit over ``efsdp`` only. Sharding expert params over the full mesh would let FSDP
  slice across ep blocks and hand the fused kernel the wrong experts; over ``efsdp`` every all-gather
  reassembles exactly this rank's block. ep is independent of sp: an ep group exchanges whatever
  tokens its ranks hold (with sp=ep=2 on 2 ranks both groups are the same two ranks).

Loss and gradients. ``N`` = the number of label tokens in the whole global batch (known on every
rank from the deterministic dataset). Each rank backpropagates ``sum(its token losses) / N`` and
every FSDP unit *sums* gradients (divide factor 1, sum-only collectives) instead of averaging.
Then each parameter's gradient is the gradient of the global token-mean loss, whatever dp, sp or
ep are: dense parameters sum over all W ranks; an expert block sums over its ep group through the
all-to-all backward and over ``efsdp`` through FSDP, again all W ranks. With FSDP's default
averaging instead, dense and expert gradients would need different correction factors (W vs W/ep).
The logged loss is the same quantity: ``all_reduce(sum of token losses) / N``.

VLMs under sp. The vision (and audio) towers run on the FULL inputs on every sp rank (the image
features must be merged into the embeddings of the full sequence), and a forward pre-hook on the
language model slices what it receives: ``inputs_embeds``, all rows of the 4-row position ids,
Qwen3-VL's ``visual_pos_masks`` and deepstack features; it also injects the full-sequence
``cu_seq_lens``. Chosen over building ``inputs_embeds`` ourselves because it reuses each model's own
merge code (placeholder masks, deepstack, Omni audio) unchanged in transformers 5.17 and 5.24; the
towers' attention is marked sp-disabled. The towers' compute is redundant across sp ranks, the
gradient is not: each rank's tower gradient only carries its own slice's contribution.

GPU: NCCL, FSDP2 ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` over fp32 master
weights (``--dtype bfloat16``, the default there). CPU: gloo, fp32.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from parity.backend import attention, moe
from parity.backend.parallel_state import parallel_groups
from parity.backend.ulysses import (
    cu_seqlens_from_position_ids,
    pad_position_ids,
    pad_to_multiple,
    shard_packed_inputs,
)
from parity.harness import toy
from parity.harness.batches import PackedBatch, packed_batch
from parity.training.fsdp import apply_fsdp2

__all__ = [
    "IGNORE_INDEX",
    "Meshes",
    "ParallelDims",
    "SyntheticDataset",
    "TrainConfig",
    "main",
    "parallelize",
    "total_grad_norm",
    "train",
]

IGNORE_INDEX = -100
LOG_DICT = "log_dict.json"
RUN_META = "run_meta.json"

#: Negative control of the hang defences: rank 1 never joins the grad-norm all-reduce of the first
#: step (it stalls instead), so rank 0 blocks inside the collective until something stops the job.

#: Packed-row sample lengths. Multimodal samples need room for an image (and a video/audio clip).
#: Odd totals on purpose: sp=2 must pad the row (padding is its own packed sequence, no labels).
SEQ_LENS = {"text": (41, 24), "vlm": (97, 64), "omni": (97, 64)}


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; written into run_meta.json so a log explains itself."""

    config: str
    out: str
    sp: int = 1
    ep: int = 1
    steps_per_epoch: int = 2
    epochs: int = 2
    attn: str = attention.PARITY_SDPA
    #: kernel library serving ``attn`` (None: the backend's default); see attention.use_kernels
    attn_kernel: str | None = None
    moe: str = moe.FUSED
    dtype: str = "float32"
    seed: int = 0
    data_seed: int = 1
    lr: float = 1e-3
    rows_per_step: int | None = None  # global batch in packed rows; None = one per rank

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def compute_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"--dtype {self.dtype!r} is not a torch dtype")
        return dtype


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m parity.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="toy model id, toy dir or config.json")
    p.add_argument("--out", required=True, help="directory for log_dict.json and run_meta.json")
    p.add_argument("--sp", type=int, default=1, help="Ulysses sequence-parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    p.add_argument("--steps-per-epoch", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument(
        "--attn",
        default=attention.PARITY_FA2 if gpu else attention.PARITY_SDPA,
        choices=attention.BACKENDS,
        help="parity attention backend (the only ones that do the Ulysses exchange)",
    )
    p.add_argument(
        "--attn-kernel",
        default=None,
        help="kernel library serving --attn, e.g. flash_attn or torch.varlen_attn for the FA2 backend "
        "(default: the backend's own default)",
    )
    p.add_argument("--moe", default=moe.FUSED, choices=(moe.FUSED,), help="experts implementation")
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32", help="compute dtype")
    p.add_argument("--seed", type=int, default=0, help="weight-init seed")
    p.add_argument("--data-seed", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rows-per-step", type=int, default=None, help="global batch (packed rows)")
    args = p.parse_args(argv)
    return TrainConfig(**vars(args))


# --------------------------------------------------------------------------------------------
# meshes


@dataclass(frozen=True)
class ParallelDims:
    """World size and the sp/ep degrees; dp is what is left over."""

    world: int
    sp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("sp", "ep"):
            size = getattr(self, name)
            if size < 1 or self.world % size:
                raise ValueError(f"{name}={size} must be >= 1 and divide the world size {self.world}")

    @property
    def dp(self) -> int:
        return self.world // self.sp

    @property
    def efsdp(self) -> int:
        return self.world // self.ep


@dataclass
class Meshes:
    """The device meshes of a run (see the module docstring for why three)."""

    fsdp: DeviceMesh  # 1-D, every rank: dense parameters
    dp_sp: DeviceMesh  # ("dp", "sp"): data shard index and the Ulysses group
    ep: DeviceMesh | None  # ("efsdp", "ep"): expert blocks and their FSDP; None when ep == 1

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        return self.dp_sp.get_group("sp") if self.dp_sp["sp"].size() > 1 else None

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        return self.ep.get_group("ep") if self.ep is not None else None

    @property
    def dp_rank(self) -> int:
        return self.dp_sp.get_local_rank("dp")

    @property
    def sp_rank(self) -> int:
        return self.dp_sp.get_local_rank("sp")

    @property
    def ep_rank(self) -> int:
        return self.ep.get_local_rank("ep") if self.ep is not None else 0


def build_meshes(dims: ParallelDims, device_type: str) -> Meshes:
    fsdp = init_device_mesh(device_type, (dims.world,), mesh_dim_names=("fsdp",))
    dp_sp = init_device_mesh(device_type, (dims.dp, dims.sp), mesh_dim_names=("dp", "sp"))
    ep = None
    if dims.ep > 1:
        ep = init_device_mesh(device_type, (dims.efsdp, dims.ep), mesh_dim_names=("efsdp", "ep"))
    return Meshes(fsdp=fsdp, dp_sp=dp_sp, ep=ep)


# --------------------------------------------------------------------------------------------
# data


class SyntheticDataset:
    """A fixed list of packed rows; step s of every epoch uses rows [s*G, (s+1)*G).

    Every rank builds the whole dataset (same seeds), so the global batch of a step, and its
    label-token count, are identical for every layout and known on every rank without a collective.
    dp rank d takes rows d*G/dp ... of the global batch and runs them one by one (gradient
    accumulation); its sp group shares those rows and splits each along the sequence.
    """

    def __init__(
        self,
        config: Any,
        *,
        rows_per_step: int,
        steps_per_epoch: int,
        seed: int,
        model: torch.nn.Module | None = None,
    ) -> None:
        self.rows_per_step = rows_per_step
        seq_lens = SEQ_LENS[toy.model_family(config)]
        total = rows_per_step * steps_per_epoch
        self.rows: list[PackedBatch] = [
            packed_batch(config, seq_lens=seq_lens, seed=seed + i, model=model) for i in range(total)
        ]
        self.steps_per_epoch = steps_per_epoch

    def global_batch(self, step: int) -> list[PackedBatch]:
        first = (step % self.steps_per_epoch) * self.rows_per_step
        return self.rows[first : first + self.rows_per_step]

    def local_rows(self, step: int, dp_rank: int, dp: int) -> list[PackedBatch]:
        if self.rows_per_step % dp:
            raise ValueError(f"{self.rows_per_step} rows per step cannot be split over dp={dp}")
        per_rank = self.rows_per_step // dp
        return self.global_batch(step)[dp_rank * per_rank : (dp_rank + 1) * per_rank]

    def label_tokens(self, step: int) -> int:
        """Tokens the loss averages over: labels shifted by one, ignoring IGNORE_INDEX."""
        return sum(
            int((row.inputs["labels"][..., 1:] != IGNORE_INDEX).sum()) for row in self.global_batch(step)
        )


# --------------------------------------------------------------------------------------------
# sequence sharding of one micro-batch


@dataclass
class MicroBatch:
    model_inputs: dict[str, Any]
    shift_labels: torch.Tensor  # this rank's slice of the labels shifted over the FULL sequence


def shard_micro_batch(
    row: PackedBatch, family: str, sp_rank: int, sp: int, device: torch.device
) -> MicroBatch:
    """Model inputs for this sp rank: labels shifted on the full row, padded to a multiple of sp, sliced.

    Text rows are sharded here (local input_ids/position_ids; with sp > 1 also the full row's
    cu_seq_lens). VLM rows go in whole; :class:`LanguageModelShard` slices them after the vision
    features are merged. sp=1 takes the same path (a single slice), so the reference exercises
    the same code.
    """
    inputs = {k: v.to(device) for k, v in row.inputs.items()}
    labels = inputs.pop("labels")
    positions = inputs["position_ids"]
    text_positions = positions if positions.dim() == 2 else positions[0]
    sharded = shard_packed_inputs(
        inputs["input_ids"], text_positions, sp_rank=sp_rank, sp_size=sp, labels=labels
    )
    shift_labels = sharded.pop("shift_labels")
    if sp == 1:
        # The backend derives the same boundaries from the (full) position ids; and explicit
        # cu_seq_lens make transformers 5.24 reject packed rows in linear-attention layers
        # (qwen3_5) when flash-linear-attention is not installed.
        sharded = {k: v for k, v in sharded.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    if family == "text":
        return MicroBatch(model_inputs=sharded, shift_labels=shift_labels)
    return MicroBatch(model_inputs=inputs, shift_labels=shift_labels)


def _find_language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The text decoder stack: the module holding ``embed_tokens`` and ``layers`` (not in a tower)."""
    found = [m for m in model.modules() if "embed_tokens" in m._modules and "layers" in m._modules]
    if len(found) != 1:
        names = [type(m).__name__ for m in found]
        raise ValueError(f"{type(model).__name__}: expected one text decoder, found {names or 'none'}")
    return found[0]


class LanguageModelShard:
    """Forward pre-hook on a VLM's language model: slice the full sequence for this sp rank.

    Receives what the VLM built for the FULL row (embeddings with image/video/audio features
    merged, 4-row position ids, Qwen3-VL's visual mask and deepstack features), pads it to a
    multiple of sp (padding: zero embeddings, positions restarting at 0 so the padding is its own
    packed sequence, no visual tokens), computes cu_seq_lens on the full padded row (sp > 1), and
    hands the decoder only this rank's contiguous slice. Batch size must be 1 (packed rows).
    """

    def __init__(self, sp_rank: int, sp: int) -> None:
        self.sp_rank, self.sp = sp_rank, sp

    def _slice(self, t: torch.Tensor, dim: int) -> tuple[torch.Tensor, int]:
        local = t.shape[dim] // self.sp
        return t.narrow(dim, self.sp_rank * local, local), self.sp_rank * local

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        if args:
            raise TypeError(f"{type(module).__name__} called with positional args; expected keywords only")
        embeds = kwargs.get("inputs_embeds")
        positions = kwargs.get("position_ids")
        if embeds is None or positions is None:
            raise ValueError("the language model must receive inputs_embeds and position_ids under sp")
        if embeds.shape[0] != 1:
            raise ValueError(f"packed rows have batch size 1, got {embeds.shape[0]}")
        embeds = pad_to_multiple(embeds, self.sp, dim=1, value=0.0)
        positions = pad_position_ids(positions, self.sp)
        text_positions = positions[0] if positions.dim() == 3 else positions
        kwargs["inputs_embeds"], start = self._slice(embeds, 1)
        kwargs["position_ids"], _ = self._slice(positions, positions.dim() - 1)
        if self.sp > 1:  # at sp=1 the backend reads the full position ids (see shard_micro_batch)
            cu, max_len = cu_seqlens_from_position_ids(text_positions)
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)

        mask = kwargs.get("visual_pos_masks")
        if mask is not None:  # Qwen3-VL deepstack: visual rows are in sequence order
            mask = pad_to_multiple(mask, self.sp, dim=-1, value=False)
            local_mask, _ = self._slice(mask, mask.dim() - 1)
            before = int(mask[..., :start].sum())
            count = int(local_mask.sum())
            kwargs["visual_pos_masks"] = local_mask
            deepstack = kwargs.get("deepstack_visual_embeds")
            if deepstack is not None:
                kwargs["deepstack_visual_embeds"] = [e[before : before + count] for e in deepstack]
        return args, kwargs


# --------------------------------------------------------------------------------------------
# parallelization


def experts_modules(model: torch.nn.Module, ep: int = 1) -> list[torch.nn.Module]:
    """Stacked-experts modules (transformers v5 layout: ``down_proj`` [E, ...] with ``num_experts``).

    ``ep``: after :func:`parity.backend.moe.shard_experts_for_ep` a module holds E/ep experts.
    """
    found = []
    for m in model.modules():
        down = m._parameters.get("down_proj")
        experts = getattr(m, "num_experts", None)
        if down is not None and isinstance(experts, int) and down.shape[0] == experts // ep:
            found.append(m)
    return found


def _mark_towers_sp_disabled(model: torch.nn.Module) -> list[str]:
    """Vision/audio towers see full inputs on every sp rank: their attention must not exchange."""
    from parity.training.vlm_trainer import find_tower

    marked = []
    for kind in ("vision", "audio"):
        try:
            tower = find_tower(model, kind)
        except ValueError:
            continue
        for m in tower.modules():
            setattr(m, attention.SP_DISABLED_ATTR, True)
        marked.append(kind)
    return marked


def _sum_gradients(module: FSDPModule) -> None:
    """Make this FSDP unit sum gradients over its mesh instead of averaging (see module docstring)."""
    module.set_gradient_divide_factor(1.0)
    force_sum = getattr(module, "set_force_sum_reduction_for_comms", None)
    if force_sum is not None:  # plain SUM collectives: no NCCL PreMulSum, and what gloo supports
        force_sum(True)


def parallelize(
    model: torch.nn.Module,
    meshes: Meshes,
    dims: ParallelDims,
    *,
    family: str,
    mp_policy: MixedPrecisionPolicy | None,
) -> dict[str, Any]:
    """Expert blocks over ep, FSDP2 (experts over efsdp, everything else over all ranks), sp hooks.

    Order matters: experts are cut to their ep block before FSDP sees them, and wrapped before
    :func:`parity.training.fsdp.apply_fsdp2` wraps their decoder layers (a unit excludes the parameters of
    sub-modules that are already units). Returns a description for run_meta.json.
    """
    info: dict[str, Any] = {"experts_modules": 0, "sp_disabled_towers": [], "lm_shard_hook": False}
    experts = experts_modules(model)
    if dims.ep > 1:
        if not experts:
            raise ValueError(f"ep={dims.ep} requested but {type(model).__name__} has no stacked experts")
        assert meshes.ep is not None
        for module in experts:
            moe.shard_experts_for_ep(module, meshes.ep_rank, dims.ep)
            kwargs: dict[str, Any] = {"mesh": meshes.ep["efsdp"], "reshard_after_forward": True}
            if mp_policy is not None:
                kwargs["mp_policy"] = mp_policy
            fully_shard(module, **kwargs)
        info["experts_modules"] = len(experts)
    apply_fsdp2(model, meshes.fsdp, mp_policy=mp_policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            _sum_gradients(module)
    if family != "text":
        info["sp_disabled_towers"] = _mark_towers_sp_disabled(model)
        lm = _find_language_model(model)
        lm.register_forward_pre_hook(LanguageModelShard(meshes.sp_rank, dims.sp), with_kwargs=True)
        info["lm_shard_hook"] = type(lm).__name__
    return info


# --------------------------------------------------------------------------------------------
# loss and gradient norm


def token_loss_sum(logits: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
    """Sum of per-token cross-entropies in fp32 (labels already shifted); padding/-100 ignored."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        shift_labels.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def total_grad_norm(parameters: list[torch.nn.Parameter], group: dist.ProcessGroup | None = None) -> float:
    """L2 norm of all gradients, as if the model were unsharded.

    Every gradient is an FSDP2 DTensor sharded (``Shard``) over its own mesh, and the meshes
    partition the world (dense: all ranks; experts: ``efsdp`` x distinct ep blocks), so every
    element lives on exactly one rank: summing local squares over the world counts each once. A
    replicated gradient (a parameter outside FSDP, or a ``Replicate`` placement) would be counted
    once per rank, so it is refused instead of silently inflating the norm.
    """
    device = next((p.device for p in parameters), torch.device("cpu"))
    square = torch.zeros((), dtype=torch.float64, device=device)
    for p in parameters:
        grad = p.grad
        if grad is None:
            continue
        if not isinstance(grad, DTensor):
            raise TypeError("a gradient is not an FSDP-sharded DTensor; it would be counted once per rank")
        if not all(placement.is_shard() for placement in grad.placements):
            raise TypeError(f"gradient with placements {grad.placements} is not purely sharded")
        square += grad.to_local().detach().double().pow(2).sum()
    dist.all_reduce(square, group=group)
    return math.sqrt(float(square))


def grad_fingerprints(
    model: torch.nn.Module, dims: ParallelDims, ep_rank: int
) -> dict[str, list[float] | None]:
    """Fingerprints of the full, unsharded gradients, the same numbers for every layout.

    Each rank projects its own shard onto the slice of the full tensor's sign vectors it holds (its
    global flat offset: the FSDP shard's row offset, plus the ep block's first expert for expert
    weights cut by ep), and one all-reduce adds the pieces: every element lives on exactly one rank
    (see :func:`total_grad_norm`). Comparable across layouts and with a single-process run.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from parity.harness.evidence import PROBES, finish, partial_fingerprint

    expert_owner = {id(p): m for m in experts_modules(model, dims.ep) for p in m.parameters(recurse=False)}
    names, parts = [], []
    device = next(model.parameters()).device
    for name, param in model.named_parameters():
        grad = param.grad
        names.append(name)
        if grad is None:
            parts.append(torch.full((PROBES + 1,), float("nan"), dtype=torch.float64, device=device))
            continue
        _, offset = compute_local_shape_and_global_offset(grad.shape, grad.device_mesh, grad.placements)
        full_shape, row = list(grad.shape), offset[0] if offset else 0
        owner = expert_owner.get(id(param))
        if owner is not None and dims.ep > 1:
            first, _count = moe.ep_expert_range(owner.num_experts, ep_rank, dims.ep)
            full_shape[0], row = owner.num_experts, row + first
        row_numel = math.prod(full_shape[1:]) if len(full_shape) > 1 else 1
        parts.append(partial_fingerprint(grad.to_local().detach(), row * row_numel).to(device))
    stacked = torch.stack(parts)
    dist.all_reduce(stacked)
    values = stacked.cpu().tolist()
    return {n: (None if math.isnan(v[0]) else finish(v)) for n, v in zip(names, values, strict=True)}


def rank_evidence(model: torch.nn.Module, micro: MicroBatch, meshes: Meshes, dims: ParallelDims) -> dict:
    """What this rank actually ran: its sequence slice, its expert block, its parameter shards."""
    local_len = int(micro.shift_labels.shape[-1])
    experts = experts_modules(model, dims.ep)
    block = None
    if experts:
        first, count = moe.ep_expert_range(experts[0].num_experts, meshes.ep_rank, dims.ep)
        block = [first, count]
    local_numel = 0
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        local_numel += local.numel()
    return {
        "rank": dist.get_rank(),
        "dp_rank": meshes.dp_rank,
        "sp_rank": meshes.sp_rank,
        "ep_rank": meshes.ep_rank,
        "local_seq_len": local_len,
        "expert_block": block,
        "local_param_numel": local_numel,
    }


# --------------------------------------------------------------------------------------------
# the loop


@dataclass
class StepLog:
    loss: list[float]
    grad_norm: list[float]
    step_s: list[float]
    #: step 0's full-gradient fingerprints and every rank's account of what it ran
    first_step_fingerprints: dict[str, list[float] | None] = field(default_factory=dict)
    ranks: list[dict[str, Any]] = field(default_factory=list)


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: SyntheticDataset,
    meshes: Meshes,
    dims: ParallelDims,
    *,
    family: str,
    steps: int,
    device: torch.device,
) -> StepLog:
    """``steps`` optimizer steps; per step: accumulate this rank's rows, grad norm, AdamW step."""
    log = StepLog([], [], [])
    params = [p for p in model.parameters() if p.requires_grad]
    micro = None
    for step in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        label_tokens = data.label_tokens(step)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for row in data.local_rows(step, meshes.dp_rank, dims.dp):
            micro = shard_micro_batch(row, family, meshes.sp_rank, dims.sp, device)
            with parallel_groups(sp=meshes.sp_group, ep=meshes.ep_group):
                logits = model(**micro.model_inputs, use_cache=False).logits
                summed = token_loss_sum(logits, micro.shift_labels)
                (summed / label_tokens).backward()
            loss_sum += summed.detach().double()
        if step == 0 and micro is not None:  # before the optimizer step: the gradients of step 0
            log.first_step_fingerprints = grad_fingerprints(model, dims, meshes.ep_rank)
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, rank_evidence(model, micro, meshes, dims))
            log.ranks = ranks
        grad_norm = total_grad_norm(params)
        optimizer.step()
        dist.all_reduce(loss_sum)
        log.loss.append(float(loss_sum) / label_tokens)
        log.grad_norm.append(grad_norm)
        log.step_s.append(round(time.perf_counter() - start, 4))
        if dist.get_rank() == 0:
            print(
                f"[parity.train] step {step + 1}/{steps} loss={log.loss[-1]:.8g} "
                f"grad_norm={grad_norm:.8g} ({log.step_s[-1]:.2f}s)",
                flush=True,
            )
    return log


def _resolved(trace: Any, cfg: TrainConfig, is_moe: bool) -> dict[str, Any]:
    resolved: dict[str, Any] = {
        "attn_implementation": trace.resolved("attention"),
        "kernel_provider": attention.kernel_providers_used().get(cfg.attn),
        "attention_calls": attention.kernel_call_counts().get(cfg.attn, 0),
    }
    if is_moe:
        resolved["moe_implementation"] = trace.resolved("experts")
        resolved["experts_provider"] = moe.kernel_providers_used().get(cfg.moe)
        resolved["experts_calls"] = moe.kernel_call_counts().get(cfg.moe, 0)
    return resolved


def train(cfg: TrainConfig, rank: int, world: int) -> dict[str, Any]:
    """Build, parallelize, train; return what rank 0 writes (the logs and run_meta)."""
    from parity.harness.backend_trace import trace_backends
    from parity.harness.fingerprint import fingerprint

    device = _device()
    dims = ParallelDims(world=world, sp=cfg.sp, ep=cfg.ep)
    meshes = build_meshes(dims, device.type)
    compute_dtype = cfg.compute_dtype
    if device.type == "cuda" and compute_dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: comparable with CPU runs
        torch.backends.cudnn.allow_tf32 = False

    config = toy.load_config(cfg.config)
    family = toy.model_family(config)
    is_moe = toy.is_moe(config)
    if cfg.ep > 1 and not is_moe:
        raise ValueError(f"--ep {cfg.ep} needs a MoE model; {cfg.config} has no routed experts")
    # fp32 master weights, CPU-seeded: identical for every layout and every rank
    model = toy.build_model(
        config,
        attn_implementation=cfg.attn,
        experts_implementation=cfg.moe if is_moe else None,
        dtype=torch.float32,
        device="cpu",
        seed=cfg.seed,
    )
    rows_per_step = cfg.rows_per_step or world
    data = SyntheticDataset(  # the model only lends its mRoPE index code (CPU tensors in, CPU out)
        config,
        rows_per_step=rows_per_step,
        steps_per_epoch=cfg.steps_per_epoch,
        seed=cfg.data_seed,
        model=model,
    )
    model.to(device)  # dtype unchanged: fp32 parameters and rotary buffers
    mp_policy = None
    if compute_dtype != torch.float32:
        mp_policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    layout = parallelize(model, meshes, dims, family=family, mp_policy=mp_policy)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=0.0, foreach=False, fused=False
    )  # one code path for every mesh mix (foreach kernels want one mesh per list)

    if cfg.attn_kernel:
        attention.use_kernels({cfg.attn: cfg.attn_kernel})
    attention.reset_kernel_log()
    moe.reset_kernel_log()
    start = time.perf_counter()
    with trace_backends() as trace:
        log = train_steps(model, optimizer, data, meshes, dims, family=family, steps=cfg.steps, device=device)
    elapsed = time.perf_counter() - start
    meta = {
        "train_config": asdict(cfg),
        "family": family,
        "is_moe": is_moe,
        "world": world,
        "layout": {"dp": dims.dp, "sp": dims.sp, "ep": dims.ep, "efsdp": dims.efsdp, **layout},
        "rows_per_step": rows_per_step,
        "label_tokens": [data.label_tokens(s) for s in range(cfg.steps)],
        "device": str(device),
        "mixed_precision": None if mp_policy is None else {"param": cfg.dtype, "reduce": "float32"},
        "resolved": _resolved(trace, cfg, is_moe),
        "step_s": log.step_s,
        "train_s": round(elapsed, 3),
        "first_step_fingerprints": log.first_step_fingerprints,
        "ranks": log.ranks,
        "first_step_label_tokens": data.label_tokens(0),
        "fingerprint": fingerprint(
            device=device, dtype=compute_dtype, seed=cfg.seed, config_hash=toy.config_hash(cfg.config)
        ),
    }
    return {"log_dict": {"loss": log.loss, "grad_norm": log.grad_norm}, "meta": meta}


def write_outputs(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOG_DICT).write_text(json.dumps(result["log_dict"], indent=2) + "\n")
    (out / RUN_META).write_text(json.dumps(result["meta"], indent=2, sort_keys=True) + "\n")


def read_plan(path: Path) -> tuple[list[TrainConfig], float | None]:
    """``--plan FILE``: ``{"runs": [TrainConfig fields, ...], "run_timeout_s": S}``.

    Several runs in one job share its start-up (torchrun, the ranks' torch and transformers imports,
    the rendezvous), which costs more than a toy training itself; each run is still a fresh model,
    fresh meshes and its own output folder, exactly as if started alone.
    """
    payload = json.loads(Path(path).read_text())
    runs = [TrainConfig(**run) for run in payload["runs"]]
    timeout = payload.get("run_timeout_s")
    return runs, float(timeout) if timeout else None


def _run_plan(runs: list[TrainConfig], rank: int, world: int, run_timeout_s: float | None) -> None:
    import faulthandler
    import gc

    for index, cfg in enumerate(runs):
        if run_timeout_s:  # a run that hangs outside a collective still ends, with its stack
            faulthandler.dump_traceback_later(run_timeout_s, exit=True)
        print(f"[parity.train] run {index + 1}/{len(runs)}: {cfg.config} sp={cfg.sp} ep={cfg.ep}", flush=True)
        start = time.perf_counter()
        result = train(cfg, rank, world)
        dist.barrier()  # every rank finished this run: only then does it count as done
        if rank == 0:
            result["meta"]["run_s"] = round(time.perf_counter() - start, 3)
            write_outputs(Path(cfg.out), result)
            print(f"[parity.train] wrote {Path(cfg.out) / LOG_DICT}", flush=True)
        del result
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    faulthandler.cancel_dump_traceback_later()


def main(argv: list[str] | None = None) -> int:
    from parity.harness.rank_setup import init_rank, shutdown

    plan_parser = argparse.ArgumentParser(add_help=False)
    plan_parser.add_argument("--plan", type=Path)
    known, rest = plan_parser.parse_known_args(argv)
    if known.plan is not None:
        runs, run_timeout_s = read_plan(known.plan)
    else:
        runs, run_timeout_s = [parse_args(argv)], None
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # several ranks per CPU host: oversubscribed threads make gloo crawl
    rank, world = init_rank()
    try:
        _run_plan(runs, rank, world, run_timeout_s)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
