"""What served each backend since the last reset: the evidence that a requested backend ran.

Both parity backends (attention, fused experts) keep one of these, so a caller can tell a backend
that ran from one that silently did not, and which kernel library served it.
"""

from __future__ import annotations

from collections import Counter


class KernelLog:
    """Per backend name: the kernel providers that served it and how many calls it took."""

    def __init__(self) -> None:
        self._providers: dict[str, set[str]] = {}
        self._calls: Counter[str] = Counter()

    def record(self, name: str, provider: str) -> None:
        self._providers.setdefault(name, set()).add(provider)
        self._calls[name] += 1

    def providers_used(self) -> dict[str, str]:
        """name -> provider(s) since the last reset, "+"-joined (two means a mixed run)."""
        return {name: "+".join(sorted(p)) for name, p in self._providers.items()}

    def call_counts(self) -> dict[str, int]:
        """name -> calls since the last reset (0 calls: it did not run)."""
        return dict(self._calls)

    def reset(self) -> None:
        self._providers.clear()
        self._calls.clear()
