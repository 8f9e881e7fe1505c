"""Healthy 2+ rank job: one all_reduce whose result every rank checks.

Also prints the environment the launcher promised, so the test can check it arrived intact.
"""

import os

import torch
import torch.distributed as dist

from parity.harness.rank_setup import init_rank, shutdown


def main() -> None:
    rank, world_size = init_rank()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    expected = world_size * (world_size + 1) / 2
    assert value.item() == expected, f"all_reduce gave {value.item()}, expected {expected}"
    for key in (
        "PARITY_PG_TIMEOUT_S",
        "PARITY_STACK_DIR",
        "NCCL_NVLS_ENABLE",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    ):
        print(f"env {key}={os.environ.get(key, '<unset>')}")
    print(f"rank {rank}/{world_size} all_reduce ok: {value.item()}")
    shutdown()


if __name__ == "__main__":
    main()
