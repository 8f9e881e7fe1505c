"""``nox -s build_flash -- fa2|fa3``: a FlashAttention wheel for the GPU present, into the wheelhouse.

FlashAttention-2 has only a source distribution on PyPI and FlashAttention-3 none; a full build takes
up to an hour because it compiles every head dim, dtype and arch. The suites need far less: this GPU's
arch, the head dims of the registry's toy configs (read from their config JSON, torch-free: text,
vision and audio stacks, MLA as q/k width) and the suites' GPU dtype. So the build is sized by the
packages' own switches:

* FA3 (``hopper/`` of a flash-attention tree or tarball): ``FLASH_ATTENTION_DISABLE_*`` for every head
  dim, dtype and feature the registry does not use (the shared wheel's list, sized to the registry);
* FA2 (the PyPI sdist, or ``--source``): ``FLASH_ATTN_CUDA_ARCHS`` for the arch, and, since FA2 has no
  head-dim switch, the kernel files of unused head dims and dtypes are left out of ``setup.py`` and the
  head-dim/dtype dispatch in ``static_switch.h`` narrowed to match (others raise "this flash-attn build
  has head dims ... only"), plus ``-DFLASHATTENTION_DISABLE_{DROPOUT,ALIBI,SOFTCAP}`` where no config
  needs them. ``--full`` builds every head dim and dtype instead (flags only, several times longer).

Compile jobs come from the cores and the available memory (about 4 GB per job). A wheel is cached by
(source digest, torch, CUDA, nvcc, Python, arch, flags): the same request finds the wheel already in
the wheelhouse and builds nothing. The build's output goes to a log kept in the wheelhouse (ninja's
``[n/m]`` steps are shown as progress), and ``<wheel>.json`` beside the wheel records what it was built
for and with which flags; :mod:`sessions.wheelhouse` reads it to match wheels to envs. Without a GPU
(or ``--arch``) or nvcc the session skips with the reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nox

from parity import settings
from parity.backend.flash_build import FA2_RECORD_FILE, fa2_record_text
from parity.results import registry
from sessions import envs, wheelhouse
from sessions.hardware import visible_gpus
from sessions.variants import ROOT

#: Head-dim kernels each package has (a head dim runs on the smallest one at least as wide).
FA2_HEAD_DIMS = (32, 64, 96, 128, 192, 256)
FA3_HEAD_DIMS = (64, 96, 128, 192, 256)
GB_PER_JOB = 4.0
BUILD_TOOLS = ("torch", "ninja", "packaging", "setuptools", "wheel")
_DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class Target:
    name: str  # fa2 | fa3
    distribution: str
    module: str
    #: head-dim kernels the package can build
    head_dims: tuple[int, ...]


TARGETS = {
    "fa2": Target("fa2", "flash-attn", "flash_attn", FA2_HEAD_DIMS),
    "fa3": Target("fa3", "flash-attn-3", "flash_attn_interface", FA3_HEAD_DIMS),
}


# --------------------------------------------------------------------------------------------
# what the registry needs (torch-free, from the config JSON)


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _stack_head_dim(cfg: dict[str, Any]) -> int | None:
    """Head dim of one attention stack: explicit, MLA q/k width, or width / heads (v is padded up)."""
    heads = next(
        (
            h
            for h in (
                _positive_int(cfg.get(k))
                for k in ("num_attention_heads", "num_heads", "encoder_attention_heads")
            )
            if h
        ),
        None,
    )
    if heads is None:
        return None
    nope, rope = _positive_int(cfg.get("qk_nope_head_dim")), _positive_int(cfg.get("qk_rope_head_dim"))
    v = _positive_int(cfg.get("v_head_dim")) or 0
    if nope and rope:
        return max(nope + rope, v)
    explicit = _positive_int(cfg.get("head_dim"))
    if explicit:
        return max(explicit, v)
    width = next(
        (w for w in (_positive_int(cfg.get(k)) for k in ("embed_dim", "d_model", "hidden_size")) if w), None
    )
    return width // heads if width else None


def _stacks(data: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """The config and every nested sub-config (text, vision, audio, thinker...), depth first."""
    yield data
    for key, value in data.items():
        if key.endswith("_config") and isinstance(value, dict):
            yield from _stacks(value)


def attention_head_dims(data: dict[str, Any]) -> set[int]:
    """Every attention head dim of one model config (the flash backends serve all its stacks)."""
    return {d for d in (_stack_head_dim(cfg) for cfg in _stacks(data)) if d}


def features(data: dict[str, Any]) -> set[str]:
    """Kernel features a config needs: ``local`` (sliding window), ``softcap``, ``dropout``."""
    found = set()
    for cfg in _stacks(data):
        types = cfg.get("layer_types") or []
        if cfg.get("use_sliding_window") is True or "sliding_attention" in types:
            found.add("local")
        elif _positive_int(cfg.get("sliding_window")) and "use_sliding_window" not in cfg and not types:
            found.add("local")  # mistral-style: a window whenever one is set
        if cfg.get("attn_logit_softcapping"):
            found.add("softcap")
        dropout = cfg.get("attention_dropout")
        if isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and dropout > 0:
            found.add("dropout")
    return found


@dataclass
class Needs:
    """What the registry's cases ask of a flash build."""

    head_dims: dict[int, list[str]] = field(default_factory=dict)  # head dim -> case ids
    features: dict[str, list[str]] = field(default_factory=dict)  # feature -> case ids
    dtypes: list[str] = field(default_factory=list)


