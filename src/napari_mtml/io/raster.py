"""2D PNG / TIFF / JPEG / BMP images (e.g. X-rays exported from a viewer) as greyscale float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .scan import (
    ImageReadError,
    Scan,
    array_affine_from,
    check_values,
    require_regular_file,
    warn,
)

RASTER_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def read_raster(path: Path) -> Scan:
    """Read a 2D image file as a `(y, x)` float32 Scan with 1 mm spacing (pixel size unknown).

    Greyscale modes are read as they are (8/16-bit integer, 32-bit float). An RGB(A) or palette
    image whose three channels are equal is taken as greyscale; a real colour image is refused.
    A multi-page TIFF gives its first page and a warning.
    """
    from PIL import Image, UnidentifiedImageError

    require_regular_file(path)

    metadata: dict = {
        "path": str(path),
        "format": "raster",
        "modality": "",
        "orientation": None,
        "window": None,
        "warnings": [],
    }
    try:
        with Image.open(path) as img:
            n_frames = int(getattr(img, "n_frames", 1) or 1)
            img.seek(0)
            mode = img.mode
            if mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                mode = img.mode
            data = np.array(img)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found.") from None
    except UnidentifiedImageError:
        raise ImageReadError(
            f"{path}: not a readable image file (Pillow does not recognise its contents)."
        ) from None
    except Exception as exc:
        raise ImageReadError(
            f"{path}: could not decode the image ({type(exc).__name__}: {exc}); the file is "
            "truncated or corrupt."
        ) from None
    if n_frames > 1:
        warn(metadata, f"{path}: {n_frames} pages; using the first page only.")
    if data.ndim == 3:
        channels = data[..., :3] if data.shape[-1] >= 3 else data[..., :1]
        if data.shape[-1] in (2, 4):
            # A fully opaque alpha channel carries nothing; a varying one is dropped with a note.
            alpha = data[..., -1]
            if alpha.min() != alpha.max():
                warn(metadata, f"{path}: the alpha (transparency) channel was ignored.")
        if channels.shape[-1] == 3 and not (
            np.array_equal(channels[..., 0], channels[..., 1])
            and np.array_equal(channels[..., 0], channels[..., 2])
        ):
            raise ImageReadError(
                f"{path}: colour ({mode}) image; this plugin needs a greyscale image. Convert it "
                "to greyscale first (e.g. save it in mode 'L' or 'I;16')."
            )
        data = channels[..., 0]
    if data.ndim != 2:
        raise ImageReadError(f"{path}: image of shape {data.shape} is not a 2D greyscale image.")
    if data.dtype == bool:
        data = data.astype(np.uint8)
    array = data.astype(np.float32)
    check_values(array, path, metadata)
    affine = np.eye(4)
    metadata["file_shape"] = (array.shape[1], array.shape[0], 1)
    metadata["array_affine"] = array_affine_from(affine, None, None, 2)
    return Scan(array=array, spacing=(1.0, 1.0), affine=affine, metadata=metadata)
