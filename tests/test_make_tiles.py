"""make_tiles.py: scenes and their labels (polygons in any CRS, filtered; label rasters on other grids) cut
into the pipeline's tiles, masks and tiles.csv; nodata skipping, scene groups, and the bad inputs."""

from __future__ import annotations

import csv
import functools
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.features
import rasterio.warp
import shapely
import shapely.affinity
import shapely.geometry
from conftest import folder_digest, write_rpc_tiff
from conftest import write_geotiff as geotiff
from pyogrio.raw import write as write_vector
from rasterio.crs import CRS
from rasterio.transform import Affine

import files
import make_tiles
import rasters
import split_dataset
from config import Config
from data_preprocess import read_image, read_pair_list
from files import DataError

UTM = "EPSG:32650"
TRANSFORM = Affine(2.0, 0.0, 500000.0, 0.0, -2.0, 3500000.0)  # 2 m pixels near 117 E, 31.6 N
SIZE = 64  # scene side in pixels
TILE = 32


write_scene = functools.partial(geotiff, crs=UTM, transform=TRANSFORM)  # this module's scene


def scene_pixels(seed: int = 0, bands: int = 3, dtype: str = "uint8") -> np.ndarray:
    """(bands, SIZE, SIZE) noise without zeros (so no pixel is nodata)."""
    top = 250 if dtype == "uint8" else 60000
    return np.random.default_rng(seed).integers(1, top, (bands, SIZE, SIZE)).astype(dtype)


def fields_utm() -> list[shapely.Geometry]:
    """A triangle, a disc, a rectangle with a hole and a two-part field, in the scene's CRS (metres)."""
    x0, y0 = TRANSFORM.c, TRANSFORM.f
    ring = shapely.box(x0 + 70.3, y0 - 60.7, x0 + 120.1, y0 - 10.9)
    return [
        shapely.Polygon([(x0 + 3.1, y0 - 2.2), (x0 + 55.7, y0 - 9.3), (x0 + 20.4, y0 - 58.8)]),
        shapely.Point(x0 + 40.5, y0 - 90.2).buffer(21.3),
        ring.difference(shapely.box(x0 + 85.2, y0 - 45.6, x0 + 100.9, y0 - 25.3)),
        shapely.MultiPolygon(
            [shapely.box(x0 + 5, y0 - 127, x0 + 20, y0 - 110), shapely.box(x0 + 90, y0 - 125, x0 + 126, y0 - 95)]
        ),
    ]


def write_fields(path: Path, geoms: list, codes: list[str] | None = None, crs: str | None = UTM) -> Path:
    """Write polygons (with a DLBM code each) as a vector file; the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    codes = codes or ["0101"] * len(geoms)
    wkb = np.array(shapely.to_wkb(geoms), dtype=object)
    write_vector(str(path), wkb, [np.array(codes, dtype=object)], ["DLBM"], geometry_type="MultiPolygon",
                 promote_to_multi=True, crs=crs)  # fmt: skip
    return path


def to_wgs84(geoms: list) -> list:
    """The polygons in EPSG:4326 (longitude, latitude), through rasterio.warp.transform_geom."""
    return [shapely.geometry.shape(rasterio.warp.transform_geom(UTM, "EPSG:4326", g.__geo_interface__)) for g in geoms]


def burnt(geoms: list, shape: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    """The whole scene's farmland as rasterize gives it (pixel centres)."""
    return rasterio.features.rasterize([(g, 1) for g in geoms], out_shape=shape, transform=TRANSFORM).astype(bool)


def table(out: Path) -> list[dict]:
    with open(out / "tiles.csv", encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def run(scene: Path | str, labels: Path, out: Path, *extra: str) -> int:
    return make_tiles.main([f"--scene={scene}", f"--labels={labels}", f"--out={out}", f"--tile_size={TILE}", *extra])


def assert_masks(out: Path, expected: np.ndarray, stem: str = "scene") -> None:
    """Every tile's mask is the expected scene mask cut at its row and column; its image is the scene's."""
    rows = [r for r in table(out) if r["tile"].startswith(stem)]
    assert rows
    for row in rows:
        y, x = int(row["row"]), int(row["col"])
        mask = read_image(out / row["mask"])[:, :, 0]
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, expected[y : y + TILE, x : x + TILE], err_msg=row["tile"])


def test_masks_are_the_polygons_burnt_in_and_tiles_keep_their_place(tmp_path: Path) -> None:
    pixels = scene_pixels()
    scene = write_scene(tmp_path / "in" / "scene.tif", pixels)
    labels = write_fields(tmp_path / "vec" / "fields.gpkg", fields_utm())
    before = folder_digest(tmp_path / "in") | folder_digest(tmp_path / "vec")
    assert run(scene, labels, tmp_path / "out", "--tile_stride=24") == 0
    expected = burnt(fields_utm())
    assert 0.1 < expected.mean() < 0.6
    assert_masks(tmp_path / "out", expected)
    rows = table(tmp_path / "out")
    assert [(int(r["row"]), int(r["col"])) for r in rows] == [(y, x) for y in (0, 24, 32) for x in (0, 24, 32)]
    for row in rows:
        y, x = int(row["row"]), int(row["col"])
        image = read_image(tmp_path / "out" / row["image"])
        np.testing.assert_array_equal(image, pixels[:, y : y + TILE, x : x + TILE].transpose(1, 2, 0))
        transform = Affine(*(float(row[k]) for k in "abcdef"))
        assert transform == TRANSFORM @ Affine.translation(x, y)
        assert (row["crs"], row["pixel_size_x"], row["image"]) == (UTM, "2.0", f"images/scene_r{y}c{x}.png")
    assert folder_digest(tmp_path / "in") | folder_digest(tmp_path / "vec") == before  # inputs only read


def test_labels_in_wgs84_are_reprojected_to_the_utm_scene(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "in" / "scene.tif", scene_pixels())
    labels = write_fields(tmp_path / "vec" / "fields.geojson", to_wgs84(fields_utm()), crs="EPSG:4326")
    assert run(scene, labels, tmp_path / "out") == 0
    assert_masks(tmp_path / "out", burnt(fields_utm()))


