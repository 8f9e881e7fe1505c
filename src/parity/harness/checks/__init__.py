"""Multi-process parity checks of parity's own kernels (``python -m parity.harness.checks.<name>``).

Each module is a worker run on every rank (under :func:`parity.harness.launch.launch` or plain torchrun):
it computes a reference without parallelism and the same thing with sp/ep active, prints the
observed max deviations, writes them as JSON when ``--out`` is given, and exits non-zero when a
comparison fails. ``PARITY_FAULT`` injects a known bug so a test can show the check can fail.
"""
