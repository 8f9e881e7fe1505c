"""Session bodies: run a suite in a variant's env, record what ran or why not, then merge."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

import nox

from sessions import envs
from sessions.hardware import gpu_arch, hardware_skip_reason
from sessions.variants import ROOT, VARIANTS, Variant

SRC = ROOT / "src"  # on sys.path already (sessions/__init__.py)

from parity import settings  # noqa: E402
from parity.results import registry  # noqa: E402
from parity.results.merge import SUMMARY_JSON, remove_summary  # noqa: E402
from parity.results.records import RunManifest, results_path, run_manifest_path, write_json_atomic  # noqa: E402

PATCH_TEST = ROOT / "tests" / "models" / "test_models_patch.py"
DEFAULT_RESULTS = ROOT / "results"
#: Benchmarks are numbers, not evidence: kept out of results/ (the merge would read them as records).
DEFAULT_BENCH_OUT = ROOT / "artifacts" / "bench.json"
DEFAULT_TEST_TIMEOUT_S = 900


def parse_suite_args(session: nox.Session, cases: list[str], usage: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=usage, add_help=False)
    parser.add_argument("models", nargs="*")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TEST_TIMEOUT_S, help="seconds per test case")
    parser.add_argument("--require", action="append", default=[], help="variant that must not be skipped")
    parser.add_argument("--config", action="append", default=[], help="any config.json (repeatable)")
    parser.add_argument("--mode-timeout", type=float, default=None, help="seconds per patch mode")
    try:
        args = parser.parse_args(session.posargs)
    except SystemExit:
        session.error(
            f"usage: {usage} [MODEL ...] [--config PATH ...] [--results DIR] [--timeout S] "
            "[--mode-timeout S] [--require VARIANT]"
        )
    args.adhoc = {}
    for raw in args.config:
        try:
            case = registry.check_adhoc_config(raw)
        except registry.ToyConfigError as exc:
            session.log(f"error: {exc}")
            raise SystemExit(2) from None  # a bad input, not a failed model: exit 2, nothing ran
        if case.id in cases or case.id in args.adhoc:
            session.log(f"error: {case.config}: --config id {case.id!r} is taken; rename its folder")
            raise SystemExit(2)
        args.adhoc[case.id] = case.config
    unknown = [m for m in args.models if m not in cases]
    if unknown:
        session.error(f"unknown model id(s): {', '.join(unknown)}. Known: {', '.join(cases)}")
    if not args.timeout > 0:
        session.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    for variant in args.require:
        if variant not in VARIANTS:
            session.error(f"--require {variant}: unknown variant; known: {', '.join(VARIANTS)}")
    args.models = (args.models or ([] if args.adhoc else list(cases))) + list(args.adhoc)
    args.results = args.results.resolve()
    return args


def _clear_previous(results: Path, suite: str, variant: str, models: list[str]) -> None:
    """Old records of the same (variant, model) would be merged as if they were this run's."""
    run_manifest_path(results, suite, variant).unlink(missing_ok=True)
    for model in models:
        results_path(results, suite, variant, model).unlink(missing_ok=True)


def junit_path(results: Path, session_name: str) -> Path:
    """``<results>/junit/<session>.xml``, e.g. ``patch-eager.xml`` for ``patch(eager)``: one per session."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", session_name).strip("-")
    return results / "junit" / f"{stem}.xml"


def write_skipped_junit(path: Path, session_name: str, reason: str) -> None:
    """A JUnit file with one skipped case, so CI shows a skipped variant with its reason, not a gap."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name, why = xml_escape(session_name, {'"': "&quot;"}), xml_escape(reason, {'"': "&quot;"})
    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<testsuites><testsuite name="{name}" tests="1" errors="0" failures="0" skipped="1">'
        f'<testcase classname="parity.session" name="{name}"><skipped message="{why}"/></testcase>'
        "</testsuite></testsuites>\n"
    )


def _skip(session: nox.Session, manifest: RunManifest, results: Path, reason: str) -> None:
    manifest.status, manifest.reason = "skipped", reason
    write_json_atomic(run_manifest_path(results, manifest.suite, manifest.variant), manifest.to_json())
    write_skipped_junit(junit_path(results, session.name), session.name, reason)
    session.skip(reason)


