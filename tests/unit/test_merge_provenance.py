"""Provenance, malformed values, verdict words and file modes of the merge.

Every check is planted from the test side: a results folder is built from realistic records, then
one thing is corrupted the way it happens in practice (a record copied from another model, a toy
config edited after the run, a file left over from an earlier run, a hand edit). Each case asserts
exit 2 with the file named; the clean folder beside it passes, so the checks cannot fire blindly.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import stat
from pathlib import Path

import pytest
from conftest import ResultsFolder, make_record

from parity.results import merge as merge_mod
from parity.results import registry
from parity.results.merge import EXIT_BREACH, EXIT_INVALID, EXIT_OK, main, merge, remove_summary
from parity.results.records import RESULTS_FILE_MODE, write_json_atomic

ROOT = Path(__file__).resolve().parents[2]


def problems(report) -> str:
    return "\n".join(msg for _, msg in report.problems)


def _clean(folder: ResultsFolder, model: str = "qwen3", variant: str = "eager") -> Path:
    folder.add_run(variant, models=(model,))
    return folder.add_model(model, variant)


def test_clean_folder_passes(folder):
    """The control every case below corrupts: it must pass, so a firing check is the corruption's."""
    _clean(folder)
    report = merge(folder.root)
    assert report.exit_code == EXIT_OK, problems(report)


# ------------------------------------------------------------------------------------------------
# model, suite, file, manifest and registry must agree


def test_record_copied_from_another_model_and_relabelled_is_refused(folder):
    """qwen2's records relabelled qwen3: every label says qwen3, the config hash says qwen2."""
    folder.add_run(models=("qwen2", "qwen3"))
    qwen2 = json.loads(folder.add_model("qwen2").read_text())
    forged = folder.root / "patch" / "eager" / "qwen3.json"
    qwen2["model"] = "qwen3"
    for rec in qwen2["records"]:
        rec["model"] = "qwen3"
    forged.write_text(json.dumps(qwen2))
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID
    assert f"{forged}: record 0 (hf_attn-eager): stale: config changed since this record" in problems(report)
    assert "it is the toy config of qwen2" in problems(report)
    assert any(r.model == "qwen3" and r.verdict == "INVALID" for r in report.rows)
    assert not any(r.model == "qwen3" and r.verdict == "PASS" for r in report.rows)


def test_record_whose_model_field_disagrees_with_its_file_is_refused(folder):
    path = _clean(folder)
    folder.edit(path, lambda p: p["records"][1].update(model="qwen2"))
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID
    assert f"{path}: record 1 (hf_attn-sdpa) says model 'qwen2' but the file is for 'qwen3'" in problems(
        report
    )


def test_file_in_the_wrong_place_is_refused(folder):
    path = _clean(folder)
    copy_path = path.with_name("qwen3_backup.json")
    shutil.copy(path, copy_path)
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID
    assert f"{copy_path}: holds patch(eager) qwen3 but that belongs in {path}" in problems(report)


def test_suite_that_does_not_apply_to_the_model_is_refused(folder):
    path = _clean(folder)
    payload = json.loads(path.read_text())
    payload["suite"] = "vlm_trainer"
    for rec in payload["records"]:
        rec["suite"] = "vlm_trainer"
    bad = folder.root / "vlm_trainer" / "eager" / "qwen3.json"
    write_json_atomic(bad, payload)
    manifest = json.loads((folder.root / "patch" / "eager" / "_run.json").read_text())
    write_json_atomic(bad.with_name("_run.json"), {**manifest, "suite": "vlm_trainer"})
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID
    assert f"{bad}: suite 'vlm_trainer' does not apply to qwen3 (a text model" in problems(report)


def test_model_missing_from_the_registry_is_refused(folder):
    folder.add_run(models=("qwen9",))
    records = [
        make_record("hf_attn-eager", "eager", None, 5.5, 1.2),
        make_record("x", "sdpa", None, 5.5, 1.2),
    ]
    for r in records:
        r["fingerprint"]["config_hash"] = "0" * 64
    path = folder.add_model("qwen9", records=records)
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID
    assert f"{path}: model 'qwen9' is not in the case registry" in problems(report)


