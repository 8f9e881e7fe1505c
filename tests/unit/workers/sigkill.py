"""Rank 1 dies by SIGKILL (no Python traceback, negative exit status); rank 0 waits in a barrier."""

import os
import signal

import torch.distributed as dist

from parity.harness.rank_setup import init_rank, shutdown


def main() -> None:
    rank, _ = init_rank()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
