"""Golden metrics: a merged run saved once, and later runs compared with it by the same rules.

A GPU result can then be checked later, or on another machine of the same kind, without running
every backend again: ``nox -s merge -- --export-golden DIR`` writes one file per environment key
(device, dtype, torch, transformers), and ``nox -s merge -- --golden DIR`` holds every record of a
new run against the file for its own environment key, tensor by tensor through the fingerprints
(norm and fixed projections), with the rule of :mod:`parity.results.compare` for that dtype. A golden
file for another device or version is refused with the reason: numbers from another environment are
not a reference. A record without a golden entry is reported, never skipped.

Torch-free, like the rest of the results layer.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from parity.results.compare import Check, rule_for
from parity.results.records import ResultsFile, write_json_atomic

SCHEMA = "parity.golden/1"
KEY_FIELDS = ("device", "dtype", "torch", "transformers")


class GoldenError(ValueError):
    """A golden folder or file that cannot be used; the message says why."""


def env_key(fingerprint: dict[str, Any]) -> dict[str, str]:
    return {k: str(fingerprint.get(k)) for k in KEY_FIELDS}


def _file_name(key: dict[str, str]) -> str:
    text = "-".join(key[k] for k in KEY_FIELDS)
    return "golden-" + re.sub(r"[^A-Za-z0-9_.+-]+", "_", text) + ".json"


def _entry_id(f: ResultsFile, mode_id: str) -> str:
    return f"{f.suite}/{f.variant}/{f.model}/{mode_id}"


def export(files: list[ResultsFile], folder: Path) -> list[Path]:
    """Write the ok records of ``files`` as golden entries, one file per environment key."""
    by_key: dict[str, dict[str, Any]] = {}
    for f in files:
        for rec in f.records:
            if rec.get("status") != "ok":
                continue
            key = env_key(rec["fingerprint"])
            name = _file_name(key)
            payload = by_key.setdefault(name, {"schema": SCHEMA, "key": key, "entries": {}})
            payload["entries"][_entry_id(f, rec["mode"]["id"])] = {
                "metrics": {m: rec["metrics"].get(m) for m in ("loss", "grad_norm")},
                "fingerprints": rec.get("fingerprints") or {},
                "first_step": rec.get("first_step"),
                "config_hash": rec["fingerprint"].get("config_hash"),
                "git_revision": rec["fingerprint"].get("git_revision"),
            }
    written = []
    for name, payload in sorted(by_key.items()):
        path = Path(folder) / name
        write_json_atomic(path, payload)
        written.append(path)
    return written


def load(folder: Path, key: dict[str, str]) -> dict[str, Any]:
    """The golden file for exactly this environment key, or GoldenError naming what is there."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GoldenError(f"golden folder {folder} does not exist (write one with --export-golden)")
    path = folder / _file_name(key)
    if not path.is_file():
        found = []
        for other in sorted(folder.glob("golden-*.json")):
            try:
                found.append(json.loads(other.read_text()).get("key"))
            except (OSError, json.JSONDecodeError):
                continue
        there = "; ".join(", ".join(f"{k}={v}" for k, v in (k or {}).items()) for k in found) or "none"
        want = ", ".join(f"{k}={v}" for k, v in key.items())
        raise GoldenError(
            f"no golden metrics for {want} in {folder} (golden files there: {there}); numbers from "
            "another device, dtype or version are not a reference: export golden metrics on this one"
        )
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GoldenError(f"{path}: unreadable golden file ({exc})") from exc
    if payload.get("schema") != SCHEMA or payload.get("key") != key:
        raise GoldenError(f"{path}: not a golden file for {key} (schema {payload.get('schema')!r})")
    return payload


def _tensor_allowed(dtype: str, norm: float, noise_rel: float, total: float) -> float:
    rule = rule_for(dtype)
    floor = rule.rel * norm + rule.abs_frac * total
    return rule.k * noise_rel * norm + floor


