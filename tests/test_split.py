"""split_dataset.py: pairing, orphans, bad pairs, quality filter, reproducible 8:1:1 splits."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import declare_size, folder_digest, square_tile, write_geotiff, write_pair
from PIL import Image
from rasterio.transform import Affine

import cli
import files
import split_dataset
from data_preprocess import read_image, read_pair_list, scene_groups, write_image, write_pair_list
from files import DataError, shell_quoted
from split_dataset import BALANCE_TOLERANCE, SPLIT_NAMES, find_pairs, imbalance, split_counts, split_pairs, split_share


def run_split(data_dir: Path, run_dir: Path, *extra: str) -> int:
    return split_dataset.main([f"--data_dir={data_dir}", f"--run_dir={run_dir}", *extra])


def rejected(run_dir: Path) -> dict[str, tuple[str, str]]:
    with open(run_dir / "splits" / "rejected.csv", encoding="utf-8-sig") as handle:
        return {Path(r["file"]).name: (r["kind"], r["reason"]) for r in csv.DictReader(handle)}


def test_split_counts() -> None:
    assert split_counts(100, (0.8, 0.1, 0.1)) == [80, 10, 10]
    assert split_counts(10, (0.8, 0.1, 0.1)) == [8, 1, 1]
    assert split_counts(5, (0.8, 0.1, 0.1)) == [3, 1, 1]  # val and test never empty when they can be filled
    assert split_counts(4, (0.2, 0.4, 0.4)) == [1, 1, 2]  # train never empty: rounding gave it 0
    assert split_counts(3, (0.02, 0.97, 0.01)) == [1, 1, 1]  # and -1
    assert split_counts(3, (0.05, 0.5, 0.45)) == [1, 1, 1]
    assert split_counts(2, (0.8, 0.1, 0.1)) == [2, 0, 0]


def test_split_is_reproducible_disjoint_and_complete(square_data: Path, tmp_path: Path) -> None:
    scan = find_pairs(square_data / "images", square_data / "labels", "_mask")
    a = split_pairs(scan.pairs, (0.8, 0.1, 0.1), seed=3)
    b = split_pairs(list(reversed(scan.pairs)), (0.8, 0.1, 0.1), seed=3)
    c = split_pairs(scan.pairs, (0.8, 0.1, 0.1), seed=4)
    assert a == b and a != c
    assert [len(a[k]) for k in ("train", "val", "test")] == [16, 2, 2]
    everything = [p for k in ("train", "val", "test") for p in a[k]]
    assert sorted(everything) == sorted(scan.pairs)


def test_main_writes_lists_and_leaves_data_untouched(square_data: Path, tmp_path: Path) -> None:
    before = folder_digest(square_data)
    assert run_split(square_data, tmp_path / "run") == 0
    assert folder_digest(square_data) == before
    train = read_pair_list(tmp_path / "run" / "splits" / "train.txt")
    assert len(train) == 16 and all(i.is_file() and m.is_file() for i, m in train)
    assert all(m.name == f"{i.stem}_mask.png" for i, m in train)
    summary = json.loads((tmp_path / "run" / "splits" / "summary.json").read_text())
    farmland = {"train": 0.25, "val": 0.25, "test": 0.25}  # every square tile is a quarter farmland
    counts = {"errors": 0, "filtered": 0, "orphans": 0}
    assert summary == {"train": 16, "val": 2, "test": 2, "farmland_share": farmland, **counts}


class PowerCut(BaseException):
    """A process stopped where it stands (kill -9, a power cut): no handler runs."""


def test_a_split_stopped_between_its_lists_leaves_none_of_the_earlier_splits_beside_them(
    square_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The new train.txt stayed beside the earlier split's val.txt and test.txt, sharing tiles with them, and
    # training and scoring went on with no word of it.
    run_dir = tmp_path / "run"
    assert run_split(square_data, run_dir, "--seed=1") == 0
    written = split_dataset.write_pair_list

    def stopped_after_one(path: Path, pairs: list) -> None:
        written(path, pairs)
        raise PowerCut

    monkeypatch.setattr(split_dataset, "write_pair_list", stopped_after_one)
    with pytest.raises(PowerCut):
        run_split(square_data, run_dir, "--seed=2")
    left = sorted(p.name for p in (run_dir / "splits").iterdir())
    assert left == ["train.txt"]  # a missing list is refused by name by the next script


def test_orphans_junk_and_upper_case_extensions(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(5):
        write_pair(data, f"t.{i}", *square_tile(rng))
    image, mask = square_tile(rng)
    write_image(data / "images" / "UPPER.PNG", image)
    write_image(data / "labels" / "UPPER_mask.png", mask)
    write_image(data / "images" / "lonely.png", image)  # no mask
    write_image(data / "labels" / "ghost_mask.png", mask)  # no image
    (data / "images" / "Thumbs.db").write_bytes(b"\0\1")
    (data / "images" / ".DS_Store").write_bytes(b"\0\1")
    assert run_split(data, tmp_path / "run") == 0  # orphans are warnings, not failures
    found = rejected(tmp_path / "run")
    assert found["lonely.png"][0] == "orphan" and "no mask lonely_mask.png" in found["lonely.png"][1]
    assert found["ghost_mask.png"][0] == "orphan" and "no image ghost" in found["ghost_mask.png"][1]
    assert "Thumbs.db" not in found and ".DS_Store" not in found
    listed = [
        i.name for k in ("train", "val", "test") for i, _ in read_pair_list(tmp_path / "run" / "splits" / f"{k}.txt")
    ]
    assert sorted(listed) == sorted(["UPPER.PNG"] + [f"t.{i}.png" for i in range(5)])


def test_two_masks_of_one_name_are_named_with_their_folder_and_what_to_do(tmp_path: Path) -> None:
    # A palette TIFF mask converted to PNG beside its original: the refusal listed ['a.tif', 'a.png', 'a.tif'],
    # image and masks alike, without folders, and asked to rename them so each stem is unique.
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(4):
        image, mask = square_tile(rng)
        write_image(data / "images" / f"{i:09d}.tif", image)
        write_image(data / "labels" / f"{i:09d}.tif", mask)
    write_image(data / "labels" / "000000000.png", mask)
    assert run_split(data, tmp_path / "run", "--mask_suffix=") == 1
    found = rejected(tmp_path / "run")
    reason = found["000000000.png"][1]
    assert reason.startswith(f"2 masks named 000000000 in {data / 'labels'} (000000000.png, 000000000.tif); expected")
    assert "move the others out of the folder" in reason and found["000000000.tif"][1] == reason


def test_images_and_masks_in_one_folder_pair_without_false_orphans(tmp_path: Path) -> None:
    # Each image was reported as a misnamed mask (with the wrong advice --mask_suffix=), each mask as an image
    # without a mask.
    rng = np.random.default_rng(0)
    data = tmp_path / "耕地 数据"
    for i in range(5):
        image, mask = square_tile(rng)
        write_image(data / "tiles" / f"t {i}.jpg", image)
        write_image(data / "tiles" / f"t {i}_label.png", mask)
    image, mask = square_tile(rng)
    write_image(data / "tiles" / "lonely.jpg", image)
    write_image(data / "tiles" / "ghost_label.png", mask)
    shared = ("--image_subdir=tiles", "--label_subdir=tiles")
    assert run_split(data, tmp_path / "run", *shared, "--mask_suffix=_label") == 0
    pairs = [p for k in ("train", "val", "test") for p in read_pair_list(tmp_path / "run" / "splits" / f"{k}.txt")]
    assert sorted((i.name, m.name) for i, m in pairs) == [(f"t {i}.jpg", f"t {i}_label.png") for i in range(5)]
    found = rejected(tmp_path / "run")
    assert sorted(found) == ["ghost_label.png", "lonely.jpg"]
    assert "no mask lonely_label.png" in found["lonely.jpg"][1] and "no image ghost" in found["ghost_label.png"][1]
    with pytest.raises(DataError, match=r"tiles: holds both images and masks .* set --mask_suffix"):
        run_split(data, tmp_path / "run2", *shared, "--mask_suffix=")


def test_images_named_with_an_extra_suffix_are_named_in_their_masks_orphan_reason(tmp_path: Path) -> None:
    # DeepGlobe's layout, 1_sat.jpg beside 1_mask.png: every file was an orphan, and the reasons pointed at
    # --mask_suffix, which cannot pair them; image t10 is not taken for mask t1's image.
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for name in ("1", "2"):
        image, mask = square_tile(rng)
        write_image(data / "tiles" / f"{name}_sat.jpg", image)
        write_image(data / "tiles" / f"{name}_mask.png", mask)
    image, mask = square_tile(rng)
    write_image(data / "tiles" / "t10.png", image)
    write_image(data / "tiles" / "t1_mask.png", mask)
    scan = find_pairs(data / "tiles", data / "tiles", "_mask")
    reasons = {path.name: reason for path, _, reason in scan.rejected}
    assert not scan.pairs and "rename the images without '_sat' (1.jpg)" in reasons["1_mask.png"]
    assert "the image 2_sat.jpg has no mask of its own" in reasons["2_mask.png"]
    assert "rename" not in reasons["t1_mask.png"]


def test_the_image_of_an_orphan_mask_is_looked_up_not_searched_for() -> None:
    # Every orphan mask read every image without a mask: 20,000 tiles of two naming rules took 39 s to scan (0.6 s
    # before the DeepGlobe hint).
    class Counted(list):
        reads = 0

        def __getitem__(self, index: int) -> str:  # bisect reads here; a plain loop reads all through __iter__
            Counted.reads += 1
            return super().__getitem__(index)

        def __iter__(self) -> Iterator[str]:
            Counted.reads += len(self)
            return super().__iter__()

    lone = Counted(sorted([f"IMG_{i:05d}" for i in range(10_000)] + ["MSK_00042_sat"]))
    assert split_dataset.suffix_after_mask("MSK_00042", lone) == "_sat"
    assert split_dataset.suffix_after_mask("MSK_00043", lone) == ""
    assert Counted.reads < 100


def test_links_to_nothing_and_folders_named_as_images_are_reported_by_name(tmp_path: Path) -> None:
    # Both were passed over, and their partners reported as orphans: "no image gone.png" while ls showed it.
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(5):
        write_pair(data, f"t{i}", *square_tile(rng))
    image, mask = square_tile(rng)
    write_image(data / "labels" / "gone_mask.png", mask)
    (data / "images" / "gone.png").symlink_to(tmp_path / "moved" / "gone.png")
    write_image(data / "labels" / "folder_mask.png", mask)
    (data / "images" / "folder.png").mkdir()
    write_image(data / "images" / "folder mask.png", image)
    (data / "labels" / "folder mask_mask.png").mkdir()
    assert run_split(data, tmp_path / "run") == 1
    found = rejected(tmp_path / "run")
    assert found["gone.png"][0] == "error"
    assert f"gone.png: a link to {tmp_path / 'moved' / 'gone.png'}, which does not exist" in found["gone.png"][1]
    assert "copy the image itself in place of the link" in found["gone.png"][1]
    assert found["folder.png"][0] == "error" and "folder.png: a folder, not an image file" in found["folder.png"][1]
    assert "folder mask_mask.png: a folder, not an image file" in found["folder mask.png"][1]
    assert "gone_mask.png" not in found and "folder_mask.png" not in found  # not orphans: their images are named


def write_named_tiles(data: Path, names: dict[str, str]) -> Path:
    """Square tiles under data/images with their masks under data/labels, by image name -> mask name."""
    rng = np.random.default_rng(0)
    for image_name, mask_name in names.items():
        image, mask = square_tile(rng)
        write_image(data / "images" / image_name, image)
        write_image(data / "labels" / mask_name, mask)
    return data


def test_masks_named_as_their_images_pair_with_an_empty_suffix(tmp_path: Path) -> None:
    # Every mask was an orphan ("does not end in ''") and every image had "no mask".
    data = write_named_tiles(tmp_path / "data", {f"t{i}.png": f"t{i}.png" for i in range(5)})
    assert run_split(data, tmp_path / "run", "--mask_suffix=") == 0
    pairs = [p for k in ("train", "val", "test") for p in read_pair_list(tmp_path / "run" / "splits" / f"{k}.txt")]
    assert sorted((i.name, m.parent.name, m.name) for i, m in pairs) == [
        (f"t{i}.png", "labels", f"t{i}.png") for i in range(5)
    ]
    assert not rejected(tmp_path / "run")


def test_masks_with_another_suffix_are_met_with_the_mask_suffix_to_pass(tmp_path: Path) -> None:
    data = write_named_tiles(tmp_path / "data", {f"t{i}.png": f"t{i}_label.png" for i in range(3)})
    with pytest.raises(DataError, match=r"masks named otherwise need --mask_suffix"):
        run_split(data, tmp_path / "run")
    scan = find_pairs(data / "images", data / "labels", "_mask")
    reasons = {p.name: reason for p, kind, reason in scan.rejected if kind == "orphan"}
    assert "pass --mask_suffix=_label" in reasons["t0_label.png"]
    assert run_split(data, tmp_path / "run", "--mask_suffix=_label") == 0
    # A copy of a mask beside it was met with --mask_suffix=_label (copy), which pairs no other tile.
    write_image(data / "labels" / "t0_label (copy).png", read_image(data / "labels" / "t0_label.png"))
    scan = find_pairs(data / "images", data / "labels", "_label")
    reasons = {p.name: reason for p, kind, reason in scan.rejected if kind == "orphan"}
    assert "another copy of t0's mask t0_label: left out" in reasons["t0_label (copy).png"]
    assert "--mask_suffix=" not in reasons["t0_label (copy).png"]


def test_masks_named_as_their_numbered_images_are_met_with_the_empty_suffix(tmp_path: Path) -> None:
    """labels/10.png beside images/1.png and images/10.png: 10.png's mask, not 1.png's named with a suffix "0"."""
    data = write_named_tiles(tmp_path / "data", {f"{i}.png": f"{i}.png" for i in (1, 10, 11)})
    scan = find_pairs(data / "images", data / "labels", "_mask")
    reasons = {p.name: reason for p, kind, reason in scan.rejected if p.parent.name == "labels"}
    assert all("pass --mask_suffix= (empty)" in reasons[f"{i}.png"] for i in (1, 10, 11))
    assert "--mask_suffix=0" not in reasons["10.png"] and "--mask_suffix=1" not in reasons["11.png"]


def test_an_ignore_index_that_swallows_a_class_is_refused_or_named(
    square_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The old code split 0/255 masks under --ignore_index=0 as all farmland, silently.
    with pytest.raises(ValueError, match=r"--ignore_index=0: 0 is background in every mask"):
        run_split(square_data, tmp_path / "run", "--ignore_index=0")
    assert run_split(square_data, tmp_path / "run", "--ignore_index=255") == 0
    assert "--ignore_index=255 makes every pixel of value 255 unlabelled" in caplog.text
    caplog.clear()
    for mask in (square_data / "labels").iterdir():  # 16-bit masks: 65535 = farmland
        write_image(mask, (read_image(mask)[:, :, 0] > 0).astype(np.uint16) * 65535)
    assert run_split(square_data, tmp_path / "run", "--ignore_index=65535") == 0
    assert "--ignore_index=65535 makes every pixel of value 65535 unlabelled" in caplog.text


def test_bad_pairs_are_reported_and_the_rest_split(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(8):
        write_pair(data, f"good{i}", *square_tile(rng))
    image, mask = square_tile(rng)
    write_pair(data, "lossy", image, np.where(mask > 0, 250, 3).astype(np.uint8))
    write_pair(data, "smaller", image, mask[:20])
    write_image(data / "labels" / "corrupt_mask.png", mask)
    (data / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    whole = write_geotiff(tmp_path / "whole.tif", image.transpose(2, 0, 1), None, Affine.identity())
    (data / "images" / "cut.tif").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    write_image(data / "labels" / "cut_mask.png", mask)
    huge = write_geotiff(data / "images" / "huge.tif", image.transpose(2, 0, 1), None, Affine.identity())
    declare_size(huge, 1_000_000, 1_000_000)  # a corrupt header, or a whole scene among the tiles
    write_image(data / "labels" / "huge_mask.png", mask)
    assert run_split(data, tmp_path / "run") == 1
    found = rejected(tmp_path / "run")
    assert found["lossy.png"][0] == "error" and "holds values {3, 250}" in found["lossy.png"][1]
    assert (
        found["smaller.png"][0] == "error"
        and "image is 32x32 pixels but its mask smaller_mask.png is 32x20" in found["smaller.png"][1]
    )
    assert found["corrupt.png"][0] == "error" and "not a readable image" in found["corrupt.png"][1]
    assert found["cut.tif"][0] == "error" and "not a readable image" in found["cut.tif"][1]
    assert found["huge.tif"][0] == "error" and "declares 1000000 x 1000000 pixels in 3 band(s)" in found["huge.tif"][1]
    said = (tmp_path / "run" / "logs" / "split_dataset.log").read_text(encoding="utf-8")
    assert "cut.tif: not a readable image" in said and "rasterio" not in said  # GDAL's own notes kept out
    assert "holds values {3, 250}" in caplog.text
    corrupt = data / "images" / "corrupt.png"
    assert f"error {corrupt}: not a readable image" in caplog.text  # the file named once
    summary = json.loads((tmp_path / "run" / "splits" / "summary.json").read_text())
    assert summary["train"] + summary["val"] + summary["test"] == 8 and summary["errors"] == 5
    # With a threshold the lossy mask becomes usable.
    assert run_split(data, tmp_path / "run2", "--mask_threshold=128") == 1  # the other four are still broken
    assert "lossy.png" not in rejected(tmp_path / "run2")


def test_float_tiles_are_checked_pixel_by_pixel(tmp_path: Path) -> None:
    # The range was checked at the first pixel only: training then stopped in a loader worker on such a tile.
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(6):
        write_pair(data, f"good{i}", *square_tile(rng))
    image, mask = square_tile(rng)
    bright = np.full(image.shape, 5.0, np.float32)
    bright[0, 0] = 0.2
    holes = (image / 255).astype(np.float32)
    holes[5:9, 5:9] = np.nan
    for stem, pixels in (("bright", bright), ("holes", holes), ("fine", (image / 255).astype(np.float32))):
        write_pair(data, stem, pixels, mask, ext=".tif")
    assert run_split(data, tmp_path / "run") == 1
    found = rejected(tmp_path / "run")
    assert found["bright.tif"][1].endswith("values outside [0, 1] (found 0.2 to 5); rescale it to [0, 1] or 8/16 bit")
    assert "bright.tif: floating-point image" in found["bright.tif"][1]
    assert "holes.tif: floating-point image with NaN pixels (nodata?); fill them with 0" in found["holes.tif"][1]
    assert "declare NaN the TIFF's nodata value (gdal_edit.py -a_nodata nan " in found["holes.tif"][1]
    assert set(found) == {"bright.tif", "holes.tif"}  # the float tile in [0, 1] is split with the rest


def test_quality_filter_drops_mostly_nodata_tiles(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(6):
        write_pair(data, f"t{i}", *square_tile(rng))
    image, mask = square_tile(rng)
    image[:, :24] = 0  # 75 % nodata
    write_pair(data, "edge", image, mask)
    assert run_split(data, tmp_path / "run") == 0
    kind, reason = rejected(tmp_path / "run")["edge.png"]
    assert kind == "filtered" and "75% of pixels are nodata" in reason
    assert run_split(data, tmp_path / "run_all", "--max_nodata_fraction=1") == 0
    assert "edge.png" not in rejected(tmp_path / "run_all")


def test_transparent_pixels_of_an_rgba_png_count_as_nodata(tmp_path: Path) -> None:
    # The alpha band is dropped on reading, so a tile 75 % transparent (white there, as exports draw it) was kept.
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(6):
        write_pair(data, f"t{i}", *square_tile(rng))
    image, mask = square_tile(rng)
    alpha = np.full(image.shape[:2], 255, np.uint8)
    image[:, :24], alpha[:, :24] = 255, 0
    write_pair(data, "clipped", np.dstack([image, alpha]), mask)
    assert run_split(data, tmp_path / "run") == 0
    kind, reason = rejected(tmp_path / "run")["clipped.png"]
    assert kind == "filtered" and "75% of pixels are nodata (all bands 0, or transparent)" in reason


def test_pixels_of_a_tiffs_declared_nodata_count_as_nodata(tmp_path: Path) -> None:
    # A 4-band 16-bit tile 87 % of its declared nodata 65535 (not 0) was kept: only all-zero pixels counted.
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(6):
        image, mask = square_tile(rng)
        bands = np.concatenate([image, image[:, :, :1]], axis=2).transpose(2, 0, 1).astype(np.uint16) * 257
        if i == 0:
            bands[:, :28] = 65535
        write_geotiff(data / "images" / f"t{i}.tif", bands, None, Affine.identity(), nodata=65535)
        write_image(data / "labels" / f"t{i}_mask.png", mask)
    assert run_split(data, tmp_path / "run", "--in_channels=4") == 0
    kind, reason = rejected(tmp_path / "run")["t0.tif"]
    assert kind == "filtered" and "88% of pixels are nodata (all bands 0 or the declared nodata 65535)" in reason
    assert len(rejected(tmp_path / "run")) == 1


def test_empty_or_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"images: folder not found"):
        run_split(tmp_path / "nothing", tmp_path / "run")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "labels").mkdir()
    with pytest.raises(DataError, match="no usable image/mask pairs"):
        run_split(tmp_path / "empty", tmp_path / "run")


def test_a_missing_folder_names_what_data_dir_holds(tmp_path: Path) -> None:
    # "folder not found" alone left a data set's own image/ and label/ folders, or a mistyped data_dir, to guess.
    with pytest.raises(DataError, match=r"nothing does not exist either: check --data_dir"):
        run_split(tmp_path / "nothing", tmp_path / "run")
    data = tmp_path / "耕地 数据集"
    (data / "image").mkdir(parents=True)
    (data / "label").mkdir()
    with pytest.raises(
        DataError, match=r"holds the folder\(s\) image, label: name the one with the images as --image_"
    ):
        run_split(data, tmp_path / "run")
    with pytest.raises(DataError, match=r"labels: folder not found.* the masks as --label_subdir=NAME"):
        run_split(data, tmp_path / "run", "--image_subdir=image")
    write_image(data / "image" / "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"image holds images itself and no folders: point --data_dir at the folder"):
        run_split(data / "image", tmp_path / "run")


def test_bands_that_do_not_fit_in_channels_are_refused_once(square_data: Path, tmp_path: Path) -> None:
    # Each tile was refused as "has 3 band(s)" (the bands picked), with an example of three bands for four.
    message = r"--bands=4,3,2 picks 3 band\(s\) but in_channels=4; set --in_channels=3 or pick 4 bands \(for "
    message += r"example --bands=1,2,3,4\)"
    with pytest.raises(ValueError, match=message):
        run_split(square_data, tmp_path / "run", "--bands=4,3,2", "--in_channels=4")
    assert not (tmp_path / "run" / "splits").exists()
    assert run_split(square_data, tmp_path / "run", "--bands=2") == 0  # one band, repeated into three grey ones


def test_bad_ratios_are_refused(square_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        run_split(square_data, tmp_path / "run", "--split_ratios=0.8,0.3,0.1")
    # nan passed every check and split the tiles 1 / 11 / 12 of 24 without a word.
    for ratios in ("nan,0.5,0.5", "0.5,nan,0.5"):
        with pytest.raises(ValueError, match=f"split_ratios={ratios}: expected three non-negative fractions"):
            run_split(square_data, tmp_path / "run", f"--split_ratios={ratios}")
    assert not (tmp_path / "run" / "splits").exists()


@pytest.mark.parametrize("value", ["-0.5", "1.5"])
def test_a_nodata_share_outside_0_to_1_is_refused(square_data: Path, tmp_path: Path, value: str) -> None:
    # -0.5 left every tile out as "0% of pixels are nodata > max_nodata_fraction=-0.5".
    with pytest.raises(ValueError, match=rf"--max_nodata_fraction={value}: expected a share of the pixels from 0 to 1"):
        run_split(square_data, tmp_path / "run", f"--max_nodata_fraction={value}")
    assert not (tmp_path / "run").exists()


def test_tiles_of_another_size_are_reported(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(5):
        write_pair(data, f"t{i}", *square_tile(rng))
    write_pair(data, "big", *square_tile(rng, 48))
    assert run_split(data, tmp_path / "run") == 1
    kind, reason = rejected(tmp_path / "run")["big.png"]
    assert kind == "error" and "is 48x48 pixels but most tiles are 32x32" in reason


def test_group_pattern_keeps_each_scene_in_one_split(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tmp_path / "scenes"
    rng = np.random.default_rng(1)
    for scene in range(10):
        for row in range(2):
            for col in range(2):
                write_pair(data_dir, f"s{scene:02d}_r{row}c{col}", *square_tile(rng, 16))
    write_pair(data_dir, "loose tile", *square_tile(rng, 16))  # matches no scene: a group of its own
    run_dir = tmp_path / "run"
    assert run_split(data_dir, run_dir, r"--group_pattern=^(.+)_r\d+c\d+$") == 0
    scene_of = {}
    for name in ("train", "val", "test"):
        for image, _ in read_pair_list(run_dir / "splits" / f"{name}.txt"):
            scene = image.stem.split("_r")[0]
            assert scene_of.setdefault(scene, name) == name, f"{scene} is in {scene_of[scene]} and {name}"
    summary = json.loads((run_dir / "splits" / "summary.json").read_text())
    # 11 groups: 8.8 -> 9 train, 1 val, 1 test (val and test rounded first); every tile placed once.
    assert summary["groups"] == {"train": 9, "val": 1, "test": 1}
    assert "the val split holds 1 scene(s), which the best epoch and the threshold are chosen on" in caplog.text
    assert "the test split holds 1 scene(s)" in caplog.text
    # The pattern is shown as typed (one backslash), so the line can be copied back into a command.
    assert r"1 of 41 tile names do not match --group_pattern='^(.+)_r\d+c\d+$'" in caplog.text
    assert summary["train"] + summary["val"] + summary["test"] == 41
    # Without the pattern the same tiles split by tile, and scenes leak across splits.
    assert run_split(data_dir, tmp_path / "by_tile") == 0
    splits_of: dict[str, set[str]] = {}
    for name in ("train", "val", "test"):
        for image, _ in read_pair_list(tmp_path / "by_tile" / "splits" / f"{name}.txt"):
            splits_of.setdefault(image.stem.split("_r")[0], set()).add(name)
    assert any(len(names) > 1 for names in splits_of.values())


def test_bad_group_pattern_is_refused_with_an_example(square_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a valid regular expression"):
        run_split(square_data, tmp_path / "run", "--group_pattern=(unclosed")
    # The pattern is shown as it is typed in the shell, not as Python writes the string ('\\d' for \d).
    pattern = r"^(.+_r\d+c\d+$"
    with pytest.raises(ValueError) as refused:
        run_split(square_data, tmp_path / "run", f"--group_pattern={pattern}")
    assert str(refused.value).startswith(f"--group_pattern={shell_quoted(pattern)}: not a valid regular expression")


def test_a_group_pattern_that_makes_one_scene_of_every_tile_is_refused(square_data: Path, tmp_path: Path) -> None:
    # '^t' has no group and matches every stem the same way: the old code split every tile into train, exit 0.
    with pytest.raises(ValueError, match=r"--group_pattern='\^t' puts all 20 tiles in one scene \('t'\)"):
        run_split(square_data, tmp_path / "run", "--group_pattern=^t")
    assert not (tmp_path / "run" / "splits" / "train.txt").exists()


def test_tiles_of_a_single_scene_under_make_tiles_pattern_are_told_so(square_data: Path, tmp_path: Path) -> None:
    """make_tiles.py's next step gives this pattern: for one scene's tiles the message must not offer it again as the
    fix, and shows the pattern as typed (one backslash)."""
    for path in [*(square_data / "images").iterdir(), *(square_data / "labels").iterdir()]:
        row = path.stem.split()[1][:2]  # "tile 07" or "tile 07_mask"
        path.rename(path.with_name(path.name.replace(f"tile {row}", f"GF2_r{row}c0")))
    with pytest.raises(ValueError, match=r"puts all 20 tiles in one scene \('GF2'\)") as refused:
        run_split(square_data, tmp_path / "run", r"--group_pattern=^(.+)_r\d+c\d+$")
    assert r"--group_pattern='^(.+)_r\d+c\d+$' puts" in str(refused.value) and "tile more scenes" in str(refused.value)


def test_the_example_group_pattern_is_quoted_for_the_users_shell_as_the_pattern_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The example pattern was written in single quotes on Windows too, where cmd.exe passes them on as part of the
    # pattern (and takes ^ as its escape outside double quotes): the copied pattern then matched no tile name.
    pairs = [(Path(f"t{i}.png"), Path(f"t{i}_mask.png")) for i in range(3)]
    with monkeypatch.context() as windows:  # undone before the asserts, which pytest reports with paths
        windows.setattr(files.os, "name", "nt")
        with pytest.raises(ValueError) as invalid:
            scene_groups(pairs, "(unclosed")
        with pytest.raises(ValueError) as one_scene:
            split_dataset._scenes_of(pairs, "^t")
    example = r'--group_pattern="^(.+)_r\d+c\d+$"'
    assert str(invalid.value).endswith(f"use {example}")
    assert str(one_scene.value).startswith('--group_pattern="^t" puts') and str(one_scene.value).endswith(example)


def test_each_alternative_of_a_group_pattern_may_hold_the_group() -> None:
    stems = ["a_r0c1", "a_r1c0", "b_7", "b_8", "lone"]
    pairs = [(Path(f"{stem}.png"), Path(f"{stem}_mask.png")) for stem in stems]
    groups, unmatched = scene_groups(pairs, r"^(.+)_r\d+c\d+$|^(.+)_\d+$")
    assert groups == ["a", "a", "b", "b", "lone"] and unmatched == 1
    assert scene_groups(pairs, r"^[ab]")[0] == ["a", "a", "b", "b", "lone"]  # no group: the whole match


def test_imbalance_by_hand() -> None:
    farmland, labelled = np.array([8, 0, 4, 0]), np.array([8, 8, 8, 8])  # shares 1, 0, 0.5, 0; whole 3/8
    # val = group 2 (0.5, off by 1/8), test = group 3 (0, off by 3/8); the rarer class's share is 3/8.
    assert imbalance(np.array([0, 1, 2, 3]), [2, 1, 1], farmland, labelled) == pytest.approx(1.0)
    assert imbalance(np.array([1, 3, 0, 2]), [2, 1, 1], farmland, labelled) == pytest.approx((5 / 8) / (3 / 8))
    assert imbalance(np.array([0, 1, 2, 3]), [4, 0, 0], farmland, labelled) == 0.0  # nothing held out
    assert imbalance(np.array([0, 1]), [0, 1, 1], np.array([0, 0]), np.array([0, 0])) == 0.0  # nothing labelled


def test_the_farmland_share_is_of_labelled_pixels() -> None:
    # One farmland pixel in a tile otherwise unlabelled, and a labelled background tile: 1 of 101 pixels.
    assert split_share([(1, 1), (0, 100)]) == round(1 / 101, 4)
    assert split_share([(0, 0)]) is None and split_share([]) is None


def scene_pairs(count: int) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Two tiles of each of ``count`` scenes (paths only) and the scene of each."""
    pairs = [(Path(f"s{i:02d}_r0c{c}.png"), Path(f"s{i:02d}_r0c{c}_mask.png")) for i in range(count) for c in (0, 1)]
    return pairs, [p[0].stem[:3] for p in pairs]


