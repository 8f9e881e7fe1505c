"""Record writing/reading: atomic files, tolerance validation."""

from __future__ import annotations

import math

import pytest

from parity.results.records import RecordError, ResultsWriter, Tolerance, load_results_file


@pytest.mark.parametrize(
    "rtol, atol",
    [
        (0, 1e-2),
        (-1e-2, 1e-2),
        (1e-2, math.nan),
        ("0.01", 1e-2),
        (True, 1e-2),
        (1e-2, math.inf),
        (None, 1e-2),
    ],
)
def test_bad_tolerance_is_rejected_with_its_value(rtol, atol):
    with pytest.raises(ValueError, match="must be a positive"):
        Tolerance(rtol, atol)


def test_tolerance_is_isclose_semantics():
    tol = Tolerance(1e-2, 1e-3)
    assert tol.allows(1.0105, 1.0) and not tol.allows(1.0115, 1.0)
    assert tol.allows(0.0009, 0.0) and not tol.allows(0.0011, 0.0)


def test_writer_rewrites_after_each_record_so_a_crash_keeps_finished_modes(tmp_path):
    from conftest import make_record

    writer = ResultsWriter(tmp_path, "patch", "eager", "qwen3", ["a", "b"])
    loaded = load_results_file(writer.path)
    assert loaded.records == [] and loaded.expected_modes == ["a", "b"]
    writer.add(make_record("a", "eager", None, 1.0, 1.0))
    loaded = load_results_file(writer.path)
    assert [r["mode"]["id"] for r in loaded.records] == ["a"]
    assert not [p for p in writer.path.parent.iterdir() if p.name.startswith(".")], "temp file left behind"


def test_record_without_metrics_numbers_is_invalid(tmp_path):
    from conftest import make_record

    writer = ResultsWriter(tmp_path, "patch", "eager", "qwen3", ["a"])
    rec = make_record("a", "eager", None, 1.0, 1.0)
    rec["metrics"] = {"loss": "5.0", "grad_norm": 1.0}
    writer.add(rec)
    with pytest.raises(RecordError, match="metrics.loss must be a number"):
        load_results_file(writer.path)