def registry_needs(target: Target, cases: list[registry.Case] | None = None) -> Needs:
    """Head dims and features of every registry case that runs this target's flash modes."""
    cases = registry.cases() if cases is None else cases
    backend = (
        "parity_flash_attention_2_with_sp" if target.name == "fa2" else "parity_flash_attention_3_with_sp"
    )
    hf_name = "flash_attention_2" if target.name == "fa2" else "flash_attention_3"
    needs = Needs(dtypes=compute_dtypes())
    for case in cases:
        if case.unsupported_reason(backend) and case.unsupported_reason(hf_name):
            continue  # the model never runs this package's kernels
        data = registry.read_json(case.config)
        for dim in sorted(attention_head_dims(data)):
            needs.head_dims.setdefault(dim, []).append(case.id)
        for feature in sorted(features(data)):
            needs.features.setdefault(feature, []).append(case.id)
    return needs


def compute_dtypes() -> list[str]:
    """The suites' GPU dtype (bfloat16 unless PARITY_DTYPE asks for float16)."""
    asked = settings.get(settings.DTYPE)
    return [asked] if asked in _DTYPE_SHORT else ["bfloat16"]


def kernel_head_dims(dims: Iterable[int], available: tuple[int, ...]) -> list[int]:
    """The head-dim kernels that serve ``dims`` (smallest one at least as wide); error if too wide."""
    keep = set()
    for d in dims:
        fits = [k for k in available if k >= d]
        if not fits:
            raise ValueError(f"head dim {d} is wider than any kernel of this package ({max(available)})")
        keep.add(fits[0])
    return sorted(keep)


def fa3_flags(kernels: list[int], dtypes: list[str], needed: set[str]) -> dict[str, str]:
    """hopper/setup.py's switches: everything the registry does not use is left out."""
    off = [f"HDIM{k}" for k in FA3_HEAD_DIMS if k not in kernels]
    off += ["FP8", "HDIMDIFF64", "HDIMDIFF192", "SPLIT", "PAGEDKV", "APPENDKV", "PACKGQA", "CLUSTER", "SM80"]
    if "float16" not in dtypes:
        off.append("FP16")
    if "softcap" not in needed:
        off.append("SOFTCAP")
    if "local" not in needed:
        off.append("LOCAL")
    flags = {f"FLASH_ATTENTION_DISABLE_{name}": "TRUE" for name in sorted(off)}
    flags["FLASH_ATTENTION_FORCE_BUILD"] = "TRUE"  # never download a prebuilt wheel instead
    return flags


