"""Farmland change between two dates: the classes on arrays, the confidence margin, the edge tolerance, the
minimum mapping unit, strips against whole arrays, shifted and reprojected after-scenes, nodata, the outputs of
change.py, re-runs, pairs of folders, bad pairs, the score against a true change map and the demo pair."""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.features
import rasterio.warp
import torch
from conftest import close_log_files, spread_probabilities_
from conftest import write_geotiff as geotiff
from rasterio.transform import Affine

import change
import change_detection as cd
import demo_data
import files
import scene
from config import Config
from data_preprocess import write_image
from files import DataError
from net_structure import build_model

CRS = "EPSG:32615"
TRANSFORM = Affine(2.0, 0.0, 500000.0, 0.0, -2.0, 4500000.0)  # 2 m pixels: 4 m2 each
HEIGHT, WIDTH = 120, 150
RULE = cd.ChangeRule(threshold=0.5, margin=0.2)


def percent(rows: list[list[int]]) -> np.ndarray:
    return np.array(rows, np.uint8)


def date(probability: np.ndarray, rule: cd.ChangeRule = RULE) -> cd.Date:
    """A hand-made date: its probability in percent and the mask scene.py cuts at the rule's threshold (from a
    probability that is a whole percent; nodata kept)."""
    mask = np.where(probability > 100, 255, probability > 100 * rule.threshold).astype(np.uint8)
    return cd.Date(mask, probability)


def codes_of(before: np.ndarray, after: np.ndarray, rule: cd.ChangeRule = RULE) -> list:
    return cd.change_codes(date(before, rule), date(after, rule), rule).tolist()


write_geotiff = functools.partial(geotiff, crs=CRS, transform=TRANSFORM)  # this module's scenes


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


# --- the classes on arrays ------------------------------------------------------------------------------


def test_classes_of_hand_made_probabilities() -> None:
    before = percent([[90, 90, 10, 10, 60, 255, 80]])
    after = percent([[85, 10, 95, 5, 40, 90, 255]])
    assert codes_of(before, after) == [[1, 2, 3, 0, 0, 255, 255]]
    # 60 -> 40 is flicker around the threshold, not change: stable, farmland by the mean (50 is not above 0.5).
    assert cd.stable_codes(date(percent([[60, 60]])), date(percent([[40, 41]])), RULE).tolist() == [[0, 1]]


def test_the_confidence_margin() -> None:
    before = percent([[70, 69, 71, 60, 30, 30]])
    after = percent([[30, 30, 31, 40, 70, 69]])
    assert codes_of(before, after) == [[2, 0, 1, 0, 3, 0]]  # 70/30 inclusive
    no_margin = cd.ChangeRule(threshold=0.5, margin=0.0)
    assert codes_of(before, after, no_margin) == [[2, 2, 2, 2, 3, 3]]
    assert codes_of(percent([[50]]), percent([[49]]), no_margin) == [[0]]  # 50 is not farmland
    # A tuned threshold moves the centre: t = 0.3 with margin 0.2 asks for >= 50 and <= 10.
    tuned = cd.ChangeRule(threshold=0.3, margin=0.2)
    assert codes_of(percent([[50, 50]]), percent([[10, 11]]), tuned) == [[2, 1]]
    with pytest.raises(ValueError, match="change_margin=0.5: expected 0 to below 0.5"):
        cd.ChangeRule(margin=0.5).check()
    cd.ChangeRule(threshold=0.3, margin=0.3).check()  # background at most 0: still possible
    with pytest.raises(ValueError, match=r"change_margin=0.35 with the threshold 0.3: .* at most -0.05 .* nothing"):
        cd.ChangeRule(threshold=0.3, margin=0.35).check()


def test_the_masks_decide_and_the_margin_compares_whole_percents() -> None:
    # At t = 0.56, 0.5601 to 0.565 is farmland in the mask and written as 56 % in the probability GeoTIFF.
    rule = cd.ChangeRule(threshold=0.56, margin=0.2)
    assert rule.percent_cuts() == (76, 36, 112)  # P >= 76, P <= 36, sum > 112 (100 * 0.76 is 76.00000000000001)
    before = cd.Date(np.array([[1, 1, 1, 1, 0]], np.uint8), percent([[56, 76, 75, 76, 56]]))
    after = cd.Date(np.array([[1, 0, 0, 0, 0]], np.uint8), percent([[56, 36, 36, 37, 55]]))
    codes = cd.change_codes(before, after, rule)
    # Farmland at both dates by the masks (not background by a mean of 56 %); 76 % (0.755 rounds to it) is at
    # least 76; 75 % is not, nor 37 % at most 36: those two are stable by the mean of the percents.
    assert codes.tolist() == [[1, 2, 0, 1, 0]]
    counts = cd.ChangeCounts()
    counts.add(codes, before, after, rule)
    assert (counts.farmland_before, counts.farmland_after, counts.disagree, counts.sure) == (4, 1, 3, 1)
    # Margin 0: the masks alone, even with a threshold between two percents (0.5531 is farmland, written 55).
    loose = cd.ChangeRule(threshold=0.553, margin=0.0)
    one = lambda mask, p: cd.Date(np.array([[mask]], np.uint8), percent([[p]]))
    assert cd.change_codes(one(1, 55), one(0, 55), loose).tolist() == [[2]]
    assert cd.change_codes(one(0, 55), one(1, 55), loose).tolist() == [[3]]


def test_a_margin_that_hides_most_change_by_the_threshold_is_told() -> None:
    # A briefly trained network: probabilities mostly within 0.3 to 0.7, so the dates disagree but seldom surely.
    before = percent([[65, 62, 40, 58, 66, 61, 42, 57, 90, 20] * 10])
    after = percent([[35, 38, 60, 42, 34, 39, 58, 43, 10, 20] * 10])
    counts = cd.ChangeCounts()
    counts.add(cd.change_codes(date(before), date(after), RULE), date(before), date(after), RULE)
    assert (counts.valid, counts.disagree, counts.sure, counts.lost, counts.gained) == (100, 90, 10, 10, 0)
    assert cd.margin_hides_change(counts)  # 10 of the 90 pixels that differ by the threshold pass the margin
    told = cd.margin_warning("a_to_b", counts, RULE)
    assert "90.0% of the valid pixels" in told and "only 10.0% pass" in told and "leave 0.3 to 0.7" in told
    assert "(for example 0.1)" in told
    # Already at 0.1, the margin to try is a smaller one, not the one just used; the cut is shown as it is (0.435).
    told = cd.margin_warning("a_to_b", counts, cd.ChangeRule(threshold=0.435, margin=0.1))
    assert "--change_margin=0.1)" in told and "(for example 0.05)" in told
    assert "threshold 0.435," in told and "leave 0.335 to 0.535" in told
    before[0, 0::10], after[0, 0::10], before[0, 1::10], after[0, 1::10] = 90, 10, 80, 20  # two more sure losses
    sure = cd.ChangeCounts()
    sure.add(cd.change_codes(date(before), date(after), RULE), date(before), date(after), RULE)
    assert (sure.disagree, sure.sure) == (90, 30) and not cd.margin_hides_change(sure)
    # Sure change the minimum mapping unit removes (specks) is not the margin's doing: no warning.
    specks = cd.ChangeCounts()
    before, after = np.full((20, 20), 95, np.uint8), np.full((20, 20), 95, np.uint8)
    after[::4, ::4] = 5
    rule = cd.ChangeRule(margin=0.2, min_pixels=4)
    specks.add(cd.classify_block(date(before), date(after), rule), date(before), date(after), rule)
    assert (specks.disagree, specks.sure, specks.lost) == (25, 25, 0) and not cd.margin_hides_change(specks)


def test_edge_tolerance_absorbs_a_field_edge_moved_by_misregistration() -> None:
    before, after = np.full((30, 60), 5, np.uint8), np.full((30, 60), 5, np.uint8)
    before[5:25, 10:30] = 95
    after[5:25, 12:32] = 95  # the same field, 2 pixels to the east
    before[5:25, 45:55] = 95  # a field really lost, far from the after date's farmland
    codes = cd.classify_block(date(before), date(after), RULE)
    assert (codes[5:25, 10:12] == cd.LOST).all() and (codes[5:25, 30:32] == cd.GAINED).all()
    tolerant = cd.classify_block(date(before), date(after), cd.ChangeRule(margin=0.2, edge_tolerance=2))
    assert not np.isin(tolerant[:, :40], [cd.LOST, cd.GAINED]).any()
    assert (tolerant[5:25, 45:55] == cd.LOST).all()
    assert (tolerant[5:25, 44:46] == codes[5:25, 44:46]).all()


def test_edge_tolerance_is_the_same_distance_in_every_direction() -> None:
    # Lost pixels at (2, 1) and (1, 2) pixels from the after date's farmland: both sqrt(5) > 2 away, both kept.
    before, after = np.full((21, 21), 5, np.uint8), np.full((21, 21), 5, np.uint8)
    after[10, 10] = 95
    before[12, 11] = before[11, 12] = before[8, 10] = 95  # the last one 2 pixels north: absorbed
    rule = cd.ChangeRule(margin=0.2, edge_tolerance=2)
    codes = cd.classify_block(date(before), date(after), rule)
    assert (codes[12, 11], codes[11, 12], codes[8, 10]) == (cd.LOST, cd.LOST, cd.STABLE_BACKGROUND)
    assert np.array_equal(codes, cd.classify_block(date(before.T.copy()), date(after.T.copy()), rule).T)


def test_minimum_mapping_unit_sends_small_patches_back_to_stable() -> None:
    before, after = np.full((20, 40), 90, np.uint8), np.full((20, 40), 90, np.uint8)
    after[2:5, 2:5] = 20  # 9 pixels lost
    after[10:16, 10:16] = 20  # 36 pixels lost
    before[2:4, 30:34] = 20  # 8 pixels gained
    codes = cd.classify_block(date(before), date(after), cd.ChangeRule(margin=0.2, min_pixels=10))
    assert (codes[10:16, 10:16] == cd.LOST).all() and np.count_nonzero(codes == cd.LOST) == 36
    assert codes[2, 2] == cd.STABLE_FARMLAND  # mean of 90 and 20 is above 50
    assert codes[2, 30] == cd.STABLE_FARMLAND and not (codes == cd.GAINED).any()