def compare_file(f: ResultsFile, golden: dict[str, Any]) -> list[tuple[str, list[Check], list[str]]]:
    """Per ok record: (entry id, checks against the golden fingerprints, structural problems)."""
    out = []
    noise = next((r for r in f.records if r["mode"].get("role") not in ("truth", "anchor")), None)
    noise_tensors = ((noise or {}).get("evidence") or {}).get("tensors") or {}
    for rec in f.records:
        if rec.get("status") != "ok":
            continue
        entry_id = _entry_id(f, rec["mode"]["id"])
        entry = golden["entries"].get(entry_id)
        if entry is None:
            out.append((entry_id, [], [f"no golden entry for {entry_id}"]))
            continue
        problems = []
        if entry.get("config_hash") != rec["fingerprint"].get("config_hash"):
            problems.append(f"config changed since the golden metrics ({entry_id})")
        dtype = str(rec["fingerprint"].get("dtype"))
        total = (
            float(entry["metrics"].get("grad_norm") or 0.0)
            if not isinstance(entry["metrics"].get("grad_norm"), list)
            else float(entry["metrics"]["grad_norm"][0])
        )
        checks: list[Check] = []
        mine, theirs = rec.get("fingerprints") or {}, entry.get("fingerprints") or {}
        for group in ("grads",):
            a, b = mine.get(group) or {}, theirs.get(group) or {}
            for name in sorted(set(a) | set(b)):
                if (a.get(name) is None) != (b.get(name) is None):
                    problems.append(f"grad {name}: gradient in one of run and golden only")
                    continue
                if a.get(name) is None:
                    continue
                norm = abs(float(b[name][0]))
                diff = max(abs(float(x) - float(y)) for x, y in zip(a[name], b[name], strict=True))
                noise_rel = float(noise_tensors[name][0]) if name in noise_tensors else 0.0
                checks.append(Check(f"grad {name}", diff, _tensor_allowed(dtype, norm, noise_rel, total)))
        la, lb = (mine.get("logits"), theirs.get("logits"))
        if la and lb:
            norm = abs(float(lb[0]))
            diff = max(abs(float(x) - float(y)) for x, y in zip(la, lb, strict=True))
            checks.append(Check("logits", diff, _tensor_allowed(dtype, norm, 0.0, 0.0) + 1e-12))
        for metric in ("loss", "grad_norm"):
            x, y = rec["metrics"].get(metric), entry["metrics"].get(metric)
            xs = x if isinstance(x, list) else [x]
            ys = y if isinstance(y, list) else [y]
            if len(xs) != len(ys) or not all(isinstance(v, int | float) for v in xs + ys):
                problems.append(f"{metric}: {len(xs)} values vs {len(ys)} in the golden entry")
                continue
            rule = rule_for(dtype)
            for step, (v, w) in enumerate(zip(xs, ys, strict=True)):
                limit = max(rule.rel, 1e-3 if rule.k else 0.0) * abs(w) + 1e-12
                name = metric if len(xs) == 1 else f"{metric}[step {step}]"
                checks.append(Check(name, abs(v - w), limit))
        out.append((entry_id, checks, problems))
    return out


def render(results: list[tuple[str, list[Check], list[str]]]) -> tuple[list[str], list[str]]:
    """(report lines, failure messages)."""
    lines, failures = [], []
    for entry_id, checks, problems in results:
        bad = [c for c in checks if not c.ok]
        worst = max(checks, key=lambda c: c.ratio, default=None)
        head = "FAIL" if bad or problems else "PASS"
        ratio = f"worst {worst.name} ratio {worst.ratio:.3g}" if worst else ""
        lines.append(f"golden {head:<4} {entry_id:<70} {ratio}")
        failures += [f"{entry_id}: {p}" for p in problems]
        failures += [
            f"{entry_id}: {c.name} off by {c.observed:.3g} from the golden metrics (allowed {c.allowed:.3g}, "
            f"ratio {c.ratio:.3g})"
            for c in bad
        ]
    return lines, failures


def is_finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
