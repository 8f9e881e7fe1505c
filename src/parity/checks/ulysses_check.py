"""Kept for the documented ``python -m parity.checks.ulysses_check``.

The worker is :mod:`parity.harness.checks.ulysses_check`.
"""

from parity.harness.checks.ulysses_check import main

if __name__ == "__main__":
    raise SystemExit(main())
