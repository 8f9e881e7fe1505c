"""Per-tensor evidence: what one forward+backward produced, and how far it is from another run.

Two scalars (loss, total grad norm) cannot see most real bugs: swapping two experts' gradients
leaves both unchanged, a router without gradient moves the norm by a rounding error. So every mode
keeps, while it runs, the logits at the label positions and every parameter's gradient, and is
compared with the reference tensor by tensor (relative error ``|g - g_ref| / |g_ref|`` and max
abs). Full tensors never leave the process; the records carry numbers and a compact fingerprint per
tensor (its norm and its projections on a few fixed pseudo-random sign vectors), which a
permutation or a sign flip changes and which the torch-free merge can compare across environments.

The sign vectors are a hash of the element index (no RNG state, no device dependence), so a CPU run
and a GPU run of the same model project onto the same vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

#: Projections per tensor in a fingerprint (besides the norm).
PROBES = 3
_MULT = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)


def _signs(numel: int, probe: int, device: torch.device, start: int = 0) -> torch.Tensor:
    """±1 vector from an integer hash of the index: identical on every device and torch version.

    ``start`` is the global flat index of the first element, so a shard of a tensor projects onto
    its own slice of the full tensor's sign vector and the shards' projections add up.
    """
    idx = torch.arange(start, start + numel, device=device, dtype=torch.int64)
    h = (idx * _MULT[probe % len(_MULT)] + (probe + 1) * 0x27D4EB2F) & 0xFFFFFFFF
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
    h = h ^ (h >> 12)
    return ((h & 1) * 2 - 1).to(torch.float32)


#: Sign vectors kept for reuse, by (numel, probe, device, start), up to this many elements in all
#: (256 MB of fp32). A case fingerprints the same tensors in every mode (5 to 9 runs of one model),
#: and generating a vector costs about ten integer ops per element: on CPU that hash was a quarter
#: of a toy case's time. Tensors past the budget (real-width embeddings) are hashed each time.
SIGN_CACHE_ELEMENTS = 1 << 26
_SIGN_CACHE: dict[tuple[int, int, str, int], torch.Tensor] = {}


def _cached_signs(numel: int, probe: int, device: torch.device, start: int = 0) -> torch.Tensor:
    """:func:`_signs`, kept while the cache's element budget allows (oldest entries go first)."""
    key = (numel, probe, str(device), start)
    hit = _SIGN_CACHE.get(key)
    if hit is not None:
        return hit
    signs = _signs(numel, probe, device, start)
    if numel <= SIGN_CACHE_ELEMENTS:
        held = sum(v.numel() for v in _SIGN_CACHE.values())
        while _SIGN_CACHE and held + numel > SIGN_CACHE_ELEMENTS:
            held -= _SIGN_CACHE.pop(next(iter(_SIGN_CACHE))).numel()
        _SIGN_CACHE[key] = signs
    return signs


def fingerprint(t: torch.Tensor | None) -> list[float] | None:
    """[norm, p_1, ..., p_k]: norm plus projections on k fixed sign vectors (fp64 accumulate).

    One host transfer per tensor (the values stacked on the device), not one per value: on a GPU
    each ``float()`` is a synchronisation.
    """
    if t is None:
        return None
    flat = t.detach().reshape(-1).to(torch.float32)
    parts = [flat.double().norm()]
    for probe in range(PROBES):
        parts.append((flat * _cached_signs(flat.numel(), probe, flat.device)).double().sum())
    return [float(v) for v in torch.stack(parts).tolist()]


def partial_fingerprint(flat: torch.Tensor, start: int) -> torch.Tensor:
    """[sum of squares, p_1, ..., p_k] of a contiguous piece of a tensor at flat offset ``start``.

    Summing these over disjoint pieces (an all-reduce over the ranks holding the shards) gives the
    full tensor's fingerprint with the norm squared: the e2e layouts fingerprint sharded gradients.
    """
    flat = flat.reshape(-1).to(torch.float32)
    parts = [flat.double().pow(2).sum()]
    for probe in range(PROBES):
        parts.append((flat * _cached_signs(flat.numel(), probe, flat.device, start)).double().sum())
    return torch.stack(parts)


def finish(partial: list[float]) -> list[float]:
    """Turn a summed partial fingerprint into [norm, p_1, ..., p_k]."""
    return [math.sqrt(max(partial[0], 0.0)), *partial[1:]]


@dataclass
class Evidence:
    """The tensors of one run, kept in fp32 on the run's device while the case runs."""

    logits: torch.Tensor  # [N, V] at the label positions
    grads: dict[str, torch.Tensor | None] = field(default_factory=dict)

    def fingerprints(self) -> dict[str, Any]:
        return {
            "logits": fingerprint(self.logits),
            "grads": {name: fingerprint(g) for name, g in self.grads.items()},
        }


def collect(model: torch.nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> Evidence:
    """Logits where a label is predicted (HF's shift: position i predicts label i + 1) and grads."""
    shifted = labels[..., 1:]
    keep = shifted != -100
    picked = logits[..., :-1, :][keep].detach().to(torch.float32).clone()
    grads = {
        name: (p.grad.detach().to(torch.float32).clone() if p.grad is not None else None)
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    return Evidence(picked, grads)


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(|a - b| / |b|, max |a - b|, |b|), brought to the host in one transfer (one GPU sync, not three)."""
    diff = (a - b).double()
    stats = [b.double().norm(), diff.norm()]
    if diff.numel():
        stats.append(diff.abs().max())
    ref, norm, *peak = torch.stack(stats).tolist()
    rel = norm / ref if ref > 0 else (0.0 if norm == 0 else math.inf)
    return rel, peak[0] if peak else 0.0, ref


def compare(run: Evidence, ref: Evidence) -> dict[str, Any]:
    """Tensor-by-tensor distance of ``run`` from ``ref``, as JSON-ready numbers.

    ``tensors[name] = [relative error, max abs error, |g_ref|]`` for every gradient both have.

    A parameter whose gradient is None in one run and not in the other is listed (it is a failure
    whatever the numbers say: the backend cut the graph, or grew an edge the reference lacks).
    """
    out: dict[str, Any] = {"tensors": {}, "grad_missing": [], "grad_unexpected": []}
    if run.logits.shape == ref.logits.shape:
        rel, max_abs, norm = _rel(run.logits, ref.logits)
        out["logits"] = {"rel": rel, "max_abs": max_abs, "ref_norm": norm}
    else:
        out["logits"] = {
            "rel": math.inf,
            "max_abs": math.inf,
            "shape": [list(run.logits.shape), list(ref.logits.shape)],
        }
    for name, g_ref in ref.grads.items():
        g = run.grads.get(name)
        if name not in run.grads:
            out["grad_missing"].append(name)
        elif g is None and g_ref is not None:
            out["grad_missing"].append(name)
        elif g is not None and g_ref is None:
            out["grad_unexpected"].append(name)
        elif g is not None and g_ref is not None:
            if g.shape != g_ref.shape:
                out["tensors"][name] = [math.inf, math.inf, float(g_ref.double().norm())]
            else:
                out["tensors"][name] = list(_rel(g, g_ref))
    for name in run.grads:
        if name not in ref.grads:
            out["grad_unexpected"].append(name)
    return out
