"""`python -m parity.bench` is a documented command; the code lives in :mod:`parity.harness.bench`."""

from parity.harness.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
