"""The merge must pass good evidence, and fail loudly and specifically on every planted fault."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from conftest import make_record

from parity.results.merge import EXIT_BREACH, EXIT_INVALID, EXIT_OK, main, merge


def problems(report) -> str:
    return "\n".join(msg for _, msg in report.problems)


def test_clean_run_passes_and_writes_summary(folder, capsys):
    folder.add_run()
    folder.add_model()
    assert main(["--results", str(folder.root)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "hf_attn-sdpa" in out and "PASS" in out and "REF" in out
    summary = json.loads((folder.root / "summary.json").read_text())
    assert summary["exit_code"] == 0
    rows = {r["mode"]: r for r in summary["rows"]}
    assert float(rows["hf_attn-sdpa"]["max_abs"]) == pytest.approx(1e-4, rel=1e-3)
    assert "| qwen3 |" in (folder.root / "summary.md").read_text()


def test_planted_ten_percent_loss_change_is_a_breach_naming_the_model(folder, capsys):
    folder.add_run()
    path = folder.add_model()
    folder.edit(
        path, lambda p: p["records"][1]["metrics"].update(loss=p["records"][1]["metrics"]["loss"] * 1.1)
    )
    assert main(["--results", str(folder.root)]) == EXIT_BREACH
    err = capsys.readouterr().err
    assert "qwen3" in err and "hf_attn-sdpa" in err and "loss" in err


def test_grad_norm_breach_is_caught_too(folder):
    folder.add_run()
    path = folder.add_model()
    folder.edit(path, lambda p: p["records"][1]["metrics"].update(grad_norm=2.0))
    report = merge(folder.root)
    assert report.exit_code == EXIT_BREACH and "grad_norm" in problems(report)


def test_resolved_backend_mismatch_is_invalid(folder):
    """transformers silently fell back: sdpa was requested, eager ran."""
    folder.add_run()
    folder.add_model(
        records=[
            make_record("hf_attn-eager", "eager", None, 5.5, 1.2),
            make_record("hf_attn-sdpa", "sdpa", None, 5.5, 1.2, resolved_attn="eager"),
        ]
    )
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID
    assert "requested 'sdpa', ran 'eager'" in problems(report)


def test_resolved_experts_mismatch_is_invalid(folder):
    folder.add_run()
    folder.add_model(
        records=[
            make_record("hf_attn-eager_moe-eager", "eager", "eager", 5.5, 1.2),
            make_record(
                "hf_attn-eager_moe-grouped_mm", "eager", "grouped_mm", 5.5, 1.2, resolved_moe="eager"
            ),
        ]
    )
    assert "moe_implementation: requested 'grouped_mm', ran 'eager'" in problems(merge(folder.root))


@pytest.mark.parametrize(
    "metrics, why",
    [
        ({"loss": math.nan, "grad_norm": 1.0}, "non-finite loss"),
        ({"loss": 5.0, "grad_norm": 0.0}, "zero grad_norm"),
        ({"loss": 5.0, "grad_norm": math.inf}, "non-finite grad_norm"),
    ],
)
def test_dead_runs_are_refused_even_when_they_agree(folder, metrics, why):
    """Two dead runs agree perfectly; that proves nothing."""
    folder.add_run()
    recs = [
        make_record("hf_attn-eager", "eager", None, 1, 1),
        make_record("hf_attn-sdpa", "sdpa", None, 1, 1),
    ]
    for r in recs:
        r["metrics"] = dict(metrics)
    folder.add_model(records=recs)
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID and why in problems(report)


def test_flat_loss_over_steps_is_dead():
    from parity.results.compare import vacuity

    assert "does not move" in vacuity({"loss": [2.0, 2.0, 2.0], "grad_norm": [1, 1, 1]})
    assert vacuity({"loss": [2.0, 1.9], "grad_norm": [1, 1]}) is None
    assert "expected 4 steps" in vacuity({"loss": [2.0, 1.9], "grad_norm": [1, 1]}, expected_steps=4)


def test_missing_mode_is_invalid(folder):
    folder.add_run()
    folder.add_model(expected=["hf_attn-eager", "hf_attn-sdpa", "hf_attn-flash_attention_2"])
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID and "hf_attn-flash_attention_2: no record" in problems(report)


def test_model_in_manifest_without_results_is_missing(folder):
    folder.add_run(models=("qwen3", "qwen3_moe"))
    folder.add_model("qwen3")
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID and "qwen3_moe: no results were written" in problems(report)


def test_mode_that_raised_is_a_failure(folder):
    folder.add_run()
    bad = make_record("hf_attn-sdpa", "sdpa", None, 0, 0)
    bad.update(
        status="error", error="Traceback...\nRuntimeError: shapes do not match", metrics={}, resolved={}
    )
    folder.add_model(records=[make_record("hf_attn-eager", "eager", None, 5.5, 1.2), bad])
    report = merge(folder.root)
    assert report.exit_code == EXIT_BREACH and "shapes do not match" in problems(report)


def test_skipped_variant_passes_unless_required(folder):
    folder.add_run()
    folder.add_model()
    folder.add_run("fa2", status="skipped", reason="fa2 needs a CUDA GPU: nvidia-smi not found")
    report = merge(folder.root)
    assert report.exit_code == EXIT_OK
    assert any(r.verdict == "SKIPPED" and "nvidia-smi" in r.detail for r in report.rows)
    required = merge(folder.root, require=["fa2"])
    assert required.exit_code == EXIT_INVALID and "skipped but is required" in problems(required)
    assert merge(folder.root, require=["fa3"]).exit_code == EXIT_INVALID  # never ran at all


def _fa2_run_with_modes_that_did_not_run(folder) -> None:
    """An fa2 run of qwen3 where transformers refused FA2 (unsupported) and parity's FA2 was skipped."""
    folder.add_run("fa2")
    refused = make_record("hf_attn-flash_attention_2", "flash_attention_2", None, 0, 0)
    refused.update(status="unsupported", reason="ValueError: Qwen3 does not support Flash Attention 2.0")
    skipped = make_record("parity_attn-parity_flash_attention_2_with_sp", "parity_fa2", None, 0, 0)
    skipped.update(status="skipped", reason="flash kernels need a CUDA device (this run: cpu)")
    folder.add_model(
        variant="fa2",
        records=[
            make_record("hf_attn-eager", "eager", None, 5.5513, 1.234),
            make_record("hf_attn-sdpa", "sdpa", None, 5.5514, 1.2341),
            refused,
            skipped,
        ],
    )


