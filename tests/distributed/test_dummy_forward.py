"""Rank-asymmetric multimodal batches under FSDP2 finish, with the numbers of an unsharded run.

2-rank ``torchrun`` jobs (gloo on CPU, NCCL on GPUs) through ``parity.harness.launch`` (watchdog, per-rank
stacks on a hang, no leftover process). The worker (``parity.harness.checks.dummy_forward_check``)
installs ``parity.training.dummy_forward.enable_dummy_forward``, shards with FSDP2 and trains one
SGD step per step of the case's schedule. ``test_dummy_forward`` runs the ``matrix`` schedule:
two steps where rank 0 gets images + video (+ audio for Omni) and rank 1 text only, then
images+video vs images only (rank 0 enters the vision tower twice, rank 1 once), video only vs
nothing, nothing vs everything, and for Omni images vs audio. Every step must match an unsharded,
hook-free reference (per-rank losses, global and vision grad norms), and after the hook every
rank must have entered each encoder equally often, once per slot, with dummy passes exactly where
its batch has no input (counts recorded per rank and step).

The batch function of a case is how rank 0's multimodal batch is built. It runs in the worker
processes, so it travels by name: ``partial(_vlm_batch, patch_size=P)`` becomes
``batch=vlm_batch,patch_size=P`` (the worker checks P against the config). The functions are
imported from the worker module, so the names here are the real builders, not stand-ins.

One job for all selected cases: process start-up and the first transformers import cost more
than a toy case itself (about 15 s vs 5 s on a 2-core CPU), so the selected cases of this module
(``-k`` works as usual) share one launch, started by the first test that needs it; every test
still asserts on its own case's result file. Each case runs under its own deadline inside the
ranks (CASE_TIMEOUT_S: stack dump, then exit), so one hang fails fast and names its case; cases
after a crash report "not reached".

Negative controls, same job: ``test_negative_control[<model>-<scenario>]`` runs one asymmetric
step with the hook off, in a pair of child processes per control
(``parity.harness.checks.dummy_forward_controls``: gloo aborts the process on a size mismatch, so
a control cannot share a process with the next one). It must end in a collective mismatch (gloo's
"Received data size doesn't match expected size", with the two units' shard sizes) or a
collective timeout, on the rank and in the FSDP unit predicted from the model's structure; any
other end is a tool error and fails the control. Every model runs every scenario of its family;
a control costs about a second (the children fork from a forkserver that has torch, transformers
and the modeling modules imported).

``test_negative_control_without_dummy_forward_fails`` is the launch-level control: the basic job
of qwen2_5_vl with ``PARITY_DISABLE_DUMMY_FORWARD=1``. The job must crash on the same predicted
mismatch (rank, unit, sizes: read from the ranks' logs), fast, with every rank's stack, and leave
no process behind.

Hang defences, innermost first: process-group timeout PG_TIMEOUT_S (a stuck collective raises),
per-case rank deadline CASE_TIMEOUT_S, launcher watchdog (stacks of every rank, then kill the
whole tree), pytest-timeout (thread method) as the backstop. PARITY_DUMMY_FORWARD_CASE_TIMEOUT_S
scales the per-case numbers on slow machines.

The cases are the VLM and Omni models of the case registry (``toy_config/registry.toml``), with the
patch size read from their configs; run one with ``nox -s dummy_forward -- <id>``.

The in-process tests at the end (no torchrun) check the hook itself on every case: on a text-only
batch, exactly the parameters a real multimodal batch reaches get a gradient, and loss and
gradients are bit-identical to the model without hooks.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from parity import settings  # noqa: E402
from parity.harness.checks import dummy_forward_check as worker  # noqa: E402
from parity.harness.checks import dummy_forward_controls as controls  # noqa: E402
from parity.harness.checks.dummy_forward_check import enable_activation_checkpointing  # noqa: E402
from parity.harness.checks.dummy_forward_check import omni_batch as _omni_batch  # noqa: E402
from parity.harness.checks.dummy_forward_check import text_batch as _text_batch  # noqa: E402
from parity.harness.checks.dummy_forward_check import vlm_batch as _vlm_batch  # noqa: E402
from parity.harness.launch import ENV_PG_TIMEOUT, LaunchResult, launch  # noqa: E402
from parity.results import registry  # noqa: E402
from parity.results.records import ResultsWriter, make_record  # noqa: E402

NPROC = 2
STEPS = 2  # of the basic schedule (gradient checkpointing cases, launch-level control)
CASE_TIMEOUT_S = settings.get("PARITY_DUMMY_FORWARD_CASE_TIMEOUT_S") or 75.0
#: The worker uses NCCL when every rank has a GPU (parity.harness.checks.dummy_forward_check._use_gpus).
_ON_GPUS = torch.cuda.device_count() >= 2
# The collective layer fires first, with a real error. On GPUs rank 1's longest legitimate wait (rank
# 0's unsharded reference) is about a second, and the negative control's NCCL hang is reported only
# after this timeout: 10 s there (the control took 85 s at 37.5 s). gloo on a loaded 2-core CPU needs
# the slack; its negative control fails on a size mismatch long before it anyway.
PG_TIMEOUT_S = min(10.0 if _ON_GPUS else 40.0, 0.5 * CASE_TIMEOUT_S)
STARTUP_S = 60.0  # torchrun + imports of both ranks, before the first case starts
#: What each negative control must report within (start of the control to its verdict), CPU.
CONTROL_REPORT_S = 60.0


def launch_timeout(n_cases: int) -> float:
    """Watchdog of a job running ``n_cases``: start-up plus every case's own deadline."""
    return STARTUP_S + CASE_TIMEOUT_S * n_cases


