"""Negative controls of the ``dummy_forward`` suite: hook off, and the job must fail the right way.

A control takes one asymmetric step (:data:`parity.harness.checks.dummy_forward_check.SCENARIOS`),
turns the hook off (``enable_dummy_forward(model, enabled=False)``) and runs it under 2-rank FSDP2.
It passes only if the run ends in a **collective mismatch** or a **collective timeout**, on the rank
and in the FSDP unit that the model's structure predicts; anything else (a Python error, a peer
that finished, a failure elsewhere) is a tool error and the control fails. A check that merely
counts "some crash" cannot tell the mechanism from a broken harness.

Why child processes. On gloo a size mismatch is fatal to the process: gloo throws from its I/O
thread and ``std::terminate`` aborts the rank (SIGABRT), so it cannot be caught and the rank
cannot go on to the next control. A torchrun launch per control would pay the start-up (imports
of torch and transformers on every rank, about 15 s on a 2-core machine) each time. So each rank
of the shared ``dummy_forward`` job keeps a ``forkserver`` with torch, transformers and parity
preloaded and forks one child per control; the two children (one per rank) build their own gloo
group (TCP rendezvous on a port rank 0 picks), the model, FSDP2, and run the step. A child
writes ``rank<R>.log`` (its stdout/stderr: gloo's abort message lands there, and faulthandler's
stacks) and ``rank<R>.trace`` (one line per FSDP unit it enters, written with ``os.write`` before
the unit's all-gather, so the last line survives an abort). The parent waits up to
:data:`CONTROL_DEADLINE_S`, SIGUSR1s (stack dump) and kills a child still alive (a watchdog
timeout), and the ranks exchange what happened over the job's own, healthy process group.
:data:`AT_ONCE` controls run side by side (separate groups and ports): on a 2-core CPU the 34
controls of the eight toys take about 20 s together, each reporting within about a second of its
batch's start.

The prediction comes from the model and the step alone (:func:`predict`): every rank enters the
root unit, then the units of each encoder its batch has, in the model's encoder order, then the
decoder units. The first position where the two ranks' sequences hold different units is where
the collectives stop pairing up; FSDP2 all-gathers each unit's shard there, and the rank whose
shard is smaller receives more bytes than it posted and aborts with gloo's "Received data size
doesn't match expected size" (``A vs B`` bytes: the ratio must be the two units' shard ratio).
The peer receives a short message without complaint, goes on and fails at or after its predicted
unit when the connection drops (``peer_lost``), or times out. Units of equal size would pair up
silently; then the prediction is a timeout (any rank, a gloo "Timed out" message or the watchdog).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: The child's process-group timeout: a collective whose peer never comes raises after this.
CHILD_PG_TIMEOUT_S = 10.0
#: Controls whose children run side by side (each pair its own group and port).
AT_ONCE = 4
#: The child's rendezvous timeout (its TCPStore): both children must be up by then.
CHILD_STORE_TIMEOUT_S = 20.0
#: The parent's watchdog per control (below the job's process-group timeout, which the parents'
#: exchange after a control must not hit).
CONTROL_DEADLINE_S = 30.0

_MISMATCH = re.compile(r"op\.preamble\.length <= op\.nbytes\. (\d+) vs (\d+)")
_MISMATCH_WORDS = ("Received data size doesn't match expected size", "collective mismatch")
# gloo's wait on a peer that never sends; NCCL's watchdog. Not a rendezvous or store timeout: a
# child that never got its group up is a tool error.
_TIMEOUT = re.compile(
    r"Timed out waiting \d+ ?ms for (recv|send) operation|Watchdog caught collective operation timeout"
)
_PEER_LOST = re.compile(r"Connection reset by peer|Connection closed by peer|Broken pipe|Connection refused")
#: Kinds a rank can end in. ``mismatch`` and ``timeout`` are what a control exists to show.
KINDS = ("mismatch", "timeout", "peer_lost", "finished", "error")


# --------------------------------------------------------------------------------------------
# what happened on one rank (pure functions of the child's files: unit-testable)


@dataclass
class RankOutcome:
    """How one rank's child ended, and where."""

    rank: int
    kind: str  # one of KINDS
    exitcode: int | None  # negative: killed by that signal (-6: SIGABRT, gloo's abort)
    units: list[str]  # FSDP units entered, in order
    message: str  # the line that decided the kind
    sizes: tuple[int, int] | None = None  # gloo mismatch: (bytes received, bytes expected)
    source: str = "message"  # "message" (the rank's own error) or "watchdog" (killed at the deadline)

    @property
    def last_unit(self) -> str | None:
        return self.units[-1] if self.units else None


