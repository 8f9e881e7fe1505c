"""The e2e runner: one model's layouts trained under the hang-safe launcher, recorded and compared.

Each layout is a real training run of ``python -m parity.train`` (2 epochs x 2 steps, AdamW)
started through :func:`parity.harness.launch.launch` (watchdog, per-rank stacks on a hang, no
leftover processes). Every layout trains the same CPU-seeded weights on the same synthetic global
batch, and its per-step loss and grad norm are compared, step by step, with the ``sp1_ep1`` run
through the merge's rules (:mod:`parity.results.compare`). Records go under
``$PARITY_RESULTS/e2e/<variant>/<model>.json``.

CPU: 2 gloo ranks, fp32, ``parity_sdpa_with_sp``; the case tolerances (sized for bf16) are tightened
to :data:`parity.results.compare.FP32_TOLERANCE`. GPU: one rank per GPU (``PARITY_NPROC``
overrides), NCCL, bf16 compute over fp32 master weights, the variant's flash backend.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parity import settings as parity_settings
from parity.harness import evidence, toy
from parity.harness.fingerprint import REPO_ROOT, fingerprint
from parity.harness.launch import LaunchResult, launch
from parity.harness.patch_runner import RunSettings
from parity.results.compare import effective_tolerance, first_step_problems
from parity.results.modes import EXPECTED_PROVIDER, PARITY_ATTENTION
from parity.results.records import ResultsWriter, Tolerance, make_record

SUITE = "e2e"
SP_SIZES = (1, 2)
EP_SIZES = (1, 2)
STEPS_PER_EPOCH, EPOCHS = 2, 2
EXPECTED_STEPS = STEPS_PER_EPOCH * EPOCHS
SEED = 0
MOE_IMPLEMENTATION = "fused"
SRC = REPO_ROOT / "src"


def child_env(parity: dict[str, object] | None = None, **extra: str) -> dict[str, str]:
    """Environment of a training run: ``src`` (and the repo, for test-side plants) in front of the
    caller's PYTHONPATH, one thread a rank, the ``parity`` settings (and any PARITY_* keyword) checked
    by :func:`parity.settings.child_env`."""
    pythonpath = os.pathsep.join(p for p in (str(SRC), str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    named = {k: v for k, v in extra.items() if k.startswith("PARITY_")}
    others = {k: v for k, v in extra.items() if k not in named}
    checked = parity_settings.child_env(parity, **named)
    return {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", **others, **checked}


@dataclass(frozen=True)
class ParallelMode:
    sp: int
    ep: int

    @property
    def id(self) -> str:
        return f"sp{self.sp}_ep{self.ep}"


def parallel_modes(
    is_moe: bool, max_sp_size: int | None, max_ep_size: int | None = None
) -> list[ParallelMode]:
    """sp1_ep1 (the reference) first; MoE models also get every ep size."""
    sps = [s for s in SP_SIZES if max_sp_size is None or s <= max_sp_size]
    eps = [e for e in (EP_SIZES if is_moe else (1,)) if max_ep_size is None or e <= max_ep_size]
    return [ParallelMode(sp, ep) for sp in sps for ep in eps]


@dataclass(frozen=True)
class E2ESettings:
    run: RunSettings  # variant, device, dtype, results folder (from the nox session's environment)
    nproc: int
    attn: str

    @classmethod
    def from_env(cls, default_results: Path) -> E2ESettings:
        run = RunSettings.from_env(default_results)
        nproc = parity_settings.get(parity_settings.NPROC)
        if nproc is None:
            nproc = torch.cuda.device_count() if run.device.type == "cuda" else 2
        attn = parity_settings.get(parity_settings.E2E_ATTN)
        if not attn:  # CPU: the sdpa-based backend; GPU: the variant's flash backend
            attn = PARITY_ATTENTION[run.variant][-1] if run.device.type == "cuda" else "parity_sdpa_with_sp"
        return cls(run=run, nproc=nproc, attn=attn)

    @property
    def dtype_name(self) -> str:
        return str(self.run.dtype).removeprefix("torch.")

    @property
    def kernel(self) -> str | None:
        """The kernel library the variant names for this backend: passed to every rank explicitly."""
        return EXPECTED_PROVIDER.get((self.run.variant, self.attn))

    def skip_reason(self, mode: ParallelMode) -> str | None:
        for name, size in (("sp", mode.sp), ("ep", mode.ep)):
            if self.nproc % size:
                return f"{name}={size} needs a rank count divisible by {size}; this run has {self.nproc}"
        return None


@dataclass
class LayoutRun:
    mode: ParallelMode
    result: LaunchResult  # the launch that ran it (shared by every layout of that launch)
    log_dict: dict[str, Any] | None
    meta: dict[str, Any] | None
    status: str = "ok"  # this layout's own outcome: ok, or the failed launch's status
    elapsed_s: float = 0.0  # this layout's own time (its share of a shared launch)


_RUNS: dict[tuple, LayoutRun] = {}  # the negative controls reuse reference runs of the same session


def _config_file(config_path: str) -> Path:
    path = Path(config_path)
    return path if path.is_absolute() or path.exists() else REPO_ROOT / path


def _train_args(settings: E2ESettings, config: Path, mode: ParallelMode, out: Path) -> dict[str, Any]:
    """One training run, as parity.train's TrainConfig fields (the --plan entries)."""
    return {
        "config": str(config),
        "out": str(out),
        "sp": mode.sp,
        "ep": mode.ep,
        "steps_per_epoch": STEPS_PER_EPOCH,
        "epochs": EPOCHS,
        "attn": settings.attn,
        **({"attn_kernel": settings.kernel} if settings.kernel else {}),
        "moe": MOE_IMPLEMENTATION,
        "dtype": settings.dtype_name,
        "seed": SEED,
    }


