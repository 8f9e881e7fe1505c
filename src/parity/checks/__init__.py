"""``python -m parity.checks.<name>`` is documented; the workers live in :mod:`parity.harness.checks`."""