def _env(results: Path, variant: str) -> dict[str, str]:
    return {
        **settings.child_env({settings.VARIANT: variant, settings.RESULTS: results}),
        # extended, not replaced: packages a user put on PYTHONPATH stay visible to the suites
        "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def probe_variant(session: nox.Session, variant: Variant, env: dict[str, str]) -> tuple[bool, dict]:
    cmd = [
        envs.python(session),
        "-m",
        "parity.harness.probe",
        *[a for m in variant.modules for a in ("--module", m)],
    ]
    if variant.needs_cuda:
        cmd.append("--needs-cuda")
    if variant.min_capability:
        cmd += ["--min-capability", ".".join(map(str, variant.min_capability))]
    out = session.run(*cmd, env=env, silent=True, success_codes=[0, 3], external=True) or ""
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    if not lines:
        session.error(f"probe printed no result:\n{out}")
    info = json.loads(lines[-1])
    return bool(info.get("ok")), info


def run_suite(
    session: nox.Session,
    suite: str,
    variant_name: str,
    node_ids: Callable[[list[str]], list[str]],
) -> None:
    """The body every suite session shares.

    Validate the model ids against the suite's case list, queue the merge, clear this variant's
    old records, skip (with the reason, recorded) when hardware or packages are missing, run
    pytest on ``node_ids(models)`` with a per-test timeout, and record pytest's exit code.
    """
    variant = VARIANTS[variant_name]
    try:
        cases = registry.ids(suite)
    except (registry.RegistryError, registry.ToyConfigError) as exc:
        session.error(f"case registry: {exc}")
    args = parse_suite_args(session, cases, f"nox -s '{session.name}' --")
    merge_args = ["--results", str(args.results), "--suite", suite, "--models", *args.models]
    for required in args.require:
        merge_args += ["--require", required]
    session.notify("merge", posargs=merge_args)

    _clear_previous(args.results, suite, variant.name, args.models)
    junit_path(args.results, session.name).unlink(missing_ok=True)
    remove_summary(args.results)  # an interrupted run must not leave the previous PASS behind
    manifest = RunManifest(suite, variant.name, args.models, "ran")
    reason = hardware_skip_reason(variant)
    if reason:
        _skip(session, manifest, args.results, reason)
    try:
        session.log(envs.prepare(session, [variant.requirements], gpu_arch=gpu_arch(), variant=variant.name))
    except envs.InstallFailed as exc:
        _skip(session, manifest, args.results, str(exc))
    env = _env(args.results, variant.name)
    if args.adhoc:
        check = [envs.python(session), "-m", "parity.results.registry", *map(str, args.adhoc.values())]
        if run_command(session, check, env) != 0:
            raise SystemExit(2)  # the env's transformers rejects a --config (message printed above)
        env |= settings.child_env({settings.EXTRA_CASES: registry.write_adhoc(args.results, args.adhoc)})
    env |= settings.child_env(
        {
            settings.MODE_TIMEOUT_S: f"{args.mode_timeout:g}" if args.mode_timeout else None,
            settings.MODEL_TIMEOUT_S: f"{args.timeout:g}" if args.timeout != DEFAULT_TEST_TIMEOUT_S else None,
        }
    )
    ok, info = probe_variant(session, variant, env)
    session.log("probe: " + json.dumps(info, sort_keys=True))
    if not ok:
        _skip(session, manifest, args.results, f"{variant.name}: {info.get('reason')}")
    manifest.extra = {"probe": info, "env_kind": envs.kind(session)}

    junit = junit_path(args.results, session.name)
    pytest_args = ["-p", "no:cacheprovider", "-v", "-s", f"--rootdir={ROOT}", f"--junitxml={junit}"]
    if info.get("pytest_timeout"):
        # Per-test timeout markers in a suite are tighter and take precedence; this bounds the rest.
        # a backstop only: the patch suite's child processes have their own per-mode/per-model deadlines
        backstop = args.timeout if args.timeout != DEFAULT_TEST_TIMEOUT_S else 3600.0
        pytest_args += [f"--timeout={backstop + 120:g}", "--timeout-method=thread"]
    else:
        session.warn("pytest-timeout is not installed in this env: a hung case will not be stopped")
    session.log(f"{session.name}: {len(args.models)} model(s), results -> {args.results}, JUnit -> {junit}")
    with session.chdir(ROOT):
        code = _run_pytest(session, [*pytest_args, *node_ids(args.models)], env)
    manifest.exit_code = code
    manifest.status = "ran" if code in (0, 1) else "failed"
    if code not in (0, 1):
        manifest.reason = f"pytest exited with code {code} (usage/internal error, or interrupted)"
    write_json_atomic(run_manifest_path(args.results, suite, variant.name), manifest.to_json())
    if code != 0:
        session.error(f"{session.name}: pytest exit code {code}; the merge below names each failure")


def node_id(test_file: Path, name: str, param: str | None = None) -> str:
    node = f"{test_file.relative_to(ROOT)}::{name}"
    return f"{node}[{param}]" if param is not None else node


def run_patch(session: nox.Session, variant_name: str) -> None:
    run_suite(
        session,
        "patch",
        variant_name,
        lambda models: [node_id(PATCH_TEST, "test_models_patch_fwd_bwd", m) for m in models],
    )


def _run_pytest(session: nox.Session, args: list[str], env: dict[str, str]) -> int:
    """Run pytest and return its exit code instead of raising, so the manifest can record it."""
    wrapper = "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))"
    return run_command(session, [envs.python(session), "-c", wrapper, *args], env)


def run_command(session: nox.Session, cmd: list[str], env: dict[str, str]) -> int:
    """Run a command and return its exit code instead of raising (callers map codes to verdicts)."""
    try:
        session.run(*cmd, env=env, external=True)
    except nox.command.CommandFailed as exc:
        code = getattr(exc, "return_code", None)
        if code is None:
            match = re.search(r"(-?\d+)", str(getattr(exc, "reason", "") or ""))
            code = int(match.group(1)) if match else 1
        return code
    return 0


def merge_verdict(results: Path, exit_code: int) -> str:
    """The merge's verdict as summary.json spells it (``pass``/``breach``/``invalid``)."""
    try:
        verdict = json.loads((results / SUMMARY_JSON).read_text()).get("verdict")
    except (OSError, ValueError, AttributeError):
        verdict = None
    return verdict if isinstance(verdict, str) else {0: "pass", 1: "breach"}.get(exit_code, "invalid")


def run_merge(session: nox.Session) -> None:
    """Run the merge and end the session with its verdict in words.

    nox exits 1 for every failed session, so a CI job calling nox cannot see the merge's 0/1/2; the
    last log line and ``summary.json`` (``verdict``, ``exit_code``) carry it instead.
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p),
    }
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    known, _ = parser.parse_known_args(session.posargs)
    cmd = [sys.executable, "-m", "parity.results.merge", *session.posargs]
    session.log(" ".join(cmd))
    code = subprocess.call(cmd, env=env)
    verdict = merge_verdict(known.results, code)
    summary = known.results / SUMMARY_JSON
    line = f"merge verdict: {verdict} (python -m parity.merge exit code {code}; {summary})"
    if code != 0:
        session.error(line)
    session.log(line)


def run_tests(session: nox.Session) -> None:
    requirements = [envs.variant_requirements("eager"), envs.variant_requirements("dev")]
    session.log(envs.prepare(session, requirements, system_site_ok=False))
    env = _env(Path(session.create_tmp()) / "results", "eager")
    env.pop(settings.RESULTS)
    # First, so a --junitxml among the user's arguments wins (pytest keeps the last one).
    junit = f"--junitxml={junit_path(DEFAULT_RESULTS, session.name)}"
    with session.chdir(ROOT):
        session.run(
            envs.python(session),
            "-m",
            "pytest",
            junit,
            # the planted-bug matrix has its own session (nox -s mutations; CI runs both);
            # --durations: CI logs show where the time goes
            *(session.posargs or ["tests", "-q", "--durations=25", "--ignore=tests/mutations"]),
            env=env,
            external=True,
        )


def run_mutations(session: nox.Session) -> None:
    """The planted-bug matrix in the eager variant's env (torch + transformers, no kernels needed)."""
    session.log(envs.prepare(session, [envs.variant_requirements("eager")]))
    env = _env(Path(session.create_tmp()) / "results", "eager")
    env.pop(settings.RESULTS)
    with session.chdir(ROOT):
        session.run(
            envs.python(session),
            "-m",
            "pytest",
            "tests/mutations",
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
            *session.posargs,
            env=env,
            external=True,
        )


def run_bench(session: nox.Session) -> None:
    """GPU benchmark of parity's kernels beside transformers' (not a test: numbers, not verdicts)."""
    from sessions.hardware import visible_gpus

    gpus, why = visible_gpus()
    if not gpus:
        session.skip(f"bench needs a CUDA GPU: {why}")
    session.log(envs.prepare(session, [envs.variant_requirements("eager")]))
    args = session.posargs or ["--out", str(DEFAULT_BENCH_OUT)]
    with session.chdir(ROOT):
        session.run(
            envs.python(session),
            "-m",
            "parity.harness.bench",
            *args,
            env=_env(DEFAULT_RESULTS, "eager"),
            external=True,
        )
