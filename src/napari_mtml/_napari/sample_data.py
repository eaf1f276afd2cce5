"""napari sample data (File > Open Sample > Many Tasks Make Light Work), shipped in the package.

Origins and notices: `napari_mtml/sample_data/NOTICE.md`.
"""

from __future__ import annotations

from napari_mtml.samples import load_sample

from .reader import layer_data_from_scan

__all__ = ["brain_tumour", "chest_xray", "healthy_brain"]


def brain_tumour() -> list[tuple]:
    """Clinical T1 brain MRI with a tumour, and the tumour as a Labels layer."""
    image = load_sample("brain_tumour_image")
    label = load_sample("brain_tumour_label")
    return [
        layer_data_from_scan(image, "brain1 T1 (tumour)"),
        layer_data_from_scan(label, "tumour label", layer_type="labels", opacity=0.5),
    ]


def healthy_brain() -> list[tuple]:
    """The healthy MNI152 T1 template (skull-stripped) and its brain mask as a Labels layer."""
    image = load_sample("mni152_t1")
    mask = load_sample("mni152_brain_mask")
    return [
        layer_data_from_scan(image, "MNI152 T1"),
        layer_data_from_scan(mask, "brain mask", layer_type="labels", opacity=0.3, visible=False),
    ]


def chest_xray() -> list[tuple]:
    """A computed radiograph of the chest (MONOCHROME1, shown bright = dense)."""
    return [layer_data_from_scan(load_sample("chest_xray"), "chest X-ray (CR)")]
