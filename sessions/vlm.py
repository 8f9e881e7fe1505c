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
from parity.results.modes import DUMMY_FORWARD_SCENARIOS, VLM_PLANTED_LOOKUPS, control_scenarios
from sessions.suites import node_id, run_suite
from sessions.variants import ROOT

VLM_TRAINER_TEST = ROOT / "tests" / "models" / "test_vlm_trainer.py"
DUMMY_FORWARD_TEST = ROOT / "tests" / "distributed" / "test_dummy_forward.py"
#: Both suites run in the eager variant's env: they need torch and transformers, not flash kernels.
VARIANT = "eager"
PLANTED = VLM_PLANTED_LOOKUPS


def gradient_checkpointing_cases() -> list[str]:
    """Models whose registry entry asks for the activation-checkpointing dummy_forward job too."""
    return [case.id for case in registry.cases_for("dummy_forward") if case.gradient_checkpointing]


CONTROL_SCENARIOS = DUMMY_FORWARD_SCENARIOS


def vlm_trainer_node_ids(models: list[str]) -> list[str]:
    """The vlm_trainer tests of these models (and the model-independent ones)."""
    ids = []
    for m in models:
        ids.append(node_id(VLM_TRAINER_TEST, "test_freeze_vit", m))
        ids += [node_id(VLM_TRAINER_TEST, "test_planted_lookup_is_caught", f"{m}-{f}") for f in PLANTED]
        ids.append(node_id(VLM_TRAINER_TEST, "test_freeze_survives_fsdp2", m))
    fixed = (
        "test_freeze_audio_freezes_exactly_the_audio_tower",
        "test_planted_audio_lookup_is_caught",
        "test_peft_base_stays_frozen",
        "test_peft_control_blanket_unfreeze_is_caught",
        "test_fsdp2_control_freeze_of_stale_parameters_is_caught",
        "test_text_only_model_has_no_vision_tower",
        "test_find_tower_sees_through_wrappers",
    )
    return ids + [node_id(VLM_TRAINER_TEST, name) for name in fixed]


def dummy_forward_node_ids(models: list[str]) -> list[str]:
    """The dummy_forward tests of these models, plus the launch-level negative control."""
    with_gc = set(gradient_checkpointing_cases())
    family = {case.id: case.family for case in registry.cases_for("dummy_forward")}
    ids = []
    for m in models:
        ids.append(node_id(DUMMY_FORWARD_TEST, "test_dummy_pass_reaches_what_a_real_batch_reaches", m))
        ids.append(node_id(DUMMY_FORWARD_TEST, "test_dummy_forward", m))
        if m in with_gc:
            ids.append(node_id(DUMMY_FORWARD_TEST, "test_dummy_forward_gradient_checkpointing", m))
        for scenario in control_scenarios(family.get(m, "vlm")):
            ids.append(node_id(DUMMY_FORWARD_TEST, "test_negative_control", f"{m}-{scenario}"))
    return ids + [node_id(DUMMY_FORWARD_TEST, "test_negative_control_without_dummy_forward_fails")]


def run_vlm_trainer(session: nox.Session) -> None:
    """freeze_vit freezes exactly the model's own vision tower (CPU), with its negative controls.

    Per model: the freeze check, the planted wrong-tower and partial-tower lookups (must be
    caught), the same freeze under FSDP2; plus the audio tower, the PEFT case, the text-only-model
    error and the wrapper unwrapping.
    """
    run_suite(session, "vlm_trainer", VARIANT, vlm_trainer_node_ids)


def run_dummy_forward(session: nox.Session) -> None:
    """Rank-asymmetric multimodal batches under FSDP2, per model, plus the negative controls.

    Per model: the in-process hook check, the 2-rank job with the asymmetric matrix (all selected
    models share one launch), the gradient-checkpointing job for the models listed for it, and
    the model's negative controls (hook off, one per asymmetric scenario, in the same launch). The
    launch-level negative control (the whole job with the hook off must fail) always runs: without
    it a pass could mean the check cannot fail.
    """
    run_suite(session, "dummy_forward", VARIANT, dummy_forward_node_ids)
