"""Every script's main in order on tiny data, exact resume, augmentation re-runs, predicting a folder."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import args, close_log_files, folder_digest, square_tile, weights, write_pair
from PIL import Image

import augment
import miou
import predict
import split_dataset
import train
from data_preprocess import load_mask, read_image, read_pair_list, write_image
from figures import photo_to_show
from files import DataError, file_stamp
from metrics import confusion_matrix


def test_scripts_in_order(square_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "运行 run"
    before = folder_digest(square_data)
    assert split_dataset.main(args(square_data, run_dir)) == 0
    assert augment.main(args(square_data, run_dir)) == 0
    assert train.main(args(square_data, run_dir, "--epochs=4")) == 0
    assert predict.main(args(square_data, run_dir)) == 0
    assert miou.main(args(square_data, run_dir)) == 0
    assert folder_digest(square_data) == before  # nothing written into, moved or changed in the data folder

    for name in ("split_dataset", "augment", "train", "predict", "miou"):
        assert json.loads((run_dir / "configs" / f"{name}.json").read_text())["base_width"] == 4
    for name in ("best.pth", "last.pth", "epoch_002.pth", "epoch_004.pth"):
        assert (run_dir / "checkpoints" / name).is_file()
    with open(run_dir / "train_log.csv", encoding="utf-8-sig") as handle:
        log = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in log] == [1, 2, 3, 4]
    assert [float(r["lr"]) for r in log] == pytest.approx([0.01, 0.005, 0.005, 0.0025])  # StepLR every 2 x 0.5
    for figure in (
        "training_curves.png",
        "augment_preview.png",
        "iou_per_image.png",
        "gallery_worst.png",
        "gallery_best.png",
    ):
        assert (run_dir / "figures" / figure).stat().st_size > 1000

    test_images = [i for i, _ in read_pair_list(run_dir / "splits" / "test.txt")]
    for image in test_images:
        seg = load_mask(run_dir / "predictions" / f"{image.stem}_seg.png")  # 0/255 on disk, checked by load_mask
        assert seg.shape == (32, 32)
        assert (run_dir / "predictions" / "overlays" / f"{image.stem}_overlay.png").is_file()

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_images"] == len(test_images) == 2
    best = run_dir / "checkpoints" / "best.pth"  # which model and cut made the masks scored
    assert metrics["made_with"] == {
        "model": str(best.resolve()),
        "model_stamp": file_stamp(best),
        "threshold": -1.0,
        "bands": "",
        "sieve_cells": 16,
        "tta": False,
        "cut": None,
        "n_images": 2,
    }
    for key in ("farmland_iou", "background_iou", "miou", "precision", "recall", "f1", "accuracy", "kappa"):
        assert key in metrics["pooled"]
    assert set(metrics["per_image"]) >= {"farmland_iou", "background_iou"}
    # The pooled figures agree with a recount from the files on disk.
    cm = sum(
        confusion_matrix(load_mask(run_dir / "predictions" / f"{i.stem}_seg.png"), load_mask(m))
        for i, m in read_pair_list(run_dir / "splits" / "test.txt")
    )
    assert metrics["pooled"]["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    with open(run_dir / "per_image_metrics.csv", encoding="utf-8-sig") as handle:
        assert len(list(csv.DictReader(handle))) == 2


@pytest.mark.parametrize("value", ["-1", "2"])
def test_an_aug_prob_outside_0_to_1_is_refused(square_data: Path, tmp_path: Path, value: str) -> None:
    # Taken as 0 or 1 without a word.
    split_dataset.main(args(square_data, tmp_path / "run"))
    with pytest.raises(ValueError, match=rf"--aug_prob={value}\.0: expected a probability from 0 to 1"):
        augment.main(args(square_data, tmp_path / "run", f"--aug_prob={value}"))
    assert not (tmp_path / "run" / "augmented").exists()


def test_augment_rerun_does_not_duplicate(square_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    split_dataset.main(args(square_data, run_dir))
    originals = read_pair_list(run_dir / "splits" / "train.txt")
    augment.main(args(square_data, run_dir))
    first = read_pair_list(run_dir / "splits" / "train.txt")
    augment.main(args(square_data, run_dir))
    second = read_pair_list(run_dir / "splits" / "train.txt")
    assert first == second
    copies = first[len(originals) :]
    assert first[: len(originals)] == originals and len(copies) % 2 == 0 and copies
    # Each copy is the original flipped, and its mask flipped identically.
    for image_path, mask_path in copies:
        stem, flip = image_path.stem.rsplit("_", 1)
        source_image, source_mask = next((i, m) for i, m in originals if i.stem == stem)
        axis = 0 if flip == "vflip" else 1
        assert np.array_equal(load_mask(mask_path), np.flip(load_mask(source_mask), axis))
    # A run folder copied whole lists the first folder's copies: augment.py there flips only the originals.
    shutil.copytree(run_dir, tmp_path / "copy")
    augment.main(args(square_data, tmp_path / "copy"))
    copied = read_pair_list(tmp_path / "copy" / "splits" / "train.txt")
    assert copied[: len(originals)] == originals and len(copied) == len(first)
    assert all((tmp_path / "copy" / "augmented") in image.parents for image, _ in copied[len(originals) :])


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_augment_writes_mask_flips_a_png_cannot_hold_as_tiffs(tmp_path: Path, dtype: type) -> None:
    # Such masks were written under a .png name: the write was refused and the whole run stopped.
    data, run_dir = tmp_path / "data", tmp_path / "run"
    rng = np.random.default_rng(0)
    for i in range(10):
        image, mask = square_tile(rng)
        write_image(data / "images" / f"t{i}.png", image)
        write_image(data / "labels" / f"t{i}_mask.tif", (mask > 0).astype(dtype))
    assert split_dataset.main(args(data, run_dir)) == 0
    originals = read_pair_list(run_dir / "splits" / "train.txt")
    assert augment.main(args(data, run_dir, "--aug_prob=1")) == 0
    copies = read_pair_list(run_dir / "splits" / "train.txt")[len(originals) :]
    assert len(copies) == 2 * len(originals)
    for image_path, mask_path in copies:
        stem, flip = image_path.stem.rsplit("_", 1)
        source = next(m for i, m in originals if i.stem == stem)
        assert image_path.suffix == ".png" and mask_path.suffix == ".tif" and read_image(mask_path).dtype == dtype
        assert np.array_equal(load_mask(mask_path), np.flip(load_mask(source), 0 if flip == "vflip" else 1))


@pytest.mark.parametrize("bands, dtype", [(2, np.uint16), (5, np.uint16), (3, np.float32)])
def test_augment_writes_flips_a_png_cannot_hold_as_tiffs(tmp_path: Path, bands: int, dtype: type) -> None:
    data, run_dir = tmp_path / "data", tmp_path / "run"
    rng = np.random.default_rng(0)
    scale, step = (200, 1) if dtype == np.uint16 else (1 / 300, 0.1)  # float tiles hold values in [0, 1]
    for i in range(10):
        image, mask = square_tile(rng)
        stack = np.dstack([(image[..., :1] * scale + b * step).astype(dtype) for b in range(bands)])
        write_pair(data, f"t{i}", stack, mask, ext=".tif")
    extra = (f"--in_channels={bands}", "--aug_prob=1")
    assert split_dataset.main(args(data, run_dir, *extra)) == 0
    originals = read_pair_list(run_dir / "splits" / "train.txt")
    assert augment.main(args(data, run_dir, *extra)) == 0
    copies = read_pair_list(run_dir / "splits" / "train.txt")[len(originals) :]
    assert len(copies) == 2 * len(originals)
    for image_path, _ in copies:
        stem, flip = image_path.stem.rsplit("_", 1)
        source = next(i for i, _ in originals if i.stem == stem)
        assert image_path.suffix == ".tif"
        assert np.array_equal(read_image(image_path), np.flip(read_image(source), 0 if flip == "vflip" else 1))
    assert (run_dir / "figures" / "augment_preview.png").stat().st_size > 0
    # The preview shows the first three bands as colour, or the first alone in grey, each stretched over [0, 1].
    first = read_image(originals[0][0])
    shown = photo_to_show(first, originals[0][0])
    assert shown.shape == (first.shape[:2] + (3,) if bands >= 3 else first.shape[:2])
    assert shown.min() == 0 and shown.max() == 1
    order = np.argsort(first[:, :, 0], axis=None, kind="stable")
    assert (np.diff(shown.reshape(*shown.shape[:2], -1)[:, :, 0].ravel()[order]) >= 0).all()  # brighter stays brighter
    if bands >= 3:  # the bands picked, in their order: B, G, R as 3,2,1 shows R, G, B
        picked = photo_to_show(first, originals[0][0], (3, 2, 1))
        assert np.array_equal(picked, shown[:, :, [2, 1, 0]])


def test_resume_reaches_the_same_weights(square_data: Path, tmp_path: Path) -> None:
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    for run_dir in (straight, interrupted):
        split_dataset.main(args(square_data, run_dir))
    assert train.main(args(square_data, straight, "--epochs=3")) == 0
    assert train.main(args(square_data, interrupted, "--epochs=2")) == 0  # stopped after epoch 2
    assert train.main(args(square_data, interrupted, "--epochs=3", "--resume=true")) == 0
    a, b = weights(straight / "checkpoints" / "last.pth"), weights(interrupted / "checkpoints" / "last.pth")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(interrupted / "checkpoints" / "last.pth", weights_only=True)
    assert state["epoch"] == 3 and [h["epoch"] for h in state["history"]] == [1, 2, 3]


def test_resume_with_other_steps_per_epoch_keeps_the_schedule_on_its_epoch(square_data: Path, tmp_path: Path) -> None:
    # Another number of ranks (or of training tiles) gives another number of steps per epoch: the schedule,
    # stepped per batch, must go on from the epoch reached, not from the saved step count read at the new rate.
    run_dir = tmp_path / "run"
    split_dataset.main(args(square_data, run_dir))
    assert train.main(args(square_data, run_dir, "--epochs=2", "--schedule=cosine")) == 0  # 4 steps per epoch
    listing = run_dir / "splits" / "train.txt"
    listing.write_text("".join(listing.read_text(encoding="utf-8").splitlines(keepends=True)[:8]), encoding="utf-8")
    assert train.main(args(square_data, run_dir, "--epochs=4", "--resume=true")) == 0  # 2 steps per epoch
    history = torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)["history"]
    assert history[2]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert history[3]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_resume_refuses_another_network(shared_square_data: Path, run_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cannot resume, the network differs \(base_width: checkpoint 4 vs config 8\)"):
        train.main(args(shared_square_data, run_copy, "--epochs=2", "--resume=true", "--base_width=8"))
    split_dataset.main(args(shared_square_data, tmp_path / "fresh"))
    with pytest.raises(DataError, match="last.pth: checkpoint not found"):
        train.main(args(shared_square_data, tmp_path / "fresh", "--resume=true"))


def test_train_without_split_says_what_to_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO), pytest.raises(DataError, match="run split_dataset.py first"):
        train.main(args(tmp_path / "data", tmp_path / "run", "--recipe=recommended"))
    close_log_files()
    assert "keep_epoch" not in caplog.text  # no word of a scene count from a split that is not there


def test_predict_a_folder_reports_bad_files_and_goes_on(
    shared_square_data: Path, run_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = run_copy
    folder = tmp_path / "新 tiles"
    write_image(folder / "odd size.png", np.full((37, 50, 3), 90, np.uint8))
    write_image(folder / "b.png", np.full((32, 32, 3), 90, np.uint8))
    (folder / "broken.png").write_bytes(b"nope")
    (folder / "gone.png").symlink_to(tmp_path / "moved.png")  # passed over without a word, as was a folder
    (folder / "folder.png").mkdir()
    code = predict.main(args(shared_square_data, run_dir, f"--predict_input={folder}", "--overlay=false"))
    assert code == 1
    assert f"gone.png: a link to {tmp_path / 'moved.png'}, which does not exist" in caplog.text
    assert "folder.png: a folder, not an image file" in caplog.text
    assert load_mask(run_dir / "predictions" / "odd size_seg.png").shape == (37, 50)
    assert (run_dir / "predictions" / "b_seg.png").is_file()
    assert not (run_dir / "predictions" / "broken_seg.png").exists()
    assert not (run_dir / "predictions" / "overlays").exists()


def test_predict_a_folder_leaves_out_the_masks_beside_its_images(
    shared_square_data: Path, run_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Images and masks in one folder: each mask was predicted as a photo, giving tile 1_label_seg.png and so on.
    folder = tmp_path / "耕地 同夹"
    for name in ("tile 1.jpg", "tile 1_label.png", "tile 2.png", "tile 2_mask.png", "only_label.png"):
        write_image(folder / name, np.full((32, 32, 3), 90, np.uint8))
    split_record = run_copy / "configs" / "split_dataset.json"
    split_record.write_text(json.dumps({**json.loads(split_record.read_text()), "mask_suffix": "_label"}))
    assert predict.main(args(shared_square_data, run_copy, f"--predict_input={folder}", "--overlay=false")) == 0
    made = sorted(p.name for p in (run_copy / "predictions").glob("*_seg.png"))
    assert made == ["only_label_seg.png", "tile 1_seg.png", "tile 2_seg.png"]  # a mask without its image is kept
    assert "left out 2 mask(s) lying beside their images" in caplog.text


def test_predict_refuses_images_with_another_band_count(
    shared_square_data: Path, run_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_image(tmp_path / "four.tif", np.zeros((32, 32, 4), np.uint8))
    assert predict.main(args(shared_square_data, run_copy, f"--predict_input={tmp_path / 'four.tif'}")) == 1
    assert "four.tif: has 4 band(s), but the model was trained on 3" in caplog.text


def test_miou_reports_missing_predictions(square_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    split_dataset.main(args(square_data, run_dir))
    image, mask = read_pair_list(run_dir / "splits" / "test.txt")[0]
    write_image(run_dir / "predictions" / f"{image.stem}_seg.png", load_mask(mask) * np.uint8(255))
    assert miou.main(args(square_data, run_dir)) == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_images"] == 1 and metrics["pooled"]["farmland_iou"] == 1.0
    assert metrics["made_with"] is None  # a mask written otherwise records no model: scored as it is
    assert "prediction not found" in caplog.text


def test_an_empty_test_split_is_named_by_predict_and_miou(shared_square_data: Path, run_copy: Path) -> None:
    # The old code wrote 0 masks with exit status 0, then miou.py said "no test image could be scored (0 problem(s)".
    (run_copy / "splits" / "test.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"test\.txt: the test split lists no tiles .*--split_ratios"):
        predict.main(args(shared_square_data, run_copy))
    with pytest.raises(DataError, match=r"test\.txt: the test split lists no tiles"):
        miou.main(args(shared_square_data, run_copy))
    assert not (run_copy / "predictions").exists() and not (run_copy / "metrics.json").exists()


def final_val_iou(run_dir: Path) -> float:
    return float(torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)["history"][-1]["val_farmland_iou"])


def test_mixed_precision_reaches_the_same_iou(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    rng = np.random.default_rng(7)
    for i in range(80):
        write_pair(data_dir, f"t{i:02d}", *square_tile(rng))
    results = {}
    for amp in ("off", "bf16"):
        run_dir = tmp_path / amp
        split_dataset.main(args(data_dir, run_dir, "--split_ratios=0.5,0.5,0"))
        assert train.main(args(data_dir, run_dir, "--epochs=12", "--lr=0.003", "--step_size=4", f"--amp={amp}")) == 0
        results[amp] = final_val_iou(run_dir)
    assert results["off"] > 0.9  # it learned, so the comparison means something
    assert abs(results["off"] - results["bf16"]) <= 0.02


def test_loader_workers_and_tile_cache_do_not_change_the_result(square_data: Path, tmp_path: Path) -> None:
    runs = {"plain": ["--num_workers=0", "--cache_tiles=no"], "fast": ["--num_workers=2", "--cache_tiles=yes"]}
    for name, extra in runs.items():
        split_dataset.main(args(square_data, tmp_path / name))
        assert train.main(args(square_data, tmp_path / name, "--epochs=2", *extra)) == 0
    a, b = (
        weights(tmp_path / "plain" / "checkpoints" / "last.pth"),
        weights(tmp_path / "fast" / "checkpoints" / "last.pth"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_precision_settings_are_refused(square_data: Path, tmp_path: Path) -> None:
    split_dataset.main(args(square_data, tmp_path / "run"))
    with pytest.raises(ValueError, match="--amp=fp16 needs a CUDA device"):
        train.main(args(square_data, tmp_path / "run", "--amp=fp16", "--device=cpu"))
    with pytest.raises(ValueError, match="expected auto, bf16, fp16 or off"):
        train.main(args(square_data, tmp_path / "run", "--amp=half"))


def test_rgb_bands_outside_the_bands_read_are_refused_before_any_work(square_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    split_dataset.main(args(square_data, run_dir))
    listed = (run_dir / "splits" / "train.txt").read_bytes()
    for script in (augment, train, miou):
        with pytest.raises(ValueError, match=r"--rgb_bands=4,2,1: .* it reads 1,2,3 of the file"):
            script.main(args(square_data, run_dir, "--rgb_bands=4,2,1"))
    assert (run_dir / "splits" / "train.txt").read_bytes() == listed  # augment extended nothing
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists()


def test_without_val_tiles_best_follows_the_latest_epoch(
    square_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    split_dataset.main(args(square_data, run_dir, "--split_ratios=0.9,0,0.1"))
    assert train.main(args(square_data, run_dir, "--epochs=2")) == 0
    assert torch.load(run_dir / "checkpoints" / "best.pth", weights_only=True)["epoch"] == 2
    assert "epoch 2/2 | train loss" in caplog.text and "| no val farmland to score: keeping this epoch |" in caplog.text
    assert "val farmland IoU 0.0000" not in caplog.text and "kept the last epoch, 2 (no val farmland" in caplog.text


def test_predict_warns_of_jpeg_tiles_a_viewer_shows_turned(
    shared_square_data: Path, run_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A phone's JPEG with an EXIF orientation was predicted as stored without a word: its mask did not line up
    # with the photo an image viewer shows turned.
    folder = tmp_path / "phone"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # turned by 90 degrees
    pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "turned.jpg", exif=exif)
    Image.fromarray(pixels).save(folder / "plain.jpg")
    assert predict.main(args(shared_square_data, run_copy, f"--predict_input={folder}", "--overlay=false")) == 0
    assert load_mask(run_copy / "predictions" / "turned_seg.png").shape == (32, 48)  # as stored
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    turned = [m for m in warnings if "EXIF orientation" in m]
    assert len(turned) == 1 and "turned.jpg" in turned[0] and "turned_seg.png" in turned[0]
    assert "plain.jpg" not in turned[0] and "exif_transpose" in turned[0]
