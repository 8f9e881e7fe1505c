"""The VLM sessions ask pytest for tests that exist (a renamed test would silently run nothing).

``sessions/vlm.py`` builds node ids by name without importing the torch-side test modules; this
collects the two test files and checks every id of every registry model is among the collected.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from parity.results import registry  # noqa: E402
from sessions import vlm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _collected(*files: Path) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *map(str, files)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line.strip() for line in out.splitlines() if "::" in line}


def test_session_node_ids_are_collected():
    collected = _collected(vlm.VLM_TRAINER_TEST, vlm.DUMMY_FORWARD_TEST)
    models = registry.ids("vlm_trainer")
    wanted = vlm.vlm_trainer_node_ids(models) + vlm.dummy_forward_node_ids(registry.ids("dummy_forward"))
    # a function-level id (no [param]) selects every parametrization of that test
    missing = [n for n in wanted if n not in collected and not any(c.startswith(n + "[") for c in collected)]
    assert not missing, f"session node ids that pytest does not collect: {missing[:5]}"
    # every negative control and planted-lookup test of the files is reachable from a session
    names = ("test_negative_control[", "test_planted_lookup_is_caught[")
    controls = {n for n in collected if any(name in n for name in names)}
    assert controls <= set(wanted), sorted(controls - set(wanted))[:5]