def test_the_polygons_of_a_geometry_collection_are_burnt_in(tmp_path: Path) -> None:
    geoms = fields_utm()  # a clipping tool's output: a field with a sliver line, and a field on its own
    collection = shapely.GeometryCollection([geoms[2], shapely.LineString(geoms[2].exterior.coords[:2])])
    labels = tmp_path / "vec" / "clipped.gpkg"
    labels.parent.mkdir()
    wkb = np.array(shapely.to_wkb([collection, geoms[0]]), dtype=object)
    write_vector(str(labels), wkb, [], [], geometry_type="Unknown", crs=UTM)
    scene = write_scene(tmp_path / "in" / "scene.tif", scene_pixels())
    assert run(scene, labels, tmp_path / "out") == 0
    assert_masks(tmp_path / "out", burnt([geoms[2], geoms[0]]))


def test_a_layer_of_3d_geometry_collections_is_burnt_in_not_refused(tmp_path: Path) -> None:
    # A clipping tool on 3D parcels writes a "GeometryCollection Z" layer: it was refused as holding no polygons.
    geoms = fields_utm()
    collection = shapely.GeometryCollection([geoms[2], shapely.LineString(geoms[2].exterior.coords[:2])])
    labels = tmp_path / "vec" / "clipped_3d.gpkg"
    labels.parent.mkdir()
    wkb = np.array(shapely.to_wkb(shapely.force_3d([collection, geoms[0]]), output_dimension=3), dtype=object)
    write_vector(str(labels), wkb, [], [], geometry_type="GeometryCollection Z", crs=UTM)
    scene = write_scene(tmp_path / "in" / "scene.tif", scene_pixels())
    assert run(scene, labels, tmp_path / "out") == 0
    assert_masks(tmp_path / "out", burnt([geoms[2], geoms[0]]))


def test_the_filter_keeps_the_cultivated_land_codes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    geoms = fields_utm()
    codes = ["0101", "0701", "0103", "1001"]  # paddy, residential, dry land, water
    labels = write_fields(tmp_path / "vec" / "dltb.shp", geoms, codes)
    scene = write_scene(tmp_path / "in" / "scene.tif", scene_pixels())
    assert run(scene, labels, tmp_path / "out", "--label_where=DLBM LIKE '01%'") == 0
    assert_masks(tmp_path / "out", burnt([geoms[0], geoms[2]]))
    assert "dltb.shp layer dltb: 4 polygons in EPSG:32650, those where DLBM LIKE '01%' used" in caplog.text


