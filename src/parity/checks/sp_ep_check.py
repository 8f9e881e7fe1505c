"""Kept for the documented ``python -m parity.checks.sp_ep_check``.

The worker is :mod:`parity.harness.checks.sp_ep_check`.
"""

from parity.harness.checks.sp_ep_check import main

if __name__ == "__main__":
    raise SystemExit(main())