def smooth_probabilities(seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Percent farmland probability: blurred blobs, mostly confident, with ramps at the edges."""
    rng = np.random.default_rng(seed)
    field = np.zeros((height, width), np.float32)
    for _ in range(14):
        y, x = rng.integers(0, height), rng.integers(0, width)
        field[max(0, y - 12) : y + int(rng.integers(6, 20)), max(0, x - 10) : x + int(rng.integers(6, 24))] = 1
    return np.rint(cv2.GaussianBlur(field, (0, 0), 2.0) * 96 + 2).astype(np.uint8)


def write_date(folder: Path, name: str, probability: np.ndarray, **profile) -> cd.Date:
    """A hand-made date as scene.py leaves it: ``<name>_seg.tif`` (date's mask) and ``<name>_prob.tif``."""
    arrays = date(probability)
    return cd.Date(
        *(write_geotiff(folder / f"{name}_{kind}.tif", a[None], **profile) for kind, a in zip(("seg", "prob"), arrays))
    )


def test_strip_by_strip_equals_the_whole_arrays(tmp_path: Path) -> None:
    before, after = smooth_probabilities(1), smooth_probabilities(2)
    before[:20, :30] = 255
    rule = cd.ChangeRule(margin=0.2, edge_tolerance=2, min_pixels=40)
    paths = {name: write_date(tmp_path, name, p) for name, p in (("b", before), ("a", after))}
    with cd.open_dates(paths["b"], paths["a"], True) as (b, a):
        strips = list(cd.change_strips(b, a, rule, strip=16))
    whole = cd.classify_block(date(before), date(after), rule)
    assert np.array_equal(np.concatenate([codes for _, codes, _, _ in strips]), whole)
    assert np.isin(whole, [cd.LOST, cd.GAINED]).sum() > 200  # the case is not empty
    assert (whole[:20, :30] == 255).all()


def test_patches_cut_by_strip_seams_are_joined_with_their_mean_probabilities(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    codes = np.zeros((40, 30), np.uint8)
    codes[2:30, 3:6] = codes[2:30, 12:15] = codes[27:30, 3:15] = cd.LOST  # a U across four strips of 8 rows
    codes[10:14, 20:24] = codes[14:18, 24:28] = cd.GAINED  # two patches meeting at a corner, on a seam
    codes[33:39, 3:9] = cd.LOST
    codes[35, 5] = cd.STABLE_FARMLAND  # a hole
    rng = np.random.default_rng(0)
    before, after = rng.integers(0, 101, codes.shape, np.uint8), rng.integers(0, 101, codes.shape, np.uint8)
    paths = [write_geotiff(tmp_path / f"{n}.tif", a[None]) for n, a in (("c", codes), ("b", before), ("a", after))]
    monkeypatch.setattr(cd, "STRIP", 8)
    with rasterio.open(paths[0]) as c, rasterio.open(paths[1]) as b, rasterio.open(paths[2]) as a:
        patches = list(cd.change_patches(c, b, a))
    assert sorted((code, int(sums[2])) for code, (_, sums) in patches) == [(2, 35), (2, 186), (3, 16), (3, 16)]
    for code, (polygon, sums) in patches:
        inside = rasterio.features.geometry_mask([polygon], codes.shape, Affine.identity(), invert=True)
        assert (codes[inside] == code).all() and polygon.area == inside.sum() == sums[2]
        assert (sums[0], sums[1]) == (before[inside].sum(), after[inside].sum())


# --- the two grids ---------------------------------------------------------------------------------------


def changed_map(tmp_path: Path, after: cd.Date, aligned: bool) -> np.ndarray:
    before = cd.Date(tmp_path / "before_seg.tif", tmp_path / "before_prob.tif")
    target = tmp_path / f"{after.probability.stem}_change.tif"
    cd.write_change_map(before, after, aligned, cd.ChangeRule(margin=0.2, min_pixels=10), target)
    return read(target)


def test_shifted_and_reprojected_after_probabilities_give_the_aligned_change_map(tmp_path: Path) -> None:
    before, after = smooth_probabilities(1), smooth_probabilities(2)
    write_date(tmp_path, "before", before, nodata=255)
    aligned = changed_map(tmp_path, write_date(tmp_path, "after", after, nodata=255), True)
    # Shifted: the after raster starts 12 columns east and 8 rows south and runs 10 columns past the before's.
    shifted = np.pad(after[8:, 12:], ((0, 0), (0, 10)), constant_values=5)
    moved = TRANSFORM @ Affine.translation(12, 8)
    shifted_map = changed_map(tmp_path, write_date(tmp_path, "shifted", shifted, nodata=255, transform=moved), False)
    assert np.array_equal(shifted_map[8:, 12:], aligned[8:, 12:])
    assert (shifted_map[:8] == 255).all() and (shifted_map[:, :12] == 255).all()  # outside the overlap
    # Reprojected: Web Mercator with 1.5 m pixels, resampled (bilinear) there and back.
    dst_crs = "EPSG:3857"
    transform, width, height = rasterio.warp.calculate_default_transform(
        CRS, dst_crs, WIDTH, HEIGHT, *rasterio.transform.array_bounds(HEIGHT, WIDTH, TRANSFORM), resolution=1.5
    )
    warped = np.full((height, width), 255, np.uint8)
    rasterio.warp.reproject(
        after,
        warped,
        src_transform=TRANSFORM,
        src_crs=CRS,
        dst_transform=transform,
        dst_crs=dst_crs,
        resampling=rasterio.warp.Resampling.bilinear,
        dst_nodata=255,
    )
    mercator = write_date(tmp_path, "mercator", warped, crs=dst_crs, transform=transform, nodata=255)
    mercator_map = changed_map(tmp_path, mercator, False)
    inner = (slice(6, -6), slice(6, -6))
    assert (mercator_map[inner] == aligned[inner]).mean() > 0.98
    assert (mercator_map[inner] != 255).all()
    for code in (cd.LOST, cd.GAINED):
        assert abs(np.count_nonzero(mercator_map == code) / np.count_nonzero(aligned == code) - 1) < 0.1


# --- change.py on scenes -----------------------------------------------------------------------------------


def scene_pixels(seed: int, moved: bool = False) -> np.ndarray:
    """(3, HEIGHT, WIDTH) uint8: dark noise with bright rectangles; ``moved`` drops three and adds two."""
    rng = np.random.default_rng(seed)
    image = (rng.random((3, HEIGHT, WIDTH)) * 60 + 1).astype(np.uint8)
    boxes = [
        (rng.integers(0, HEIGHT - 40), rng.integers(0, WIDTH - 40), rng.integers(20, 40), rng.integers(20, 40))
        for _ in range(8)
    ]
    for y, x, h, w in boxes[3:] if moved else boxes[:6]:
        image[:, y : y + h, x : x + w] += 150
    return image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A width-8 random network whose output layer is rescaled so that its probabilities spread over (0, 1)."""
    torch.manual_seed(0)
    model = build_model(3, 2, 8, 0.3).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(scene_pixels(1)[None, :, :112, :144].astype(np.float32) / 255))
        spread_probabilities_(model, logits)
    path = tmp_path_factory.mktemp("checkpoint") / "net.pth"
    config = {"in_channels": 3, "n_classes": 2, "base_width": 8, "dropout": 0.3}
    torch.save({"model": model.state_dict(), "config": config, "epoch": 1}, path)
    return path


def run_change(run_dir: Path, checkpoint: Path, before: Path, after: Path, *extra: str) -> int:
    code = change.main(
        [
            f"--run_dir={run_dir}",
            f"--checkpoint={checkpoint}",
            f"--before={before}",
            f"--after={after}",
            "--amp=off",
            "--window=128",
            "--overlap=32",
            "--min_field_area_ha=0.004",  # 10 pixels of 4 m2
            *extra,
        ]
    )
    close_log_files()
    return code


def test_a_pair_of_scenes_gives_map_polygons_table_and_figure(checkpoint: Path, tmp_path: Path) -> None:
    image = scene_pixels(1)
    image[:, :20, :30] = 0  # nodata in the before scene
    before = write_geotiff(tmp_path / "in" / "farm_2019.tif", image, nodata=0)
    after = write_geotiff(tmp_path / "in" / "farm_2024.tif", scene_pixels(1, moved=True), nodata=0)
    run_dir = tmp_path / "run"
    assert run_change(run_dir, checkpoint, before, after) == 0
    out = change.pair_outputs(run_dir, "farm_2019_to_farm_2024")
    with rasterio.open(out["change"]) as src:
        codes = src.read(1)
        assert (src.crs.to_string(), src.transform, src.shape) == (CRS, TRANSFORM, (HEIGHT, WIDTH))
        assert src.colormap(1)[cd.LOST][:3] == cd.CHANGE_COLOURS[cd.LOST][:3] and src.nodata == 255
    assert (codes[:20, :30] == 255).all() and set(np.unique(codes)) <= {0, 1, 2, 3, 255}
    row = json.loads(out["json"].read_text(encoding="utf-8"))
    assert row["lost_pixels"] == np.count_nonzero(codes == cd.LOST) > 0
    assert row["gained_pixels"] == np.count_nonzero(codes == cd.GAINED) > 0
    assert row["lost_ha"] == pytest.approx(row["lost_pixels"] * 4 / 1e4)
    assert row["net_ha"] == pytest.approx(row["gained_ha"] - row["lost_ha"])
    assert row["valid_pixels"] == HEIGHT * WIDTH - 20 * 30
    meta, _, _, (_, kinds, areas, pixels, prob_before, prob_after) = pyogrio.raw.read(out["gpkg"])
    assert list(meta["fields"]) == ["patch_id", "change", "area_ha", "pixels", "prob_before", "prob_after"]
    lost = kinds == "lost"
    assert areas[lost].sum() == pytest.approx(row["lost_ha"]) and pixels[~lost].sum() == row["gained_pixels"]
    assert (prob_before[lost] >= 0.7).all() and (prob_after[lost] <= 0.3).all()
    assert (prob_before[~lost] <= 0.3).all() and (prob_after[~lost] >= 0.7).all()
    features = json.loads(out["geojson"].read_text(encoding="utf-8"))["features"]
    assert len(features) == row["lost_patches"] + row["gained_patches"] == len(kinds)
    assert 'type="paletted"' in out["style"].read_text(encoding="utf-8")
    assert out["figure"].stat().st_size > 10_000
    with open(run_dir / "change" / "change_area.csv", encoding="utf-8-sig") as handle:
        (table_row,) = csv.DictReader(handle)
    assert table_row["pair"] == "farm_2019_to_farm_2024" and float(table_row["lost_ha"]) == row["lost_ha"]
    made_by = [table_row[k] for k in ("model", "epoch", "threshold", "change_margin")]
    assert made_by == [str(checkpoint), "1", "0.5", "0.2"]  # the epoch the fixture saved, the default cut


def test_the_change_figure_shows_the_rgb_bands(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_geotiff(tmp_path / "in" / "a.tif", scene_pixels(1))
    with scene.open_scene(source, (), 3) as opened:
        grid, shape = cd.grid_of(opened), cd.preview_shape(opened.height, opened.width)
        first_three = cd.photo_preview(opened, grid, True, shape)
        reversed_bands = cd.photo_preview(opened, grid, True, shape, (2, 1, 0))
        grey = cd.photo_preview(opened, grid, True, shape, (1,))
    assert first_three.shape == (*shape, 3) and first_three.std(axis=(0, 1)).min() > 0.1
    assert np.array_equal(reversed_bands, first_three[:, :, ::-1])
    assert np.array_equal(grey, np.repeat(first_three[:, :, 1:2], 3, axis=2))
    drawn = []
    monkeypatch.setattr(cd, "write_change_figure", lambda *given: drawn.append(given[-1]))
    after = write_geotiff(tmp_path / "in" / "b.tif", scene_pixels(1, moved=True))
    assert run_change(tmp_path / "run", checkpoint, source, after, "--rgb_bands=3,2,1") == 0
    assert drawn == [(2, 1, 0)]


def test_the_change_figure_shows_a_float_scene_with_a_nodata_value_outside_zero_to_one(tmp_path: Path) -> None:
    # -9999 around float reflectance, as the dates' prediction takes it: black in the figure, not a refusal.
    image = (scene_pixels(1) / 255).astype(np.float32)
    image[:, :20, :30] = -9999
    source = write_geotiff(tmp_path / "in" / "float.tif", image, nodata=-9999)
    with scene.open_scene(source, (), 3) as opened:
        shape = cd.preview_shape(opened.height, opened.width)
        photo = cd.photo_preview(opened, cd.grid_of(opened), True, shape)
    assert photo.shape == (*shape, 3) and (photo[:10, :15] == 0).all() and photo[30:].std() > 0.1


def test_a_rerun_skips_finished_pairs_and_redoes_them_for_a_new_checkpoint_or_setting(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    own = Path(tmp_path / "net.pth")
    own.write_bytes(checkpoint.read_bytes())
    before = write_geotiff(tmp_path / "in" / "a.tif", scene_pixels(1))
    after = write_geotiff(tmp_path / "in" / "b.tif", scene_pixels(1, moved=True))
    run_dir = tmp_path / "run"
    assert run_change(run_dir, own, before, after) == 0
    out = change.pair_outputs(run_dir, "a_to_b")
    probability = change.date_outputs(run_dir, "a_to_b", "before")["probability"]
    made = {p: p.stat().st_mtime_ns for p in [*out.values(), probability]}
    assert run_change(run_dir, own, before, after) == 0
    assert "1 of 1 pair(s) already have their change outputs" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in made} == made
    assert run_change(run_dir, own, before, after, "--change_margin=0.3") == 0  # another setting: the change only
    assert out["change"].stat().st_mtime_ns > made[out["change"]]
    assert probability.stat().st_mtime_ns == made[probability]
    # A new unit shapes the change patches only, not the dates: they were predicted again (a record of an earlier
    # version, which kept the unit and simplification, too).
    record = change.date_outputs(run_dir, "a_to_b", "before")["record"]
    fields = {"min_field_area_ha": 0.004, "min_field_pixels": 0, "simplify_tolerance": 0.0}
    record.write_text(json.dumps(json.loads(record.read_text(encoding="utf-8")) | fields), encoding="utf-8")
    changed = out["change"].stat().st_mtime_ns
    assert run_change(run_dir, own, before, after, "--change_margin=0.3", "--min_field_area_ha=0.04") == 0
    assert out["change"].stat().st_mtime_ns > changed
    assert probability.stat().st_mtime_ns == made[probability]
    assert json.loads(out["json"].read_text(encoding="utf-8"))["settings"]["min_field_area_ha"] == 0.04
    later = max(p.stat().st_mtime for p in out.values()) + 10
    os.utime(own, (later, later))  # a newer checkpoint: everything again
    assert run_change(run_dir, own, before, after, "--change_margin=0.3") == 0
    assert probability.stat().st_mtime_ns > made[probability]
    # Another way of predicting the dates (here test-time augmentation) predicts them again, the checkpoint as is.
    again = probability.stat().st_mtime_ns
    assert run_change(run_dir, own, before, after, "--change_margin=0.3", "--tta=true") == 0
    assert probability.stat().st_mtime_ns > again
    record = change.date_outputs(run_dir, "a_to_b", "before")["record"]
    assert json.loads(record.read_text(encoding="utf-8"))["tta"] is True
    # A date an older version predicted records fewer settings: predicted again, and the log says why. Its pair's
    # JSON lacks the key too, so the pair is not skipped however long ago the checkpoint's time lies.
    earlier = json.loads(record.read_text(encoding="utf-8"))
    del earlier["nodata_fed_as"]
    record.write_text(json.dumps(earlier), encoding="utf-8")
    row = json.loads(out["json"].read_text(encoding="utf-8"))
    del row["settings"]["nodata_fed_as"]
    out["json"].write_text(json.dumps(row), encoding="utf-8")
    again = probability.stat().st_mtime_ns
    caplog.clear()
    assert run_change(run_dir, own, before, after, "--change_margin=0.3", "--tta=true") == 0
    assert probability.stat().st_mtime_ns > again
    assert "a_to_b: the before date is predicted again: its earlier outputs were made otherwise (nodata_fed_as " in (
        caplog.text
    )
    assert "the after date is predicted again" not in caplog.text


def test_a_rerun_with_another_pixel_size_for_a_checkpoint_without_one_predicts_the_dates_again(
    checkpoint: Path, tmp_path: Path
) -> None:
    # The checkpoint records no pixel size: --pixel_size_m decides whether the dates are resampled, so dates
    # predicted without it are not the dates this run asks for.
    before = write_geotiff(tmp_path / "in" / "a.tif", scene_pixels(1))
    after = write_geotiff(tmp_path / "in" / "b.tif", scene_pixels(1, moved=True))
    run_dir = tmp_path / "run"
    assert run_change(run_dir, checkpoint, before, after) == 0
    probability = change.date_outputs(run_dir, "a_to_b", "before")["probability"]
    made = probability.stat().st_mtime_ns
    assert run_change(run_dir, checkpoint, before, after, "--pixel_size_m=4") == 0
    assert probability.stat().st_mtime_ns > made
    record = change.date_outputs(run_dir, "a_to_b", "before")["record"]
    assert json.loads(record.read_text(encoding="utf-8"))["pixel_size_m"] == 4


def test_a_true_change_map_edited_in_place_is_scored_again(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = write_geotiff(tmp_path / "in" / "a.tif", scene_pixels(1))
    after = write_geotiff(tmp_path / "in" / "b.tif", scene_pixels(1, moved=True))
    truth, run_dir = tmp_path / "truth.tif", tmp_path / "run"
    pair_json = change.pair_outputs(run_dir, "a_to_b")["json"]
    # A 0/1 mask of changed pixels holds only codes that exist (1 reads as stable farmland): scored without a word,
    # every lost and gained IoU 0 or empty.
    changed = np.zeros((1, HEIGHT, WIDTH), np.uint8)
    changed[:, :20] = 1
    write_geotiff(truth, changed)
    assert run_change(run_dir, checkpoint, before, after, f"--change_truth={truth}") == 0
    assert json.loads(pair_json.read_text(encoding="utf-8"))["accuracy"]["lost_true"] == 0
    assert f"a_to_b: --change_truth={truth} holds no lost (2) or gained (3) pixel" in caplog.text
    caplog.clear()
    write_geotiff(truth, np.full((1, HEIGHT, WIDTH), cd.LOST, np.uint8))  # the same path, other codes
    assert run_change(run_dir, checkpoint, before, after, f"--change_truth={truth}") == 0
    assert json.loads(pair_json.read_text(encoding="utf-8"))["accuracy"]["lost_true"] > 0
    assert "holds no lost (2) or gained (3) pixel" not in caplog.text


def test_a_true_change_map_of_centimetre_pixels_is_not_called_empty_for_its_hectares_rounding_to_0(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 100 lost pixels of 5 cm are 0.000025 ha, which the accuracy rounds to 0: the truth was called one without a
    # lost or gained pixel and to be recoded, beside a lost IoU of 0.5.
    predicted, truth = np.zeros((1, 20, 20), np.uint8), np.zeros((1, 20, 20), np.uint8)
    truth[:, :10, :10], predicted[:, :10, :5] = cd.LOST, cd.LOST
    fine = Affine(0.05, 0.0, 500000.0, 0.0, -0.05, 4500000.0)
    paths = [geotiff(tmp_path / f"{n}.tif", a, CRS, fine) for n, a in (("p", predicted), ("t", truth))]
    accuracy = cd.score_change(*paths)
    assert accuracy["lost_true"] == 0 and accuracy["lost_true_pixels"] == 100 and accuracy["lost_iou"] == 0.5
    change.warn_truth_without_change(change.Pair("a_to_b", paths[0], paths[0]), paths[1], accuracy)
    assert "holds no lost (2) or gained (3) pixel" not in caplog.text
    unchanged = geotiff(tmp_path / "u.tif", np.ones_like(truth), CRS, fine)  # a 0/1 mask: warned of still
    change.warn_truth_without_change(
        change.Pair("a_to_b", paths[0], paths[0]), unchanged, cd.score_change(paths[0], unchanged)
    )
    assert f"a_to_b: --change_truth={unchanged} holds no lost (2) or gained (3) pixel" in caplog.text
    # A true map of a place without change is right as it is: it was told to recode it all the same.
    assert "recode such a mask to the change codes" in caplog.text and "without change is right as it is" in caplog.text


def test_a_zero_collar_and_cloud_at_one_date_make_no_change_along_them(checkpoint: Path, tmp_path: Path) -> None:
    # The same scene at both dates, the after one with a zero collar (as a reprojected scene has) and a zero
    # cloud: nodata, not black ground, so the fields along them must not turn into "lost".
    image = scene_pixels(1)
    clouded = image.copy()
    clouded[:, :, -3:] = 0
    clouded[:, 40:60, 50:80] = 0
    before = write_geotiff(tmp_path / "2019" / "a.tif", image)
    after = write_geotiff(tmp_path / "2024" / "a.tif", clouded)
    assert run_change(tmp_path / "run", checkpoint, before, after, "--change_margin=0.1") == 0
    row = json.loads(change.pair_outputs(tmp_path / "run", "a")["json"].read_text(encoding="utf-8"))
    assert row["valid_pixels"] == HEIGHT * WIDTH - 3 * HEIGHT - 20 * 30
    assert (row["lost_pixels"], row["gained_pixels"]) == (0, 0)
    # Dates predicted before nodata was fed as its nearest pixels (their records lack the key) are predicted again.
    record = change.date_outputs(tmp_path / "run", "a", "after")["record"]
    older = json.loads(record.read_text(encoding="utf-8"))
    del older["nodata_fed_as"]
    record.write_text(json.dumps(older), encoding="utf-8")
    probability = change.date_outputs(tmp_path / "run", "a", "after")["probability"]
    made = probability.stat().st_mtime_ns
    assert run_change(tmp_path / "run", checkpoint, before, after, "--change_margin=0.15") == 0
    assert probability.stat().st_mtime_ns > made


def test_scenes_whose_data_do_not_overlap_are_refused_not_reported_unchanged(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Extents that overlap, data that do not (nodata where the other date has data): this was "lost 0 ha,
    # gained 0 ha" with exit status 0, as if nothing had changed.
    image = scene_pixels(1)
    left, right = image.copy(), image.copy()
    left[:, :, WIDTH // 2 :] = 0
    right[:, :, : WIDTH // 2] = 0
    before = write_geotiff(tmp_path / "in" / "left.tif", left)
    after = write_geotiff(tmp_path / "in" / "right.tif", right)
    assert run_change(tmp_path / "run", checkpoint, before, after) == 1
    assert f"{before} (before) and {after} (after): no pixel holds data at both dates" in caplog.text
    assert not change.pair_outputs(tmp_path / "run", "left_to_right")["json"].exists()


def test_a_date_without_data_is_named_as_such_not_as_footprints_that_miss(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A blank tile at both dates (the edge of a tiling) was said to be "extents that overlap, data that do not".
    tile = scene_pixels(1)[:, :64, :64].transpose(1, 2, 0)
    for folder, names in (("2019", ("blank", "half")), ("2024", ("blank",))):
        for name in names:
            write_image(tmp_path / folder / f"{name}.png", np.zeros((64, 64, 3), np.uint8))
    write_image(tmp_path / "2024" / "half.png", tile)
    assert run_change(tmp_path / "run", checkpoint, tmp_path / "2019", tmp_path / "2024", "--min_field_pixels=10") == 1
    blank = f"{tmp_path / '2019' / 'blank.png'} (before) and {tmp_path / '2024' / 'blank.png'} (after): hold no data"
    assert blank in caplog.text
    assert f"{tmp_path / '2019' / 'half.png'} (before): holds no data, every pixel nodata" in caplog.text
    assert "where one has data the other is nodata" not in caplog.text


def test_a_truncated_scene_is_named_with_gdals_reason_and_the_other_pairs_go_on(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("a", "b"):
        write_geotiff(tmp_path / "2019" / f"{name}.tif", scene_pixels(1))
        write_geotiff(tmp_path / "2024" / f"{name}.tif", scene_pixels(1, moved=True))
    bad = tmp_path / "2024" / "b.tif"
    whole = bad.read_bytes()
    bad.write_bytes(whole[: len(whole) * 6 // 10])  # opens; its last rows cannot be read
    assert run_change(tmp_path / "run", checkpoint, tmp_path / "2019", tmp_path / "2024") == 1
    assert change.pair_outputs(tmp_path / "run", "a")["json"].exists()
    assert not change.pair_outputs(tmp_path / "run", "b")["json"].exists()
    assert f"{bad}: rows" in caplog.text and "See previous exception" not in caplog.text
    assert "the file is truncated or corrupt, so copy or export it again" in caplog.text


def test_a_pair_that_fails_keeps_no_row_of_an_earlier_run(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = write_geotiff(tmp_path / "in" / "a.tif", scene_pixels(1))
    after = write_geotiff(tmp_path / "in" / "b.tif", scene_pixels(1, moved=True))
    run_dir, table = tmp_path / "run", tmp_path / "run" / "change" / "change_area.csv"
    assert run_change(run_dir, checkpoint, before, after) == 0
    assert "a_to_b" in table.read_text(encoding="utf-8-sig")
    # A truth on another grid is refused before anything is predicted or written: the earlier outputs stay whole.
    moved = geotiff(
        tmp_path / "moved.tif",
        np.zeros((1, HEIGHT, WIDTH), np.uint8),
        crs=CRS,
        transform=TRANSFORM @ Affine.translation(5, 0),
    )
    made = change.pair_outputs(run_dir, "a_to_b")["change"].stat().st_mtime_ns
    assert run_change(run_dir, checkpoint, before, after, "--change_margin=0.1", f"--change_truth={moved}") == 1
    assert f"--change_truth={moved}: lies on another grid" in caplog.text
    assert change.pair_outputs(run_dir, "a_to_b")["change"].stat().st_mtime_ns == made
    # A truth whose codes are found wrong once the new map is written: the old row goes with the old map.
    codes = write_geotiff(tmp_path / "codes.tif", np.full((1, HEIGHT, WIDTH), 9, np.uint8))
    assert run_change(run_dir, checkpoint, before, after, "--change_margin=0.1", f"--change_truth={codes}") == 1
    assert not change.pair_outputs(run_dir, "a_to_b")["json"].exists()
    assert "a_to_b" not in table.read_text(encoding="utf-8-sig")


def test_other_files_under_the_same_names_are_compared_again(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Paired folders of dates share file names by design: 2019 against 2024 after 2019 against 2022.
    before = write_geotiff(tmp_path / "2019" / "a.tif", scene_pixels(1))
    for folder, seed in (("2022", 2), ("2024", 3)):
        write_geotiff(tmp_path / folder / "a.tif", scene_pixels(seed, moved=True))
    run_dir = tmp_path / "run"
    assert run_change(run_dir, checkpoint, before, tmp_path / "2022" / "a.tif") == 0
    assert "replaces the comparison" not in caplog.text
    assert run_change(run_dir, checkpoint, before, tmp_path / "2024" / "a.tif", "--change_margin=0.1") == 0
    replaced = f"a: replaces the comparison of {before.resolve()} with {(tmp_path / '2022' / 'a.tif').resolve()}"
    assert replaced in caplog.text
    assert run_change(tmp_path / "fresh", checkpoint, before, tmp_path / "2024" / "a.tif", "--change_margin=0.1") == 0
    rows = {}
    for name in ("run", "fresh"):
        with open(tmp_path / name / "change" / "change_area.csv", encoding="utf-8-sig") as handle:
            rows[name] = list(csv.DictReader(handle))
    assert [r["after"] for r in rows["run"]] == [str(tmp_path / "2024" / "a.tif")]
    keys = ("lost_pixels", "gained_pixels", "lost_ha", "gained_ha")
    assert [r[k] for r in rows["run"] for k in keys] == [r[k] for r in rows["fresh"] for k in keys]
    # The same file exported again (newer than the outputs) is compared again too.
    probability = change.date_outputs(run_dir, "a", "after")["probability"]
    made = probability.stat().st_mtime_ns
    later = probability.stat().st_mtime + 10
    os.utime(tmp_path / "2024" / "a.tif", (later, later))
    assert run_change(run_dir, checkpoint, before, tmp_path / "2024" / "a.tif", "--change_margin=0.1") == 0
    assert probability.stat().st_mtime_ns > made
    # Another date's file copied over it with its own, older time (cp -p): compared again as well.
    made = probability.stat().st_mtime_ns
    shutil.copy2(tmp_path / "2022" / "a.tif", tmp_path / "2024" / "a.tif")
    assert run_change(run_dir, checkpoint, before, tmp_path / "2024" / "a.tif", "--change_margin=0.1") == 0
    assert probability.stat().st_mtime_ns > made
    # Edited in place to the same size, its old time set back (touch -r): compared again too.
    made, was, after = probability.stat().st_mtime_ns, (tmp_path / "2024" / "a.tif").stat(), tmp_path / "2024" / "a.tif"
    edited = write_geotiff(tmp_path / "edited" / "a.tif", scene_pixels(4, moved=True)).read_bytes()
    assert len(edited) == was.st_size
    with open(after, "r+b") as handle:
        handle.write(edited)
    os.utime(after, ns=(was.st_atime_ns, was.st_mtime_ns))
    assert run_change(run_dir, checkpoint, before, after, "--change_margin=0.1") == 0
    assert probability.stat().st_mtime_ns > made


def test_folders_of_tiles_are_paired_by_name_and_a_lonely_tile_is_reported(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for folder, moved in (("2019", False), ("2024", True)):
        for i, name in enumerate(("a", "b")):
            write_image(tmp_path / folder / f"{name}.png", scene_pixels(i, moved)[:, :64, :64].transpose(1, 2, 0))
    write_image(tmp_path / "2019" / "c.png", scene_pixels(3)[:, :64, :64].transpose(1, 2, 0))
    for folder in ("2019", "2024"):  # a name in GBK bytes, as unpacked on Linux: reported, not paired
        write_image(
            Path(os.fsdecode(os.fsencode(tmp_path / folder) + b"/\xb5\xd8.png")), np.zeros((64, 64, 3), np.uint8)
        )
    # A link to nothing and a folder named as an image were passed over, their partners called lonely.
    write_image(tmp_path / "2024" / "d.png", np.zeros((64, 64, 3), np.uint8))
    (tmp_path / "2019" / "d.png").symlink_to(tmp_path / "gone.png")
    write_image(tmp_path / "2019" / "e.png", np.zeros((64, 64, 3), np.uint8))
    (tmp_path / "2024" / "e.png").mkdir()
    run_dir = tmp_path / "run"
    assert run_change(run_dir, checkpoint, tmp_path / "2019", tmp_path / "2024", "--min_field_pixels=10") == 1
    assert f"c.png: no image named c.* in {tmp_path / '2024'}" in caplog.text
    assert f"{tmp_path / '2024'}/\\xb5\\xd8.png: the file name is not UTF-8" in caplog.text
    assert f"d.png: a link to {tmp_path / 'gone.png'}, which does not exist" in caplog.text
    assert f"{tmp_path / '2024' / 'e.png'}: a folder, not an image file" in caplog.text
    assert "no image named d.*" not in caplog.text and "no image named e.*" not in caplog.text
    assert "5 problem(s) left files unpaired; see the messages above" in caplog.text  # c, both odd names, d, e
    with open(run_dir / "change" / "change_area.csv", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["pair"] for r in rows] == ["a", "b"] and rows[0]["lost_ha"] == "" and rows[0]["crs"] == ""
    codes = read(change.pair_outputs(run_dir, "a")["change"])
    assert codes.shape == (64, 64)
    # Without hectares, the pixel columns hold the net and the stable background too (they were missing).
    net, background = np.count_nonzero(codes == cd.GAINED) - np.count_nonzero(codes == cd.LOST), codes == 0
    assert (int(rows[0]["net_pixels"]), int(rows[0]["stable_background_pixels"])) == (net, background.sum())
    # Rows of an earlier version, without these keys, get them from their other counts.
    table = run_dir / "change" / "change_area.csv"
    older = [{k: v for k, v in row.items() if k not in ("net_pixels", "stable_background_pixels")} for row in rows]
    cd.write_change_table([{k: int(v) if k.endswith("_pixels") else v for k, v in row.items()} for row in older], table)
    with open(table, encoding="utf-8-sig") as handle:
        assert list(csv.DictReader(handle)) == rows


def test_folders_of_vrt_img_and_jp2_scenes_are_paired_as_predict_py_takes_them(tmp_path: Path) -> None:
    # A folder of ERDAS .img scenes was passed over: "no image has a namesake in the other folder".
    for folder, names in (
        ("2019", ("county.img", "mosaic.vrt", "strip.jp2", "tile.tif")),
        ("2024", ("county.IMG", "mosaic.vrt", "tile.tif")),
    ):
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).write_bytes(b"")  # only the names are paired here
    pairs, problems = change.list_pairs(Config(before=str(tmp_path / "2019"), after=str(tmp_path / "2024")))
    assert [(p.name, p.before.name, p.after.name) for p in pairs] == [
        ("county", "county.img", "county.IMG"),
        ("mosaic", "mosaic.vrt", "mosaic.vrt"),
        ("tile", "tile.tif", "tile.tif"),
    ]
    paired = "the dates are paired by file name"
    assert problems == [f"{tmp_path / '2019' / 'strip.jp2'}: no image named strip.* in {tmp_path / '2024'}; " + paired]


def test_the_same_folder_or_file_as_both_dates_stops_at_once(tmp_path: Path) -> None:
    # By a typo, every scene was compared with itself and reported "0 ha lost, 0 ha gained".
    (tmp_path / "2019").mkdir()
    write_geotiff(tmp_path / "2019" / "a.tif", scene_pixels(1))
    with pytest.raises(ValueError, match=r"2019 and --after=.*2019: the same folder twice; expected the two dates"):
        change.list_pairs(Config(before=f"{tmp_path / '2019'}/", after=str(tmp_path / "2019")))
    with pytest.raises(ValueError, match=r"a.tif: the same file twice"):
        change.list_pairs(Config(before=str(tmp_path / "2019" / "a.tif"), after=str(tmp_path / "2019" / "a.tif")))


def test_float32_and_float64_reflectance_dates_are_compared_and_the_fix_for_two_bit_depths_stretches_alike(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Both float types are reflectance taken as they are, yet a float64 date beside a float32 one was refused as
    # "another pixel type"; the fix offered for two bit depths (-scale alone) stretched each date by its own range.
    before_dir, after_dir = tmp_path / "2019", tmp_path / "2024"
    write_geotiff(before_dir / "wide.tif", scene_pixels(1).astype(np.float64) / 255)
    write_geotiff(after_dir / "wide.tif", (scene_pixels(1, moved=True) / 255).astype(np.float32))
    write_geotiff(before_dir / "depth.tif", scene_pixels(1))
    write_geotiff(after_dir / "depth.tif", scene_pixels(1).astype(np.uint16) * 4)
    run_dir = tmp_path / "run"
    assert run_change(run_dir, checkpoint, before_dir, after_dir) == 1
    assert [p.name for p in (run_dir / "change").glob("*_change.tif")] == ["wide_change.tif"]
    assert "-scale MIN MAX 0 255 with the same MIN and MAX for both dates" in caplog.text


def test_bad_pairs_name_both_files_and_the_good_pair_goes_on(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before_dir, after_dir = tmp_path / "2019", tmp_path / "2024"
    far = Affine(2.0, 0.0, 900000.0, 0.0, -2.0, 4500000.0)
    write_geotiff(before_dir / "good.tif", scene_pixels(1))
    write_geotiff(after_dir / "good.tif", scene_pixels(1, moved=True))
    write_geotiff(before_dir / "far.tif", scene_pixels(1))
    write_geotiff(after_dir / "far.tif", scene_pixels(1), transform=far)
    write_geotiff(before_dir / "nocrs.tif", scene_pixels(1))
    write_geotiff(after_dir / "nocrs.tif", scene_pixels(1), crs=None, transform=Affine.identity())
    write_geotiff(before_dir / "bands.tif", scene_pixels(1))
    write_geotiff(after_dir / "bands.tif", np.concatenate([scene_pixels(1), scene_pixels(2)[:1]]))
    write_geotiff(before_dir / "depth.tif", scene_pixels(1))
    write_geotiff(after_dir / "depth.tif", scene_pixels(1).astype(np.uint16) * 4)  # 10-bit values in 16 bits
    run_dir = tmp_path / "run"
    assert run_change(run_dir, checkpoint, before_dir, after_dir) == 1
    text = caplog.text
    assert f"{before_dir / 'far.tif'} (before) and {after_dir / 'far.tif'} (after): the scenes do not overlap" in text
    assert f"{after_dir / 'nocrs.tif'} has no CRS, {before_dir / 'nocrs.tif'} has {CRS}" in text
    assert f"{before_dir / 'bands.tif'} (before) has 3 band(s), {after_dir / 'bands.tif'} (after) has 4" in text
    assert f"{before_dir / 'depth.tif'} (before) holds uint8 pixels, {after_dir / 'depth.tif'} (after) uint16" in text
    assert [p.name for p in (run_dir / "change").glob("*_change.tif")] == ["good_change.tif"]
    assert not list((run_dir / "change" / "dates").glob("far*")) and not list(
        (run_dir / "change" / "dates").glob("bands*")
    )
    with pytest.raises(ValueError, match="expected two files or two folders"):
        run_change(run_dir, checkpoint, before_dir / "good.tif", after_dir)
    # A truth with two folders was refused without saying how to score the pair it belongs to.
    truth = write_geotiff(tmp_path / "truth.tif", np.zeros((1, HEIGHT, WIDTH), np.uint8))
    with pytest.raises(ValueError, match="scores one pair") as refused:
        run_change(run_dir, checkpoint, before_dir, after_dir, f"--change_truth={truth}")
    fix = f"give the two files of the pair it was drawn for (for example --before={before_dir / 'bands.tif'} "
    assert f"--after={after_dir} give 5 pairs: {fix}" in str(refused.value)


def test_an_rgb_date_against_an_rgb_nir_date_is_compared_with_bands_and_told_so_without(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A 3-band date against a 4-band one was refused even with --bands=1,2,3, which reads the same bands of both,
    # and the refusal offered only exporting the scenes again.
    before = write_geotiff(tmp_path / "2019" / "a.tif", scene_pixels(1))
    after = write_geotiff(
        tmp_path / "2024" / "a.tif", np.concatenate([scene_pixels(1, moved=True), scene_pixels(2)[:1]])
    )
    assert run_change(tmp_path / "run", checkpoint, before, after) == 1
    assert f"{before} (before) has 3 band(s), {after} (after) has 4" in caplog.text
    assert "read those of both with --bands=1,2,3" in caplog.text
    assert run_change(tmp_path / "run", checkpoint, before, after, "--bands=1,2,3") == 0
    rgb = write_geotiff(tmp_path / "rgb" / "a.tif", scene_pixels(1, moved=True))
    assert run_change(tmp_path / "run_rgb", checkpoint, before, rgb) == 0
    assert np.array_equal(
        read(change.pair_outputs(tmp_path / "run", "a")["change"]),
        read(change.pair_outputs(tmp_path / "run_rgb", "a")["change"]),
    )


def test_a_date_of_another_band_count_than_the_training_tiles_is_warned_of_where_their_bands_are_picked(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A network of bands 3,2,1 of B,G,R,NIR tiles took bands 3,2,1 of an R,G,B date, its B,G,R, without a word.
    state = torch.load(checkpoint, weights_only=True)
    saved = tmp_path / "bgrn.pth"
    torch.save({**state, "config": {**state["config"], "bands": "3,2,1"}, "tile_bands": 4}, saved)
    rgb = scene_pixels(1)
    before = write_geotiff(tmp_path / "2019" / "a.tif", np.concatenate([rgb[::-1], rgb[:1]]))
    after = write_geotiff(tmp_path / "2024" / "a.tif", scene_pixels(1, moved=True))
    with caplog.at_level("WARNING"):
        assert run_change(tmp_path / "run", saved, before, after) == 0
    warned = [r.getMessage() for r in caplog.records if "the training tiles 4" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"{after}: has 3 band(s)")
    caplog.clear()  # --bands named, the training's numbers again, as the fix the warning asks for: not warned again
    with caplog.at_level("WARNING"):
        assert run_change(tmp_path / "named", saved, before, after, "--bands=3,2,1") == 0
    assert not [r for r in caplog.records if "the training tiles 4" in r.getMessage()]


# --- shifted and reprojected scenes, end to end; accuracy --------------------------------------------------


def fake_prediction(monkeypatch: pytest.MonkeyPatch, source: str = "band") -> None:
    """Predict by reading the probability off the image (band 1 in percent x 2.55) or off the label beside the
    scene (``<stem>_label.tif``, 1 = farmland -> 95 %, else 5 %): a network that sees one pixel only, so that a
    moved after-scene must give the same probabilities, and so the same change, away from its edges."""

    def run_scene(model, image, state, device, settings, outputs, model_file) -> dict:
        with rasterio.open(image.path) as src:
            if source == "band":
                probability = np.rint(src.read(1) / 2.55).astype(np.uint8)
            else:
                with rasterio.open(image.path.with_name(image.path.stem + "_label.tif")) as label:
                    probability = np.where(label.read(1) == 1, 95, 5).astype(np.uint8)
        outputs["mask"].parent.mkdir(parents=True, exist_ok=True)
        for kind in ("mask", "probability"):
            with rasterio.open(outputs[kind], "w", **scene.raster_profile(image)) as dst:
                dst.write(probability if kind == "probability" else (probability > 50).astype(np.uint8), 1)
        for kind in ("style", "area"):
            outputs[kind].write_text("{}")
        return {}

    monkeypatch.setattr(scene, "run_scene", run_scene)


def test_shifted_and_reprojected_after_scenes_give_the_aligned_change_map(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_prediction(monkeypatch)
    image = lambda seed: np.repeat((smooth_probabilities(seed).astype(np.float32) * 2.55).astype(np.uint8)[None], 3, 0)
    before = write_geotiff(tmp_path / "in" / "before.tif", image(1))
    after_pixels = image(2)
    aligned = write_geotiff(tmp_path / "in" / "aligned.tif", after_pixels)
    shifted = write_geotiff(
        tmp_path / "in" / "shifted.tif", after_pixels[:, 16:, 10:], transform=TRANSFORM @ Affine.translation(10, 16)
    )
    transform, width, height = rasterio.warp.calculate_default_transform(
        CRS, "EPSG:32616", WIDTH, HEIGHT, *rasterio.transform.array_bounds(HEIGHT, WIDTH, TRANSFORM), resolution=1.6
    )
    warped = np.zeros((3, height, width), np.uint8)
    rasterio.warp.reproject(
        after_pixels,
        warped,
        src_transform=TRANSFORM,
        src_crs=CRS,
        dst_transform=transform,
        dst_crs="EPSG:32616",
        resampling=rasterio.warp.Resampling.bilinear,
    )
    reprojected = write_geotiff(tmp_path / "in" / "reprojected.tif", warped, crs="EPSG:32616", transform=transform)
    maps = {}
    for after in (aligned, shifted, reprojected):
        assert run_change(tmp_path / "run", checkpoint, before, after) == 0
        maps[after.stem] = read(change.pair_outputs(tmp_path / "run", f"before_to_{after.stem}")["change"])
        row = json.loads(change.pair_outputs(tmp_path / "run", f"before_to_{after.stem}")["json"].read_text())
        assert row["grid"] == ("aligned" if after == aligned else "after resampled onto before")
    assert np.array_equal(maps["shifted"][16:, 10:], maps["aligned"][16:, 10:])
    assert (maps["shifted"][:16] == 255).all()
    inner = (slice(8, -8), slice(8, -8))  # the reprojected scene's rotated edges leave nodata corners
    assert (maps["reprojected"][inner] == maps["aligned"][inner]).mean() > 0.97
    assert np.isin(maps["aligned"], [cd.LOST, cd.GAINED]).sum() > 500


def test_the_demo_pair_and_the_score_against_its_true_change(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = demo_data.write_demo_change_pair(tmp_path / "pair", tiles=3, size=64, seed=1)
    label = demo_data.write_demo_scene(tmp_path / "scene.tif", tiles=3, size=64, seed=1)
    assert np.array_equal(read(paths["before"]), read(tmp_path / "scene.tif"))
    assert np.array_equal(read(paths["before_label"]), read(label))
    was, now, truth = read(paths["before_label"]) == 1, read(paths["after_label"]) == 1, read(paths["truth"])
    assert np.array_equal(truth, np.where(was, np.where(now, 1, 2), np.where(now, 3, 0)))
    assert (truth == cd.LOST).sum() > 300 and (truth == cd.GAINED).sum() > 300
    with rasterio.open(paths["before"]) as b, rasterio.open(paths["after"]) as a:
        difference = np.abs(b.read().astype(int) - a.read().astype(int)).mean(axis=0)
    assert difference[truth == cd.LOST].mean() > 3 * difference[truth == cd.STABLE_FARMLAND].mean()
    perfect = cd.score_change(paths["truth"], paths["truth"])
    assert (perfect["lost_iou"], perfect["gained_iou"], perfect["lost_error"]) == (1.0, 1.0, 0.0)
    # The labels as the "network": the minimum mapping unit (100 pixels of 1 m) alone keeps the score below 1.
    fake_prediction(monkeypatch, "label")
    for date in ("before", "after"):
        os.replace(paths[f"{date}_label"], paths[date].with_name(f"{date}_label.tif"))
    run_dir = tmp_path / "run"
    assert (
        run_change(
            run_dir,
            checkpoint,
            paths["before"],
            paths["after"],
            f"--change_truth={paths['truth']}",
            "--min_field_area_ha=0.01",
        )
        == 0
    )
    accuracy = json.loads(change.pair_outputs(run_dir, "before_to_after")["json"].read_text())["accuracy"]
    assert 0.8 < accuracy["lost_iou"] < 1 and 0.8 < accuracy["gained_iou"] <= 1
    assert accuracy["area_unit"] == "ha" and -0.2 < accuracy["lost_relative_error"] <= 0


def test_score_of_a_hand_made_change_map(tmp_path: Path) -> None:
    predicted = np.array([[2, 2, 0, 3, 255], [1, 2, 3, 3, 0]], np.uint8)
    truth = np.array([[2, 0, 2, 3, 2], [1, 2, 0, 3, 255]], np.uint8)
    paths = [write_geotiff(tmp_path / f"{n}.tif", a[None]) for n, a in (("p", predicted), ("t", truth))]
    score = cd.score_change(*paths)
    assert score["lost_iou"] == pytest.approx(2 / 4) and score["gained_iou"] == pytest.approx(2 / 3, abs=1e-4)
    assert score["lost_predicted"] == pytest.approx(3 * 4 / 1e4) and score["lost_true"] == pytest.approx(3 * 4 / 1e4)
    # gained: 3 pixels predicted, 2 true: an error of 1 pixel (4e-4 ha), half the true area
    assert score["gained_error"] == pytest.approx(4e-4) and score["gained_relative_error"] == pytest.approx(0.5)
    with pytest.raises(cd.DataError, match=r"t2.tif: lies on another grid .*3x2 pixels.* 5x2 pixels.*gdalwarp"):
        cd.score_change(paths[0], write_geotiff(tmp_path / "t2.tif", truth[None, :, :3]))
    moved = geotiff(tmp_path / "t3.tif", truth[None], crs=CRS, transform=TRANSFORM @ Affine.translation(1, 0))
    with pytest.raises(cd.DataError, match=r"t3.tif: lies on another grid than the before scene .*origin 500002,"):
        cd.score_change(paths[0], moved)

    binary = write_geotiff(tmp_path / "t4.tif", np.where(truth == 2, 255, 1).astype(np.uint8)[None])
    assert cd.score_change(paths[0], binary)["lost_iou"] == 0.0  # 255 is unknown: nothing left to score
    with pytest.raises(cd.DataError, match=r"t5.tif: holds the values \[0, 1, 3, 7, 255\]; expected the change codes"):
        cd.score_change(paths[0], write_geotiff(tmp_path / "t5.tif", np.where(truth == 2, 7, truth)[None]))


def test_a_true_change_map_on_another_crs_is_refused_with_the_warp_that_puts_it_on_the_before_grid(
    tmp_path: Path,
) -> None:
    # A before scene downloaded in Web Mercator and the true change drawn on the land survey's Gauss-Kruger grid:
    # sizes and CRSs differ. The refusal names both grids and the gdalwarp command; that warp is then accepted.
    truth = np.tile(np.array([[0, 1, 2, 3]], np.uint8), (24, 6))
    gauss_kruger = Affine(0.8, 0.0, 607512.0, 0.0, -0.8, 4041694.0)
    survey = geotiff(tmp_path / "truth.tif", truth[None], crs="EPSG:4547", transform=gauss_kruger)
    grid = rasterio.warp.calculate_default_transform(
        "EPSG:4547", "EPSG:3857", 24, 24, 607512, 4041674.8, 607531.2, 4041694, resolution=0.597
    )
    before = {"crs": rasterio.crs.CRS.from_epsg(3857), "transform": grid[0], "width": grid[1], "height": grid[2]}
    with pytest.raises(cd.DataError) as refused:
        cd.check_truth(survey, before, "before.tif")
    message = str(refused.value)
    assert f"--change_truth={survey}: lies on another grid than the before scene (EPSG:4547, 24x24 pixels" in message
    command = message.split("for example ")[1].split()
    assert command[:3] == ["gdalwarp", "-t_srs", "EPSG:3857"] and command[-1].endswith("truth_on_before_grid.tif")
    west, south, east, north = map(float, command[command.index("-te") + 1 : command.index("-te") + 5])
    width, height = map(int, command[command.index("-ts") + 1 : command.index("-ts") + 3])
    assert command[command.index("-r") + 1] == "near" and command[command.index("-dstnodata") + 1] == "255"
    warped_grid = rasterio.transform.from_bounds(west, south, east, north, width, height)
    warped = np.full((height, width), 255, np.uint8)
    rasterio.warp.reproject(
        truth,
        warped,
        src_transform=gauss_kruger,
        src_crs="EPSG:4547",
        dst_transform=warped_grid,
        dst_crs="EPSG:3857",
        dst_nodata=255,
    )
    target = geotiff(Path(command[-1]), warped[None], crs="EPSG:3857", transform=warped_grid)
    cd.check_truth(target, before, "before.tif")  # on the before grid now: accepted
    # A truth without a CRS of another size is taken as pixels: the refusal says what to give it.
    with pytest.raises(cd.DataError, match=r"3x2 pixels, expected the before scene's grid .* give it the before"):
        plain = geotiff(tmp_path / "plain.tif", truth[None, :2, :3], crs=None, transform=Affine.identity())
        cd.check_truth(plain, before, "before.tif")


def test_a_truth_on_the_before_grid_but_for_float_noise_is_accepted_and_a_warp_told_is_accepted_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    truth = np.tile(np.array([[0, 1, 2, 3]], np.uint8), (8, 2))
    # A Web Mercator origin one unit in the last place off (1.9e-9 m, above almost_equals' 1e-9): the same pixels.
    grid = Affine(0.6, 0.0, 13024000.3, 0.0, -0.6, 4369000.7)
    before = {"crs": rasterio.crs.CRS.from_epsg(3857), "transform": grid, "width": 8, "height": 8}
    noisy = Affine(0.6, 0.0, float(np.nextafter(13024000.3, 2e7)), 0.0, -0.6, 4369000.7)
    cd.check_truth(geotiff(tmp_path / "noisy.tif", truth[None], crs="EPSG:3857", transform=noisy), before, "b.tif")
    moved = geotiff(tmp_path / "moved.tif", truth[None], crs="EPSG:3857", transform=grid @ Affine.translation(0.01, 0))
    with pytest.raises(cd.DataError, match=r"13024000.306, 4369000.7, pixel 0.6 x -0.6 against .*origin 13024000.3,"):
        cd.check_truth(moved, before, "b.tif")  # a hundredth of a pixel is a move, and the message shows it
    # Beijing 1954 Gauss-Kruger without its datum shift: PROJ guesses EPSG:2436 at confidence 70, a CRS it does not
    # equal; a truth warped there would be refused again. The command names the grid's own CRS, which is accepted.
    beijing = rasterio.crs.CRS.from_proj4("+proj=tmerc +lon_0=117 +k=1 +x_0=500000 +ellps=krass +units=m +no_defs")
    gk = Affine(0.5, 0.0, 512345.0, 0.0, -0.5, 4031234.0)
    before = {"crs": beijing, "transform": gk, "width": 8, "height": 8}
    survey = geotiff(
        tmp_path / "survey.tif", truth[None], crs="EPSG:4326", transform=Affine(5e-6, 0, 117.13763, 0, -5e-6, 36.41105)
    )
    with pytest.raises(cd.DataError) as refused:
        cd.check_truth(survey, before, "b.tif")
    command = shlex.split(str(refused.value).split("for example ")[1])
    srs = rasterio.crs.CRS.from_user_input(command[command.index("-t_srs") + 1])
    warped = np.full((8, 8), 255, np.uint8)
    rasterio.warp.reproject(truth, warped, src_transform=Affine(5e-6, 0, 117.13763, 0, -5e-6, 36.41105),
                            src_crs="EPSG:4326", dst_transform=gk, dst_crs=srs, dst_nodata=255)  # fmt: skip
    assert (warped != 255).sum() > 16  # the survey covers the grid's corner
    cd.check_truth(geotiff(tmp_path / "warped.tif", warped[None], crs=srs, transform=gk), before, "b.tif")
    # gdalwarp -te/-ts writes north-up grids: a south-up grid gets no -te (its south above its north), and a grid
    # without a CRS no -t_srs.
    with pytest.raises(cd.DataError, match=r"rotated or south-up, which gdalwarp -te/-ts cannot write") as refused:
        cd.check_truth(survey, {**before, "transform": Affine(0.5, 0.0, 512345.0, 0.0, 0.5, 4031234.0)}, "b.tif")
    assert "-te" not in str(refused.value).split("gdalwarp -te/-ts")[1]
    with pytest.raises(cd.DataError, match=r"the before scene has no CRS, so nothing can be warped onto it"):
        cd.check_truth(survey, {**before, "crs": None}, "b.tif")
    # On Windows the WKT is double-quoted with its own quotes escaped, as gdalwarp reads its arguments back.
    truth_path = tmp_path / "truth.tif"
    with monkeypatch.context() as windows:  # undone before the asserts, which pytest reports with paths
        windows.setattr(files.os, "name", "nt")
        quoted = cd.truth_warp_command(truth_path, before).split("-t_srs ")[1].split(" -te ")[0]
    assert quoted[0] == quoted[-1] == '"' and '"' not in quoted[1:-1].replace('\\"', "")
    assert quoted[1:-1].replace('\\"', '"') == beijing.to_wkt()


def test_a_tuned_threshold_on_a_half_percent_rounds_the_cuts_inwards() -> None:
    # Tuned thresholds come in steps of 0.005: t = 0.555 with margin 0.2 asks for P >= 75.5 (so 76) and
    # P <= 35.5 (so 35); the mean of two dates is farmland above 55.5 (a sum above 111).
    rule = cd.ChangeRule(threshold=0.555, margin=0.2)
    assert rule.percent_cuts() == (76, 35, 111)
    before = cd.Date(np.array([[1, 1, 1, 1]], np.uint8), percent([[75, 76, 76, 76]]))
    after = cd.Date(np.array([[0, 0, 0, 0]], np.uint8), percent([[20, 35, 36, 20]]))
    assert cd.change_codes(before, after, rule).tolist() == [[0, 2, 1, 2]]  # 75 and 36 are not sure: by the mean


def test_a_probability_of_100_percent_holds_data() -> None:
    # 100 % is the most certain farmland, not nodata (255 is).
    assert codes_of(percent([[100, 100, 0]]), percent([[0, 100, 100]])) == [[2, 1, 3]]


def test_the_edge_tolerance_reaches_across_strip_seams(tmp_path: Path) -> None:
    # A field moved 2 rows south across the seam at row 8, with no minimum mapping unit: each strip must read the
    # tolerance's rows beyond its seams, or the moved edge is reported as lost and gained farmland.
    before, after = np.full((24, 10), 5, np.uint8), np.full((24, 10), 5, np.uint8)
    before[6:8, 2:8] = 95
    after[8:10, 2:8] = 95
    rule = cd.ChangeRule(margin=0.2, edge_tolerance=2)
    paths = {name: write_date(tmp_path, name, p) for name, p in (("b", before), ("a", after))}
    with cd.open_dates(paths["b"], paths["a"], True) as (b, a):
        codes = np.concatenate([c for _, c, _, _ in cd.change_strips(b, a, rule, strip=8)])
    assert not np.isin(codes, [cd.LOST, cd.GAINED]).any()
    assert np.array_equal(codes, cd.classify_block(date(before), date(after), rule))


def test_the_change_row_in_hectares_by_hand(tmp_path: Path) -> None:
    # 2 m pixels (4 m2): 100 valid pixels, 30 stable farmland, 10 lost, 5 gained, so 55 stable background.
    counts = cd.ChangeCounts(valid=100, farmland_before=40, farmland_after=35, lost=10, gained=5, stable_farmland=30)
    grid = {"crs": rasterio.crs.CRS.from_string(CRS), "transform": TRANSFORM, "width": 10, "height": 10}
    row = cd.change_row(
        "p",
        tmp_path / "b.tif",
        tmp_path / "a.tif",
        grid,
        True,
        counts,
        {"lost": 1, "gained": 1},
        tmp_path / "p_change.tif",
    )
    assert row["pixel_area_m2"] == pytest.approx(4.0)
    assert (row["valid_area_ha"], row["lost_ha"], row["gained_ha"]) == pytest.approx((0.04, 0.004, 0.002))
    assert (row["farmland_before_ha"], row["farmland_after_ha"]) == pytest.approx((0.016, 0.014))
    assert row["net_ha"] == pytest.approx(-0.002) and row["stable_farmland_ha"] == pytest.approx(0.012)
    assert row["stable_background_ha"] == pytest.approx(0.022)


def test_a_cgcs2000_crs_written_as_esri_wkt_is_the_same_grid(tmp_path: Path) -> None:
    # ArcGIS writes CGCS2000 / 3-degree Gauss-Kruger as ESRI WKT (datum China_2000): the same CRS, which rasterio
    # does not call equal to EPSG:4549; a truth on the before grid so written was refused as "another grid".
    gk = rasterio.crs.CRS.from_epsg(4549)
    esri = rasterio.crs.CRS.from_wkt(gk.to_wkt(version="WKT1_ESRI"))
    codes = np.array([[2, 2, 0, 3], [1, 2, 3, 3]], np.uint8)
    predicted = geotiff(tmp_path / "p.tif", codes[None], crs=gk, transform=TRANSFORM)
    truth = geotiff(tmp_path / "t.tif", codes[None], crs=esri, transform=TRANSFORM)
    assert cd.score_change(predicted, truth)["lost_iou"] == 1.0
    before, after = (
        SimpleNamespace(path=p, crs=c, transform=TRANSFORM, width=4, height=2)
        for p, c in ((predicted, gk), (truth, rasterio.open(truth).crs))
    )
    assert cd.check_grids(before, after)  # aligned: read as it is, not warped
    assert not cd.same_crs(gk, rasterio.crs.CRS.from_epsg(4550))  # the next zone is another CRS


def test_two_scenes_placed_apart_by_world_files_alone_are_refused_for_their_placement(tmp_path: Path) -> None:
    # Of the same size, they were told to be "the same size": their geotransforms were what differed.
    before, after = (
        SimpleNamespace(path=tmp_path / f"{name}.tif", crs=None, transform=TRANSFORM * Affine.translation(dx, 0),
                        width=4, height=2)
        for name, dx in (("a", 0), ("b", 50))
    )  # fmt: skip
    t = TRANSFORM
    origin = f"origin {t.c:.12g}, {t.f:.12g}, pixel {t.a:.12g} x {t.e:.12g} against origin "
    with pytest.raises(cd.DataError, match=f"neither has a CRS, and their geotransforms differ \\({origin}"):
        cd.check_grids(before, after)
    assert cd.check_grids(before, before)


def test_world_files_in_degrees_that_place_two_dates_apart_are_refused_and_told_apart(tmp_path: Path) -> None:
    # A world file in degrees (0.3 m pixels: 2.7e-6 degrees): a pixel size twice the other's, or an origin a few
    # pixels off, lay within almost_equals' default 1e-5 and passed for the same grid, compared pixel by pixel.
    pixel = 2.7e-6
    before = SimpleNamespace(path=tmp_path / "a.jpg", crs=None, transform=Affine(pixel, 0, 113.12345, 0, -pixel, 23.1),
                             width=100, height=100)  # fmt: skip
    for transform, shown in (
        (Affine(2 * pixel, 0, 113.12345, 0, -2 * pixel, 23.1), "origin 113.12345, 23.1, pixel 5.4e-06"),
        (Affine(pixel, 0, 113.12348, 0, -pixel, 23.1), "origin 113.12348, 23.1, pixel 2.7e-06"),  # 11 pixels east
        # South-up: the same origin and pixel width, which was all the message showed of either grid.
        (Affine(pixel, 0, 113.12345, 0, pixel, 23.1), r"origin 113.12345, 23.1, pixel 2.7e-06 x 2.7e-06\)"),
        (Affine(pixel, 1e-9, 113.12345, 0, -pixel, 23.1), "origin 113.12345, 23.1, pixel 2.7e-06 x -2.7e-06, rot"),
    ):
        after = SimpleNamespace(**{**vars(before), "path": tmp_path / "b.jpg", "transform": transform})
        with pytest.raises(cd.DataError, match=f"geotransforms differ .*against {shown}"):
            cd.check_grids(before, after)


def test_a_south_up_date_is_paired_with_a_north_up_one_of_the_same_ground(tmp_path: Path) -> None:
    # A bottom-up raster (positive y pixel size, rows from south to north) has array_bounds' "south" above its
    # "north": such a before scene was refused as "the scenes do not overlap" against any after scene.
    rows = np.arange(HEIGHT * WIDTH, dtype=np.uint8).reshape(HEIGHT, WIDTH) % 200
    north_up = write_geotiff(tmp_path / "north_up.tif", rows[None])
    t = TRANSFORM
    south_up_transform = Affine(t.a, 0, t.c, 0, -t.e, t.f + t.e * HEIGHT)
    south_up = write_geotiff(tmp_path / "south_up.tif", rows[::-1][None].copy(), transform=south_up_transform)
    grids = {p: SimpleNamespace(path=p, **cd.grid_of(rasterio.open(p))) for p in (north_up, south_up)}
    for before, after in ((south_up, north_up), (north_up, south_up)):
        assert not cd.check_grids(grids[before], grids[after])  # the same ground on another grid: resampled
        with cd.on_grid(after, cd.grid_of(grids[before]), False, rasterio.enums.Resampling.nearest) as view:
            assert np.array_equal(view.read(1), read(before))  # each pixel read at its own place
    assert cd.extent(cd.grid_of(grids[south_up])) == cd.extent(cd.grid_of(grids[north_up]))
    # The figure shows both grids north up, as GIS software does (a south-up before grid's was upside down).
    figures = []
    for before in (north_up, south_up):
        codes = write_geotiff(tmp_path / f"{before.stem}_change.tif", (read(before) // 50)[None])
        with rasterio.open(codes, "r+") as dst:
            dst.transform = grids[before].transform
        target = tmp_path / f"{before.stem}_figure.png"
        with scene.open_scene(before, (1, 1, 1), 3) as b, scene.open_scene(north_up, (1, 1, 1), 3) as a:
            cd.write_change_figure(b, a, before == north_up, codes, target)
        figures.append(cv2.imread(str(target)).astype(int))
    assert np.abs(figures[0] - figures[1]).mean() < 1


def test_two_dates_whose_origins_differ_by_float_noise_are_one_grid(tmp_path: Path) -> None:
    # A Web Mercator origin of 13 million metres one unit in the last place off (2e-9 m): above almost_equals'
    # 1e-9, it was resampled needlessly with a CRS and refused as "placed apart" without one.
    origin = Affine(0.6, 0, 13024000.3, 0, -0.6, 4369000.7)
    noisy = Affine(0.6, 0, math.nextafter(13024000.3, math.inf), 0, -0.6, 4369000.7)
    assert not origin.almost_equals(noisy, 1e-9)
    for crs in (rasterio.crs.CRS.from_epsg(3857), None):
        before, after = (
            SimpleNamespace(path=tmp_path / f"{name}.tif", crs=crs, transform=t, width=100, height=100)
            for name, t in (("a", origin), ("b", noisy))
        )
        assert cd.check_grids(before, after)
    # A hundredth of a pixel is a move.
    moved = SimpleNamespace(**{**vars(before), "transform": origin * Affine.translation(0.01, 0)})
    with pytest.raises(cd.DataError, match="geotransforms differ"):
        cd.check_grids(before, moved)


def test_each_dates_farmland_is_its_own_mask_at_a_threshold_on_a_whole_percent(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # At t = 0.56 a probability of 0.5601 to 0.565 is farmland in the mask but written as 56 % in the probability
    # GeoTIFF: the change table must count it as farmland, as the date's mask and area file do.
    before = write_geotiff(tmp_path / "in" / "a.tif", scene_pixels(1))
    after = write_geotiff(tmp_path / "in" / "b.tif", scene_pixels(1, moved=True))
    run_dir = tmp_path / "run"
    assert run_change(run_dir, checkpoint, before, after, "--threshold=0.56") == 0
    row = json.loads(change.pair_outputs(run_dir, "a_to_b")["json"].read_text(encoding="utf-8"))
    with open(run_dir / "change" / "change_area.csv", encoding="utf-8-sig") as handle:
        (table_row,) = csv.DictReader(handle)
    for date in ("before", "after"):
        outputs = change.date_outputs(run_dir, "a_to_b", date)
        mask, probability = read(outputs["mask"]), read(outputs["probability"])
        assert np.count_nonzero((mask == 1) & (probability == 56)) > 0  # the case is not empty
        area = json.loads(outputs["area"].read_text(encoding="utf-8"))
        assert row[f"farmland_{date}_pixels"] == area["farmland_pixels"] == np.count_nonzero(mask == 1)
        assert float(table_row[f"farmland_{date}_ha"]) == row[f"farmland_{date}_ha"] == area["farmland_area_ha"]
    # A pair compared by the earlier rule (no change_rule in its record) is compared again, its dates kept; a
    # pair of such a row that this command does not compare is named.
    out = change.pair_outputs(run_dir, "a_to_b")
    old = json.loads(out["json"].read_text(encoding="utf-8"))
    del old["settings"]["change_rule"]
    old["farmland_before_pixels"] -= 50
    out["json"].write_text(json.dumps(old), encoding="utf-8")
    (run_dir / "change" / "other_change.json").write_text(json.dumps(old | {"pair": "other"}), encoding="utf-8")
    probability = change.date_outputs(run_dir, "a_to_b", "before")["probability"]
    made = probability.stat().st_mtime_ns
    assert run_change(run_dir, checkpoint, before, after, "--threshold=0.56") == 0
    assert json.loads(out["json"].read_text(encoding="utf-8")) == row
    assert probability.stat().st_mtime_ns == made
    assert "1 pair(s) in" in caplog.text and "compared by an earlier version of the change rule" in caplog.text
    assert "until change.py compares them again: other\n" in caplog.text


def test_a_float_pair_a_little_above_1_is_compared_as_predict_py_takes_it(checkpoint: Path, tmp_path: Path) -> None:
    # predict.py clips reflectance a little outside [0, 1] (a bright cloud); change.py's figure refused the pair.
    before, after = (scene_pixels(1).astype(np.float32) / 255, scene_pixels(1, moved=True).astype(np.float32) / 255)
    before[:, :10, :10] = 1.05
    paths = [write_geotiff(tmp_path / "in" / f"farm_{y}.tif", p) for y, p in (("2019", before), ("2024", after))]
    assert run_change(tmp_path / "run", checkpoint, *paths) == 0
    assert change.pair_outputs(tmp_path / "run", "farm_2019_to_farm_2024")["figure"].is_file()


def test_folders_of_dated_scene_names_say_what_each_holds_and_how_to_pair_them(tmp_path: Path) -> None:
    # Gaofen-2 scenes keep their date in the name: two years' folders share no name, and the refusal said only
    # "no image has a namesake in the other folder", not what it found nor what to do.
    for folder, name in (("2023年 影像", "GF2_某县_20230815.tif"), ("2024年 影像", "GF2_某县_20240815.tif")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(b"")  # only the names are paired here
    config = Config(before=str(tmp_path / "2023年 影像"), after=str(tmp_path / "2024年 影像"))
    with pytest.raises(DataError, match="no image has a namesake in the other folder") as refused:
        change.list_pairs(config)
    assert "(the before folder holds GF2_某县_20230815; the after folder GF2_某县_20240815)" in str(refused.value)
    assert "give each place's scenes the same name in both folders" in str(refused.value)
    assert "giving the two files as --before and --after" in str(refused.value)


def test_a_date_off_its_gauss_kruger_zone_is_warned_of_once_not_at_every_opening(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Eastings with the zone number 39 in front under EPSG:4548 (none): each date was warned of four times, as its
    # band count was read and as the pair was opened, both when checked and when predicted.
    shifted = Affine(2.0, 0.0, 39500000.0, 0.0, -2.0, 4500000.0)
    before, after = (
        geotiff(tmp_path / "in" / f"farm_{year}.tif", scene_pixels(1), crs="EPSG:4548", transform=shifted)
        for year in (2019, 2024)
    )
    with caplog.at_level("WARNING"):
        assert run_change(tmp_path / "run", checkpoint, before, after) == 0
    for path in (before, after):
        warned = [r for r in caplog.records if r.getMessage().startswith(f"{path}: its eastings from 39500000.0")]
        assert len(warned) == 1, path