FARMLAND_SCENES = {"s00", "s03", "s07", "s11", "s16"}  # 5 of 20 scenes all farmland, the rest none: 0.25


def test_stratified_split_gives_val_and_test_the_whole_sets_farmland() -> None:
    pairs, groups = scene_pairs(20)
    pixels = [(64, 64) if g in FARMLAND_SCENES else (0, 64) for g in groups]
    share = {pair: p[0] / p[1] for pair, p in zip(pairs, pixels)}
    plain_off = 0
    for seed in range(12):
        plain = split_pairs(pairs, (0.6, 0.2, 0.2), seed, groups)
        stratified = split_pairs(pairs, (0.6, 0.2, 0.2), seed, groups, pixels)
        for name in ("val", "test"):
            assert np.mean([share[p] for p in stratified[name]]) == 0.25  # one farmland scene of four
        plain_shares = [np.mean([share[p] for p in plain[name]]) for name in ("val", "test")]
        if plain_shares == [0.25, 0.25]:
            assert stratified == plain  # a plain shuffle that is balanced already is kept
        else:
            plain_off += 1
        assert sorted(p for part in stratified.values() for p in part) == sorted(pairs)
    assert plain_off >= 6  # the plain shuffles mostly are not balanced: the test above can fail
    # Unlabelled tiles weigh nothing: a scene of ignored pixels changes no share.
    unlabelled = [(0, 0) if g == "s19" else p for g, p in zip(groups, pixels)]
    assert all(0 < len(part) for part in split_pairs(pairs, (0.6, 0.2, 0.2), 0, groups, unlabelled).values())


