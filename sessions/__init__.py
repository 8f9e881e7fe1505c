"""Bodies of the nox sessions (torch-free: they run in nox's own interpreter).

parity's torch-free layers (settings, the case registry, records, the merge) are imported from
``src/`` here, so the sessions and the suites read one registry and one settings table.
"""

import sys
from pathlib import Path

_SRC = str(Path(__file__).resolve().parents[1] / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)
