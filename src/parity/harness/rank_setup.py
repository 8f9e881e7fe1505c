"""What every rank of a parity job calls first: ``init_rank()``, and ``shutdown()`` last.

A rank-asymmetric collective hangs forever unless something stops it, and a stopped hang is only
useful if it says *where* each rank was. This module is the per-rank half of that contract; the
launcher half lives in :mod:`parity.harness.launch`. Both communicate through environment variables that
the launcher sets:

``PARITY_PG_TIMEOUT_S``
    Process-group timeout. Collectives that wait longer raise (gloo) or abort the communicator
    (NCCL), so the collective layer fails before the launcher's watchdog and with a better message.
``PARITY_STACK_DIR``
    Directory for ``rank_<RANK>.txt`` (faulthandler output: fatal signals, on-demand SIGUSR1
    dumps, the self-destruct dump) and ``rank_<RANK>.pid``. The pid file tells the launcher that
    this rank's SIGUSR1 handler is installed: before that, SIGUSR1 would *kill* the rank instead of
    dumping its stack, so the launcher only signals ranks that have a pid file.
``PARITY_RANK_TIMEOUT_S`` (optional)
    Per-rank self-destruct: dump all stacks and ``_exit(1)`` after this many seconds. It is the
    backstop for the case where the launcher itself is gone (killed, ``os._exit`` by
    pytest-timeout) and nothing else would ever stop the rank.

faulthandler writes from inside its C signal handler, so a dump works even while the main thread
is blocked inside a gloo/NCCL wait and never returns to Python bytecode.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist

# Names shared with the launcher live there, because the launcher must not import torch.
from parity import settings
from parity.harness import faults
from parity.harness.launch import pid_file, stack_file

# faulthandler keeps only the file descriptor, so the file object must outlive init_rank().
_stack_file: IO[str] | None = None


def _install_stack_dumps(rank: int) -> None:
    """Route fatal-signal, SIGUSR1 and self-destruct stack dumps to one per-rank file.

    One file per rank (rather than the shared, interleaved stderr) is what lets the launcher
    attribute each stack to a rank after the fact.
    """
    global _stack_file
    stack_dir_env = settings.get(settings.STACK_DIR)
    if stack_dir_env:
        stack_dir = Path(stack_dir_env)
        stack_dir.mkdir(parents=True, exist_ok=True)
        # Line-buffered append: earlier dumps (e.g. from a restarted attempt) are kept.
        _stack_file = open(stack_file(stack_dir, rank), "a", buffering=1)
        out: IO[str] = _stack_file
    else:
        out = sys.stderr

    faulthandler.enable(file=out, all_threads=True)
    if hasattr(signal, "SIGUSR1"):
        # chain=False: the default SIGUSR1 action is to terminate, which would turn a diagnostic
        # request into a crash.
        faulthandler.register(signal.SIGUSR1, file=out, all_threads=True, chain=False)
    # When one rank fails, torchrun SIGTERMs the others: dump where each of them was (then die as
    # SIGTERM would), so a collective mismatch reports every rank's stack, not only the one that raised.
    faulthandler.register(signal.SIGTERM, file=out, all_threads=True, chain=True)

    rank_timeout = settings.get(settings.RANK_TIMEOUT_S)
    if rank_timeout:
        faulthandler.dump_traceback_later(float(rank_timeout), exit=True, file=out)

    if stack_dir_env:
        # Written last: its existence promises the launcher that SIGUSR1 is now safe to send.
        pid_file(Path(stack_dir_env), rank).write_text(f"{os.getpid()}\n")


def init_rank(*, backend: str | None = None) -> tuple[int, int]:
    """Install hang diagnostics, then join the default process group; return (rank, world_size).

    Diagnostics go first so that a rank stuck inside ``init_process_group`` (a missing peer, a
    wrong rendezvous address) can already be asked for its stack.

    ``backend`` defaults to ``nccl`` when CUDA is available (binding this process to the GPU of
    ``LOCAL_RANK`` so that NCCL does not put every rank on device 0), else ``gloo``.
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    _install_stack_dumps(rank)
    faults.install(settings.get(settings.FAULT))  # negative controls: patch the code under test

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)

    pg_timeout_s = settings.get(settings.PG_TIMEOUT_S)
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=pg_timeout_s),
    )
    return rank, world_size


def shutdown() -> None:
    """Destroy the process group and disarm the self-destruct timer.

    Destroying the group explicitly avoids the "process group was not destroyed" warning and the
    NCCL teardown races of letting interpreter exit do it; cancelling the timer keeps a slow but
    finished rank from being shot during interpreter teardown.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()
