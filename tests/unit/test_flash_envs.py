"""Flash packages for the variant envs: the wheelhouse, PARITY_SYSTEM_SITE envs, and build_flash's plan.

Everything runs on CPU. Wheels are planted in a temporary wheelhouse (file names and sidecars for the
matching rules, one real but ABI-broken wheel for the install path), ``nvidia-smi`` is a planted
script where a session must believe in a GPU, and the "image" whose packages a PARITY_SYSTEM_SITE env
stands on is this test interpreter (it has torch and transformers).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("nox")

from packaging import tags as pkg_tags  # noqa: E402

from parity.results import registry  # noqa: E402
from sessions import build_flash, envs, wheelhouse  # noqa: E402
from sessions.wheelhouse import EnvFacts  # noqa: E402

VENDOR = Path("/work/shared/vendor/flash_attn-2.8.3.post2.tar.gz")


def gpu_facts(python: tuple[int, int] = (3, 12), torch: str = "2.11.0+cu130", cuda: str = "13.0") -> EnvFacts:
    """An H200 image's env: CPython 3.12 on linux x86_64, torch 2.11 + CUDA 13.0, sm_90."""
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"]
    tags = [
        *pkg_tags.cpython_tags(python, platforms=platforms),
        *pkg_tags.compatible_tags(python, platforms=platforms),
    ]
    return EnvFacts(
        python=f"{python[0]}.{python[1]}",
        tags=frozenset(str(t) for t in tags),
        machine="x86_64",
        torch=torch,
        cuda=cuda,
        gpu_arch="90",
    )


def plant(folder: Path, name: str, sidecar: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"not a real wheel: only its name and sidecar are read")
    if sidecar is not None:
        path.with_name(name + ".json").write_text(json.dumps(sidecar))
    return path


# --------------------------------------------------------------------------------------------
# matching wheels to envs


def test_wheels_for_another_python_torch_cuda_or_arch_are_no_matching_wheel(tmp_path):
    house = tmp_path / "house"
    plant(house, "flash_attn-2.8.3.post2-cp311-cp311-linux_x86_64.whl")  # another Python
    plant(house, "flash_attn-2.8.3.post2+cu130torch2.10sm90-cp312-cp312-linux_x86_64.whl")  # another torch
    plant(house, "flash_attn-2.8.3.post2+cu126torch2.11sm90-cp312-cp312-linux_x86_64.whl")  # another CUDA
    plant(house, "flash_attn-2.8.3.post2+cu130torch2.11sm80-cp312-cp312-linux_x86_64.whl")  # another GPU
    plant(house, "flash_attn-2.7.4-cp312-cp312-linux_x86_64.whl")  # outside the constraint
    plant(house, "flash_attn_3-3.0.0-cp310-abi3-linux_x86_64.whl")  # another package
    facts = gpu_facts()
    found = wheelhouse.resolve("flash-attn", facts, [house])
    assert found.wheel is None
    why = dict(found.rejected)
    assert (
        "this env's Python 3.12 takes cp312" in why["flash_attn-2.8.3.post2-cp311-cp311-linux_x86_64.whl"][0]
    )
    assert why["flash_attn-2.8.3.post2+cu130torch2.10sm90-cp312-cp312-linux_x86_64.whl"] == [
        "built for torch 2.10, this env has torch 2.11.0+cu130"
    ]
    assert why["flash_attn-2.8.3.post2+cu126torch2.11sm90-cp312-cp312-linux_x86_64.whl"] == [
        "built for CUDA 12.6, this env's torch has CUDA 13.0"
    ]
    assert why["flash_attn-2.8.3.post2+cu130torch2.11sm80-cp312-cp312-linux_x86_64.whl"] == [
        "built for sm_80, this GPU is sm_90"
    ]
    assert (
        "the constraint is flash-attn==2.8.3.post2" in why["flash_attn-2.7.4-cp312-cp312-linux_x86_64.whl"][0]
    )
    assert len(why) == 5, "the flash-attn-3 wheel is not a candidate for flash-attn"

    reason = found.no_wheel_reason(facts, "fa2")
    assert reason.startswith(
        "fa2: no matching wheel for flash-attn==2.8.3.post2 (torch 2.11.0+cu130, CUDA 13.0, "
        "Python 3.12 (cp312), linux_x86_64, GPU sm_90) in "
    )
    for needle in (
        "PIP_FIND_LINKS",
        "PIP_EXTRA_INDEX_URL",
        "https://download.pytorch.org/whl/cu130",
        "nox -s build_flash -- fa2",
    ):
        assert needle in reason
    assert "Traceback" not in reason


