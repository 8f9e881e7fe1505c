"""Backend variants: which requirements each needs and what hardware it needs to run at all."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"
CONSTRAINTS = REQUIREMENTS / "constraints.txt"


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    needs_cuda: bool = False
    min_capability: tuple[int, int] | None = None
    #: Python modules the variant's kernels come from (checked inside the env before running).
    modules: tuple[str, ...] = ()

    @property
    def requirements(self) -> Path:
        return REQUIREMENTS / f"{self.name}.txt"


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("eager", "HF eager (reference) and sdpa attention; eager and grouped_mm experts"),
        Variant(
            "fa2",
            "HF flash_attention_2 from the flash-attn package",
            needs_cuda=True,
            modules=("flash_attn",),
        ),
        Variant(
            "fa3",
            "HF flash_attention_3 from the flash-attn-3 package (Hopper)",
            needs_cuda=True,
            min_capability=(9, 0),
            modules=("flash_attn_interface",),
        ),
    )
}