SUITE = "dummy_forward"
EXPECTED_MODES = ["reference", "fsdp2_asym"]
ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
MODULE = "parity.harness.checks.dummy_forward_check"


def _cases(family: str, batch: Callable) -> list:
    """The registry's VLM (or Omni) models, in the seed's shape: id, toy dir, batch builder."""
    return [
        pytest.param(
            c.id, c.config_arg.removesuffix("/config.json"), partial(batch, patch_size=c.patch_size), id=c.id
        )
        for c in registry.cases_for("dummy_forward")
        if c.family == family
    ]


_vlm_cases = _cases("vlm", _vlm_batch)
_omni_cases = _cases("omni", _omni_batch)

# Also with gradient checkpointing on (registry: gradient_checkpointing = true).
_GRADIENT_CHECKPOINTING_IDS = [c.id for c in registry.cases_for("dummy_forward") if c.gradient_checkpointing]
_NEGATIVE_CONTROL_ID = "qwen2_5_vl"
_ALL_CASES = _vlm_cases + _omni_cases
_FAMILY = {c.id: c.family for c in registry.cases_for("dummy_forward")}
_CONTROLS = [
    pytest.param(p.id, scenario, id=f"{p.id}-{scenario}")
    for p in _ALL_CASES
    for scenario in worker.SCENARIOS
    if _FAMILY[p.id] == "omni" or scenario not in worker._OMNI_ONLY
]
# pytest-timeout counts fixture time: the first test pays for the whole shared job.
TEST_TIMEOUT_S = launch_timeout(len(_ALL_CASES) + len(_GRADIENT_CHECKPOINTING_IDS) + len(_CONTROLS)) + 60


def _case(case_id: str) -> tuple:
    return next(p.values for p in _ALL_CASES if p.id == case_id)


def _spec(key: str, case_id: str, *, gc: bool, schedule: str = "basic") -> str:
    """``--case`` value of the worker: the batch function travels by name and keyword arguments."""
    _, config_path, batch_fn = _case(case_id)
    spec = (
        f"id={key},config={ROOT / config_path},batch={batch_fn.func.__name__},"
        f"patch_size={batch_fn.keywords['patch_size']},schedule={schedule}"
    )
    return spec + (",gc=1" if gc else "")


def _control_spec(key: str, case_id: str, scenario: str) -> str:
    _, config_path, batch_fn = _case(case_id)
    return (
        f"id={key},config={ROOT / config_path},batch={batch_fn.func.__name__},"
        f"patch_size={batch_fn.keywords['patch_size']},scenario={scenario}"
    )


def _key(case_id: str, gc: bool) -> str:
    return f"{case_id}_gc" if gc else case_id


def _control_key(case_id: str, scenario: str) -> str:
    return f"control_{case_id}_{scenario}"


