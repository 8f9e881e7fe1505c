"""`python -m parity.train` is a documented command; the code lives in :mod:`parity.training.train`."""

from parity.training.train import main

if __name__ == "__main__":
    raise SystemExit(main())
