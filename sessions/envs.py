"""Building and reusing one environment per backend variant.

Three kinds of env, chosen by nox's ``--no-venv`` and by ``PARITY_SYSTEM_SITE``:

* ``--no-venv`` (``--force-venv-backend none``): the suites run on the interpreter running nox and
  nothing is installed. Every variant shares that interpreter, which is safe because each variant
  names the kernel library of each backend (``parity.results.modes.VARIANT_KERNELS``).
* ``PARITY_SYSTEM_SITE=1`` (GPU images: torch and transformers come with the image, no network):
  each variant's virtualenv stands on the packages of the interpreter running nox, through a
  ``.pth`` file that adds that interpreter's site-packages. ``--system-site-packages`` is no
  substitute: when the image's ``python3`` is itself a virtualenv it exposes the *base* Python's
  packages, not torch. Only the variant's own packages (flash-attn, flash-attn-3) are installed,
  from the wheelhouse, with no index and no dependencies (the image has them), so the fa2 env holds
  flash_attn, the fa3 env flash_attn_interface, the eager env neither.
* otherwise: a virtualenv per variant from ``requirements/<variant>.txt`` under constraints.txt,
  with the wheelhouse as find-links before any index.

Flash packages are never left to pip's resolver: :mod:`sessions.wheelhouse` picks the wheel that fits
the env's torch, CUDA, Python and GPU and installs that file; when none fits, :class:`InstallFailed`
carries the exact reason (what is missing, the two ways out), which the session turns into a skip.

nox reuses an existing virtualenv but never notices that its requirements changed, so we hash the
install spec (kind of env, requirements, constraints, interpreter) into a marker inside the env and
reinstall when it differs; the flash wheel picked is part of the marker, so a wheel rebuilt into the
wheelhouse is reinstalled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import site
import sys
from pathlib import Path
from typing import Any

import nox
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from parity import settings
from sessions import wheelhouse
from sessions.variants import CONSTRAINTS, REQUIREMENTS

MARKER = ".parity-install-spec"
#: The file that puts the image's site-packages behind the env's own (PARITY_SYSTEM_SITE=1).
PTH_NAME = "_parity_system_site.pth"
GENERATED_REQUIREMENTS = ".parity-requirements.txt"
#: The packages the image must provide in PARITY_SYSTEM_SITE mode (the rest of eager.txt is optional).
IMAGE_REQUIRED = ("torch", "transformers", "pytest")
#: What a freshly created virtualenv holds (anything else means an earlier install left packages).
_BOOTSTRAP = re.compile(
    r"^(pip|setuptools|wheel|_virtualenv|_distutils_hack|distutils-precedence|pkg_resources)"
)


class InstallFailed(RuntimeError):
    """The env cannot get its packages here; the message says exactly what is missing and how to fix it."""


def uses_current_interpreter(session: nox.Session) -> bool:
    return session.venv_backend == "none"


def system_site() -> bool:
    """``settings.SYSTEM_SITE``: build variant envs on top of the packages of the interpreter running nox."""
    return bool(settings.get(settings.SYSTEM_SITE))


def kind(session: nox.Session) -> str:
    """``current`` (--no-venv), ``system-site`` (PARITY_SYSTEM_SITE=1) or ``venv``."""
    if uses_current_interpreter(session):
        return "current"
    return "system-site" if system_site() else "venv"


def python(session: nox.Session) -> str:
    """The interpreter commands run with: the env's python, or this very interpreter without a venv."""
    return sys.executable if uses_current_interpreter(session) else "python"


def python_path(session: nox.Session) -> str:
    """Absolute path of :func:`python`, for processes started outside ``session.run``."""
    if uses_current_interpreter(session):
        return sys.executable
    found = shutil.which("python", path=os.pathsep.join(session.bin_paths or []))
    if not found:
        raise InstallFailed(f"no python in {session.bin_paths}")
    return found


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


def split_requirements(requirement_files: list[Path]) -> tuple[list[str], list[str], list[str]]:
    """(lines pip installs, flash distributions the wheelhouse serves, lines not from eager.txt).

    The third list is what a variant adds to the common stack: in PARITY_SYSTEM_SITE mode only those
    are installed (the image provides eager.txt's packages).
    """
    seen: set[Path] = set()
    lines: list[str] = []
    for f in requirement_files:
        lines += _expand(f, seen)
    common = set(_expand(variant_requirements("eager"), set()))
    pip_lines, flash, own = [], [], []
    for line in lines:
        name = None
        if not line.startswith("-"):
            try:
                name = canonicalize_name(Requirement(line).name)
            except InvalidRequirement:
                name = None
        if name in wheelhouse.FLASH_DISTRIBUTIONS:
            if name not in flash:
                flash.append(name)
            continue
        pip_lines.append(line)
        if line not in common and not line.startswith("-"):
            own.append(line)
    return pip_lines, flash, own


