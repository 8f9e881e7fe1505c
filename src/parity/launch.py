"""`python -m parity.launch` is a documented command; the code lives in :mod:`parity.harness.launch`."""

from parity.harness.launch import main

if __name__ == "__main__":
    raise SystemExit(main())
