"""labels.py's label rasters on a scene's grid, worked by hand: which value is farmland, which pixels are
labelled, and which boxes meet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_geotiff
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.windows import Window

import labels
from files import DataError

UTM = "EPSG:32615"
TRANSFORM = Affine(2.0, 0.0, 500000.0, 0.0, -2.0, 4500000.0)
GRID = labels.Grid(CRS.from_string(UTM), TRANSFORM, 4, 4, "scene.tif")


def read_raster(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with labels.open_labels(path) as source:
        grid_labels = source.on_grid(GRID)
        try:
            return grid_labels.read(Window(0, 0, 4, 4))
        finally:
            grid_labels.close()


def test_a_raster_of_0_and_255_has_255_as_farmland_and_nothing_unlabelled(tmp_path: Path) -> None:
    values = np.array([[0, 255, 255, 0]] * 4, np.uint8)
    farmland, labelled = read_raster(write_geotiff(tmp_path / "l.tif", values[None], UTM, TRANSFORM))
    assert np.array_equal(farmland, values == 255) and labelled.all()


def test_a_raster_of_0_1_and_255_has_1_as_farmland_and_255_unlabelled(tmp_path: Path) -> None:
    values = np.array([[0, 1, 255, 0]] * 4, np.uint8)
    farmland, labelled = read_raster(write_geotiff(tmp_path / "l.tif", values[None], UTM, TRANSFORM))
    assert np.array_equal(farmland, values == 1) and np.array_equal(labelled, values != 255)


def test_outside_a_label_raster_is_unlabelled_not_background(tmp_path: Path) -> None:
    # The raster covers the scene's left half (columns 0 and 1) only.
    values = np.array([[0, 1]] * 4, np.uint8)
    farmland, labelled = read_raster(write_geotiff(tmp_path / "l.tif", values[None], UTM, TRANSFORM))
    assert labelled[:, :2].all() and not labelled[:, 2:].any()
    assert np.array_equal(farmland[:, :2], values == 1) and not farmland[:, 2:].any()


def test_boxes_that_only_touch_do_not_meet() -> None:
    assert labels.boxes_meet((0, 0, 2, 2), (1, 1, 3, 3))
    assert not labels.boxes_meet((0, 0, 1, 1), (1, 0, 2, 1)) and not labels.boxes_meet((0, 0, 1, 1), (0, 1, 1, 2))


def test_a_declared_nodata_value_is_unlabelled_not_refused(tmp_path: Path) -> None:
    values = np.array([[0, 1, 128, 0]] * 4, np.uint8)
    path = write_geotiff(tmp_path / "l.tif", values[None], UTM, TRANSFORM, nodata=128)
    farmland, labelled = read_raster(path)
    assert np.array_equal(farmland, values == 1) and np.array_equal(labelled, values != 128)


def test_a_label_raster_more_than_four_times_coarser_than_the_scene_is_refused(tmp_path: Path) -> None:
    # The scene's pixels are 2 m: 8 m label pixels (4 times) are taken, 10 m ones (5 times) refused.
    one = np.ones((1, 1, 1), np.uint8)
    ok = write_geotiff(tmp_path / "ok.tif", one, UTM, Affine(8.0, 0.0, TRANSFORM.c, 0.0, -8.0, TRANSFORM.f))
    assert read_raster(ok)[0].all()
    coarse = write_geotiff(tmp_path / "coarse.tif", one, UTM, Affine(10.0, 0.0, TRANSFORM.c, 0.0, -10.0, TRANSFORM.f))
    with pytest.raises(DataError, match=r"coarse.tif: label pixels are about 10 metre wide, 5.0 times the pixels"):
        read_raster(coarse)
