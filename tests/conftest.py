"""Shared pytest fixtures.

Tests on real images use the package's own sample data (`napari_mtml.samples.sample_data_path`),
so that a fresh clone runs every test without any folder beside the project.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

# One thread per process: the suite's models are tiny, several tests run two processes at once
# (DDP), and on a busy 2-core machine torch with 2 threads was ~10x slower on tiny convolutions.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (restored after): tiny convolutions are many times
    slower with 2 threads on a loaded 2-core machine. Modules of training tests use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def napari_errors():
    """A function returning the messages of the error notifications napari has shown so far."""

    def errors() -> list[str]:
        from napari.utils.notifications import notification_manager

        return [
            str(n.message)
            for n in notification_manager.records
            if getattr(n.severity, "value", n.severity) == "error"
        ]

    return errors


@pytest.fixture
def nifti_with_pixdim():
    """`save(path, array_yx, pixdim)`: a NIfTI with no qform/sform whose pixdim[1:4] holds
    exactly `pixdim` in the file (NaN, zero or negative: nibabel would fix those on saving)."""
    import nibabel as nib

    def save(path, array_yx, pixdim):
        data = np.asarray(array_yx, dtype=np.float32).T.copy()
        hdr = nib.Nifti1Image(data, None).header.copy()
        hdr.set_data_dtype(np.float32)
        hdr.set_qform(None, code=0)
        hdr.set_sform(None, code=0)
        hdr["pixdim"][1:4] = pixdim
        hdr["vox_offset"] = 352
        with nib.openers.ImageOpener(str(path), "wb") as fh:
            hdr.write_to(fh)
            fh.write(b"\0" * (352 - hdr.sizeof_hdr))
            fh.write(data.tobytes(order="F"))
        return path

    return save