def test_the_fitting_wheel_is_picked_and_build_flash_sidecars_count(tmp_path):
    house = tmp_path / "house"
    plain = plant(house, "flash_attn-2.8.3.post2-cp312-cp312-linux_x86_64.whl")  # facts unknown: taken
    assert wheelhouse.resolve("flash-attn", gpu_facts(), [house]).wheel.path == plain
    built = plant(
        house,
        "flash_attn-2.8.3.post2+cu130torch2.11sm90.kabc-cp312-cp312-linux_x86_64.whl",
        {"torch": "2.11.0+cu130", "cuda": "13.0", "archs": ["90"]},
    )
    assert wheelhouse.resolve("flash-attn", gpu_facts(), [house]).wheel.path == built, (
        "a build_flash wheel wins"
    )
    # its sidecar says torch 2.11: a torch 2.13 env must not take it, even though the name fits
    other = wheelhouse.resolve("flash-attn", gpu_facts(torch="2.13.0+cu130"), [house])
    assert other.wheel.path == plain and other.rejected[0][0] == built.name
    fa3 = plant(house, "flash_attn_3-3.0.0-cp310-abi3-linux_x86_64.whl")  # abi3: any CPython >= 3.10
    assert wheelhouse.resolve("flash-attn-3", gpu_facts(), [house]).wheel.path == fa3


def test_build_flash_labels_read_back_as_what_the_wheel_was_built_for(tmp_path):
    plan = {"torch": "2.11.0+cu130", "cuda": "13.0", "arch": "90"}
    label = build_flash.local_label(plan, "0123456789ab")
    assert label == "cu130torch2.11sm90.k0123456789ab"
    wheel = wheelhouse.read_wheel(plant(tmp_path, f"flash_attn_3-3.0.0+{label}-cp310-abi3-linux_x86_64.whl"))
    assert (wheel.torch, wheel.cuda, wheel.archs) == ("2.11", "13.0", ("90",))


def test_variant_requirements_split_into_stack_flash_and_own():
    pip_lines, flash, own = envs.split_requirements([envs.variant_requirements("fa2")])
    assert flash == ["flash-attn"] and own == ["einops"] and "torch" in pip_lines
    assert envs.split_requirements([envs.variant_requirements("fa3")])[1:] == (["flash-attn-3"], [])
    assert envs.split_requirements([envs.variant_requirements("eager")])[1:] == ([], [])
    assert "import site; site.addsitedir('/img/site-packages')" in envs.pth_text(["/img/site-packages"])


# --------------------------------------------------------------------------------------------
# the sessions, through nox, on CPU


