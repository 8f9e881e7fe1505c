"""``freeze_vit`` freezes exactly the vision tower of every VLM / Omni toy model (CPU, no launch).

Builds the real toy model and calls ``VLMTrainer._freeze_model_module()`` directly, the way the
trainer does. It exists to catch module-path changes across transformers versions
(``model.visual`` vs ``model.model.visual``; the Omni thinker's ``visual`` in 5.17 vs
``model.visual`` in 5.24): a freeze that silently misses the tower would train it anyway.

The expected frozen set does **not** come from ``locate_tower`` (the lookup under test: a lookup
that finds the wrong module would agree with itself). It comes from the model's own description,
:func:`parity.harness.towers.expected_encoder`: the sub-model built from ``config.vision_config``
(``audio_config``), which must also be the one whose class name says encoder, hold exactly the
parameters named ``*.visual.*`` (``*.audio_tower.*``), and have the parameter count that a
formula computes from the config. ``test_planted_lookup_is_caught`` plants a lookup that returns
the language model, and one that returns only the patch embedding, and shows the check fails.

Per model, for ``freeze_vit`` False then True on the same weights:

* False: every parameter is trainable, and a forward/backward on a multimodal batch gives the
  vision tower a non-zero gradient;
* True: the frozen parameters are exactly the tower's (their count equals the config's count,
  > 0), everything else is trainable, and after a forward/backward the tower has no gradient.

Freezing the tower must not change anything else: the loss and the gradient norm of the
non-vision parameters must be identical in both settings. Those two numbers are the metrics of the
``vlm_trainer`` records (modes ``freeze_vit_false`` = reference, ``freeze_vit_true``), so
``python -m parity.results.merge --suite vlm_trainer`` compares them; the counts ride along as extra metrics.

Also: frozen-ness survives FSDP2 (``fully_shard`` in a 1-rank gloo group: flags kept per FSDP
unit, frozen parameters bit-identical after an AdamW step), and a PEFT-style model (frozen base,
trainable LoRA adapters) keeps its base frozen whatever ``freeze_vit`` says.

The cases are every VLM / Omni model of the case registry (``toy_config/registry.toml``).
``PARITY_FAULT=freeze_wrong_tower`` (or ``freeze_partial_tower``) plants the lookup faults into
the whole run: ``nox -s vlm_trainer`` must then fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from parity import settings  # noqa: E402
from parity.harness import faults, towers, toy  # noqa: E402
from parity.harness.batches import packed_batch  # noqa: E402
from parity.harness.fingerprint import fingerprint  # noqa: E402
from parity.results import registry  # noqa: E402
from parity.results.records import ResultsWriter, make_record  # noqa: E402
from parity.training import vlm_trainer  # noqa: E402
from parity.training.vlm_trainer import VLMTrainer, VLMTrainingArguments, find_tower  # noqa: E402

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
_OMNI_IDS = [c.id for c in registry.cases_for("vlm_trainer") if c.family == "omni"]
#: The planted lookups (test side, from parity.harness.faults): what each must make the check say.
_PLANTED = {
    "wrong_tower": (faults.wrong_tower_lookup, "frozen but not in the tower"),
    "partial_tower": (faults.partial_tower_lookup, "in the tower but trainable"),
}


@pytest.fixture(scope="module", autouse=True)
def _planted_from_environment() -> Iterator[None]:
    """``PARITY_FAULT`` names faults to plant into this whole run (the suite-level negative control)."""
    names = settings.get("PARITY_FAULT")
    if names:
        print(f"planted faults: {faults.install(names)}")
    yield


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


def _frozen(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def check_frozen_set(
    model: torch.nn.Module, args: VLMTrainingArguments, expected: dict[str, towers.Encoder]
) -> vlm_trainer.FreezeReport:
    """Freeze with ``args`` and hold the result against the model's own encoders (``expected``).

    ``expected`` maps each tower kind the arguments ask to freeze to its encoder; every other
    parameter must be trainable. Raises AssertionError naming what differs.
    """
    report = VLMTrainer(model, args)._freeze_model_module()
    want = set().union(*(enc.param_names for enc in expected.values()))
    frozen = _frozen(model)
    assert frozen == want, (
        f"frozen but not in the tower: {len(frozen - want)} e.g. {sorted(frozen - want)[:3]}; "
        f"in the tower but trainable: {len(want - frozen)} e.g. {sorted(want - frozen)[:3]}"
    )
    numel = sum(enc.numel_from_config for enc in expected.values())
    assert report.frozen_params == numel, f"frozen {report.frozen_params} elements, the config says {numel}"
    assert report.frozen_paths == tuple(enc.path for enc in expected.values()), report.frozen_paths
    assert report.trainable_params == sum(p.numel() for p in model.parameters()) - numel
    return report


def _vision(model: torch.nn.Module) -> towers.Encoder:
    encoders = towers.expected_encoders(model)
    assert "vision" in encoders, f"{type(model).__name__}: no vision encoder by its own description"
    return encoders["vision"]


@pytest.mark.parametrize("config_path", _FREEZE_VIT_VLM_CASES)
def test_freeze_vit(request: pytest.FixtureRequest, results_dir: Path, config_path: str):
    case_id = request.node.callspec.id
    config = toy.load_config(ROOT / config_path)
    model = toy.build_model(config, attn_implementation="eager", seed=SEED)
    vision = _vision(model)
    tower_names = vision.param_names
    print(
        f"{case_id}: {type(model).__name__}, expected vision tower model.{vision.path} "
        f"({type(vision.module).__name__}, {vision.numel} params = {vision.numel_from_config} from "
        f"{config.vision_config.model_type}; {len(tower_names)} tensors named *.visual.*)"
    )
    assert vision.numel > 0
    batch = packed_batch(config, model=model).inputs
    fp = fingerprint(
        device="cpu", dtype=torch.float32, seed=SEED, config_hash=toy.config_hash(ROOT / config_path)
    )
    writer = ResultsWriter(results_dir, SUITE, settings.get("PARITY_VARIANT"), case_id, MODES)

    observed = {}
    for freeze_vit, mode in zip((False, True), MODES, strict=True):
        args = VLMTrainingArguments(freeze_vit=freeze_vit)
        report = check_frozen_set(model, args, {"vision": vision} if freeze_vit else {})

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
            "vision_params": vision.numel_from_config,
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


@pytest.mark.parametrize("fault", sorted(_PLANTED))
@pytest.mark.parametrize("config_path", _FREEZE_VIT_VLM_CASES)
def test_planted_lookup_is_caught(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, config_path: str, fault: str
):
    """Negative control: a lookup returning the wrong module, or part of the tower, fails the check."""
    case_id = Path(config_path).parent.name.removesuffix("_toy")
    model = toy.build_model(toy.load_config(ROOT / config_path), attn_implementation="eager", seed=SEED)
    expected = {"vision": _vision(model)}
    check_frozen_set(model, VLMTrainingArguments(freeze_vit=True), expected)  # clean lookup: passes
    VLMTrainer(model, VLMTrainingArguments())._freeze_model_module()

    wrap, message = _PLANTED[fault]
    monkeypatch.setattr(vlm_trainer, "locate_tower", wrap(vlm_trainer.locate_tower))
    planted = vlm_trainer.locate_tower(model, "vision")
    with pytest.raises(AssertionError, match=message) as caught:
        check_frozen_set(model, VLMTrainingArguments(freeze_vit=True), expected)
    print(f"{case_id} planted {fault} (lookup -> model.{planted.path}): {caught.value}".splitlines()[0])


def _omni_model() -> torch.nn.Module:
    return toy.build_model(toy.load_config(ROOT / "toy_config/qwen2_5_omni_toy"), attn_implementation="eager")


def test_freeze_audio_freezes_exactly_the_audio_tower():
    model = _omni_model()
    encoders = towers.expected_encoders(model)
    check_frozen_set(model, VLMTrainingArguments(freeze_audio=True), {"audio": encoders["audio"]})
    check_frozen_set(model, VLMTrainingArguments(freeze_vit=True, freeze_audio=True), encoders)
    check_frozen_set(model, VLMTrainingArguments(), {})

    vlm = toy.build_model(toy.load_config(ROOT / "toy_config/qwen2_vl_toy"), attn_implementation="eager")
    with pytest.raises(ValueError, match="Qwen2VLForConditionalGeneration has no audio tower"):
        VLMTrainer(vlm, VLMTrainingArguments(freeze_audio=True))._freeze_model_module()


def test_planted_audio_lookup_is_caught(monkeypatch: pytest.MonkeyPatch):
    model = _omni_model()
    audio = towers.expected_encoders(model)["audio"]
    for wrap, message in _PLANTED.values():
        VLMTrainer(model, VLMTrainingArguments())._freeze_model_module()
        with monkeypatch.context() as m:
            m.setattr(vlm_trainer, "locate_tower", wrap(vlm_trainer.locate_tower))
            with pytest.raises(AssertionError, match=message):
                check_frozen_set(model, VLMTrainingArguments(freeze_audio=True), {"audio": audio})


def test_text_only_model_has_no_vision_tower():
    model = toy.build_model(toy.load_config(ROOT / "toy_config/qwen3_toy"), attn_implementation="eager")
    assert towers.expected_encoders(model) == {}
    trainer = VLMTrainer(model, VLMTrainingArguments(freeze_vit=True))
    with pytest.raises(ValueError, match=r"Qwen3ForCausalLM has no vision tower: tried model\.model\.visual"):
        trainer._freeze_model_module()
    with pytest.raises(ValueError, match="has no audio tower"):
        find_tower(model, "audio")


def test_find_tower_sees_through_wrappers():
    """DDP/FSDP1-style ``.module`` and torch.compile-style ``._orig_mod`` wrappers are unwrapped."""
    model = toy.build_model(toy.load_config(ROOT / "toy_config/qwen2_vl_toy"), attn_implementation="eager")

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module, attr: str) -> None:
            super().__init__()
            self.add_module(attr, inner)

    tower = find_tower(model)
    assert tower is _vision(model).module
    assert find_tower(Wrapper(model, "module")) is tower
    assert find_tower(Wrapper(Wrapper(model, "_orig_mod"), "module")) is tower


# --------------------------------------------------------------------------------------------
# PEFT: a frozen base stays frozen


class LoraLinear(torch.nn.Module):
    """``peft.tuners.lora.Linear`` in miniature: the frozen base layer plus a trainable B @ A."""

    def __init__(self, base_layer: torch.nn.Linear, rank: int = 4) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = torch.nn.Linear(base_layer.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base_layer.out_features, bias=False)
        with torch.no_grad():  # B != 0 (unlike PEFT's init) so A gets a gradient at step 0 too
            self.lora_A.weight.normal_(std=0.02)
            self.lora_B.weight.normal_(std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


class PeftStyleModel(torch.nn.Module):
    """``peft.PeftModel``'s shape: ``.base_model.model`` is the HF model, ``get_base_model()`` returns it.

    Like ``get_peft_model``: every base parameter frozen, LoRA adapters injected into the
    ``target`` linear layers (text attention and the vision/audio towers' attention) and trainable.
    """

    TARGETS = ("q_proj", "v_proj", "qkv", "q", "v")

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.base_model = torch.nn.Module()
        self.base_model.model = model
        model.requires_grad_(False)
        for name, module in list(model.named_modules()):
            parent_name, _, attr = name.rpartition(".")
            if attr in self.TARGETS and isinstance(module, torch.nn.Linear):
                model.get_submodule(parent_name).add_module(attr, LoraLinear(module))

    def get_base_model(self) -> torch.nn.Module:
        return self.base_model.model

    def forward(self, **kwargs: torch.Tensor) -> object:
        return self.base_model.model(**kwargs)


def _under(names: set[str], path: str) -> set[str]:
    return {n for n in names if n.startswith(path + ".")}


def check_peft_freeze(config_path: str) -> dict[str, int]:
    """freeze_vit False/True/False on a PEFT-style model: the base never becomes trainable."""
    config = toy.load_config(ROOT / config_path)
    inner = toy.build_model(config, attn_implementation="eager", seed=SEED)
    vision = _vision(inner)  # before the adapters: the count formula sees the plain tower
    peft_model = PeftStyleModel(inner)
    prefix = "base_model.model."
    tower = _under({n for n, _ in peft_model.named_parameters()}, prefix + vision.path)
    adapters = {n for n, _ in peft_model.named_parameters() if ".lora_" in n}
    base = {n for n, _ in peft_model.named_parameters()} - adapters
    assert adapters & tower and adapters - tower, "adapters must sit inside and outside the tower"
    arrival = _frozen(peft_model)
    assert arrival == base

    counts = {}
    for freeze_vit, want in ((False, base), (True, base | (adapters & tower)), (False, base)):
        report = VLMTrainer(peft_model, VLMTrainingArguments(freeze_vit=freeze_vit))._freeze_model_module()
        frozen = _frozen(peft_model)
        assert frozen == want, (
            f"freeze_vit={freeze_vit}: base parameters made trainable: {len(base - frozen)} "
            f"e.g. {sorted(base - frozen)[:3]}; wrongly frozen: {sorted(frozen - want)[:3]}"
        )
        counts[f"freeze_vit_{freeze_vit}_trainable"] = report.trainable_params
        counts["kept_frozen_params"] = report.kept_frozen_params

    VLMTrainer(peft_model, VLMTrainingArguments(freeze_vit=True))._freeze_model_module()
    batch = packed_batch(config, seq_lens=(64,), model=inner).inputs
    peft_model(**batch).loss.backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad == adapters - tower, (
        f"gradients outside the trainable adapters: {sorted(with_grad - (adapters - tower))[:3]}; "
        f"adapters without: {sorted((adapters - tower) - with_grad)[:3]}"
    )
    counts.update(base=len(base), adapters=len(adapters), tower_adapters=len(adapters & tower))
    return counts


@pytest.mark.parametrize("config_path", ["toy_config/qwen2_5_vl_toy", "toy_config/qwen3_omni_moe_toy"])
def test_peft_base_stays_frozen(config_path: str):
    counts = check_peft_freeze(config_path)
    print(f"{config_path}: base and in-tower adapters frozen, other adapters trainable: {counts}")


def test_peft_control_blanket_unfreeze_is_caught(monkeypatch: pytest.MonkeyPatch):
    """Negative control: the old ``model.requires_grad_(True)`` first line fails the PEFT check."""
    original = VLMTrainer._freeze_model_module

    def unfreeze_everything_first(self: VLMTrainer) -> vlm_trainer.FreezeReport:
        self.model.requires_grad_(True)
        return original(self)

    monkeypatch.setattr(VLMTrainer, "_freeze_model_module", unfreeze_everything_first)
    with pytest.raises(AssertionError, match="base parameters made trainable") as caught:
        check_peft_freeze("toy_config/qwen2_5_vl_toy")
    print(f"planted blanket unfreeze: {caught.value}".splitlines()[0])


# --------------------------------------------------------------------------------------------
# FSDP2: frozen-ness survives fully_shard


@pytest.fixture(scope="module")
def gloo_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A 1-rank gloo process group in this process (FSDP2 needs one; CPU, no launch)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def check_fsdp2_freeze(
    config_path: str,
    group: object,
    *,
    before_shard: Callable[[torch.nn.Module], None] | None = None,
    after_shard: Callable[[torch.nn.Module], None] | None = None,
) -> dict[str, object]:
    """Freeze, ``fully_shard`` (one unit per block), one AdamW step: frozen parameters do not move.

    Checks after wrapping: every parameter is a DTensor with the ``requires_grad`` the expectation
    gives, and each FSDP unit's own parameters are all frozen, all trainable, or (the root, which
    holds the patch embedding and mergers beside the embeddings) split exactly as expected. After
    the step: frozen parameters bit-identical and without gradient, trainable ones moved.
    ``before_shard`` / ``after_shard`` let a negative control plant a bug around the sharding.
    """
    from torch.distributed.fsdp import FSDPModule

    from parity.training.fsdp import apply_fsdp2

    config = toy.load_config(ROOT / config_path)
    model = toy.build_model(config, attn_implementation="eager", seed=SEED)
    encoders = towers.expected_encoders(model)
    want = set().union(*(e.param_names for e in encoders.values()))
    batch = packed_batch(config, seq_lens=(64,), model=model).inputs  # one sample: the step is the point
    args = VLMTrainingArguments(freeze_vit=True, freeze_audio="audio" in encoders)
    VLMTrainer(model, args)._freeze_model_module()
    if before_shard is not None:
        before_shard(model)
    apply_fsdp2(model, group)
    if after_shard is not None:
        after_shard(model)

    named = dict(model.named_parameters())
    assert all(type(p).__name__ == "DTensor" or hasattr(p, "full_tensor") for p in named.values())
    frozen = {n for n, p in named.items() if not p.requires_grad}
    assert frozen == want, (
        f"after fully_shard: frozen but not in a tower {sorted(frozen - want)[:3]}; "
        f"in a tower but trainable {sorted(want - frozen)[:3]}"
    )
    units = {}
    unit_names = [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]
    for unit in unit_names:
        own = [
            n for n in named
            if (not unit or n.startswith(unit + "."))
            and not any(o != unit and o.startswith(unit) and n.startswith(o + ".") for o in unit_names)
        ]  # fmt: skip
        n_frozen = sum(n in want for n in own)
        units[unit or "<root>"] = (n_frozen, len(own) - n_frozen)
        if unit and any(unit == e.path or unit.startswith(e.path + ".") for e in encoders.values()):
            assert n_frozen == len(own), f"FSDP unit {unit} (inside a tower) has trainable parameters"
    before = {n: _full(p) for n, p in named.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # frozen ones included on purpose
    model(**batch).loss.backward()
    with_grad = sorted(n for n in want if named[n].grad is not None)
    assert not with_grad, f"frozen parameters with a gradient: {with_grad[:3]}"
    optimizer.step()
    moved = {n for n, p in named.items() if not torch.equal(_full(p), before[n])}
    assert not moved & want, f"frozen parameters changed by the step: {sorted(moved & want)[:3]}"
    stepped = {n for n, p in named.items() if p.grad is not None}
    assert moved == stepped, f"parameters with a gradient that did not move: {sorted(stepped - moved)[:3]}"
    return {
        "frozen_tensors": len(want),
        "trainable_tensors": len(named) - len(want),
        "frozen_elements": sum(before[n].numel() for n in want),
        "moved_tensors": len(moved),
        "units": units,
    }


@pytest.mark.parametrize("config_path", _FREEZE_VIT_VLM_CASES)
def test_freeze_survives_fsdp2(request: pytest.FixtureRequest, gloo_group: object, config_path: str):
    result = check_fsdp2_freeze(config_path, gloo_group)
    units = result.pop("units")
    mixed = {u: c for u, c in units.items() if c[0] and c[1]}
    print(
        f"{request.node.callspec.id}: {len(units)} FSDP units, (frozen, trainable) tensors of the mixed ones "
        f"{mixed}; {result}"
    )


def test_fsdp2_control_freeze_of_stale_parameters_is_caught(gloo_group: object):
    """Negative control: freezing after ``fully_shard``, through Parameter objects collected before it.

    FSDP2 replaces every parameter by a sharded one, so the old objects are frozen and the model's
    tower stays trainable: the check after wrapping (and the step) must catch it.
    """
    stale: list[torch.nn.Parameter] = []

    def unfreeze_and_collect(model: torch.nn.Module) -> None:
        stale.extend(find_tower(model).parameters())
        model.requires_grad_(True)

    def freeze_stale(model: torch.nn.Module) -> None:
        for param in stale:
            param.requires_grad_(False)

    with pytest.raises(AssertionError, match="in a tower but trainable") as caught:
        check_fsdp2_freeze(
            "toy_config/qwen2_5_vl_toy",
            gloo_group,
            before_shard=unfreeze_and_collect,
            after_shard=freeze_stale,
        )
    print(f"planted freeze of stale parameters: {caught.value}".splitlines()[0])