def test_file_not_listed_by_the_run_manifest_is_stale(folder):
    """An earlier run of qwen2 left its file; this run (the manifest) only ran qwen3."""
    _clean(folder)
    old = folder.add_model("qwen2")
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID
    assert f"{old}: qwen2 is not in the run manifest of patch(eager) (it ran qwen3)" in problems(report)


def test_file_without_any_run_manifest_is_refused(folder):
    _clean(folder)
    orphan = folder.add_model("qwen3", variant="fa2")
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID
    assert f"{orphan}: no run manifest for patch(fa2)" in problems(report)


def test_file_under_a_skipped_run_is_stale(folder):
    _clean(folder)
    folder.add_run("fa2", models=("qwen3",), status="skipped", reason="no GPU")
    stale = folder.add_model("qwen3", variant="fa2")
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID
    assert f"{stale}: the run manifest says patch(fa2) was skipped" in problems(report)


def test_copied_run_manifest_is_refused(folder):
    _clean(folder)
    src = folder.root / "patch" / "eager" / "_run.json"
    dst = folder.root / "patch" / "fa2" / "_run.json"
    dst.parent.mkdir(parents=True)
    shutil.copy(src, dst)
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID
    assert f"{dst}: run manifest of patch(eager) found outside {src}" in problems(report)


def test_duplicate_mode_records_are_refused(folder):
    """Two records of one mode: which one is the evidence? (the last one used to win)."""
    path = _clean(folder)
    folder.edit(path, lambda p: p["records"].append(copy.deepcopy(p["records"][1])))
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID
    assert f"{path}: mode hf_attn-sdpa is recorded twice (records 1 and 2)" in problems(report)


# ------------------------------------------------------------------------------------------------
# the config a record names, and the tolerance it carries


@pytest.fixture
def toy_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the toy tree that a test may edit (PARITY_TOY_CONFIG_ROOT points at it)."""
    root = tmp_path / "toy_config"
    shutil.copytree(ROOT / "toy_config", root)
    monkeypatch.setenv("PARITY_TOY_CONFIG_ROOT", str(root))
    return root


def _edit_config(toy_copy: Path, model: str) -> None:
    path = toy_copy / f"{model}_toy" / "config.json"
    config = json.loads(path.read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 10
    path.write_text(json.dumps(config, indent=2))


def test_config_changed_since_the_record_is_stale(folder, toy_copy):
    path = _clean(folder)
    assert merge(folder.root).exit_code == EXIT_OK
    _edit_config(toy_copy, "qwen3")
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID
    assert f"{path}: record 0 (hf_attn-eager): stale: config changed since this record" in problems(report)


def test_one_model_from_two_config_revisions_in_one_folder_is_refused(folder, toy_copy):
    """eager ran before the config edit, fa2 after it: the fa2 file is current, the eager one stale."""
    eager = _clean(folder)
    _edit_config(toy_copy, "qwen3")
    folder.add_run("fa2")
    fa2 = folder.add_model(
        variant="fa2",
        records=[
            make_record("hf_attn-eager", "eager", None, 5.5513, 1.234),
            make_record("hf_attn-flash_attention_2", "flash_attention_2", None, 5.5513, 1.234),
        ],
    )
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID
    assert f"{eager}: record 0 (hf_attn-eager): stale" in problems(report)
    assert str(fa2) not in problems(report)


def test_tolerance_looser_than_the_registry_is_refused(folder):
    """rtol 1e6 would let a 10x loss error pass; the registry's case tolerance is the ceiling."""
    path = _clean(folder)

    def plant(p: dict) -> None:
        p["records"][1]["tolerance"] = {"rtol": 1e6, "atol": 1e-5}
        p["records"][1]["metrics"]["loss"] *= 10

    folder.edit(path, plant)
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID
    assert f"{path}: record 1 (hf_attn-sdpa): tolerance rtol=1e+06 atol=1e-05 is looser" in problems(report)
    assert not any(r.verdict == "PASS" for r in report.rows)


