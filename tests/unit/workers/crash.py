"""Rank 1 raises after the group is up; rank 0 waits in a barrier that rank 1 never joins."""

import torch.distributed as dist

from parity.harness.rank_setup import init_rank, shutdown


def main() -> None:
    rank, _ = init_rank()
    if rank == 1:
        raise RuntimeError("parity-test: deliberate crash on rank 1")
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
