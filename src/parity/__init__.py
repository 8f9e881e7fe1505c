"""parity: numerical parity checks for new model architectures.

This package root imports no torch: the merge step and the nox sessions import torch-free
modules from here (records, compare, merge) in interpreters that have no torch installed.
"""

__version__ = "0.1.0"