def test_main_stratifies_unless_told_not_to(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(20):
        mask = np.full((8, 8), 255 if f"s{i:02d}" in FARMLAND_SCENES else 0, np.uint8)
        write_pair(data, f"s{i:02d}_r0c0", np.full((8, 8, 3), 100, np.uint8), mask)
    shares = {}
    for flag in ("true", "false"):
        assert run_split(data, tmp_path / flag, "--split_ratios=0.6,0.2,0.2", "--seed=1", f"--stratify={flag}") == 0
        shares[flag] = json.loads((tmp_path / flag / "splits" / "summary.json").read_text())["farmland_share"]
    assert shares["true"] == {"train": 0.25, "val": 0.25, "test": 0.25}
    assert shares["false"] != shares["true"]  # seed 1's plain shuffle is off balance


def test_a_split_that_cannot_be_balanced_is_the_closest_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    pairs, groups = scene_pairs(3)
    pixels = [(9, 9) if g == "s00" else (0, 9) for g in groups]
    splits = split_pairs(pairs, (0.34, 0.33, 0.33), 5, groups, pixels)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [2, 2, 2]
    assert "no split of these 3 scenes gives val and test about the whole set's farmland share" in caplog.text
    assert "off by 100%" in caplog.text and BALANCE_TOLERANCE < 1.0


def test_a_new_split_warns_of_lost_flipped_copies_and_of_a_model_trained_on_the_old_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    rng = np.random.default_rng(0)
    for i in range(10):
        write_pair(data, f"t{i}", *square_tile(rng))
    assert run_split(data, run) == 0
    train = read_pair_list(run / "splits" / "train.txt")
    copy = (run / "augmented" / "images" / "t0_flip.png", run / "augmented" / "labels" / "t0_flip_mask.png")
    write_pair_list(run / "splits" / "train.txt", [*train, copy])  # as augment.py extends it
    caplog.clear()
    assert run_split(data, run) == 0
    assert "leaves out the 1 flipped copies that augment.py added" in caplog.text
    assert "changed" not in caplog.text  # the same split: the user's own tiles are where they were
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best.pth").write_bytes(b"")
    caplog.clear()
    assert run_split(data, run, "--seed=7") == 0
    assert "split(s) changed, but" in caplog.text and "best.pth was trained on the earlier split" in caplog.text
    caplog.clear()
    assert run_split(data, run, "--seed=7") == 0
    assert "changed" not in caplog.text and "flipped" not in caplog.text


def test_masks_without_any_farmland_are_warned_of(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    for i in range(6):
        image, _ = square_tile(rng)
        write_pair(tmp_path / "data", f"t{i}", image, np.zeros(image.shape[:2], np.uint8))
    assert run_split(tmp_path / "data", tmp_path / "run") == 0
    assert "no mask holds any farmland" in caplog.text


def test_jpeg_tiles_a_viewer_shows_turned_are_warned_of(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A phone's or a camera's JPEG turned by its EXIF orientation (6: 90 degrees clockwise) was read as stored,
    # without a word, while its mask may have been drawn on the turned view a viewer shows.
    for index in range(4):
        image, mask = square_tile(np.random.default_rng(index), 32)
        image_path, _ = write_pair(tmp_path / "data", f"t{index}", image, mask, ext=".jpg")
        if index < 2:
            exif = Image.Exif()
            exif[0x0112] = 6
            Image.fromarray(image).save(image_path, exif=exif, quality=95)
    assert run_split(tmp_path / "data", tmp_path / "run", "--mask_threshold=128") == 0
    said = [r.getMessage() for r in caplog.records if "EXIF orientation" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("2 JPEG tile(s) (")
    assert "t0.jpg" in said[0] and "t1.jpg" in said[0] and "t2.jpg" not in said[0]


def test_two_scenes_leave_val_and_test_without_a_scene_and_say_what_to_do(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "scenes"
    rng = np.random.default_rng(2)
    for scene in ("a", "b"):
        for col in range(4):
            write_pair(data_dir, f"{scene}_r0c{col}", *square_tile(rng, 16))
    run_dir = tmp_path / "run"
    assert run_split(data_dir, run_dir, r"--group_pattern=^(.+)_r\d+c\d+$") == 0
    assert json.loads((run_dir / "splits" / "summary.json").read_text())["groups"] == {"train": 2, "val": 0, "test": 0}
    assert "the val split holds no scene, though the best epoch and the threshold are chosen on it" in caplog.text
    assert "the test split holds no scene, though the scores come from it" in caplog.text
    assert "none of the 2 scene(s)" in caplog.text and "holds 0 scene(s)" not in caplog.text


def test_a_val_or_test_split_without_farmland_is_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    # A split by scene put a scene without farmland in val: split_dataset.py only logged "val 0.0" among the
    # shares, and training then kept its last epoch at 0.5 without a choice.
    pairs = {name: [(Path(f"{name}{i}.png"), Path(f"{name}{i}_mask.png")) for i in range(2)] for name in SPLIT_NAMES}
    pixels_of = {p: (0 if name == "val" else 1, 100) for name, ps in pairs.items() for p in ps}
    with caplog.at_level("WARNING", logger="split_dataset"):
        split_dataset.warn_no_farmland(pairs, pixels_of, stratify=False)
    assert "the val split holds no farmland in its 2 tile(s)" in caplog.text and "test split" not in caplog.text
    assert "--stratify=true balances farmland" in caplog.text  # offered where the split was not balanced
    caplog.clear()
    with caplog.at_level("WARNING", logger="split_dataset"):
        split_dataset.warn_no_farmland(pairs, dict.fromkeys(pixels_of, (0, 100)), stratify=True)  # warned elsewhere
        assert not caplog.text
        # One farmland pixel in 100,000 is a share of 0.0 to 4 places, but farmland.
        pixels_of |= {pairs["val"][0]: (1, 100_000)} | {p: (0, 100) for p in pairs["test"]}
        split_dataset.warn_no_farmland(pairs, pixels_of, stratify=True)
    assert "val split" not in caplog.text and "the test split holds no farmland" in caplog.text
    assert "--stratify" not in caplog.text  # already on: only another seed or share can help


def test_tiles_named_by_scene_but_split_by_tile_are_told_of_the_group_pattern(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # make_tiles.py's <scene>_r<row>c<col> names were split tile by tile without a word, which flatters the test
    # figures with neighbours of training tiles.
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for scene in ("a", "b", "c"):
        for row in range(3):
            write_pair(data, f"{scene}_r{row * 256}c0", *square_tile(rng))
    hint = "all read <scene>_r<row>c<col>, from 3 scenes, but no --group_pattern is given"
    with caplog.at_level("INFO", logger="split_dataset"):
        assert run_split(data, tmp_path / "run") == 0
        assert hint in caplog.text and r"--group_pattern='^(.+)_r\d+c\d+$' keeps each scene" in caplog.text
        caplog.clear()
        assert run_split(data, tmp_path / "run2", r"--group_pattern=^(.+)_r\d+c\d+$") == 0
        write_pair(data, "other", *square_tile(rng))  # not every name is a scene's tile: no advice
        assert run_split(data, tmp_path / "run3") == 0
        # Scenes of one tile each: split by tile is split by scene, and no tile neighbours another.
        for scene in ("d", "e", "f", "g"):
            write_pair(tmp_path / "single", f"{scene}_r0c0", *square_tile(rng))
        assert run_split(tmp_path / "single", tmp_path / "run4") == 0
    assert "no --group_pattern is given" not in caplog.text


def test_8_bit_tiles_beside_16_bit_tiles_of_10_bit_dn_are_warned_of(
    square_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A labelling tool's 8-bit PNG tiles beside make_tiles.py's 16-bit tiles of 10-bit DN: scaled by 1/255 and
    1/65535 the same land lies 64 times apart, and the split, training and its scores said nothing. 16-bit tiles
    stretched over the full range sit on the 8-bit scale and are not warned of."""
    rng = np.random.default_rng(1)
    for i in range(4):
        image, mask = square_tile(rng)
        write_pair(square_data, f"dn {i}", image.astype(np.uint16) * 4, mask, ext=".tif")  # 10-bit DN
    with caplog.at_level("WARNING"):
        assert run_split(square_data, tmp_path / "run") == 0
    warned = [r.getMessage() for r in caplog.records if "pixel types" in r.getMessage()]
    assert len(warned) == 1 and "4 uint16 (e.g. " in warned[0] and "20 uint8 (e.g. " in warned[0]
    assert "move the uint16 tiles out of the data folder" in warned[0]
    caplog.clear()
    for i in range(4):
        image, mask = square_tile(rng)
        write_pair(square_data, f"dn {i}", image.astype(np.uint16) * 257, mask, ext=".tif")  # full 16-bit range
    with caplog.at_level("WARNING"):
        assert run_split(square_data, tmp_path / "run2") == 0
    assert "pixel types" not in caplog.text


def test_tiles_in_sub_folders_are_reported_not_silently_left_out(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(5):
        write_pair(data, f"t{i}", *square_tile(rng))
    for i in range(3):  # a survey's tiles filed by district: images/north/n0.png, labels/north/n0_mask.png
        image, mask = square_tile(rng)
        write_image(data / "images" / "north" / f"n{i}.png", image)
        write_image(data / "labels" / "north" / f"n{i}_mask.png", mask)
    (data / "images" / ".thumbs").mkdir()
    write_image(data / "images" / ".thumbs" / "t0.png", image)  # hidden folders are passed over
    assert run_split(data, tmp_path / "run") == 0
    found = rejected(tmp_path / "run")
    assert set(found) == {"north"}  # one row per folder (both have that name), not one per tile
    with open(tmp_path / "run" / "splits" / "rejected.csv", encoding="utf-8-sig") as handle:
        rows = {Path(r["file"]).parent.name: r for r in csv.DictReader(handle)}
    assert rows["images"]["kind"] == "orphan" and "3 image file(s), none of them read" in rows["images"]["reason"]
    assert "--image_subdir" in rows["images"]["reason"] and "--label_subdir" in rows["labels"]["reason"]
    summary = json.loads((tmp_path / "run" / "splits" / "summary.json").read_text(encoding="utf-8"))
    assert summary["orphans"] == 2


def test_a_mask_folder_inside_the_image_folder_is_not_reported_as_nested(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(5):  # images in the data folder itself, their masks in data/labels
        image, mask = square_tile(rng)
        write_image(data / f"t{i}.png", image)
        write_image(data / "labels" / f"t{i}_mask.png", mask)
    scan = find_pairs(data, data / "labels", "_mask")  # image_subdir=. : the masks' folder lies inside it
    assert len(scan.pairs) == 5
    assert not [row for row in scan.rejected if Path(row[0]).name == "labels"]


def test_a_long_check_logs_its_progress_where_no_bar_is_shown(
    square_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "PROGRESS_EVERY_S", 0.0)  # every item, as a check of tens of thousands does each minute
    caplog.set_level("INFO", logger="split_dataset")
    assert run_split(square_data, tmp_path / "run") == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checking pairs: ")]
    total = len(list((square_data / "images").iterdir()))
    assert lines and lines[0] == f"checking pairs: 1 of {total} pair(s) ({100 / total:.0f}%)"
    assert len(lines) == total - 1  # the last is told by the summary line


def test_b_g_r_nir_8_bit_tiff_tiles_are_split_and_sized_without_a_libtiff_note_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 4-band 8-bit TIFFs as write_image writes them: libtiff noted their extra samples once a tile, at the split's
    # nodata check and the training's pixel-size read (up to 500 lines before the first epoch).
    import logging

    import training

    rng = np.random.default_rng(0)
    pairs = []
    for i in range(10):
        image, mask = square_tile(rng)
        pairs.append(write_pair(tmp_path / "data", f"t{i}", np.dstack([image, image[:, :, :1]]), mask, ext=".tif"))
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert split_dataset.main([f"--data_dir={tmp_path / 'data'}", f"--run_dir={run_dir}", "--in_channels=4"]) == 0
    assert "TIFFReadDirectory" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert training.tiles_pixel_size(pairs) is None
    assert "TIFFReadDirectory" not in caplog.text