def _read_outputs(out: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    try:
        log_dict = json.loads((out / "log_dict.json").read_text())
        return log_dict, json.loads((out / "run_meta.json").read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Layout:
    """One training to run: a model (its config file), a layout, and where its outputs go."""

    config: Path
    mode: ParallelMode
    out: Path


def _cache_key(settings: E2ESettings, config: Path, mode: ParallelMode, fault: str) -> tuple:
    return (str(config), mode, settings.attn, settings.kernel, settings.dtype_name, settings.nproc, fault)


def _launch_args(settings: E2ESettings, todo: list[Layout], root: Path) -> list[str]:
    if len(todo) == 1:
        args = ["-m", "parity.train"]
        for name, value in _train_args(settings, todo[0].config, todo[0].mode, todo[0].out).items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        return args
    entries = [_train_args(settings, t.config, t.mode, t.out) for t in todo]
    plan = {"runs": entries, "run_timeout_s": parity_settings.get(parity_settings.E2E_RUN_TIMEOUT_S)}
    plan_file = root / "plan.json"
    plan_file.write_text(json.dumps(plan, indent=2))
    return ["-m", "parity.train", "--plan", str(plan_file)]


def train_layouts(
    settings: E2ESettings, layouts: list[Layout], *, fault: str = ""
) -> dict[tuple[str, ParallelMode], LayoutRun]:
    """Train these layouts (of one model or several, each model's reference first), sharing jobs.

    One job (``parity.train --plan``) trains them one after the other: torchrun and the ranks'
    imports start once instead of once per layout, which on a 2-core CPU costs more than a toy
    training. A job that dies loses only the layout it was in; the layouts after it get a fresh
    job, except the other layouts of a model whose reference (its first layout) failed: nothing
    could be compared with them, so they are not trained and are absent from the result. Each
    layout keeps its budget (the job's watchdog is ``PARITY_E2E_RUN_TIMEOUT_S`` per layout).
    Results are cached per session by (config, layout, attention, dtype, ranks, fault).
    """
    references: dict[str, ParallelMode] = {}
    for item in layouts:
        references.setdefault(str(item.config), item.mode)
    runs: dict[tuple[str, ParallelMode], LayoutRun] = {}
    dead: set[str] = set()  # models whose reference failed
    todo: list[Layout] = []
    for item in layouts:
        cached = _RUNS.get(_cache_key(settings, item.config, item.mode, fault))
        if cached is None:
            todo.append(item)
            continue
        runs[(str(item.config), item.mode)] = cached
        if item.mode == references[str(item.config)] and cached.status != "ok":
            dead.add(str(item.config))
    todo = [t for t in todo if str(t.config) not in dead]
    while todo:
        root = todo[0].out.parent
        root.mkdir(parents=True, exist_ok=True)
        result = launch(
            _launch_args(settings, todo, root),
            nproc=settings.nproc,
            timeout_s=parity_settings.get(parity_settings.E2E_RUN_TIMEOUT_S) * len(todo),
            log_dir=root / "logs",
            env=child_env({parity_settings.FAULT: fault}),
        )
        failed: Layout | None = None
        for item in todo:
            outputs = _read_outputs(item.out)
            if outputs is None:
                status = result.status if result.status != "ok" else "crash"
                run = LayoutRun(item.mode, result, None, None, status=status, elapsed_s=result.elapsed_s)
                failed = item
            else:
                log_dict, meta = outputs
                elapsed = float(meta.get("run_s") or result.elapsed_s)
                run = LayoutRun(item.mode, result, log_dict, meta, status="ok", elapsed_s=elapsed)
            runs[(str(item.config), item.mode)] = run
            _RUNS[_cache_key(settings, item.config, item.mode, fault)] = run
            if failed is not None:
                break
        if failed is None:
            break
        if failed.mode == references[str(failed.config)]:
            dead.add(str(failed.config))
        todo = [t for t in todo[todo.index(failed) + 1 :] if str(t.config) not in dead]
    return runs


def run_layouts(
    settings: E2ESettings, config_path: str, modes: list[ParallelMode], work: Path, *, fault: str = ""
) -> dict[ParallelMode, LayoutRun]:
    """Train these layouts of one model (the reference first) in one job; see :func:`train_layouts`.

    Layouts missing from the result were not trained because the reference failed.
    """
    config = _config_file(config_path)
    layouts = [Layout(config, mode, work / mode.id / "out") for mode in modes]
    runs = train_layouts(settings, layouts, fault=fault)
    return {mode: runs[(str(config), mode)] for mode in modes if (str(config), mode) in runs}


def prefetch(
    settings: E2ESettings, models: list[tuple[str, bool, int | None]], work: Path
) -> dict[tuple[str, ParallelMode], LayoutRun]:
    """Train every layout of these models (config path, MoE, max sp size) in one shared job.

    :func:`run_case` then finds its runs in the session cache. Used by the e2e tests when no
    per-test timeout is in force (``nox -s tests``, plain pytest): one start-up for the whole suite.
    """
    layouts = []
    for config_path, is_moe, max_sp_size in models:
        config = _config_file(config_path)
        for mode in parallel_modes(is_moe, max_sp_size):
            if not settings.skip_reason(mode):
                layouts.append(Layout(config, mode, work / config.parent.name / mode.id / "out"))
    return train_layouts(settings, layouts)


def run_layout(
    settings: E2ESettings, config_path: str, mode: ParallelMode, work: Path, *, fault: str = ""
) -> LayoutRun:
    """One training run of one layout (cached per session by its arguments)."""
    return run_layouts(settings, config_path, [mode], work, fault=fault)[mode]


# --------------------------------------------------------------------------------------------
# records and verdicts (the merge's rules)


def layout_record(
    case_id: str,
    config_path: str,
    settings: E2ESettings,
    mode: ParallelMode,
    is_moe: bool,
    tolerance: Tolerance,
    case_tolerance: Tolerance,
) -> dict[str, Any]:
    """The record of one layout before it ran (filled by :func:`fill_record`)."""
    requested: dict[str, Any] = {"attn_implementation": settings.attn}
    if is_moe:
        requested["moe_implementation"] = MOE_IMPLEMENTATION
    provider = EXPECTED_PROVIDER.get((settings.run.variant, settings.attn))
    if provider:
        requested["kernel_provider"] = provider
    config_hash = toy.config_hash(_config_file(config_path))
    return make_record(
        suite=SUITE,
        model=case_id,
        variant=settings.run.variant,
        mode={
            "id": mode.id,
            "modeling_backend": "parity",
            "attn_implementation": settings.attn,
            "moe_implementation": MOE_IMPLEMENTATION if is_moe else None,
            "sp": mode.sp,
            "ep": mode.ep,
        },
        status="pending",
        requested=requested,
        tolerance=tolerance,
        fingerprint=fingerprint(
            device=settings.run.device, dtype=settings.run.dtype, seed=SEED, config_hash=config_hash
        ),
        expected_steps=EXPECTED_STEPS,
        case_tolerance=case_tolerance.to_json(),
        nproc=settings.nproc,
    )


def fill_record(record: dict[str, Any], run: LayoutRun) -> dict[str, Any]:
    """Status, metrics and what actually ran, from the trainer's outputs (or the launch failure)."""
    record["launch"] = {
        "status": run.status,
        "elapsed_s": round(run.elapsed_s, 2),
        "log_dir": str(run.result.log_dir),
    }
    if run.log_dict is None or run.meta is None:
        cause = run.result.cause() if run.result.status != "ok" else "the run wrote no log_dict.json"
        record.update(status="error", error=run.result.summary(), cause=cause, resolved={}, metrics={})
        return record
    resolved = {
        k: v
        for k, v in run.meta["resolved"].items()
        if k in ("attn_implementation", "moe_implementation", "kernel_provider", "experts_provider")
    }
    record.update(
        status="ok",
        resolved=resolved,
        metrics={
            "loss": run.log_dict["loss"],
            "grad_norm": run.log_dict["grad_norm"],
            "wall_s": round(run.elapsed_s, 2),
            "train_s": run.meta["train_s"],
        },
        layout=run.meta["layout"],
        fingerprint=run.meta["fingerprint"],  # where the ranks really ran
        layout_evidence=run.meta.get("ranks") or [],
        first_step={
            "loss": run.log_dict["loss"][0],
            "fingerprints": run.meta.get("first_step_fingerprints") or {},
        },
    )
    return record


ANCHOR_ID = "single_process"
ANCHOR_DTYPE = "float32"


def single_process_record(
    case_id: str, config_path: str, settings: E2ESettings, is_moe: bool, tolerance: Tolerance
) -> dict[str, Any]:
    """Step 0 of the same global batch in one process with HF's own eager attention and experts.

    The independent anchor of the e2e suite: every layout is compared with sp1_ep1, so a bug that
    sits in every layout (the loss normalisation, the label shift, the FSDP gradient reduction)
    would pass unseen; this run shares none of that code, only the model, weights and data. fp32
    on CPU: the exact answer for the toy models. Its record carries the float32 tolerance (what an
    fp32 record may hold); the comparison with the layout uses the layout's own, so on a bf16 GPU run
    the layout's bf16 tolerance is never written onto an fp32 record (the merge rejects that).
    """
    from parity.training import train as trainer

    config_file = _config_file(config_path)
    record = make_record(
        suite=SUITE,
        model=case_id,
        variant=settings.run.variant,
        mode={"id": ANCHOR_ID, "modeling_backend": "hf", "attn_implementation": "eager", "role": "anchor"},
        status="pending",
        tolerance=effective_tolerance(tolerance, ANCHOR_DTYPE),
        fingerprint=fingerprint(
            device="cpu", dtype=ANCHOR_DTYPE, seed=SEED, config_hash=toy.config_hash(config_file)
        ),
    )
    try:
        config = toy.load_config(config_file)
        family = toy.model_family(config)
        model = toy.build_model(
            config, attn_implementation="eager", experts_implementation="eager" if is_moe else None, seed=SEED
        )
        data = trainer.SyntheticDataset(
            config, rows_per_step=settings.nproc, steps_per_epoch=STEPS_PER_EPOCH, seed=1, model=model
        )
        label_tokens = data.label_tokens(0)
        loss_sum = 0.0
        for row in data.global_batch(0):
            micro = trainer.shard_micro_batch(row, family, 0, 1, torch.device("cpu"))
            logits = model(**micro.model_inputs, use_cache=False).logits
            summed = trainer.token_loss_sum(logits, micro.shift_labels)
            (summed / label_tokens).backward()
            loss_sum += float(summed.detach())
        prints = {n: evidence.fingerprint(p.grad) for n, p in model.named_parameters() if p.requires_grad}
        grad_norm = math.sqrt(sum(float(v[0]) ** 2 for v in prints.values() if v is not None))
        loss = loss_sum / label_tokens
        record.update(
            status="ok",
            metrics={"loss": loss, "grad_norm": grad_norm},
            first_step={"loss": loss, "fingerprints": prints},
        )
    except Exception:  # the anchor failing is a finding, reported as such
        import traceback

        record.update(status="error", error=traceback.format_exc())
    return record


def print_table(case_id: str, records: list[dict[str, Any]]) -> None:
    """Per layout and step: |loss - ref|, |grad_norm - ref|; wall time of each run."""
    ref = records[0]
    print(f"\n[e2e] {case_id}: per-step deviation from {ref['mode']['id']}", file=sys.stderr)
    for rec in records:
        head = f"[e2e]   {rec['mode']['id']:<8} {rec['status']:<7}"
        if rec["status"] != "ok" or ref["status"] != "ok":
            print(f"{head} {rec.get('reason') or rec.get('cause') or ''}", file=sys.stderr)
            continue
        m, r = rec["metrics"], ref["metrics"]
        if rec["mode"].get("role") == "anchor":
            problems, worst = first_step_problems(ref, rec)
            ratio = f"worst step-0 check {worst.name} ratio {worst.ratio:.3g}" if worst else ""
            print(f"{head} step-0 loss {m['loss']:.8f}  {ratio}  {len(problems)} problem(s)", file=sys.stderr)
            continue
        dl = [abs(a - b) for a, b in zip(m["loss"], r["loss"], strict=False)]
        dg = [abs(a - b) for a, b in zip(m["grad_norm"], r["grad_norm"], strict=False)]
        print(
            f"{head} wall {m['wall_s']:6.1f}s  loss {' '.join(f'{v:.8f}' for v in m['loss'])}  "
            f"|dloss| {' '.join(f'{v:.1e}' for v in dl)}  |dgnorm| {' '.join(f'{v:.1e}' for v in dg)}",
            file=sys.stderr,
        )


# --------------------------------------------------------------------------------------------
# one model


def run_case(
    case_id: str,
    config_path: str,
    is_moe: bool,
    rtol: float,
    atol: float,
    max_sp_size: int | None,
    settings: E2ESettings,
    work: Path,
    *,
    fault: str = "",
) -> list[dict[str, Any]]:
    """Train every layout of one model (sp1_ep1 first), record each, return the records.

    Fail fast: when the reference layout does not finish, nothing can be compared with it, so the
    other layouts are not trained (on CPU that saved a minute per broken model); they are recorded
    as ``not_run`` with "reference sp1_ep1 failed: <root cause>". ``fault`` plants a
    :mod:`parity.harness.faults` fault in every run (negative controls).
    """
    case_tolerance = Tolerance(rtol, atol)
    tolerance = effective_tolerance(case_tolerance, settings.dtype_name)
    modes = parallel_modes(is_moe, max_sp_size)
    expected = [modes[0].id, ANCHOR_ID, *[m.id for m in modes[1:]]]
    writer = ResultsWriter(settings.run.results, SUITE, settings.run.variant, case_id, expected)
    runnable = [mode for mode in modes if not settings.skip_reason(mode)]
    runs = run_layouts(settings, config_path, runnable, work, fault=fault)
    records = []
    reference_failed: str | None = None
    for index, mode in enumerate(modes):
        record = layout_record(case_id, config_path, settings, mode, is_moe, tolerance, case_tolerance)
        reason = settings.skip_reason(mode)
        if reason:
            record.update(status="skipped", reason=reason, resolved={}, metrics={})
        elif mode not in runs:  # run_layouts stopped: the reference failed
            record.update(
                status="not_run",
                reason=f"reference {modes[0].id} failed: {reference_failed or 'it did not run'}",
                resolved={},
                metrics={},
            )
        else:
            fill_record(record, runs[mode])
            if mode == modes[0] and record["status"] != "ok":
                reference_failed = record["cause"]
        writer.add(record)
        records.append(record)
        if index == 0 and record["status"] != "ok":  # nothing to hold the anchor against
            anchor = make_record(
                suite=SUITE,
                model=case_id,
                variant=settings.run.variant,
                mode={
                    "id": ANCHOR_ID,
                    "modeling_backend": "hf",
                    "attn_implementation": "eager",
                    "role": "anchor",
                },
                status="not_run",
                reason=f"reference {modes[0].id} failed: {reference_failed or 'it did not run'}",
                tolerance=tolerance,
                fingerprint=record["fingerprint"],
            )
            writer.add(anchor)
            records.append(anchor)
        elif index == 0:  # the anchor right after the reference layout it is held against
            anchor = single_process_record(case_id, config_path, settings, is_moe, tolerance)
            writer.add(anchor)
            records.append(anchor)
    print_table(case_id, records)
    return records
