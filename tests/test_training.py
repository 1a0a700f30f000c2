"""Training options for real data: recipes, schedules, normalisation, tuned threshold, early stop,
the collapse warning and TensorBoard."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import args, square_tile, write_pair

import cli
import config
import predict
import split_dataset
import train
import training
from data_preprocess import (
    IGNORE,
    DataError,
    FarmlandDataset,
    read_image,
    read_pair_list,
)
from inference import classes_from_probabilities
from runtime import load_checkpoint, save_checkpoint
from training import best_threshold, schedule_factor


def test_recommended_recipe_fills_keys_not_given() -> None:
    cfg = cli.parse_args(["--recipe=recommended", "--lr=0.01"])
    assert cfg.lr == 0.01  # given explicitly: kept
    for key, value in config.RECOMMENDED.items():
        if key != "lr":
            assert getattr(cfg, key) == value
    assert cli.parse_args([]).loss == "ce"  # the defaults stay the reference recipe
    with pytest.raises(ValueError, match="expected reference or recommended"):
        cli.parse_args(["--recipe=best"])


def test_schedules_by_hand() -> None:
    cfg = config.Config(epochs=4, step_size=2, gamma=0.5)
    # StepLR, epoch by epoch: steps 0..9 are epoch 1, 10..19 epoch 2, 20.. epoch 3.
    assert [schedule_factor(s, cfg, 10) for s in (0, 9, 10, 19, 20, 39)] == [1, 1, 1, 1, 0.5, 0.5]
    cfg.warmup_epochs = 0.5  # 5 steps of linear warm-up
    assert [schedule_factor(s, cfg, 10) for s in (0, 1, 4, 5)] == pytest.approx([0.2, 0.4, 1.0, 1.0])
    cfg.warmup_epochs, cfg.schedule = 0.0, "cosine"
    assert [schedule_factor(s, cfg, 10) for s in (0, 20, 40)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    cfg.epochs = 0  # time_budget's first epoch, being timed: no plan yet, so no decay
    assert [schedule_factor(s, cfg, 10) for s in (0, 1, 9, 25)] == [1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="expected one of step, cosine"):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        training.make_scheduler(optimizer, config.Config(schedule="x"), 1)


def test_best_threshold_by_hand() -> None:
    # 4 bins; cut k makes farmland every pixel in bin k and above.
    histogram = np.array([[5, 3, 1, 0], [0, 2, 1, 4]])
    # k=0: 7/(7+9); k=1: 7/(7+4); k=2: 5/(7+1); k=3: 4/(7+0). Best: k=1, cut 0.25.
    cut, iou = best_threshold(histogram)
    assert cut == 0.25 and iou == pytest.approx(7 / 11)
    # Empty bins make ties: cuts 0.25, 0.5 and 0.75 all separate the classes (IoU 1); the one nearest 0.5 wins.
    assert best_threshold(np.array([[3, 0, 0, 0], [0, 0, 0, 2]])) == (0.5, 1.0)
    cut, iou = best_threshold(np.array([[5, 3, 0, 0], [0, 0, 0, 0]]))  # no farmland to score
    assert cut == 0.5 and math.isnan(iou)


def test_a_run_without_normalise_keeps_its_training_tiles_band_means(trained_run: Path) -> None:
    """The reference recipe's checkpoint keeps the training tiles' band means beside the network (which holds
    none), so that predict.py can warn of a 16-bit scene given to a network trained on 8-bit tiles."""
    state = load_checkpoint(trained_run / "checkpoints" / "best.pth")
    assert not state["config"]["normalise"] and not state["model"]["band_mean"].any()
    mean, _, _ = FarmlandDataset(read_pair_list(trained_run / "splits" / "train.txt")).statistics()
    assert state["band_means"] == pytest.approx(mean, rel=1e-6)  # fewer tiles than train.VALUE_TILES: all of them
    # And the band count of the tiles' files, before --bands: a product of another count is warned of.
    assert state["tile_bands"] == load_checkpoint(trained_run / "checkpoints" / "last.pth")["tile_bands"] == 3


def test_a_resumed_run_keeps_its_band_means_and_reads_them_for_a_checkpoint_that_keeps_none(
    square_data: Path, tmp_path: Path
) -> None:
    """A resumed run writes the band means its last.pth keeps (not read from its tiles again), with ``normalise``
    too; one resumed from a checkpoint of a version that kept none reads them from its training tiles."""
    for normalise in ("false", "true"):
        run_dir = tmp_path / f"run_{normalise}"
        assert split_dataset.main(args(square_data, run_dir)) == 0
        given = args(square_data, run_dir, f"--normalise={normalise}", "--snapshot_every=0")
        assert train.main([*given, "--epochs=1"]) == 0
        last = run_dir / "checkpoints" / "last.pth"
        state = load_checkpoint(last)
        tiles = state["band_means"]
        save_checkpoint(last, {**state, "band_means": [0.5, 0.25, 0.125]})  # the run's own, whatever its tiles
        assert train.main([*given, "--epochs=2", "--resume=true"]) == 0
        assert load_checkpoint(last)["band_means"] == [0.5, 0.25, 0.125]
        state = load_checkpoint(last)
        del state["band_means"]  # saved before checkpoints kept band means
        save_checkpoint(last, state)
        assert train.main([*given, "--epochs=3", "--resume=true"]) == 0
        assert load_checkpoint(last)["band_means"] == pytest.approx(tiles, rel=1e-6)


def test_normalisation_and_threshold_are_stored_and_used(square_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert split_dataset.main(args(square_data, run_dir)) == 0
    extra = ["--epochs=2", "--normalise=true", "--tune_threshold=true", "--loss=ce_dice", "--colour_jitter=0.1"]
    assert train.main(args(square_data, run_dir, *extra, "--scale_jitter=0.1")) == 0
    state = load_checkpoint(run_dir / "checkpoints" / "best.pth")
    mean, std, _ = FarmlandDataset(read_pair_list(run_dir / "splits" / "train.txt")).statistics()
    assert state["model"]["band_mean"].tolist() == pytest.approx(mean, rel=1e-6)
    assert state["model"]["band_std"].tolist() == pytest.approx(std, rel=1e-6)
    assert 0.0 <= state["threshold"] < 1.0
    with open(run_dir / "train_log.csv", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[-1]["val_tuned_farmland_iou"]) >= float(rows[-1]["val_farmland_iou"]) - 1e-9
    # predict.py applies the checkpoint's threshold: a cut of 0 makes every pixel farmland, 1 none.
    images = square_data / "images"
    for cut, value in ((0.0, 255), (1.0, 0)):
        save_checkpoint(run_dir / "checkpoints" / "cut.pth", {**state, "threshold": cut})
        out = tmp_path / f"out{cut}"
        checkpoint = run_dir / "checkpoints" / "cut.pth"
        assert predict.main(args(square_data, out, f"--checkpoint={checkpoint}", f"--predict_input={images}")) == 0
        masks = [np.unique(read_image(p)) for p in (out / "predictions").glob("*_seg.png")]
        assert len(masks) == 20 and all(m.tolist() == [value] for m in masks)


def test_early_stop_and_tensorboard(square_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    assert split_dataset.main(args(square_data, run_dir)) == 0
    # lr 0: the val IoU can never beat epoch 1, so training stops after epoch 1 + early_stop.
    with caplog.at_level(logging.INFO):
        extra = ["--epochs=10", "--lr=0", "--early_stop=2", "--tensorboard=true"]
        assert train.main(args(square_data, run_dir, *extra)) == 0
    history = load_checkpoint(run_dir / "checkpoints" / "last.pth")["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert "early stop after epoch 3" in caplog.text
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # Resumed, the run stays stopped; with a larger early_stop it goes on until that stops it.
    stamp = (run_dir / "checkpoints" / "last.pth").stat().st_mtime_ns
    assert train.main(args(square_data, run_dir, *extra, "--resume=true")) == 0
    assert (run_dir / "checkpoints" / "last.pth").stat().st_mtime_ns == stamp
    assert train.main(args(square_data, run_dir, *extra[:-2], "--early_stop=3", "--resume=true")) == 0
    history = load_checkpoint(run_dir / "checkpoints" / "last.pth")["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_collapse_is_reported_with_causes(
    square_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    assert split_dataset.main(args(square_data, run_dir)) == 0
    # Validation that always finds farmland in the labels and never in the predictions.
    all_background = np.array([[900, 0], [124, 0]])
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: (0.7, all_background, np.zeros((2, 200), np.int64)))
    with caplog.at_level(logging.WARNING):
        assert train.main(args(square_data, run_dir, "--epochs=3", "--collapse_patience=3")) == 0
    warnings = [r.getMessage() for r in caplog.records if "collapsed" in r.getMessage()]
    assert len(warnings) == 1
    assert "no farmland at all" in warnings[0] and "--loss=ce_dice" in warnings[0] and "0/255" in warnings[0]
    # Farmland everywhere is a collapse too, though its farmland IoU is not 0.
    caplog.clear()
    all_farmland = np.array([[0, 900], [0, 124]])
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: (0.7, all_farmland, np.zeros((2, 200), np.int64)))
    assert split_dataset.main(args(square_data, tmp_path / "run2")) == 0
    with caplog.at_level(logging.WARNING):
        assert train.main(args(square_data, tmp_path / "run2", "--epochs=3", "--collapse_patience=2")) == 0
    warnings = [r.getMessage() for r in caplog.records if "collapsed" in r.getMessage()]
    assert len(warnings) == 1 and "epoch 2:" in warnings[0] and "farmland everywhere" in warnings[0]


def test_a_resumed_run_warns_of_a_collapse_where_the_whole_run_would(
    square_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The collapse streak goes on across a resume: stopped after epoch 2 of a collapsed run, resumed, it warns at
    epoch 3 as the run without the stop does."""
    run_dir = tmp_path / "run"
    assert split_dataset.main(args(square_data, run_dir)) == 0
    all_farmland = np.array([[0, 900], [0, 124]])
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: (0.7, all_farmland, np.zeros((2, 200), np.int64)))
    given = args(square_data, run_dir, "--collapse_patience=3")
    assert train.main([*given, "--epochs=2"]) == 0
    with caplog.at_level(logging.WARNING):
        assert train.main([*given, "--epochs=3", "--resume=true"]) == 0
    warnings = [r.getMessage() for r in caplog.records if "collapsed" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("epoch 3: for 3 epochs in a row")


def test_band_selection_trains_and_predicts_alike(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tmp_path / "rgbn"
    rng = np.random.default_rng(5)
    for i in range(10):
        image, mask = square_tile(rng, 32)
        nir = rng.integers(0, 255, (32, 32, 1), dtype=np.uint8)
        write_pair(data_dir, f"t{i}", np.concatenate([image, nir], axis=2), mask, ext=".tif")
    run_dir = tmp_path / "run"
    # Four-band tiles, a three-band network fed bands 1, 2, 3 (the NIR band left out).
    assert split_dataset.main(args(data_dir, run_dir, "--bands=1,2,3")) == 0
    assert train.main(args(data_dir, run_dir, "--bands=1,2,3", "--epochs=1", "--normalise=true")) == 0
    state = load_checkpoint(run_dir / "checkpoints" / "best.pth")
    assert state["config"]["bands"] == "1,2,3" and state["model"]["band_mean"].numel() == 3
    # predict.py reads the bands from the checkpoint: the four-band tiles need no --bands.
    assert predict.main(args(data_dir, run_dir, f"--predict_input={data_dir / 'images'}")) == 0
    assert len(list((run_dir / "predictions").glob("*_seg.png"))) == 10
    assert json.loads((run_dir / "configs" / "predict.json").read_text())["bands"] == "1,2,3"
    # Other bands are the user's to name, with a warning.
    assert predict.main(args(data_dir, run_dir, f"--predict_input={data_dir / 'images'}", "--bands=3,2,1")) == 0
    assert "--bands=3,2,1 differs from the bands the network was trained on (--bands=1,2,3)" in caplog.text
    # Without the selection the four-band tiles do not fit a three-band network, and say so.
    with pytest.raises(DataError, match="no usable image/mask pairs"):
        split_dataset.main(args(data_dir, tmp_path / "plain"))


def test_bands_given_to_predict_are_warned_of_where_training_read_every_band(caplog: pytest.LogCaptureFixture) -> None:
    """A network trained without --bands read every band in file order: --bands=3,2,1 at prediction feeds it
    the bands reversed, which is warned of as for a training that named its bands; the same bands are not."""
    for given, trained, warned in (
        ("3,2,1", {"bands": "", "in_channels": 3}, "(--bands=1,2,3, every band of its tiles in file order)"),
        ("1,2,3", {"bands": "", "in_channels": 3}, None),
        ("4,3,2,1", {"bands": "", "in_channels": 4}, "(--bands=1,2,3,4, every band of its tiles in file order)"),
        ("3,2,1", {"bands": "1,2,3", "in_channels": 3}, "(--bands=1,2,3)"),
    ):
        cfg = config.Config(bands=given)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="predict"):
            predict.resolve_bands(cfg, trained)
            predict.warn_other_bands(given, {"config": trained}, [len(given.split(","))])
        assert cfg.bands == given
        if warned is None:
            assert "differs from the bands" not in caplog.text
        else:
            assert f"--bands={given} differs from the bands the network was trained on {warned}" in caplog.text


def test_bands_named_for_a_product_of_another_band_count_are_not_warned_against(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A network trained on bands 3,2,1 of B,G,R,NIR tiles, given --bands=1,2,3 for an R,G,B scene as the band count
    warning asks, is not told to leave --bands out; a 4-band input given other bands still is."""
    state = {"config": {"bands": "3,2,1", "in_channels": 3}, "tile_bands": 4}
    with caplog.at_level(logging.INFO, logger="predict"):
        predict.warn_other_bands("1,2,3", state, [3])
    assert "differs from the bands" not in caplog.text and "leave --bands out" not in caplog.text
    assert "--bands=1,2,3 of these 3-band input(s) stand for bands 3,2,1 of the 4-band training tiles" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="predict"):
        predict.warn_other_bands("1,2,3", state, [4])
        predict.warn_other_bands("1,2,3", state, [3, 4])
    assert caplog.text.count("--bands=1,2,3 differs from the bands the network was trained on (--bands=3,2,1)") == 2


def test_validation_histogram_counts_each_labelled_pixel_once() -> None:
    # A network whose farmland probability is the input's first band: the histogram can be worked by hand.
    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = x[:, :1].clamp(1e-6, 1 - 1e-6)
            return torch.cat([torch.log1p(-p), torch.log(p)], dim=1)

    images = torch.tensor([0.1225, 0.1225, 0.625, 0.8725]).view(1, 1, 1, 4).expand(1, 3, 1, 4).contiguous()
    masks = torch.tensor([[[0, 1, IGNORE, 1]]])
    loader = [(images, masks)]
    _, cm, histogram = train.evaluate(
        Probe(), loader, torch.device("cpu"), 2, torch.contiguous_format, None, None, True
    )
    assert cm.tolist() == [[1, 0], [1, 1]]  # the unlabelled pixel is not counted
    assert histogram.sum() == 3
    # Probabilities mid-bin, so each bin is known whatever the softmax rounds: bin k holds (k / 200, (k + 1) / 200],
    # so 0.1225 -> 24 and 0.8725 -> 174.
    assert histogram[0, 24] == 1 and histogram[1, 24] == 1 and histogram[1, 174] == 1


def test_the_threshold_curve_at_one_half_is_the_argmax_where_probabilities_tie() -> None:
    # bf16 logits often tie (a farmland probability of exactly 0.5): the argmax, and predict.py's cut, call such a
    # pixel background, so the curve's row at 0.5 must too. Counted as farmland, the tuned IoU at "0.500" fell
    # below the argmax's IoU printed beside it, and was not what predict.py then gave.
    class Tie(torch.nn.Module):  # farmland logit 4 * (x - 0.5) against 0: x = 0.5 is an exact tie
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.zeros_like(x[:, :1]), 4 * (x[:, :1] - 0.5)], dim=1)

    probabilities = torch.tensor([0.5, 0.5, 0.5, 0.75, 0.75, 0.25])
    images = probabilities.view(1, 1, 1, 6).expand(1, 3, 1, 6).contiguous()
    masks = torch.tensor([[[0, 0, 1, 1, 1, 0]]])
    _, cm, histogram = train.evaluate(
        Tie(), [(images, masks)], torch.device("cpu"), 2, torch.contiguous_format, None, None, True
    )
    argmax_iou = cm[1, 1] / (cm[1, 1] + cm[0, 1] + cm[1, 0])
    assert argmax_iou == pytest.approx(2 / 3)
    assert training.iou_at(histogram, 0.5) == pytest.approx(argmax_iou)
    logits = Tie()(images)
    called = classes_from_probabilities(logits.softmax(1), 0.5)
    assert called.flatten().tolist() == logits.argmax(1).flatten().tolist() == [0, 0, 0, 1, 1, 0]


def test_a_training_batch_is_the_batch_size_or_the_tiles_each_process_holds() -> None:
    assert training.training_batch(config.Config(batch_size=8), 20) == 8
    assert training.training_batch(config.Config(batch_size=8), 3) == 3  # a split of 3 tiles: one batch of 3
    assert training.training_batch(config.Config(batch_size=8), 10, world=4) == 3  # at most 3 tiles per process


def test_the_collapse_warning_does_not_suggest_what_the_run_already_does() -> None:
    recommended = cli.apply_recipe(config.Config(recipe="recommended"))
    message = training.collapse_message(3, 3, 1.0, recommended)
    assert "--recipe=recommended" not in message and "--loss=ce_dice" not in message and "--lr=1e-3" not in message
    assert "more epochs" in message
    reference = training.collapse_message(3, 3, 1.0, config.Config())
    assert "--recipe=recommended" in reference and "--loss=ce_dice" in reference and "--lr=1e-3" in reference


def test_auto_downscale_without_a_pixel_size_names_geographic_tiles(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config.Config(downscale=0, pixel_size_m=0.0)
    with caplog.at_level(logging.INFO):
        train.resolve_downscale(cfg, type("Job", (), {"main": True})())
    assert cfg.downscale == 2 and "in a geographic CRS, whose pixels are degrees" in caplog.text


KEPT_SHARES = [(0.997, "reference", True), (0.997, "recommended", True), (0.6, "reference", False)]


@pytest.mark.parametrize(("share", "recipe", "warned"), [*KEPT_SHARES, (math.nan, "reference", False)])
def test_a_kept_epoch_that_calls_everything_farmland_is_warned_of(
    caplog: pytest.LogCaptureFixture, share: float, recipe: str, warned: bool
) -> None:
    rows = [{"epoch": 1, "val_predicted_farmland": share}, {"epoch": 2, "val_predicted_farmland": 0.3}]
    progress = train.Progress(best_iou=0.288, best_epoch=1, history=rows)
    with caplog.at_level(logging.WARNING, logger="train"):
        train.warn_kept_prior(config.Config(recipe=recipe), progress)
    text = caplog.text
    assert ("best.pth keeps epoch 1, which called 99.7% of the val pixels farmland" in text) == warned
    assert warned or not text
    assert ("--recipe=recommended" in text) == (warned and recipe == "reference")
    assert not warned or "IoU (0.2880) is what calling every pixel farmland scores" in text


@pytest.mark.parametrize(("below_cut", "warned"), [(50, False), (0, True)])
def test_a_kept_epoch_is_judged_at_its_tuned_threshold(
    caplog: pytest.LogCaptureFixture, below_cut: int, warned: bool
) -> None:
    # The argmax calls 99.5% of the val pixels farmland, but best.pth is judged and used at the tuned cut 0.6:
    # 50 of 100 pixels (of each class) lie below it, so the kept epoch does tell the classes apart.
    histogram = np.zeros((2, 200), dtype=np.int64)
    histogram[:, 110] = below_cut  # probability 0.55: below the cut, above the argmax's 0.5
    histogram[:, 150] = 100 - below_cut
    row = {"epoch": 1, "val_predicted_farmland": 0.995, "val_threshold": 0.6}
    progress = train.Progress(best_iou=0.5, best_epoch=1, history=[row], best_histogram=histogram)
    with caplog.at_level(logging.WARNING, logger="train"):
        train.warn_kept_prior(config.Config(), progress)
    assert ("best.pth keeps epoch 1" in caplog.text) == warned
    assert not warned or "called 100.0% of the val pixels farmland" in caplog.text
