"""The mode grid: which (modeling backend, attention, experts) combinations a variant runs.

Kept torch-free so the nox sessions and the merge can name modes without importing torch. Each
backend variant (one isolated environment) runs its own modes *plus* the reference mode, so every
environment carries an anchor that the merge can hold against the other environments' anchors.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Backend variants, in the order the sessions run them.
VARIANTS = ("eager", "fa2", "fa3")

#: HF attention implementations each variant exists to exercise (besides the eager reference).
HF_ATTENTION = {
    "eager": ("sdpa",),
    "fa2": ("flash_attention_2",),
    "fa3": ("flash_attention_3",),
}
#: HF experts implementations every MoE case runs (transformers' own loop and its grouped GEMM).
HF_EXPERTS = ("eager", "grouped_mm")

#: parity's own attention backends per variant. In the eager variant the FA2 backend takes PyTorch's
#: built-in varlen FA2 kernel (GPU only); in fa2/fa3 it takes the flash-attn packages' kernels.
PARITY_ATTENTION = {
    "eager": ("parity_sdpa_with_sp", "parity_flash_attention_2_with_sp"),
    "fa2": ("parity_flash_attention_2_with_sp",),
    "fa3": ("parity_flash_attention_3_with_sp",),
}
#: parity's MoE experts: transformers' eager loop under parity attention, and parity's fused kernel.
PARITY_EXPERTS = ("eager", "fused")
#: The kernel library that serves each parity attention backend in each variant. The harness
#: configures the backend with exactly these (``parity.backend.attention.use_kernels``), so what is
#: importable never decides: one interpreter holding flash_attn, flash_attn_interface and torch's
#: varlen kernel runs every variant with its own library. Backends a variant does not list keep the
#: backend's default (flash_attn for FA2).
VARIANT_KERNELS: dict[str, dict[str, str]] = {
    "eager": {"parity_sdpa_with_sp": "torch.sdpa", "parity_flash_attention_2_with_sp": "torch.varlen_attn"},
    "fa2": {"parity_sdpa_with_sp": "torch.sdpa", "parity_flash_attention_2_with_sp": "flash_attn"},
    "fa3": {"parity_sdpa_with_sp": "torch.sdpa", "parity_flash_attention_3_with_sp": "flash_attn_interface"},
}
#: The package that must serve transformers' own flash implementations in their variant. transformers
#: routes ``flash_attention_2/3`` to a hub kernel it downloads when the ``kernels`` package is installed
#: and the flash package is not; that is recorded as another provider ("hub:kernels-community/...")
#: and fails the provider check.
HF_KERNELS: dict[str, dict[str, str]] = {
    "fa2": {"flash_attention_2": "flash_attn"},
    "fa3": {"flash_attention_3": "flash_attn_interface"},
}
#: The kernel library each attention implementation must report in a variant; anything else
#: (an sdpa fallback, a hub kernel, the other flash package) means the backend under test did not run.
EXPECTED_PROVIDER: dict[tuple[str, str], str] = {
    (variant, attn): library
    for table in (VARIANT_KERNELS, HF_KERNELS)
    for variant, kernels in table.items()
    for attn, library in kernels.items()
}
#: Attention implementations whose kernels exist only on CUDA and only in half precision.
FLASH_ONLY = (
    "flash_attention_2",
    "flash_attention_3",
    "parity_flash_attention_2_with_sp",
    "parity_flash_attention_3_with_sp",
)

REFERENCE_ATTENTION = "eager"
REFERENCE_EXPERTS = "eager"
DTYPE_TAGS = {"float32": "fp32"}


@dataclass(frozen=True)
class ModelMode:
    """One way of running a model. Frozen so it can key dictionaries of results."""

    modeling_backend: str  # "hf" (transformers as shipped) or "parity" (parity's patched backend)
    attn_implementation: str
    moe_implementation: str | None = None  # None for dense models
    #: None: the run's dtype. "float32": the fp32 truth a half-precision run is measured against.
    dtype: str | None = None

    @property
    def id(self) -> str:
        parts = [self.modeling_backend, f"attn-{self.attn_implementation}"]
        if self.moe_implementation is not None:
            parts.append(f"moe-{self.moe_implementation}")
        if self.dtype is not None:
            parts.append(DTYPE_TAGS.get(self.dtype, self.dtype))
        return "_".join(parts)

    def __str__(self) -> str:
        return self.id

    def to_json(self) -> dict[str, str | None]:
        return {
            "id": self.id,
            "modeling_backend": self.modeling_backend,
            "attn_implementation": self.attn_implementation,
            "moe_implementation": self.moe_implementation,
            **({"dtype": self.dtype, "role": "truth"} if self.dtype is not None else {}),
        }


def reference_mode(is_moe: bool) -> ModelMode:
    """HF eager attention (and eager experts): the slowest, most literal implementation."""
    return ModelMode("hf", REFERENCE_ATTENTION, REFERENCE_EXPERTS if is_moe else None)


def truth_mode(is_moe: bool) -> ModelMode:
    """The reference mode in float32: what a half-precision run's errors are measured from."""
    return ModelMode("hf", REFERENCE_ATTENTION, REFERENCE_EXPERTS if is_moe else None, dtype="float32")


