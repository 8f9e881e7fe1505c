"""`python -m parity.merge` is a documented command; the code lives in :mod:`parity.results.merge`."""

from parity.results.merge import main

if __name__ == "__main__":
    raise SystemExit(main())
