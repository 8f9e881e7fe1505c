"""Metrics records: the one contract between the suites and the merge step.

Suites run in per-variant environments (each with its own torch, transformers and kernels) and the
merge runs in nox's own interpreter, which may have no torch at all. JSON files are the only thing
that crosses that boundary, so the schema is versioned and validated here, with the standard
library only. A file that does not validate is never silently skipped: the merge reports it.

Layout under a results folder::

    <results>/<suite>/<variant>/_run.json      one per session run: what was asked, ran or skipped
    <results>/<suite>/<variant>/<model>.json   one per (variant, model): a list of per-mode records

A results file is rewritten atomically after every mode, so a run that dies half-way leaves the
modes it finished plus the list of expected modes, and the merge can say exactly which are missing.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# /2: per-tensor evidence and fingerprints, unsupported status, e2e step-0 and layout evidence
SCHEMA = "parity.records/2"
RUN_KIND = "run"
RESULTS_KIND = "results"

#: ok: ran; error: raised; skipped: this machine cannot run it; unsupported: the model cannot;
#: not_run: not attempted because the reference of the same file failed (its ``reason`` says so).
MODE_STATUSES = ("ok", "error", "skipped", "unsupported", "not_run")
#: Statuses that must say why in a non-blank ``reason``.
REASON_STATUSES = ("skipped", "unsupported", "not_run")
#: Mode of every results file: readable by the people and CI jobs that merge them (mkstemp gives 0600).
RESULTS_FILE_MODE = 0o644
#: Fields every per-mode record must carry.
RECORD_FIELDS = ("mode", "status", "requested", "resolved", "metrics", "tolerance", "fingerprint")
#: Fingerprint keys that must be present (values may be null where they do not apply, e.g. cuda on CPU).
FINGERPRINT_FIELDS = (
    "python",
    "torch",
    "cuda",
    "transformers",
    "flash_attn",
    "flash_attn_3",
    "device",
    "compute_capability",
    "dtype",
    "seed",
    "git_revision",
    "config_hash",
)


class RecordError(ValueError):
    """A results file is unreadable, foreign or inconsistent; the message names the file."""


@dataclass(frozen=True)
class Tolerance:
    """Per-case tolerance, |x - ref| <= atol + rtol * |ref| (torch.isclose semantics)."""

    rtol: float
    atol: float

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")

    def allows(self, value: float, reference: float) -> bool:
        return abs(value - reference) <= self.atol + self.rtol * abs(reference)

    def to_json(self) -> dict[str, float]:
        return {"rtol": float(self.rtol), "atol": float(self.atol)}


@dataclass
class RunManifest:
    """What one session run was asked to do, and whether it ran at all."""

    suite: str
    variant: str
    models: list[str]
    status: str  # "ran" | "skipped" | "failed"
    reason: str = ""
    exit_code: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # where it was read from (not written)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "kind": RUN_KIND,
            "suite": self.suite,
            "variant": self.variant,
            "models": list(self.models),
            "status": self.status,
            "reason": self.reason,
            "exit_code": self.exit_code,
            **({"extra": self.extra} if self.extra else {}),
        }


@dataclass
class ResultsFile:
    """All records of one model in one variant of one suite."""

    suite: str
    variant: str
    model: str
    expected_modes: list[str]
    records: list[dict[str, Any]]
    path: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "kind": RESULTS_KIND,
            "suite": self.suite,
            "variant": self.variant,
            "model": self.model,
            "expected_modes": list(self.expected_modes),
            "records": list(self.records),
        }


def make_record(
    *,
    suite: str,
    model: str,
    variant: str,
    mode: dict[str, Any],
    status: str,
    tolerance: Tolerance | dict[str, float],
    fingerprint: dict[str, Any],
    requested: dict[str, Any] | None = None,
    resolved: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    reason: str | None = None,
    error: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The one builder of per-mode records: every suite and check worker goes through it.

    ``mode`` must carry a string ``id``; the rest of the schema is filled with empty objects where a
    suite has nothing to say (a freeze check requests no backend), so the merge reads one shape.
    """
    record: dict[str, Any] = {
        "suite": suite,
        "model": model,
        "variant": variant,
        "mode": dict(mode),
        "status": status,
        "requested": dict(requested or {}),
        "resolved": dict(resolved or {}),
        "metrics": dict(metrics or {}),
        "tolerance": tolerance.to_json() if isinstance(tolerance, Tolerance) else dict(tolerance),
        "fingerprint": dict(fingerprint),
        **extra,
    }
    if reason is not None:
        record["reason"] = reason
    if error is not None:
        record["error"] = error
    return record


def run_manifest_path(results: Path, suite: str, variant: str) -> Path:
    return Path(results) / suite / variant / "_run.json"


def results_path(results: Path, suite: str, variant: str, model: str) -> Path:
    return Path(results) / suite / variant / f"{model}.json"