def test_labels_covering_the_whole_scene_are_warned_of(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A land-survey layer holds every land-use class: without --label_where every pixel was farmland, silently.
    x0, y0 = TRANSFORM.c, TRANSFORM.f
    halves = [shapely.box(x0 - 10, y0 - 64, x0 + 140, y0 + 10), shapely.box(x0 - 10, y0 - 140, x0 + 140, y0 - 64)]
    labels = write_fields(tmp_path / "vec" / "dltb.gpkg", halves, ["0101", "0701"])  # paddy, residential
    scene = write_scene(tmp_path / "in" / "scene.tif", scene_pixels())
    assert run(scene, labels, tmp_path / "out") == 0
    assert f"{scene}: 100.0% of the valid pixels of its tiles are farmland, expected a mix" in caplog.text
    assert "pick the farmland with --label_where, for example --label_where=\"DLBM LIKE '01%'\"" in caplog.text
    caplog.clear()
    assert run(scene, labels, tmp_path / "out", "--label_where=DLBM LIKE '01%'") == 0
    assert "are farmland, expected a mix" not in caplog.text  # half of it: no warning
    assert_masks(tmp_path / "out", burnt(halves[:1]))


def test_a_full_disk_names_the_out_key_that_chose_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import errno

    import cli
    import files

    class FullDisk:  # what os.fdopen gives on a full disk: a file whose writes fail
        def __init__(self, fd: int, mode: str) -> None:
            os.close(fd)

        def __enter__(self) -> "FullDisk":
            return self

        def __exit__(self, *_: object) -> None:
            pass

        def write(self, data: bytes) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    scene = write_scene(tmp_path / "in" / "scene.tif", scene_pixels())
    labels = write_fields(tmp_path / "vec" / "fields.gpkg", fields_utm())
    monkeypatch.setattr(files.os, "fdopen", FullDisk)
    # make_tiles.py has no --run_dir: the fix named it all the same.
    assert cli.run_main(lambda: run(scene, labels, tmp_path / "out"), output_key="--out") == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "choose another --out," in err and "--run_dir" not in err


def test_a_float_scene_a_little_above_1_gives_tiles_clipped_as_predict_py_clips_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # predict.py clips reflectance a little outside [0, 1] (a bright cloud); make_tiles.py wrote it as it was, and
    # split_dataset.py refused the tile ("floating-point image with values outside [0, 1]").
    pixels = scene_pixels().astype(np.float32) / 255
    pixels[:, :20, :20] = 1.05
    scene = write_scene(tmp_path / "in" / "scene.tif", pixels)
    assert run(scene, write_fields(tmp_path / "vec" / "fields.gpkg", fields_utm()), tmp_path / "out") == 0
    assert "400 pixel(s) of its tiles lie a little outside [0, 1]" in caplog.text
    corner = read_image(tmp_path / "out" / "images" / "scene_r0c0.tif")
    assert corner.max() == 1.0 and np.array_equal(corner[20:, 20:], pixels[:, 20:TILE, 20:TILE].transpose(1, 2, 0))
    run_dir = tmp_path / "run"
    assert split_dataset.main([f"--data_dir={tmp_path / 'out'}", f"--run_dir={run_dir}"]) == 0
    assert "scene_r0c0.tif" in (run_dir / "splits" / "train.txt").read_text(encoding="utf-8") + (
        run_dir / "splits" / "val.txt"
    ).read_text(encoding="utf-8") + (run_dir / "splits" / "test.txt").read_text(encoding="utf-8")


def test_a_float64_scene_gives_float32_tiles_and_a_signed_one_the_command_that_converts_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Float64 reflectance, which predict.py reads, was refused with "gdal_translate -ot UInt16", which truncates
    # every value in [0, 1] to 0 or 1; a signed scene's fix named no file to convert.
    pixels = scene_pixels(bands=4).astype(np.float64) / 255
    labels = write_fields(tmp_path / "vec" / "fields.gpkg", fields_utm())
    assert run(write_scene(tmp_path / "in" / "wide.tif", pixels), labels, tmp_path / "out") == 0
    corner = read_image(tmp_path / "out" / "images" / "wide_r0c0.tif")
    assert corner.dtype == np.float32
    assert np.array_equal(corner, pixels[:, :TILE, :TILE].transpose(1, 2, 0).astype(np.float32))
    signed = write_scene(tmp_path / "in" / "signed.tif", (pixels * 10000).astype(np.int16))
    assert run(signed, labels, tmp_path / "out_signed") == 1
    assert (
        f"pixel type int16 is not supported; expected 8- or 16-bit unsigned, or float in [0, 1]; convert a copy: "
        f"gdal_translate -ot UInt16 {signed} " in caplog.text
    )


@pytest.mark.parametrize("value", ["-0.5", "1.5"])
def test_a_nodata_share_outside_0_to_1_is_refused_before_any_tile(tmp_path: Path, value: str) -> None:
    # -0.5 skipped every tile as "more than -50% nodata", as split_dataset.py, which refuses it, once did.
    scene = write_scene(tmp_path / "in" / "scene.tif", scene_pixels())
    labels = write_fields(tmp_path / "vec" / "fields.gpkg", fields_utm())
    with pytest.raises(ValueError, match=rf"--max_nodata_fraction={value}: expected a share of the pixels from 0 to 1"):
        run(scene, labels, tmp_path / "out", f"--max_nodata_fraction={value}")
    assert not (tmp_path / "out").exists()


def test_mostly_nodata_tiles_are_skipped_and_nodata_written_as_zero(tmp_path: Path) -> None:
    pixels = scene_pixels(bands=4, dtype="uint16")
    pixels[:, :40, :32] = 65535  # the declared nodata: the top-left tile is all nodata, the one below it a quarter
    scene = write_scene(tmp_path / "in" / "scene.tif", pixels, nodata=65535)
    labels = write_fields(tmp_path / "vec" / "fields.gpkg", fields_utm())
    assert run(scene, labels, tmp_path / "out", "--mark_unlabelled=true", "--ignore_index=128") == 0
    rows = {r["tile"]: r for r in table(tmp_path / "out")}
    assert sorted(rows) == ["scene_r0c32", "scene_r32c0", "scene_r32c32"]
    assert rows["scene_r32c0"]["nodata_fraction"] == "0.2500"
    image = read_image(tmp_path / "out" / "images" / "scene_r32c0.tif")
    assert image.dtype == np.uint16 and image.shape == (TILE, TILE, 4)
    assert (image[:8] == 0).all() and np.array_equal(image[8:], pixels[:, 40:64, :32].transpose(1, 2, 0))
    mask = read_image(tmp_path / "out" / rows["scene_r32c0"]["mask"])[:, :, 0]
    assert (mask[:8] == 128).all() and np.array_equal(mask[8:] == 255, burnt(fields_utm())[40:64, :32])
    with rasterio.open(tmp_path / "out" / "images" / "scene_r32c0.tif") as tile:  # georeferenced
        assert tile.crs == UTM and tile.transform == TRANSFORM @ Affine.translation(0, 32)


@pytest.mark.parametrize("bands", [2, 5])
def test_scenes_of_any_band_count_give_tiles_of_the_same_bands(
    tmp_path: Path, bands: int, caplog: pytest.LogCaptureFixture
) -> None:
    pixels = scene_pixels(bands=bands, dtype="uint16")
    scene = write_scene(tmp_path / "in" / "scene.tif", pixels)
    assert run(scene, write_fields(tmp_path / "vec" / "fields.gpkg", fields_utm()), tmp_path / "out") == 0
    rows = table(tmp_path / "out")
    assert len(rows) == 4
    for row in rows:
        y, x = int(row["row"]), int(row["col"])
        image = read_image(tmp_path / "out" / row["image"])
        np.testing.assert_array_equal(image, pixels[:, y : y + TILE, x : x + TILE].transpose(1, 2, 0))
    # The next command says the band count, which every later script needs too.
    assert f"--run_dir=RUN --in_channels={bands} (and --in_channels={bands} on" in caplog.text


def test_tiff_tiles_keep_the_band_names_of_their_scene(tmp_path: Path) -> None:
    named = write_scene(tmp_path / "in" / "named.tif", scene_pixels(bands=4, dtype="uint16"))
    with rasterio.open(named, "r+") as src:
        for band, text in enumerate(["Blue", "Green", "Red", "NIR"], start=1):
            src.set_band_description(band, text)
    write_scene(tmp_path / "in" / "plain.tif", scene_pixels(seed=1, bands=4, dtype="uint16"))
    labels = write_fields(tmp_path / "vec" / "fields.gpkg", fields_utm())
    assert run(f"{named},{tmp_path / 'in' / 'plain.tif'}", labels, tmp_path / "out") == 0
    seen = {}
    for row in table(tmp_path / "out"):
        with rasterio.open(tmp_path / "out" / row["image"]) as tile:
            seen.setdefault(row["image"].split("/")[-1].split("_r")[0], set()).add(tile.descriptions)
    assert seen == {"named": {("Blue", "Green", "Red", "NIR")}, "plain": {(None, None, None, None)}}


def test_tiles_of_a_scene_stay_in_one_split(tmp_path: Path) -> None:
    labels = write_fields(tmp_path / "vec" / "fields.gpkg", fields_utm())
    names = [f"scene{i}" for i in range(5)]
    for i, name in enumerate(names):
        write_scene(tmp_path / "in" / f"{name}.tif", scene_pixels(i))
    assert run(tmp_path / "in", labels, tmp_path / "out") == 0
    assert len(table(tmp_path / "out")) == 5 * 4
    run_dir = tmp_path / "run"
    args = [f"--data_dir={tmp_path / 'out'}", f"--run_dir={run_dir}", r"--group_pattern=^(.+)_r\d+c\d+$"]
    assert split_dataset.main([*args, "--split_ratios=0.6,0.2,0.2"]) == 0
    seen = {}
    for split in ("train", "val", "test"):
        for image, _ in read_pair_list(run_dir / "splits" / f"{split}.txt"):
            seen.setdefault(image.stem.split("_r")[0], set()).add(split)
    assert sorted(seen) == names and all(len(splits) == 1 for splits in seen.values())


def test_a_label_raster_on_another_grid_is_resampled_nearest(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "in" / "scene.tif", scene_pixels())
    rng = np.random.default_rng(3)
    labels = rng.choice(np.array([0, 1, 255], np.uint8), (40, 40), p=[0.5, 0.4, 0.1])
    grid = Affine(4.0, 0.0, TRANSFORM.c - 6.0, 0.0, -4.0, TRANSFORM.f + 10.0)  # 4 m pixels, shifted
    write_scene(tmp_path / "lab" / "labels.tif", labels[None], transform=grid)
    assert (
        run(scene, tmp_path / "lab" / "labels.tif", tmp_path / "out", "--mark_unlabelled=1", "--ignore_index=128") == 0
    )
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    x, y = TRANSFORM @ (cols + 0.5, rows + 0.5)  # each scene pixel's centre, in metres
    nearest = labels[((grid.f - y) // 4).astype(int), ((x - grid.c) // 4).astype(int)]
    expected = np.select([nearest == 1, nearest == 255], [255, 128], 0)
    for row in table(tmp_path / "out"):
        r, c = int(row["row"]), int(row["col"])
        np.testing.assert_array_equal(
            read_image(tmp_path / "out" / row["mask"])[:, :, 0], expected[r : r + TILE, c : c + TILE]
        )


def test_a_label_raster_in_the_scene_folder_is_not_tiled_as_a_scene(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The old code listed the folder's every raster as a scene: the labels were tiled too, a 1-band "scene" of
    # 100 % farmland beside the real one, with a warning for each and a band count the network cannot take.
    write_scene(tmp_path / "in" / "scene.tif", scene_pixels())
    labels = write_scene(tmp_path / "in" / "scene_label.tif", burnt(fields_utm()).astype(np.uint8)[None])
    assert run(tmp_path / "in", labels, tmp_path / "out") == 0
    assert {row["scene"] for row in table(tmp_path / "out")} == {str(tmp_path / "in" / "scene.tif")}
    assert_masks(tmp_path / "out", burnt(fields_utm()))
    assert "the labels lie in a --scene folder; read as the labels, not tiled as a scene" in caplog.text
    # A link to the labels under another name is left out too, and the log names it: it said nothing.
    (tmp_path / "lab").mkdir()
    moved, link = labels.rename(tmp_path / "lab" / "labels.tif"), tmp_path / "in" / "labels_2024.tif"
    os.symlink(moved, link)
    caplog.clear()
    assert run(tmp_path / "in", moved, tmp_path / "out_link") == 0
    assert {row["scene"] for row in table(tmp_path / "out_link")} == {str(tmp_path / "in" / "scene.tif")}
    assert f"{link}: the labels lie in a --scene folder; read as the labels, not tiled as a scene" in caplog.text
    link.unlink()
    moved.rename(labels)
    (tmp_path / "in" / "scene.tif").unlink()
    with pytest.raises(ValueError, match="the folder holds no rasters besides the labels"):
        run(tmp_path / "in", labels, tmp_path / "out")


def test_outside_the_labels_extent_is_unlabelled_when_asked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    scene = write_scene(tmp_path / "in" / "scene.tif", scene_pixels())
    x0, y0 = TRANSFORM.c, TRANSFORM.f
    field = shapely.box(x0 + 10, y0 - 40, x0 + 40, y0 - 10)
    extent = shapely.box(x0, y0 - 64, x0 + 64, y0)  # the layer's extent: the top-left quarter of the scene
    labels = write_fields(tmp_path / "vec" / "fields.gpkg", [field, extent], ["0101", "0701"])
    args = ["--label_where=DLBM = '0101'", "--mark_unlabelled=true", "--ignore_index=128"]
    assert run(scene, labels, tmp_path / "out", *args) == 0
    mask = read_image(tmp_path / "out" / "labels" / "scene_r0c0_mask.png")[:, :, 0]
    assert (mask == np.where(burnt([field])[:32, :32], 255, 0)).all()
    assert (read_image(tmp_path / "out" / "labels" / "scene_r32c32_mask.png") == 128).all()
    assert "--run_dir=RUN --ignore_index=128 (and --ignore_index=128 on" in caplog.text


def test_rerunning_replaces_the_tiles_of_a_scene(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "in" / "scene.tif", scene_pixels())
    labels = write_fields(tmp_path / "vec" / "fields.gpkg", fields_utm())
    assert run(scene, labels, tmp_path / "out") == 0
    assert run(scene, labels, tmp_path / "out", "--tile_stride=16") == 0
    assert len(list((tmp_path / "out" / "images").iterdir())) == len(table(tmp_path / "out")) == 9
    assert run(scene, labels, tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out" / "labels").iterdir()) == [
        f"scene_r{y}c{x}_mask.png" for y in (0, 32) for x in (0, 32)
    ]


def test_rerunning_one_scene_at_another_tile_size_is_refused_while_others_keep_theirs(tmp_path: Path) -> None:
    labels = write_fields(tmp_path / "vec" / "fields.gpkg", fields_utm())
    a = write_scene(tmp_path / "in" / "a.tif", scene_pixels(0))
    b = write_scene(tmp_path / "in" / "b.tif", scene_pixels(1))
    assert run(f"{a},{b}", labels, tmp_path / "out") == 0
    before = folder_digest(tmp_path / "out")
    with pytest.raises(DataError, match=r"tiles.csv: holds tiles of 1 other scene\(s\) of another size, b \(32x32\)"):
        run(a, labels, tmp_path / "out", "--tile_size=16")
    assert folder_digest(tmp_path / "out") == before
    assert run(f"{a},{b}", labels, tmp_path / "out", "--tile_size=16") == 0  # both re-tiled: one size again
    assert {(r["width"], r["height"]) for r in table(tmp_path / "out")} == {("16", "16")}


def test_a_scene_that_fails_at_a_new_tile_size_does_not_keep_its_tiles_of_the_old_one(tmp_path: Path) -> None:
    # b named again at 48 px fails (too small): its 32-px tiles stayed beside a's new 48-px ones in tiles.csv.
    labels = write_fields(tmp_path / "vec" / "fields.gpkg", fields_utm())
    a = write_scene(tmp_path / "in" / "a.tif", scene_pixels(0))
    b = write_scene(tmp_path / "in" / "b.tif", scene_pixels(1)[:, :40, :40])
    assert run(f"{a},{b}", labels, tmp_path / "out") == 0
    assert run(f"{a},{b}", labels, tmp_path / "out", "--tile_size=48") == 1
    assert {(Path(r["scene"]).name, r["width"]) for r in table(tmp_path / "out")} == {("a.tif", "48")}
    assert not list((tmp_path / "out").rglob("b_*"))


def test_a_namesake_from_another_folder_at_a_new_tile_size_is_refused_before_any_tile(tmp_path: Path) -> None:
    # dirB/s.tif is refused as the namesake of dirA/s.tif, whose 32-px tiles stay: t.tif's 48-px ones were cut
    # beside them, and tiles.csv held two sizes.
    labels = write_fields(tmp_path / "vec" / "fields.gpkg", fields_utm())
    first = write_scene(tmp_path / "dirA" / "s.tif", scene_pixels(0))
    namesake = write_scene(tmp_path / "dirB" / "s.tif", scene_pixels(1))
    other = write_scene(tmp_path / "dirB" / "t.tif", scene_pixels(2))
    assert run(f"{first}", labels, tmp_path / "out") == 0
    with pytest.raises(DataError, match=r"holds tiles of 1 other scene\(s\) of another size, s \(32x32\)"):
        run(f"{namesake},{other}", labels, tmp_path / "out", "--tile_size=48")
    assert {(Path(r["scene"]), r["width"]) for r in table(tmp_path / "out")} == {(first.resolve(), "32")}
    assert not list((tmp_path / "out").rglob("t_*"))


# --- bad inputs -------------------------------------------------------------------------------------------


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A scene and a land-survey style layer with farmland and other codes."""
    scene = write_scene(tmp_path / "in" / "scene.tif", scene_pixels())
    labels = write_fields(tmp_path / "vec" / "dltb.gpkg", fields_utm(), ["0101", "0701", "0103", "1001"])
    return scene, labels


def test_a_filter_that_matches_nothing_shows_the_values(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dltb.gpkg: --label_where=\"DLBM LIKE '11%'\" selects none.*'0101'.*'0701'"):
        run(*inputs, tmp_path / "out", "--label_where=DLBM LIKE '11%'")


def write_undeclared_shapefile(path: Path, geoms: list, names: list[str], encoding: str) -> Path:
    """A land-survey Shapefile with DLMC names and no .cpg file, as ArcGIS and Chinese tools export it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    wkb = np.array(shapely.to_wkb(geoms), dtype=object)
    write_vector(str(path), wkb, [np.array(names, dtype=object)], ["DLMC"], geometry_type="MultiPolygon",
                 promote_to_multi=True, crs=UTM, encoding=encoding)  # fmt: skip
    path.with_suffix(".cpg").unlink()
    return path


@pytest.mark.parametrize("encoding", ["GBK", "UTF-8"])
def test_a_shapefile_without_cpg_is_not_filtered_on_garbled_names(tmp_path: Path, encoding: str) -> None:
    geoms = fields_utm()
    labels = write_undeclared_shapefile(
        tmp_path / "vec" / "dltb.shp", geoms, ["水田", "果园", "旱地", "乔木林地"], encoding
    )
    scene = write_scene(tmp_path / "in" / "scene.tif", scene_pixels())
    where = "--label_where=DLMC NOT IN ('果园', '乔木林地')"  # read as ISO-8859-1 it would keep every polygon
    with pytest.raises(
        DataError, match=rf"dltb.shp: .*no .cpg.*'水田' read as {encoding}.*--label_encoding={encoding}"
    ):
        run(scene, labels, tmp_path / "out", where)
    assert not (tmp_path / "out" / "tiles.csv").exists()
    assert run(scene, labels, tmp_path / "out", where, f"--label_encoding={encoding}") == 0
    assert_masks(tmp_path / "out", burnt([geoms[0], geoms[2]]))


@pytest.mark.parametrize("ext", ["gpkg", "shp"])
def test_an_unknown_field_lists_the_fields(inputs: tuple[Path, Path], tmp_path: Path, ext: str) -> None:
    labels = write_fields(tmp_path / "vec" / f"survey.{ext}", fields_utm(), ["0101", "0701", "0103", "1001"])
    with pytest.raises(DataError, match=rf"survey.{ext}: .*names DLMC, not a field.*fields of layer survey are: DLBM"):
        run(inputs[0], labels, tmp_path / "out", "--label_where=DLMC LIKE '01%'")


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_labels_without_a_crs_are_refused(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    labels = write_fields(tmp_path / "vec" / "nocrs.gpkg", fields_utm(), crs=None)
    with pytest.raises(DataError, match=r"nocrs.gpkg: has no CRS"):
        run(inputs[0], labels, tmp_path / "out")


def test_a_label_raster_with_other_values_is_refused(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    values = np.zeros((1, SIZE, SIZE), np.uint8)
    values[0, :3, :3] = [[0, 1, 7], [255, 38, 0], [1, 1, 1]]
    labels = write_scene(tmp_path / "lab" / "labels.tif", values)
    with pytest.raises(DataError, match=r"labels.tif: holds the values \{7, 38\}; expected only 0"):
        run(inputs[0], labels, tmp_path / "out")
    # A classification (1 = farmland, 2 = water) was offered "declare the value as nodata" beside a bare
    # "gdal_calc.py", which leaves the water out of training instead of making it background.
    values[0, :3, :3] = [[0, 1, 2], [2, 1, 0], [1, 1, 1]]
    labels = write_scene(tmp_path / "lab" / "classes.tif", values)
    with pytest.raises(DataError, match=r"classes.tif: holds the values \{2\}; .* class numbers .*--calc=\"A==1\""):
        run(inputs[0], labels, tmp_path / "out")


def test_bad_scenes_are_reported_and_the_others_tiled(
    inputs: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    far = write_scene(tmp_path / "in" / "far.tif", scene_pixels(), transform=Affine(2, 0, 700000, 0, -2, 3500000))
    nocrs = write_scene(tmp_path / "in" / "nocrs.tif", scene_pixels(), crs=None)
    small = write_scene(tmp_path / "in" / "small.tif", scene_pixels()[:, :20, :20])
    odd = Path(os.fsdecode(os.fsencode(tmp_path / "in") + b"/\xb8\xfb.tif"))  # a name in GBK bytes
    shutil.copy(inputs[0], odd)
    scenes = ",".join(str(p) for p in (far, inputs[0], nocrs, small, tmp_path / "in" / "missing.tif", odd))
    assert run(scenes, inputs[1], tmp_path / "out") == 1
    assert r"\xb8\xfb.tif: the file name is not UTF-8" in caplog.text
    assert {r["tile"].split("_r")[0] for r in table(tmp_path / "out")} == {"scene"}
    assert "dltb.gpkg: does not overlap the scene" in caplog.text and "far.tif" in caplog.text
    assert "and the scene (700000.0, 3499872.0, 700128.0, 3500000.0)" in caplog.text  # metres, not 3.5e+06
    assert "nocrs.tif: has no CRS" in caplog.text
    assert "small.tif: is 20x20 pixels, smaller than tile_size=32" in caplog.text
    assert "missing.tif: scene not found" in caplog.text
    # Nothing tiled: no next step offered and no table written.
    caplog.clear()
    assert run(str(tmp_path / "in" / "missing.tif"), inputs[1], tmp_path / "none") == 1
    assert "next:" not in caplog.text and not (tmp_path / "none" / "tiles.csv").exists()


def test_out_inside_an_input_folder_is_refused(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--out=.* lies inside .*in, the folder of .*scene.tif"):
        run(*inputs, tmp_path / "in" / "tiles")
    with pytest.raises(ValueError, match=r"lies inside .*vec, the folder of .*dltb.gpkg"):
        run(*inputs, tmp_path / "vec")
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["scene.tif"]


def test_a_scene_truncated_part_way_leaves_no_tiles_and_the_others_are_tiled(
    inputs: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    big = np.random.default_rng(0).integers(1, 250, (3, 256, 256), dtype=np.uint8)
    truncated = write_scene(tmp_path / "in" / "truncated.tif", big, compress="deflate")
    scene, labels = inputs
    assert run(f"{truncated},{scene}", labels, tmp_path / "out") == 0  # tiled whole first
    whole = truncated.read_bytes()
    truncated.write_bytes(whole[: len(whole) * 6 // 10])  # opens; its last rows cannot be read
    assert run(f"{truncated},{scene}", labels, tmp_path / "out") == 1
    assert f"{truncated}: reading failed part way (" in caplog.text and "IReadBlock failed" in caplog.text
    assert "its tiles were removed, an earlier run's too" in caplog.text
    for sub in ("images", "labels"):
        assert {p.name.split("_r")[0] for p in (tmp_path / "out" / sub).iterdir()} == {"scene"}
    assert {Path(r["scene"]).stem for r in table(tmp_path / "out")} == {"scene"}


def test_out_whose_tile_folders_hold_the_scenes_is_refused(tmp_path: Path) -> None:
    write_scene(tmp_path / "project" / "images" / "a.tif", scene_pixels())
    labels = write_fields(tmp_path / "vec" / "fields.gpkg", fields_utm())
    with pytest.raises(ValueError, match=r"--out=.*project would write its tiles into .*images, where .*images"):
        run(tmp_path / "project" / "images", labels, tmp_path / "project")
    with pytest.raises(ValueError, match=r"would write its tiles into .*labels, where .*x/f.gpkg"):
        run(write_scene(tmp_path / "in" / "b.tif", scene_pixels()), tmp_path / "project" / "labels" / "x" / "f.gpkg",
            tmp_path / "project")  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "project").rglob("*")) == ["a.tif", "images"]


def test_a_scene_of_another_folder_under_a_tiled_name_is_refused_and_its_tiles_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    labels = write_fields(tmp_path / "vec" / "fields.gpkg", fields_utm())
    first = write_scene(tmp_path / "2019" / "a.tif", scene_pixels(0))
    second = write_scene(tmp_path / "2024" / "a.tif", scene_pixels(1))
    assert run(first, labels, tmp_path / "out") == 0
    before = folder_digest(tmp_path / "out" / "images")
    assert run(f"{second},{first}", labels, tmp_path / "out") == 1  # the other goes on
    assert f"{second}: {tmp_path / 'out'} holds the tiles of {first.resolve()}, another scene" in caplog.text
    assert folder_digest(tmp_path / "out" / "images") == before
    assert {r["scene"] for r in table(tmp_path / "out")} == {str(first.resolve())}


def test_several_layers_need_a_choice(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    wkb = np.array(shapely.to_wkb([shapely.box(0, 0, 1, 1)]), dtype=object)
    write_vector(str(inputs[1]), wkb, [], [], layer="XZQ", geometry_type="Polygon", crs=UTM, append=False)
    with pytest.raises(DataError, match=r"dltb.gpkg: holds 2 layers \(dltb, XZQ\); .*--label_layer=dltb"):
        run(*inputs, tmp_path / "out")
    assert run(*inputs, tmp_path / "out", "--label_layer=dltb") == 0


def test_the_next_step_quotes_the_folder_and_warns_of_mixed_band_counts(
    inputs: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_scene(tmp_path / "scenes" / "a.tif", scene_pixels(1, bands=3, dtype="uint16"))
    write_scene(tmp_path / "scenes" / "b.tif", scene_pixels(2, bands=4, dtype="uint16"))
    out = tmp_path / "切片 数据"
    assert run(tmp_path / "scenes", inputs[1], out) == 0
    assert "have different band counts (a.tif: 3 bands, b.tif: 4 bands)" in caplog.text
    assert f"next: python split_dataset.py --data_dir='{out}' --run_dir=RUN" in caplog.text
    assert "--in_channels=4" in caplog.text


def test_a_chinese_field_name_is_asked_for_in_double_quotes(tmp_path: Path) -> None:
    geoms = fields_utm()
    labels = tmp_path / "vec" / "地类图斑.shp"
    labels.parent.mkdir(parents=True)
    wkb = np.array(shapely.to_wkb(geoms), dtype=object)
    codes = np.array(["0101", "0701", "0103", "1001"], dtype=object)
    write_vector(
        str(labels), wkb, [codes], ["地类编码"], geometry_type="MultiPolygon", promote_to_multi=True, crs=UTM,
        encoding="GBK",  # 8 bytes: in UTF-8 the name (12 bytes) would be cut to a Shapefile's 10
    )  # fmt: skip
    scene = write_scene(tmp_path / "in" / "scene.tif", scene_pixels())
    match = r"layer '地类图斑'.*double quotes: \"地类编码\""  # the layer as text, not b'\xe5...'
    with pytest.raises(DataError, match=match):
        run(scene, labels, tmp_path / "out", "--label_where=地类编码 LIKE '01%'")
    with pytest.raises(DataError, match=r"names 地类编玛, not a field of the layer"):
        run(scene, labels, tmp_path / "out", "--label_where=地类编玛 LIKE '01%'")
    assert run(scene, labels, tmp_path / "out", "--label_where=\"地类编码\" LIKE '01%'") == 0
    assert_masks(tmp_path / "out", burnt([geoms[0], geoms[2]]))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # GDAL's note on the cut name, in bytes pyogrio cannot show
def test_a_field_name_cut_inside_a_character_names_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    labels = tmp_path / "vec" / "fields.shp"
    labels.parent.mkdir(parents=True)
    wkb = np.array(shapely.to_wkb(fields_utm()), dtype=object)
    codes = np.array(["0101"] * 4, dtype=object)
    write_vector(str(labels), wkb, [codes], ["图斑面积"], geometry_type="MultiPolygon", promote_to_multi=True, crs=UTM)
    scene = write_scene(tmp_path / "in" / "scene.tif", scene_pixels())
    with pytest.raises(DataError, match=r"fields.shp: holds a field name or text that is not valid UTF-8.*GeoPackage"):
        run(scene, labels, tmp_path / "out")
    gbk = write_undeclared_shapefile(tmp_path / "vec" / "dltb.shp", fields_utm(), ["水田"] * 4, "GBK")
    assert run(scene, gbk, tmp_path / "out", "--label_encoding=UTF-8") == 1  # found as the scene's polygons are read
    assert "dltb.shp: holds a field name or text that is not valid UTF-8, the --label_encoding given" in caplog.text


def test_a_level_1_scene_placed_by_rpcs_is_sent_to_orthorectification(
    inputs: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    l1a = write_rpc_tiff(tmp_path / "in" / "GF2_L1A.tif", scene_pixels())
    assert run(f"{l1a},{inputs[0]}", inputs[1], tmp_path / "out") == 1
    assert "GF2_L1A.tif: has no CRS; expected a georeferenced scene; it is placed only by RPCs" in caplog.text
    assert "gdalwarp -rpc" in caplog.text


def test_the_logged_farmland_share_leaves_out_nodata(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pixels = scene_pixels()
    pixels[:, :, :TILE] = 0  # the left half nodata: half of every tile of the middle column
    scene = write_scene(tmp_path / "in" / "scene.tif", pixels)
    x0, y0 = TRANSFORM.c, TRANSFORM.f
    labels = write_fields(tmp_path / "vec" / "fields.gpkg", [shapely.box(x0, y0 - 2 * SIZE, x0 + 2 * SIZE, y0)])
    assert run(scene, labels, tmp_path / "out", "--tile_stride=16") == 0
    # Kept: the tiles starting at columns 16 and 32 (half and none nodata); every valid pixel is farmland.
    assert "farmland is 100.0% of their valid pixels" in caplog.text


def test_the_next_step_splits_by_scene_only_with_scenes_enough_for_val_and_test(
    inputs: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    assert run(inputs[0], inputs[1], out) == 0
    step = caplog.text.split("next: ")[-1]
    # One scene: split_dataset.py would refuse --group_pattern (no scene left for val and test).
    assert step.startswith(f"python split_dataset.py --data_dir={out} --run_dir=RUN: split by tile, as 1 scene(s)")
    for name in ("b", "c"):  # three scenes tiled into the same folder, one run after another
        write_scene(tmp_path / "in" / f"{name}.tif", scene_pixels(ord(name)))
        caplog.clear()
        assert run(tmp_path / "in" / f"{name}.tif", inputs[1], out) == 0
    assert f"next: python split_dataset.py --data_dir={out} --run_dir=RUN --group_pattern=" in caplog.text
    # On Windows the pattern is double-quoted, as cmd.exe takes it: single quotes were passed on as part of it.
    posix_quoted = files.shell_quoted

    def windows_quoted(text: Path | str) -> str:  # os.name "nt" for the quoting only: pathlib reads it too
        with monkeypatch.context() as windows:
            windows.setattr(files.os, "name", "nt")
            return posix_quoted(text)

    monkeypatch.setattr(files, "shell_quoted", windows_quoted)
    assert make_tiles.next_step(Config(), out, table(out)).endswith(r' --group_pattern="^(.+)_r\d+c\d+$"')


def wal_geopackage(folder: Path, geoms: list, codes: list[str], edited_codes: list[str] | None = None) -> Path:
    """A GeoPackage in WAL mode (as QGIS leaves one) in ``folder``, made read-only; with ``edited_codes``, a later
    edit of its DLBM codes sits in its -wal file (saved, not yet written into the file), as a copy taken while the
    layer was open holds it. Skips the test where this user may write into a read-only folder (root)."""
    import sqlite3

    work = write_fields(folder.parent / "work" / "fields.gpkg", geoms, codes)
    db = sqlite3.connect(work)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    if edited_codes:  # GeoPackage triggers call SpatiaLite functions that plain sqlite3 lacks
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            db.execute(f'DROP TRIGGER "{name}"')
        db.executemany("UPDATE fields SET DLBM = ? WHERE fid = ?", [(c, i + 1) for i, c in enumerate(edited_codes)])
        db.commit()
    folder.mkdir(parents=True)
    for suffix in ("", "-wal") if edited_codes else ("",):
        shutil.copy(f"{work}{suffix}", folder / f"fields.gpkg{suffix}")
    db.close()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        folder.chmod(0o755)
        pytest.skip("this user writes into read-only folders: GDAL opens the GeoPackage writable")
    return folder / "fields.gpkg"


def test_a_wal_geopackage_in_a_read_only_folder_is_read_without_gdal_noise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    scene = write_scene(tmp_path / "in" / "scene.tif", scene_pixels())
    labels = wal_geopackage(tmp_path / "shared", fields_utm(), ["0101"] * 4)
    try:
        before = folder_digest(labels.parent)
        assert run(scene, labels, tmp_path / "out", "--label_where=DLBM LIKE '01%'") == 0
        assert folder_digest(labels.parent) == before
    finally:
        labels.parent.chmod(0o755)
    assert_masks(tmp_path / "out", burnt(fields_utm()))
    assert not [w for w in recwarn if "WAL" in str(w.message)]  # was 4 RuntimeWarnings: "attempt to write a ..."
    assert f"{labels}: a GeoPackage in WAL mode in a folder this user cannot write: read as it stands" in caplog.text
    assert "WARNING" not in caplog.text


def test_changes_left_in_a_read_only_geopackages_wal_file_are_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    scene = write_scene(tmp_path / "in" / "scene.tif", scene_pixels())
    labels = wal_geopackage(tmp_path / "shared", fields_utm(), ["0101"] * 4, edited_codes=["0701"] * 4)
    try:
        assert run(scene, labels, tmp_path / "out", "--label_where=DLBM LIKE '01%'") == 0
    finally:
        labels.parent.chmod(0o755)
    assert not [w for w in recwarn if "WAL" in str(w.message)]
    assert f"{labels}: a GeoPackage in WAL mode with unsaved changes in fields.gpkg-wal" in caplog.text
    assert "it is read as the file stands, without them" in caplog.text


def test_labels_whose_gauss_kruger_eastings_and_crs_disagree_on_the_zone_prefix_name_the_crs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A land-survey layer's eastings carry the zone number 39 (EPSG:4527) but its .prj says EPSG:4548, the same
    # zone without it: the miss was reported with the labels' box as (inf, inf, inf, inf) and no fix.
    shift = Affine.translation(39000000.0 + 10000, 0)  # 39 510 000 m: 10 km east of 117 E in zone 39
    scene = write_scene(
        tmp_path / "影像" / "GF2_某县.tif", scene_pixels(), crs="EPSG:4527", transform=shift @ TRANSFORM
    )
    prefixed = [shapely.affinity.affine_transform(g, [1, 0, 0, 1, shift.c, 0]) for g in fields_utm()]
    labels = write_fields(tmp_path / "三调" / "地类图斑.shp", prefixed, crs="EPSG:4548")
    assert run(scene, labels, tmp_path / "out") == 1
    assert "地类图斑.shp: does not overlap the scene" in caplog.text and "(inf, " not in caplog.text
    assert "the labels cover (39510003.1, 3499873.0, 39510126.0, 3499997.8) in their CRS EPSG:4548" in caplog.text
    assert "eastings from 39510003.1 carry the zone number 39 in front, which its CRS lacks" in caplog.text
    copy = labels.with_name("地类图斑_crs.shp")  # ogr2ogr takes the copy to write first, then the source
    fix = f"ogr2ogr -a_srs EPSG:4527 {files.shell_quoted(copy)} {files.shell_quoted(labels)}"
    assert f"it is probably in EPSG:4527; declare that CRS on a copy ({fix})" in caplog.text
    # A CRS without an EPSG code is named by its PROJ string, quoted in the command as one argument.
    custom = CRS.from_proj4("+proj=tmerc +lat_0=0 +lon_0=117 +k=1 +x_0=500000 +y_0=0 +ellps=WGS84 +units=m +no_defs")
    hint = rasters.zone_prefix_hint(labels, custom, (39510000.0, 3499000.0, 39511000.0, 3500000.0))
    proj = "+proj=tmerc +lat_0=0 +lon_0=117 +k=1 +x_0=39500000 +y_0=0 +ellps=WGS84 +units=m +no_defs"
    assert f"(ogr2ogr -a_srs {files.shell_quoted(proj)} {files.shell_quoted(copy)}" in hint
    caplog.clear()
    # The other way round: eastings without the zone number under a CRS that puts it in front.
    labels = write_fields(tmp_path / "三调" / "无带号.shp", fields_utm(), crs="EPSG:4527")
    assert run(scene, labels, tmp_path / "out") == 1
    assert "eastings from 500003.1 lack the zone number 39 its CRS puts in front" in caplog.text
    assert "it is probably in EPSG:4548" in caplog.text
    # Labels simply elsewhere get no such hint.
    caplog.clear()
    far = [shapely.affinity.affine_transform(g, [1, 0, 0, 1, shift.c + 50000, 0]) for g in fields_utm()]
    assert run(scene, write_fields(tmp_path / "三调" / "远.shp", far, crs="EPSG:4527"), tmp_path / "out") == 1
    assert "does not overlap the scene" in caplog.text and "probably in" not in caplog.text


def test_a_shapefile_copied_without_its_shx_or_dbf_names_the_missing_file(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    # The .shx was reported with GDAL's note alone, and a missing .dbf as "--label_where names DLBM, not a field".
    labels = write_fields(tmp_path / "三调" / "地类图斑.shp", fields_utm())
    labels.with_suffix(".dbf").unlink()
    with pytest.raises(
        DataError, match=r"地类图斑.shp: 地类图斑.dbf \(the attribute table --label_where reads\) is missing"
    ):
        run(inputs[0], labels, tmp_path / "out", "--label_where=DLBM LIKE '01%'")
    labels.with_suffix(".shx").unlink()
    with pytest.raises(DataError, match=r"地类图斑.shp: 地类图斑.shx \(the index of its shapes\) is missing beside it"):
        run(inputs[0], labels, tmp_path / "out")


def test_a_cpg_file_that_says_utf8_over_gbk_text_names_the_encoding_to_give(tmp_path: Path) -> None:
    # Some tools write a .cpg saying UTF-8 beside GBK text: an ASCII filter was then blamed ("fix the filter"), and
    # without one the message spoke of a field name cut inside a character.
    labels = write_undeclared_shapefile(tmp_path / "三调" / "地类图斑.shp", fields_utm(), ["水田"] * 4, "GBK")
    labels.with_suffix(".cpg").write_text("UTF-8", encoding="ascii")
    scene = write_scene(tmp_path / "in" / "scene.tif", scene_pixels())
    expected = (
        r"地类图斑.shp: declares its text UTF-8 \(its 地类图斑.cpg says 'UTF-8'\), but holds text such as "
        r"b'\\xcb\\xae\\xcc\\xef' that is not valid UTF-8 and reads as '水田' in GBK; give --label_encoding=GBK, "
        r"or write GBK into 地类图斑.cpg"
    )
    with pytest.raises(DataError, match=expected):
        run(scene, labels, tmp_path / "out", "--label_where=DLMC LIKE '%'")
    with pytest.raises(DataError, match=expected):
        run(scene, labels, tmp_path / "out", "--label_where=DLMC = '水田'")
    assert run(scene, labels, tmp_path / "out", "--label_where=DLMC = '水田'", "--label_encoding=GBK") == 0
