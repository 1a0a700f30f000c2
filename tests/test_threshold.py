"""The farmland threshold: the user's cut (--threshold) on tiles and with the ONNX backend, and the validation
IoU, precision and recall against the threshold that training writes (threshold_curve.csv and its figure)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import args, spread_probabilities_, square_tile, write_pair

import export_onnx
import exported_model
import predict
import split_dataset
import train
from config import Config
from data_preprocess import image_for_network, read_image, write_image, write_pair_list
from inference import (
    averaged_probabilities,
    classes_from_probabilities,
    inference_model,
    predict_probabilities,
    with_threshold,
)
from net_structure import build_model, downscale_of
from output_record import MASK_KEYS, RECORD, Since, outputs_since
from runtime import Distributed, load_checkpoint, save_checkpoint
from tile_prediction import sieve_pixels, sieve_tile, source_texts
from training import THRESHOLD_BINS, iou_at, threshold_curve, write_threshold_curve

CPU = torch.device("cpu")


def farmland_probabilities(model: torch.nn.Module, tile: Path) -> torch.Tensor:
    """The (1, 2, H, W) probabilities of one tile, read as predict.py reads it."""
    image = torch.from_numpy(image_for_network(read_image(tile), 3, tile))[None]
    return predict_probabilities(model, image, CPU)


def predicted_mask(run_dir: Path, tile: Path) -> np.ndarray:
    """The (H, W) mask predict.py wrote for a tile, 0/255."""
    return read_image(run_dir / "predictions" / f"{tile.stem}_seg.png")[..., 0]


def test_threshold_curve_by_hand(tmp_path: Path) -> None:
    # 4 bins; cut k makes farmland every pixel in bin k and above. 7 farmland pixels.
    histogram = np.array([[5, 3, 1, 0], [0, 2, 1, 4]])
    curve = threshold_curve(histogram)
    # k: (tp, fp) = 0: (7, 9), 1: (7, 4), 2: (5, 1), 3: (4, 0); fn = 7 - tp.
    expected = [
        (0.0, 7 / 16, 7 / 16, 1.0),
        (0.25, 7 / 11, 7 / 11, 1.0),
        (0.5, 5 / 8, 5 / 6, 5 / 7),
        (0.75, 4 / 7, 1.0, 4 / 7),
    ]
    assert [tuple(row.values()) for row in curve] == [pytest.approx(e, abs=1e-15) for e in expected]
    assert list(curve[0]) == ["threshold", "val_farmland_iou", "precision", "recall"]
    # Nothing called farmland at the top cut: precision is 0/0; recall and IoU are 0.
    top = threshold_curve(np.array([[4, 0], [2, 0]]))[1]
    assert math.isnan(top["precision"]) and top["recall"] == 0.0 and top["val_farmland_iou"] == 0.0
    write_threshold_curve(threshold_curve(np.array([[4, 0], [2, 0]])), tmp_path / "curve.csv")
    written = (tmp_path / "curve.csv").read_bytes()
    assert written.startswith(b"\xef\xbb\xbf")  # the byte-order mark by which Excel reads it as UTF-8
    assert written.decode("utf-8-sig").splitlines() == [
        "threshold,val_farmland_iou,precision,recall",
        "0.0,0.333333,0.333333,1.0",
        "0.5,0.0,,0.0",
    ]


def test_iou_at_a_tuned_threshold_reads_its_own_cut() -> None:
    # 57 / 200 = 0.285, a tuned cut, is 56.99999999999999 bins as a float: the row read must be cut 57, not 56.
    histogram = np.zeros((2, THRESHOLD_BINS), np.int64)
    histogram[0, 56] = 1  # a background pixel called farmland at cut 56 but not at 57
    histogram[1, 57] = 1
    assert iou_at(histogram, 57 / THRESHOLD_BINS) == 1.0 and iou_at(histogram, 56 / THRESHOLD_BINS) == 0.5


def test_training_writes_the_best_epochs_threshold_curve(square_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert split_dataset.main(args(square_data, run_dir)) == 0
    assert train.main(args(square_data, run_dir, "--epochs=2", "--tune_threshold=true")) == 0
    state = load_checkpoint(run_dir / "checkpoints" / "best.pth")
    best = next(h for h in state["history"] if h["epoch"] == state["best_epoch"])
    with open(run_dir / "threshold_curve.csv", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == THRESHOLD_BINS
    assert [float(r["threshold"]) for r in rows[:3]] == [0.0, 0.005, 0.01]
    # The row at the tuned threshold holds the tuned IoU the checkpoint was chosen by.
    at_cut = next(r for r in rows if float(r["threshold"]) == pytest.approx(state["threshold"]))
    assert float(at_cut["val_farmland_iou"]) == pytest.approx(best["val_tuned_farmland_iou"], abs=1e-6)
    assert max(float(r["val_farmland_iou"]) for r in rows) == pytest.approx(best["val_tuned_farmland_iou"], abs=1e-6)
    assert float(rows[0]["recall"]) == 1.0  # a cut of 0 calls every pixel farmland
    # best.pth keeps the histogram behind the curve: every val pixel (2 tiles of 32x32) counted once.
    assert np.asarray(state["best_histogram"]).shape == (2, THRESHOLD_BINS)
    assert np.asarray(state["best_histogram"]).sum() == 2 * 32 * 32
    assert iou_at(np.asarray(state["best_histogram"]), state["threshold"]) == pytest.approx(
        float(at_cut["val_farmland_iou"])
    )
    assert (run_dir / "figures" / "threshold_curve.png").stat().st_size > 1000
    # last.pth carries it too, for a resumed run to write the curve again.
    assert load_checkpoint(run_dir / "checkpoints" / "last.pth")["best_histogram"] == state["best_histogram"]


def test_user_threshold_wins_on_tiles_and_masks_are_redone(shared_square_data: Path, run_copy: Path) -> None:
    tile = sorted((shared_square_data / "images").glob("*.png"))[0]
    state = load_checkpoint(run_copy / "checkpoints" / "best.pth")
    probabilities = farmland_probabilities(inference_model(state, CPU, True, None), tile)
    middle = round(float(probabilities[0, 1].median()), 4)
    farmland = {}
    # One run folder for all three cuts: masks of an earlier cut, though newer than the checkpoint, are redone.
    for cut in (0.01, 0.99, middle):
        extra = [f"--predict_input={tile}", f"--threshold={cut}", "--amp=off", "--overlay=false", "--sieve_cells=0"]
        assert predict.main(args(shared_square_data, run_copy, *extra)) == 0
        mask = predicted_mask(run_copy, tile)
        expected = classes_from_probabilities(probabilities, cut)[0].numpy()
        assert np.array_equal(mask, expected * 255)
        farmland[cut] = int((mask > 0).sum())
    assert farmland[0.01] > farmland[middle] > farmland[0.99]
    # The same cut with the default sieve: the mask is redone, its specks and pinholes joined to their surroundings.
    extra = [f"--predict_input={tile}", f"--threshold={middle}", "--amp=off", "--overlay=false"]
    assert predict.main(args(shared_square_data, run_copy, *extra)) == 0
    unsieved = classes_from_probabilities(probabilities, middle)[0].numpy()
    sieved = sieve_tile(unsieved, sieve_pixels(Config().sieve_cells, state["config"]))
    assert not np.array_equal(sieved, unsieved) and np.array_equal(predicted_mask(run_copy, tile), sieved * 255)


def test_tiles_with_tta_are_the_mean_of_eight_turns_and_redone_when_it_changes(
    shared_square_data: Path, run_copy: Path
) -> None:
    tile = sorted((shared_square_data / "images").glob("*.png"))[0]
    state = load_checkpoint(run_copy / "checkpoints" / "best.pth")
    image = torch.from_numpy(image_for_network(read_image(tile), 3, tile))[None]
    model = inference_model(state, CPU, True, None)
    # The cut at the median pixel's probability, so that half the tile is farmland and the two masks can differ.
    cut = round(float(averaged_probabilities(model, image, CPU, True, False)[0, 1].median()), 4)
    masks = {}
    # One run folder: the masks made one way, though newer than the checkpoint, are redone the other way.
    for tta in (False, True, False):
        extra = [f"--predict_input={tile}", f"--tta={tta}", f"--threshold={cut}", "--amp=off", "--overlay=false"]
        extra.append("--sieve_cells=0")  # the network's own masks
        assert predict.main(args(shared_square_data, run_copy, *extra)) == 0
        expected = classes_from_probabilities(averaged_probabilities(model, image, CPU, True, tta), cut)
        mask = predicted_mask(run_copy, tile)
        assert np.array_equal(mask, expected[0].numpy() * 255)
        masks[tta] = mask
    assert not np.array_equal(masks[True], masks[False])  # the averaged mask is another mask


@pytest.mark.parametrize("downscale", [1, 2])
def test_user_threshold_wins_over_the_onnx_models_own(tmp_path: Path, downscale: int) -> None:
    data, run_dir = tmp_path / "data", tmp_path / "run"
    rng = np.random.default_rng(5)
    pairs = [write_pair(data, f"t{i}", *square_tile(rng)) for i in range(6)]
    write_pair_list(run_dir / "splits" / "train.txt", pairs[:3])
    write_pair_list(run_dir / "splits" / "test.txt", pairs[3:])
    torch.manual_seed(0)
    model = build_model(3, 2, 4, 0.1, downscale=downscale).eval()
    with torch.no_grad():
        sample = np.stack([read_image(image) for image, _ in pairs]).transpose(0, 3, 1, 2)
        spread_probabilities_(model, model(torch.from_numpy(sample.astype(np.float32) / 255)))
    config = {"in_channels": 3, "n_classes": 2, "base_width": 4, "dropout": 0.1, "bands": "", "downscale": downscale}
    state = {"model": model.state_dict(), "config": config, "threshold": 0.45, "epoch": 1}
    save_checkpoint(run_dir / "checkpoints" / "best.pth", state)
    assert export_onnx.main([f"--run_dir={run_dir}"]) == 0
    segmenter, meta_state = exported_model.load_segmenter(run_dir / "export" / "farmland.onnx")
    assert meta_state["threshold"] == 0.45  # the model's own cut, from its metadata
    assert downscale_of(meta_state["config"]) == downscale  # and the grid the sieve works on
    tile = pairs[3][0]
    probabilities = farmland_probabilities(segmenter, tile)
    farmland, specks = {}, []
    for cut in ("-1", "0.2"):
        argv = [f"--run_dir={run_dir}", "--backend=onnx", f"--predict_input={tile}", f"--threshold={cut}"]
        assert predict.main([*argv, "--num_workers=0", "--overlay=false"]) == 0
        mask = predicted_mask(run_dir, tile)
        used = 0.45 if cut == "-1" else 0.2
        unsieved = classes_from_probabilities(probabilities, used)[0].numpy()
        # Sieved as the PyTorch backend sieves, on the grid the model's metadata names.
        expected = sieve_tile(unsieved, sieve_pixels(Config().sieve_cells, meta_state["config"]))
        assert np.array_equal(mask, expected * 255)
        farmland[cut] = int((mask > 0).sum())
        specks.append(not np.array_equal(expected, unsieved))
    assert farmland["0.2"] > farmland["-1"] > 0 and any(specks)


def test_a_threshold_outside_0_1_is_refused(shared_square_data: Path, run_copy: Path) -> None:
    state = {"config": {"n_classes": 2}, "threshold": 0.3}
    assert with_threshold(state, -1) is state and with_threshold(state, 0.7)["threshold"] == 0.7
    assert state["threshold"] == 0.3  # the checkpoint's own state is not changed
    for bad in ("0", "1", "1.5", "-0.5"):
        with pytest.raises(ValueError, match=r"strictly between 0 and 1 .*or -1 for the checkpoint's tuned"):
            predict.main(args(shared_square_data, run_copy, f"--threshold={bad}"))
    with pytest.raises(ValueError, match="two-class model; this one has 3"):
        with_threshold({"config": {"n_classes": 3}}, 0.5)


def test_a_changed_setting_or_model_redoes_outputs_and_a_stopped_redo_is_finished_next_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "configs").mkdir()
    keys = {key: getattr(Config(), key) for key in MASK_KEYS if key != "sieve_cells"}
    (tmp_path / "configs" / "predict.json").write_text(json.dumps(keys), encoding="utf-8")  # before the sieve
    checkpoint, other = tmp_path / "best.pth", tmp_path / "epoch_010.pth"
    checkpoint.write_bytes(b"weights")
    other.write_bytes(b"other weights")
    job, start = Distributed(), time.time()

    def since(model: Path = checkpoint, **keys: object) -> Since:
        return outputs_since(Config(run_dir=str(tmp_path), **keys), model, job)

    # Masks made before the key were not sieved, and scenes fed their nodata to the network as zeros: both redone.
    redo = since()
    assert start - 1 <= redo.tiles <= time.time() + 1 and start - 1 <= redo.scenes <= time.time() + 1
    assert since() == redo  # a run stopped during that redo: the next redoes what it left, keeps what it made
    record = json.loads((tmp_path / RECORD).read_text(encoding="utf-8"))
    assert record["model"] == str(checkpoint.resolve()) and record["sieve_cells"] == 16
    assert record["tiles_since"] == redo.tiles and record["scenes_since"] == redo.scenes
    assert record["nodata_fed_as"] == "nearest pixel with data"
    with caplog.at_level(logging.INFO, logger="predict"):
        assert since(sieve_cells=0).scenes == redo.scenes  # only the sieve again: scenes keep theirs
    assert "(sieve_cells 16, now 0): any of its tile masks this run meets is redone (scenes keep theirs)" in caplog.text
    kept = since(sieve_cells=0)
    with caplog.at_level(logging.INFO, logger="predict"):  # a scene setting alone: tile masks keep theirs
        assert since(sieve_cells=0, min_field_area_ha=0.5, window=256).tiles == kept.tiles
    assert "any of its scene outputs this run meets is redone (tile masks keep theirs)" in caplog.text
    assert since(sieve_cells=0, min_field_area_ha=0.5, window=256, tta=True).tiles >= start - 1  # tta: tiles too
    assert since(sieve_cells=0, threshold=0.3).scenes >= start - 1  # a new cut: scenes too
    (tmp_path / RECORD).write_text(json.dumps(record | {"tiles_since": 0.0, "scenes_since": 0.0}), encoding="utf-8")
    assert since() == Since()  # the record's model and keys: nothing redone
    checkpoint.write_bytes(b"retrained")
    os.utime(checkpoint, (start - 600, start - 600))  # other weights copied over it with an older time (cp -p)
    assert since().scenes >= start - 1
    assert since(other).scenes >= start - 1  # another checkpoint, though older than the outputs: all redone
    assert since(other, skip_existing=False).scenes >= start - 1
    (tmp_path / RECORD).write_text("{not json", encoding="utf-8")
    assert since(other).tiles >= start - 1  # an unreadable record: redo rather than keep
    # Tiles to redo: their masks are newer than the checkpoint but older than the settings; a scene decides itself.
    checkpoint.write_bytes(b"weights")
    jobs = [predict.Job(tmp_path / f"{stem}.png", tmp_path / f"{stem}_seg.png", stem == "s") for stem in "abs"]
    for j in jobs:
        j.image.write_bytes(b"image")
        write_image(j.output, np.zeros((2, 2), np.uint8), source_texts(j.image))
    cfg = Config(run_dir=str(tmp_path), overlay=False)
    assert [j.image.stem for j in predict.unfinished(jobs, cfg, checkpoint)] == ["s"]
    assert predict.unfinished(jobs, cfg, checkpoint, since=time.time() + 5) == jobs
