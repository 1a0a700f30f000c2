"""polygons.py: the minimum mapping unit, strip-by-strip vectorising with seams joined, streamed vector files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from rasterio.crs import CRS
from rasterio.transform import Affine

import polygons
import scene

UTM = CRS.from_epsg(32615)
TRANSFORM = Affine(2.0, 0.0, 500000.0, 0.0, -2.0, 4500000.0)


def write_mask(path: Path, mask: np.ndarray) -> Path:
    profile = dict(driver="GTiff", width=mask.shape[1], height=mask.shape[0], count=1, dtype="uint8")
    with rasterio.open(path, "w", crs=UTM, transform=TRANSFORM, nodata=255, **profile) as dst:
        dst.write(mask, 1)
    return path


def blobs(shape: tuple[int, int], seed: int, cells: int = 6) -> np.ndarray:
    """A speckled mask: smooth noise thresholded, plus salt-and-pepper."""
    rng = np.random.default_rng(seed)
    noise = cv2.resize(rng.random((cells, cells * shape[1] // shape[0])), shape[::-1], interpolation=cv2.INTER_CUBIC)
    mask = (noise > 0.5).astype(np.uint8)
    flips = rng.random(shape) < 0.08
    mask[flips] ^= 1
    return mask


def reference_sieve(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """The sieve over the whole mask at once: what the strips must reproduce."""
    return polygons.sieve_block(mask, min_pixels, False, False)


def test_sieve_by_hand() -> None:
    mask = np.zeros((6, 6), np.uint8)
    mask[0:2, 0:2] = 1  # an island of 4 pixels
    mask[3:6, 2:6] = 1  # a field of 12 pixels with a one-pixel hole
    mask[4, 4] = 0
    mask[0, 5] = 255  # nodata stays
    sieved = polygons.sieve_block(mask, 5, False, False)
    expected = np.zeros((6, 6), np.uint8)
    expected[3:6, 2:6] = 1
    expected[0, 5] = 255
    assert np.array_equal(sieved, expected)
    assert np.array_equal(polygons.sieve_block(mask, 1, False, False), mask)


def test_an_island_among_nodata_is_removed_not_filled_back_as_a_hole() -> None:
    # Two rows of farmland between nodata rows (a striped cloud mask): removed as an island, it came back as a
    # background "hole" and stayed in the sieved mask, while its field was left out for being under the unit.
    mask = np.full((6, 8), 255, np.uint8)
    mask[1:3, :4] = 1  # an island of 8 pixels with nodata around it
    mask[4:6] = 1  # a field of 15 pixels with a one-pixel hole on the scene's edge: still filled
    mask[5, 7] = 0
    sieved = polygons.sieve_block(mask, 10, False, False)
    assert (sieved[1:3, :4] == 0).all() and (sieved[4:6] == 1).all()


def test_a_piece_at_a_cut_edge_is_never_removed() -> None:
    mask = np.zeros((4, 4), np.uint8)
    mask[0, 1] = 1  # one pixel on the top row: it may continue above
    assert polygons.sieve_block(mask, 3, True, False)[0, 1] == 1
    assert polygons.sieve_block(mask, 3, False, False)[0, 1] == 0


@pytest.mark.parametrize("min_pixels", [0, 7, 40])
def test_strips_give_the_sieve_and_fields_of_the_whole_mask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, min_pixels: int
) -> None:
    mask = blobs((150, 90), seed=min_pixels)
    source = write_mask(tmp_path / "mask.tif", mask)
    monkeypatch.setattr(polygons, "STRIP", 16)
    sieved_path = tmp_path / "sieved.tif"
    fields = list(polygons.mask_fields(source, min_pixels, sieved_path))
    expected = reference_sieve(mask, min_pixels)
    with rasterio.open(sieved_path) as src:
        assert np.array_equal(src.read(1), expected)
    n_expected, _ = cv2.connectedComponents((expected == 1).view(np.uint8), connectivity=4)
    assert len(fields) == n_expected - 1  # one polygon per 4-connected farmland piece
    assert sum(f.area for f in fields) == int((expected == 1).sum())
    assert all(f.is_valid for f in fields)
    whole = [piece for _, piece in polygons.strip_pieces(expected, 0).pieces]  # the sieved mask in one strip
    key = lambda g: (g.area, g.bounds)  # noqa: E731
    assert all(shapely.equals(a, b) for a, b in zip(sorted(fields, key=key), sorted(whole, key=key)))
    if min_pixels:
        assert min(f.area for f in fields) >= min_pixels


def test_a_field_spanning_the_whole_scene_is_one_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mask = np.zeros((100, 30), np.uint8)
    mask[:, 0:3] = 1  # a spine from top to bottom
    mask[5::10, 3:25] = 1  # ribs, each crossing no seam or one
    mask[50:53, 10:13] = 0
    source = write_mask(tmp_path / "mask.tif", mask)
    monkeypatch.setattr(polygons, "STRIP", 8)
    (field,) = list(polygons.mask_fields(source, 0))
    assert field.area == mask.sum() and field.is_valid and field.bounds == (0.0, 0.0, 25.0, 100.0)


def test_vector_files_are_streamed_and_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(polygons, "BATCH", 3)  # several batches
    paths = {"geojson": tmp_path / "f.geojson", "gpkg": tmp_path / "f.gpkg"}
    boxes = [shapely.box(i * 10, 0, i * 10 + 5, 5) for i in range(7)]
    with polygons.PolygonWriter(paths, {"field_id": int, "area_ha": float}, UTM) as writer:
        for i, box in enumerate(boxes):
            writer.add(box, field_id=i + 1, area_ha=None if i == 3 else box.area / 1e4)
        assert writer.close() == 7
    for path in paths.values():
        info = pyogrio.read_info(path)
        assert info["features"] == 7 and info["crs"] == "EPSG:32615"
        _, _, geometry, (ids, areas) = pyogrio.raw.read(path)
        assert ids.tolist() == list(range(1, 8)) and np.isnan(areas[3]) and areas[0] == pytest.approx(25e-4)
        assert shapely.equals(shapely.from_wkb(geometry), np.array(boxes, dtype=object)).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.geojson", "f.gpkg"]  # no temporary left


def test_no_fields_gives_empty_readable_files(tmp_path: Path) -> None:
    paths = {"geojson": tmp_path / "f.geojson", "gpkg": tmp_path / "f.gpkg"}
    with polygons.PolygonWriter(paths, {"field_id": int}, None) as writer:
        assert writer.close() == 0
    assert all(pyogrio.read_info(p)["features"] == 0 for p in paths.values())


def test_fields_in_pixel_coordinates_are_not_read_as_degrees(tmp_path: Path) -> None:
    # A GeoJSON file without a crs member is WGS 84 to GDAL and QGIS: pixel coordinates became degrees.
    paths = {"geojson": tmp_path / "f.geojson"}
    with polygons.PolygonWriter(paths, {"field_id": int}, None) as writer:
        writer.add(shapely.box(300, 200, 310, 210), field_id=1)
        writer.close()
    crs = pyogrio.read_info(paths["geojson"])["crs"]
    assert crs.startswith("LOCAL_CS") and "pixel coordinates" in crs


def test_a_failure_leaves_no_file(tmp_path: Path) -> None:
    paths = {"geojson": tmp_path / "f.geojson", "gpkg": tmp_path / "f.gpkg"}
    with pytest.raises(RuntimeError):
        with polygons.PolygonWriter(paths, {"field_id": int}, UTM) as writer:
            writer.add(shapely.box(0, 0, 1, 1), field_id=1)
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_minimum_mapping_unit_in_pixels() -> None:
    assert polygons.min_pixels_for(0.01, 4.0, 0) == 25  # 100 m2 of 4 m2 pixels
    assert polygons.min_pixels_for(0.01, 3.0, 0) == 34  # rounded up: 33.3 pixels are not enough
    assert polygons.min_pixels_for(0.01, None, 12) == 12  # no metres: the pixel count given


def test_overviews_and_style(tmp_path: Path) -> None:
    source = write_mask(tmp_path / "mask.tif", blobs((600, 600), seed=1))
    scene.add_overviews(source, rasterio.enums.Resampling.nearest)
    with rasterio.open(source) as src:
        assert src.overviews(1) == [2, 4]
    style = tmp_path / "mask.qml"
    scene.write_mask_style(style)
    text = style.read_text()
    assert 'type="paletted"' in text and 'value="1" color="#ffdc00"' in text


def test_a_large_field_is_written_a_block_of_coordinates_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(polygons, "LARGE", 3)  # every ring is "large" and written in blocks of 3 points
    field = shapely.Polygon([(0, 0), (10, 0), (10, 10), (0, 10)], [[(2, 2), (4, 2), (4, 4), (2, 4)]])
    paths = {"geojson": tmp_path / "f.geojson", "gpkg": tmp_path / "f.gpkg"}
    with polygons.PolygonWriter(paths, {"field_id": int}, UTM) as writer:
        writer.add(shapely.box(20, 0, 21, 1), field_id=1)
        writer.add(field, field_id=2)
        writer.close()
    for path in paths.values():
        _, _, geometry, (ids,) = pyogrio.raw.read(path)
        assert ids.tolist() == [1, 2] and shapely.equals(shapely.from_wkb(geometry[1]), field)


def fields_in_pixels(folder: Path, mask: np.ndarray, min_field_pixels: int) -> list[int]:
    """The pixel counts of the fields scene.write_fields writes for a mask of a scene without a CRS."""
    profile = {"driver": "GTiff", "width": mask.shape[1], "height": mask.shape[0], "count": 1, "dtype": "uint8"}
    with rasterio.open(folder / "m_seg.tif", "w", nodata=255, **profile) as dst:
        dst.write(mask, 1)
    plain = scene.Scene()
    plain.path, plain.crs, plain.transform = folder / "m.tif", None, Affine.identity()
    outputs = scene.scene_outputs(folder, plain.path) | {"mask": folder / "m_seg.tif"}
    written = scene.write_fields(plain, scene.SceneSettings(min_field_pixels=min_field_pixels), outputs)
    _, _, _, (_, _, pixels) = pyogrio.raw.read(outputs["gpkg"])
    assert written == len(pixels)
    return pixels.tolist()


def test_pieces_of_a_sliver_longer_than_the_halo_cap_are_no_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A unit larger than the halo cap: a 1-pixel sliver of 20 rows (under the unit of 25 pixels) reaches a cut
    # edge in some strips and is wholly seen in others, so pieces of it stay in the sieved mask. In pixel
    # coordinates (no CRS, min_field_pixels) those pieces were written as fields under the unit.
    monkeypatch.setattr(polygons, "STRIP", 8)
    monkeypatch.setattr(polygons, "SIEVE_HALO_CAP", 4)
    mask = np.zeros((60, 12), np.uint8)
    mask[:, 8:] = 1  # a field of 240 pixels
    mask[20:40, 2] = 1  # the sliver
    assert fields_in_pixels(tmp_path, mask, min_field_pixels=25) == [240]


def test_a_piece_of_exactly_the_unit_is_kept_and_one_pixel_less_is_removed() -> None:
    # The unit removes pieces of fewer than min_pixels pixels: a field of exactly 0.01 ha of 4 m2 pixels (25
    # pixels) is a field, and so is a hole of exactly the unit.
    mask = np.zeros((12, 12), np.uint8)
    mask[0:5, 0:5] = 1  # an island of 25 pixels: kept at a unit of 25
    mask[7:12, 0:5] = 1
    mask[7, 0] = 0  # an island of 24 pixels: removed
    sieved = polygons.sieve_block(mask, 25, False, False)
    assert (sieved[0:5, 0:5] == 1).all() and (sieved[7:12, 0:5] == 0).all()
    holes = np.zeros((12, 12), np.uint8)
    holes[0:7, 6:12] = 1
    holes[1:6, 8] = 0  # a hole of 5 pixels: kept at a unit of 5
    holes[8:12, 6:12] = 1
    holes[9:11, 8:10] = 0  # a hole of 4 pixels: filled
    sieved = polygons.sieve_block(holes, 5, False, False)
    assert (sieved[1:6, 8] == 0).all() and (sieved[9:11, 8:10] == 1).all()


def test_a_unit_of_two_pixels_removes_single_pixels() -> None:
    mask = np.zeros((5, 5), np.uint8)
    mask[2, 2] = 1  # a lone pixel
    mask[0, 0:2] = 1  # two pixels: a piece of the unit
    sieved = polygons.sieve_block(mask, 2, False, False)
    assert sieved[2, 2] == 0 and (sieved[0, 0:2] == 1).all()


def test_nodata_in_a_block_of_farmland_stays_nodata() -> None:
    # Outside the pieces lies everything else (component label 0): never a piece itself, even with fewer pixels
    # than the unit (a nodata pixel in a block of farmland would become background, then a filled hole).
    mask = np.ones((6, 6), np.uint8)
    mask[3, 3] = 255
    sieved = polygons.sieve_block(mask, 5, False, False)
    assert sieved[3, 3] == 255 and (sieved[mask == 1] == 1).all()


def test_a_sliver_across_a_seam_is_sieved_as_in_the_whole_mask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 1-pixel wide sliver of 8 rows (under a unit of 10) across the seam at row 8: each strip must see all of it
    # in its halo (min_pixels rows), or the second strip finds it reaching its cut edge and keeps rows 8 and 9.
    monkeypatch.setattr(polygons, "STRIP", 8)
    mask = np.zeros((32, 6), np.uint8)
    mask[2:10, 2] = 1
    source = write_mask(tmp_path / "mask.tif", mask)
    with rasterio.open(source) as src:
        sieved = np.concatenate([rows for _, rows in polygons.sieved_strips(src, 10)])
    assert not sieved.any() and list(polygons.mask_fields(source, 10)) == []


def test_a_field_of_exactly_the_unit_is_written(tmp_path: Path) -> None:
    # min_field_pixels=25: a field of 25 pixels is kept by the sieve and must be written too; 24 pixels are not.
    mask = np.zeros((12, 12), np.uint8)
    mask[0:5, 0:5] = 1
    mask[7:12, 0:5] = 1
    mask[7, 0] = 0
    assert fields_in_pixels(tmp_path, mask, min_field_pixels=25) == [25]


def parcels_a_pixel_apart(size: int = 80, seed: int = 3) -> np.ndarray:
    """Farmland parcels separated by winding one-pixel lines of background (ridges, ditches), 4 apart."""
    rng = np.random.default_rng(seed)
    mask = np.ones((size, size), np.uint8)
    for start in (25, 55):
        x = y = start
        for i in range(size):
            dx, dy = rng.integers(-1, 2, 2)
            mask[i, min(x, x + dx) : max(x, x + dx) + 1] = 0
            mask[min(y, y + dy) : max(y, y + dy) + 1, i] = 0
            x, y = x + dx, y + dy
    return mask


def test_a_simplification_that_can_make_neighbours_overlap_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Each outline is simplified on its own: with a tolerance above a pixel, parcels a pixel apart overlapped in the
    # GeoPackage (a topology error in GIS, and their areas counted twice) without a word.
    source = write_mask(tmp_path / "m_seg.tif", parcels_a_pixel_apart())
    plain = scene.Scene()
    plain.path, plain.crs, plain.transform = tmp_path / "m.tif", UTM, TRANSFORM
    outputs = scene.scene_outputs(tmp_path, plain.path) | {"mask": source}
    overlaps = {}
    for tolerance in (2.0, 5.0):  # one pixel of 2 m, and 2.5 pixels
        caplog.clear()
        scene.write_fields(plain, scene.SceneSettings(simplify_tolerance=tolerance), outputs)
        _, _, wkb, _ = pyogrio.raw.read(outputs["gpkg"])
        fields = shapely.from_wkb(wkb)
        assert shapely.is_valid(fields).all()
        pairs = shapely.STRtree(fields).query(fields, predicate="intersects")
        overlaps[tolerance] = sum(fields[i].intersection(fields[j]).area for i, j in pairs.T if i < j)
        warned = "--simplify_tolerance" in caplog.text
        assert warned == (tolerance > 2.0), caplog.text
    assert overlaps[2.0] == 0 and overlaps[5.0] > 0
    assert "m.tif: --simplify_tolerance=5 is 2.5 pixels (2 CRS units each)" in caplog.text
    assert "give at most one pixel (2)" in caplog.text
    assert polygons.simplification_overlap(0.0, TRANSFORM) == ""


def test_fields_of_a_south_up_grid_follow_the_right_hand_rule_as_north_up_ones_do(tmp_path: Path) -> None:
    # RFC 7946: outer rings counter-clockwise, holes clockwise. The fields of a bottom-up raster (positive y pixel
    # size) came out the other way round, which GeoJSON readers that go by the winding (d3) fill inside out.
    mask = np.zeros((30, 40), np.uint8)
    mask[3:20, 4:30] = 1
    mask[8:12, 10:14] = 0  # a pond
    mask[22:28, 5:9] = 1
    south_up = Affine(TRANSFORM.a, 0, TRANSFORM.c, 0, -TRANSFORM.e, TRANSFORM.f + TRANSFORM.e * mask.shape[0])
    for name, transform, rows in (("north", TRANSFORM, mask), ("south", south_up, mask[::-1])):
        path = write_mask(tmp_path / f"{name}_seg.tif", np.ascontiguousarray(rows))
        with rasterio.open(path, "r+") as dst:
            dst.transform = transform
        plain = scene.Scene()
        plain.path, plain.crs, plain.transform = tmp_path / f"{name}.tif", UTM, transform
        outputs = scene.scene_outputs(tmp_path, plain.path) | {"mask": path}
        for tolerance in (0.0, 2.0):
            scene.write_fields(plain, scene.SceneSettings(simplify_tolerance=tolerance), outputs)
            for kind in ("geojson", "gpkg"):
                fields = shapely.from_wkb(pyogrio.raw.read(outputs[kind])[2])
                assert len(fields) == 2 and sum(len(f.interiors) for f in fields) == 1
                assert all(f.exterior.is_ccw for f in fields), (name, kind)
                assert not any(ring.is_ccw for f in fields for ring in f.interiors), (name, kind)
