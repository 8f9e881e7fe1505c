"""``freeze_vit`` freezes exactly the vision tower of every VLM / Omni toy model (CPU, no launch).

Builds the real toy model and calls ``VLMTrainer._freeze_model_module()`` directly, the way the
trainer does. It exists to catch module-path changes across transformers versions
(``model.visual`` vs ``model.model.visual``; the Omni thinker's ``visual`` in 5.17 vs
``model.visual`` in 5.24): a freeze that silently misses the tower would train it anyway.

Per model, for ``freeze_vit`` False then True on the same weights:

* False: every parameter is trainable, and a forward/backward on a multimodal batch gives the
  vision tower a non-zero gradient;
* True: the frozen parameters are exactly the tower's (their count equals the tower's parameter
  count, > 0), everything else is trainable, and after a forward/backward the tower has no gradient.

Freezing the tower must not change anything else: the loss and the gradient norm of the
non-vision parameters must be identical in both settings. Those two numbers are the metrics of the
``vlm_trainer`` records (modes ``freeze_vit_false`` = reference, ``freeze_vit_true``), so
``python -m parity.results.merge --suite vlm_trainer`` compares them; the counts ride along as extra metrics.

The cases are every VLM / Omni model of the case registry (``toy_config/registry.toml``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from parity import settings  # noqa: E402
from parity.harness import toy  # noqa: E402
from parity.harness.batches import packed_batch  # noqa: E402
from parity.harness.fingerprint import fingerprint  # noqa: E402
from parity.results import registry  # noqa: E402
from parity.results.records import ResultsWriter, make_record  # noqa: E402
from parity.training.vlm_trainer import VLMTrainer, VLMTrainingArguments, find_tower, locate_tower  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SUITE = "vlm_trainer"
SEED = 0
MODES = ["freeze_vit_false", "freeze_vit_true"]
# Freezing the ViT must leave every other gradient bit-identical; these leave room for nothing
# but reduction-order noise.
_RTOL = 1e-5
_ATOL = 1e-6

_FREEZE_VIT_VLM_CASES = [
    pytest.param(case.config_arg, id=case.id) for case in registry.cases_for("vlm_trainer")
]


@pytest.fixture
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return settings.get("PARITY_RESULTS") or tmp_path_factory.mktemp("results")


def _norm(grads: list[torch.Tensor]) -> float:
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([g.detach().float().norm() for g in grads])))


def _record(case_id: str, mode: str, metrics: dict, fp: dict, error: str | None = None) -> dict:
    return make_record(
        suite=SUITE,
        model=case_id,
        variant=settings.get("PARITY_VARIANT"),
        mode={"id": mode, "freeze_vit": mode == "freeze_vit_true"},
        status="ok" if error is None else "error",
        metrics=metrics,
        tolerance={"rtol": _RTOL, "atol": _ATOL},
        fingerprint=fp,
        error=error,
    )


@pytest.mark.parametrize("config_path", _FREEZE_VIT_VLM_CASES)
def test_freeze_vit(request: pytest.FixtureRequest, results_dir: Path, config_path: str):
    case_id = request.node.callspec.id
    config = toy.load_config(ROOT / config_path)
    model = toy.build_model(config, attn_implementation="eager", seed=SEED)
    location = locate_tower(model, "vision")
    tower_names = {f"{location.path}.{n}" for n, _ in location.tower.named_parameters()}
    tower_numel = sum(p.numel() for p in location.tower.parameters())
    print(f"{case_id}: {type(model).__name__}, vision tower at model.{location.path} ({tower_numel} params)")
    assert tower_numel > 0
    assert tower_names <= {n for n, _ in model.named_parameters()}, (
        "tower path does not match parameter names"
    )
    batch = packed_batch(config, model=model).inputs
    fp = fingerprint(
        device="cpu", dtype=torch.float32, seed=SEED, config_hash=toy.config_hash(ROOT / config_path)
    )
    writer = ResultsWriter(results_dir, SUITE, settings.get("PARITY_VARIANT"), case_id, MODES)

    observed = {}
    for freeze_vit, mode in zip((False, True), MODES, strict=True):
        trainer = VLMTrainer(model, VLMTrainingArguments(freeze_vit=freeze_vit))
        report = trainer._freeze_model_module()
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        if freeze_vit:
            assert frozen == tower_names, (
                f"frozen but not in the tower: {sorted(frozen - tower_names)[:5]}; "
                f"in the tower but trainable: {sorted(tower_names - frozen)[:5]}"
            )
            assert report.frozen_params == tower_numel
            assert report.frozen_paths == (location.path,)
        else:
            assert frozen == set(), f"freeze_vit=False left parameters frozen: {sorted(frozen)[:5]}"
            assert report.frozen_params == 0
        assert report.trainable_params == sum(p.numel() for p in model.parameters()) - report.frozen_params

        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        named = dict(model.named_parameters())
        vision_grads = [named[n].grad for n in tower_names if named[n].grad is not None]
        other_grads = [p.grad for n, p in named.items() if n not in tower_names and p.grad is not None]
        vision_norm = _norm(vision_grads)
        if freeze_vit:
            assert vision_grads == [], "a frozen vision tower received gradients"
        else:
            assert vision_norm > 0, "the trainable vision tower received no gradient"
        metrics = {
            "loss": float(loss.detach()),
            "grad_norm": _norm(other_grads),  # non-vision parameters: must not depend on freeze_vit
            "vision_grad_norm": vision_norm,
            "vision_params": tower_numel,
            "frozen_params": report.frozen_params,
        }
        assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
        writer.add(_record(case_id, mode, metrics, fp))
        observed[mode] = metrics
        print(f"{case_id} {mode}: {metrics}")

    ref, frozen_run = observed["freeze_vit_false"], observed["freeze_vit_true"]
    for key in ("loss", "grad_norm"):
        assert frozen_run[key] == pytest.approx(ref[key], rel=_RTOL, abs=_ATOL), (
            f"freezing the ViT changed {key}"
        )

    # Idempotent: asking for freeze_vit=False again makes everything trainable again.
    VLMTrainer(model, VLMTrainingArguments(freeze_vit=False))._freeze_model_module()
    assert all(p.requires_grad for p in model.parameters())


def test_text_only_model_has_no_vision_tower():
    model = toy.build_model(toy.load_config(ROOT / "toy_config/qwen3_toy"), attn_implementation="eager")
    trainer = VLMTrainer(model, VLMTrainingArguments(freeze_vit=True))
    with pytest.raises(ValueError, match=r"Qwen3ForCausalLM has no vision tower: tried model\.model\.visual"):
        trainer._freeze_model_module()
    with pytest.raises(ValueError, match="has no audio tower"):
        find_tower(model, "audio")


def test_freeze_audio_freezes_exactly_the_audio_tower():
    model = toy.build_model(
        toy.load_config(ROOT / "toy_config/qwen2_5_omni_toy"), attn_implementation="eager"
    )
    location = locate_tower(model, "audio")
    report = VLMTrainer(model, VLMTrainingArguments(freeze_audio=True))._freeze_model_module()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"{location.path}.{n}" for n, _ in location.tower.named_parameters()}
    assert report.frozen_paths == (location.path,)

    vlm = toy.build_model(toy.load_config(ROOT / "toy_config/qwen2_vl_toy"), attn_implementation="eager")
    with pytest.raises(ValueError, match="Qwen2VLForConditionalGeneration has no audio tower"):
        VLMTrainer(vlm, VLMTrainingArguments(freeze_audio=True))._freeze_model_module()


def test_find_tower_sees_through_wrappers():
    """DDP/FSDP1-style ``.module`` and torch.compile-style ``._orig_mod`` wrappers are unwrapped."""
    model = toy.build_model(toy.load_config(ROOT / "toy_config/qwen2_vl_toy"), attn_implementation="eager")

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module, attr: str) -> None:
            super().__init__()
            self.add_module(attr, inner)

    tower = find_tower(model)
    assert find_tower(Wrapper(model, "module")) is tower
    assert find_tower(Wrapper(Wrapper(model, "_orig_mod"), "module")) is tower