def _first_line(text: str, pattern: re.Pattern[str] | tuple[str, ...]) -> str | None:
    for line in text.splitlines():
        hit = pattern.search(line) if isinstance(pattern, re.Pattern) else any(w in line for w in pattern)
        if hit:
            return line.strip()
    return None


def classify(rank: int, exitcode: int | None, log: str, trace: str, *, watchdog: bool = False) -> RankOutcome:
    """Read one child's log and trace: mismatch, timeout, peer_lost, finished, or error."""
    events = [ln.strip().partition(" ") for ln in trace.splitlines() if ln.strip()]
    units = [rest for tag, _, rest in events if tag == "enter"]
    done = any(tag == "done" for tag, _, _ in events)
    if not any(tag == "ready" for tag, _, _ in events):  # group, model, FSDP2 not set up: not the step
        tail = [ln for ln in log.splitlines() if ln.strip()][-1:] or [f"exit code {exitcode}, empty log"]
        return RankOutcome(rank, "error", exitcode, units, f"did not reach the step: {tail[0].strip()}")
    if line := _first_line(log, _MISMATCH_WORDS):
        sizes = _MISMATCH.search(log)
        got = (int(sizes.group(1)), int(sizes.group(2))) if sizes else None
        return RankOutcome(rank, "mismatch", exitcode, units, line, got)
    if line := _first_line(log, _TIMEOUT):
        return RankOutcome(rank, "timeout", exitcode, units, line)
    if watchdog:
        return RankOutcome(rank, "timeout", exitcode, units, "alive at the deadline", source="watchdog")
    if line := _first_line(log, _PEER_LOST):
        return RankOutcome(rank, "peer_lost", exitcode, units, line)
    if exitcode == -signal.SIGTERM and not done:
        # torchrun tears the job down with SIGTERM once a rank failed; whether the peer saw the reset
        # first (and logged it) is a race, so the signal itself says the peer was lost (CI saw both)
        return RankOutcome(rank, "peer_lost", exitcode, units, "ended by SIGTERM after another rank failed")
    if exitcode == 0 and done:
        return RankOutcome(rank, "finished", exitcode, units, "finished the step")
    tail = [ln for ln in log.splitlines() if ln.strip()][-1:] or [f"exit code {exitcode}, empty log"]
    return RankOutcome(rank, "error", exitcode, units, tail[0].strip())


# --------------------------------------------------------------------------------------------
# what should happen: from the model's structure and the step


@dataclass
class Prediction:
    """Where the ranks' collectives stop pairing up, and which rank notices."""

    kind: str  # "mismatch", "timeout", or "none" (the ranks issue the same collectives)
    rank: int | None  # the rank that detects the mismatch (its shard is the smaller one)
    index: int | None  # position in the unit sequences where they first differ in size
    modules: dict[int, str]  # rank -> its unit at that position
    shard_numel: dict[int, int]  # rank -> that unit's per-rank shard (elements)
    sequences: dict[int, list[str]] = field(default_factory=dict)


def fsdp_units(model: Any) -> dict[str, list[Any]]:
    """Unit name ("" for the root) -> its own parameters, as apply_fsdp2 wraps them (one unit per block)."""
    from parity.training.fsdp import no_split_class_names

    classes = no_split_class_names(model)
    names = [""] + [n for n, m in model.named_modules() if n and type(m).__name__ in classes]
    own: dict[str, list[Any]] = {n: [] for n in names}
    for pname, param in model.named_parameters():
        owner = max((n for n in names if n == "" or pname.startswith(n + ".")), key=len)
        own[owner].append(param)
    return own