@dataclass(frozen=True)
class Planned:
    """One entry of the shared job: a case (``scenario`` None) or a negative control."""

    key: str
    case_id: str
    gc: bool = False
    schedule: str = "basic"
    scenario: str | None = None


def _launch(root: Path, planned: list[Planned], env: dict[str, str] | None = None) -> LaunchResult:
    pythonpath = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    args = ["-m", MODULE, "--steps", str(STEPS), "--out-dir", str(root / "out")]
    args += ["--case-timeout", f"{CASE_TIMEOUT_S:g}"]
    for p in planned:
        if p.scenario is None:
            args += ["--case", _spec(p.key, p.case_id, gc=p.gc, schedule=p.schedule)]
        else:
            args += ["--control", _control_spec(p.key, p.case_id, p.scenario)]
    launch_env = {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": pythonpath,
        "HF_HUB_OFFLINE": "1",
        ENV_PG_TIMEOUT: f"{PG_TIMEOUT_S:g}",
        **(env or {}),
    }
    return launch(
        args, nproc=NPROC, timeout_s=launch_timeout(len(planned)), log_dir=root / "logs", env=launch_env
    )


@dataclass
class Job:
    """One launch of the worker for several cases, and where each case's result lands."""

    result: LaunchResult
    out_dir: Path
    keys: list[str]

    def summary(self, key: str) -> dict | None:
        path = self.out_dir / f"{key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def explain_missing(self, key: str) -> str:
        done = [k for k in self.keys if self.summary(k) is not None]
        failed_at = next((k for k in self.keys if k not in done), None)
        where = "this case" if failed_at == key else f"case {failed_at} (this one was not reached)"
        status = self.result.summary().splitlines()[0].removeprefix("parity.launch: ")
        return f"no result for {key}: the job ended in {where}: {status}\n{self.result.summary()}"


def _selected(session: pytest.Session, module: object) -> list[Planned]:
    """What the selected tests of this module need from the shared job: cases first, then controls."""
    cases, ctls = [], []
    for item in session.items:
        if getattr(item, "module", None) is not module or not hasattr(item, "callspec"):
            continue
        params = item.callspec.params
        if item.originalname == "test_dummy_forward":
            cases.append(Planned(item.callspec.id, item.callspec.id, schedule="matrix"))
        elif item.originalname == "test_dummy_forward_gradient_checkpointing":
            cases.append(Planned(_key(params["case_id"], True), params["case_id"], gc=True))
        elif item.originalname == "test_negative_control":
            key = _control_key(params["model_name"], params["scenario"])
            ctls.append(Planned(key, params["model_name"], scenario=params["scenario"]))
    return cases + ctls


