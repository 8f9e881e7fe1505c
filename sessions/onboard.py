"""Session bodies of the onboarding commands: ``new_model`` (scaffold a toy) and ``checklist``.

Both need torch and transformers (shrinking a config means loading it; the checklist builds the toy
and collects the suites), so each runs its library module (:mod:`parity.harness.scaffold`,
:mod:`parity.harness.checklist`) in an env built from ``requirements/eager.txt``. This module only
parses what the session itself needs, maps the library's exit codes onto nox, and, for
``checklist --run``, queues the suites that apply to the model and one merge at the end.

Torch-free: runs in nox's own interpreter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nox

from parity import settings
from parity.results import registry
from sessions import envs
from sessions.suites import DEFAULT_RESULTS, _env, run_command
from sessions.variants import ROOT, VARIANTS

#: Suites that run once per backend variant (one session each); the others run once.
PER_VARIANT = ("patch", "e2e")
#: The library's "refused" exit code (unknown type, existing folder, bad arguments).
EXIT_REFUSED = 2

__all__ = ["checklist_sessions", "run_checklist", "run_new_model"]


def _prepare(session: nox.Session) -> dict[str, str]:
    session.log(envs.prepare(session, [envs.variant_requirements("eager")]))
    env = _env(DEFAULT_RESULTS, "eager")
    env.pop(settings.RESULTS)
    return env


def run_new_model(session: nox.Session) -> None:
    """Scaffold a toy; a refusal leaves nox with exit code 2 (its own failures exit 1)."""
    env = _prepare(session)
    with session.chdir(ROOT):
        code = run_command(
            session, [envs.python(session), "-m", "parity.harness.scaffold", *session.posargs], env
        )
    if code == EXIT_REFUSED:
        session.log("new_model: refused (see the message above); exit code 2")
        raise SystemExit(EXIT_REFUSED)  # not an Exception: nox passes it through as its own exit code
    if code:
        session.error(f"new_model: the shrunk config failed a check (exit code {code}); nothing was written")


def checklist_sessions(case: registry.Case) -> list[str]:
    """The sessions ``checklist --run`` queues for a case, in order (the merge comes after them)."""
    names = []
    for suite in case.suites:
        names += [f"{suite}({v})" for v in VARIANTS] if suite in PER_VARIANT else [suite]
    return names


def run_checklist(session: nox.Session) -> None:
    """Print the checklist; with --run queue every suite that applies, then one merge of them all."""
    parser = argparse.ArgumentParser(prog="nox -s checklist --", add_help=False)
    parser.add_argument("case_id")
    parser.add_argument("--run", action="store_true")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    try:
        args = parser.parse_args(session.posargs)
    except SystemExit:
        session.error("usage: nox -s checklist -- ID [--run] [--results DIR]")
    env = _prepare(session)
    cmd = [
        envs.python(session),
        "-m",
        "parity.harness.checklist",
        args.case_id,
        *(["--run"] if args.run else []),
    ]
    with session.chdir(ROOT):
        code = run_command(session, cmd, env)
    if code:
        session.error(
            f"checklist {args.case_id}: an item failed (fix it first; --run runs nothing until then)"
        )
    if not args.run:
        return
    case = registry.case(args.case_id)
    results = str(args.results.resolve())
    queued = checklist_sessions(case)
    for name in queued:
        session.notify(name, posargs=[case.id, "--results", results])
    session.notify("merge", posargs=["--results", results, "--models", case.id])
    session.log(f"checklist {case.id}: queued {', '.join(queued)}, then merge (the table below)")
