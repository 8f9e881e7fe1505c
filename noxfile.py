"""parity: is a new model numerically right under every backend it will run on?

    nox -l                                  list sessions
    nox -s patch -- qwen3 qwen3_moe         patch suite in every backend variant, then merge
    nox -s "patch(eager)" -- qwen3          one variant
    nox -s e2e -- qwen3 qwen3_moe           FSDP2 + sp/ep training parity
    nox -s merge -- --results results/      merge any results folder
    nox -s new_model -- mixtral             scaffold a toy config + README + registry entry
    nox -s checklist -- mixtral [--run]     the onboarding checklist (and every suite that applies)
    nox --no-venv -s patch -- qwen3         GPU images: every variant in the current interpreter
    PARITY_SYSTEM_SITE=1 python3 -m nox -s patch
                                            GPU images: one env per variant on the image's packages
    nox -s build_flash -- fa3 --source TREE a FlashAttention wheel for this GPU, into the wheelhouse

The session bodies live in sessions/; this file only declares them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nox

sys.path.insert(0, str(Path(__file__).parent))

from sessions import build_flash as flash_build  # noqa: E402
from sessions import e2e as e2e_suite  # noqa: E402
from sessions import onboard, suites, vlm  # noqa: E402
from sessions.variants import VARIANTS  # noqa: E402

nox.needs_version = ">=2025.02.09"
nox.options.default_venv_backend = "virtualenv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["patch"]


@nox.session(reuse_venv=True)
@nox.parametrize("backend", list(VARIANTS), ids=list(VARIANTS))
def patch(session: nox.Session, backend: str) -> None:
    """Single-device fwd/bwd parity, tensor by tensor, of each model across attention/MoE backends.

    Usage: nox -s patch -- [MODEL ...] [--config PATH ...] [--results DIR] [--timeout S]
                          [--mode-timeout S] [--require fa2|fa3]
    No MODEL means every case of the registry (toy_config/registry.toml); --config runs any
    config.json as an extra case. Each variant (eager, fa2, fa3) runs in its own env; a variant that
    cannot run on this machine is skipped with the reason. Ends with the merge's verdict.
    """
    suites.run_patch(session, backend)


@nox.session(reuse_venv=True)
@nox.parametrize("backend", list(VARIANTS), ids=list(VARIANTS))
def e2e(session: nox.Session, backend: str) -> None:
    """FSDP2 + Ulysses sp + ep training parity: per-step loss/grad_norm of each layout vs sp1_ep1, then merge.

    Usage: nox -s e2e -- [MODEL ...] [--results DIR] [--timeout S] [--require fa2|fa3]
    No MODEL means every case in tests/e2e/test_e2e_parallel.py. --timeout is per model (default 900);
    each training run gets (S - 60) / 4. CPU: 2 gloo ranks, fp32; GPU: one rank per GPU, bf16.
    """
    e2e_suite.run_e2e(session, backend)


@nox.session(venv_backend="none")
def merge(session: nox.Session) -> None:
    """Compare every record in a results folder with its reference: verdict pass, breach or invalid.

    Usage: nox -s merge -- [--results DIR] [--suite S] [--models M ...] [--require VARIANT] [--allow-mixed]
    Prints one table and writes summary.json ("verdict", "exit_code") and summary.md into the results
    folder. nox itself exits 1 on any failure; python -m parity.merge exits 0 pass, 1 breach, 2 invalid.
    """
    suites.run_merge(session)


@nox.session(reuse_venv=True)
def vlm_trainer(session: nox.Session) -> None:
    """freeze_vit freezes exactly the vision (and audio) tower of each VLM/Omni toy model, then merge.

    Usage: nox -s vlm_trainer -- [MODEL ...] [--results DIR] [--timeout S]
    """
    vlm.run_vlm_trainer(session)


@nox.session(reuse_venv=True)
def dummy_forward(session: nox.Session) -> None:
    """Rank-asymmetric multimodal batches under 2-rank FSDP2 must finish, not hang; then merge.

    Usage: nox -s dummy_forward -- [MODEL ...] [--results DIR] [--timeout S]
    Rank 0 gets images/video (and audio for Omni), rank 1 text only. PARITY_DISABLE_DUMMY_FORWARD=1
    turns the dummy_forward hook off: the same run must then fail fast with every rank's stack.
    """
    vlm.run_dummy_forward(session)


@nox.session(reuse_venv=True, default=False)
def new_model(session: nox.Session) -> None:
    """Scaffold a model: toy config shrunk to the toy rules, README of every change, registry entry.

    Usage: nox -s new_model -- MODEL_TYPE [--from config.json] [--id ID] [--origin URL] [--force]
    Without --from, transformers' defaults for MODEL_TYPE are shrunk. Checks the toy loads, follows
    the toy rules, builds and runs forward+backward on CPU before writing toy_config/<ID>_toy/ and
    appending [ID] to toy_config/registry.toml. Exit 2: unknown type or existing folder (--force).
    """
    onboard.run_new_model(session)


@nox.session(reuse_venv=True, default=False)
def checklist(session: nox.Session) -> None:
    """The onboarding checklist for one model, one line per item with the fix; exit 1 if one fails.

    Usage: nox -s checklist -- ID [--run] [--results DIR]
    Toy config and README against the config, registry entry, MoE fields, unsupported modes,
    max_sp_size, and the suites' collection in this env (seconds). --run then queues every suite
    that applies to ID (patch, e2e; vlm_trainer, dummy_forward for VLM/Omni) and one merge.
    """
    onboard.run_checklist(session)


@nox.session(reuse_venv=True, default=False)
def bench(session: nox.Session) -> None:
    """GPU benchmark, bf16 fwd+bwd: fused MoE vs grouped_mm vs eager experts; parity FA2 vs masked sdpa.

    Usage: nox -s bench -- [--out FILE.json] [--only moe|attention] [--iters N]
    Prints median times, ratios, TFLOP/s and peak memory; writes JSON (default artifacts/bench.json,
    outside results/ so the merge never reads it).
    Skipped without a CUDA GPU.
    """
    suites.run_bench(session)


@nox.session(reuse_venv=True, default=False)
def build_flash(session: nox.Session) -> None:
    """Build a FlashAttention wheel for the GPU present into the wheelhouse (cached), for the fa2/fa3 envs.

    Usage: nox -s build_flash -- fa2|fa3 [--source PATH] [--config PATH ...] [--jobs N] [--arch 90]
                                 [--dry-run] [--force] [--full] [--timeout S]
    Sized to this GPU's arch, the registry's head dims (plus those of each --config you run with
    `nox -s patch -- --config`) and the suites' dtype (FA3: its FLASH_ATTENTION_DISABLE_* switches;
    FA2: FLASH_ATTN_CUDA_ARCHS and only the kernel files in use, --full for all). A narrowed FA2
    carries flash_attn/build_config.py; a model needing a head dim it lacks is then `unsupported`
    with that reason instead of a crash. FA2 builds the PyPI sdist unless --source names a tarball or
    tree; FA3 needs --source (a flash-attention tree or tarball with hopper/). The wheel, its flags
    (<wheel>.json) and the build log go into the wheelhouse (PARITY_WHEELHOUSE, default
    .nox/wheelhouse); the same request again finds it there. Skipped without a GPU (or --arch) or nvcc.
    """
    flash_build.run_build_flash(session)


@nox.session(reuse_venv=True, default=False)
def mutations(session: nox.Session) -> None:
    """The planted-bug matrix: 15 realistic bugs, each must be caught; prints check and margin.

    Usage: nox -s mutations [-- PYTEST ARGS]   (e.g. -- -k moe)
    Each bug is patched into parity's backend or trainer from the test side (tests/mutations/bugs.py);
    the clean models must pass. CPU: fp32 (e2e bugs on 2 gloo ranks); GPU: bf16, the calibrated rule.
    The table also lands in artifacts/mutations-<device>-<dtype>.json.
    """
    suites.run_mutations(session)


@nox.session(reuse_venv=True)
def tests(session: nox.Session) -> None:
    """The toolkit's own test suite on CPU (what CI runs). Extra args go to pytest."""
    suites.run_tests(session)


@nox.session(reuse_venv=True)
def lint(session: nox.Session) -> None:
    """ruff over the whole project."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
