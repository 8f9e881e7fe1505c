"""Both distributed checks in one process group: Ulysses (sp) cases, then fused-MoE (ep) cases.

One launch instead of two halves the process start-up and import cost of the test suite. Case
names are prefixed ``ulysses/`` and ``moe_ep/``; the sp cases never touch the experts and the ep
cases never activate an sp group, so ``PARITY_FAULT=ulysses_swap,ep_drop`` still attributes each
failure to exactly one fault.

Run: ``torchrun --nproc-per-node 2 -m parity.harness.checks.sp_ep_check [--out DIR] [--cases a,b]``.
"""

from __future__ import annotations

from parity.harness.checks import _common, moe_ep_check, ulysses_check

TAG = "sp_ep_check"
CASES = {f"ulysses/{name}": fn for name, fn in ulysses_check.CASES.items()} | {
    f"moe_ep/{name}": fn for name, fn in moe_ep_check.CASES.items()
}


def main(argv: list[str] | None = None) -> int:
    return _common.main(TAG, CASES, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