def test_require_fails_on_a_mode_that_did_not_run_and_names_it(folder, capsys):
    _fa2_run_with_modes_that_did_not_run(folder)
    # negative control: the same results pass without --require (they count as skips)
    assert main(["--results", str(folder.root)]) == EXIT_OK
    capsys.readouterr()
    assert main(["--results", str(folder.root), "--require", "fa2"]) == EXIT_INVALID
    captured = capsys.readouterr()
    err = captured.err
    assert (
        "patch(fa2) qwen3 mode hf_attn-flash_attention_2: unsupported but --require fa2 needs every mode"
        in err
    )
    assert "Qwen3 does not support Flash Attention 2.0" in err
    assert "patch(fa2) qwen3 mode parity_attn-parity_flash_attention_2_with_sp: skipped" in err
    assert "flash kernels need a CUDA device" in err
    assert "--require fa2: 2 mode(s) did not run: qwen3 hf_attn-flash_attention_2 (unsupported); " in err
    assert "verdict=invalid exit=2" in captured.out
    assert "required (--require fa2): UNSUPPORTED" not in captured.out  # the detail, not the verdict
    assert "required (--require fa2)" in captured.out  # the table marks both rows
    # only the required variant's modes count: requiring the eager variant (all modes ran) passes
    folder.add_run()
    folder.add_model()
    assert merge(folder.root, require=["eager"]).exit_code == EXIT_OK


