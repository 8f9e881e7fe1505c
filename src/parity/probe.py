"""`python -m parity.probe` is a documented command; the code lives in :mod:`parity.harness.probe`."""

from parity.harness.probe import main

if __name__ == "__main__":
    raise SystemExit(main())
