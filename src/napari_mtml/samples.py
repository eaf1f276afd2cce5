"""The built-in sample images (offline, shipped in the package), without napari.

```python
from napari_mtml.samples import sample_data_path, load_sample, SAMPLES
image = load_sample("brain_tumour_image")      # a napari_mtml.io.Scan
path = sample_data_path("mni152_brain_mask")   # pathlib.Path of the file
```
Origins and notices: `napari_mtml/sample_data/NOTICE.md`.
"""

from __future__ import annotations

from pathlib import Path

from napari_mtml.io import Scan, read_image

__all__ = ["SAMPLES", "SAMPLE_DIR", "load_sample", "sample_data_path"]

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"

# name -> (file, what it is)
SAMPLES = {
    "brain_tumour_image": (
        "brain1_image.nii.gz",
        "clinical axial T1 brain MRI with a tumour (skull on), 25x256x256",
    ),
    "brain_tumour_label": ("brain1_label.nii.gz", "tumour mask of brain_tumour_image (0/1)"),
    "mni152_t1": (
        "mni152_t1_1mm.nii.gz",
        "healthy MNI152 T1 template, skull-stripped, 1 mm, 189x233x197",
    ),
    "mni152_brain_mask": ("mni152_brain_mask_1mm.nii.gz", "brain mask of mni152_t1 (0/1)"),
    "chest_xray": (
        "chest_xray_RG1_UNCR_half.dcm",
        "computed radiograph (CR) of the chest, MONOCHROME1, 977x920",
    ),
}


def sample_data_path(name: str) -> Path:
    """Path of a built-in sample file; `name` is a key of `SAMPLES`.

    Parameters
    ----------
    name : str
        A key of `SAMPLES`.

    Returns
    -------
    Path
        The sample's file inside the installed package.

    Raises
    ------
    ValueError
        An unknown name (listing the known ones) or a missing file (a broken installation).
    """
    if name not in SAMPLES:
        raise ValueError(f"unknown sample {name!r}; choose one of {sorted(SAMPLES)}.")
    path = SAMPLE_DIR / SAMPLES[name][0]
    if not path.is_file():
        raise ValueError(
            f"sample file {path} is missing; the installation is incomplete. Reinstall "
            "napari-mtml (the sample files ship inside the package)."
        )
    return path


def load_sample(name: str) -> Scan:
    """The sample `name` read with `napari_mtml.io.read_image` (see `SAMPLES`).

    Parameters
    ----------
    name : str
        One of the sample names (`SAMPLES`), e.g. "mni152_t1".

    Returns
    -------
    napari_mtml.io.Scan
    """
    return read_image(sample_data_path(name))