def test_require_fails_on_a_mode_the_registry_declares_unsupported(folder, monkeypatch):
    """A declaration is a reason, not a run: --require still fails, and the message says it is declared."""
    from parity.results import registry

    _fa2_run_with_modes_that_did_not_run(folder)
    real = registry.cases

    def cases():
        planted = {"flash_attention_2": "planted declaration"}
        return [dataclasses.replace(c, unsupported=planted) if c.id == "qwen3" else c for c in real()]

    monkeypatch.setattr(registry, "cases", cases)
    assert merge(folder.root).exit_code == EXIT_OK
    report = merge(folder.root, require=["fa2"])
    assert report.exit_code == EXIT_INVALID
    assert "hf_attn-flash_attention_2: unsupported (declared in the registry) but --require fa2" in problems(
        report
    )
    assert "parity_flash_attention_2_with_sp: skipped but" in problems(report)  # not declared: plain


@pytest.mark.parametrize(
    "content, why",
    [
        ("{not json", "invalid JSON at line 1"),
        ("[1, 2]", "top level must be a JSON object"),
        ('{"hello": "world"}', "not a parity record"),
        ('{"schema": "parity.records/99", "kind": "results"}', "is not supported"),
        ('{"schema": "parity.records/2", "kind": "weird"}', "unknown record kind"),
    ],
)
def test_corrupt_or_foreign_json_is_invalid_and_named(folder, content, why):
    folder.add_run()
    folder.add_model()
    bad = folder.root / "patch" / "eager" / "stray.json"
    bad.write_text(content)
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID
    assert str(bad) in problems(report) and why in problems(report)


def test_record_with_bad_tolerance_is_invalid(folder):
    folder.add_run()
    path = folder.add_model()
    folder.edit(path, lambda p: p["records"][1]["tolerance"].update(rtol=-1))
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID and "bad tolerance" in problems(report)


def test_record_missing_fingerprint_field_is_invalid(folder):
    folder.add_run()
    path = folder.add_model()
    folder.edit(path, lambda p: p["records"][0]["fingerprint"].pop("config_hash"))
    assert "fingerprint lacks config_hash" in problems(merge(folder.root))


def test_empty_and_absent_results_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--results", str(tmp_path / "empty")]) == EXIT_INVALID
    assert "no parity records" in capsys.readouterr().err
    assert main(["--results", str(tmp_path / "nope")]) == EXIT_INVALID
    assert "does not exist" in capsys.readouterr().err


def test_anchors_across_variants_must_agree(folder):
    folder.add_run("eager")
    folder.add_model(variant="eager")
    folder.add_run("fa2")
    fa2 = [
        make_record("hf_attn-eager", "eager", None, 5.5513, 1.234),
        make_record("hf_attn-flash_attention_2", "flash_attention_2", None, 5.5513, 1.234),
    ]
    path = folder.add_model(variant="fa2", records=fa2)
    assert merge(folder.root).exit_code == EXIT_OK
    folder.edit(path, lambda p: p["records"][0]["metrics"].update(loss=6.5))
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID and "references disagree" in problems(report)


def test_anchors_from_different_seeds_are_not_comparable(folder):
    """(A different config is refused earlier, as stale: see test_merge_provenance.py.)"""
    folder.add_run("eager")
    folder.add_model(variant="eager")
    folder.add_run("fa2")
    path = folder.add_model(variant="fa2")
    folder.edit(path, lambda p: [r["fingerprint"].update(seed=1) for r in p["records"]])
    assert "seed differs" in problems(merge(folder.root))


def test_e2e_style_series_compare_per_step(folder):
    folder.add_run()
    recs = [make_record("ref", "eager", None, 0, 0), make_record("sp2", "eager", None, 0, 0)]
    recs[0]["metrics"] = {"loss": [5.0, 4.0, 3.5, 3.0], "grad_norm": [1.0, 0.9, 0.8, 0.7]}
    recs[1]["metrics"] = {"loss": [5.0, 4.0, 3.9, 3.0], "grad_norm": [1.0, 0.9, 0.8, 0.7]}
    folder.add_model(records=recs)
    report = merge(folder.root)
    assert report.exit_code == EXIT_BREACH and "loss[step 2]" in problems(report)


