"""The ``downscale`` key (resolution.py): tiles shrunk before the network and its logits grown back, by hand
and through the networks, training, prediction, scenes and the exported graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import args, close_log_files, square_tile, write_geotiff, write_pair
from rasterio.transform import Affine

import export_onnx
import exported_model
import fast_path
import predict
import resolution
import scene
import split_dataset
import train
from data_preprocess import read_image
from files import DataError
from inference import model_from_checkpoint
from net_structure import (
    build_model,
    downscale_of,
    fold_batchnorm,
    input_padding,
    model_from_config,
    smallest_batch,
)
from runtime import load_checkpoint

CPU = torch.device("cpu")


def test_shrink_averages_blocks_and_repeats_the_last_row_and_column() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert resolution.shrink(x, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # (0+1+4+5)/4 ...
    odd = torch.arange(9.0).reshape(1, 1, 3, 3)  # padded to 4 x 4 by repeating row 2 and column 2
    assert resolution.shrink(odd, 2).flatten().tolist() == [2.0, 3.5, 6.5, 8.0]
    assert resolution.shrink(x, 1) is x


def test_shrink_by_four_extends_a_side_one_past_a_block_to_a_whole_block() -> None:
    x = torch.arange(25.0).reshape(1, 1, 5, 5)  # padded to 8 x 8 by repeating row 4 and column 4 three times
    # Blocks: rows 0-3 x columns 0-3 (mean 9), column 4 alone (11.5), row 4 alone (21.5), pixel (4, 4) = 24.
    assert resolution.shrink(x, 4).flatten().tolist() == [9.0, 11.5, 21.5, 24.0]


def test_pad_to_grid_replicates_a_pad_as_long_as_the_side() -> None:
    # Reflection needs a pad shorter than the side: an 8-pixel tile padded to 16 (or 16 to a minimum of 32) is
    # replicated, not refused.
    for side, grid, minimum in ((8, 16, 0), (16, 16, 32)):
        x = torch.rand(1, 2, side, side)
        padded = resolution.pad_to_grid(x, grid, minimum)
        assert padded.shape[-2:] == (2 * side, 2 * side) and torch.equal(padded[..., :side, :side], x)
        assert torch.equal(padded[..., -1, :side], x[..., -1, :])


def test_grow_puts_block_values_at_block_centres_and_crops() -> None:
    logits = torch.tensor([[[[0.0, 4.0]]]])  # one row of two blocks
    grown = resolution.grow(logits, 2, (2, 3))
    # Columns at block coordinates -0.25 (clamped to 0), 0.25, 0.75 between the block centres 0 and 1.
    assert grown.shape == (1, 1, 2, 3)
    assert grown[0, 0, 0].tolist() == [0.0, 1.0, 3.0]
    assert grown[0, 0, 1].tolist() == [0.0, 1.0, 3.0]


@pytest.mark.parametrize("bad", [0, 3, 8, -2, 2.0, True, "2"])
def test_unsupported_factors_are_refused_with_the_valid_ones(bad: object) -> None:
    with pytest.raises(ValueError, match=r"--downscale=.*expected one of 1, 2, 4"):
        resolution.check_factor(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--downscale"):
        build_model(3, 2, 4, 0.0, "unet", bad)  # type: ignore[arg-type]


def test_train_refuses_a_bad_factor_before_reading_tiles(tmp_path: Path) -> None:
    data, run_dir = write_tiles(tmp_path / "data", count=6), tmp_path / "run"
    assert split_dataset.main(args(data, run_dir)) == 0
    with pytest.raises(ValueError, match=r"--downscale=3: expected 0 \(auto.*or one of 1, 2, 4"):
        train.main(args(data, run_dir, "--downscale=3", "--epochs=1"))
    close_log_files()


@pytest.mark.parametrize(
    "pixel, factor",
    [(0.3, 4), (0.5, 4), (0.7, 4), (0.72, 2), (1.0, 2), (1.4, 2), (1.43, 1), (2.0, 1), (10.0, 1)],
)
def test_auto_brings_the_working_pixel_nearest_two_metres(pixel: float, factor: int) -> None:
    # Switch points at 2 / sqrt(8) = 0.707 m and 2 / sqrt(2) = 1.414 m, halfway on a log scale.
    assert resolution.factor_for_pixel(pixel) == factor


@pytest.mark.parametrize("unknown", [0.0, -1.0, float("nan")])
def test_auto_works_at_half_resolution_when_the_pixel_size_is_unknown(unknown: float) -> None:
    assert resolution.factor_for_pixel(unknown) == 2


def test_auto_is_a_setting_of_the_key_but_no_factor_of_a_network() -> None:
    assert resolution.check_setting(resolution.AUTO) == 0 and resolution.check_setting(4) == 4
    for bad in (3, -1, 2.0, 0.0, True, False, "0"):
        with pytest.raises(ValueError, match=r"expected 0 \(auto"):
            resolution.check_setting(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--downscale=0"):
        build_model(3, 2, 4, 0.0, "unet", resolution.AUTO)


@pytest.mark.parametrize("pixel, factor", [(0.5, 4), (0.0, 2)])
def test_training_settles_auto_from_the_pixel_size_and_saves_the_factor(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, pixel: float, factor: int
) -> None:
    data, run_dir = write_tiles(tmp_path / "data", count=6), tmp_path / "run"  # PNG tiles: no georeference
    assert split_dataset.main(args(data, run_dir)) == 0
    keys = ["--downscale=0", f"--pixel_size_m={pixel}", "--epochs=1", "--snapshot_every=0", "--tensorboard=false"]
    with caplog.at_level("INFO"):
        assert train.main(args(data, run_dir, *keys)) == 0
    state = load_checkpoint(run_dir / "checkpoints" / "best.pth")
    assert state["config"]["downscale"] == factor and model_from_checkpoint(state, CPU).downscale == factor
    hint = "tiles of 0.5 m per pixel, the network works at 2 m" if pixel else "give --pixel_size_m=METRES"
    assert "downscale=0 (auto): " in caplog.text and hint in caplog.text
    saved = json.loads((run_dir / "configs" / "train.json").read_text(encoding="utf-8"))
    assert saved["downscale"] == 0  # the command as given; the checkpoint holds the factor chosen
    # Resuming settles auto the same way, so the checkpoint's factor matches.
    assert train.main(args(data, run_dir, *keys[:-3], "--epochs=2", "--resume=true", "--tensorboard=false")) == 0
    assert load_checkpoint(run_dir / "checkpoints" / "last.pth")["config"]["downscale"] == factor
    close_log_files()


@pytest.mark.parametrize("encoder", ["unet", "resnet18"])
@pytest.mark.parametrize("factor", [2, 4])
def test_a_shrunk_network_is_the_full_one_on_block_means_grown_back(encoder: str, factor: int) -> None:
    torch.manual_seed(0)
    shrunk = build_model(3, 2, 8, 0.0, encoder, factor).eval()
    full = build_model(3, 2, 8, 0.0, encoder).eval()
    full.load_state_dict(shrunk.state_dict())  # the factor is no weight: the same parameters fit both
    x = torch.rand(2, 3, 128, 256)  # on every grid: nothing to pad
    with torch.no_grad():
        expected = resolution.grow(full(resolution.shrink(x, factor)), factor, x.shape[-2:])
        assert torch.allclose(shrunk(x), expected, atol=1e-6)
    for shape in ((1, 3, 70, 45), (1, 3, 9, 13)):  # padded in full resolution first, then cropped back
        x = torch.rand(shape)
        with torch.no_grad():
            out, folded = shrunk(x), fold_batchnorm(shrunk)(x)
        assert out.shape == (shape[0], 2, *shape[-2:])
        assert torch.allclose(folded, out, atol=1e-4)


def test_the_factor_travels_in_the_config_and_multiplies_the_scene_grid() -> None:
    config = {"in_channels": 3, "n_classes": 2, "base_width": 4, "dropout": 0.0}
    assert model_from_config(config).downscale == 1  # checkpoints from before the key: full resolution
    assert model_from_config(config | {"downscale": 2}).downscale == 2
    assert input_padding(config) == (16, 32)  # grid and least side of the network's input
    assert input_padding(config | {"downscale": 2}) == (32, 64)
    assert input_padding(config | {"downscale": 4, "encoder": "resnet18"}) == (128, 0)
    with pytest.raises(ValueError, match="--window=496: expected a multiple of 32.*times downscale"):
        scene.SceneSettings(window=496, overlap=0, grid=32).check()
    # BatchNorm at the deepest level: a 64-pixel tile at 1/2 leaves a ResNet one cell, at full size four.
    assert (smallest_batch("resnet18", 64, 64, 2), smallest_batch("resnet18", 64, 64)) == (2, 1)


def write_tiles(data_dir: Path, count: int = 12, size: int = 64) -> Path:
    """``count`` square tiles of ``size`` pixels (seed 3)."""
    rng = np.random.default_rng(3)
    for i in range(count):
        write_pair(data_dir, f"t{i:02d}", *square_tile(rng, size))
    return data_dir


def test_train_resume_predict_scene_and_export_at_half_resolution(tmp_path: Path) -> None:
    data, run_dir = write_tiles(tmp_path / "data", size=72), tmp_path / "run"  # tiles off the grid of 32
    keys = ["--downscale=2", "--snapshot_every=0", "--tensorboard=false"]
    assert split_dataset.main(args(data, run_dir)) == 0
    assert train.main(args(data, run_dir, *keys, "--epochs=1")) == 0
    state = load_checkpoint(run_dir / "checkpoints" / "last.pth")
    assert state["config"]["downscale"] == 2 and model_from_checkpoint(state, CPU).downscale == 2
    assert train.main(args(data, run_dir, *keys, "--epochs=2", "--resume=true")) == 0
    with pytest.raises(DataError, match=r"\(downscale: checkpoint 2 vs config 1\)"):
        train.main(args(data, run_dir, "--downscale=1", "--epochs=3", "--resume=true"))
    assert predict.main(args(data, run_dir)) == 0
    masks = sorted((run_dir / "predictions").glob("*_seg.png"))
    assert masks and all(read_image(m).shape[:2] == (72, 72) for m in masks)
    with pytest.raises(ValueError, match="--window=80: expected a multiple of 32"):
        predict.main(args(data, run_dir, f"--predict_input={data / 'images'}", "--window=80", "--overlap=0"))
    with pytest.raises(ValueError, match="--window=48: expected a multiple of 32"):
        export_onnx.main(args(data, run_dir, "--window=48", "--overlap=0"))  # Deepness's tiles too
    with pytest.raises(ValueError, match="--window=32: expected a multiple of 32, at least 64"):
        export_onnx.main(args(data, run_dir, "--window=32", "--overlap=0"))  # the U-Net's least side, shrunk
    # The 8-bit copy is calibrated on the 72-pixel training tiles, padded as prediction pads them.
    assert export_onnx.main(args(data, run_dir, "--window=64", "--overlap=0", "--quantize=int8")) in (0, 1)
    report = json.loads((run_dir / "export" / "export_report.json").read_text(encoding="utf-8"))
    assert report["float32"]["max_probability_difference"] < 1e-4
    assert report["int8"]["checked"] and 0 <= report["int8"]["mask_agreement"] <= 1
    segmenter, meta = exported_model.load_segmenter(run_dir / "export" / "farmland.onnx")
    assert segmenter.downscale == 2 and segmenter.grid == 32 and meta["config"]["downscale"] == 2
    reference = model_from_checkpoint(load_checkpoint(run_dir / "checkpoints" / "best.pth"), CPU).eval()
    for shape in (
        (1, 3, 20, 30),
        (2, 3, 50, 64),
        (1, 3, 5, 7),
    ):  # padded to the grid by reflection, tiny ones by replication
        x = torch.rand(shape)
        with torch.no_grad():
            expected = reference(x).softmax(1)
        assert (segmenter(x) - expected).abs().max() < 1e-4
    close_log_files()


def test_the_fast_path_counts_a_quarter_of_the_work_at_half_resolution() -> None:
    config = {"in_channels": 3, "n_classes": 2, "base_width": 16, "dropout": 0.0}
    full, half = (fast_path.forward_gflop(config | {"downscale": f}, (3, 256, 256)) for f in (1, 2))
    assert half == pytest.approx(fast_path.forward_gflop(config, (3, 128, 128)))
    assert half == pytest.approx(full / 4)


def write_half_metre_tiles(data: Path) -> None:
    """Six GeoTIFF tiles of 0.5 m pixels in UTM (and their PNG masks) under data."""
    rng = np.random.default_rng(5)
    for i in range(6):
        image, mask = square_tile(rng, 64)
        transform = Affine(0.5, 0.0, 500000.0 + 32.0 * i, 0.0, -0.5, 4000000.0)
        write_geotiff(data / "images" / f"g{i}.tif", image.transpose(2, 0, 1), "EPSG:32650", transform)
        write_pair(data, f"g{i}", image, mask)  # the mask; its PNG image is ignored beside the GeoTIFF
        (data / "images" / f"g{i}.png").unlink()


def test_auto_reads_the_pixel_size_of_georeferenced_tiles_and_resume_names_it(tmp_path: Path) -> None:
    data, run_dir = tmp_path / "data", tmp_path / "run"
    write_half_metre_tiles(data)  # no --pixel_size_m
    keys = ["--downscale=0", "--snapshot_every=0", "--tensorboard=false"]
    assert split_dataset.main(args(data, run_dir)) == 0
    assert train.main(args(data, run_dir, *keys, "--epochs=1")) == 0
    state = load_checkpoint(run_dir / "checkpoints" / "last.pth")
    assert (state["config"]["pixel_size_m"], state["config"]["downscale"]) == (0.5, 4)
    with pytest.raises(DataError, match=r"pixel_size_m: checkpoint 0.5 vs config 2.0\).*drop --pixel_size_m"):
        train.main(args(data, run_dir, *keys, "--epochs=2", "--resume=true", "--pixel_size_m=2"))
    close_log_files()


def test_a_pixel_size_read_from_the_tiles_is_logged_at_full_resolution_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # docs/configuration.md: pixel_size_m=0 settled by training is in the log, not only with downscale=0.
    data, run_dir = tmp_path / "data", tmp_path / "run"
    write_half_metre_tiles(data)
    assert split_dataset.main(args(data, run_dir)) == 0
    with caplog.at_level("INFO"):
        assert train.main(args(data, run_dir, "--epochs=1", "--snapshot_every=0", "--tensorboard=false")) == 0
    close_log_files()
    assert load_checkpoint(run_dir / "checkpoints" / "best.pth")["config"]["pixel_size_m"] == 0.5
    assert "pixel_size_m=0: the training tiles have 0.5 m pixels" in caplog.text


def test_a_checkpoint_config_without_a_factor_is_refused_and_an_old_one_is_full_resolution() -> None:
    assert downscale_of({}) == 1 and downscale_of({"downscale": 4}) == 4
    with pytest.raises(ValueError, match="--downscale=0"):
        downscale_of({"downscale": 0})
