"""Whole scenes: georeferencing kept, nodata kept, seamless blending, TTA, polygons, areas, bands, 16-bit, PNG."""

from __future__ import annotations

import csv
import errno
import functools
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.warp
import shapely
import torch
from conftest import folder_digest, spread_probabilities_, write_rpc_tiff
from conftest import write_geotiff as geotiff
from rasterio.control import GroundControlPoint
from rasterio.transform import Affine

import demo_data
import files
import inference
import polygons
import predict
import rasters
import scene
from data_preprocess import load_mask, write_image
from files import DataError, shell_quoted
from net_structure import build_model

CPU = torch.device("cpu")
CRS = "EPSG:32615"  # UTM zone 15N: metres
TRANSFORM = Affine(2.0, 0.0, 500000.0, 0.0, -2.0, 4500000.0)  # 2 m pixels, so one pixel is 4 m2
HEIGHT, WIDTH = 300, 370  # not multiples of any window used here
NODATA_ROWS, NODATA_COLS = slice(0, 40), slice(0, 60)  # an all-zero corner: nodata


def scene_pixels(seed: int = 0) -> np.ndarray:
    """(3, HEIGHT, WIDTH) uint8: dark noise with bright rectangles, and an all-zero (nodata) corner."""
    rng = np.random.default_rng(seed)
    image = (rng.random((3, HEIGHT, WIDTH)) * 60 + 1).astype(np.uint8)
    for _ in range(8):
        y, x = rng.integers(0, HEIGHT - 60), rng.integers(0, WIDTH - 60)
        image[:, y : y + rng.integers(20, 80), x : x + rng.integers(20, 80)] += 150
    image[:, NODATA_ROWS, NODATA_COLS] = 0
    return image


write_geotiff = functools.partial(geotiff, crs=CRS, transform=TRANSFORM)  # this module's scene


@pytest.fixture(scope="module")
def state() -> dict:
    return spread_state()


def spread_state() -> dict:
    """A width-8 random network whose output layer is rescaled so its probabilities spread over (0, 1)
    and split the test scene into farmland and background, instead of all sitting near 0.5."""
    torch.manual_seed(0)
    model = build_model(3, 2, 8, 0.3).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(scene_pixels(1)[None].astype(np.float32) / 255))
        spread_probabilities_(model, logits)
    return {"model": model.state_dict(), "config": {"in_channels": 3, "n_classes": 2, "base_width": 8, "dropout": 0.3}}