def shard_numel(params: list[Any], world: int) -> int:
    """Elements of one rank's all-gather input for a unit: FSDP2 pads dim 0 to a multiple of world."""
    return sum(math.ceil(p.shape[0] / world) * math.prod(p.shape[1:]) for p in params)


def unit_sequence(model: Any, modalities: tuple[str, ...], units: list[str]) -> list[str]:
    """The units a rank's forward enters: root, each encoder its batch has (model order), the decoder."""
    from parity.harness import towers

    encoders = towers.expected_encoders(model)
    kind_of = {"image": "vision", "video": "vision", "audio": "audio"}

    def inside(unit: str, path: str) -> bool:
        return unit == path or unit.startswith(path + ".")

    seq = ["<root>"]
    for modality in modalities:
        path = encoders[kind_of[modality]].path
        seq += [u for u in units if u and inside(u, path)]
    seq += [u for u in units if u and not any(inside(u, e.path) for e in encoders.values())]
    return seq


def predict(model: Any, modalities: dict[int, tuple[str, ...]], world: int) -> Prediction:
    """Walk the ranks' unit sequences in step; the first pair of unequal shards is the mismatch."""
    own = fsdp_units(model)
    sizes = {("<root>" if n == "" else n): shard_numel(ps, world) for n, ps in own.items()}
    seqs = {r: unit_sequence(model, mods, list(own)) for r, mods in modalities.items()}
    ranks = sorted(seqs)
    for index in range(max(len(s) for s in seqs.values())):
        at = {r: seqs[r][index] if index < len(seqs[r]) else None for r in ranks}
        if any(u is None for u in at.values()):
            break  # one rank's forward is over: the next collectives are of different kinds
        numel = {r: sizes[u] for r, u in at.items()}
        if len(set(numel.values())) > 1:
            detector = min(ranks, key=lambda r: numel[r])
            return Prediction("mismatch", detector, index, at, numel, seqs)  # type: ignore[arg-type]
    if all(seq == seqs[ranks[0]] for seq in seqs.values()):
        return Prediction("none", None, None, {}, {}, seqs)  # the same collectives: nothing to show
    return Prediction("timeout", None, None, {}, {}, seqs)


def judge(prediction: Prediction, outcomes: dict[int, RankOutcome]) -> tuple[str, list[str]]:
    """``("caught", [])`` when the run failed as predicted, else ``("tool error" | "not caught", why)``."""
    problems: list[str] = []
    kinds = {r: o.kind for r, o in outcomes.items()}
    if prediction.kind == "none":
        return "tool error", ["the step is symmetric (same units on every rank): not a negative control"]
    if all(k == "finished" for k in kinds.values()):
        return "not caught", ["every rank finished the step without the hook: nothing was shown"]
    for r, o in outcomes.items():
        if o.kind in ("error", "finished"):
            problems.append(f"rank {r}: {o.kind} ({o.message}): neither a collective mismatch nor a timeout")
    if prediction.kind == "mismatch":
        r = prediction.rank
        assert r is not None and prediction.index is not None
        o = outcomes[r]
        if o.kind != "mismatch":
            problems.append(f"rank {r}: expected the collective mismatch, got {o.kind} ({o.message})")
        want_units = prediction.sequences[r][: prediction.index + 1]
        if o.units != want_units:  # the same unit, and the same entry of it (a tower entered twice)
            problems.append(
                f"rank {r}: failed in {o.last_unit} after entering {o.units}, expected "
                f"{prediction.modules[r]} after {want_units}"
            )
        if o.sizes is not None:
            peer = next(p for p in prediction.modules if p != r)
            want = prediction.shard_numel[peer] / prediction.shard_numel[r]
            if not math.isclose(o.sizes[0] / o.sizes[1], want, rel_tol=1e-3):
                problems.append(
                    f"rank {r}: gloo's sizes {o.sizes[0]} vs {o.sizes[1]} are not the shards of "
                    f"{prediction.modules[peer]} and {prediction.modules[r]} (ratio {want:.4f})"
                )
        for p, other in outcomes.items():
            if p == r:
                continue
            if other.kind not in ("peer_lost", "timeout", "mismatch"):
                continue  # already a problem above
            seq = prediction.sequences[p]
            if other.units != seq[: len(other.units)] or len(other.units) <= prediction.index:
                problems.append(
                    f"rank {p}: failed in {other.last_unit} after entering {other.units}, expected "
                    f"its own order {seq}, at or after {seq[prediction.index]}"
                )
    elif not any(k == "timeout" for k in kinds.values()):
        problems.append(f"expected a collective timeout (units pair up silently), got {kinds}")
    return ("caught", []) if not problems else ("tool error", problems)


