"""Building and reusing one environment per backend variant.

nox reuses an existing virtualenv but never notices that its requirements changed, so we hash the
install spec (requirements file, constraints, interpreter) into a marker inside the env and
reinstall when it differs. On machines that already have torch and no network (GPU images), run
nox with --no-venv (or --force-venv-backend none): the suites then run on the current interpreter
and nothing is installed.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import nox

from sessions.variants import CONSTRAINTS, REQUIREMENTS

MARKER = ".parity-install-spec"


def uses_current_interpreter(session: nox.Session) -> bool:
    return session.venv_backend == "none"


def python(session: nox.Session) -> str:
    """The interpreter commands run with: the env's python, or this very interpreter without a venv."""
    return sys.executable if uses_current_interpreter(session) else "python"


def _expand(path: Path, seen: set[Path]) -> list[str]:
    """Requirement lines with -r/-c includes inlined, so an edit in an included file changes the hash."""
    path = path.resolve()
    if path in seen:
        return []
    seen.add(path)
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        match = re.match(r"^(-r|-c|--requirement|--constraint)\s+(\S+)$", line)
        if match:
            lines += _expand(path.parent / match.group(2), seen)
        elif line:
            lines.append(line)
    return lines


def install_spec(requirements: Path, python: str) -> str:
    """A digest of everything that decides what lands in the env."""
    spec = "\n".join([python, *_expand(requirements, set()), "--constraints--", *_expand(CONSTRAINTS, set())])
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def env_python_version(session: nox.Session) -> str:
    out = session.run("python", "-c", "import sys; print(sys.version)", silent=True, log=False)
    return (out or "").strip()


class InstallFailed(RuntimeError):
    """pip could not install a variant's requirements; the message is pip's own error."""


def prepare(session: nox.Session, requirement_files: list[Path]) -> str:
    """Install (or reuse) the env for these requirement files; return a one-line account of what happened.

    Raises InstallFailed with pip's error lines when a package cannot be installed here (e.g. no
    prebuilt flash-attn wheel), so the caller can skip the variant with that exact reason.
    """
    if uses_current_interpreter(session):
        return f"using the current interpreter ({sys.executable}), installing nothing"
    python = env_python_version(session)
    spec = "+".join(install_spec(f, python) for f in requirement_files)
    marker = Path(session.virtualenv.location) / MARKER
    if marker.exists() and marker.read_text().strip() == spec:
        return f"reusing env {session.virtualenv.location} (install spec {spec})"
    marker.unlink(missing_ok=True)
    args = []
    for f in requirement_files:
        args += ["-r", str(f)]
    names = ", ".join(str(f.relative_to(REQUIREMENTS.parent)) for f in requirement_files)
    session.log(f"installing {names} into {session.virtualenv.location} (first run or changed spec)")
    out = (
        session.run(
            "python",
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            *args,
            "-c",
            str(CONSTRAINTS),
            silent=True,
            success_codes=[0, 1],
        )
        or ""
    )
    errors = [line for line in out.splitlines() if line.startswith("ERROR:")]
    if errors:
        raise InstallFailed(f"pip could not install {names}: " + " | ".join(errors[:3]))
    marker.write_text(spec + "\n")
    return f"installed env {session.virtualenv.location} (install spec {spec})"


def variant_requirements(name: str) -> Path:
    return REQUIREMENTS / f"{name}.txt"