def test_fp32_record_with_the_bf16_tolerance_is_refused(folder):
    """1e-2 is the bf16 ceiling; in float32 it is capped at rtol 1e-4 / atol 1e-5."""
    path = _clean(folder)
    folder.edit(path, lambda p: p["records"][1].update(tolerance={"rtol": 1e-2, "atol": 1e-2}))
    assert "float32: rtol=0.0001 atol=1e-05" in problems(merge(folder.root))
    folder.edit(path, lambda p: [r["fingerprint"].update(dtype="bfloat16") for r in p["records"]])
    assert merge(folder.root).exit_code == EXIT_OK


def test_unreadable_registry_is_invalid_not_a_traceback(folder, tmp_path, monkeypatch, capsys):
    _clean(folder)
    empty = tmp_path / "no_toys"
    empty.mkdir()
    monkeypatch.setenv("PARITY_TOY_CONFIG_ROOT", str(empty))
    assert main(["--results", str(folder.root)]) == EXIT_INVALID
    assert "the case registry cannot be read" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# one revision and one set of versions per comparison


def test_records_from_two_revisions_in_one_file_are_refused_unless_allowed(folder, capsys):
    path = _clean(folder)
    folder.edit(path, lambda p: p["records"][1]["fingerprint"].update(git_revision="def"))
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID
    assert f"{path}: record 1 (hf_attn-sdpa) comes from another environment" in problems(report)
    assert "git_revision def vs abc" in problems(report)

    assert main(["--results", str(folder.root), "--allow-mixed"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "--allow-mixed: records from different git revisions" in out
    summary = json.loads((folder.root / "summary.json").read_text())
    assert summary["allow_mixed"] is True
    row = next(r for r in summary["rows"] if r["mode"] == "hf_attn-sdpa")
    assert row["verdict"] == "PASS" and row["detail"] == "mixed: git_revision def vs abc"


def test_anchors_from_two_torch_versions_are_refused_unless_allowed(folder):
    _clean(folder)
    folder.add_run("fa2")
    fa2 = folder.add_model(
        variant="fa2",
        records=[
            make_record("hf_attn-eager", "eager", None, 5.5513, 1.234),
            make_record("hf_attn-flash_attention_2", "flash_attention_2", None, 5.5513, 1.234),
        ],
    )
    folder.edit(fa2, lambda p: [r["fingerprint"].update(torch="2.12.0") for r in p["records"]])
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID
    assert "mixed environments (torch 2.12.0 vs 2.13.0+cpu)" in problems(report)
    allowed = merge(folder.root, allow_mixed=True)
    assert allowed.exit_code == EXIT_OK
    anchor = next(r for r in allowed.rows if r.mode.startswith("anchor"))
    assert anchor.detail == "mixed: torch 2.12.0 vs 2.13.0+cpu"


# ------------------------------------------------------------------------------------------------
# malformed values: exit 2 with file and field, never a traceback


def _set(path: list, value):
    def edit(payload: dict) -> None:
        target = payload
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


MALFORMED = [
    (["records", 1, "metrics", "loss"], ["abc"], "metrics.loss must hold numbers, got 'abc'"),
    (["records", 1, "metrics", "loss"], [], "metrics.loss is an empty list"),
    (["records", 1, "metrics", "grad_norm"], [1.0, None], "metrics.grad_norm must hold numbers, got None"),
    (["records", 1, "metrics", "loss"], True, "metrics.loss must be a number"),
    (["records", 1, "expected_steps"], "4", "'expected_steps' must be a positive integer"),
    (["records", 1, "resolved", "attn_implementation"], "", "resolved.attn_implementation must be"),
    (["records", 1, "resolved", "attn_implementation"], 3, "resolved.attn_implementation must be"),
    (["records", 1, "fingerprint", "torch"], 2.13, "fingerprint.torch must be a non-blank string"),
    (["records", 1, "fingerprint", "config_hash"], None, "fingerprint.config_hash must be"),
    (["records", 1, "fingerprint", "seed"], "0", "fingerprint.seed must be an integer"),
    (["records", 1, "mode", "id"], "  ", "'mode.id' must be a non-blank string"),
    (["records", 1, "model"], None, "field 'model' must be a non-blank string"),
    (["records", 1, "cause"], "", "field 'cause' must be a non-blank string"),
    (["records", 1, "tolerance", "rtol"], "1e-2", "bad tolerance"),
    (["expected_modes"], ["hf_attn-eager", "hf_attn-eager"], "lists hf_attn-eager more than once"),
    (["model"], "", "field 'model' must be a non-blank string"),
]


@pytest.mark.parametrize(
    ("path", "value", "why"), MALFORMED, ids=[f"{'.'.join(map(str, p))}={v!r}" for p, v, _ in MALFORMED]
)
def test_malformed_value_is_invalid_naming_file_and_field(folder, capsys, path, value, why):
    file = _clean(folder)
    folder.edit(file, _set(path, value))
    assert main(["--results", str(folder.root)]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert str(file) in err and why in err
    assert "Traceback" not in err


@pytest.mark.parametrize("error", ["", "   \n  ", None])
def test_error_record_without_error_text_is_invalid(folder, capsys, error):
    path = _clean(folder)
    folder.edit(path, lambda p: p["records"][1].update(status="error", error=error, metrics={}))
    assert main(["--results", str(folder.root)]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert str(path) in err and "an error record needs a non-blank 'error'" in err


def test_malformed_manifest_values_are_invalid(folder, capsys):
    _clean(folder)
    manifest = folder.root / "patch" / "eager" / "_run.json"
    folder.edit(manifest, lambda p: p.update(exit_code="0"))
    assert main(["--results", str(folder.root)]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert str(manifest) in err and "'exit_code' must be an integer or null" in err


BAD_VALUES = [None, "", "abc", [], ["abc"], {}, {"x": 1}, -1, 0, True, math.nan, 1e308]


def _leaves(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from _leaves(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield prefix + (index,)
            yield from _leaves(value, prefix + (index,))


def test_no_value_anywhere_makes_the_merge_raise(folder, monkeypatch):
    """Every field of a results file and its manifest, replaced by each of a dozen bad values: the merge
    returns 0/1/2 and never raises (a hand-edited or truncated file is evidence, not a crash)."""
    shared = merge_mod._RegistryView()  # the toy configs do not change here: read them once
    monkeypatch.setattr(merge_mod, "_RegistryView", lambda *args, **kwargs: shared)
    results_file = _clean(folder)
    manifest_file = folder.root / "patch" / "eager" / "_run.json"
    tried = 0
    for target in (results_file, manifest_file):
        original = target.read_text()
        payload = json.loads(original)
        for leaf in list(_leaves(payload)):
            for value in BAD_VALUES:
                edited = copy.deepcopy(payload)
                _set(list(leaf), value)(edited)
                target.write_text(json.dumps(edited))
                report = merge(folder.root)
                assert report.exit_code in (EXIT_OK, EXIT_BREACH, EXIT_INVALID), (leaf, value)
                crashed = [m for _, m in report.problems if "cannot be merged" in m]
                assert not crashed, (leaf, value, crashed)
                tried += 1
        target.write_text(original)
    assert tried > 500
    assert merge(folder.root).exit_code == EXIT_OK  # restored: the control still passes


# ------------------------------------------------------------------------------------------------
# the verdict in words, for CI behind nox; summary files


@pytest.mark.parametrize(
    ("plant", "verdict", "code"),
    [
        (None, "pass", EXIT_OK),
        (lambda p: p["records"][1]["metrics"].update(loss=99.0), "breach", EXIT_BREACH),
        (lambda p: p["records"][1]["metrics"].update(loss=["abc"]), "invalid", EXIT_INVALID),
    ],
)
def test_summary_and_last_line_carry_the_verdict(folder, capsys, plant, verdict, code):
    path = _clean(folder)
    if plant:
        folder.edit(path, plant)
    assert main(["--results", str(folder.root)]) == code
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith(f"parity merge: verdict={verdict} exit={code} ")
    summary = json.loads((folder.root / "summary.json").read_text())
    assert summary["verdict"] == verdict and summary["exit_code"] == code
    assert f"verdict: {verdict} (exit code {code})" in (folder.root / "summary.md").read_text()


def test_results_and_summary_files_are_readable_by_others(folder):
    path = _clean(folder)
    write_json_atomic(path, json.loads(path.read_text()))
    assert main(["--results", str(folder.root)]) == EXIT_OK
    for produced in (path, folder.root / "summary.json", folder.root / "summary.md"):
        assert stat.S_IMODE(produced.stat().st_mode) == RESULTS_FILE_MODE == 0o644, produced


def test_remove_summary_deletes_the_previous_verdict(folder):
    _clean(folder)
    assert main(["--results", str(folder.root)]) == EXIT_OK
    assert (folder.root / "summary.json").exists()
    remove_summary(folder.root)
    assert not (folder.root / "summary.json").exists() and not (folder.root / "summary.md").exists()
    remove_summary(folder.root)  # nothing to remove is fine


# ------------------------------------------------------------------------------------------------
# failed references: one-line cause, layouts not run


def _e2e_like(folder: ResultsFolder) -> Path:
    folder.add_run(models=("qwen3",))
    ref = make_record("sp1_ep1", "eager", None, 0, 0)
    ref.update(
        status="error",
        error='parity.launch: CRASH after 9.1s\n  --- rank 0 faulthandler output ---\n    File "x.py"',
        cause="rank 1 killed by SIGKILL (first failure: rank 1)",
        metrics={},
    )
    rest = []
    for mode in ("sp1_ep2", "sp2_ep1"):
        rec = make_record(mode, "eager", None, 0, 0)
        rec.update(status="not_run", reason="reference sp1_ep1 failed: rank 1 killed by SIGKILL", metrics={})
        rest.append(rec)
    return folder.add_model(records=[ref, *rest])


def test_failed_reference_names_its_root_cause_and_the_rest_read_not_run(folder):
    _e2e_like(folder)
    report = merge(folder.root)
    assert report.exit_code == EXIT_BREACH, problems(report)
    rows = {r.mode: r for r in report.rows}
    assert rows["sp1_ep1"].verdict == "ERROR"
    assert rows["sp1_ep1"].detail == "rank 1 killed by SIGKILL (first failure: rank 1)"
    assert rows["sp1_ep2"].verdict == "REF-FAILED"
    assert rows["sp1_ep2"].detail == "not run: reference sp1_ep1 failed: rank 1 killed by SIGKILL"


def test_not_run_beside_a_healthy_reference_is_invalid(folder):
    path = _e2e_like(folder)
    folder.edit(path, lambda p: p["records"][0].update(status="ok", metrics={"loss": 5.5, "grad_norm": 1.2}))
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID
    assert "recorded as not run" in problems(report) and "did not fail" in problems(report)


def test_error_without_cause_shows_the_last_line_of_the_error(folder):
    path = _clean(folder)
    folder.edit(
        path,
        lambda p: p["records"][1].update(
            status="error", error="Traceback\n  File x\nValueError: bad\n\n", metrics={}
        ),
    )
    rows = {r.mode: r for r in merge(folder.root).rows}
    assert rows["hf_attn-sdpa"].detail == "ValueError: bad"


def test_registry_hash_of_the_models_is_what_the_fixture_uses():
    """The fixture relabels nothing by accident: its default records carry qwen3's real config hash."""
    assert registry.config_hash("qwen3") != registry.config_hash("qwen2")
