"""The e2e runner's launch sharing and fail-fast rules, with the launcher replaced by a fake.

One job trains all layouts of a model; the fake job "finishes" the first k runs of its plan and
dies in the next, as a real job that crashes in layout k does. The rules under test: a dead job
loses only the layout it was in (the rest get a fresh job), and a dead reference stops the model.
The real thing (planted SIGKILL in sp1_ep1, torchrun, the merge's one-line detail) is
tests/e2e/test_e2e_parallel.py::test_reference_failure_stops_the_model_and_names_the_cause.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from parity.harness import e2e_runner as e2e  # noqa: E402
from parity.harness.launch import LaunchResult  # noqa: E402

MODES = [e2e.ParallelMode(1, 1), e2e.ParallelMode(1, 2), e2e.ParallelMode(2, 1), e2e.ParallelMode(2, 2)]


class FakeJobs:
    """Stands in for parity.harness.launch.launch; ``dies_in`` = layout ids whose run kills the job."""

    def __init__(self, dies_in: set[str]) -> None:
        self.dies_in = dies_in
        self.jobs: list[list[str]] = []

    def __call__(self, args: list[str], *, log_dir: Path, **kwargs) -> LaunchResult:
        if "--plan" in args:
            runs = json.loads(Path(args[args.index("--plan") + 1]).read_text())["runs"]
        else:
            value = {k: args[args.index(f"--{k}") + 1] for k in ("out", "sp", "ep", "config")}
            runs = [{**value, "sp": int(value["sp"]), "ep": int(value["ep"])}]
        ids = [f"sp{r['sp']}_ep{r['ep']}" for r in runs]
        models = [Path(r["config"]).parent.name if "config" in r else "" for r in runs]
        self.jobs.append(
            ids if len(set(models)) < 2 else [f"{m}/{i}" for m, i in zip(models, ids, strict=True)]
        )
        for run, mode_id, model in zip(runs, ids, models, strict=True):
            if mode_id in self.dies_in or f"{model}/{mode_id}" in self.dies_in:
                return LaunchResult("crash", 1, 2.0, log_dir, [], {}, [], {1: -9}, [1])
            out = Path(run["out"])
            out.mkdir(parents=True)
            (out / "log_dict.json").write_text(json.dumps({"loss": [2.0, 1.0], "grad_norm": [1.0, 1.0]}))
            meta = {"run_s": 0.5, "resolved": {}, "train_s": 0.1, "layout": {}, "fingerprint": {}}
            (out / "run_meta.json").write_text(json.dumps(meta))
        return LaunchResult("ok", 0, 3.0, log_dir, [], {}, [])


@pytest.fixture
def settings(tmp_path: Path) -> e2e.E2ESettings:
    return e2e.E2ESettings.from_env(default_results=tmp_path / "results")


def _run(monkeypatch, tmp_path, settings, dies_in: set[str]) -> tuple[FakeJobs, dict]:
    fake = FakeJobs(dies_in)
    monkeypatch.setattr(e2e, "launch", fake)
    monkeypatch.setattr(e2e, "_RUNS", {})
    runs = e2e.run_layouts(settings, "./toy_config/qwen3_moe_toy/config.json", MODES, tmp_path / "work")
    return fake, runs


def test_all_layouts_of_a_model_share_one_job(monkeypatch, tmp_path, settings):
    fake, runs = _run(monkeypatch, tmp_path, settings, set())
    assert fake.jobs == [["sp1_ep1", "sp1_ep2", "sp2_ep1", "sp2_ep2"]]
    assert [runs[m].status for m in MODES] == ["ok"] * 4
    assert runs[MODES[1]].elapsed_s == 0.5  # its own share, not the whole job's


def test_a_job_dying_in_a_later_layout_loses_only_that_layout(monkeypatch, tmp_path, settings):
    fake, runs = _run(monkeypatch, tmp_path, settings, {"sp1_ep2"})
    assert fake.jobs == [["sp1_ep1", "sp1_ep2", "sp2_ep1", "sp2_ep2"], ["sp2_ep1", "sp2_ep2"]]
    assert [runs[m].status for m in MODES] == ["ok", "crash", "ok", "ok"]
    assert runs[MODES[1]].result.cause() == "rank 1 killed by SIGKILL (first failure)"


def test_a_dead_reference_stops_the_model(monkeypatch, tmp_path, settings):
    fake, runs = _run(monkeypatch, tmp_path, settings, {"sp1_ep1"})
    assert fake.jobs == [["sp1_ep1", "sp1_ep2", "sp2_ep1", "sp2_ep2"]]  # one job, nothing relaunched
    assert list(runs) == [MODES[0]] and runs[MODES[0]].status == "crash"


def _split(records: list[dict]) -> tuple[list[dict], dict]:
    """(the layouts' records, the single-process anchor's record)."""
    anchor = [r for r in records if r["mode"]["id"] == e2e.ANCHOR_ID]
    assert len(anchor) == 1
    return [r for r in records if r is not anchor[0]], anchor[0]


def test_run_case_records_not_run_layouts_with_the_reference_cause(monkeypatch, tmp_path, settings):
    fake = FakeJobs({"sp1_ep1"})
    monkeypatch.setattr(e2e, "launch", fake)
    monkeypatch.setattr(e2e, "_RUNS", {})
    records = e2e.run_case(
        "qwen3_moe", "./toy_config/qwen3_moe_toy/config.json", True, 0.1, 0.1, None, settings, tmp_path / "w"
    )
    layouts, anchor = _split(records)
    assert [r["status"] for r in layouts] == ["error", "not_run", "not_run", "not_run"]
    assert records[0]["cause"] == "rank 1 killed by SIGKILL (first failure)"
    assert layouts[3]["reason"] == "reference sp1_ep1 failed: rank 1 killed by SIGKILL (first failure)"
    assert anchor["status"] == "not_run" and anchor["reason"] == layouts[3]["reason"]  # nothing to anchor


def test_one_job_for_several_models_and_a_dead_reference_drops_only_its_model(
    monkeypatch, tmp_path, settings
):
    """prefetch: llama's reference dies in the shared job; the job is restarted for qwen3_moe alone,
    llama's sp2 layout is not trained, and run_case then launches nothing."""
    fake = FakeJobs({"llama_toy/sp1_ep1"})
    monkeypatch.setattr(e2e, "launch", fake)
    monkeypatch.setattr(e2e, "_RUNS", {})
    models = [
        ("./toy_config/llama_toy/config.json", False, None),
        ("./toy_config/qwen3_moe_toy/config.json", True, None),
    ]
    e2e.prefetch(settings, models, tmp_path / "shared")
    moe = ["qwen3_moe_toy/" + m.id for m in MODES]
    assert fake.jobs == [
        ["llama_toy/sp1_ep1", "llama_toy/sp2_ep1", *moe],
        ["sp1_ep1", "sp1_ep2", "sp2_ep1", "sp2_ep2"],
    ]
    records = e2e.run_case("llama", models[0][0], False, 0.1, 0.1, None, settings, tmp_path / "llama")
    assert [r["status"] for r in _split(records)[0]] == ["error", "not_run"]
    records = e2e.run_case("qwen3_moe", models[1][0], True, 0.1, 0.1, None, settings, tmp_path / "moe")
    layouts, anchor = _split(records)
    assert [r["status"] for r in layouts] == ["ok"] * 4
    assert anchor["status"] == "ok"  # the single-process run needs no launch
    assert len(fake.jobs) == 2  # run_case found everything in the cache