@pytest.fixture(scope="module")
def checkpoint(state: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("checkpoint") / "net.pth"
    torch.save({**state, "epoch": 1}, path)
    return path


def run_predict(run_dir: Path, checkpoint: Path, source: Path, *extra: str) -> int:
    return predict.main(
        [
            f"--run_dir={run_dir}",
            f"--checkpoint={checkpoint}",
            f"--predict_input={source}",
            "--amp=off",
            "--num_workers=0",
            "--window=128",
            "--overlap=32",
            "--min_field_area_ha=0",
            *extra,
        ]
    )


def read_table(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "predictions" / "farmland_area.csv", encoding="utf-8-sig") as handle:
        return list(csv.DictReader(handle))


def test_geotiff_outputs_keep_georeferencing_nodata_areas_and_polygons(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = write_geotiff(tmp_path / "in" / "scene.tif", scene_pixels(), nodata=0)
    before = folder_digest(tmp_path / "in")
    run_dir = tmp_path / "run"
    assert run_predict(run_dir, checkpoint, source) == 0
    assert f"scene.tif: {WIDTH} x {HEIGHT} pixels, farmland " in caplog.text  # the size's unit is stated
    assert folder_digest(tmp_path / "in") == before  # the input is only read

    out = scene.scene_outputs(run_dir, source)
    with rasterio.open(out["mask"]) as src:
        mask = src.read(1)
        assert (src.crs.to_string(), src.transform, src.shape) == (CRS, TRANSFORM, (HEIGHT, WIDTH))
        assert src.nodata == 255 and src.profile["tiled"] and src.compression.name.lower() == "deflate"
        assert src.colormap(1)[1] == scene.MASK_COLOURS[1]
    with rasterio.open(out["probability"]) as src:
        percent = src.read(1)
        assert (src.crs.to_string(), src.transform, src.shape) == (CRS, TRANSFORM, (HEIGHT, WIDTH))
    nodata = np.zeros((HEIGHT, WIDTH), bool)
    nodata[NODATA_ROWS, NODATA_COLS] = True
    assert (mask[nodata] == 255).all() and (percent[nodata] == 255).all()  # nodata is never farmland
    assert set(np.unique(mask[~nodata])) == {0, 1} and percent[~nodata].max() <= 100
    # The mask is the probability thresholded at 0.5 (argmax of two classes), up to the percent rounding.
    valid_percent, valid_mask = percent[~nodata], mask[~nodata]
    assert ((valid_percent > 50) <= (valid_mask == 1)).all() and ((valid_percent < 50) <= (valid_mask == 0)).all()

    # The area table, checked by hand: 2 m x 2 m pixels, hectares = pixels * 4 / 10,000.
    (row,) = read_table(run_dir)
    valid, farmland = HEIGHT * WIDTH - 40 * 60, int((mask == 1).sum())
    assert row["crs"] == CRS and float(row["pixel_area_m2"]) == 4.0
    assert (int(row["width"]), int(row["height"])) == (WIDTH, HEIGHT)
    assert (int(row["valid_pixels"]), int(row["farmland_pixels"])) == (valid, farmland)
    assert float(row["valid_area_ha"]) == pytest.approx(valid * 4 / 1e4)
    assert float(row["farmland_area_ha"]) == pytest.approx(farmland * 4 / 1e4)
    assert float(row["farmland_fraction"]) == pytest.approx(farmland / valid, abs=1e-6)
    assert (row["model"], row["epoch"], row["threshold"]) == (str(checkpoint), "1", "")  # argmax: no cut
    assert run_predict(tmp_path / "cut", checkpoint, source, "--threshold=0.3", "--polygons=false") == 0
    (cut,) = read_table(tmp_path / "cut")
    assert cut["threshold"] == "0.3" and int(cut["farmland_pixels"]) >= farmland  # a lower cut: more farmland

    # The polygons cover exactly the farmland pixels: total area, CRS and count agree with the mask.
    for kind in ("geojson", "gpkg"):
        meta, _, geometry, (ids, area_ha, pixels) = pyogrio.raw.read(out[kind])
        shapes = shapely.from_wkb(geometry)
        assert rasterio.crs.CRS.from_user_input(meta["crs"]).to_epsg() == 32615
        assert sum(s.area for s in shapes) == pytest.approx(farmland * 4.0)  # m2, exact to rasterisation
        assert area_ha.sum() == pytest.approx(farmland * 4 / 1e4) and pixels.sum() == farmland
        components = cv2.connectedComponents((mask == 1).astype(np.uint8), connectivity=4)[0] - 1
        assert len(ids) == int(row["fields"]) == components
    assert (run_dir / "predictions" / "overlays" / "scene_overlay.png").is_file()
    assert not list((run_dir / "predictions").glob(".*"))  # no temporary files left

    # Run again: the finished scene is skipped, its files untouched, and it is still in the table.
    written = {p: p.stat().st_mtime_ns for p in (run_dir / "predictions").rglob("*") if p.is_file()}
    assert run_predict(run_dir, checkpoint, source) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in written.items() if p.name != "farmland_area.csv")
    assert read_table(run_dir) == [row]
    # Another scene by another command: the table holds every scene of the run, not this command's alone.
    other = tmp_path / "in" / "other.tif"
    other.write_bytes(source.read_bytes())
    assert run_predict(run_dir, checkpoint, other) == 0
    assert [r["image"] for r in read_table(run_dir)] == [str(other), str(source)] and read_table(run_dir)[1] == row


def test_nodata_reaches_the_network_as_its_nearest_pixel_with_data() -> None:
    block = np.arange(1, 51, dtype=np.uint16).reshape(5, 5, 2)
    empty = np.zeros((5, 5), bool)
    empty[0], empty[:, 4], empty[2, 2] = True, True, True  # a collar along two sides and a hole
    filled = scene.filled_nodata(np.where(empty[..., None], 0, block).astype(np.uint16), empty)
    assert filled[:, :, 0].tolist() == [
        [11, 13, 15, 17, 17],
        [11, 13, 15, 17, 17],
        [21, 23, 15, 27, 27],
        [31, 33, 35, 37, 37],
        [41, 43, 45, 47, 47],
    ]
    assert np.array_equal(filled[~empty], block[~empty]) and (filled[:, :, 1] == filled[:, :, 0] + 1).all()
    assert scene.filled_nodata(block, np.ones((5, 5), bool)) is block  # all nodata: nothing to copy


def test_a_scene_of_the_same_name_from_another_folder_is_predicted_not_skipped(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = write_geotiff(tmp_path / "2019" / "a.tif", scene_pixels(1))
    second = write_geotiff(tmp_path / "2024" / "a.tif", scene_pixels(2))
    fresh_bytes = second.read_bytes()
    assert len(fresh_bytes) == first.stat().st_size  # uncompressed: an edit in place keeps the size
    run_dir = tmp_path / "run"
    assert run_predict(run_dir, checkpoint, first, "--polygons=false") == 0
    assert run_predict(run_dir, checkpoint, second, "--polygons=false") == 0
    assert run_predict(tmp_path / "fresh", checkpoint, second, "--polygons=false") == 0
    (row,) = read_table(run_dir)
    (fresh,) = read_table(tmp_path / "fresh")
    assert row["image"] == str(second) and row["farmland_pixels"] == fresh["farmland_pixels"]
    mask = run_dir / "predictions" / "a_seg.tif"
    made = mask.stat().st_mtime_ns
    assert run_predict(run_dir, checkpoint, second, "--polygons=false") == 0
    assert mask.stat().st_mtime_ns == made  # the same file again: skipped
    monkeypatch.chdir(tmp_path / "2024")  # recorded as a.tif, then named from elsewhere: still the same file
    assert run_predict(run_dir, checkpoint, Path("a.tif"), "--polygons=false", "--skip_existing=false") == 0
    made = mask.stat().st_mtime_ns
    monkeypatch.chdir(tmp_path)
    assert run_predict(run_dir, checkpoint, second, "--polygons=false") == 0
    assert mask.stat().st_mtime_ns == made
    # Another scene copied over it with its own, older time (cp -p): predicted again, as a fresh run does.
    shutil.copy2(first, second)
    assert run_predict(run_dir, checkpoint, second, "--polygons=false") == 0
    assert mask.stat().st_mtime_ns != made
    assert read_table(run_dir)[0]["farmland_pixels"] != fresh["farmland_pixels"]
    # Edited in place to the same size, its old time set back (touch -r): its size and time tell nothing.
    made, was = mask.stat().st_mtime_ns, second.stat()
    with open(second, "r+b") as handle:
        handle.write(fresh_bytes)
    os.utime(second, ns=(was.st_atime_ns, was.st_mtime_ns))
    assert run_predict(run_dir, checkpoint, second, "--polygons=false") == 0
    assert mask.stat().st_mtime_ns != made
    assert read_table(run_dir)[0]["farmland_pixels"] == fresh["farmland_pixels"]


def test_images_sharing_a_name_are_reported_and_the_others_predicted(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A delivery folder: the scene, its browse JPEG of the same name, and another scene. The browse image is left
    # out (both were skipped, so the scene was never predicted); two scenes of one name are both refused.
    scene_file = write_geotiff(tmp_path / "in" / "gf2_mss1.tiff", scene_pixels(1))
    browse = tmp_path / "in" / "gf2_mss1.jpg"
    write_image(browse, scene_pixels(1)[:, ::4, ::4].transpose(1, 2, 0))
    other = write_geotiff(tmp_path / "in" / "other.tif", scene_pixels(2))
    twin = write_geotiff(tmp_path / "in" / "other.tiff", scene_pixels(3))
    assert run_predict(tmp_path / "run", checkpoint, tmp_path / "in", "--polygons=false") == 1
    assert f"{browse}: left out, a picture of the scene {scene_file} beside it" in caplog.text
    assert f"{other} and {twin}: share the name other, so their outputs" in caplog.text
    # The browse image beside its scene no longer stops anything: not the example of a clash to resolve by hand.
    assert "all 2 skipped" in caplog.text and "browse .jpg beside its scene, for example" not in caplog.text
    assert [r["image"] for r in read_table(tmp_path / "run")] == [str(scene_file)]
    assert not list((tmp_path / "run" / "predictions").glob("other*"))


def test_a_gdal_mosaic_vrt_is_a_scene_named_or_in_a_folder(checkpoint: Path, tmp_path: Path) -> None:
    # A .vrt (gdalbuildvrt's mosaic of a county's scenes, which make_tiles.py takes) went to the tile reader and
    # was reported "not a readable image (truncated, corrupt or not an image file)"; in a folder, not seen at all.
    source = write_geotiff(tmp_path / "in" / "scene.tif", scene_pixels(), nodata=0)
    with rasterio.open(source) as src:
        band = "".join(
            f'<VRTRasterBand dataType="Byte" band="{b}"><NoDataValue>0</NoDataValue><SimpleSource>'
            f'<SourceFilename relativeToVRT="0">{source}</SourceFilename><SourceBand>{b}</SourceBand></SimpleSource>'
            "</VRTRasterBand>"
            for b in (1, 2, 3)
        )
        mosaic = tmp_path / "vrt" / "mosaic.vrt"
        mosaic.parent.mkdir()
        mosaic.write_text(
            f'<VRTDataset rasterXSize="{WIDTH}" rasterYSize="{HEIGHT}"><SRS>{src.crs.to_wkt()}</SRS>'
            f"<GeoTransform>{', '.join(map(str, src.transform.to_gdal()))}</GeoTransform>{band}</VRTDataset>"
        )
    assert run_predict(tmp_path / "tif", checkpoint, source) == 0
    assert run_predict(tmp_path / "named", checkpoint, mosaic) == 0
    assert run_predict(tmp_path / "folder", checkpoint, mosaic.parent) == 0
    with rasterio.open(scene.scene_outputs(tmp_path / "tif", source)["mask"]) as src:
        expected = src.read(1)
    for run in ("named", "folder"):
        with rasterio.open(scene.scene_outputs(tmp_path / run, mosaic)["mask"]) as src:
            assert (src.crs.to_string(), src.transform) == (CRS, TRANSFORM) and np.array_equal(src.read(1), expected)


def test_overlays_of_16_bit_scenes_and_tiles_are_stretched(checkpoint: Path, tmp_path: Path) -> None:
    # 10-bit values in a 16-bit file, as Gaofen-2 delivers them: the overlay's photo was black (values 0 to 4).
    ten_bit = scene_pixels().astype(np.uint16) * 4
    source = write_geotiff(tmp_path / "in" / "gf2.tif", ten_bit)
    assert run_predict(tmp_path / "run", checkpoint, source) == 0
    overlay = load_overlay(tmp_path / "run" / "predictions" / "overlays" / "gf2_overlay.png")
    assert overlay[:, :, 2].max() >= 128  # blue, which the farmland tint does not add to
    tile = tmp_path / "tiles" / "gf2_tile.tif"
    geotiff(tile, ten_bit[:, :64, :64], None, Affine.identity())
    assert run_predict(tmp_path / "run", checkpoint, tile.parent) == 0
    assert load_overlay(tmp_path / "run" / "predictions" / "overlays" / "gf2_tile_overlay.png")[:, :, 2].max() >= 128


def test_the_overlay_of_a_south_up_scene_is_north_up_as_gis_software_shows_it(tmp_path: Path) -> None:
    # A bottom-up raster (positive y pixel size) stores its southern rows first: its overlay PNG was drawn upside
    # down, unlike the same ground stored north-up and unlike the scene in QGIS.
    pixels = scene_pixels()
    mask = (pixels[0] > 100).astype(np.uint8)[None]
    south_up = Affine(TRANSFORM.a, 0, TRANSFORM.c, 0, -TRANSFORM.e, TRANSFORM.f + TRANSFORM.e * HEIGHT)
    overlays = []
    for name, transform, flip in (("north", TRANSFORM, slice(None)), ("south", south_up, slice(None, None, -1))):
        source = write_geotiff(tmp_path / f"{name}.tif", pixels[:, flip].copy(), transform=transform)
        mask_path = write_geotiff(tmp_path / f"{name}_seg.tif", mask[:, flip].copy(), transform=transform)
        with scene.open_scene(source, (), 3) as opened:
            scene.write_overlay(opened, mask_path, tmp_path / f"{name}.png")
        overlays.append(load_overlay(tmp_path / f"{name}.png"))
    assert np.array_equal(overlays[0], overlays[1])
    picture = np.arange(6).reshape(2, 3)
    assert rasters.north_up(picture, Affine(-1, 0, 0, 0, 1, 0)).tolist() == [[5, 4, 3], [2, 1, 0]]
    assert rasters.north_up(picture, Affine.rotation(30)).tolist() == picture.tolist()  # rotated: left as it is
    assert rasters.north_up(picture, Affine.identity()).tolist() == picture.tolist()  # no geotransform: an image


def test_a_float_scene_with_a_nodata_value_outside_0_1_is_predicted_with_its_overlay(
    checkpoint: Path, tmp_path: Path
) -> None:
    # Float reflectance in [0, 1] with -9999 declared as nodata, as GDAL exports float products: the overlay
    # fed -9999 to the [0, 1] check and the scene failed after its mask was written, without an area row.
    pixels = scene_pixels().astype(np.float32) / 255
    pixels[:, NODATA_ROWS, NODATA_COLS] = -9999
    source = write_geotiff(tmp_path / "in" / "float.tif", pixels, nodata=-9999)
    run_dir = tmp_path / "run"
    assert run_predict(run_dir, checkpoint, source) == 0
    (row,) = read_table(run_dir)
    assert int(row["valid_pixels"]) == HEIGHT * WIDTH - 40 * 60
    overlay = load_overlay(run_dir / "predictions" / "overlays" / "float_overlay.png")
    assert overlay.shape[:2] == (HEIGHT, WIDTH) and overlay[NODATA_ROWS, NODATA_COLS].max() == 0  # nodata: black


@pytest.mark.parametrize("empty_value", [-9999.0, math.nan])
@pytest.mark.filterwarnings("error::RuntimeWarning")  # NaN fed to the network came out as NaN probabilities
def test_a_float_scene_whose_first_row_of_windows_is_all_nodata_is_predicted(
    checkpoint: Path, tmp_path: Path, empty_value: float
) -> None:
    # A whole row of 128-pixel windows of -9999 (declared) had no pixel with data to fill it from: the value
    # reached the [0, 1] check and the scene failed ("values outside [0, 1] (found -1e+04 to -1e+04)").
    pixels = scene_pixels().astype(np.float32) / 255
    pixels[:, :140] = empty_value
    nodata = {} if math.isnan(empty_value) else {"nodata": empty_value}
    source = write_geotiff(tmp_path / "in" / "float.tif", pixels, **nodata)
    run_dir = tmp_path / "run"
    assert run_predict(run_dir, checkpoint, source) == 0
    (row,) = read_table(run_dir)
    assert int(row["valid_pixels"]) == (HEIGHT - 140) * WIDTH
    with rasterio.open(scene.scene_outputs(run_dir, source)["probability"]) as src:
        percent = src.read(1)
    assert (percent[:140] == 255).all() and percent[140:].max() <= 100


def test_nan_pixels_of_a_float_scene_are_nodata_even_undeclared(checkpoint: Path, tmp_path: Path) -> None:
    # Without a declared nodata value the NaN pixels reached the network, which spread them over its reach:
    # the mask turned background around them and they counted as valid background.
    pixels = scene_pixels().astype(np.float32) / 255
    pixels[:, NODATA_ROWS, NODATA_COLS] = 0.5
    pixels[:, 100:130, 200:260] = np.nan
    pixels[1, 150:160, 10:20] = np.nan  # one band only: still nothing the network can take
    plain = run_predict(tmp_path / "plain", checkpoint, write_geotiff(tmp_path / "a" / "s.tif", np.nan_to_num(pixels)))
    assert (
        plain == 0 and run_predict(tmp_path / "run", checkpoint, write_geotiff(tmp_path / "b" / "s.tif", pixels)) == 0
    )
    masks = {}
    for run in ("plain", "run"):
        with rasterio.open(tmp_path / run / "predictions" / "s_seg.tif") as src:
            masks[run] = src.read(1)
    empty = np.zeros((HEIGHT, WIDTH), bool)
    empty[100:130, 200:260] = empty[150:160, 10:20] = True
    assert (masks["run"][empty] == 255).all() and not (masks["run"][~empty] == 255).any()
    (row,) = read_table(tmp_path / "run")
    assert int(row["valid_pixels"]) == HEIGHT * WIDTH - 30 * 60 - 10 * 10
    # Elsewhere the mask is the scene's with its NaN filled as nodata would be, not a blot of background.
    assert np.mean(masks["run"][~empty] == masks["plain"][~empty]) > 0.95


def test_min_field_pixels_on_a_scene_in_metres_is_said_to_be_unused(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = write_geotiff(tmp_path / "in" / "scene.tif", scene_pixels(), nodata=0)
    assert run_predict(tmp_path / "run", checkpoint, source, "--min_field_pixels=500") == 0
    assert "--min_field_pixels=500 is left unused" in caplog.text and "--min_field_area_ha=0 (0 pixels" in caplog.text


def test_outputs_this_configuration_does_not_write_are_not_left_from_an_earlier_run(
    checkpoint: Path, tmp_path: Path
) -> None:
    # A sieved mask and a probability from a run with another threshold stayed beside the new mask and fields.
    source = write_geotiff(tmp_path / "in" / "scene.tif", scene_pixels(), nodata=0)
    run_dir = tmp_path / "run"
    assert run_predict(run_dir, checkpoint, source, "--save_sieved_mask=true", "--threshold=0.3") == 0
    out = scene.scene_outputs(run_dir, source)
    assert out["sieved"].is_file() and out["probability"].is_file()
    assert run_predict(run_dir, checkpoint, source, "--save_probability=false", "--threshold=0.7") == 0
    assert not out["sieved"].exists() and not out["sieved_style"].exists() and not out["probability"].exists()
    assert out["mask"].is_file() and out["gpkg"].is_file() and out["overlay"].is_file()


def test_temporary_files_a_killed_run_left_are_removed_by_the_next_one(checkpoint: Path, tmp_path: Path) -> None:
    # A run killed with -9 (a power cut) while writing a scene's rasters and fields cannot remove their temporary
    # files, each as large as the scene; the next run finished the scene and left them there for good.
    source = write_geotiff(tmp_path / "in" / "scene.tif", scene_pixels(), nodata=0)
    run_dir = tmp_path / "run"
    out = scene.scene_outputs(run_dir, source)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    left = [f".{p.stem}.{ended.pid}.tmp{p.suffix}" for p in (out["mask"], out["probability"], out["gpkg"])]
    writing = f".{out['mask'].stem}.{os.getppid()}.tmp.tif"  # a live process's: not touched
    out["mask"].parent.mkdir(parents=True)
    for name in (*left, writing):
        (out["mask"].parent / name).write_bytes(b"half a file")
    assert run_predict(run_dir, checkpoint, source) == 0
    assert out["mask"].is_file() and out["gpkg"].is_file()
    assert sorted(p.name for p in out["mask"].parent.glob(".*")) == [writing]


def test_a_disk_that_fills_as_a_scene_s_files_are_closed_leaves_none_cut_short_under_its_name(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # libtiff writes a GeoTIFF's last blocks as it is closed, and GDAL a GeoPackage's last pages: on a full disk
    # both failed with a line on the terminal only, and the file cut short was renamed to the output's name (a
    # 4096-byte _prob.tif, a .gpkg without its tables); a GeoPackage that said so ended in pyogrio's traceback.
    source = write_geotiff(tmp_path / "in" / "scene.tif", scene_pixels(), nodata=0)
    out = scene.scene_outputs(tmp_path / "run", source)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(
        files, "disk_error_at", lambda path: OSError(full.errno, full.strerror, str(path)), raising=False
    )
    real_overviews, real_vector = scene.add_overviews, polygons.write_vector

    def cut_short(path: Path, size: int) -> None:
        with open(path, "r+b") as handle:
            handle.truncate(size)

    def probability_cut_short(path: Path, resampling: object) -> None:
        real_overviews(path, resampling)
        if "_prob" in path.name:
            cut_short(path, 4096)

    monkeypatch.setattr(scene, "add_overviews", probability_cut_short)
    with pytest.raises(OSError) as raised:
        run_predict(tmp_path / "run", checkpoint, source)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(out["probability"])
    assert out["mask"].is_file() and not out["probability"].exists()
    monkeypatch.setattr(scene, "add_overviews", real_overviews)

    def gpkg_cut_short(path: str, *given: object, **named: object) -> None:
        real_vector(path, *given, **named)
        cut_short(Path(path), 4096)

    monkeypatch.setattr(polygons, "write_vector", gpkg_cut_short)
    with pytest.raises(OSError) as raised:
        run_predict(tmp_path / "run", checkpoint, source)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(out["gpkg"])
    assert out["probability"].is_file() and not out["gpkg"].exists() and not out["geojson"].exists()
    assert not list(out["mask"].parent.glob(".*"))  # no temporary file left
    with rasterio.open(out["probability"]) as src:
        src.read()  # whole


def test_a_temporary_name_with_more_digits_than_any_process_id_is_taken_as_left(tmp_path: Path) -> None:
    # A file of the temporary pattern whose digits exceed any process id stopped every run writing that output
    # with "OverflowError: Python int too large to convert to C long".
    left = tmp_path / ".scene_mask.99999999999999999999.tmp.tif"
    left.write_bytes(b"half a file")
    assert files.temporary_beside(tmp_path / "scene_mask.tif").name == f".scene_mask.{os.getpid()}.tmp.tif"
    assert not left.exists()


def test_a_sieved_mask_asked_for_without_polygons_is_said_not_to_come(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = write_geotiff(tmp_path / "in" / "scene.tif", scene_pixels(), nodata=0)
    assert run_predict(tmp_path / "run", checkpoint, source, "--polygons=false", "--save_sieved_mask=true") == 0
    assert not scene.scene_outputs(tmp_path / "run", source)["sieved"].exists()
    assert "--save_sieved_mask=true writes no sieved mask with --polygons=false" in caplog.text


def test_transparent_pixels_of_an_alpha_band_are_nodata(checkpoint: Path, tmp_path: Path) -> None:
    # An RGBA orthophoto whose collar is white and transparent: the collar counted as valid ground.
    pixels = scene_pixels()
    pixels[:, NODATA_ROWS, NODATA_COLS] = 255
    alpha = np.full((1, HEIGHT, WIDTH), 255, np.uint8)
    alpha[:, NODATA_ROWS, NODATA_COLS] = 0
    source = write_geotiff(
        tmp_path / "in" / "rgba.tif", np.concatenate([pixels, alpha]), photometric="RGB", alpha="YES"
    )
    assert run_predict(tmp_path / "run", checkpoint, source, "--bands=1,2,3") == 0
    with rasterio.open(scene.scene_outputs(tmp_path / "run", source)["mask"]) as src:
        mask = src.read(1)
    assert (mask[NODATA_ROWS, NODATA_COLS] == 255).all() and (mask != 255).sum() == HEIGHT * WIDTH - 40 * 60
    (row,) = read_table(tmp_path / "run")
    assert int(row["valid_pixels"]) == HEIGHT * WIDTH - 40 * 60


def test_rgb_bands_pick_the_colours_of_scene_and_tile_overlays(state: dict, checkpoint: Path, tmp_path: Path) -> None:
    source = write_geotiff(tmp_path / "in" / "scene.tif", scene_pixels())  # three bands of different noise
    write_image(tmp_path / "tiles" / "tile.png", scene_pixels(2)[:, :64, :64].transpose(1, 2, 0))
    trained_so = tmp_path / "trained with rgb_bands.pth"
    torch.save({**state, "epoch": 1, "config": {**state["config"], "rgb_bands": "3,2,1"}}, trained_so)
    runs = {"first three": (checkpoint,), "given": (checkpoint, "--rgb_bands=3,2,1"), "from training": (trained_so,)}
    overlays = {}
    for name, (model, *extra) in runs.items():
        run_dir = tmp_path / name
        for inputs in (source, tmp_path / "tiles"):
            assert run_predict(run_dir, model, inputs, *extra) == 0
        folder = run_dir / "predictions"
        with rasterio.open(folder / "scene_seg.tif") as src:  # 0, 1 = farmland, 255 = nodata
            untinted = np.concatenate([src.read(1).ravel() != 1, load_mask(folder / "tile_seg.png").ravel() == 0])
        pictures = [load_overlay(folder / "overlays" / f"{stem}_overlay.png") for stem in ("scene", "tile")]
        overlays[name] = np.concatenate([p.reshape(-1, 3) for p in pictures])[untinted]
    # The same masks (the network reads the same bands), the photo's bands in the other order.
    assert np.array_equal(overlays["given"], overlays["first three"][:, ::-1])
    assert np.array_equal(overlays["from training"], overlays["given"])
    with pytest.raises(ValueError, match=r"--rgb_bands=4,2,1: .* it reads 1,2,3 of the file.*--rgb_bands=3,2,1"):
        run_predict(tmp_path / "bad", checkpoint, source, "--rgb_bands=4,2,1")


def load_overlay(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def scene_probabilities(model: torch.nn.Module, source: Path, settings: scene.SceneSettings) -> np.ndarray:
    with scene.open_scene(source, settings.bands, 3) as opened:
        rows = list(scene.blended_rows(model, opened, 3, 2, CPU, settings))
    return np.concatenate([probabilities for _, probabilities, _ in rows], axis=1)


def test_window_by_window_equals_the_whole_scene_where_windows_overlap_enough(state: dict, tmp_path: Path) -> None:
    source = write_geotiff(tmp_path / "scene.tif", scene_pixels())
    model = inference.inference_model(state, CPU, True, None)
    pixels = scene_pixels().transpose(1, 2, 0)  # its nodata corner fed as its nearest pixels, as windows feed it
    pixels = scene.filled_nodata(pixels, ~pixels.any(axis=2)).transpose(2, 0, 1)
    image = torch.from_numpy(pixels[None].astype(np.float32) / 255)
    whole = inference.predict_probabilities(model, image, CPU)[0, 1].numpy()
    blended = scene_probabilities(model, source, scene.SceneSettings(window=256, overlap=128, batch_size=4))[1]
    # Away from the scene's edges (where the whole scene and a window pad differently) the blend matches the
    # whole-scene prediction. Not bit for bit: the U-Net's reach (~200 pixels) exceeds half a window, so
    # windows see slightly less context; measured max difference 3e-4, so 1e-3 leaves a margin.
    inner = (slice(16, -16), slice(16, -16))
    assert np.abs(blended - whole)[inner].max() < 1e-3
    decided = np.abs(whole - 0.5)[inner] > 1e-3  # pixels whose class a 1e-3 change cannot flip: all here
    assert decided.mean() > 0.99
    assert np.array_equal((blended[inner] > 0.5)[decided], (whole[inner] > 0.5)[decided])
    # The check has teeth: windows that do not overlap leave seams far beyond that tolerance.
    seams = scene_probabilities(model, source, scene.SceneSettings(window=128, overlap=0, batch_size=4))[1]
    assert np.abs(seams - whole)[inner].max() > 0.1


def test_windows_cover_the_scene_and_weights_add_up() -> None:
    assert scene.window_origins(300, 128, 32) == [0, 96, 192]  # the last reaches 320: padded, cropped back
    assert scene.window_origins(100, 128, 32) == [0]  # a scene smaller than a window
    weight = scene.blend_weight(128, 32)
    assert weight.min() > 0 and weight[32:96].min() == 1.0
    assert np.allclose(weight[96:] + weight[:32], 1.0)  # neighbours' ramps add up to 1 across the overlap
    cover = scene.coverage(300, [0, 96, 192], weight)
    assert np.allclose(cover[32:288], 1.0) and cover.min() > 0  # 1 inside, only the scene's edges are thinner


def test_tta_averages_the_eight_symmetries(state: dict) -> None:
    model = inference.inference_model(state, CPU, True, None)
    images = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    averaged = inference.averaged_probabilities(model, images, CPU, True, tta=True)
    plain = inference.averaged_probabilities(model, images, CPU, True, tta=False)
    assert not torch.allclose(averaged, plain, atol=1e-3)  # the network alone is not symmetric
    # Averaged over the symmetries, the prediction turns with the image: f(t(x)) = t(f(x)) for every t.
    for transform in inference.DIHEDRAL:
        turned = inference.averaged_probabilities(model, inference.dihedral(images, transform), CPU, True, tta=True)
        assert torch.allclose(turned, inference.dihedral(averaged, transform), atol=1e-5)
    # And it is the plain mean of the eight predictions, each turned back.
    of = inference.averaged_probabilities
    manual = sum(
        inference.undo_dihedral(of(model, inference.dihedral(images, t), CPU, True, False), t)
        for t in inference.DIHEDRAL
    )
    assert torch.allclose(averaged, manual / 8, atol=1e-6)


def test_band_count_mismatch_fails_before_anything_is_written(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    four = np.concatenate([scene_pixels(), scene_pixels(2)[:1]])
    source = write_geotiff(tmp_path / "four.tif", four)
    run_dir = tmp_path / "run"
    assert run_predict(run_dir, checkpoint, source) == 1
    assert "four.tif: has 4 band(s), expected in_channels=3" in caplog.text
    assert "pick 3 of the file's 4 bands with --bands (for example --bands=1,2,3)" in caplog.text
    assert not [p for p in (run_dir / "predictions").rglob("*") if p.is_file() and p.name != "farmland_area.csv"]
    assert read_table(run_dir) == []
    assert run_predict(run_dir, checkpoint, source, "--bands=1,2,5") == 1
    assert "asks for band 5, but the file has 4 band(s)" in caplog.text
    # A network trained on picked bands offers those as the fix, not the file's first three.
    with pytest.raises(DataError, match=r"with --bands=1,2,3,4, .* --bands=3,2,1, the bands it was trained on"):
        scene.open_scene(source, (1, 2, 3, 4), 3, "3,2,1")
    # Fewer bands than the network's: no --bands can help, and the message does not offer one.
    with pytest.raises(DataError, match=r"has 2 band\(s\), .*; the file has only 2: predict it with a checkpoint") as e:
        scene.open_scene(write_geotiff(tmp_path / "two.tif", four[:2]), (), 3)
    assert "--bands" not in str(e.value)
    # Given --bands=1,2,3 for a folder, a 2-band file was told to "choose band numbers from 1 to 2": no choice fits.
    with pytest.raises(DataError, match=r"but the file has 2 band\(s\); no choice of them makes the 3 .* trained on 2"):
        scene.open_scene(tmp_path / "two.tif", (1, 2, 3), 3)
    signed = write_geotiff(tmp_path / "signed.tif", four[:3].astype(np.int16))
    with pytest.raises(DataError, match=r"pixel type int16 is not supported.* gdal_translate -ot UInt16 .*signed\.tif"):
        scene.open_scene(signed, (), 3)
    with pytest.raises(ValueError, match=r"--bands='3;2': expected 1-based band numbers"):
        run_predict(run_dir, checkpoint, source, "--bands=3;2")


def test_band_selection_and_sixteen_bit_give_the_mask_of_the_plain_rgb_scene(checkpoint: Path, tmp_path: Path) -> None:
    rgb = scene_pixels()
    sources = {
        "rgb": write_geotiff(tmp_path / "in" / "rgb.tif", rgb),
        # Blue, green, red, near-infrared: --bands=3,2,1 must hand the network red, green, blue.
        "bgrn": write_geotiff(tmp_path / "in" / "bgrn.tif", np.concatenate([rgb[::-1], scene_pixels(3)[:1]])),
        # 16-bit: v * 257 / 65535 = v / 255, so the network sees the very same numbers.
        "sixteen": write_geotiff(tmp_path / "in" / "sixteen.tif", rgb.astype(np.uint16) * 257),
    }
    masks = {}
    for name, source in sources.items():
        extra = ["--bands=3,2,1"] if name == "bgrn" else []
        assert run_predict(tmp_path / name, checkpoint, source, "--polygons=false", *extra) == 0
        with rasterio.open(scene.scene_outputs(tmp_path / name, source)["mask"]) as src:
            masks[name] = src.read(1)
    assert np.array_equal(masks["rgb"], masks["bgrn"]) and np.array_equal(masks["rgb"], masks["sixteen"])
    assert (masks["rgb"] == 1).any() and (masks["rgb"] == 0).any()


def test_a_large_png_is_a_scene_in_pixels_and_small_tiles_stay_tiles(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "photos"
    big = scene_pixels()[:, :150, :200]  # larger than the 128-pixel window; the nodata corner included
    write_image(folder / "big.png", big.transpose(1, 2, 0))
    write_image(folder / "tile.png", scene_pixels()[:, 100:132, 100:132].transpose(1, 2, 0))
    run_dir = tmp_path / "run"
    assert run_predict(run_dir, checkpoint, folder, "--tta=true") == 0
    assert load_mask(run_dir / "predictions" / "tile_seg.png").shape == (32, 32)  # the tile route, as before
    assert not (run_dir / "predictions" / "tile_seg.tif").exists()
    with rasterio.open(run_dir / "predictions" / "big_seg.tif") as src:
        assert src.crs is None and src.shape == (150, 200)
        mask = src.read(1)
    (row,) = read_table(run_dir)
    assert row["image"].endswith("big.png") and row["crs"] == "" and row["pixel_area_m2"] == ""
    assert row["valid_area_ha"] == row["farmland_area_ha"] == ""  # no CRS: no hectares invented
    assert int(row["valid_pixels"]) == 150 * 200 - 40 * 60 == int((mask != 255).sum())
    assert int(row["farmland_pixels"]) == int((mask == 1).sum())
    assert float(row["farmland_fraction"]) == pytest.approx((mask == 1).sum() / (mask != 255).sum(), abs=1e-6)
    assert "no CRS, so areas are left empty" in caplog.text


def test_image_size_reads_png_and_jpeg_headers(tmp_path: Path) -> None:
    for name in ("a.png", "b.jpg"):
        write_image(tmp_path / name, np.zeros((70, 130, 3), np.uint8))
        assert scene.image_size(tmp_path / name) == (70, 130)
        assert scene.is_scene(tmp_path / name, 128) and not scene.is_scene(tmp_path / name, 144)
    (tmp_path / "c.png").write_bytes(b"not an image")
    assert scene.image_size(tmp_path / "c.png") is None and not scene.is_scene(tmp_path / "c.png", 64)


@pytest.mark.parametrize(
    "crs, transform, said, advice",
    [
        ("EPSG:4326", Affine(0.0001, 0.0, 10.0, 0.0, -0.0001, 50.0), "a geographic CRS", "-t_srs EPSG:32632 "),
        # CGCS2000 at 108.3 degrees east: the 3-degree Gauss-Kruger zone of central meridian 108E.
        ("EPSG:4490", Affine(0.0001, 0.0, 108.3, 0.0, -0.0001, 34.2), "a geographic CRS", "-t_srs EPSG:4545 "),
        # Web Mercator's 1 m map pixels at 36.5 degrees north cover 0.65 m2: hectares would be 55 % too large. Its
        # centre, 117.0 E, lies in UTM zone 50: the command reprojects the download there.
        (
            "EPSG:3857",
            Affine(1.0, 0.0, 13024000.0, 0.0, -1.0, 4369000.0),
            "a Mercator projection",
            "-t_srs EPSG:32650 ",
        ),
    ],
)
def test_geographic_crs_gives_fractions_without_hectares(
    checkpoint: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    crs: str,
    transform: Affine,
    said: str,
    advice: str,
) -> None:
    source = write_geotiff(tmp_path / "in.tif", scene_pixels(), crs=crs, transform=transform)
    assert run_predict(tmp_path / "run", checkpoint, source) == 0
    (row,) = read_table(tmp_path / "run")
    assert row["crs"] == crs and row["farmland_area_ha"] == "" and float(row["farmland_fraction"]) > 0
    assert f"{source}: {said}" in caplog.text and "reproject the scene" in caplog.text and advice in caplog.text
    _, _, geometry, (_, area_ha, _) = pyogrio.raw.read(scene.scene_outputs(tmp_path / "run", source)["geojson"])
    assert len(geometry) and all(a is None or math.isnan(a) for a in area_ha)


def test_field_areas_are_given_to_a_hundredth_of_a_square_metre(checkpoint: Path, tmp_path: Path) -> None:
    # 0.3 m pixels: 0.09 m2 each, whose products come out as 0.0006659999999999999 ha unrounded.
    transform = Affine(0.3, 0.0, 500000.0, 0.0, -0.3, 4100000.0)
    source = write_geotiff(tmp_path / "in.tif", scene_pixels(), crs=CRS, transform=transform)
    assert run_predict(tmp_path / "run", checkpoint, source, "--min_field_area_ha=0", "--resample_scenes=false") == 0
    _, _, _, (_, area_ha, pixels) = pyogrio.raw.read(scene.scene_outputs(tmp_path / "run", source)["gpkg"])
    assert len(area_ha) > 1
    assert list(area_ha) == [round(p * 0.3 * 0.3 / 1e4, 6) for p in pixels]
    assert all(repr(a) == repr(round(a, 6)) for a in area_ha)


def test_fields_cut_by_vectorising_strips_are_joined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mask = np.zeros((50, 40), np.uint8)
    mask[5:45, 5:10] = mask[5:45, 20:25] = mask[40:45, 5:25] = 1  # a U across three strips of 16 rows
    mask[10:20, 30:38] = 1  # a field within one strip
    mask[30:33, 30:38] = 1
    mask[15:18, 6:8] = 0  # a hole
    source = write_geotiff(tmp_path / "mask.tif", mask[None], transform=TRANSFORM)
    monkeypatch.setattr(polygons, "STRIP", 16)
    shapes = list(polygons.mask_fields(source, 0))
    assert len(shapes) == 3 and sum(s.area for s in shapes) == mask.sum()
    assert all(s.is_valid for s in shapes) and sum(len(s.interiors) for s in shapes) == 1


def test_demo_scene_is_a_georeferenced_mosaic_with_its_label(tmp_path: Path) -> None:
    label_path = demo_data.write_demo_scene(tmp_path / "scene.tif", tiles=2, size=32, seed=1)
    with rasterio.open(tmp_path / "scene.tif") as image, rasterio.open(label_path) as label:
        assert image.shape == label.shape == (64, 64) and image.count == 3 and image.crs.is_projected
        assert image.transform == label.transform and set(np.unique(label.read(1))) <= {0, 1}
    tile, mask = demo_data.render_tile(demo_data._tile_rng(1, 1), 32)  # row 0, column 1
    with rasterio.open(tmp_path / "scene.tif") as image, rasterio.open(label_path) as label:
        assert np.array_equal(image.read()[:, :32, 32:].transpose(1, 2, 0), tile)
        assert np.array_equal(label.read(1)[:32, 32:], mask // 255)


@pytest.mark.parametrize(
    "lon, lat, epsg",
    [(114.0, 31.6, 4547), (112.4, 35.0, 4546), (75.2, 39.0, 4534), (135.0, 47.0, 4554), (10.5, 50.0, 32632)],
)
def test_a_level_1_scene_is_sent_to_the_gauss_kruger_zone_of_its_centre(lon: float, lat: float, epsg: int) -> None:
    # The orthorectification command named EPSG:4548 (central meridian 117 E) for every Level-1 scene.
    assert rasters.zone_epsg(lon, lat, cgcs2000=True) == epsg


def test_windows_must_follow_the_pooling_grid() -> None:
    with pytest.raises(ValueError, match="--window=500: expected a multiple of 16"):
        scene.SceneSettings(window=500).check()
    with pytest.raises(ValueError, match="--overlap=100: expected a multiple of 16"):
        scene.SceneSettings(window=512, overlap=100).check()
    # A U-Net at downscale 2 pools by 32: the message said "32 with a ResNet encoder" to a U-Net user.
    with pytest.raises(ValueError, match="by 32 pixels: 16 for the U-Net, 32 with a ResNet encoder, times downscale"):
        scene.SceneSettings(window=100, grid=32).check()
    # The value given is named, not only the three keys it might be.
    with pytest.raises(ValueError, match=r"^--min_field_area_ha=-0.5: expected a finite number of 0 or more \(0 turns"):
        scene.SceneSettings(min_field_area_ha=-0.5).check()
    # nan and inf passed the sign test: a traceback in the sieve (a pixel count), or a scene resampled by 0.
    for key, value in (("min_field_area_ha", math.inf), ("simplify_tolerance", math.nan), ("pixel_size_m", math.inf)):
        with pytest.raises(ValueError, match=rf"^--{key}={value:g}: expected a finite number of 0 or more"):
            scene.SceneSettings(**{key: value}).check()
    assert math.isclose(scene.pixel_area_m2(rasterio.crs.CRS.from_string(CRS), TRANSFORM), 4.0)


@pytest.mark.parametrize(
    "crs, area",
    [
        ("EPSG:32650", 4.0),  # UTM
        ("EPSG:4547", 4.0),  # CGCS2000 Gauss-Kruger (transverse Mercator): ground metres
        ("EPSG:2227", 4.0 * 0.3048006096**2),  # US survey feet
        ("EPSG:3857", None),  # Web Mercator: metres that stretch with latitude
        ("EPSG:3395", None),  # World Mercator
        ("EPSG:4490", None),  # CGCS2000 in degrees
    ],
)
def test_pixel_area_in_ground_metres_or_none(crs: str, area: float | None) -> None:
    found = scene.pixel_area_m2(rasterio.crs.CRS.from_string(crs), Affine(2.0, 0, 0, 0, -2.0, 0))
    assert found == area if area is None else math.isclose(found, area, rel_tol=1e-6)
    # The pixel size in map units stays for Mercator; the size on the ground is another matter (below).
    size = rasters.pixel_size_m(rasterio.crs.CRS.from_string(crs), Affine(2.0, 0, 0, 0, -2.0, 0))
    assert size is None if crs == "EPSG:4490" else math.isclose(size, math.sqrt(area or 4.0), rel_tol=1e-6)


@pytest.mark.parametrize(
    "crs, ground",
    [
        ("EPSG:4549", 1.0),  # CGCS2000 Gauss-Kruger: its metres are the ground's
        # Web Mercator at 40 N: a map metre spans cos(40) = 0.766 m, a little less north-south on the ellipsoid
        # (0.7622) and a little more east-west (0.7671); the side of a square of that area is 0.7656 m.
        ("EPSG:3857", 0.7656),
        ("EPSG:3395", math.cos(math.radians(40)) / math.sqrt(1 - 0.00669438 * math.sin(math.radians(40)) ** 2)),
        ("EPSG:4490", None),  # degrees: a scene in them is predicted on its own pixels
    ],
)
def test_pixel_size_on_the_ground_of_a_grid_in_mercator_is_its_map_size_shrunk_by_latitude(
    crs: str, ground: float | None
) -> None:
    # A model trained on ground-metre tiles (a Gauss-Kruger survey) and a Web Mercator download of the same
    # place: their map metres compare at 1.25 where the ground says 1 / 0.766 (fields 30 % larger than trained).
    x, y = rasterio.warp.transform("EPSG:4326", crs, [116.0], [40.0]) if crs != "EPSG:4549" else ([5e5], [4.4e6])
    transform = Affine(1.0, 0, x[0] - 500, 0, -1.0, y[0] + 500)
    size = rasters.ground_pixel_size(rasterio.crs.CRS.from_string(crs), transform, 1000, 1000)
    assert size is None if ground is None else math.isclose(size, ground, rel_tol=2e-4)


def test_a_level_1_scene_placed_by_rpcs_is_a_scene_with_the_orthorectification_fix(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = write_rpc_tiff(tmp_path / "in" / "GF2_L1A.tif", scene_pixels()[:, :100, :100])  # under one window
    assert run_predict(tmp_path / "run", checkpoint, source) == 0
    assert "GF2_L1A.tif: it is placed only by RPCs" in caplog.text and "gdalwarp -rpc" in caplog.text
    assert caplog.text.count("it is placed only by RPCs") == 1  # once, not again for the check before prediction
    # The zone of the scene's centre (116.4 E: central meridian 117 E) and the file itself, not a fixed example.
    assert f"-t_srs EPSG:4548 -tr 1 1 -r bilinear {source} {source.with_name('GF2_L1A_ortho.tif')}" in caplog.text
    assert (tmp_path / "run" / "predictions" / "GF2_L1A_seg.tif").is_file()  # the scene route, not a tile's PNG


def test_a_scene_replaced_by_one_that_fails_loses_the_outputs_and_row_of_its_earlier_version(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder, run = tmp_path / "in", tmp_path / "run"
    write_geotiff(folder / "a.tif", scene_pixels(1))
    write_geotiff(folder / "b.tif", scene_pixels(2))
    assert run_predict(run, checkpoint, folder) == 0
    earlier = sorted(p.name for p in (run / "predictions").rglob("b_*"))
    assert "b_seg.tif" in earlier and "b_area.json" in earlier
    # Failing with the files as they were (here a band selection the network cannot take) keeps their outputs.
    assert run_predict(run, checkpoint, folder, "--bands=1,2") == 1
    assert sorted(p.name for p in (run / "predictions").rglob("b_*")) == earlier
    # Another folder's b.tif that fails leaves them too: they are true for the file they name.
    other = tmp_path / "other" / "b.tif"
    write_geotiff(other, np.concatenate([scene_pixels(3), scene_pixels(3)[:1]]))
    assert run_predict(run, checkpoint, other) == 1
    assert sorted(p.name for p in (run / "predictions").rglob("b_*")) == earlier
    assert f"{other}: the outputs of its name in {run / 'predictions'} are still those of" in caplog.text
    # b.tif exported again, now with 4 bands: it fails, and what was made from its earlier version goes.
    write_geotiff(folder / "b.tif", np.concatenate([scene_pixels(3), scene_pixels(3)[:1]]))
    assert run_predict(run, checkpoint, folder) == 1
    assert "b.tif: has 4 band(s), expected in_channels=3" in caplog.text
    assert "b.tif: removed b_seg.tif" in caplog.text
    assert not list((run / "predictions").rglob("b_*"))
    assert [Path(row["image"]).name for row in read_table(run)] == ["a.tif"]
    assert (run / "predictions" / "a_seg.tif").is_file()


def test_a_scene_with_a_geotransform_but_no_crs_has_fields_in_map_coordinates_not_called_pixels(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = geotiff(tmp_path / "in" / "world file.tif", scene_pixels(), None, TRANSFORM)  # as a .tfw places it
    assert run_predict(tmp_path / "run", checkpoint, source) == 0
    fields = tmp_path / "run" / "predictions" / "world file_fields.geojson"
    crs = pyogrio.read_info(fields)["crs"]
    assert crs.startswith("LOCAL_CS") and "CRS unknown" in crs and "pixel coordinates" not in crs
    left, bottom, right, top = pyogrio.read_info(fields)["total_bounds"]
    assert left >= TRANSFORM.c and top <= TRANSFORM.f and right <= TRANSFORM.c + 2 * WIDTH  # metres, not pixels
    # The fix names the CRS the coordinates are in: reprojecting needs one to start from.
    fix = f"gdal_translate -a_srs EPSG:xxxx '{source}' '{source.with_name('world file_crs.tif')}'"
    assert "areas are left empty (pixel counts and fractions only); for hectares, assign on a copy" in caplog.text
    assert fix in caplog.text


def test_a_scene_placed_only_by_gcps_is_a_scene_with_the_warping_fix(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corners = [(0, 0, 500000.0, 4500000.0), (0, 99, 500198.0, 4500000.0), (99, 0, 500000.0, 4499802.0)]
    gcps = [GroundControlPoint(row, col, x, y) for row, col, x, y in corners]
    source = geotiff(tmp_path / "in" / "scan.tif", scene_pixels()[:, :100, :100], CRS, Affine.identity(), gcps=gcps)
    with rasterio.open(source) as src:
        assert src.crs is None and src.gcps[0]  # GDAL keeps the CRS with the points, not as the raster's
    assert run_predict(tmp_path / "run", checkpoint, source) == 0  # under one window: still a scene, not a tile
    assert "scan.tif: it is placed only by 3 ground control points (GCPs)" in caplog.text
    # The points' own projected CRS and the file itself, not a fixed example.
    assert f"gdalwarp -t_srs {CRS} -r bilinear {source} {source.with_name('scan_warped.tif')}" in caplog.text
    # The area table's warning gives the same fix, not a reprojection that needs a grid to start from.
    assert "areas are left empty (pixel counts and fractions only); for hectares, put it on a map grid" in caplog.text
    assert (tmp_path / "run" / "predictions" / "scan_seg.tif").is_file()


def test_a_scene_on_another_value_scale_than_the_training_tiles_is_warned_of(
    state: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A network normalised for 10-bit values in 16-bit tiles, given the 16-bit product and an 8-bit stretch."""
    weights = dict(state["model"])
    weights["band_mean"] = torch.full((3,), 300 / 65535)
    weights["band_std"] = torch.full((3,), 100 / 65535)
    saved = tmp_path / "net16.pth"
    torch.save({**state, "model": weights, "config": {**state["config"], "normalise": True}, "epoch": 1}, saved)
    ten_bit = (scene_pixels().astype(np.uint16) * 4)[:, :128, :128]  # means near 300
    write_geotiff(tmp_path / "in" / "dn16.tif", ten_bit)
    write_geotiff(tmp_path / "in" / "stretch8.tif", (ten_bit // 4).astype(np.uint8))
    with caplog.at_level("WARNING"):
        assert run_predict(tmp_path / "run", saved, tmp_path / "in") == 0
    warned = [r.getMessage() for r in caplog.records if "training tiles'" in r.getMessage()]
    assert len(warned) == 1 and "stretch8.tif: its pixels (uint8, scaled to [0, 1] as 8-bit / 255)" in warned[0]


def test_a_product_of_another_band_count_than_the_training_tiles_is_warned_of_where_their_bands_are_picked(
    state: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A network of bands 3,2,1 of B,G,R,NIR tiles, given an R,G,B product: it took bands 3,2,1 of it, its B,G,R,
    without a word. A 4-band scene is not warned of, nor the product with its own --bands given, nor a checkpoint
    that does not record its tiles' band count."""
    saved = tmp_path / "bgrn.pth"
    torch.save({**state, "config": {**state["config"], "bands": "3,2,1"}, "tile_bands": 4, "epoch": 1}, saved)
    rgb = scene_pixels()[:, :128, :128]
    write_geotiff(tmp_path / "in" / "rgb.tif", rgb)
    write_geotiff(tmp_path / "in" / "bgrn.tif", np.concatenate([rgb[::-1], rgb[:1]]))
    write_image(tmp_path / "tiles" / "rgb_a.png", rgb[:, :56, :56].transpose(1, 2, 0))
    write_image(tmp_path / "tiles" / "rgb_b.png", rgb[:, 56:112, :56].transpose(1, 2, 0))
    with caplog.at_level("WARNING"):
        assert run_predict(tmp_path / "run", saved, tmp_path / "in") == 0
        assert run_predict(tmp_path / "run", saved, tmp_path / "tiles") == 0
    warned = [r.getMessage() for r in caplog.records if "the training tiles 4" in r.getMessage()]
    assert len(warned) == 2 and warned[0].startswith(f"{tmp_path / 'in' / 'rgb.tif'}: has 3 band(s), the training")
    assert "took bands 3,2,1; it takes bands 3,2,1 of this file too" in warned[0]
    assert warned[1].startswith(f"{tmp_path / 'tiles' / 'rgb_a.png'}: has 3 band(s)")
    caplog.clear()
    old = tmp_path / "old.pth"
    torch.save({**state, "config": {**state["config"], "bands": "3,2,1"}, "epoch": 1}, old)
    with caplog.at_level("WARNING"):
        assert run_predict(tmp_path / "own", saved, tmp_path / "in" / "rgb.tif", "--bands=1,2,3") == 0
        assert run_predict(tmp_path / "old", old, tmp_path / "in" / "rgb.tif") == 0
    assert not [r for r in caplog.records if "the training tiles 4" in r.getMessage()]


def test_an_alpha_band_or_the_bands_named_again_are_not_warned_of_as_another_band_count(
    state: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A network of bands 3,2,1 of R,G,B tiles given an R,G,B scene with an alpha band (gdalwarp -dstalpha): the
    same colour bands at the same numbers, not another product. And --bands named by the user, the training's own
    numbers included, is the fix the warning asks for: it silences it. A B,G,R,NIR scene is still warned of."""
    rgb = scene_pixels()[:, :128, :128]
    alpha = np.where(rgb.any(axis=0), 255, 0).astype(np.uint8)[None]
    write_geotiff(tmp_path / "in" / "rgba.tif", np.concatenate([rgb, alpha]), photometric="RGB", alpha="YES")
    write_geotiff(tmp_path / "bgrn" / "bgrn.tif", np.concatenate([rgb[::-1], rgb[:1] // 2 + 1]))
    write_geotiff(tmp_path / "rgb" / "rgb.tif", rgb)
    of_rgb, of_bgrn = tmp_path / "rgb.pth", tmp_path / "bgrn.pth"
    torch.save({**state, "config": {**state["config"], "bands": "3,2,1"}, "tile_bands": 3, "epoch": 1}, of_rgb)
    torch.save({**state, "config": {**state["config"], "bands": "3,2,1"}, "tile_bands": 4, "epoch": 1}, of_bgrn)
    with caplog.at_level("WARNING"):
        assert run_predict(tmp_path / "run", of_rgb, tmp_path / "in") == 0
        assert run_predict(tmp_path / "again", of_bgrn, tmp_path / "rgb", "--bands=3,2,1") == 0  # its own 3,2,1
    assert not [r for r in caplog.records if "the training tiles" in r.getMessage()]
    with caplog.at_level("WARNING"):
        assert run_predict(tmp_path / "other", of_rgb, tmp_path / "bgrn") == 0
    warned = [r.getMessage() for r in caplog.records if "the training tiles" in r.getMessage()]
    assert len(warned) == 1 and "bgrn.tif: has 4 band(s), the training tiles 3" in warned[0]


def test_a_network_trained_without_normalise_warns_of_another_value_scale_from_the_band_means_it_keeps(
    state: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reference recipe (no normalise) trained on 8-bit tiles, given a 16-bit scene of 10-bit DN and 16-bit tiles
    of it: it calls them all background, and nothing said so, since only normalised networks kept training means.
    A checkpoint from before the means were kept is not checked."""
    saved = tmp_path / "net8.pth"
    torch.save({**state, "band_means": [0.4, 0.4, 0.3], "epoch": 1}, saved)
    ten_bit = (scene_pixels().astype(np.uint16) * 4)[:, :128, :128]  # 16-bit / 65535: near 0.005
    write_geotiff(tmp_path / "in" / "dn16.tif", ten_bit)
    write_image(tmp_path / "tiles" / "dn16_a.png", ten_bit[:, :56, :56].transpose(1, 2, 0))
    write_image(tmp_path / "tiles" / "dn16_b.png", ten_bit[:, 56:112, 56:112].transpose(1, 2, 0))
    with caplog.at_level("WARNING"):
        assert run_predict(tmp_path / "run", saved, tmp_path / "in") == 0
        assert run_predict(tmp_path / "run", saved, tmp_path / "tiles") == 0
    warned = [r.getMessage() for r in caplog.records if "training tiles'" in r.getMessage()]
    assert len(warned) == 2 and "dn16.tif: its pixels (uint16, scaled to [0, 1] as 16-bit / 65535)" in warned[0]
    assert "(0.4, 0.4, 0.3)" in warned[0] and warned[1].startswith("2 of 2 tile(s) average several times")
    caplog.clear()
    old = tmp_path / "old.pth"
    torch.save({**state, "epoch": 1}, old)
    with caplog.at_level("WARNING"):
        assert run_predict(tmp_path / "run_old", old, tmp_path / "in") == 0
    assert not [r for r in caplog.records if "training tiles'" in r.getMessage()]


def test_a_scene_predicted_all_farmland_is_warned_of_with_its_value_ratio(
    state: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A network given a scene twice as bright as its training tiles (another gain, within the value-scale
    warning's 4 times) called it all farmland without a word. A small scene all farmland (one field) is not warned
    of, nor a georeferenced 256-px tile of make_tiles.py (one warning per tile of a field had been given)."""
    weights = dict(state["model"])
    weights["outc.bias"] = torch.tensor([-50.0, 50.0])  # every pixel farmland, as a network out of its depth
    saved = tmp_path / "net.pth"
    torch.save({**state, "model": weights, "band_means": [0.11, 0.11, 0.11], "epoch": 1}, saved)
    # Means near 0.22 across its middle: twice the training tiles'. 2 x 2 test scenes: more than four 256-px tiles.
    bright = write_geotiff(tmp_path / "in" / "bright.tif", np.tile(scene_pixels(), (1, 2, 2)))
    field = write_geotiff(tmp_path / "small" / "field.tif", scene_pixels()[:, 100:300, 100:300])
    # A georeferenced tile of make_tiles.py's default size, cut from inside a field: mapped as a scene.
    tile = write_geotiff(
        tmp_path / "tiles" / "tile_r256c512.tif", np.tile(scene_pixels(), (1, 2, 2))[:, 40:296, 60:316]
    )
    with caplog.at_level("WARNING"):
        assert run_predict(tmp_path / "run", saved, bright) == 0
        assert run_predict(tmp_path / "run", saved, field) == 0
        assert run_predict(tmp_path / "run", saved, tile.parent) == 0
    warned = [r.getMessage() for r in caplog.records if "of its valid pixels are farmland" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"{bright}: 100.00 % of its valid pixels are farmland")
    assert "(its band means are 2." in warned[0] and "--bands" in warned[0] and "make_tiles.py" in warned[0]
    assert not [r for r in caplog.records if "scaled to [0, 1]" in r.getMessage()]  # within 4 times: no other word


def test_tiles_on_another_value_scale_than_the_training_tiles_are_warned_of(
    state: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tiles as scenes above: a network normalised for 10-bit values in 16-bit tiles, given a folder of 16-bit
    tiles of the same product and an 8-bit stretch of one, which it predicts as all one class without a word."""
    weights = dict(state["model"])
    weights["band_mean"] = torch.full((3,), 300 / 65535)
    weights["band_std"] = torch.full((3,), 100 / 65535)
    saved = tmp_path / "net16.pth"
    torch.save({**state, "model": weights, "config": {**state["config"], "normalise": True}, "epoch": 1}, saved)
    ten_bit = (scene_pixels().astype(np.uint16) * 4)[:, :56, :56].transpose(1, 2, 0)  # means near 300
    write_image(tmp_path / "in" / "dn16_a.png", ten_bit)
    write_image(tmp_path / "in" / "dn16_b.png", ten_bit[::-1])
    write_image(tmp_path / "in" / "stretch8.png", (ten_bit // 4).astype(np.uint8))
    with caplog.at_level("WARNING"):
        assert run_predict(tmp_path / "run", saved, tmp_path / "in") == 0
    assert (tmp_path / "run" / "predictions" / "stretch8_seg.png").is_file()  # a tile, predicted as such
    warned = [r.getMessage() for r in caplog.records if "training tiles'" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("1 of 3 tile(s) average several times above or below")
    assert f"e.g. {tmp_path / 'in' / 'stretch8.png'} (" in warned[0] and "dn16" not in warned[0]


def test_a_tile_of_water_among_tiles_of_the_training_product_is_not_called_another_product(
    state: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A network normalised on 8-bit tiles of means near 0.4, given a folder of such tiles and one of a lake (8-bit
    values near 20, a fifth of the means): water is dark, not another bit depth, and the warning called its mask
    untrustworthy. A folder of nothing but such dark tiles is another product and is warned of."""
    weights = dict(state["model"])
    weights["band_mean"], weights["band_std"] = torch.full((3,), 0.4), torch.full((3,), 0.2)
    saved = tmp_path / "net.pth"
    torch.save({**state, "model": weights, "config": {**state["config"], "normalise": True}, "epoch": 1}, saved)
    rng = np.random.default_rng(0)
    for i in range(3):
        write_image(tmp_path / "in" / f"field_{i}.png", rng.integers(60, 150, (56, 56, 3)).astype(np.uint8))
    lake = rng.integers(14, 26, (56, 56, 3)).astype(np.uint8)
    write_image(tmp_path / "in" / "lake.png", lake)
    with caplog.at_level("WARNING"):
        assert run_predict(tmp_path / "run", saved, tmp_path / "in") == 0
    assert not [r for r in caplog.records if "training tiles'" in r.getMessage()]
    for i in range(2):
        write_image(tmp_path / "dark" / f"lake_{i}.png", lake[::-1] if i else lake)
    with caplog.at_level("WARNING"):
        assert run_predict(tmp_path / "run2", saved, tmp_path / "dark") == 0
    warned = [r.getMessage() for r in caplog.records if "training tiles'" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("2 of 2 tile(s) average several times above or below")


def test_a_reflectance_scene_with_a_bright_cloud_is_still_checked_for_its_value_scale(
    state: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A network normalised for tiles of means near 0.5, given dark reflectance (near 0.1) with a cloud at 1.05 in
    the rows sampled: the prediction clips the cloud, and the check gave up on it without a word."""
    weights = dict(state["model"])
    weights["band_mean"], weights["band_std"] = torch.full((3,), 0.5), torch.full((3,), 0.2)
    saved = tmp_path / "net.pth"
    torch.save({**state, "model": weights, "config": {**state["config"], "normalise": True}, "epoch": 1}, saved)
    pixels = scene_pixels().astype(np.float32)[:, :128, :128] / 1000
    pixels[:, 60:70, 60:70] = 1.05
    source = write_geotiff(tmp_path / "in" / "toa.tif", pixels)
    with caplog.at_level("WARNING"):
        assert run_predict(tmp_path / "run", saved, source) == 0
    warned = [r.getMessage() for r in caplog.records if "training tiles'" in r.getMessage()]
    assert len(warned) == 1 and "toa.tif: its pixels (float32, scaled to [0, 1] already)" in warned[0]


def test_imagenet_normalisation_is_no_record_of_the_training_tiles_values(
    state: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """encoder_weights without normalise: the network holds ImageNet's means, not the tiles', so a 16-bit scene of
    the product it was trained on is not warned of."""
    weights = dict(state["model"])
    weights["band_mean"] = torch.tensor([0.485, 0.456, 0.406])
    weights["band_std"] = torch.tensor([0.229, 0.224, 0.225])
    saved = tmp_path / "imagenet.pth"
    config = {**state["config"], "normalise": False, "encoder_weights": "resnet18-f37072fd.pth"}
    torch.save({**state, "model": weights, "config": config, "epoch": 1}, saved)
    write_geotiff(tmp_path / "in" / "dn16.tif", (scene_pixels().astype(np.uint16) * 4)[:, :128, :128])
    with caplog.at_level("WARNING"):
        assert run_predict(tmp_path / "run", saved, tmp_path / "in") == 0
    assert not [r.getMessage() for r in caplog.records if "training tiles'" in r.getMessage()]


def test_scene_in_degrees_of_another_pixel_size_gets_the_gdalwarp_command(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 0.0001 degrees at 34.2 north is about 10 m: five times the model's 2 m.
    source = write_geotiff(
        tmp_path / "gf2 scene.tif", scene_pixels(), crs="EPSG:4490", transform=Affine(1e-4, 0, 108.3, 0, -1e-4, 34.2)
    )
    with scene.RasterScene(source) as opened:
        scene.warn_geographic_size(opened, 2.0)
    target = tmp_path / "gf2 scene_4545.tif"
    assert f"gdalwarp -t_srs EPSG:4545 -tr 2 2 -r bilinear '{source}' '{target}'" in caplog.text


def test_a_float_scene_a_little_above_1_is_clipped_and_one_far_above_refused(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A bright cloud at 1.08 in the last rows of a reflectance scene failed the scene after nearly all of it
    # had been predicted; clipped, it is predicted as the same scene at 1.0.
    pixels = scene_pixels().astype(np.float32) / 255
    pixels[:, -20:, 100:140] = 1.0
    capped = run_predict(tmp_path / "capped", checkpoint, write_geotiff(tmp_path / "a" / "s.tif", pixels))
    pixels[:, -20:, 100:140] = 1.08
    source = write_geotiff(tmp_path / "b" / "s.tif", pixels)
    assert capped == 0 and run_predict(tmp_path / "run", checkpoint, source) == 0
    said = [r.getMessage() for r in caplog.records if "lie a little outside [0, 1]" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"{source}: 800 pixel(s) of rows")
    masks = []
    for run in ("capped", "run"):
        with rasterio.open(tmp_path / run / "predictions" / "s_seg.tif") as src:
            masks.append(src.read(1))
    assert np.array_equal(*masks)
    pixels[:, -20:, 100:140] = 3.0  # another scale altogether (a scaled reflectance of 0-10000 / 3333, say)
    far = write_geotiff(tmp_path / "c" / "s.tif", pixels)
    assert run_predict(tmp_path / "far", checkpoint, far) == 1
    assert "floating-point image with values outside [0, 1]" in caplog.text


def test_network_keys_given_to_predict_py_are_warned_of_as_the_checkpoints_win(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # predict.py builds the checkpoint's network whatever the command line says: these were ignored without a word.
    source = write_geotiff(tmp_path / "in" / "a.tif", scene_pixels(1))
    same = ["--base_width=8", "--in_channels=3", "--downscale=0", "--encoder=unet"]  # the checkpoint's, or auto
    assert run_predict(tmp_path / "run", checkpoint, source, *same) == 0
    assert "ignored: the network is" not in caplog.text
    assert run_predict(tmp_path / "run2", checkpoint, source, "--encoder=resnet18", "--base_width=32") == 0
    said = (
        f"--base_width=32, --encoder=resnet18 ignored: the network is {checkpoint}'s own (base_width=8, encoder=unet)"
    )
    assert said in caplog.text


@pytest.mark.parametrize(
    "crs, left, ground",
    [
        # Web Mercator across the antimeridian (Fiji), its centre pixel's corners at 179.99999 and -179.99999
        # degrees: one pixel apart, not 360 degrees (a ground size of 6 km, a scene resampled 12,000 times).
        ("EPSG:3857", 20037508.34 - 50.5, 0.9545),
        # A Mercator of Mars: PROJ finds no way to EPSG:4326, so no ground size (it was a crash of the whole run).
        ("+proj=merc +R=3396190 +units=m +no_defs", 1e5, None),
    ],
)
def test_ground_pixel_size_of_a_mercator_grid_across_the_antimeridian_or_off_the_earth(
    crs: str, left: float, ground: float | None
) -> None:
    transform = Affine(1.0, 0, left, 0, -1.0, -1.9e6)
    size = rasters.ground_pixel_size(rasterio.crs.CRS.from_user_input(crs), transform, 100, 100)
    assert size is None if ground is None else math.isclose(size, ground, rel_tol=1e-3)


def test_a_scene_without_a_pixel_of_data_is_warned_of_not_reported_as_bare_land(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An all-nodata scene (an empty clip, a failed mosaic) wrote a row of 0 ha with no warning: in a folder of
    # scenes predicted overnight it read as land without farmland.
    source = write_geotiff(tmp_path / "in" / "empty.tif", np.zeros((3, 64, 64), np.uint8), nodata=0)
    assert run_predict(tmp_path / "run", checkpoint, source) == 0
    (row,) = read_table(tmp_path / "run")
    assert row["valid_pixels"] == "0"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(source) in message and "every pixel is nodata" in message for message in warnings)


def test_a_scene_whose_gauss_kruger_eastings_carry_a_zone_number_its_crs_lacks_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Eastings of 39 510 000 m (zone 39 in front, EPSG:4527) under EPSG:4548 (no zone number): hectares are right, but
    # the mask and fields lay thousands of kilometres off in a GIS, without a word.
    pixels = np.full((3, 32, 32), 90, np.uint8)
    path = geotiff(
        tmp_path / "错坐标" / "GF2_某县.tif", pixels, crs="EPSG:4548", transform=Affine(1, 0, 39510000, 0, -1, 3500000)
    )
    scene.scene_reader(path).close()
    assert f"{path}: its eastings from 39510000.0 carry the zone number 39 in front, which its CRS lacks" in caplog.text
    # gdal_translate takes the source first: the command once named a copy "out.tif" as its source, then the scene
    # as the file to write.
    fix = f"gdal_translate -a_srs EPSG:4527 {shell_quoted(path)} {shell_quoted(path.with_name('GF2_某县_crs.tif'))}"
    assert f"it is probably in EPSG:4527; declare that CRS on a copy ({fix})" in caplog.text
    caplog.clear()
    scene.scene_reader(
        geotiff(
            tmp_path / "对" / "GF2_某县.tif", pixels, crs="EPSG:4527", transform=Affine(1, 0, 39510000, 0, -1, 3500000)
        )
    ).close()
    assert "zone number" not in caplog.text
