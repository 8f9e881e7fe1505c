"""Kept for the documented ``python -m parity.checks.dummy_forward_check``.

The worker is :mod:`parity.harness.checks.dummy_forward_check`.
"""

from parity.harness.checks.dummy_forward_check import main

if __name__ == "__main__":
    raise SystemExit(main())
