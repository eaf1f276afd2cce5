"""Shared pytest fixtures.

Tests on real images use the package's own sample data (`napari_mtml.samples.sample_data_path`),
so that a fresh clone runs every test without any folder beside the project.
"""

from __future__ import annotations

import os

import pytest

# One thread per process: the suite's models are tiny, several tests run two processes at once
# (DDP), and on a busy 2-core machine torch with 2 threads was ~10x slower on tiny convolutions.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def napari_errors():
    """A function returning the messages of the error notifications napari has shown so far."""

    def errors() -> list[str]:
        from napari.utils.notifications import notification_manager

        return [str(n.message) for n in notification_manager.records
                if getattr(n.severity, "value", n.severity) == "error"]

    return errors