def fa2_defines(needed: set[str]) -> list[str]:
    """FA2 compile-time switches (commented out in its setup.py) that the registry allows."""
    out = ["FLASHATTENTION_DISABLE_ALIBI"]
    if "dropout" not in needed:
        out.append("FLASHATTENTION_DISABLE_DROPOUT")
    if "softcap" not in needed:
        out.append("FLASHATTENTION_DISABLE_SOFTCAP")
    return sorted(out)


# --------------------------------------------------------------------------------------------
# FA2: narrowing the sdist to the head dims and dtypes in use


class NarrowError(RuntimeError):
    """The FA2 source does not look like the one the narrowing was written for (use --full)."""


_KERNEL_FILE = re.compile(
    r'^\s*"csrc/flash_attn/src/flash_(?:fwd|bwd|fwd_split)_hdim(\d+)_(fp16|bf16)(?:_causal)?_sm80\.cu",\s*\n',
    re.M,
)


def _switch_macro(name: str, args: str, branches: list[tuple[str, list[str]]], fail: str) -> str:
    """A static_switch.h dispatch macro: ``if/else if`` over branches, else TORCH_CHECK(false, fail)."""
    lines = [f"#define {name}({args}, ...)", "  [&] {"]
    for i, (cond, body) in enumerate(branches):
        lines.append(f"    {'if' if i == 0 else '} else if'} ({cond}) {{")
        lines += [f"      {b}" for b in body] + ["      return __VA_ARGS__();"]
    lines += ["    } else {", f"      TORCH_CHECK(false, {fail});", "    }", "  }()"]
    width = max(len(line) for line in lines) + 1
    return "\n".join(line.ljust(width) + "\\" for line in lines[:-1]) + "\n" + lines[-1]