def hf_modes(variant: str, is_moe: bool) -> list[ModelMode]:
    """The reference first, then every HF mode this variant exists to exercise."""
    if variant not in HF_ATTENTION:
        raise ValueError(f"unknown backend variant {variant!r}; known: {', '.join(VARIANTS)}")
    attentions = (REFERENCE_ATTENTION, *HF_ATTENTION[variant])
    experts: tuple[str | None, ...] = HF_EXPERTS if is_moe else (None,)
    modes = [ModelMode("hf", attn, moe) for attn in attentions for moe in experts]
    ref = reference_mode(is_moe)
    return [ref] + [m for m in modes if m != ref]


def parity_modes(variant: str, is_moe: bool) -> list[ModelMode]:
    """parity's modeling backend: its attention backends x (for MoE) eager and fused experts."""
    if variant not in PARITY_ATTENTION:
        raise ValueError(f"unknown backend variant {variant!r}; known: {', '.join(VARIANTS)}")
    experts: tuple[str | None, ...] = PARITY_EXPERTS if is_moe else (None,)
    return [ModelMode("parity", attn, moe) for attn in PARITY_ATTENTION[variant] for moe in experts]


def expected_provider(variant: str, mode: ModelMode) -> str | None:
    """The kernel library that must serve this mode in this variant (None: no kernel to check)."""
    table = VARIANT_KERNELS if mode.modeling_backend == "parity" else HF_KERNELS
    return table.get(variant, {}).get(mode.attn_implementation)


def variant_kernels(variant: str) -> dict[str, str]:
    """parity backend -> kernel library for this variant (what the harness configures the backend with)."""
    if variant not in VARIANT_KERNELS:
        raise ValueError(f"unknown backend variant {variant!r}; known: {', '.join(VARIANTS)}")
    return dict(VARIANT_KERNELS[variant])


def mode_skip_reason(mode: ModelMode, device_type: str, dtype: str) -> str | None:
    """Why a mode cannot run on this device/dtype (recorded as a skipped mode, never dropped)."""
    if mode.attn_implementation in FLASH_ONLY:
        if device_type != "cuda":
            return f"{mode.attn_implementation} needs a CUDA device (running on {device_type})"
        if dtype not in ("bfloat16", "float16"):
            return f"{mode.attn_implementation} needs bfloat16/float16 (running in {dtype})"
    return None


# --------------------------------------------------------------------------------------------
# the VLM suites' per-model cases (read by the sessions and the checklist; torch-free)

#: The planted tower-lookup faults of tests/models/test_vlm_trainer.py (its _PLANTED keys).
VLM_PLANTED_LOOKUPS = ("partial_tower", "wrong_tower")
#: The asymmetric scenarios of the dummy_forward negative controls (keys of the worker's SCENARIOS).
DUMMY_FORWARD_SCENARIOS = ("all_vs_none", "iv_vs_i", "v_vs_none", "none_vs_all", "i_vs_a")
#: Scenarios that need an audio tower (Omni models only).
OMNI_ONLY_SCENARIOS = ("i_vs_a",)


def control_scenarios(family: str) -> tuple[str, ...]:
    """The dummy_forward negative-control scenarios a model of this family runs."""
    return tuple(s for s in DUMMY_FORWARD_SCENARIOS if family == "omni" or s not in OMNI_ONLY_SCENARIOS)
