"""napari_mtml.regions: the suspicious regions of a map, their table and CSV, the threshold
from a healthy reference (the heatmap widget's and `mtml predict --regions`' science, no Qt)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from napari_mtml.regions import (
    healthy_scores,
    nearest_voxel,
    percentile_threshold,
    region_table,
    regions_above,
    write_regions_csv,
)


def test_regions_above_counts_components():
    heat = np.zeros((10, 12), np.float32)
    heat[1:3, 1:4] = 0.9  # 6 pixels, peak 0.9
    heat[6:9, 6:9] = 0.6  # 9 pixels
    heat[7, 7] = 0.95
    labels, regions = regions_above(heat, 0.5, (0.5, 2.0))
    assert [r.voxels for r in regions] == [9, 6]
    assert regions[0].label == 1 and (labels == 1).sum() == 9
    assert regions[0].size_mm == pytest.approx(9.0) and regions[0].peak == pytest.approx(0.95)
    assert regions[1].mean == pytest.approx(0.9)
    assert regions_above(heat, 0.99, (1.0, 1.0))[1] == []


def test_region_table_and_csv_in_world_mm(tmp_path):
    heat = np.zeros((6, 10, 10), np.float32)
    heat[2:4, 2:5, 3:6] = 0.8  # 18 voxels, centre (2.5, 3, 4)
    heat[5, 8, 8] = 0.7
    _, regions = regions_above(heat, 0.5, (3.0, 1.0, 0.5))
    assert [r.voxels for r in regions] == [18, 1]
    np.testing.assert_allclose(regions[0].centroid, (2.5, 3.0, 4.0))

    def to_world(index):
        return np.asarray(index) * (3.0, 1.0, 0.5) + (10.0, -5.0, 2.0)

    table = region_table(regions, 3, to_world)
    assert list(table) == [
        "index",
        "voxels",
        "size_mm",
        "peak",
        "mean",
        "centre_z",
        "centre_y",
        "centre_x",
    ]
    assert table["size_mm"][0] == pytest.approx(18 * 1.5)
    assert (table["centre_z"][0], table["centre_y"][0], table["centre_x"][0]) == pytest.approx(
        (17.5, -2.0, 4.0)
    )

    path = write_regions_csv(tmp_path / "r.csv", regions, 0.5, 3, to_world)
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["threshold", "0.5"]
    assert rows[1] == [
        "label",
        "voxels",
        "size_mm3",
        "peak",
        "mean",
        "centre_z_mm",
        "centre_y_mm",
        "centre_x_mm",
    ]
    assert rows[2][:3] == ["1", "18", "27"] and float(rows[2][5]) == pytest.approx(17.5)
    assert len(rows) == 4
    assert not list(tmp_path.glob(".*tmp"))  # written atomically: no temporary file left
    with pytest.raises(ValueError, match="folder"):
        write_regions_csv(tmp_path, regions, 0.5, 3)


def test_nearest_voxel_lies_inside_a_curved_region():
    yy, xx = np.mgrid[:21, :21]
    ring = np.abs(np.hypot(yy - 10, xx - 10) - 7) < 1.0  # its centre of mass is off the ring
    labels, regions = regions_above(ring.astype(np.float32), 0.5, (1.0, 1.0))
    (region,) = regions
    assert not ring[tuple(np.round(region.centroid).astype(int))]
    voxel = nearest_voxel(labels, region)
    assert ring[tuple(voxel)]


def test_percentile_threshold_of_healthy_scores():
    seen = []

    class Flat:  # an ensemble whose map is a ramp: the percentile is known
        def predict(self, scan, tta=False, contralateral="auto"):
            seen.append((tta, contralateral))
            return type(
                "P",
                (),
                {
                    "anomaly": np.linspace(0, 1, scan.array.size, dtype=np.float32).reshape(
                        scan.array.shape
                    )
                },
            )()

    from napari_mtml.io import Scan

    image = np.zeros((20, 20), np.float32)
    image[5:15, 5:15] = 100.0
    scores = healthy_scores(Flat(), Scan(array=image, spacing=(1.0, 1.0)))
    assert scores.size == 400  # a 2D image: its foreground is the whole frame
    assert percentile_threshold(scores, 90) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="percentile"):
        percentile_threshold(scores, 120)
    # the options of the maps the threshold is for reach the reference's prediction
    healthy_scores(Flat(), Scan(array=image, spacing=(1.0, 1.0)), tta=True, contralateral=False)
    assert seen == [(False, "auto"), (True, False)]
