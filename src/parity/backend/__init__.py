"""The training-stack layer under test: parity's attention backends (with the Ulysses exchange),
the fused MoE experts, and the process groups they use.

This package never knows it is being tested: negative controls patch it from outside
(:mod:`parity.harness.faults`, the tests), never through switches in here.
"""