def write_text_atomic(path: Path, text: str) -> None:
    """The same temp-file + rename + 0644 for text outputs (``summary.md``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, RESULTS_FILE_MODE)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write via a temp file + rename so a reader never sees half a file, even if we are killed.

    The file is made 0644 (``mkstemp`` creates 0600), so a CI job or a colleague under another user
    can read the evidence.
    """
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, allow_nan=True) + "\n")


def read_json_object(path: Path, error: type[ValueError]) -> dict[str, Any]:
    """A JSON object from ``path``, or ``error`` naming the file, line and column: every file the
    results layer reads (records, toy configs) is either this or a clear refusal."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise error(f"{path}: missing file") from exc
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(payload, dict):
        raise error(f"{path}: top level must be a JSON object, got {type(payload).__name__}")
    return payload


def _load(path: Path) -> dict[str, Any]:
    payload = read_json_object(path, RecordError)
    schema = payload.get("schema")
    if schema != SCHEMA:
        if isinstance(schema, str) and schema.startswith("parity.records/"):
            raise RecordError(
                f"{path}: schema {schema!r} is not supported by this merge (expects {SCHEMA!r})"
            )
        raise RecordError(f"{path}: not a parity record (schema {schema!r}, expected {SCHEMA!r})")
    return payload


def _require(path: Path, payload: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in payload:
        raise RecordError(f"{path}: missing field {key!r}")
    value = payload[key]
    if not isinstance(value, kind):
        raise RecordError(f"{path}: field {key!r} has type {type(value).__name__}")
    return value


def validate_record(path: Path, record: Any, index: int) -> dict[str, Any]:
    """Check one per-mode record; raise RecordError naming the file, the record and the field."""
    where = f"{path}: record {index}"
    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected an object")
    for key in RECORD_FIELDS:
        if key not in record:
            raise RecordError(f"{where}: missing field {key!r}")
    mode = record["mode"]
    if not isinstance(mode, dict) or not isinstance(mode.get("id"), str):
        raise RecordError(f"{where}: field 'mode' must be an object with a string 'id'")
    if record["status"] not in MODE_STATUSES:
        raise RecordError(
            f"{where} ({mode['id']}): status must be one of {', '.join(MODE_STATUSES)}, "
            f"got {record['status']!r}"
        )
    if record["status"] in REASON_STATUSES and not _non_blank(record.get("reason")):
        raise RecordError(f"{where} ({mode['id']}): a {record['status']} mode must say why ('reason')")
    for key in ("requested", "resolved"):
        if not isinstance(record[key], dict):
            raise RecordError(f"{where} ({mode['id']}): field {key!r} must be an object")
    metrics = record["metrics"]
    if not isinstance(metrics, dict):
        raise RecordError(f"{where} ({mode['id']}): field 'metrics' must be an object")
    if record["status"] == "ok":
        for key in ("loss", "grad_norm"):
            value = metrics.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float | list):
                raise RecordError(
                    f"{where} ({mode['id']}): metrics.{key} must be a number or a list of numbers"
                )
    tol = record["tolerance"]
    if not isinstance(tol, dict):
        raise RecordError(f"{where} ({mode['id']}): field 'tolerance' must be an object")
    try:
        Tolerance(tol.get("rtol"), tol.get("atol"))
    except ValueError as exc:
        raise RecordError(f"{where} ({mode['id']}): bad tolerance: {exc}") from exc
    fingerprint = record["fingerprint"]
    if not isinstance(fingerprint, dict):
        raise RecordError(f"{where} ({mode['id']}): field 'fingerprint' must be an object")
    missing = [key for key in FINGERPRINT_FIELDS if key not in fingerprint]
    if missing:
        raise RecordError(f"{where} ({mode['id']}): fingerprint lacks {', '.join(missing)}")
    validate_values(f"{where} ({mode['id']})", record)
    return record


def _non_blank(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


#: Fingerprint values the merge reads: (field, may it be null). A number or a blank string where a
#: version or a hash belongs would compare "equal" to nothing and hide a mixed environment.
_FINGERPRINT_TYPES = {
    "python": False,
    "torch": False,
    "cuda": True,
    "transformers": True,
    "flash_attn": True,
    "flash_attn_3": True,
    "device": False,
    "compute_capability": True,
    "dtype": False,
    "git_revision": True,
    "config_hash": False,
}


def validate_values(where: str, record: dict[str, Any]) -> None:
    """Every value the merge reads has the type and shape it needs; raise RecordError naming the field.

    :func:`validate_record` checks that the fields exist; this checks what is in them, so a
    hand-edited or truncated record (``loss: ["abc"]``, a blank error, ``seed: "0"``) is reported as
    invalid evidence with its file and field instead of surfacing later as a traceback in the merge.
    """
    for key in ("suite", "model", "variant"):
        if not _non_blank(record.get(key)):
            raise RecordError(f"{where}: field {key!r} must be a non-blank string, got {record.get(key)!r}")
    if not record["mode"]["id"].strip():
        raise RecordError(f"{where}: field 'mode.id' must be a non-blank string")
    status = record["status"]
    if status == "ok":
        for key in ("loss", "grad_norm"):
            value = record["metrics"][key]
            values = value if isinstance(value, list) else [value]
            if not values:
                raise RecordError(f"{where}: metrics.{key} is an empty list")
            bad = [v for v in values if not _is_number(v)]
            if bad:
                raise RecordError(f"{where}: metrics.{key} must hold numbers, got {bad[0]!r}")
    if status == "error" and not _non_blank(record.get("error")):
        raise RecordError(f"{where}: an error record needs a non-blank 'error', got {record.get('error')!r}")
    for key in ("reason", "error", "cause"):
        if key in record and record[key] is not None and not _non_blank(record[key]):
            raise RecordError(f"{where}: field {key!r} must be a non-blank string, got {record[key]!r}")
    steps = record.get("expected_steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0):
        raise RecordError(f"{where}: field 'expected_steps' must be a positive integer, got {steps!r}")
    for section in ("requested", "resolved"):
        for key, value in record[section].items():
            if value is not None and not _non_blank(value):
                raise RecordError(
                    f"{where}: {section}.{key} must be a non-blank string or null, got {value!r}"
                )
    fingerprint = record["fingerprint"]
    for key, nullable in _FINGERPRINT_TYPES.items():
        value = fingerprint[key]
        if value is None and nullable:
            continue
        if not _non_blank(value):
            raise RecordError(f"{where}: fingerprint.{key} must be a non-blank string, got {value!r}")
    seed = fingerprint["seed"]
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RecordError(f"{where}: fingerprint.seed must be an integer, got {seed!r}")


def load_run_manifest(path: Path) -> RunManifest:
    payload = _load(path)
    if payload.get("kind") != RUN_KIND:
        raise RecordError(f"{path}: expected kind {RUN_KIND!r}, got {payload.get('kind')!r}")
    status = _require(path, payload, "status", str)
    if status not in ("ran", "skipped", "failed"):
        raise RecordError(f"{path}: status must be ran, skipped or failed, got {status!r}")
    models = _require(path, payload, "models", list)
    if not all(_non_blank(m) for m in models):
        raise RecordError(f"{path}: 'models' must be a list of non-blank strings")
    reason = payload.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise RecordError(f"{path}: field 'reason' must be a string, got {reason!r}")
    exit_code = payload.get("exit_code")
    if exit_code is not None and (not isinstance(exit_code, int) or isinstance(exit_code, bool)):
        raise RecordError(f"{path}: field 'exit_code' must be an integer or null, got {exit_code!r}")
    extra = payload.get("extra")
    if extra is not None and not isinstance(extra, dict):
        raise RecordError(f"{path}: field 'extra' must be an object, got {extra!r}")
    return RunManifest(
        suite=_require(path, payload, "suite", str),
        variant=_require(path, payload, "variant", str),
        models=models,
        status=status,
        reason=payload.get("reason") or "",
        exit_code=payload.get("exit_code"),
        extra=payload.get("extra") or {},
        path=Path(path),
    )


def load_results_file(path: Path) -> ResultsFile:
    payload = _load(path)
    if payload.get("kind") != RESULTS_KIND:
        raise RecordError(f"{path}: expected kind {RESULTS_KIND!r}, got {payload.get('kind')!r}")
    records = _require(path, payload, "records", list)
    expected = _require(path, payload, "expected_modes", list)
    if not all(_non_blank(m) for m in expected):
        raise RecordError(f"{path}: 'expected_modes' must be a list of non-blank strings")
    twice = sorted({m for m in expected if expected.count(m) > 1})
    if twice:
        raise RecordError(f"{path}: 'expected_modes' lists {', '.join(twice)} more than once")
    for key in ("suite", "variant", "model"):
        if not _non_blank(_require(path, payload, key, str)):
            raise RecordError(f"{path}: field {key!r} must be a non-blank string")
    checked = [validate_record(path, record, i) for i, record in enumerate(records)]
    return ResultsFile(
        suite=_require(path, payload, "suite", str),
        variant=_require(path, payload, "variant", str),
        model=_require(path, payload, "model", str),
        expected_modes=expected,
        records=checked,
        path=Path(path),
    )


def load_any(path: Path) -> RunManifest | ResultsFile:
    """Load a run manifest or a results file, deciding by its 'kind'."""
    payload = _load(path)
    kind = payload.get("kind")
    if kind == RUN_KIND:
        return load_run_manifest(path)
    if kind == RESULTS_KIND:
        return load_results_file(path)
    raise RecordError(f"{path}: unknown record kind {kind!r}")


class ResultsWriter:
    """Accumulates per-mode records of one (suite, variant, model) and rewrites the file after each one."""

    def __init__(self, results: Path, suite: str, variant: str, model: str, expected_modes: list[str]):
        self.path = results_path(results, suite, variant, model)
        self.file = ResultsFile(suite, variant, model, list(expected_modes), [])
        self.flush()

    def add(self, record: dict[str, Any]) -> None:
        self.file.records.append(record)
        self.flush()

    def flush(self) -> None:
        write_json_atomic(self.path, self.file.to_json())