# --------------------------------------------------------------------------------------------
# the child process


def _write(fd: int, line: str) -> None:
    os.write(fd, (line + "\n").encode())


def control_child(job: dict[str, Any]) -> None:
    """One rank of one control: own gloo group, hook off, FSDP2, the asymmetric step. Never returns."""
    log_fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    trace_fd = os.open(job["trace"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    born = time.monotonic()

    def stamp(label: str) -> None:
        _write(trace_fd, f"time {label} {time.monotonic() - born:.2f}")

    import faulthandler
    import traceback
    from datetime import timedelta

    faulthandler.enable(file=sys.stderr, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)
    try:
        stamp("start")
        import torch
        import torch.distributed as dist

        from parity.harness import toy
        from parity.harness.checks import dummy_forward_check as worker
        from parity.training.dummy_forward import enable_dummy_forward
        from parity.training.fsdp import apply_fsdp2

        torch.set_num_threads(1)
        # Inherited from torchrun: would make this group a client of the job's agent store (no
        # server for our own rendezvous) and tie it to the job's rank numbering.
        for var in ("TORCHELASTIC_USE_AGENT_STORE", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
            os.environ.pop(var, None)
        rank, world = job["rank"], job["world"]
        # Our own store, with a rendezvous timeout of its own: a peer that is slow to start is not
        # a collective timeout.
        store = dist.TCPStore(
            "127.0.0.1",
            job["port"],
            world,
            is_master=rank == 0,
            timeout=timedelta(seconds=job["store_timeout_s"]),
        )
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=job["pg_timeout_s"])
        )
        stamp("group")
        config = toy.load_config(job["config"])
        mods = worker.SCENARIOS[job["scenario"]][rank]
        batch = worker.step_batch(config, job["batch"], job["patch_size"], mods, rank=rank, step=0)
        model = toy.build_model(config, attn_implementation="eager", dtype=torch.float32, seed=worker.SEED)
        stamp("model")
        hooks = enable_dummy_forward(model, enabled=False)  # the control: no dummy passes
        assert not hooks.enabled
        counter = worker.EncoderCounter(model, trace=lambda unit: _write(trace_fd, f"enter {unit}"))
        apply_fsdp2(model, None)
        counter.trace_units(model)
        _write(trace_fd, f"modalities {','.join(worker.batch_modalities(batch)) or '-'}")
        stamp("sharded")
        _write(trace_fd, "ready")
        loss = model(**batch).loss
        _write(trace_fd, "backward")
        loss.backward()
        _write(trace_fd, "allreduce")
        dist.all_reduce(torch.ones(1))
        _write(trace_fd, "done")
        sys.stdout.flush()
        os._exit(0)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


# --------------------------------------------------------------------------------------------
# the parent side (each rank of the shared job)

_CONTEXT: Any = None
_PRELOAD = ["parity.harness.checks.dummy_forward_controls", "parity.harness.checks.dummy_forward_check"]


def _modeling_modules(configs: list[str]) -> list[str]:
    """The transformers modeling modules of these toy configs (imported lazily otherwise: ~2 s each)."""
    from parity.harness import toy

    modules = []
    for path in configs:
        config = toy.load_config(path)
        modules.append(toy._auto_class(config)._model_mapping[type(config)].__module__)
    return sorted(set(modules))


def start_forkserver(configs: list[str] = ()) -> None:  # type: ignore[assignment]
    """Start this rank's forkserver now (its imports overlap with the cases that run first).

    It preloads torch, transformers, parity and the modeling modules of ``configs``, so a
    control's child starts with everything imported.
    """
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(_PRELOAD + _modeling_modules(list(configs)))
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (held open together, so no duplicates)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass(frozen=True)
class Control:
    """One negative control: a model (case fields) and the asymmetric scenario to run without the hook."""

    id: str
    config: str
    batch: str
    patch_size: int
    scenario: str

    @classmethod
    def parse(cls, spec: str) -> Control:
        """``id=ctl_qwen2_vl_iv_vs_i,config=PATH,batch=vlm_batch,patch_size=14,scenario=iv_vs_i``."""
        from parity.harness.checks.dummy_forward_check import SCENARIOS

        fields = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
        missing = [k for k in ("id", "config", "batch", "patch_size", "scenario") if k not in fields]
        if missing:
            raise ValueError(f"--control {spec!r}: missing {', '.join(missing)}")
        if fields["scenario"] not in SCENARIOS:
            raise ValueError(f"--control {spec!r}: unknown scenario; known: {', '.join(SCENARIOS)}")
        patch = int(fields["patch_size"])
        return cls(fields["id"], fields["config"], fields["batch"], patch, fields["scenario"])


def _noop() -> None:
    """What the warm-up child runs."""


_WARM = False


def _warm_up() -> None:
    """Wait until this rank's forkserver has finished its preload (a first fork blocks until then)."""
    global _WARM
    start_forkserver()
    if not _WARM:
        proc = _CONTEXT.Process(target=_noop, name="control-warm-up")
        proc.start()
        proc.join()
        _WARM = True


def _run_children(jobs: list[dict[str, Any]], deadline_s: float) -> list[tuple[int | None, bool, float]]:
    """Start one child per job from this rank's forkserver and wait for all of them, up to ``deadline_s``.

    A child still alive at the deadline gets SIGUSR1 (faulthandler: its stack into its log), then
    SIGKILL. Returns, per job: (exit code, whether the watchdog had to stop it, seconds to its end).
    """
    start = time.monotonic()
    procs = []
    for job in jobs:
        proc = _CONTEXT.Process(target=control_child, args=(job,), name=f"control-{job['id']}-r{job['rank']}")
        proc.start()
        procs.append(proc)
    ended: dict[int, float] = {}
    while len(ended) < len(procs) and time.monotonic() - start < deadline_s:
        for i, proc in enumerate(procs):
            if i not in ended and not proc.is_alive():
                ended[i] = time.monotonic() - start
        time.sleep(0.05)
    out = []
    for i, proc in enumerate(procs):
        watchdog = i not in ended
        if watchdog:
            os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(1.0)
            proc.kill()
            ended[i] = time.monotonic() - start
        proc.join(5.0)
        out.append((proc.exitcode, watchdog, ended[i]))
    return out


def _run_child(job: dict[str, Any], deadline_s: float) -> tuple[int | None, bool]:
    """One child (see :func:`_run_children`): (exit code, whether the watchdog had to stop it)."""
    exitcode, watchdog, _ = _run_children([job], deadline_s)[0]
    return exitcode, watchdog


def run_controls(
    controls: list[Control],
    rank: int,
    world: int,
    out_dir: Path,
    before_batch: Callable[[], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Run controls on every rank of the job, :data:`AT_ONCE` pairs of children at a time.

    Each control is its own pair of processes with its own process group and port, so running a
    few side by side changes nothing in any of them; it only shares the waiting. Yields, on rank
    0, one judged summary per control as each batch ends (nothing on the other ranks; every rank
    must exhaust the iterator: it holds collectives). ``elapsed_s`` of a control is the time from
    its batch's start to its verdict. ``before_batch`` runs first on each batch (a deadline).
    """
    import torch.distributed as dist

    _warm_up()
    for first in range(0, len(controls), AT_ONCE):
        batch = controls[first : first + AT_ONCE]
        if before_batch is not None:
            before_batch()
        dist.barrier()  # both forkservers ready, the previous batch over: the children start together
        start = time.monotonic()
        box = [_free_ports(len(batch)) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        jobs = []
        for control, port in zip(batch, box[0], strict=True):
            where = out_dir / "controls" / control.id
            where.mkdir(parents=True, exist_ok=True)
            jobs.append(
                {
                    **asdict(control),
                    "rank": rank,
                    "world": world,
                    "port": port,
                    "pg_timeout_s": CHILD_PG_TIMEOUT_S,
                    "store_timeout_s": CHILD_STORE_TIMEOUT_S,
                    "log": str(where / f"rank{rank}.log"),
                    "trace": str(where / f"rank{rank}.trace"),
                }
            )
        mine = []
        ends = _run_children(jobs, CONTROL_DEADLINE_S)
        for job, (exitcode, watchdog, took) in zip(jobs, ends, strict=True):
            trace = Path(job["trace"])
            outcome = classify(
                rank,
                exitcode,
                Path(job["log"]).read_text(errors="replace"),
                trace.read_text(errors="replace") if trace.exists() else "",
                watchdog=watchdog,
            )
            mine.append({**asdict(outcome), "took_s": took})
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            for i, control in enumerate(batch):
                yield _judge_control(control, [g[i] for g in gathered], world, out_dir, start)


def _judge_control(
    control: Control, per_rank: list[dict[str, Any]], world: int, out_dir: Path, start: float
) -> dict[str, Any]:
    """Rank 0: predict from the model, judge the ranks' outcomes, print and return the summary."""
    from parity.harness import toy
    from parity.harness.checks import dummy_forward_check as worker

    elapsed = max(o.pop("took_s") for o in per_rank)
    config = toy.load_config(control.config)
    family = toy.model_family(config)
    model = toy.build_model(config, attn_implementation="eager")
    mods = worker.SCENARIOS[control.scenario]
    modalities = {r: worker.modalities_of(mods[r], family) for r in range(world)}
    prediction = predict(model, modalities, world)
    outcomes = {o["rank"]: RankOutcome(**{**o, "sizes": tuple(o["sizes"]) if o["sizes"] else None})
                for o in per_rank}  # fmt: skip
    verdict, problems = judge(prediction, outcomes)
    children_s = elapsed
    elapsed = time.monotonic() - start  # batch start -> this verdict: the time to report
    summary = {
        "check": "dummy_forward_control",
        "control": control.id,
        "config": control.config,
        "scenario": control.scenario,
        "batches": list(mods),
        "modalities": {str(r): list(m) for r, m in modalities.items()},
        "verdict": verdict,
        "problems": problems,
        "prediction": asdict(prediction),
        "outcomes": [asdict(outcomes[r]) for r in sorted(outcomes)],
        "elapsed_s": round(elapsed, 2),
        "children_s": round(children_s, 2),
        "files": str(out_dir / "controls" / control.id),
    }
    line = "; ".join(
        f"rank {r}: {o.kind} in {o.last_unit}" + (f" ({o.sizes[0]} vs {o.sizes[1]} bytes)" if o.sizes else "")
        for r, o in sorted(outcomes.items())
    )
    print(
        f"[dummy_forward_check] control={control.id} {verdict.upper()} in {elapsed:.1f}s: {line}; predicted "
        f"{prediction.kind} on rank {prediction.rank} in {prediction.modules.get(prediction.rank or 0)}",
        flush=True,
    )
    for p in problems:
        print(f"[dummy_forward_check] control={control.id} PROBLEM: {p}", flush=True)
    return summary
