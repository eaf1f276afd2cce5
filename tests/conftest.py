"""Shared pytest fixtures.

`shared_data` points at the real images of ../shared/data (beside the project root); tests that
need them skip with a clear reason where that folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One thread per process: the suite's models are tiny, several tests run two processes at once
# (DDP), and on a busy 2-core machine torch with 2 threads was ~10x slower on tiny convolutions.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test images not found at ../shared/data (looked in {SHARED_DATA.name})")
    return SHARED_DATA


@pytest.fixture
def napari_errors():
    """A function returning the messages of the error notifications napari has shown so far."""

    def errors() -> list[str]:
        from napari.utils.notifications import notification_manager

        return [str(n.message) for n in notification_manager.records
                if getattr(n.severity, "value", n.severity) == "error"]

    return errors
