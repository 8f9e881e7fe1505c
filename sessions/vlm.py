"""Session bodies of the two VLM suites: ``vlm_trainer`` (freeze_vit) and ``dummy_forward``.

Both run in the ``eager`` variant's env (torch + transformers, no kernels): freeze_vit is a CPU
check, and dummy_forward is a 2-rank FSDP2 job (NCCL when the machine has two GPUs, gloo on CPU
otherwise), so neither needs a flash-attn variant. Same flow as ``sessions.suites.run_patch``:
validate the model ids against the case registry, clear old records,
prepare and probe the env, run pytest on the selected node ids with a timeout, write the run
manifest, and let the merge (notified with ``--suite``) print the table.

Torch-free: runs in nox's own interpreter.
"""

from __future__ import annotations

import nox

from parity.results import registry
from sessions.suites import node_id, run_suite
from sessions.variants import ROOT

VLM_TRAINER_TEST = ROOT / "tests" / "models" / "test_vlm_trainer.py"
DUMMY_FORWARD_TEST = ROOT / "tests" / "distributed" / "test_dummy_forward.py"
#: Both suites run in the eager variant's env: they need torch and transformers, not flash kernels.
VARIANT = "eager"


def gradient_checkpointing_cases() -> list[str]:
    """Models whose registry entry asks for the activation-checkpointing dummy_forward job too."""
    return [case.id for case in registry.cases_for("dummy_forward") if case.gradient_checkpointing]


def run_vlm_trainer(session: nox.Session) -> None:
    """freeze_vit freezes exactly the vision tower (CPU); plus the text-only-model error case."""

    def node_ids(models: list[str]) -> list[str]:
        ids = [node_id(VLM_TRAINER_TEST, "test_freeze_vit", m) for m in models]
        return ids + [node_id(VLM_TRAINER_TEST, "test_text_only_model_has_no_vision_tower")]

    run_suite(session, "vlm_trainer", VARIANT, node_ids)


def run_dummy_forward(session: nox.Session) -> None:
    """Rank-asymmetric multimodal batches under FSDP2, per model, plus the negative control.

    Per model: the in-process hook check, the 2-rank job (all selected models share one launch),
    and the gradient-checkpointing job for the models listed for it. The negative control (hooks
    off, the job must fail) always runs: without it a pass could mean the check cannot fail.
    """
    with_gc = set(gradient_checkpointing_cases())

    def node_ids(models: list[str]) -> list[str]:
        ids = []
        for m in models:
            ids.append(node_id(DUMMY_FORWARD_TEST, "test_dummy_pass_reaches_what_a_real_batch_reaches", m))
            ids.append(node_id(DUMMY_FORWARD_TEST, "test_dummy_forward", m))
            if m in with_gc:
                ids.append(node_id(DUMMY_FORWARD_TEST, "test_dummy_forward_gradient_checkpointing", m))
        return ids + [node_id(DUMMY_FORWARD_TEST, "test_negative_control_without_dummy_forward_fails")]

    run_suite(session, "dummy_forward", VARIANT, node_ids)
