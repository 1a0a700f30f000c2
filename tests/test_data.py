"""data_preprocess.py: image kinds, mask encodings, bad files, the Dataset."""

from __future__ import annotations

import logging
import os
import re
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio
import torch
from conftest import close_log_files, declare_size, write_geotiff
from PIL import Image
from rasterio.transform import Affine

import augment
import files
import split_dataset
from config import Config
from data_preprocess import (
    IGNORE,
    DataError,
    FarmlandDataset,
    colour_jitter,
    image_to_float,
    load_image,
    load_mask,
    random_d4,
    random_scale,
    read_image,
    read_pair_list,
    write_image,
)
from png_text import read_texts, with_text


def test_unicode_and_space_paths_round_trip(tmp_path: Path) -> None:
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    path = tmp_path / "田块 影像" / "图 1.png"
    write_image(path, image)
    assert (read_image(path) == image).all()  # RGB order kept, lossless


def test_rgb_is_scaled_to_unit_range_in_chw(tmp_path: Path) -> None:
    image = np.zeros((2, 3, 3), np.uint8)
    image[..., 0] = 255
    write_image(tmp_path / "a.png", image)
    out = load_image(tmp_path / "a.png", 3)
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    assert out[0].min() == 1.0 and out[1:].max() == 0.0


def test_grayscale_is_repeated_to_three_bands(tmp_path: Path) -> None:
    write_image(tmp_path / "g.png", np.full((4, 4), 51, np.uint8))
    out = load_image(tmp_path / "g.png", 3)
    assert out.shape == (3, 4, 4) and np.allclose(out, 0.2)


def test_rgba_png_drops_alpha_but_four_band_tiff_keeps_nir(tmp_path: Path) -> None:
    rgba = np.dstack([np.full((4, 4), v, np.uint8) for v in (10, 20, 30, 40)])
    write_image(tmp_path / "a.png", rgba)
    assert np.allclose(load_image(tmp_path / "a.png", 3)[:, 0, 0] * 255, [10, 20, 30])
    write_image(tmp_path / "b.tif", rgba)
    assert np.allclose(load_image(tmp_path / "b.tif", 4)[:, 0, 0] * 255, [10, 20, 30, 40])
    with pytest.raises(DataError, match=r"b\.tif: has 4 band\(s\), expected in_channels=3"):
        load_image(tmp_path / "b.tif", 3)


def test_a_four_band_8_bit_tiff_as_gdal_writes_it_by_default_keeps_its_nir(tmp_path: Path) -> None:
    # GDAL tags the fourth band of a 4-band 8-bit TIFF written without options as alpha: a B, G, R, NIR tile's
    # near-infrared band is no alpha band (it holds a spread of values), so it is kept and no pixel is blanked.
    bands = np.arange(4 * 3 * 4, dtype=np.uint8).reshape(4, 3, 4) * 5 + 1
    bands[3, 0] = 0  # NIR 0 over water
    path = tmp_path / "高分 rgbn.tif"
    with rasterio.open(path, "w", driver="GTiff", width=4, height=3, count=4, dtype="uint8") as dst:
        dst.write(bands)
    with rasterio.open(path) as src:
        assert src.colorinterp[-1] == rasterio.enums.ColorInterp.alpha  # as GDAL tags it
    assert np.array_equal(read_image(path), bands.transpose(1, 2, 0))
    assert load_image(path, 4).shape == (4, 3, 4)


