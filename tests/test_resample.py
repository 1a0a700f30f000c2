"""The model's pixel size travels with it: recorded at training, and scenes of another pixel size resampled."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.warp
import torch
from conftest import args
from rasterio.transform import Affine
from test_scene import CRS, TRANSFORM, run_predict, scene_pixels, spread_state, write_geotiff

import augment
import export_onnx
import scene
import split_dataset
import train
import training
from config import Config
from data_preprocess import write_image
from training import tiles_pixel_size


@pytest.fixture(scope="module")
def state() -> dict:
    return spread_state()


FINE = Affine(1.0, 0.0, TRANSFORM.c, 0.0, -1.0, TRANSFORM.f)  # the same ground at 1 m pixels


def checkpoint_at(state: dict, folder: Path, pixel_size_m: float) -> Path:
    path = folder / f"net_{pixel_size_m}.pth"
    torch.save({**state, "config": {**state["config"], "pixel_size_m": pixel_size_m}, "epoch": 1}, path)
    return path


def predicted_mask(run_dir: Path, source: Path, checkpoint: Path, *extra: str) -> np.ndarray:
    assert run_predict(run_dir, checkpoint, source, "--polygons=false", "--overlay=false", *extra) == 0
    with rasterio.open(scene.scene_outputs(run_dir, source)["mask"]) as src:
        assert src.transform == rasterio.open(source).transform and src.overviews(1) is not None
        return src.read(1)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    valid = (a != 255) & (b != 255)
    return float((a[valid] == b[valid]).mean())


def test_a_finer_scene_is_predicted_at_the_models_pixel_size(
    state: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    coarse = write_geotiff(tmp_path / "in" / "coarse.tif", scene_pixels(), nodata=0)
    fine_pixels = scene_pixels().repeat(2, axis=1).repeat(2, axis=2)
    fine = write_geotiff(tmp_path / "in" / "fine.tif", fine_pixels, transform=FINE, nodata=0)
    model = checkpoint_at(state, tmp_path, 2.0)
    reference = predicted_mask(tmp_path / "coarse", coarse, model).repeat(2, axis=0).repeat(2, axis=1)
    with caplog.at_level(logging.INFO, logger="scene"):
        resampled = predicted_mask(tmp_path / "resampled", fine, model)
    assert "predicted at the model's size" in caplog.text
    as_is = predicted_mask(tmp_path / "as_is", fine, model, "--resample_scenes=false")
    assert "not resampled (--resample_scenes=false)" in caplog.text
    assert resampled.shape == fine_pixels.shape[1:]
    assert (resampled[:80, :120] == 255).all()  # the nodata corner, on the scene's own grid
    # Measured 0.84 against 0.62: the random network reacts to the noise the bilinear resampling smooths.
    assert agreement(resampled, reference) > 0.8
    assert agreement(resampled, reference) > agreement(as_is, reference) + 0.15


def test_a_resampled_scene_keeps_its_nodata_exactly_without_a_declared_value(state: dict, tmp_path: Path) -> None:
    # No nodata value in the file, only an all-zero corner: resampling blurs it into its neighbours' classes.
    fine_pixels = scene_pixels().repeat(2, axis=1).repeat(2, axis=2)
    fine = write_geotiff(tmp_path / "in" / "fine.tif", fine_pixels, transform=FINE)
    resampled = predicted_mask(tmp_path / "run", fine, checkpoint_at(state, tmp_path, 2.0))
    empty = ~fine_pixels.any(axis=0)
    assert np.array_equal(resampled == 255, empty)
    with open(tmp_path / "run" / "predictions" / "farmland_area.csv", encoding="utf-8-sig") as handle:
        (row,) = list(csv.DictReader(handle))
    assert int(row["valid_pixels"]) == int((~empty).sum())


def test_pixels_with_data_beside_nodata_specks_keep_a_prediction_when_resampled(state: dict, tmp_path: Path) -> None:
    # A finer scene with nodata specks and edges that cut across the model's coarser pixels: scene pixels with
    # data came back as nodata where their coarse pixel was mostly nodata (mask and probability 255, and left
    # out of the valid area).
    fine_pixels = scene_pixels().repeat(2, axis=1).repeat(2, axis=2).astype(np.uint16) * 257
    rng = np.random.default_rng(0)
    fine_pixels[:, rng.random(fine_pixels.shape[1:]) < 0.02] = 65535
    fine_pixels[:, 201:260:2, 301:340] = 65535  # every other row: stripes across coarse pixels
    fine = write_geotiff(tmp_path / "in" / "fine.tif", fine_pixels, transform=FINE, nodata=65535)
    resampled = predicted_mask(tmp_path / "run", fine, checkpoint_at(state, tmp_path, 2.0))
    empty = (fine_pixels == 65535).all(axis=0) | ~fine_pixels.any(axis=0)
    assert np.array_equal(resampled == 255, empty)
    with rasterio.open(scene.scene_outputs(tmp_path / "run", fine)["probability"]) as src:
        assert np.array_equal(src.read(1) == 255, empty)


def test_pixel_size_m_given_to_predict_stands_for_a_checkpoint_without_one(
    state: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A checkpoint trained on PNG tiles records no pixel size; --pixel_size_m on predict.py was ignored silently.
    fine = write_geotiff(
        tmp_path / "in" / "fine.tif", scene_pixels().repeat(2, axis=1).repeat(2, axis=2), transform=FINE
    )
    model = checkpoint_at(state, tmp_path, 0.0)
    with caplog.at_level(logging.INFO, logger="scene"):
        predicted_mask(tmp_path / "run", fine, model, "--pixel_size_m=2")
    assert "1 m pixels, the model's 2 m: predicted at the model's size" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scene"):
        predicted_mask(tmp_path / "run2", fine, checkpoint_at(state, tmp_path, 1.0), "--pixel_size_m=2")
    assert "--pixel_size_m=2 is left unused" in caplog.text and "predicted at the model's size" not in caplog.text


def test_a_scene_without_a_crs_is_said_to_be_taken_at_the_models_pixel_size(
    state: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A PNG or JPEG scene (DeepGlobe's 0.5 m JPEGs, say) fed to a model of 1 m tiles was predicted on its own
    # pixels without a word, where a GeoTIFF is resampled to the model's size.
    source = tmp_path / "in" / "scene.png"
    write_image(source, scene_pixels().transpose(1, 2, 0))
    with caplog.at_level(logging.INFO, logger="scene"):
        assert run_predict(tmp_path / "run", checkpoint_at(state, tmp_path, 1.0), source, "--polygons=false") == 0
    said = "scene.png: no CRS, so its pixel size is unknown: predicted on its own pixels, taken to be the model's 1 m"
    assert said in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scene"):  # a model without a pixel size: nothing to take
        assert run_predict(tmp_path / "run2", checkpoint_at(state, tmp_path, 0.0), source, "--polygons=false") == 0
    assert "its pixel size is unknown" not in caplog.text


def test_a_scene_of_the_models_pixel_size_is_not_resampled(state: dict, tmp_path: Path) -> None:
    source = write_geotiff(tmp_path / "in" / "scene.tif", scene_pixels(), nodata=0)
    unknown = predicted_mask(tmp_path / "a", source, checkpoint_at(state, tmp_path, 0.0))
    close = predicted_mask(tmp_path / "b", source, checkpoint_at(state, tmp_path, 2.02))  # within 2 %
    assert np.array_equal(unknown, close)


def test_training_tiles_tell_their_pixel_size(tmp_path: Path) -> None:
    tile = write_geotiff(tmp_path / "images" / "a.tif", scene_pixels()[:, :32, :32], transform=FINE)
    assert tiles_pixel_size([(tile, tile)]) == pytest.approx(1.0)
    png = tmp_path / "data" / "images" / "s_r0c0.png"
    png.parent.mkdir(parents=True)
    png.write_bytes(b"")
    with open(tmp_path / "data" / "tiles.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["tile", "crs", *"abcdef"])
        writer.writeheader()
        writer.writerow({"tile": "s_r0c0", "crs": CRS, **dict(zip("abcdef", [0.8, 0, 5e5, 0, -0.8, 4.5e6]))})
    assert tiles_pixel_size([(png, png)]) == pytest.approx(0.8)
    assert tiles_pixel_size([(tmp_path / "nowhere.png", png)]) is None


def test_training_tiles_of_several_pixel_sizes_take_the_most_common_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    coarse = Affine(3.2, 0, 5e5, 0, -3.2, 4.5e6)
    tiles = [
        write_geotiff(tmp_path / "images" / f"{name}.tif", scene_pixels()[:, :16, :16], transform=transform)
        for name, transform in [("a", coarse), ("b", FINE), ("c", FINE), ("d", Affine(1.0000001, 0, 5e5, 0, -1, 4.5e6))]
    ]
    with caplog.at_level(logging.WARNING, logger="train"):
        assert tiles_pixel_size([(t, t) for t in tiles]) == pytest.approx(1.0)  # three of 1 m, first of 3.2 m
    assert "several pixel sizes (3 at 1 m, 1 at 3.2 m" in caplog.text and "a.tif is 3.2 m" in caplog.text
    caplog.clear()
    near = write_geotiff(
        tmp_path / "images" / "e.tif", scene_pixels()[:, :16, :16], transform=Affine(1.013, 0, 5e5, 0, -1.013, 4.5e6)
    )
    with caplog.at_level(logging.WARNING, logger="train"):  # within 2 %: one size, as scenes count it
        assert tiles_pixel_size([(t, t) for t in [*tiles[1:], near]]) == pytest.approx(1.0)
    assert not caplog.text
    # Most tiles without a pixel size: the few that carry one set it, with a warning.
    png = tmp_path / "images" / "f.png"
    png.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="train"):
        assert tiles_pixel_size([(tiles[0], tiles[0]), *[(png, png)] * 3]) == pytest.approx(3.2)
    assert "only 1 of the training tiles carry a pixel size (3.2 m; 3 carry none)" in caplog.text
    # Many tiles: a spread sample is read, and the warning says so.
    monkeypatch.setattr(training, "SIZE_SAMPLE", 2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="train"):
        assert tiles_pixel_size([(t, t) for t in tiles]) == pytest.approx(3.2)  # a.tif and c.tif read
    assert "(of the tiles read, spread over the split) have several pixel sizes (1 at 3.2 m, 1 at 1 m" in caplog.text


def test_flipped_copies_of_tiles_in_tiles_csv_take_its_pixel_size_without_a_warning(
    square_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # PNG tiles placed by make_tiles.py's tiles.csv, and augment.py's copies of them (listed in train.txt, in no
    # table): the copies are the same tiles flipped, so they neither outvote the table nor call for --pixel_size_m.
    with open(square_data / "tiles.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["tile", "crs", *"abcdef"])
        writer.writeheader()
        for image in sorted((square_data / "images").iterdir()):
            row = {"tile": image.stem, "crs": CRS, **dict(zip("abcdef", [0.8, 0, 5e5, 0, -0.8, 4.5e6]))}
            writer.writerow(row)
    run_dir = tmp_path / "run"
    assert split_dataset.main(args(square_data, run_dir)) == 0
    assert augment.main(args(square_data, run_dir, "--aug_prob=1")) == 0
    with caplog.at_level(logging.WARNING):
        assert train.main(args(square_data, run_dir, "--epochs=1", "--tensorboard=false")) == 0
    assert "carry a pixel size" not in caplog.text
    assert torch.load(run_dir / "checkpoints" / "best.pth", weights_only=True)["config"]["pixel_size_m"] == 0.8
    # export_onnx.py reads the same tiles for a checkpoint that carries no pixel size.
    with caplog.at_level(logging.WARNING):
        assert export_onnx.resolution_cm(Config(run_dir=str(run_dir)), {"config": {}}) == pytest.approx(80.0)
    assert "carry a pixel size" not in caplog.text


def test_a_scene_in_degrees_of_another_ground_size_is_predicted_with_the_reprojection_to_make(
    state: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    degrees = Affine(3e-5, 0, 116.3, 0, -3e-5, 40.0)  # about 2.55 m east-west by 3.33 m north-south at 40 N
    source = write_geotiff(tmp_path / "in" / "geo.tif", scene_pixels(), crs="EPSG:4326", transform=degrees)
    with caplog.at_level(logging.WARNING):
        predicted_mask(tmp_path / "fine", source, checkpoint_at(state, tmp_path, 0.8))
    assert f"{source}: a geographic CRS, pixels of about 2.92 m on the ground" in caplog.text
    assert f"gdalwarp -t_srs EPSG:32650 -tr 0.8 0.8 -r bilinear {source}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        predicted_mask(tmp_path / "near", source, checkpoint_at(state, tmp_path, 2.9))  # within a quarter
    # No reprojection to the model's pixel size; the hectares warning still gives one in metres, without -tr.
    assert "expect poorer masks" not in caplog.text and " -tr " not in caplog.text
    assert f"gdalwarp -t_srs EPSG:32650 -r bilinear {source}" in caplog.text


def test_a_web_mercator_scene_is_resampled_by_its_size_on_the_ground(
    state: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A download in Web Mercator at 40 N, 1 m map pixels (0.766 m on the ground), predicted with a model of
    # 0.8 m Gauss-Kruger tiles: it was resampled by its map metres, 1.25 times, showing the network fields 30 %
    # larger than it was trained on; by the ground, 0.96 times.
    x, y = rasterio.warp.transform("EPSG:4326", "EPSG:3857", [116.0], [40.0])
    mercator = Affine(1.0, 0, x[0], 0, -1.0, y[0])
    source = write_geotiff(tmp_path / "in" / "web.tif", scene_pixels(), crs="EPSG:3857", transform=mercator)
    with caplog.at_level(logging.INFO, logger="scene"):
        predicted_mask(tmp_path / "run", source, checkpoint_at(state, tmp_path, 0.8))
    assert f"{source}: 0.766 m pixels, the model's 0.8 m: predicted at the model's size" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scene"):
        predicted_mask(tmp_path / "same", source, checkpoint_at(state, tmp_path, 0.77))  # within 2 %: as it is
    assert "predicted at the model's size" not in caplog.text
    # Tiles cut from such a download tell the same size on the ground, from their georeference or tiles.csv.
    tile = write_geotiff(
        tmp_path / "images" / "t.tif", scene_pixels()[:, :32, :32], crs="EPSG:3857", transform=mercator
    )
    assert tiles_pixel_size([(tile, tile)]) == pytest.approx(0.7656, rel=1e-3)
    png = tmp_path / "data" / "images" / "w_r0c0.png"
    png.parent.mkdir(parents=True)
    png.write_bytes(b"")
    with open(tmp_path / "data" / "tiles.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["tile", "crs", "width", "height", *"abcdef"])
        writer.writeheader()
        writer.writerow(
            {"tile": "w_r0c0", "crs": "EPSG:3857", "width": 32, "height": 32, **dict(zip("abcdef", mercator))}
        )
    assert tiles_pixel_size([(png, png)]) == pytest.approx(0.7656, rel=1e-3)


@pytest.mark.parametrize("side", ["", "64", "64.0", "n/a"])
def test_a_tiles_csv_row_in_ground_metres_keeps_its_size_whatever_its_width_cell_holds(side: str) -> None:
    # Width and height place a Mercator tile's centre alone: a spreadsheet's "64.0" lost a UTM row its pixel size.
    utm = dict(zip("abcdef", "0.5 0 5e5 0 -0.5 4.4e6".split()))
    row = {"tile": "t", "crs": "EPSG:32650", "width": side, "height": side, **utm}
    assert training.row_pixel_size(row) == pytest.approx(0.5)
    mercator = {**row, "crs": "EPSG:3857", "c": "12913060", "f": "4865942"}  # 116 E, 40 N
    assert training.row_pixel_size(mercator) == pytest.approx(0.3828, rel=1e-3)


def test_a_scene_in_a_local_engineering_crs_is_predicted_on_its_own_pixels(
    state: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A drone mosaic in a site's local metres (LOCAL_CS) is on no place of the globe: no ground size, no crash,
    # and no reprojection command into a zone made up from its metres read as degrees.
    local = 'LOCAL_CS["Site",LOCAL_DATUM["Site",0],UNIT["metre",1],AXIS["X",EAST],AXIS["Y",NORTH]]'
    source = write_geotiff(tmp_path / "in" / "site.tif", scene_pixels(), crs=local, transform=FINE)
    assert rasterio.open(source).crs is not None
    with caplog.at_level(logging.WARNING, logger="scene"):
        mask = predicted_mask(tmp_path / "run", source, checkpoint_at(state, tmp_path, 0.8))
    assert mask.shape == scene_pixels().shape[1:]
    assert "areas are left empty" in caplog.text and "gdalwarp" not in caplog.text


def test_mercator_tiles_of_several_latitudes_are_told_to_be_reprojected_into_ground_metres(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Web Mercator tiles of one zoom level, 30 and 45 N: 0.6 map metres, 0.52 and 0.42 m on the ground. gdalwarp -tr
    # in Web Mercator keeps them so; only a CRS in ground metres gives them one size.
    (tmp_path / "images").mkdir()
    with open(tmp_path / "tiles.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["tile", "crs", "width", "height", *"abcdef"])
        writer.writeheader()
        for name, lat in (("south", 30.0), ("north", 45.0)):
            x, y = rasterio.warp.transform("EPSG:4326", "EPSG:3857", [116.0], [lat])
            writer.writerow({"tile": name, "crs": "EPSG:3857", **dict(zip("abcdef", [0.6, 0, x[0], 0, -0.6, y[0]]))})
    pngs = [tmp_path / "images" / f"{name}.png" for name in ("south", "north")]
    with caplog.at_level(logging.WARNING, logger="train"):
        assert tiles_pixel_size([(p, p) for p in pngs]) == pytest.approx(0.519, rel=1e-2)
    assert "several pixel sizes" in caplog.text and "gdalwarp -t_srs EPSG:NNNN -tr" in caplog.text