def narrow_fa2(tree: Path, kernels: list[int], dtypes: list[str], defines: list[str]) -> dict[str, Any]:
    """Edit an unpacked FA2 sdist in place so it builds only these head-dim kernels and dtypes."""
    setup_py = tree / "setup.py"
    switch_h = tree / "csrc" / "flash_attn" / "src" / "static_switch.h"
    for path in (setup_py, switch_h):
        if not path.is_file():
            raise NarrowError(f"{path} is missing: not a flash-attn 2.x source tree")
    short = {_DTYPE_SHORT[d] for d in dtypes}
    text = setup_py.read_text()
    files = _KERNEL_FILE.findall(text)
    if not files:
        raise NarrowError(f"{setup_py}: no csrc/flash_attn/src/flash_*_hdim*_sm80.cu sources listed")

    def keep(match: re.Match[str]) -> str:
        return match.group(0) if int(match.group(1)) in kernels and match.group(2) in short else ""

    text = _KERNEL_FILE.sub(keep, text)
    kept = len(_KERNEL_FILE.findall(text))
    for define in defines:
        commented = f'# "-D{define}",'
        if commented not in text:
            raise NarrowError(f"{setup_py}: the commented nvcc flag {commented} is not there")
        text = text.replace(commented, f'"-D{define}",')
    if defines:
        # The switches must reach the host compiler too: flash_api.cpp holds the checks that refuse a
        # disabled feature ("This flash attention build does not support softcap."). With them only in
        # the nvcc flags (where FA2's setup.py lists them) the kernels drop the feature and the call
        # succeeds: measured on an H200, gemma2 with softcap ran 40x past the allowed error, silently.
        host = re.compile(r'^(\s*compiler_c17_flag\s*=\s*\["-O3", "-std=c\+\+17")\]', re.M)
        if not host.search(text):
            raise NarrowError(f"{setup_py}: no compiler_c17_flag list to give the host compiler {defines[0]}")
        host_flags = "".join(f', "-D{d}"' for d in defines)
        text = host.sub(lambda m: m.group(1) + host_flags + "]", text, count=1)
    setup_py.write_text(text)

    header = switch_h.read_text()
    dims_text = " and ".join(str(k) for k in kernels)
    dims_fail = f'"this flash-attn build has head dims {dims_text} only (nox -s build_flash), got ", HEADDIM'
    headdim = _switch_macro(
        "HEADDIM_SWITCH",
        "HEADDIM",
        [(f"HEADDIM <= {k}", [f"constexpr static int kHeadDim = {k};"]) for k in kernels],
        dims_fail,
    )
    branches = []  # COND is "the inputs are fp16" (FP16_SWITCH(!params.is_bf16, ...))
    if "fp16" in short:
        branches.append(("COND", ["using elem_type = cutlass::half_t;"]))
    if "bf16" in short:
        branches.append(("!(COND)", ["using elem_type = cutlass::bfloat16_t;"]))
    fp16 = _switch_macro(
        "FP16_SWITCH", "COND", branches, f'"this flash-attn build has {" and ".join(sorted(dtypes))} only"'
    )
    for name, macro in (("HEADDIM_SWITCH", headdim), ("FP16_SWITCH", fp16)):
        pattern = re.compile(rf"#define {name}\(.*?\}}\(\)", re.S)
        if not pattern.search(header):
            raise NarrowError(f"{switch_h}: no #define {name} to narrow")
        header = pattern.sub(lambda _m, macro=macro: macro, header, count=1)
    switch_h.write_text(header)
    # The dispatch's TORCH_CHECK above does not save the process: on the H200 a head dim left out of
    # this build died with SIGSEGV. So the wheel carries its own record, and parity refuses first.
    package = tree.joinpath(*FA2_RECORD_FILE[:-1])
    if not (package / "__init__.py").is_file():
        raise NarrowError(f"{package}/__init__.py is missing: not a flash-attn 2.x source tree")
    tree.joinpath(*FA2_RECORD_FILE).write_text(fa2_record_text(kernels, dtypes, defines))
    return {
        "kernel_files": kept,
        "left_out": len(files) - kept,
        "defines": defines,
        "head_dims": kernels,
        "record": "/".join(FA2_RECORD_FILE),
    }


# --------------------------------------------------------------------------------------------
# machine, source, cache