def test_training_and_prediction_count_an_image_files_bands_alike_without_its_alpha(tmp_path: Path) -> None:
    # train.py recorded an RGBA PNG tile as 4 bands where an RGB+alpha TIFF was 3, and prediction counted a TIFF's
    # alpha: a network given the very kind of file it was trained on was warned of another band count.
    import scene
    import train

    rgb = np.random.default_rng(0).integers(1, 200, (3, 8, 8)).astype(np.uint8)
    alpha = np.full((1, 8, 8), 255, np.uint8)
    alpha[0, 0] = 0
    write_image(tmp_path / "rgba.png", np.concatenate([rgb, alpha]).transpose(1, 2, 0))
    write_image(tmp_path / "grey.png", rgb[0])
    with rasterio.open(tmp_path / "rgba.tif", "w", driver="GTiff", width=8, height=8, count=4, dtype="uint8") as dst:
        dst.write(np.concatenate([rgb, alpha]))  # tagged red, green, blue, alpha by GDAL's default
    with rasterio.open(tmp_path / "bgrn.tif", "w", driver="GTiff", width=8, height=8, count=4, dtype="uint8") as dst:
        dst.write(np.concatenate([rgb, rgb[:1] // 2 + 1]))  # tagged alpha too, but near-infrared values
    for name, count in {"rgba.png": 3, "rgba.tif": 3, "bgrn.tif": 4, "grey.png": 1}.items():
        path = tmp_path / name
        assert train.tile_band_count([(path, path)]) == scene.band_count(path) == count, name
    assert read_image(tmp_path / "rgba.tif").shape[2] == 3 and read_image(tmp_path / "bgrn.tif").shape[2] == 4


@pytest.mark.parametrize("opaque", [255, 65535])
def test_a_sixteen_bit_rgb_tiff_with_an_alpha_of_0_and_255_or_65535_loses_its_alpha(
    tmp_path: Path, opaque: int
) -> None:
    # gdal_translate -b 1 -b 2 -b 3 -b mask writes a 16-bit file's alpha as 0/255: it was kept as a fourth band,
    # and the tile refused as "4 band(s), expected in_channels=3".
    bands = np.random.default_rng(0).integers(1, 60000, (4, 3, 4)).astype(np.uint16)
    bands[3], bands[3, 0] = opaque, 0
    path = tmp_path / "rgba16.tif"
    with rasterio.open(path, "w", driver="GTiff", width=4, height=3, count=4, dtype="uint16") as dst:
        dst.write(bands)
        dst.colorinterp = [rasterio.enums.ColorInterp[c] for c in ("red", "green", "blue", "alpha")]
    expected = bands[:3].transpose(1, 2, 0).copy()
    expected[0] = 0  # the empty row reads as nodata
    assert np.array_equal(read_image(path), expected)
    assert load_image(path, 3).shape == (3, 3, 4)


@pytest.mark.parametrize("interleave", ["pixel", "band"])
def test_tiffs_as_gdal_writes_them_keep_every_band_in_file_order(tmp_path: Path, interleave: str) -> None:
    # Tagged grey with 3, 4 or 5 samples (gdal_translate's default): OpenCV read such a 16-bit tile as one band.
    for count in (3, 4, 5):
        bands = np.arange(count, dtype=np.uint16)[:, None, None] * 1000 + np.arange(12, dtype=np.uint16).reshape(3, 4)
        path = write_geotiff(tmp_path / f"高分 {count}.tif", bands + 1, None, Affine.identity(), interleave=interleave)
        image = read_image(path)
        assert image.dtype == np.uint16 and np.array_equal(image, bands.transpose(1, 2, 0) + 1)
    assert np.allclose(load_image(tmp_path / "高分 5.tif", 5)[:, 0, 0] * 65535, [1, 1001, 2001, 3001, 4001])
    with pytest.raises(DataError, match=r"高分 5\.tif: has 5 band\(s\), expected in_channels=3; set --in_channels=5"):
        load_image(tmp_path / "高分 5.tif", 3)
    # Written back: any band count as a TIFF, only 1, 3 or 4 as a PNG.
    write_image(tmp_path / "copy.tif", read_image(tmp_path / "高分 5.tif"))
    assert np.array_equal(read_image(tmp_path / "copy.tif"), read_image(tmp_path / "高分 5.tif"))
    with pytest.raises(DataError, match=r"copy\.png: a PNG holds 1, 3 or 4 bands of 8 or 16 bits, not .*\(3, 4, 5\)"):
        write_image(tmp_path / "copy.png", read_image(tmp_path / "高分 5.tif"))
    assert not (tmp_path / "copy.png").exists()
    # Grey with an alpha band reads as its grey band, as an RGBA PNG loses its alpha.
    grey = write_geotiff(
        tmp_path / "ga.tif",
        np.stack([bands[0], bands[0] * 0 + 255]).astype(np.uint8),
        None,
        Affine.identity(),
        alpha="YES",
    )
    assert np.array_equal(read_image(grey), bands[0].astype(np.uint8)[:, :, None])
    # RGB with an alpha band likewise (it was refused with "set --in_channels=4", training on the alpha), the
    # pixels the alpha leaves out read as nodata (all-zero), as in a scene.
    rgb = (bands[:3] % 200 + 20).astype(np.uint8)
    alpha = np.full(rgb.shape[1:], 255, np.uint8)
    alpha[0, 0] = 0
    rgba = write_geotiff(
        tmp_path / "耕地 rgba.tif",
        np.concatenate([rgb, alpha[None]]),
        None,
        Affine.identity(),
        photometric="RGB",
        alpha="YES",
    )
    expected = rgb.transpose(1, 2, 0).copy()
    expected[0, 0] = 0
    assert np.array_equal(read_image(rgba), expected)
    assert load_image(rgba, 3).shape == (3, *rgb.shape[1:])
    # A palette image gives its colours, as OpenCV did.
    palette = write_geotiff(tmp_path / "p.tif", np.array([[[0, 2, 1]]], np.uint8), None, Affine.identity())
    with rasterio.open(palette, "r+") as dst:
        dst.write_colormap(1, {0: (0, 0, 0, 255), 1: (255, 0, 0, 255), 2: (0, 128, 255, 255)})
    assert read_image(palette)[0].tolist() == [[0, 0, 0], [0, 128, 255], [255, 0, 0]]


@pytest.mark.parametrize("kind", [".png", ".jpg"])
def test_a_png_or_jpeg_under_a_tiff_name_is_read(tmp_path: Path, kind: str) -> None:
    image = np.full((8, 8, 3), (200, 100, 50), np.uint8)  # flat colour: JPEG keeps it to within a step or two
    write_image(tmp_path / f"a{kind}", image)
    (tmp_path / "a.tif").write_bytes((tmp_path / f"a{kind}").read_bytes())
    assert np.abs(read_image(tmp_path / "a.tif").astype(int) - image).max() <= 2


def test_float_tiles_are_written_as_tiffs_only(tmp_path: Path) -> None:
    image = np.linspace(0, 1, 4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    write_image(tmp_path / "f.tif", image)
    assert np.array_equal(read_image(tmp_path / "f.tif"), image)  # lossless, RGB order kept
    with pytest.raises(DataError, match=r"f\.png: a PNG holds 1, 3 or 4 bands of 8 or 16 bits, not .*float32"):
        write_image(tmp_path / "f.png", image)


def test_sixteen_bit_is_scaled_by_65535(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", np.full((3, 3, 3), 65535 // 5, np.uint16))
    assert np.allclose(load_image(tmp_path / "a.png", 3), 0.2, atol=1e-6)


def test_jpeg_and_upper_case_extension(tmp_path: Path) -> None:
    ok, data = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))
    (tmp_path / "A.JPG").write_bytes(data.tobytes())
    assert load_image(tmp_path / "A.JPG", 3).shape == (3, 8, 8)


def test_masks_0_255_and_0_1_and_threshold(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", np.array([[0, 255]], np.uint8))
    write_image(tmp_path / "b.png", np.array([[0, 1]], np.uint8))
    write_image(tmp_path / "c.png", np.array([[0, 38, 200, 255]], np.uint8))
    assert load_mask(tmp_path / "a.png").tolist() == [[0, 1]]
    assert load_mask(tmp_path / "b.png").tolist() == [[0, 1]]
    assert load_mask(tmp_path / "c.png", threshold=128).tolist() == [[0, 0, 1, 1]]


def test_lossy_mask_error_names_file_values_and_fix(tmp_path: Path) -> None:
    write_image(tmp_path / "a_mask.png", np.array([[0, 1, 38, 255]], np.uint8))
    with pytest.raises(
        DataError, match=r"a_mask\.png: holds values \{0, 1, 38, 255\}; expected only 0 and 255.*mask_threshold"
    ):
        load_mask(tmp_path / "a_mask.png")


def test_a_sixteen_bit_mask_of_0_and_65535_is_told_to_be_saved_as_8_bit(tmp_path: Path) -> None:
    # The fix offered was --ignore_index=65535, which makes all the farmland unlabelled.
    write_image(tmp_path / "a_mask.png", np.array([[0, 65535, 65535, 0]], np.uint16))
    with pytest.raises(
        DataError, match=r"a_mask\.png: holds values \{0, 65535\}.*16-bit mask with 65535 = farmland"
    ) as err:
        load_mask(tmp_path / "a_mask.png")
    assert "ignore_index" not in str(err.value)
    assert load_mask(tmp_path / "a_mask.png", threshold=128).tolist() == [[0, 1, 1, 0]]  # the fix offered works


def test_a_zero_one_mask_with_255_for_nodata_is_offered_ignore_index_not_a_cut_at_128(tmp_path: Path) -> None:
    # The first fix offered was --mask_threshold=128, which reads the nodata as farmland and the farmland as
    # background.
    write_image(tmp_path / "a_mask.png", np.array([[0, 1, 1, 255]], np.uint8))
    with pytest.raises(
        DataError, match=r"a_mask\.png: holds values \{0, 1, 255\}.*0/1 mask with 255 for nodata"
    ) as err:
        load_mask(tmp_path / "a_mask.png")
    assert "set --ignore_index=255" in str(err.value) and "not 128" in str(err.value)
    assert load_mask(tmp_path / "a_mask.png", ignore_index=255).tolist() == [[0, 1, 1, IGNORE]]
    assert load_mask(tmp_path / "a_mask.png", threshold=1).tolist() == [[0, 1, 1, 1]]


def test_float_masks_with_nan_or_a_negative_nodata_value_get_a_fix_that_works(tmp_path: Path) -> None:
    # NaN under --mask_threshold raised "cannot convert float NaN to integer", naming no file and stopping the
    # split; -9999 was met with --ignore_index=-9999, which means none.
    profile = {"driver": "GTiff", "width": 4, "height": 1, "count": 1, "dtype": "float32"}
    for name, nodata in (("nan_mask.tif", np.nan), ("minus_mask.tif", -9999.0)):
        with rasterio.open(tmp_path / name, "w", **profile) as dst:
            dst.write(np.array([[[0, 1, 1, nodata]]], np.float32))
    for threshold in (0, 128):
        with pytest.raises(DataError, match=r"nan_mask\.tif: floating-point mask with NaN pixels .*--ignore_index=128"):
            load_mask(tmp_path / "nan_mask.tif", threshold=threshold)
    with pytest.raises(DataError, match=r"minus_mask\.tif: holds values \{-9999\.0, 0\.0, 1\.0\}") as err:
        load_mask(tmp_path / "minus_mask.tif")
    assert "set --ignore_index=128" in str(err.value) and "--ignore_index=-9999" not in str(err.value)


def test_a_zero_one_mask_under_a_threshold_and_a_jpeg_mask_are_refused(tmp_path: Path) -> None:
    zero_one = np.zeros((4, 4), np.uint8)
    zero_one[1:, :3] = 1
    write_image(tmp_path / "a_mask.png", zero_one)
    with pytest.raises(DataError, match=r"a_mask\.png: holds values 0 to 1, all below --mask_threshold=128.*0/1 mask"):
        load_mask(tmp_path / "a_mask.png", threshold=128)  # it would read as all background
    assert load_mask(tmp_path / "a_mask.png", threshold=1).tolist() == zero_one.tolist()
    write_image(tmp_path / "empty_mask.png", np.zeros((1, 4), np.uint8))
    assert load_mask(tmp_path / "empty_mask.png", threshold=128).tolist() == [[0, 0, 0, 0]]  # no farmland: fine
    # A threshold past what an 8-bit mask can hold read every tile as background, with no word but "no farmland".
    write_image(tmp_path / "c_mask.png", np.array([[0, 255, 255, 0]], np.uint8))
    with pytest.raises(
        DataError, match=r"c_mask\.png: its 8-bit values reach 255 at most, and --mask_threshold=300 is"
    ):
        load_mask(tmp_path / "c_mask.png", threshold=300)
    assert load_mask(tmp_path / "c_mask.png", threshold=255).tolist() == [[0, 1, 1, 0]]
    block = np.zeros((16, 16), np.uint8)
    block[:, 8:] = 255  # an edge on JPEG's block grid: its values come back as 0 and 255 exactly, or nearly
    assert cv2.imwrite(str(tmp_path / "b_mask.jpg"), block)
    with pytest.raises(
        DataError, match=r"b_mask\.jpg: a JPEG mask; expected a lossless mask \(PNG\).*mask_threshold=128"
    ):
        load_mask(tmp_path / "b_mask.jpg")
    assert load_mask(tmp_path / "b_mask.jpg", threshold=128).tolist() == (block == 255).astype(np.uint8).tolist()


def test_a_zero_one_mask_with_unlabelled_pixels_under_a_threshold_is_refused_not_read_as_background(
    tmp_path: Path,
) -> None:
    # A 0/1 mask (a VOC or labelme palette mask's indices) with its unlabelled value (128, or VOC's 255) at or above
    # --mask_threshold=128: the unlabelled value hid the 0/1 check, and every farmland pixel read as background.
    zero_one = np.zeros((8, 8), np.uint8)
    zero_one[1:6, :5] = 1
    for unlabelled in (128, 255):
        mask = zero_one.copy()
        mask[7] = unlabelled
        write_image(tmp_path / f"u{unlabelled}_mask.png", mask)
        with pytest.raises(DataError, match=rf"u{unlabelled}_mask\.png: holds values 0 to 1, all below --mask_thr"):
            load_mask(tmp_path / f"u{unlabelled}_mask.png", threshold=128, ignore_index=unlabelled)
        read = load_mask(tmp_path / f"u{unlabelled}_mask.png", ignore_index=unlabelled)
        assert read[:7].tolist() == zero_one[:7].tolist() and (read[7] == IGNORE).all()
    # A 0/255 mask with unlabelled 128 under the same threshold is read as before.
    mask = np.where(zero_one == 1, 255, 0).astype(np.uint8)
    mask[7] = 128
    write_image(tmp_path / "w_mask.png", mask)
    assert load_mask(tmp_path / "w_mask.png", threshold=128, ignore_index=128)[:7].tolist() == zero_one[:7].tolist()


def test_a_mask_of_class_numbers_is_refused_with_a_recoding_not_a_threshold(tmp_path: Path) -> None:
    # 0 = background, 1 = farmland, 2 = water, 3 = road (labelme, GIS class exports). The refusal offered
    # --mask_threshold=128, which then read every such mask as all background; 0/1/2 was offered --ignore_index=2,
    # which leaves the water out of training and scoring, or --mask_threshold=1, which makes it farmland.

    def areas(row: list[int]) -> np.ndarray:
        """A mask of one row of classes, each an area of 3 x 3 pixels."""
        return np.kron(np.array([row], np.uint8), np.ones((3, 3), np.uint8))

    write_image(tmp_path / "a_mask.png", areas([0, 1, 2, 3]))
    write_image(tmp_path / "b_mask.png", areas([0, 1, 2, 2]))
    for threshold in (0, 128):
        with pytest.raises(DataError, match=r"a_mask\.png: holds values \{0, 1, 2, 3\}.*class numbers") as err:
            load_mask(tmp_path / "a_mask.png", threshold=threshold)
        assert "numpy.where(mask == 1, 1, 0)" in str(err.value) and "set --mask_threshold" not in str(err.value)
        with pytest.raises(DataError, match=r"b_mask\.png: holds values \{0, 1, 2\}.*2 = another class") as err:
            load_mask(tmp_path / "b_mask.png", threshold=threshold)
        assert "re-export the masks losslessly" not in str(err.value)
        assert "if 2 marks unlabelled pixels rather than a class, set --ignore_index=2" in str(err.value)
    assert "all below --mask_threshold=128" in str(err.value)
    assert load_mask(tmp_path / "b_mask.png", ignore_index=2).tolist() == areas([0, 1, IGNORE, IGNORE]).tolist()
    assert load_mask(tmp_path / "a_mask.png", threshold=2).tolist() == areas([0, 0, 1, 1]).tolist()  # asked for
    block = np.zeros((16, 16), np.uint8)
    block[6:, 3:] = 1  # a lossy 0/1 mask, rounded to 2 here and there, is not taken for class numbers
    assert cv2.imwrite(str(tmp_path / "c_mask.jpg"), block)
    with pytest.raises(DataError, match=r"c_mask\.jpg: holds values 0 to 2, .*0/1 mask.*2 is a class of its own"):
        load_mask(tmp_path / "c_mask.jpg", threshold=128)
    block[:, 3:] = 1
    block[6:9, :] = 2  # a JPEG of class numbers rounds 2 up to 3 near edges: it read as all background
    assert cv2.imwrite(str(tmp_path / "d_mask.jpg"), block)
    assert read_image(tmp_path / "d_mask.jpg").max() == 3
    with pytest.raises(DataError, match=r"d_mask\.jpg: holds values \{0, 1, 2, 3.*class numbers.*JPEG has changed"):
        load_mask(tmp_path / "d_mask.jpg", threshold=128)


def test_a_voc_mask_of_class_numbers_with_255_for_unlabelled_pixels_is_offered_the_recoding(tmp_path: Path) -> None:
    # A palette mask as labelme or VOC write it: 0 background, 1 farmland, 2 water, 255 unlabelled. It was told to
    # re-export as grayscale (it is lossless and read as its indices) or to use --mask_threshold=128, which makes
    # the unlabelled pixels farmland and the farmland background.
    mask = np.kron(np.array([[0, 1, 2, 255]], np.uint8), np.ones((3, 3), np.uint8))
    image = Image.fromarray(mask, mode="P")
    image.putpalette([0, 0, 0, 128, 0, 0, 0, 0, 128] + [0] * (252 * 3) + [224, 224, 192])
    image.save(tmp_path / "a_mask.png")
    with pytest.raises(DataError, match=r"a_mask\.png: holds values \{0, 1, 2, 255\}.*class numbers") as err:
        load_mask(tmp_path / "a_mask.png")
    message = str(err.value)
    assert "2 = another class" in message and "set --ignore_index=255" in message
    assert "numpy.where(mask == 1, 1, numpy.where(mask == 255, 255, 0))" in message
    assert "--mask_threshold=128" not in message and "grayscale, not palette" not in message
    # Under --mask_threshold=128 it read the farmland as background and the unlabelled pixels as farmland.
    with pytest.raises(DataError, match=r"under --mask_threshold=128 only the 255s would read as farmland") as err:
        load_mask(tmp_path / "a_mask.png", threshold=128)
    assert "set --ignore_index=255" in str(err.value)
    # Following it: the recoded mask, read with --ignore_index=255, keeps farmland and leaves 255 out.
    recoded = np.where(mask == 1, 1, np.where(mask == 255, 255, 0)).astype(np.uint8)
    write_image(tmp_path / "b_mask.png", recoded)
    read = np.kron(np.array([[0, 1, 0, IGNORE]], np.uint8), np.ones((3, 3), np.uint8))
    assert load_mask(tmp_path / "b_mask.png", ignore_index=255).tolist() == read.tolist()


def test_a_voc_zero_one_mask_with_255_for_unlabelled_pixels_under_a_threshold_is_refused(tmp_path: Path) -> None:
    # A VOC palette mask of 0 background, 1 farmland and 255 unlabelled (or the recoding the class-number refusal
    # offers) under --mask_threshold=128 without --ignore_index read its farmland as background and the unlabelled
    # pixels as farmland, silently.
    mask = np.kron(np.array([[0, 1, 255]], np.uint8), np.ones((3, 3), np.uint8))
    image = Image.fromarray(mask, mode="P")
    image.putpalette([0, 0, 0, 128, 0, 0] + [0] * (253 * 3) + [224, 224, 192])
    image.save(tmp_path / "a_mask.png")
    with pytest.raises(DataError, match=r"a_mask\.png: holds values \{0, 1, 255\}; under --mask_threshold=128") as err:
        load_mask(tmp_path / "a_mask.png", threshold=128)
    assert "set --ignore_index=255" in str(err.value)
    read = np.kron(np.array([[0, 1, IGNORE]], np.uint8), np.ones((3, 3), np.uint8))
    assert load_mask(tmp_path / "a_mask.png", ignore_index=255).tolist() == read.tolist()
    # A palette mask of other indices is not told to be saved as grayscale: its indices are what is read, and
    # a conversion to grey would give each colour's brightness instead.
    other = np.kron(np.array([[0, 38, 75, 255]], np.uint8), np.ones((3, 3), np.uint8))
    image = Image.fromarray(other, mode="P")
    image.putpalette([0, 0, 0] + [90, 10, 200] * 255)
    image.save(tmp_path / "c_mask.png")
    with pytest.raises(DataError, match=r"c_mask\.png: holds values \{0, 38, 75, 255\}") as err:
        load_mask(tmp_path / "c_mask.png")
    assert "grayscale" not in str(err.value)
    # A 0/255 mask with a stray 1 along an edge is read as before under the threshold.
    plain = np.kron(np.array([[0, 255]], np.uint8), np.ones((3, 3), np.uint8))
    plain[0, 2] = 1
    write_image(tmp_path / "b_mask.png", plain)
    assert load_mask(tmp_path / "b_mask.png", threshold=128).tolist() == (plain == 255).astype(np.uint8).tolist()


def test_a_tile_holding_only_the_faint_fringe_of_an_anti_aliased_mask_is_background(tmp_path: Path) -> None:
    # A tile of a resized 0/255 mask whose field lies beyond its edge holds a 1-pixel fringe of low values; it was
    # taken for class numbers and refused under --mask_threshold=128, which reads it as background.
    mask = np.zeros((8, 8), np.uint8)
    mask[7, 2:8] = [3, 7, 12, 12, 12, 7]
    write_image(tmp_path / "a_mask.png", mask)
    assert load_mask(tmp_path / "a_mask.png", threshold=128).tolist() == np.zeros((8, 8), np.uint8).tolist()
    write_image(tmp_path / "c_mask.png", np.where(mask > 0, 1 + (mask > 5), 0).astype(np.uint8))  # fainter: 1, 2
    assert load_mask(tmp_path / "c_mask.png", threshold=128).tolist() == np.zeros((8, 8), np.uint8).tolist()
    mask[2:5, 2:5] = 2  # an area of another class beside the fringe: class numbers
    write_image(tmp_path / "b_mask.png", mask)
    with pytest.raises(DataError, match=r"b_mask\.png: holds values \{0, 2, 3, 7, 12\}.*class numbers"):
        load_mask(tmp_path / "b_mask.png", threshold=128)


def test_colour_mask_with_differing_bands_is_refused(tmp_path: Path) -> None:
    mask = np.zeros((2, 2, 3), np.uint8)
    mask[0, 0] = (255, 0, 0)
    write_image(tmp_path / "m.png", mask)
    # The colours found, the most frequent first, and not a conversion to grey as the fix (red becomes 76).
    with pytest.raises(
        DataError, match=r"m\.png: colour mask drawn in 2 colour\(s\), .* \(0, 0, 0\), \(255, 0, 0\);.* 255 where"
    ):
        load_mask(tmp_path / "m.png")
    # The fix named no way to write the mask; the one it now gives, run as given, makes the mask expected.
    with pytest.raises(DataError) as err:
        load_mask(tmp_path / "m.png")
    code = re.search(r"Python, with PIL: (.*?\.save\(dst\))", str(err.value)).group(1).replace("; ", "\n")
    exec(code, {"numpy": np, "Image": Image, "src": tmp_path / "m.png", "dst": tmp_path / "m_fixed.png"})
    assert load_mask(tmp_path / "m_fixed.png").tolist() == [[1, 0], [0, 0]]
    write_image(tmp_path / "grey3.png", np.dstack([np.array([[0, 255]], np.uint8)] * 3))
    assert load_mask(tmp_path / "grey3.png").tolist() == [[0, 1]]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("content", [b"", b"not an image", None])
def test_unreadable_files(tmp_path: Path, content: bytes | None, suffix: str) -> None:
    path = tmp_path / f"bad{suffix}"
    if content is None:  # cut short
        pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        if suffix == ".tif":
            tiff = write_geotiff(tmp_path / "whole.tif", pixels.transpose(2, 0, 1), None, Affine.identity())
            content = tiff.read_bytes()[: tiff.stat().st_size // 2]
        else:
            content = cv2.imencode(".png", pixels)[1].tobytes()[:200]
    path.write_bytes(content)
    # An empty file is named as one, the first thing to look for after a copy cut short.
    what = r"an empty file \(0 bytes\)" if not content else "truncated, corrupt or not an image file"
    with pytest.raises(DataError, match=rf"bad\{suffix}: not a readable image \({what}"):
        read_image(path)
    with pytest.raises(DataError, match="cannot be read"):
        read_image(tmp_path / "missing.png")


def test_a_tiff_declaring_more_pixels_than_memory_holds_is_refused_by_name(tmp_path: Path, monkeypatch) -> None:
    # A whole scene among the tiles, or a corrupt header: numpy raised MemoryError.
    path = write_geotiff(tmp_path / "大图.tif", np.ones((4, 16, 16), np.uint16), None, Affine.identity())
    declare_size(path, 1_000_000, 1_000_000)
    message = r"大图\.tif: declares 1000000 x 1000000 pixels in 4 band\(s\), 7450\.6 GiB decoded, .* make_tiles\.py"
    with pytest.raises(DataError, match=message):
        read_image(path)
    monkeypatch.setattr("data_preprocess.available_memory", lambda: None)  # unknown: at most 4 GiB
    with pytest.raises(DataError, match=message):
        read_image(path)
    # The limit is half the free memory: a small tile passes until memory is nearly gone.
    small = write_geotiff(tmp_path / "small.tif", np.ones((4, 16, 16), np.uint16), None, Affine.identity())
    assert read_image(small).shape == (16, 16, 4)
    monkeypatch.setattr("data_preprocess.available_memory", lambda: 4 * 16 * 16 * 2 * 2 - 2)
    with pytest.raises(DataError, match=r"small\.tif: declares 16 x 16 pixels in 4 band\(s\)"):
        read_image(small)


def test_a_png_declaring_more_pixels_than_opencv_decodes_is_refused_by_name(tmp_path: Path) -> None:
    # OpenCV raised its own error (pixels <= CV_IO_MAX_IMAGE_PIXELS) instead of returning nothing.
    png = bytearray(cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1].tobytes())
    png[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR's width and height, then its checksum made again
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")
    (tmp_path / "huge.png").write_bytes(bytes(png))
    with pytest.raises(DataError, match=r"huge\.png: declares a size OpenCV will not decode .* as a GeoTIFF"):
        read_image(tmp_path / "huge.png")


def test_dataset_yields_tensors_and_checks_sizes(tmp_path: Path) -> None:
    write_image(tmp_path / "i.png", np.zeros((6, 8, 3), np.uint8))
    write_image(tmp_path / "m.png", np.full((6, 8), 255, np.uint8))
    write_image(tmp_path / "small.png", np.full((5, 8), 255, np.uint8))
    image, mask = FarmlandDataset([(tmp_path / "i.png", tmp_path / "m.png")])[0]
    assert image.shape == (3, 6, 8) and image.dtype == torch.float32
    assert mask.shape == (6, 8) and mask.dtype == torch.int64 and int(mask.sum()) == 48
    with pytest.raises(DataError, match=r"image is \(6, 8\) pixels but its mask .*small\.png is \(5, 8\)"):
        FarmlandDataset([(tmp_path / "i.png", tmp_path / "small.png")])[0]


def test_online_augmentation_moves_image_and_mask_together() -> None:
    image = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    mask = image[0].long()  # the mask equals the first band, so any shared transform keeps them equal
    seen = set()
    torch.manual_seed(0)
    for _ in range(64):
        out_image, out_mask = random_d4(image, mask)
        assert torch.equal(out_image[0].long(), out_mask)
        assert torch.equal(out_image[1] - 16, out_image[0])
        seen.add(tuple(out_mask.flatten().tolist()))
    assert len(seen) == 8  # all flips and rotations occur


def test_ignore_index_marks_unlabelled_pixels(tmp_path: Path) -> None:
    write_image(tmp_path / "m.png", np.array([[0, 128, 255]], np.uint8))
    assert load_mask(tmp_path / "m.png", ignore_index=128).tolist() == [[0, IGNORE, 1]]
    # Without it, 128 is a value the mask must not hold; the fix offered is the key, not a cut (--mask_threshold=128
    # would make those pixels farmland).
    with pytest.raises(
        DataError, match=r"\{0, 128, 255\}; .*If 128 marks unlabelled pixels .*set --ignore_index=128; else"
    ):
        load_mask(tmp_path / "m.png")
    write_image(tmp_path / "z.png", np.array([[0, 1, 255]], np.uint8))  # 0/1 masks with 255 = unlabelled
    assert load_mask(tmp_path / "z.png", ignore_index=255).tolist() == [[0, 1, IGNORE]]
    # A float mask's extra value is not offered as the (integer) key.
    write_image(tmp_path / "f.tif", np.array([[0.0, 0.5, 1.0]], np.float32))
    with pytest.raises(DataError, match=r"\{0\.0, 0\.5, 1\.0\}; expected only 0 and 255 \(or 0 and 1\)\. Re-export"):
        load_mask(tmp_path / "f.tif")


def test_scale_jitter_moves_image_and_mask_together() -> None:
    generator = torch.Generator().manual_seed(3)
    mask = torch.zeros((32, 32), dtype=torch.long)
    mask[8:20, 10:26] = 1
    mask[0:3, 0:3] = IGNORE
    image = torch.stack([mask.clamp(max=1).float()] * 3)  # every band equals the mask
    for _ in range(10):
        out_image, out_mask = random_scale(image, mask, 0.3, generator)
        assert out_image.shape == (3, 32, 32) and out_mask.shape == (32, 32)
        assert set(out_mask.unique().tolist()) <= {0, 1, IGNORE}  # nearest neighbour: no blended classes
        labelled = out_mask != IGNORE
        agree = ((out_image[0] > 0.5).long() == out_mask)[labelled].float().mean()
        assert agree > 0.95  # bilinear and nearest differ only along edges


def test_scale_jitter_keeps_the_tile_size_when_a_zoom_out_rounds_to_half() -> None:
    # On a 4 x 4 tile a factor below 0.625 rounds to 2 pixels a side: reflect padding by 2 needs more than 2.
    mask = torch.tensor([[0, 0, 1, 1]] * 4)
    image = torch.stack([mask.float()] * 3)
    sides = set()
    for seed in range(40):
        generator = torch.Generator().manual_seed(seed)
        out_image, out_mask = random_scale(image, mask, 0.49, generator)
        assert out_image.shape == (3, 4, 4) and out_mask.shape == (4, 4)
        assert set(out_mask.unique().tolist()) <= {0, 1}
        draw = float(torch.rand((), generator=torch.Generator().manual_seed(seed)))  # random_scale's first draw
        sides.add(round(4 * (1.0 + 0.49 * (2.0 * draw - 1.0))))
    assert 2 in sides  # the seeds reached the rounding that used to fail


def test_a_split_list_with_a_byte_order_mark_or_not_in_utf8(tmp_path: Path) -> None:
    listed = "images/农田 a.png\tlabels/农田 a_mask.png\nimages/b.png\tlabels/b_mask.png\n"
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + listed.encode("utf-8"))  # as Windows Notepad saves it
    assert read_pair_list(tmp_path / "bom.txt") == [
        (Path("images/农田 a.png"), Path("labels/农田 a_mask.png")),
        (Path("images/b.png"), Path("labels/b_mask.png")),
    ]
    (tmp_path / "gbk.txt").write_bytes(listed.encode("gbk"))  # a Chinese Windows editor's default
    # 农 is c5 a9 in GBK, which happens to be UTF-8 too; 田 (cc ef) is not.
    with pytest.raises(DataError, match=r"gbk\.txt:1: expected UTF-8 text, found byte 0xcc, .*; save the list as UTF"):
        read_pair_list(tmp_path / "gbk.txt")


def test_colour_jitter_keeps_range_and_grey_pixels_hue() -> None:
    generator = torch.Generator().manual_seed(0)
    grey = torch.full((3, 4, 4), 0.5)
    out = colour_jitter(grey, 0.3, generator)
    assert torch.allclose(out[0], out[1], atol=1e-5) and torch.allclose(out[1], out[2], atol=1e-5)  # hue of grey: none
    image = torch.rand((4, 8, 8), generator=generator)  # RGB + NIR
    out = colour_jitter(image, 0.5, generator)
    assert out.shape == image.shape and out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(colour_jitter(image, 0.0, generator), image.clamp(0, 1))


def test_colour_jitter_keeps_a_16_bit_tile_of_10_bit_data_on_its_own_scale() -> None:
    # Gaofen-2's 10-bit values stored in 16 bits: about 300-1000 of 65535, the bottom 1.5 % of [0, 1].
    image = torch.linspace(300, 1000, 4 * 8 * 8).reshape(4, 8, 8) / 65535.0
    for seed in range(20):
        out = colour_jitter(image, 0.1, torch.Generator().manual_seed(seed))
        assert out.min() > 0.5 * image.min()  # never blanked
        assert 0.8 < float(out.mean() / image.mean()) < 1.2  # brightened or darkened by about 10 %, not 7-fold


def test_band_statistics_and_class_counts_by_hand(tmp_path: Path) -> None:
    image = np.zeros((1, 2, 3), np.uint8)
    image[0, 0] = (255, 0, 51)
    image[0, 1] = (255, 255, 153)
    write_image(tmp_path / "i.png", image)
    write_image(tmp_path / "m.png", np.array([[0, 255]], np.uint8))
    mean, std, classes = FarmlandDataset([(tmp_path / "i.png", tmp_path / "m.png")]).statistics()
    assert mean == pytest.approx([1.0, 0.5, 0.4])
    assert std == pytest.approx([1.0, 0.5, 0.2])  # band 0 is constant: deviation 1, nothing to scale
    assert classes[:2] == [1, 1]


def test_band_statistics_leave_nodata_pixels_out(tmp_path: Path) -> None:
    image = np.zeros((2, 2, 3), np.uint8)
    image[0, 0] = (255, 0, 51)
    image[0, 1] = (255, 255, 153)  # the bottom row is nodata, as at a scene's rotated edge
    write_image(tmp_path / "i.png", image)
    write_image(tmp_path / "m.png", np.array([[0, 255], [0, 0]], np.uint8))
    mean, std, classes = FarmlandDataset([(tmp_path / "i.png", tmp_path / "m.png")]).statistics()
    assert mean == pytest.approx([1.0, 0.5, 0.4]) and std == pytest.approx([1.0, 0.5, 0.2])
    assert classes[:2] == [3, 1]  # the class counts keep every pixel


def test_a_tiles_declared_nodata_value_stays_out_of_the_statistics_and_reads_as_zero(tmp_path: Path) -> None:
    # 65535 declared as nodata around a 16-bit reflectance tile counted as full-brightness pixels: the band
    # means came out five times too bright, and the same product was then warned of at prediction.
    image = np.full((4, 4, 4), 65535, np.uint16)
    image[:2] = np.array([200, 300, 400, 2000], np.uint16)
    image[3, 3] = (65535, 300, 400, 2000)  # one band at the nodata value is a saturated pixel, not nodata
    grid = Affine(1.0, 0.0, 500000.0, 0.0, -1.0, 3500000.0)
    write_geotiff(tmp_path / "i.tif", image.transpose(2, 0, 1), None, grid, nodata=65535)
    write_image(tmp_path / "m.png", np.zeros((4, 4), np.uint8))
    dataset = FarmlandDataset([(tmp_path / "i.tif", tmp_path / "m.png")], in_channels=4)
    mean, _, _ = dataset.statistics()
    kept = image[:2].reshape(-1, 4).tolist() + [image[3, 3].tolist()]
    assert mean == pytest.approx((np.array(kept, np.float64) / 65535).mean(axis=0).tolist(), rel=1e-6)
    assert (dataset[0][0][:, 2:, :3] == 0).all()  # nodata reaches the network as 0, as make_tiles.py writes it
    # A float tile's declared -9999 is nodata too, not a value outside [0, 1]; so is a declared NaN (in any band).
    reflectance = np.full((3, 4, 4), -9999, np.float32)
    reflectance[:, :2] = 0.25
    write_geotiff(tmp_path / "f.tif", reflectance, None, grid, nodata=-9999)
    assert load_image(tmp_path / "f.tif", 3).tolist() == [[[0.25] * 4] * 2 + [[0.0] * 4] * 2] * 3
    reflectance[:, 2:] = np.nan
    reflectance[0, 0, 0] = np.nan
    write_geotiff(tmp_path / "n.tif", reflectance, None, grid, nodata=np.nan)
    assert load_image(tmp_path / "n.tif", 3).tolist() == [[[0.0] + [0.25] * 3, [0.25] * 4] + [[0.0] * 4] * 2] * 3
    # Masks keep their declared nodata value: it marks unlabelled pixels, not background.
    write_geotiff(tmp_path / "m.tif", np.array([[[0, 1], [255, 255]]], np.uint8), None, grid, nodata=255)
    assert (load_mask(tmp_path / "m.tif", ignore_index=255)[1] == IGNORE).all()


def test_a_float_tile_a_little_outside_0_to_1_is_clipped_as_scenes_are(tmp_path: Path) -> None:
    # Reflectance a little outside [0, 1] (an atmospheric correction's negatives, a bright cloud) was refused in
    # a tile ("rescale it to [0, 1]") while predict.py and make_tiles.py clip it in a scene; further out, refused.
    grid = Affine(1.0, 0.0, 500000.0, 0.0, -1.0, 3500000.0)
    reflectance = np.array([[[-0.02, 0.5], [1.03, np.nan]]] * 3, np.float32)
    write_geotiff(tmp_path / "r.tif", reflectance, None, grid)
    assert np.array_equal(load_image(tmp_path / "r.tif", 3), [[[0.0, 0.5], [1.0, np.nan]]] * 3, equal_nan=True)
    write_geotiff(tmp_path / "far.tif", reflectance * 100, None, grid)
    with pytest.raises(
        DataError, match=r"far\.tif: floating-point image with values outside \[0, 1\] \(found -2 to 103\)"
    ):
        load_image(tmp_path / "far.tif", 3)


def test_statistics_of_a_16_bit_four_band_tiff_standardise_every_band(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # 12-bit sensor values in a 16-bit file, NIR far brighter than the visible bands.
    image = np.stack(
        [
            rng.integers(0, 400, (8, 8)),
            rng.integers(0, 600, (8, 8)),
            rng.integers(0, 500, (8, 8)),
            rng.integers(2000, 4095, (8, 8)),
        ],
        axis=2,
    ).astype(np.uint16)
    write_image(tmp_path / "i.tif", image)
    write_image(tmp_path / "m.png", np.zeros((8, 8), np.uint8))
    dataset = FarmlandDataset([(tmp_path / "i.tif", tmp_path / "m.png")], in_channels=4)
    mean, std, _ = dataset.statistics()
    scaled = image.astype(np.float64) / 65535.0
    assert mean == pytest.approx(scaled.mean(axis=(0, 1)).tolist(), rel=1e-6)
    assert std == pytest.approx(scaled.std(axis=(0, 1)).tolist(), rel=1e-5)
    standardised = (dataset[0][0] - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert standardised.mean(dim=(1, 2)).abs().max() < 1e-4  # every band centred ...
    assert (standardised.std(dim=(1, 2), unbiased=False) - 1).abs().max() < 1e-3  # ... and on one scale


def test_png_text_travels_with_the_pixels(tmp_path: Path) -> None:
    mask = np.tile(np.array([[0, 255]], np.uint8), (4, 2))
    path = tmp_path / "a_seg.png"
    write_image(path, mask, {"farmland-source": "D:/农田/2022/a.tif"})
    assert read_texts(path).get("farmland-source") == "D:/农田/2022/a.tif"
    assert read_texts(path).get("farmland") is None  # a key that only begins the same
    assert np.array_equal(read_image(path)[..., 0], mask)
    with Image.open(path) as image:  # another reader checks each chunk's CRC and finds the text too
        image.load()
        assert image.info["farmland-source"] == "D:/农田/2022/a.tif"
    write_image(tmp_path / "b.png", mask)
    assert read_texts(tmp_path / "b.png").get("farmland-source") is None
    path.write_bytes(path.read_bytes()[:40])  # cut inside the text chunk
    assert read_texts(path).get("farmland-source") is None
    assert read_texts(tmp_path / "missing.png").get("farmland-source") is None
    with pytest.raises(ValueError, match="not a PNG"):
        with_text(b"GIF89a", "key", "text")
    odd_folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/\xb5\xd8/a.png"))  # GBK bytes in a folder's name
    assert files.name_problem(odd_folder) == (
        f"{tmp_path}/\\xb5\\xd8/a.png: a folder name in this path is not UTF-8 text (its bytes are in another "
        "encoding, such as GBK); rename the folder, for example with convmv -f gbk -t utf-8 --notest -r FOLDER, and "
        "run again"
    )
    assert files.name_problem(tmp_path / "农田" / "a.png") is None
    with pytest.raises(ValueError, match="printable Latin-1"):
        with_text((tmp_path / "b.png").read_bytes(), "two words", "text")


def test_figures_fall_back_to_an_installed_chinese_font(monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib
    from matplotlib import font_manager

    import figures

    monkeypatch.setitem(matplotlib.rcParams, "font.family", ["sans-serif"])
    entries = [font_manager.FontEntry(name=name) for name in ("DejaVu Sans", "Heiti SC", "SimHei")]
    monkeypatch.setattr(font_manager.fontManager, "ttflist", entries)
    figures.matplotlib_fonts.__wrapped__()
    assert matplotlib.rcParams["font.family"] == ["DejaVu Sans", "SimHei"]  # the first of CJK_FONTS installed
    monkeypatch.setattr(font_manager.fontManager, "ttflist", entries[:1])
    figures.matplotlib_fonts.__wrapped__()
    assert matplotlib.rcParams["font.family"] == ["DejaVu Sans"]


def test_names_no_font_draws_are_one_log_line_not_a_warning_per_character(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Without a Chinese font, matplotlib warned once per character and figure, with its own file and line.
    import warnings

    import matplotlib

    import figures

    figures.matplotlib_fonts()  # its fonts set first, then replaced
    monkeypatch.setitem(matplotlib.rcParams, "font.family", ["DejaVu Sans"])  # as on a machine without one
    figures.GLYPHS_SAID_TO.clear()
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        for name in ("区域 3_018", "田块 7"):
            fig, ax = figures.subplots(figsize=(2, 2))
            ax.set_title(name)
            figures.save_figure(fig, tmp_path / f"{name}.png")
    assert [str(w.message) for w in shown] == []
    assert caplog.text.count("show as empty boxes; install a Chinese font") == 1
    assert "~/.cache/matplotlib" in caplog.text and (tmp_path / "田块 7.png").is_file()


def test_names_no_font_draws_are_said_in_the_log_of_each_run_in_one_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A notebook runs miou.py's main for two run folders in one process: each run's log says it, not the first alone.
    import matplotlib

    import cli
    import figures

    figures.matplotlib_fonts()  # its fonts set first, then replaced
    monkeypatch.setitem(matplotlib.rcParams, "font.family", ["DejaVu Sans"])  # as on a machine without one
    for run in ("first", "second"):
        cli.setup_logging(Config(run_dir=str(tmp_path / run)), "miou")
        for name in ("区域 3_018", "田块 7"):
            fig, ax = figures.subplots(figsize=(2, 2))
            ax.set_title(name)
            figures.save_figure(fig, tmp_path / f"{run} {name}.png")
    close_log_files()
    for run in ("first", "second"):
        log = (tmp_path / run / "logs" / "miou.log").read_text(encoding="utf-8")
        assert log.count("show as empty boxes; install a Chinese font") == 1, run


def test_figures_leave_the_backend_of_the_process_as_it_was(tmp_path: Path) -> None:
    # A notebook draws its own figures on its own backend (Jupyter's inline one): the scripts' figures, drawn in the
    # same process, must not switch it to Agg, after which the notebook's figures are no longer shown.
    import matplotlib

    import figures

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # stands for the notebook's backend
    try:
        rows = [
            {"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e, "val_farmland_iou": 0.5, "val_miou": 0.5}
            for e in (1, 2)
        ]
        figures.plot_curves(rows, tmp_path / "training_curves.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_training_curves_tick_whole_epochs_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Three epochs drew ticks at 1.25, 1.5, 1.75, ...: epochs that do not exist.
    import figures

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: drawn.append(fig))
    rows = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e, "val_farmland_iou": 0.5, "val_miou": 0.5}
        for e in (1, 2, 3)
    ]
    figures.plot_curves(rows, tmp_path / "training_curves.png")
    for ax in drawn[0].axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_another_warning_while_figures_are_drawn_is_shown_once_not_per_figure(tmp_path: Path) -> None:
    import warnings

    import figures

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")  # Python's own: a warning once per place
        for i in range(3):
            fig, _ = figures.subplots(figsize=(2, 2))
            fig.tight_layout = lambda: warnings.warn("layout not applied (tiles of 3 sizes)", UserWarning)
            figures.save_figure(fig, tmp_path / f"{i}.png")
    assert [str(w.message) for w in shown] == ["layout not applied (tiles of 3 sizes)"]


def test_commands_in_messages_quote_paths_for_the_users_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    assert files.shell_quoted("/data/gf2 scene.tif") == "'/data/gf2 scene.tif'"
    monkeypatch.setattr(files.os, "name", "nt")  # cmd.exe keeps single quotes as part of the name
    assert files.shell_quoted(r"D:\GF2\scene.tif") == r"D:\GF2\scene.tif"
    assert files.shell_quoted(r"D:\GF2 2024\scene.tif") == r'"D:\GF2 2024\scene.tif"'


def test_images_of_an_unsupported_pixel_type_get_the_conversion_to_make(tmp_path: Path) -> None:
    for dtype, target in ((np.int8, "-ot Byte"), (np.int16, "-ot UInt16"), (np.int32, "-ot UInt16")):
        with pytest.raises(DataError, match=rf"pixel type {np.dtype(dtype)} is not supported.* {target} "):
            image_to_float(np.zeros((2, 2, 3), dtype), 3, tmp_path / "a.tif")


def test_the_augment_preview_draws_a_mask_all_farmland_white(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each mask panel was scaled to its own values: a tile all farmland (common in real scenes) came out black,
    # as if it held none.
    rng = np.random.default_rng(0)
    for i, farmland in enumerate((255, 0, 255, 0)):
        write_image(tmp_path / "data" / "images" / f"t{i}.png", (rng.random((32, 32, 3)) * 255).astype(np.uint8))
        write_image(tmp_path / "data" / "labels" / f"t{i}_mask.png", np.full((32, 32), farmland, np.uint8))
    paths = [f"--data_dir={tmp_path / 'data'}", f"--run_dir={tmp_path / 'run'}"]
    assert split_dataset.main([*paths, "--split_ratios=1,0,0"]) == 0
    figures = []
    monkeypatch.setattr(augment, "save_figure", lambda fig, path: figures.append(fig))
    assert augment.main([*paths, "--aug_prob=1", "--preview_count=4"]) == 0
    (figure,) = figures
    rows = np.array(figure.axes).reshape(4, -1)
    shown = {0: 0, 255: 0}
    for row in rows:
        for ax in row[1::2]:  # the mask panels
            image = ax.get_images()[0]
            colour = float(image.to_rgba(image.get_array())[..., 0].mean())
            assert colour in (0.0, 1.0)
            shown[255 if colour == 1.0 else 0] += 1
    assert shown == {0: 6, 255: 6}  # two tiles of each, three mask panels a tile


def test_augment_flips_a_tile_whose_mask_its_preview_cannot_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A split made with --ignore_index=128, augment.py run without it: the preview's classes raised, after the copies
    # were written and before train.txt listed them.
    rng = np.random.default_rng(0)
    for i in range(3):
        write_image(tmp_path / "data" / "images" / f"t{i}.png", (rng.random((32, 32, 3)) * 255).astype(np.uint8))
        mask = np.zeros((32, 32), np.uint8)
        mask[:16] = 255
        if i < 2:  # t2 holds no 128: its preview can be drawn
            mask[:, :4] = 128
        write_image(tmp_path / "data" / "labels" / f"t{i}_mask.png", mask)
    paths = [f"--data_dir={tmp_path / 'data'}", f"--run_dir={tmp_path / 'run'}"]
    assert split_dataset.main([*paths, "--split_ratios=1,0,0", "--ignore_index=128"]) == 0
    train = tmp_path / "run" / "splits" / "train.txt"
    assert [image.stem for image, _ in read_pair_list(train)][-1] == "t2"  # after both unreadable masks
    drawn: list = []
    monkeypatch.setattr(augment, "preview", lambda samples, *_: drawn.extend(s[0].stem for s in samples))
    with caplog.at_level(logging.WARNING):
        assert augment.main([*paths, "--aug_prob=1", "--preview_count=3"]) == 0
    assert len(read_pair_list(train)) == 3 + 3 * len(augment.FLIPS)  # every tile flipped
    warned = [r.getMessage() for r in caplog.records if "left out of the preview" in r.getMessage()]
    assert len(warned) == 1 and "--ignore_index=128" in warned[0]
    assert drawn == ["t2"]  # a later tile is previewed all the same
