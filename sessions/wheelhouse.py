"""The wheelhouse: one folder of prebuilt wheels that every variant env takes its flash packages from.

FlashAttention has no wheels on PyPI (FA2 ships a source distribution whose build takes up to an
hour, FA3 nothing at all), and a flash wheel loads only under the torch, CUDA, Python and GPU arch it
was built for. So the session picks the wheel for an env itself, before pip runs: from the
wheelhouse (``PARITY_WHEELHOUSE``, default ``.nox/wheelhouse``; ``nox -s build_flash`` builds into
it) and the local folders in ``PIP_FIND_LINKS``, matching each wheel's tags and build facts (the
``<wheel>.json`` that build_flash writes next to it, else the wheel's local version label such as
``+cu130torch2.11``) against the env's. When none fits, the reason says exactly what is missing and
the two ways out, instead of a pip traceback.

Torch-free: runs in nox's own interpreter (``packaging`` comes with nox).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from parity import settings
from sessions.variants import CONSTRAINTS, ROOT

DEFAULT = ROOT / ".nox" / "wheelhouse"
SIDECAR_SUFFIX = ".json"
#: Flash distributions -> (module they provide, build_flash target that builds them).
FLASH_DISTRIBUTIONS = {"flash-attn": ("flash_attn", "fa2"), "flash-attn-3": ("flash_attn_interface", "fa3")}
PYTORCH_INDEX = "https://download.pytorch.org/whl/{cu}"

#: Runs inside an env; prints its facts as one JSON line (argv: distributions to look up).
FACTS_SCRIPT = r"""
import importlib.metadata as md, json, platform, sys
try:
    from pip._vendor.packaging import tags
except Exception:
    from packaging import tags
out = {"python": "%d.%d" % sys.version_info[:2], "executable": sys.executable, "prefix": sys.prefix,
       "machine": platform.machine(), "tags": [str(t) for t in tags.sys_tags()], "packages": {}}
for name in sys.argv[1:]:
    try:
        out["packages"][name] = md.version(name)
    except md.PackageNotFoundError:
        out["packages"][name] = None
try:
    import torch
    out["torch"], out["cuda"] = torch.__version__, torch.version.cuda
except Exception as exc:
    out["torch"], out["cuda"], out["torch_error"] = None, None, "%s: %s" % (type(exc).__name__, exc)
print("parity-env-facts " + json.dumps(out))
"""


def location() -> Path:
    """The wheelhouse folder (``PARITY_WHEELHOUSE``, default ``.nox/wheelhouse``)."""
    return (settings.get(settings.WHEELHOUSE) or DEFAULT).resolve()


def local_find_links() -> list[Path]:
    """Local folders named in ``PIP_FIND_LINKS`` (URLs are left to pip)."""
    found = []
    for entry in (os.environ.get("PIP_FIND_LINKS") or "").split():
        if "://" in entry and not entry.startswith("file://"):
            continue
        path = Path(entry.removeprefix("file://")).expanduser()
        if path.is_dir():
            found.append(path.resolve())
    return found


def folders() -> list[Path]:
    """Where wheels are looked for, wheelhouse first."""
    out = [location()]
    out += [p for p in local_find_links() if p not in out]
    return out


@dataclass(frozen=True)
class EnvFacts:
    """What a flash wheel must fit: the env's interpreter tags, its torch and CUDA, the GPU arch."""

    python: str  # "3.12"
    tags: frozenset[str]
    machine: str
    torch: str | None
    cuda: str | None
    gpu_arch: str | None = None  # "90" (compute capability 9.0); None: no GPU seen
    packages: dict[str, str | None] = field(default_factory=dict)
    prefix: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any], gpu_arch: str | None) -> EnvFacts:
        return cls(
            python=data["python"],
            tags=frozenset(data["tags"]),
            machine=data.get("machine", ""),
            torch=data.get("torch"),
            cuda=data.get("cuda"),
            gpu_arch=gpu_arch,
            packages=dict(data.get("packages") or {}),
            prefix=data.get("prefix", ""),
        )

    @property
    def python_tag(self) -> str:
        return "cp" + self.python.replace(".", "")

    def describe(self) -> str:
        cuda = f"CUDA {self.cuda}" if self.cuda else "no CUDA (a CPU build of torch)"
        arch = f"GPU sm_{self.gpu_arch}" if self.gpu_arch else "no GPU"
        return (
            f"torch {self.torch or '(not installed)'}, {cuda}, Python {self.python} ({self.python_tag}), "
            f"linux_{self.machine or '?'}, {arch}"
        )


def parse_facts(output: str, gpu_arch: str | None) -> EnvFacts:
    """The facts from :data:`FACTS_SCRIPT`'s output (the last ``parity-env-facts`` line)."""
    lines = [line for line in output.splitlines() if line.startswith("parity-env-facts ")]
    if not lines:
        raise ValueError(f"the env printed no facts:\n{output}")
    return EnvFacts.from_json(json.loads(lines[-1].removeprefix("parity-env-facts ")), gpu_arch)


@dataclass(frozen=True)
class Wheel:
    """One wheel file and what it was built for (None: not known from its name or sidecar)."""

    path: Path
    name: str  # canonical distribution name
    version: Version
    tags: frozenset[str]
    torch: str | None = None
    cuda: str | None = None
    archs: tuple[str, ...] = ()
    sidecar: dict[str, Any] | None = None

    @property
    def ident(self) -> str:
        """Changes when the file does: a rebuilt wheel is reinstalled."""
        stat = self.path.stat()
        return f"{self.path.name}:{stat.st_size}:{int(stat.st_mtime)}"