def test_models_filter(folder):
    folder.add_run(models=("qwen3", "llama"))
    folder.add_model("qwen3")
    assert merge(folder.root, models=["qwen3"]).exit_code == EXIT_OK
    assert merge(folder.root).exit_code == EXIT_INVALID


def test_all_skipped_is_not_a_pass(folder):
    """A run where every variant was skipped verified nothing, so it must not read as success."""
    folder.add_run("fa2", status="skipped", reason="fa2 needs a CUDA GPU: nvidia-smi not found")
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID and "nothing was compared" in problems(report)


def _parity_record(provider_requested: str, provider_ran: str) -> dict:
    rec = make_record(
        "parity_attn-parity_flash_attention_2_with_sp", "parity_flash_attention_2_with_sp", None, 5.5, 1.2
    )
    rec["requested"]["kernel_provider"] = provider_requested
    rec["resolved"]["kernel_provider"] = provider_ran
    return rec


def test_kernel_provider_must_be_the_one_the_variant_exists_for(folder):
    """A flash backend that quietly ran sdpa (or the wrong library) is not a pass."""
    folder.add_run()
    folder.add_model(
        records=[
            make_record("hf_attn-eager", "eager", None, 5.5, 1.2),
            _parity_record("flash_attn", "flash_attn 2.8.3"),
        ]
    )
    assert merge(folder.root).exit_code == EXIT_OK
    folder.add_model(
        records=[
            make_record("hf_attn-eager", "eager", None, 5.5, 1.2),
            _parity_record("torch.sdpa", "torch.sdpa[fallback]"),
        ]
    )
    report = merge(folder.root)
    assert report.exit_code == EXIT_INVALID and "torch.sdpa[fallback]" in problems(report)


def test_skipped_mode_is_shown_with_its_reason_but_a_skipped_reference_is_invalid(folder):
    folder.add_run()
    skipped = make_record(
        "parity_attn-parity_flash_attention_2_with_sp", "parity_flash_attention_2_with_sp", None, 0, 0
    )
    skipped.update(status="skipped", reason="needs a CUDA device (running on cpu)", metrics={}, resolved={})
    folder.add_model(
        records=[
            make_record("hf_attn-eager", "eager", None, 5.5, 1.2),
            make_record("hf_attn-sdpa", "sdpa", None, 5.5, 1.2),
            skipped,
        ]
    )
    report = merge(folder.root)
    assert report.exit_code == EXIT_OK
    assert any(r.verdict == "SKIPPED" and "CUDA" in r.detail for r in report.rows)
    ref = make_record("hf_attn-eager", "eager", None, 0, 0)
    ref.update(status="skipped", reason="no", metrics={}, resolved={})
    folder.add_model(records=[ref, make_record("hf_attn-sdpa", "sdpa", None, 5.5, 1.2)])
    assert "reference mode hf_attn-eager was skipped" in problems(merge(folder.root))


def test_a_patch_mode_without_per_tensor_evidence_fails():
    """A patch mode compared on loss and grad norm alone (its evidence lost, e.g. a resumed worker that
    had no truth) is a failure, even where both scalars agree; the same record with evidence passes."""
    from parity.results.compare import record_failures

    ref = make_record("hf_attn-eager", "eager", None, 5.5, 1.2)
    other = make_record("hf_attn-sdpa", "sdpa", None, 5.5, 1.2)
    assert record_failures([ref, other]) == []  # control
    del other["evidence"]
    problems = record_failures([ref, other])
    expected = "hf_attn-sdpa: no per-tensor evidence against hf_attn-eager: "
    expected += "compared on loss and grad norm only"
    assert problems == [expected]


def test_malformed_evidence_is_rejected_not_skipped():
    from parity.results.compare import record_failures

    ref = make_record("hf_attn-eager", "eager", None, 5.5, 1.2)
    other = make_record("hf_attn-sdpa", "sdpa", None, 5.5, 1.2)
    other["evidence"]["tensors"] = {"w": [0.1, "x", 1.0]}
    (problem,) = record_failures([ref, other])
    assert "malformed evidence: tensor 'w'" in problem
