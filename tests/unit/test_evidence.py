"""Per-tensor fingerprints: the values a record carries, with the sign-vector cache in front."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from parity.harness import evidence  # noqa: E402


def _uncached(t: torch.Tensor) -> list[float]:
    """The fingerprint as it was computed before the cache: a fresh hash and one float() per value."""
    flat = t.reshape(-1).to(torch.float32)
    values = [float(flat.double().norm())]
    for probe in range(evidence.PROBES):
        values.append(float((flat * evidence._signs(flat.numel(), probe, flat.device)).double().sum()))
    return values


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch):
    monkeypatch.setattr(evidence, "_SIGN_CACHE", {})


def test_cached_fingerprint_is_the_same_numbers():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=g) for shape in [(64, 32), (7,), (3, 5, 11), (64, 32)]]
    for t in tensors:
        assert evidence.fingerprint(t) == _uncached(t)  # exact: same ops, one transfer
    assert len(evidence._SIGN_CACHE) == 3 * evidence.PROBES  # the repeated shape was a hit
    for t in tensors:  # and again from the cache
        assert evidence.fingerprint(t) == _uncached(t)


def test_a_permutation_still_moves_the_fingerprint():
    """What the fingerprint exists for (swapped expert gradients) survives the cache."""
    t = torch.arange(12.0).reshape(3, 4)
    swapped = t[[1, 0, 2]]
    assert evidence.fingerprint(t)[0] == pytest.approx(evidence.fingerprint(swapped)[0])  # same norm
    assert evidence.fingerprint(t)[1:] != evidence.fingerprint(swapped)[1:]


def test_shards_add_up_to_the_whole_with_the_cache():
    """e2e sums partial fingerprints of shards (each with its own start); they must give the whole's."""
    t = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    whole = evidence.fingerprint(t)
    parts = evidence.partial_fingerprint(t[:600], 0) + evidence.partial_fingerprint(t[600:], 600)
    summed = evidence.finish([float(v) for v in parts])
    assert summed == pytest.approx(whole, rel=1e-12, abs=1e-9)


def test_the_cache_keeps_to_its_budget(monkeypatch):
    monkeypatch.setattr(evidence, "SIGN_CACHE_ELEMENTS", 250)
    for n in (40, 50, 60, 300):  # each tensor asks PROBES vectors of n; 300 is past the budget
        t = torch.ones(n) * n
        assert evidence.fingerprint(t) == _uncached(t)
        assert sum(v.numel() for v in evidence._SIGN_CACHE.values()) <= 250
    sizes = [key[0] for key in evidence._SIGN_CACHE]
    assert 300 not in sizes and 40 not in sizes  # never kept / evicted first
    assert sizes[-evidence.PROBES :] == [60] * evidence.PROBES  # the newest stay


def _rel_before(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """The per-tensor distance as computed before (three float() calls)."""
    diff = (a - b).double()
    ref = float(b.double().norm())
    norm = float(diff.norm())
    rel = norm / ref if ref > 0 else (0.0 if norm == 0 else float("inf"))
    return rel, float(diff.abs().max()) if diff.numel() else 0.0, ref


@pytest.mark.parametrize("shape", [(5, 7), (0,), (1,)])
def test_relative_distance_is_the_same_numbers(shape):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    assert evidence._rel(a, b) == _rel_before(a, b)
    assert evidence._rel(b, b) == _rel_before(b, b)  # identical: rel 0
    zero = torch.zeros(shape)
    assert evidence._rel(a, zero) == _rel_before(a, zero)  # |ref| 0: inf (or 0 when empty)