def _cuda_from_label(text: str) -> str | None:
    match = re.search(r"cu(\d+)", text)
    if not match:
        return None
    digits = match.group(1)
    return f"{digits[:-1]}.{digits[-1]}" if len(digits) >= 3 else f"{digits}.0"


def read_wheel(path: Path) -> Wheel | None:
    """A wheel's facts from its file name, its local version label and its sidecar JSON, if any."""
    try:
        name, version, _, tags = parse_wheel_filename(path.name)
    except (InvalidWheelFilename, InvalidVersion):
        return None
    label = version.local or ""
    torch_match = re.search(r"torch(\d+\.\d+)", label)
    torch = torch_match.group(1) if torch_match else None
    cuda = _cuda_from_label(label)
    archs = tuple(re.findall(r"sm(\d+a?)", label))
    sidecar = None
    side = path.with_name(path.name + SIDECAR_SUFFIX)
    if side.is_file():
        try:
            sidecar = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError):
            sidecar = None
    if isinstance(sidecar, dict):
        torch = sidecar.get("torch") or torch
        cuda = sidecar.get("cuda") or cuda
        archs = tuple(str(a) for a in sidecar.get("archs") or archs)
    return Wheel(path, str(name), version, frozenset(str(t) for t in tags), torch, cuda, archs, sidecar)


def _major_minor(version: str) -> str:
    return ".".join(re.split(r"[.+]", version)[:2])


def mismatches(wheel: Wheel, facts: EnvFacts, requirement: Requirement | None) -> list[str]:
    """Why this wheel cannot serve this env (empty: it fits as far as its facts are known)."""
    why = []
    if requirement is not None and requirement.specifier and wheel.version not in requirement.specifier:
        why.append(f"version {wheel.version}, the constraint is {requirement}")
    if not wheel.tags & facts.tags:
        built = ", ".join(sorted(wheel.tags))
        why.append(f"built for {built}, this env's Python {facts.python} takes {facts.python_tag}")
    if wheel.torch:
        if not facts.torch:
            why.append(f"built for torch {wheel.torch}, this env has no torch")
        elif _major_minor(wheel.torch) != _major_minor(facts.torch):
            why.append(f"built for torch {wheel.torch}, this env has torch {facts.torch}")
    if wheel.cuda:
        if not facts.cuda:
            why.append(f"built for CUDA {wheel.cuda}, this env's torch has no CUDA")
        elif wheel.cuda.split(".")[0] != facts.cuda.split(".")[0]:
            why.append(f"built for CUDA {wheel.cuda}, this env's torch has CUDA {facts.cuda}")
    if wheel.archs and facts.gpu_arch and facts.gpu_arch not in {a.rstrip("a") for a in wheel.archs}:
        built = ", ".join(f"sm_{a}" for a in wheel.archs)
        why.append(f"built for {built}, this GPU is sm_{facts.gpu_arch}")
    return why


def constraint(distribution: str) -> Requirement | None:
    """The pin of a distribution in requirements/constraints.txt, if any."""
    want = canonicalize_name(distribution)
    for raw in CONSTRAINTS.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) == want:
            return req
    return None


@dataclass
class Resolution:
    """The wheel picked for a distribution, or every wheel looked at and why it did not fit."""

    distribution: str
    requirement: Requirement | None
    searched: list[Path]
    wheel: Wheel | None = None
    rejected: list[tuple[str, list[str]]] = field(default_factory=list)

    def no_wheel_reason(self, facts: EnvFacts, variant: str) -> str:
        """One line: what is missing, what was found instead, and the two ways out."""
        _, target = FLASH_DISTRIBUTIONS.get(self.distribution, ("", variant))
        want = str(self.requirement) if self.requirement else self.distribution
        where = ", ".join(str(p) for p in self.searched)
        if self.rejected:
            found = "; ".join(f"{name} ({', '.join(why)})" for name, why in self.rejected)
        else:
            found = "no wheel of it there"
        cu = f"cu{facts.cuda.replace('.', '')}" if facts.cuda else "cuXYZ"
        return (
            f"{variant}: no matching wheel for {want} ({facts.describe()}) in {where}: {found}. "
            f"Ways out: point pip at a wheel for this torch/CUDA/Python with PIP_FIND_LINKS=<folder> or "
            f"PIP_EXTRA_INDEX_URL=<index> (PyTorch publishes flash-attn-3 wheels per CUDA version, "
            f"{PYTORCH_INDEX.format(cu=cu)}), or build one for this GPU into the wheelhouse: "
            f"nox -s build_flash -- {target}"
        )


def resolve(distribution: str, facts: EnvFacts, search: list[Path] | None = None) -> Resolution:
    """Pick the newest fitting wheel of ``distribution`` (the wheelhouse first); never runs pip."""
    requirement = constraint(distribution)
    search = folders() if search is None else search
    result = Resolution(distribution, requirement, search)
    want = canonicalize_name(distribution)
    fitting: list[Wheel] = []
    for folder in search:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.whl")):
            wheel = read_wheel(path)
            if wheel is None or wheel.name != want:
                continue
            why = mismatches(wheel, facts, requirement)
            if why:
                result.rejected.append((path.name, why))
            elif wheel.path.name not in {w.path.name for w in fitting}:
                fitting.append(wheel)
    if fitting:
        result.wheel = max(fitting, key=lambda w: w.version)
    return result
