"""Shared pytest fixtures.

`shared_data` points at the real images of ../shared/data (beside the project root); tests that
need them skip with a clear reason where that folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep the suite's numeric libraries to the 2 cores CI has, and torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test images not found at ../shared/data (looked in {SHARED_DATA.name})")
    return SHARED_DATA