@pytest.fixture(scope="module")
def job(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Job:
    planned = _selected(request.session, request.module)
    root = tmp_path_factory.mktemp("dummy_forward")
    start = time.monotonic()
    result = _launch(root, planned)
    n_ctl = sum(p.scenario is not None for p in planned)
    print(
        f"\nshared job: {len(planned) - n_ctl} case(s) + {n_ctl} control(s), {result.status} "
        f"in {time.monotonic() - start:.1f}s"
    )
    return Job(result, root / "out", [p.key for p in planned])


@pytest.fixture
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return settings.get("PARITY_RESULTS") or tmp_path_factory.mktemp("results")


def _write_records(model: str, summary: dict | None, reason: str, results_dir: Path) -> None:
    """One results file per model for ``python -m parity.results.merge --suite dummy_forward``."""
    variant = settings.get("PARITY_VARIANT")
    writer = ResultsWriter(results_dir, SUITE, variant, model, EXPECTED_MODES)
    if summary is not None and summary.get("records"):
        for record in summary["records"]:
            writer.add(record)
        return
    # The job hung or crashed before rank 0 wrote this case: record why, so the merge says ERROR.
    from parity.harness.fingerprint import fingerprint
    from parity.harness.toy import config_hash

    fp = fingerprint(device="cpu", dtype=torch.float32, seed=0, config_hash=config_hash(model))
    for mode in EXPECTED_MODES:
        writer.add(
            make_record(
                suite=SUITE,
                model=model,
                variant=variant,
                mode={"id": mode},
                status="error",
                tolerance={"rtol": 1e-4, "atol": 1e-5},
                fingerprint=fp,
                error=reason,
            )
        )


def _check(job: Job, key: str, family: str) -> dict:
    summary = job.summary(key)
    assert job.result.survivors == [], job.result.summary()
    assert summary is not None, job.explain_missing(key)
    scenarios = summary["scenarios"]
    for rank in summary["ranks"]:
        print(f"{key} rank {rank['rank']}: losses={rank['losses']} grad_norm={rank['grad_norm']}")
    for step, name in enumerate(scenarios):
        per_rank = [
            f"rank {r['rank']} inputs={r['modalities'][step]} dummy={r['dummy_calls'][step]} "
            f"entries={r['encoder_entries'][step]}"
            for r in summary["ranks"]
        ]
        print(f"{key} step {step} {name}: " + "; ".join(per_rank))
    print(
        f"{key}: {summary['elapsed_s']}s in the job; deviation from reference {summary.get('max_deviation')}"
    )
    assert summary["passed"], f"{key}: " + "; ".join(summary["problems"])
    assert all(r["dummy_forward_enabled"] for r in summary["ranks"])
    slots = worker.family_modalities(family)
    for step, name in enumerate(scenarios):
        for r in summary["ranks"]:
            # What the schedule asked for is what the batch held, and the hook filled every other slot.
            wanted = list(worker.modalities_of(worker.SCENARIOS[name][r["rank"]], family))
            got = r["modalities"][step]
            assert got == wanted, f"step {step} rank {r['rank']}: batch has {got}, schedule says {wanted}"
            assert r["dummy_calls"][step] == {m: 1 for m in slots if m not in wanted}
        entries = [r["encoder_entries"][step] for r in summary["ranks"]]
        assert all(e == entries[0] for e in entries), f"step {step} ({name}): encoder entries {entries}"
    return summary


@pytest.mark.distributed
@pytest.mark.timeout(TEST_TIMEOUT_S, method="thread")
@pytest.mark.parametrize("model_name, config_path, batch_fn", _ALL_CASES)
def test_dummy_forward(job: Job, results_dir: Path, model_name: str, config_path: str, batch_fn: partial):
    summary = job.summary(model_name)
    reason = "" if summary is not None else job.explain_missing(model_name).splitlines()[0]
    _write_records(model_name, summary, reason, results_dir)
    summary = _check(job, model_name, _FAMILY[model_name])
    expected = worker.scenario_names("matrix", _FAMILY[model_name], STEPS)
    assert summary["scenarios"] == expected
    assert {"iv_vs_i", "v_vs_none", "none_vs_all"} <= set(expected)


@pytest.mark.distributed
@pytest.mark.timeout(TEST_TIMEOUT_S, method="thread")
@pytest.mark.parametrize("case_id", _GRADIENT_CHECKPOINTING_IDS)
def test_dummy_forward_gradient_checkpointing(job: Job, case_id: str):
    summary = _check(job, _key(case_id, True), _FAMILY[case_id])
    assert summary["gradient_checkpointing"]


def _report(summary: dict) -> str:
    outcomes = "; ".join(
        f"rank {o['rank']}: {o['kind']} in {o['units'][-1] if o['units'] else None}"
        + (f" ({o['sizes'][0]} vs {o['sizes'][1]} bytes)" if o["sizes"] else "")
        for o in summary["outcomes"]
    )
    pred = summary["prediction"]
    where = pred["modules"].get(str(pred["rank"]), pred["modules"].get(pred["rank"]))
    return (
        f"{summary['control']}: {summary['verdict'].upper()} in {summary['elapsed_s']}s; {outcomes}; "
        f"predicted {pred['kind']} on rank {pred['rank']} in {where}"
    )


@pytest.mark.distributed
@pytest.mark.timeout(TEST_TIMEOUT_S, method="thread")
@pytest.mark.parametrize("model_name, scenario", _CONTROLS)
def test_negative_control(job: Job, model_name: str, scenario: str):
    """Hook off, one asymmetric step: a collective mismatch or timeout, where the model says, in time."""
    key = _control_key(model_name, scenario)
    summary = job.summary(key)
    assert job.result.survivors == [], job.result.summary()
    assert summary is not None, job.explain_missing(key)
    print(_report(summary))
    for problem in summary["problems"]:
        print(f"  {problem}")
    assert summary["verdict"] == "caught", f"{key}: {summary['verdict']}: " + "; ".join(summary["problems"])
    assert summary["prediction"]["kind"] in ("mismatch", "timeout")
    assert summary["elapsed_s"] <= CONTROL_REPORT_S, f"{key}: reported after {summary['elapsed_s']}s"


def _pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        alive.append(pid)
    return alive


_TRACE = re.compile(r"^\[dummy_forward_check\] rank=\d+ ((?:ready|enter \S+))$", re.M)


def _launch_outcomes(result: LaunchResult) -> dict[int, controls.RankOutcome]:
    """Each rank's end, from the launch's own logs (same reading as the in-job controls)."""
    outcomes = {}
    for rank in range(NPROC):
        log_dir = result.rank_logs.get(rank)
        text = {
            name: (log_dir / name).read_text(errors="replace") if log_dir else ""
            for name in ("stdout.log", "stderr.log")
        }
        trace = "\n".join(_TRACE.findall(text["stdout.log"]))
        log = text["stderr.log"] + "\n" + result.stacks.get(rank, "")
        outcomes[rank] = controls.classify(
            rank, result.failed_ranks.get(rank), log, trace, watchdog=result.status == "timeout"
        )
    return outcomes


@pytest.mark.distributed
@pytest.mark.timeout(launch_timeout(1) + 60, method="thread")
def test_negative_control_without_dummy_forward_fails(tmp_path: Path):
    """Same job, hooks off: it must fail the predicted way (not pass, not hang), and leave nothing behind."""
    from parity.harness import toy

    key = _NEGATIVE_CONTROL_ID
    start = time.monotonic()
    result = _launch(tmp_path, [Planned(key, key)], env={"PARITY_DISABLE_DUMMY_FORWARD": "1"})
    elapsed = time.monotonic() - start
    print(f"negative control ({key}, dummy forward off): {result.status} after {elapsed:.1f}s")
    print(result.summary())
    assert result.status in ("crash", "timeout"), f"the asymmetric job did not fail\n{result.summary()}"
    assert not (tmp_path / "out" / f"{key}.json").is_file()
    assert elapsed < launch_timeout(1) + 30, f"failure took {elapsed:.1f}s"
    assert result.survivors == [], result.summary()

    config = toy.load_config(ROOT / _case(key)[1])
    mods = {r: worker.modalities_of(m, "vlm") for r, m in enumerate(worker.SCENARIOS["all_vs_none"])}
    prediction = controls.predict(toy.build_model(config, attn_implementation="eager"), mods, NPROC)
    outcomes = _launch_outcomes(result)
    verdict, problems = controls.judge(prediction, outcomes)
    for rank, o in sorted(outcomes.items()):
        print(f"rank {rank}: {o.kind} in {o.last_unit} (exit {o.exitcode}): {o.message}")
    print(f"predicted {prediction.kind} on rank {prediction.rank} in {prediction.modules}: {verdict}")
    assert verdict == "caught", "; ".join(problems) + "\n" + result.summary()

    if result.status == "timeout":
        # A hang: the launcher must have collected every rank's stack before killing it.
        assert sorted(result.stacks) == list(range(NPROC)), result.summary()
    else:
        # A crash: torchrun names the rank that failed first, and every rank says where it was:
        # a faulthandler stack (fatal signal, or torchrun's SIGTERM) or its own Python traceback.
        assert result.root_cause_ranks or result.failed_ranks, result.summary()
        for rank in range(NPROC):
            assert "File " in result.stacks.get(rank, "") or result.raised(rank), result.summary()
    stacks = tmp_path / "logs" / "stacks"
    pids = [int(p.read_text()) for p in stacks.glob("rank_*.pid")]
    assert len(pids) == NPROC, f"expected {NPROC} rank pid files in {stacks}"
    assert _pids_alive(pids) == [], f"rank processes still alive: {_pids_alive(pids)}"


# --------------------------------------------------------------------------------------------
# in-process checks of the hook (fast; no torchrun)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("model_name, config_path, batch_fn", _ALL_CASES)
def test_dummy_pass_reaches_what_a_real_batch_reaches(model_name: str, config_path: str, batch_fn: partial):
    """Text-only batch with hooks: the parameters a real multimodal batch reaches get a gradient
    (the SPMD condition for FSDP2's reduce-scatters); loss and gradients equal the unhooked model's."""
    from parity.harness import toy
    from parity.training.dummy_forward import enable_dummy_forward

    config = toy.load_config(ROOT / config_path)
    real_batch = batch_fn(config, rank=0)
    text = _text_batch(config, rank=1)

    # One model throughout: no optimizer step, so the weights never change between the passes.
    model = toy.build_model(config, attn_implementation="eager")
    model(**real_batch).loss.backward()
    real = {n for n, g in _grads(model).items() if g is not None}
    model.zero_grad(set_to_none=True)

    plain_loss = model(**text).loss
    plain_loss.backward()
    plain = _grads(model)
    model.zero_grad(set_to_none=True)

    hooks = enable_dummy_forward(model)
    hooked_loss = model(**text).loss
    hooked_loss.backward()
    hooked = _grads(model)

    reached = {n for n, g in hooked.items() if g is not None}
    assert reached == real, (
        f"real only: {sorted(real - reached)[:5]}; dummy only: {sorted(reached - real)[:5]}"
    )
    assert hooked_loss.item() == plain_loss.item()
    for name, grad in hooked.items():
        if plain[name] is None:
            assert grad is None or not grad.any(), f"{name}: the dummy pass gave a non-zero gradient"
        else:
            assert torch.equal(grad, plain[name]), f"{name}: the dummy pass changed a gradient"
    expected = {"image": 1, "video": 1} | ({"audio": 1} if "input_features" in real_batch else {})
    assert dict(hooks.calls) == expected

    hooks.calls.clear()
    with torch.no_grad():
        model(**real_batch)  # everything real: no dummy pass
    assert dict(hooks.calls) == {}


def test_hooks_can_be_disabled_and_removed(monkeypatch: pytest.MonkeyPatch):
    from parity.harness import toy
    from parity.training.dummy_forward import dummy_forward, enable_dummy_forward

    config = toy.load_config(ROOT / "toy_config/qwen2_vl_toy")
    model = toy.build_model(config, attn_implementation="eager")
    off = enable_dummy_forward(model, enabled=False)
    assert not off.enabled
    with torch.no_grad():
        model(**_text_batch(config, rank=1))
    assert dict(off.calls) == {}

    zero = dummy_forward(model, "video")  # the one-shot building block: an exact zero on the graph
    assert zero.item() == 0.0 and zero.requires_grad
    hooks = enable_dummy_forward(model)
    with pytest.raises(RuntimeError, match="already installed"):
        enable_dummy_forward(model)
    hooks.remove()
    assert "get_image_features" not in model.model.__dict__
    enable_dummy_forward(model).remove()  # installable again after remove()


def test_text_only_model_is_rejected():
    from parity.harness import toy
    from parity.training.dummy_forward import enable_dummy_forward

    model = toy.build_model(toy.load_config(ROOT / "toy_config/qwen3_toy"), attn_implementation="eager")
    with pytest.raises(ValueError, match="Qwen3ForCausalLM has no vision tower"):
        enable_dummy_forward(model)


def test_dummy_pass_is_local_and_not_checkpointed():
    """Inside a dummy pass: no sp group (no Ulysses exchange, no split) and no checkpointing (a
    recomputation would run outside the pass, with sp back on); both are restored afterwards."""
    from parity.backend import parallel_state
    from parity.harness import toy
    from parity.training.dummy_forward import enable_dummy_forward
    from parity.training.vlm_trainer import find_tower

    config = toy.load_config(ROOT / "toy_config/qwen3_vl_toy")
    model = toy.build_model(config, attn_implementation="eager")
    enable_activation_checkpointing(model)
    tower = find_tower(model)
    seen = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        flags = [m.gradient_checkpointing for m in tower.modules() if hasattr(m, "gradient_checkpointing")]
        seen.append((parallel_state.get_sp_group(), any(flags)))

    tower.register_forward_pre_hook(record)
    enable_dummy_forward(model)
    sentinel = object()  # stands for an active sp group; eager attention never touches it
    with parallel_state.parallel_groups(sp=sentinel):
        model(**_text_batch(config, rank=1)).loss.backward()
        assert parallel_state.get_sp_group() is sentinel
    assert seen == [(None, False), (None, False)]  # image and video dummy passes
    assert all(m.gradient_checkpointing for m in tower.modules() if hasattr(m, "gradient_checkpointing"))