def test_the_anchor_record_carries_its_own_fp32_tolerance_on_a_bf16_run(settings):
    """On the H200 (bf16) the layouts carry the bf16 tolerance; the fp32 CPU anchor carried it too, and
    the merge rejected every GPU e2e run ("tolerance rtol=0.1 atol=0.1 is looser than the registry
    allows ... (float32: ...)"). The anchor holds its own dtype's tolerance; the comparison with the
    layout reads the layout's."""
    from parity.results import merge, registry
    from parity.results.records import Tolerance

    bf16 = Tolerance(0.1, 0.1)  # what a bf16 run of qwen3 carries in e2e
    rec = e2e.single_process_record("qwen3", "./toy_config/qwen3_toy/config.json", settings, False, bf16)
    assert rec["status"] == "ok" and rec["fingerprint"]["dtype"] == "float32"
    case = next(c for c in registry.cases() if c.id == "qwen3")
    ceiling = merge.tolerance_ceiling(case, "e2e", "float32")
    assert ceiling is not None
    assert rec["tolerance"]["rtol"] <= ceiling.rtol and rec["tolerance"]["atol"] <= ceiling.atol
    # control: the bf16 tolerance on this fp32 record is what the merge's ceiling rule refuses
    assert bf16.rtol > ceiling.rtol or bf16.atol > ceiling.atol
    # the comparison with the layout uses the layout's tolerance, so a bf16 layout is still held at bf16
    layout = {"tolerance": {"rtol": bf16.rtol, "atol": bf16.atol}, "first_step": rec["first_step"]}
    problems, worst = e2e.first_step_problems(layout, rec)
    assert problems == [] and worst is not None and worst.allowed >= bf16.atol