def env_python_version(session: nox.Session) -> str:
    out = session.run("python", "-c", "import sys; print(sys.version)", silent=True, log=False)
    return (out or "").strip()


def env_facts(session: nox.Session, gpu_arch: str | None, names: list[str]) -> wheelhouse.EnvFacts:
    """The env's interpreter tags, torch, CUDA and which of ``names`` it has (asked inside the env)."""
    out = session.run(python(session), "-c", wheelhouse.FACTS_SCRIPT, *names, silent=True, log=False)
    return wheelhouse.parse_facts(out or "", gpu_arch)


def image_site_dirs() -> list[str]:
    """The site-packages folders of the interpreter running nox (the image's packages).

    ``site.getsitepackages()`` plus any site folder already on its ``sys.path`` (an image venv created
    with system site packages, or folders its own .pth files add), in the interpreter's order.
    """
    found: list[str] = []
    for d in [*site.getsitepackages(), *sys.path]:
        if d and Path(d).name in ("site-packages", "dist-packages") and Path(d).is_dir() and d not in found:
            found.append(d)
    return found


def pth_text(dirs: list[str]) -> str:
    """``site.addsitedir`` lines: the folders come after the env's own, and their .pth files work too."""
    head = "# written by parity (PARITY_SYSTEM_SITE=1): the image's packages, behind this env's own\n"
    return head + "".join(f"import site; site.addsitedir({d!r})\n" for d in dirs)


def _site_packages(session: nox.Session) -> Path:
    out = session.run(
        "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", silent=True, log=False
    )
    return Path((out or "").strip().splitlines()[-1])


def _is_bare(session: nox.Session) -> bool:
    """Nothing installed yet beyond what virtualenv seeds (so it can take the image's packages)."""
    purelib = _site_packages(session)
    return all(_BOOTSTRAP.match(p.name) or p.name == "__pycache__" for p in purelib.iterdir())


def _recreate(session: nox.Session) -> None:
    """An empty env at the same place: packages of an earlier install would shadow the image's."""
    venv = session.virtualenv
    if getattr(venv, "venv_backend", None) not in ("virtualenv", "venv", "uv"):
        kind = type(venv).__name__
        raise InstallFailed(f"{settings.SYSTEM_SITE}=1 needs a virtualenv/venv/uv env, not {kind}")
    session.log(f"recreating {venv.location}: it held packages of an earlier install")
    shutil.rmtree(venv.location)
    venv.create()


def _link_image(session: nox.Session) -> str:
    """Write the .pth that puts the image's packages behind the env's own; return the folders."""
    env_python = env_python_version(session).split()[0]
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if ".".join(env_python.split(".")[:2]) != here:
        raise InstallFailed(
            f"{settings.SYSTEM_SITE}=1: the env's Python {env_python} is not the image's {here} "
            f"({sys.executable}); its compiled packages would not load"
        )
    dirs = image_site_dirs()
    if not dirs:
        raise InstallFailed(f"{settings.SYSTEM_SITE}=1: {sys.executable} reports no site-packages folder")
    (_site_packages(session) / PTH_NAME).write_text(pth_text(dirs))
    return ", ".join(dirs)


def _pip(session: nox.Session, *args: str) -> list[str]:
    """Run pip in the env; return its ERROR lines (empty on success)."""
    out = (
        session.run(
            "python",
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            *args,
            silent=True,
            success_codes=[0, 1],
        )
        or ""
    )
    return [line for line in out.splitlines() if line.startswith("ERROR:")]


def _no_index() -> bool:
    return (os.environ.get("PIP_NO_INDEX") or "").strip().lower() in ("1", "true", "yes", "on")