def find_cuda_home() -> tuple[Path | None, str]:
    """(CUDA toolkit folder with bin/nvcc and include/cuda_runtime.h, "") or (None, why not).

    Given to the build as CUDA_HOME: torch's own guess (the folder above ``which nvcc``) is wrong when
    nvcc on PATH is a wrapper script such as /usr/local/bin/nvcc.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent.parent))
    for candidate in candidates:
        if not candidate:
            continue
        home = Path(candidate)
        if (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file():
            return home, ""
    return None, "no nvcc (CUDA_HOME unset, /usr/local/cuda/bin/nvcc missing, none on PATH)"


def nvcc_version(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def available_memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 8.0


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def jobs_for(cores: int, memory_gb: float, per_job_gb: float = GB_PER_JOB) -> int:
    """Parallel compile jobs: one per core, as long as each gets about ``per_job_gb`` of memory."""
    return max(1, min(cores, int(memory_gb // per_job_gb)))


_SKIP_PARTS = {".git", "build", "dist", "__pycache__"}


def source_digest(path: Path) -> str:
    """sha256 of a tarball, or of a tree's relative paths and contents (build outputs left out)."""
    digest = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if _SKIP_PARTS & set(rel.parts) or any(part.endswith(".egg-info") for part in rel.parts):
            continue
        digest.update(str(rel).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def _build_dir(target: Target, root: Path) -> Path | None:
    """The folder holding the target's setup.py inside an unpacked source (at most two levels down)."""
    candidates = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    for base in candidates:
        if target.name == "fa3" and (base / "hopper" / "setup.py").is_file():
            return base / "hopper"
        if target.name == "fa2" and (base / "setup.py").is_file() and (base / "csrc" / "flash_attn").is_dir():
            return base
    return None


def unpack(target: Target, source: Path, work: Path) -> Path:
    """A private copy of the source under ``work`` (narrowing edits it); return its build folder."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if source.is_file():
        with tarfile.open(source) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(work, filter="data")
            else:  # pragma: no cover - Python without PEP 706
                tar.extractall(work)  # noqa: S202
    else:
        shutil.copytree(
            source, work / source.name, symlinks=True, ignore=shutil.ignore_patterns(*_SKIP_PARTS)
        )
    found = _build_dir(target, work)
    if found is None:
        layout = (
            "hopper/setup.py (a flash-attention tree)"
            if target.name == "fa3"
            else "setup.py and csrc/flash_attn"
        )
        raise FileNotFoundError(f"{source} has no {layout}")
    return found


def cache_key(plan: dict[str, Any]) -> str:
    """What decides the wheel: source, torch, CUDA, nvcc, Python, arch and flags."""
    keys = ("target", "source_digest", "torch", "cuda", "nvcc", "python", "arch", "flags", "narrowing")
    blob = json.dumps({k: plan.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cached_wheel(house: Path, key: str) -> Path | None:
    """The wheel an earlier build with this key left in the wheelhouse, if it is still there."""
    for side in sorted(house.glob("*.whl" + wheelhouse.SIDECAR_SUFFIX)):
        try:
            data = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        wheel = side.with_name(side.name.removesuffix(wheelhouse.SIDECAR_SUFFIX))
        if isinstance(data, dict) and data.get("key") == key and wheel.is_file():
            return wheel
    return None


def local_label(plan: dict[str, Any], key: str) -> str:
    """The wheel's local version: torch, CUDA and arch readable from the file name, plus the key."""
    cuda = (plan.get("cuda") or "0").replace(".", "")
    torch = ".".join(str(plan.get("torch") or "0").split("+")[0].split(".")[:2])
    return f"cu{cuda}torch{torch}sm{plan['arch']}.k{key}"


# --------------------------------------------------------------------------------------------
# the session


def parse_args(session: nox.Session) -> argparse.Namespace:
    usage = (
        "nox -s build_flash -- fa2|fa3 [--source PATH] [--config PATH ...] [--jobs N] [--arch 90] "
        "[--dry-run] [--force] [--full]"
    )
    parser = argparse.ArgumentParser(prog="nox -s build_flash --", add_help=False)
    parser.add_argument("target", nargs="?", choices=sorted(TARGETS))
    parser.add_argument("--source", type=Path, help="source tree or tarball (FA2 default: the PyPI sdist)")
    parser.add_argument("--jobs", type=int, help="parallel compile jobs (default: from cores and memory)")
    parser.add_argument("--arch", help="CUDA arch to build for, e.g. 90 (default: the GPU present)")
    parser.add_argument("--dry-run", action="store_true", help="show the plan, build nothing")
    parser.add_argument("--force", action="store_true", help="build even if the wheelhouse has this wheel")
    parser.add_argument("--full", action="store_true", help="FA2: every head dim and dtype (no narrowing)")
    parser.add_argument("--timeout", type=float, help="stop the compiler after S seconds")
    parser.add_argument(
        "--config", action="append", default=[], help="also build for this config.json (repeatable)"
    )
    try:
        args = parser.parse_args(session.posargs)
    except SystemExit:
        session.error(f"usage: {usage}")
    if args.target is None:
        session.error(f"usage: {usage}")
    args.cases = registry.cases()
    for raw in args.config:  # a model outside the registry, as `nox -s patch -- --config PATH` runs it
        try:
            args.cases.append(registry.check_adhoc_config(raw))
        except registry.ToyConfigError as exc:
            session.log(f"error: {exc}")
            raise SystemExit(2) from None
    if args.jobs is not None and args.jobs < 1:
        session.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.source is not None:
        args.source = args.source.expanduser().resolve()
        if not args.source.exists():
            session.error(f"--source {args.source}: no such file or folder")
    if args.arch is not None and not re.fullmatch(r"\d{2,3}", args.arch):
        session.error(f"--arch {args.arch!r}: expected digits like 90 (compute capability 9.0)")
    return args


def machine_problems(
    target: Target, arch: str | None, why_no_gpu: str, dry_run: bool
) -> tuple[str | None, list[str]]:
    """(nvcc, what stops a build here): a GPU or --arch to build for, nvcc, FA3's sm_90."""
    problems = []
    if arch is None:
        problems.append(f"no CUDA GPU to build for ({why_no_gpu}; --arch 90 builds for another machine)")
    elif target.name == "fa3" and arch != "90":
        problems.append(f"FlashAttention-3 (hopper/) builds for sm_90 only; the arch here is sm_{arch}")
    cuda_home, why_no_nvcc = find_cuda_home()
    if cuda_home is None and not dry_run:
        problems.append(why_no_nvcc)
    return (str(cuda_home / "bin" / "nvcc") if cuda_home else None), problems


def make_plan(
    target: Target,
    args: argparse.Namespace,
    arch: str,
    facts: wheelhouse.EnvFacts,
    nvcc: str | None,
    source_digest_value: str,
) -> dict[str, Any]:
    """Everything the build will use, and the cache key over it."""
    needs = registry_needs(target, getattr(args, "cases", None))
    kernels = kernel_head_dims(needs.head_dims, target.head_dims)
    needed = set(needs.features)
    if target.name == "fa3":
        flags, narrowing = fa3_flags(kernels, needs.dtypes, needed), None
    else:
        flags = {"FLASH_ATTENTION_FORCE_BUILD": "TRUE", "FLASH_ATTN_CUDA_ARCHS": arch}
        narrowing = (
            None
            if args.full
            else {
                "head_dims": kernels,
                "dtypes": needs.dtypes,
                "defines": fa2_defines(needed),
                "host_defines": True,  # the switches reach flash_api.cpp too (older wheels: not)
                "record": "/".join(FA2_RECORD_FILE),  # the wheel says what it holds (older wheels: not)
            }
        )
    plan = {
        "target": target.name,
        "distribution": target.distribution,
        "source": str(args.source)
        if args.source
        else f"PyPI sdist {wheelhouse.constraint(target.distribution)}",
        "source_digest": source_digest_value,
        "torch": facts.torch,
        "cuda": facts.cuda,
        "nvcc": nvcc_version(nvcc) if nvcc else None,
        "python": facts.python,
        "arch": arch,
        "archs": [arch],
        "flags": flags,
        "narrowing": narrowing,
        "head_dims": kernels,
        "registry_head_dims": {str(k): v for k, v in sorted(needs.head_dims.items())},
        "features": needs.features,
        "dtypes": needs.dtypes,
        "jobs": args.jobs or jobs_for(cpu_count(), available_memory_gb()),
    }
    plan["key"] = cache_key(plan)
    return plan


def _fetch_sdist(session: nox.Session, target: Target, work: Path) -> Path:
    """FA2's source distribution from the index (pip download), for builds without --source."""
    requirement = str(wheelhouse.constraint(target.distribution) or target.distribution)
    work.mkdir(parents=True, exist_ok=True)
    out = session.run(
        envs.python(session),
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--no-deps",
        "--no-binary",
        ":all:",
        "-d",
        str(work),
        requirement,
        silent=True,
        success_codes=[0, 1],
    )
    found = sorted(work.glob("*.tar.gz"))
    if not found:
        errors = [line for line in (out or "").splitlines() if line.startswith("ERROR:")]
        session.skip(
            f"build_flash fa2: cannot fetch the {requirement} sdist ({errors[0] if errors else 'no sdist'}): "
            "pass --source PATH (a flash_attn-*.tar.gz or an unpacked tree)"
        )
    return found[-1]


def _stream_build(
    cmd: list[str], cwd: Path, env: dict[str, str], log: Path, timeout: float | None
) -> tuple[int, float, list[str]]:
    """Run the build, every line into ``log``, ninja's [n/m] steps as progress; (exit code, seconds, tail).

    ``timeout`` kills the whole build (its own session: pip, setup.py, ninja, nvcc) even while it is
    silent, so a bounded run stays bounded.
    """
    start = time.monotonic()
    tail: list[str] = []
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert proc.stdout is not None
        timer = None
        if timeout:
            timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
            timer.start()
        try:
            for line in proc.stdout:
                out.write(line)
                tail = (tail + [line.rstrip()])[-15:]
                step = re.match(r"^\s*\[(\d+)/(\d+)\]", line)  # pip -v indents the build output
                if step:
                    print(
                        f"build_flash: [{step.group(1)}/{step.group(2)}] {time.monotonic() - start:5.0f}s",
                        flush=True,
                    )
        finally:
            code = proc.wait()
            if timer is not None:
                timer.cancel()
    seconds = time.monotonic() - start
    if timeout and seconds >= timeout:
        tail.append(f"stopped after {timeout:g} s (--timeout)")
    return code, seconds, tail


def run_build_flash(session: nox.Session) -> None:
    """The session body: plan, cache lookup, unpack (and narrow), compile, wheel + flags into the house."""
    args = parse_args(session)
    target = TARGETS[args.target]
    gpus, why = visible_gpus()
    arch = args.arch
    if arch is None and gpus:
        major, minor = max(g.capability for g in gpus)
        arch = f"{major}{minor}"
    nvcc, problems = machine_problems(target, arch, why, args.dry_run)
    if problems:
        session.skip(f"build_flash {target.name}: cannot build here: " + "; ".join(problems))
    assert arch is not None

    try:
        session.log(
            envs.prepare(session, [envs.variant_requirements("build")], gpu_arch=arch, variant="build_flash")
        )
    except envs.InstallFailed as exc:
        session.skip(f"build_flash {target.name}: the build env cannot be set up: {exc}")
    facts = envs.env_facts(session, arch, list(BUILD_TOOLS))
    blockers = []
    missing = [name for name in BUILD_TOOLS if not facts.packages.get(name)]
    if missing:
        blockers.append(f"the build env ({facts.prefix}) lacks {', '.join(missing)}")
    if not facts.cuda:
        blockers.append(f"the build env's torch {facts.torch} has no CUDA to build against")
    if blockers and not args.dry_run:
        session.skip(f"build_flash {target.name}: " + "; ".join(blockers))
    for blocker in blockers:
        session.warn(f"build_flash {target.name}: a real build would stop here: {blocker}")

    house = wheelhouse.location()
    house.mkdir(parents=True, exist_ok=True)
    scratch = ROOT / ".nox" / "flash-build"  # sources and build trees (.nox/build_flash is the env)
    source = args.source
    if source is None:
        if target.name == "fa3":
            session.skip(
                "build_flash fa3: FlashAttention-3 has no distribution on PyPI: pass --source PATH "
                "(a flash-attention tree or tarball holding hopper/ and csrc/cutlass)"
            )
        source = _fetch_sdist(session, target, scratch / "sdist")
        args.source = source
    plan = make_plan(target, args, arch, facts, nvcc, source_digest(source))
    session.log(
        "build_flash plan: "
        + json.dumps({k: v for k, v in plan.items() if k != "source_digest"}, sort_keys=True)
    )

    cached = cached_wheel(house, plan["key"])
    if cached and not args.force:
        session.log(f"build_flash {target.name}: cached: {cached} (key {plan['key']}); nothing to build")
        return
    work = scratch / f"{target.name}-{plan['key']}"
    try:
        build_dir = unpack(target, source, work / "src")
        if plan["narrowing"]:
            narrowed = narrow_fa2(
                build_dir,
                plan["narrowing"]["head_dims"],
                plan["narrowing"]["dtypes"],
                plan["narrowing"]["defines"],
            )
            plan["narrowing"].update(narrowed)
            session.log(
                f"build_flash fa2: narrowed to head dims {narrowed['head_dims']}, {plan['dtypes']}: "
                f"{narrowed['kernel_files']} kernel files ({narrowed['left_out']} left out), "
                f"{narrowed['defines']}"
            )
    except (OSError, tarfile.TarError, NarrowError) as exc:
        session.error(f"build_flash {target.name}: cannot prepare the source {source}: {exc}")
    if args.dry_run:
        session.log(
            f"build_flash {target.name}: dry run: would build in {build_dir} "
            f"with {plan['jobs']} jobs into {house}"
        )
        return

    label = local_label(plan, plan["key"])
    logs = house / "logs"
    logs.mkdir(exist_ok=True)
    log = logs / f"{target.name}-{plan['key']}.log"
    out_dir = work / "dist"
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **{k: v for k, v in session.env.items() if v is not None},  # nox marks unset variables with None
        **plan["flags"],
        "MAX_JOBS": str(plan["jobs"]),
        "FLASH_ATTN_LOCAL_VERSION": label,
        "TORCH_CUDA_ARCH_LIST": f"{arch[:-1]}.{arch[-1]}",
        "CUDA_HOME": str(Path(nvcc).parent.parent),  # the toolkit find_cuda_home() checked
        # ninja (torch's parallel build) from the env, the image or the system
        "PATH": os.pathsep.join(
            [*(session.bin_paths or []), str(Path(sys.executable).parent), os.environ.get("PATH", "")]
        ),
    }
    cmd = [
        envs.python_path(session),
        "-m",
        "pip",
        "wheel",
        "--no-build-isolation",
        "--no-deps",
        "--disable-pip-version-check",
        "-v",
        "-w",
        str(out_dir),
        ".",
    ]
    session.log(f"build_flash {target.name}: compiling in {build_dir} with {plan['jobs']} jobs; log: {log}")
    code, seconds, tail = _stream_build(cmd, build_dir, env, log, args.timeout)
    wheels = sorted(out_dir.glob("*.whl"))
    if code != 0 or not wheels:
        session.error(
            f"build_flash {target.name}: build failed (exit {code}) after {seconds:.0f} s; log: {log}\n"
            + "\n".join(tail)
        )
    built = house / wheels[-1].name
    shutil.move(str(wheels[-1]), built)
    plan.update(
        wheel=built.name, build_s=round(seconds, 1), log=str(log), built_at=time.strftime("%Y-%m-%dT%H:%M:%S")
    )
    built.with_name(built.name + wheelhouse.SIDECAR_SUFFIX).write_text(
        json.dumps(plan, indent=2, sort_keys=True) + "\n"
    )
    _drop_superseded(session, house, built, plan)
    session.log(
        f"build_flash {target.name}: built {built} in {seconds:.0f} s "
        f"(flags: {built.name}{wheelhouse.SIDECAR_SUFFIX})"
    )


def _drop_superseded(session: nox.Session, house: Path, built: Path, plan: dict[str, Any]) -> None:
    """Earlier builds for the same (package, torch, CUDA, Python, arch): the new one replaces them."""
    same = ("distribution", "torch", "cuda", "python", "arch")
    for side in house.glob("*.whl" + wheelhouse.SIDECAR_SUFFIX):
        wheel = side.with_name(side.name.removesuffix(wheelhouse.SIDECAR_SUFFIX))
        if wheel == built:
            continue
        try:
            data = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and all(data.get(k) == plan.get(k) for k in same):
            session.log(f"build_flash: {wheel.name} is superseded by {built.name}; removed")
            wheel.unlink(missing_ok=True)
            side.unlink(missing_ok=True)
