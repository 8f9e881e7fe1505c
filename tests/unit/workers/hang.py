"""Rank-asymmetric collective: rank 0 enters all_reduce, rank 1 never does and sleeps forever.

The function names are what the launcher test looks for in each rank's dumped stack.
"""

import time

import torch
import torch.distributed as dist

from parity.harness.rank_setup import init_rank, shutdown


def block_in_all_reduce() -> None:
    dist.all_reduce(torch.ones(1))


def sleep_forever() -> None:
    while True:
        time.sleep(3600)


def main() -> None:
    rank, _ = init_rank()
    print(f"rank {rank} reached its hang point", flush=True)
    if rank == 0:
        block_in_all_reduce()
    else:
        sleep_forever()
    shutdown()


if __name__ == "__main__":
    main()