def _read_marker(marker: Path) -> dict[str, Any]:
    try:
        data = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def prepare(
    session: nox.Session,
    requirement_files: list[Path],
    *,
    gpu_arch: str | None = None,
    variant: str = "",
    system_site_ok: bool = True,
) -> str:
    """Install (or reuse) the env for these requirement files; return a one-line account of what happened.

    ``gpu_arch`` ("90") is what a flash wheel must have been built for; ``variant`` names the skip
    reason. ``system_site_ok=False`` (the tests and lint sessions) ignores PARITY_SYSTEM_SITE.
    Raises InstallFailed with the exact reason when a package cannot be had here.
    """
    if uses_current_interpreter(session):
        return f"using the current interpreter ({sys.executable}), installing nothing"
    on_image = system_site_ok and system_site()
    env_kind = "system-site" if on_image else "venv"
    location = Path(session.virtualenv.location)
    python_version = env_python_version(session)
    spec = f"{env_kind}:" + "+".join(install_spec(f, python_version) for f in requirement_files)
    if on_image:
        spec += ":" + sys.executable  # the image whose packages the env stands on
    marker = location / MARKER
    previous = _read_marker(marker)
    pip_lines, flash, own = split_requirements(requirement_files)
    house = wheelhouse.location()
    house.mkdir(parents=True, exist_ok=True)
    names = ", ".join(str(f.relative_to(REQUIREMENTS.parent)) for f in requirement_files)
    installed: dict[str, str] = {}
    fresh_own: list[str] = []
    account = f"reusing env {location} ({env_kind}, install spec {spec.split(':')[1]})"
    if previous.get("spec") != spec:
        marker.unlink(missing_ok=True)
        if (on_image or previous.get("kind") == "system-site") and not _is_bare(session):
            _recreate(session)
        if on_image:
            dirs = _link_image(session)
            account = f"built env {location} on the image's packages ({dirs})"
            fresh_own = own
        else:
            generated = location / GENERATED_REQUIREMENTS
            generated.write_text("\n".join(pip_lines) + "\n")
            session.log(f"installing {names} into {location} (first run or changed spec)")
            errors = _pip(session, "--find-links", str(house), "-r", str(generated), "-c", str(CONSTRAINTS))
            if errors:
                raise InstallFailed(f"pip could not install {names}: " + " | ".join(errors[:3]))
            account = f"installed env {location} (install spec {spec.split(':')[1]})"
    else:
        installed = dict(previous.get("wheels") or {})

    if on_image or flash:
        lookup = [*IMAGE_REQUIRED, "pytest-timeout", "kernels", *flash]
        facts = env_facts(session, gpu_arch, lookup)
        if on_image:
            missing = [n for n in IMAGE_REQUIRED if not facts.packages.get(n)]
            if missing:
                raise InstallFailed(
                    f"{settings.SYSTEM_SITE}=1: the image ({sys.executable}) lacks {', '.join(missing)}; "
                    "the variant envs take those from it (run nox with the image's python: python3 -m nox)"
                )
        for dist in flash:
            installed[dist] = _install_flash(session, dist, facts, variant, on_image, installed.get(dist))
            account += f"; {dist} <- {installed[dist]}"
    if fresh_own:  # what the variant adds beyond flash: the image's, else the wheelhouse's (no index)
        errors = _pip(session, "--no-index", "--find-links", str(house), *fresh_own)
        if errors:
            raise InstallFailed(
                f"{variant or 'env'}: {', '.join(fresh_own)} is neither in the image nor in the wheelhouse "
                f"{house} ({errors[0]}); add its wheel there"
            )
    marker.write_text(json.dumps({"spec": spec, "kind": env_kind, "wheels": installed}) + "\n")
    return account


def _install_flash(
    session: nox.Session,
    dist: str,
    facts: wheelhouse.EnvFacts,
    variant: str,
    on_image: bool,
    previous: str | None,
) -> str:
    """Install the wheel of ``dist`` that fits this env; return what was installed (for the marker)."""
    found = wheelhouse.resolve(dist, facts)
    if found.wheel is None:
        reason = found.no_wheel_reason(facts, variant or dist)
        if on_image or _no_index():
            raise InstallFailed(reason)
        if previous and previous.startswith("index:") and facts.packages.get(dist):
            return previous
        # a user's PIP_FIND_LINKS URL or PIP_EXTRA_INDEX_URL may still have one: let pip look
        requirement = str(found.requirement or dist)
        errors = _pip(session, f"--only-binary={dist}", requirement, "-c", str(CONSTRAINTS))
        if errors:
            raise InstallFailed(f"{reason} (pip: {errors[0]})")
        return f"index:{requirement}"
    wheel = found.wheel
    if previous == wheel.ident and facts.packages.get(dist):
        return previous
    session.log(f"installing {wheel.path}")
    if on_image:
        args = ["--no-index", "--no-deps", "--force-reinstall", str(wheel.path)]
    else:
        args = ["--force-reinstall", "--no-deps", str(wheel.path)]
    errors = _pip(session, *args)
    if errors:
        raise InstallFailed(f"pip could not install {wheel.path}: {errors[0]}")
    return wheel.ident


def variant_requirements(name: str) -> Path:
    return REQUIREMENTS / f"{name}.txt"
