"""Mutations are planted with monkeypatch in this process: patch modes run here, not in a child."""

import pytest


@pytest.fixture(autouse=True)
def _in_process_patch_runs(monkeypatch):
    monkeypatch.setenv("PARITY_ISOLATE", "0")
