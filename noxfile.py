"""parity: is a new model numerically right under every backend it will run on?

    nox -l                                  list sessions
    nox -s patch -- qwen3 qwen3_moe         patch suite in every backend variant, then merge
    nox -s "patch(eager)" -- qwen3          one variant
    nox -s e2e -- qwen3 qwen3_moe           FSDP2 + sp/ep training parity
    nox -s merge -- --results results/      merge any results folder
    nox --no-venv -s patch -- qwen3         GPU images: use the current interpreter, install nothing

The session bodies live in sessions/; this file only declares them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nox

sys.path.insert(0, str(Path(__file__).parent))

from sessions import e2e as e2e_suite  # noqa: E402
from sessions import suites, vlm  # noqa: E402
from sessions.variants import VARIANTS  # noqa: E402

nox.needs_version = ">=2025.02.09"
nox.options.default_venv_backend = "virtualenv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["patch"]


@nox.session(reuse_venv=True)
@nox.parametrize("backend", list(VARIANTS), ids=list(VARIANTS))
def patch(session: nox.Session, backend: str) -> None:
    """Single-device fwd/bwd parity of each model across attention and MoE backends, then merge.

    Usage: nox -s patch -- [MODEL ...] [--results DIR] [--timeout S] [--require fa2|fa3]
    No MODEL means every case in tests/models/test_models_patch.py. Each variant (eager, fa2, fa3)
    runs in its own env; a variant that cannot run on this machine is skipped with the reason.
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
def bench(session: nox.Session) -> None:
    """GPU benchmark, bf16 fwd+bwd: fused MoE vs grouped_mm vs eager experts; parity FA2 vs masked sdpa.

    Usage: nox -s bench -- [--out FILE.json] [--only moe|attention] [--iters N]
    Prints median times, ratios, TFLOP/s and peak memory; writes JSON (default artifacts/bench.json,
    outside results/ so the merge never reads it).
    Skipped without a CUDA GPU.
    """
    suites.run_bench(session)


@nox.session(reuse_venv=True)
def tests(session: nox.Session) -> None:
    """The toolkit's own test suite on CPU (what CI runs). Extra args go to pytest."""
    suites.run_tests(session)


@nox.session(reuse_venv=True)
def lint(session: nox.Session) -> None:
    """ruff over the whole project."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