def _fake_gpu(folder: Path) -> dict[str, str]:
    """PATH with an nvidia-smi that reports one Hopper GPU (the hardware check then passes)."""
    folder.mkdir(parents=True, exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, Planted H200, 9.0'\n")
    smi.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def _nox(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {
        k: v for k, v in os.environ.items() if not k.startswith(("PARITY_", "PIP_FIND_LINKS", "PIP_NO_INDEX"))
    }
    full.update(env)
    cmd = [sys.executable, "-m", "nox", "--envdir", str(tmp_path / "envs"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=full)


def _manifest(results: Path, variant: str) -> dict:
    return json.loads((results / "patch" / variant / "_run.json").read_text())


def test_system_site_fa2_with_no_fitting_wheel_skips_with_the_reason_not_a_traceback(tmp_path):
    house = tmp_path / "house"
    plant(house, "flash_attn-2.8.3.post2-cp39-cp39-linux_x86_64.whl")
    plant(house, "flash_attn-2.8.3.post2+cpu.torch2.10-py3-none-any.whl")
    results = tmp_path / "results"
    env = {"PARITY_SYSTEM_SITE": "1", "PARITY_WHEELHOUSE": str(house), **_fake_gpu(tmp_path / "bin")}
    proc = _nox(tmp_path, "-s", "patch(fa2)", "--", "qwen3", "--results", str(results), env=env)
    out = proc.stdout + proc.stderr
    reason = _manifest(results, "fa2")["reason"]
    assert _manifest(results, "fa2")["status"] == "skipped", out
    assert reason.startswith("fa2: no matching wheel for flash-attn==2.8.3.post2 (torch "), reason
    assert "flash_attn-2.8.3.post2-cp39-cp39-linux_x86_64.whl (built for cp39-cp39-linux_x86_64" in reason
    assert "+cpu.torch2.10-py3-none-any.whl (built for torch 2.10, this env has torch 2." in reason
    assert "nox -s build_flash -- fa2" in reason and reason in out
    assert "Traceback" not in out


def _wheel(folder: Path, dist: str, version: str, module: str, code: str) -> Path:
    """A real, installable pure-Python wheel holding one package."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{dist.replace('-', '_')}-{version}"
    path = folder / f"{stem}-py3-none-any.whl"
    info = f"{stem}.dist-info"
    files = {
        f"{module}/__init__.py": code,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
        zf.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in [*files, f"{info}/RECORD"]))
    return path


def test_system_site_env_takes_the_image_packages_and_only_its_own_wheel(tmp_path):
    """The fa2 env gets the wheel (into the env only); the import fails there, so the probe skips it."""
    house = tmp_path / "house"
    broken = (
        'raise ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c10")\n'  # built for another torch
    )
    _wheel(house, "flash-attn", "2.8.3.post2", "flash_attn", broken)
    _wheel(house, "einops", "0.8.1", "einops", "")  # what fa2 adds besides flash-attn, if the image lacks it
    results = tmp_path / "results"
    env = {"PARITY_SYSTEM_SITE": "1", "PARITY_WHEELHOUSE": str(house), **_fake_gpu(tmp_path / "bin")}
    proc = _nox(tmp_path, "-s", "patch(fa2)", "--", "qwen3", "--results", str(results), env=env)
    out = proc.stdout + proc.stderr
    manifest = _manifest(results, "fa2")
    assert manifest["status"] == "skipped", out
    assert manifest["reason"].startswith("fa2: "), manifest["reason"]
    # the planted nvidia-smi got us past the hardware check; this torch (CPU) is what stops the probe,
    # after the wheel went into the env and torch/transformers came from the image
    assert "needs a CUDA GPU; torch" in manifest["reason"] or "undefined symbol" in manifest["reason"]
    site = next((tmp_path / "envs").glob(f"*/lib/python*/site-packages/{envs.PTH_NAME}")).parent
    assert (site / "flash_attn" / "__init__.py").is_file(), "the wheel goes into the variant env"
    assert (site / "einops").is_dir(), "what the image lacks comes from the wheelhouse, with no index"
    assert (site / envs.PTH_NAME).is_file() and not (site / "torch").exists(), "torch comes from the image"
    import importlib.util

    assert importlib.util.find_spec("flash_attn") is None, "the image itself stays without flash_attn"


def test_system_site_eager_env_runs_a_model_on_the_image_packages(tmp_path):
    results = tmp_path / "results"
    proc = _nox(
        tmp_path,
        "-s",
        "patch(eager)",
        "--",
        "qwen3",
        "--results",
        str(results),
        env={"PARITY_SYSTEM_SITE": "1"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "built env" in out and "on the image's packages" in out
    records = json.loads((results / "patch" / "eager" / "qwen3.json").read_text())["records"]
    fingerprint = records[0]["fingerprint"]
    pth = next((tmp_path / "envs").glob(f"*/lib/python*/site-packages/{envs.PTH_NAME}"))
    assert fingerprint["env"] == str(pth.parents[3]), "the record names the variant env it ran in"
    assert fingerprint["env"] != sys.prefix
    assert fingerprint["flash_attn"] is None and fingerprint["flash_attn_3"] is None
    assert _manifest(results, "eager")["extra"]["env_kind"] == "system-site"


def test_build_flash_skips_on_a_machine_without_a_gpu(tmp_path):
    env = {
        "PATH": os.pathsep.join(
            p for p in os.environ["PATH"].split(os.pathsep) if not shutil.which("nvidia-smi", path=p)
        )
    }
    proc = _nox(tmp_path, "--no-venv", "-s", "build_flash", "--", "fa2", env=env)
    out = proc.stdout + proc.stderr
    assert (
        "Session build_flash skipped: build_flash fa2: cannot build here: no CUDA GPU to build for" in out
    ), out
    proc = _nox(tmp_path, "--no-venv", "-s", "build_flash", "--", "fa3", "--arch", "80", env=env)
    assert (
        "FlashAttention-3 (hopper/) builds for sm_90 only; the arch here is sm_80"
        in proc.stdout + proc.stderr
    )


# --------------------------------------------------------------------------------------------
# build_flash's plan, from the registry's config JSON


def test_a_config_outside_the_registry_adds_its_head_dims_to_the_build():
    """`build_flash -- fa2 --config PATH`: the model a user runs with --config gets its kernels too."""
    llama_2b = registry.check_adhoc_config(str(Path(__file__).parents[2] / "gpu" / "configs" / "llama_2b"))
    needs = build_flash.registry_needs(build_flash.TARGETS["fa2"], [*registry.cases(), llama_2b])
    assert needs.head_dims[128] == ["llama_2b"] and 64 in needs.head_dims
    assert build_flash.kernel_head_dims(needs.head_dims, build_flash.FA2_HEAD_DIMS) == [64, 128]


def test_head_dims_come_from_every_attention_stack_of_the_registry_configs():
    needs = build_flash.registry_needs(build_flash.TARGETS["fa3"])
    assert needs.head_dims == {64: registry.ids()}, (
        "text, MLA, vision and audio stacks of the toys are 64 wide"
    )
    # sliding layers (gemma2, gemma3, gpt_oss) and gemma2's soft-capping are compiled in
    assert {k: set(v) for k, v in needs.features.items()} == {
        "local": {"gemma2", "gemma3", "gpt_oss"},
        "softcap": {"gemma2"},
    }
    assert needs.dtypes == ["bfloat16"]
    mla = {"num_attention_heads": 8, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}
    vlm = {
        "text_config": {"hidden_size": 4096, "num_attention_heads": 32},
        "vision_config": {"embed_dim": 1280, "hidden_size": 3584, "num_heads": 16},
    }
    omni = {"thinker_config": {"audio_config": {"d_model": 1280, "encoder_attention_heads": 20}}}
    assert build_flash.attention_head_dims(mla) == {192}
    assert build_flash.attention_head_dims(vlm) == {128, 80}
    assert build_flash.attention_head_dims(omni) == {64}
    assert build_flash.kernel_head_dims([80, 64, 128], build_flash.FA3_HEAD_DIMS) == [64, 96, 128]
    with pytest.raises(ValueError, match="head dim 300 is wider"):
        build_flash.kernel_head_dims([300], build_flash.FA2_HEAD_DIMS)
    assert build_flash.features(
        {"text_config": {"layer_types": ["sliding_attention", "full_attention"]}}
    ) == {"local"}


def test_fa3_flags_leave_out_what_the_registry_does_not_use():
    flags = build_flash.fa3_flags([64], ["bfloat16"], set())
    off = {
        k.removeprefix("FLASH_ATTENTION_DISABLE_") for k, v in flags.items() if v == "TRUE" and "DISABLE" in k
    }
    assert {"HDIM96", "HDIM128", "HDIM192", "HDIM256", "FP16", "FP8", "LOCAL", "SOFTCAP"} <= off
    assert "HDIM64" not in off and "BACKWARD" not in off and "VARLEN" not in off
    assert flags["FLASH_ATTENTION_FORCE_BUILD"] == "TRUE"
    wide = build_flash.fa3_flags([64, 128], ["bfloat16", "float16"], {"local"})
    assert not {
        "FLASH_ATTENTION_DISABLE_HDIM128",
        "FLASH_ATTENTION_DISABLE_FP16",
        "FLASH_ATTENTION_DISABLE_LOCAL",
    } & set(wide)
    assert (
        build_flash.jobs_for(16, 128.0) == 16
        and build_flash.jobs_for(16, 21.0) == 5
        and build_flash.jobs_for(2, 1.0) == 1
    )


SETUP_PY = """    nvcc_flags = [
    "-O3",
    # "-DFLASHATTENTION_DISABLE_DROPOUT",
    # "-DFLASHATTENTION_DISABLE_ALIBI",
    # "-DFLASHATTENTION_DISABLE_SOFTCAP",
    ]

    compiler_c17_flag=["-O3", "-std=c++17"]
    sources=[
                "csrc/flash_attn/flash_api.cpp",
{files}            ],
"""
SWITCH_H = """#define FP16_SWITCH(COND, ...)               \\
  [&] {                                      \\
    if (COND) {                              \\
      using elem_type = cutlass::half_t;     \\
      return __VA_ARGS__();                  \\
    } else {                                 \\
      using elem_type = cutlass::bfloat16_t; \\
      return __VA_ARGS__();                  \\
    }                                        \\
  }()

#define HEADDIM_SWITCH(HEADDIM, ...)   \\
  [&] {                                    \\
    if (HEADDIM <= 32) {                   \\
      constexpr static int kHeadDim = 32;  \\
      return __VA_ARGS__();                \\
    } else if (HEADDIM <= 64) {            \\
      constexpr static int kHeadDim = 64;  \\
      return __VA_ARGS__();                \\
    }                                      \\
  }()
"""


def _fa2_tree(root: Path) -> Path:
    files = "".join(
        f'                "csrc/flash_attn/src/flash_{kind}_hdim{d}_{t}{c}_sm80.cu",\n'
        for kind in ("fwd", "bwd", "fwd_split")
        for d in (32, 64, 128)
        for t in ("fp16", "bf16")
        for c in ("", "_causal")
    )
    (root / "csrc" / "flash_attn" / "src").mkdir(parents=True)
    (root / "setup.py").write_text(SETUP_PY.format(files=files))
    (root / "csrc" / "flash_attn" / "src" / "static_switch.h").write_text(SWITCH_H)
    (root / "flash_attn").mkdir()
    (root / "flash_attn" / "__init__.py").write_text('__version__ = "2.8.3.post2"\n')
    return root


def _load_record(tree: Path):
    """The record module a narrowed tree would put into the wheel, loaded as flash_attn.build_config."""
    import importlib.util

    path = tree / "flash_attn" / "build_config.py"
    spec = importlib.util.spec_from_file_location("flash_attn.build_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fa2_narrowing_keeps_only_the_kernel_files_and_dispatch_in_use(tmp_path):
    tree = _fa2_tree(tmp_path / "fa2")
    defines = build_flash.fa2_defines(set())
    done = build_flash.narrow_fa2(tree, [64], ["bfloat16"], defines)
    assert done["kernel_files"] == 6 and done["left_out"] == 30
    setup = (tree / "setup.py").read_text()
    assert "hdim64_bf16_causal_sm80.cu" in setup and "hdim64_fp16" not in setup and "hdim32" not in setup
    assert '    "-DFLASHATTENTION_DISABLE_DROPOUT",' in setup and '# "-D' not in setup
    # the host compiler sees the switches too, so flash_api.cpp refuses a disabled feature
    host = next(line for line in setup.splitlines() if "compiler_c17_flag=" in line)
    assert all(f'"-D{d}"' in host for d in defines), host
    header = (tree / "csrc" / "flash_attn" / "src" / "static_switch.h").read_text()
    assert "kHeadDim = 64" in header and "kHeadDim = 32" not in header and "cutlass::half_t" not in header
    assert 'TORCH_CHECK(false, "this flash-attn build has head dims 64 only' in header
    assert all(line.endswith("\\") for line in header.split("#define HEADDIM_SWITCH")[1].splitlines()[:-1])
    with pytest.raises(build_flash.NarrowError, match="commented nvcc flag"):
        build_flash.narrow_fa2(tree, [64], ["bfloat16"], defines)  # already narrowed: refuses, never guesses


def test_a_narrowed_fa2_carries_the_record_the_backend_refuses_from(tmp_path, monkeypatch):
    """Producer and consumer of the FA2 build record agree: what the build left out is refused.

    On the H200 the narrowed wheel's own dispatch check did not save the process: a head dim of 128 on
    a head-dim-64 build died with SIGSEGV (gpu/probe_fa2_errors.py), so this record is the refusal.
    """
    from parity.backend import flash_build

    tree = _fa2_tree(tmp_path / "fa2")
    done = build_flash.narrow_fa2(tree, [64], ["bfloat16"], build_flash.fa2_defines(set()))
    assert done["record"] == "flash_attn/build_config.py"
    record = _load_record(tree)
    assert record.CONFIG["head_dims"] == [64] and record.CONFIG["dtypes"] == ["bfloat16"]
    monkeypatch.setitem(sys.modules, "flash_attn.build_config", record)
    assert flash_build.fa2_build_gaps(head_dim=128, dtype="bfloat16", softcap=False) == [
        "head dim 128 (built for head dims 64)"
    ]
    assert flash_build.fa2_build_gaps(head_dim=48, dtype="float16", softcap=True) == [
        "float16 (built for bfloat16)",
        "logit soft-capping (softcap) (FLASHATTENTION_DISABLE_SOFTCAP)",
    ]
    assert flash_build.fa2_build_gaps(head_dim=64, dtype="bfloat16", softcap=False) == []


def test_a_tree_without_the_flash_attn_package_is_not_narrowed(tmp_path):
    tree = _fa2_tree(tmp_path / "fa2")
    shutil.rmtree(tree / "flash_attn")
    with pytest.raises(build_flash.NarrowError, match="flash_attn/__init__.py is missing"):
        build_flash.narrow_fa2(tree, [64], ["bfloat16"], build_flash.fa2_defines(set()))


@pytest.mark.skipif(not VENDOR.is_file(), reason=f"{VENDOR} (the vendored FA2 sdist) is not on this machine")
def test_fa2_narrowing_applies_to_the_pypi_sdist(tmp_path):
    target = build_flash.TARGETS["fa2"]
    tree = build_flash.unpack(target, VENDOR, tmp_path / "src")
    done = build_flash.narrow_fa2(tree, [64], ["bfloat16"], build_flash.fa2_defines(set()))
    assert (done["kernel_files"], done["left_out"]) == (6, 66)
    setup = (tree / "setup.py").read_text().splitlines()
    host = next(line for line in setup if "compiler_c17_flag=[" in line)
    assert '"-DFLASHATTENTION_DISABLE_SOFTCAP"' in host, host
    assert _load_record(tree).CONFIG["head_dims"] == [64]  # lands inside the package setup.py ships
    assert "find_packages(" in "\n".join(setup)


def test_cached_wheel_is_found_by_its_key(tmp_path):
    plan = {
        "target": "fa3",
        "source_digest": "s",
        "torch": "2.11.0+cu130",
        "cuda": "13.0",
        "arch": "90",
        "flags": {},
    }
    key = build_flash.cache_key(plan)
    assert build_flash.cache_key({**plan, "flags": {"FLASH_ATTENTION_DISABLE_HDIM128": "TRUE"}}) != key
    assert build_flash.cached_wheel(tmp_path, key) is None
    wheel = plant(tmp_path, "flash_attn_3-3.0.0-cp310-abi3-linux_x86_64.whl", {"key": key})
    assert build_flash.cached_wheel(tmp_path, key) == wheel


def test_build_output_is_logged_with_progress_and_a_silent_build_is_stopped(tmp_path, capsys):
    log = tmp_path / "build.log"
    steps = "print('[1/2] nvcc a.cu'); print('[2/2] nvcc b.cu')"
    code, _, _ = build_flash._stream_build(
        [sys.executable, "-c", steps], tmp_path, dict(os.environ), log, None
    )
    assert code == 0 and "[2/2] nvcc b.cu" in log.read_text()
    assert "build_flash: [2/2]" in capsys.readouterr().out
    silent = "import time; print('[1/9] nvcc a.cu', flush=True); time.sleep(120)"
    code, seconds, tail = build_flash._stream_build(
        [sys.executable, "-c", silent], tmp_path, dict(os.environ), log, 2
    )
    assert code != 0 and seconds < 60 and tail[-1] == "stopped after 2 s (--timeout)"


PLANTED_SETUP = """
import os
from setuptools import setup

flags = {k: v for k, v in os.environ.items() if k.startswith(("FLASH_ATTENTION_", "MAX_JOBS", "TORCH_CUDA"))}
with open("flash_attn_interface.py", "w") as f:
    f.write(f"BUILT_WITH = {flags!r}\\n")
print("[1/2] nvcc planted_fwd.cu", flush=True)
print("[2/2] nvcc planted_bwd.cu", flush=True)
version = "3.0.0+" + os.environ["FLASH_ATTN_LOCAL_VERSION"]
setup(name="flash_attn_3", version=version, py_modules=["flash_attn_interface"])
"""


def test_build_flash_builds_records_and_then_finds_its_wheel_in_the_cache(tmp_path):
    """The real build path with a planted FA3 source (a pure setup.py) and a planted CUDA toolkit.

    The test interpreter's torch is a CPU build; a sitecustomize planted on PYTHONPATH gives it a CUDA
    version, and dist-info folders stand for ninja and wheel, so the session's checks pass as on a GPU
    image. Everything after them (unpack, flags, pip wheel, progress, log, sidecar, cache) is the real code.
    """
    source = tmp_path / "flash-attention"
    (source / "hopper").mkdir(parents=True)
    (source / "hopper" / "setup.py").write_text(PLANTED_SETUP)
    cuda = tmp_path / "cuda"
    (cuda / "bin").mkdir(parents=True)
    (cuda / "include").mkdir()
    (cuda / "include" / "cuda_runtime.h").write_text("")
    (cuda / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    (cuda / "bin" / "nvcc").chmod(0o755)
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "sitecustomize.py").write_text("import torch\ntorch.version.cuda = '13.0'\n")
    for dist in ("ninja-1.13.0", "wheel-0.48.0"):
        (planted / f"{dist}.dist-info").mkdir()
        name, version = dist.split("-")
        (planted / f"{dist}.dist-info" / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
    house = tmp_path / "house"
    env = {
        "PARITY_WHEELHOUSE": str(house),
        "CUDA_HOME": str(cuda),
        "PYTHONPATH": os.pathsep.join(p for p in (str(planted), os.environ.get("PYTHONPATH")) if p),
    }
    args = (
        "--no-venv",
        "-s",
        "build_flash",
        "--",
        "fa3",
        "--source",
        str(source),
        "--arch",
        "90",
        "--jobs",
        "3",
    )
    proc = _nox(tmp_path, *args, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "build_flash: [2/2]" in out
    (wheel,) = house.glob("flash_attn_3-3.0.0+cu130torch2.*sm90.k*-py3-none-any.whl")
    flags = json.loads(wheel.with_name(wheel.name + ".json").read_text())
    assert flags["flags"]["FLASH_ATTENTION_DISABLE_HDIM128"] == "TRUE" and flags["head_dims"] == [64]
    assert flags["nvcc"] == "13.0" and flags["archs"] == ["90"] and flags["jobs"] == 3
    assert "[2/2] nvcc planted_bwd.cu" in Path(flags["log"]).read_text()
    with zipfile.ZipFile(wheel) as zf:
        built_with = zf.read("flash_attn_interface.py").decode()
    assert "'FLASH_ATTENTION_DISABLE_HDIM128': 'TRUE'" in built_with and "'MAX_JOBS': '3'" in built_with
    assert "'TORCH_CUDA_ARCH_LIST': '9.0'" in built_with

    again = _nox(tmp_path, *args, env=env)
    assert (
        f"build_flash fa3: cached: {wheel} (key {flags['key']}); nothing to build"
        in again.stdout + again.stderr
    )
    here = sys.version_info[:2]
    assert (
        wheelhouse.resolve("flash-attn-3", gpu_facts(here, torch=flags["torch"]), [house]).wheel.path == wheel
    )
    assert wheelhouse.resolve("flash-attn-3", gpu_facts(here, torch="2.9.0+cu130"), [house]).wheel is None
