"""What steers a training run besides the recipe: the loss-not-falling warning, the moving average of the
weights (ema) and the time budget (time_budget), each with exact resume."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from conftest import args, close_log_files, weights
from torch import nn
from torch.utils.data import DataLoader

import cli
import files
import split_dataset
import train
from config import Config
from data_preprocess import IGNORE
from files import DataError
from inference import model_from_checkpoint
from losses import SegmentationLoss, class_weights
from metrics import class_iou
from runtime import Distributed, load_checkpoint
from training import WeightAverage, batchnorm_loader, best_threshold, loss_stall, prior_loss, recompute_batchnorm

PRIOR_CM = np.array([[600, 100], [250, 50]])  # farmland IoU 50/400 = 0.125; calling all farmland scores 0.3
GOOD_CM = np.array([[650, 50], [30, 270]])  # farmland IoU 270/350 = 0.77
RUN_EPOCH = train.run_epoch  # the real one, which fake_clock wraps


def scripted_row(epoch: int, loss: float, cm: np.ndarray) -> dict:
    """A history row as train.validate returns it, for scripted losses and confusion matrices."""
    predicted = cm.sum(axis=0)
    return {
        "epoch": epoch,
        "train_loss": loss,
        "val_loss": loss,
        "val_farmland_iou": float(class_iou(cm)[1]),
        "val_miou": float(np.nanmean(class_iou(cm))),
        "val_threshold": math.nan,
        "val_tuned_farmland_iou": math.nan,
        "val_predicted_farmland": float(predicted[1] / predicted.sum()),
        "val_ema_farmland_iou": math.nan,
        "val_ema_threshold": math.nan,
        "val_ema_tuned_farmland_iou": math.nan,
        "weights": "raw",
        "lr": 1e-3,
        "seconds": 1.0,
        "cm": cm,
        "histogram": np.zeros((2, 200), np.int64),
    }


def stall_warnings(
    losses: list[float], cm: np.ndarray, caplog: pytest.LogCaptureFixture, loss_prior: float = math.nan
) -> list[str]:
    """The loss-not-falling warnings train.judge gives over a scripted history (collapse_patience 3), for a
    class prior's training loss of ``loss_prior`` (NaN: unknown)."""
    caplog.clear()
    cfg, progress, job = Config(collapse_patience=3), train.Progress(prior_loss=loss_prior), Distributed()
    with caplog.at_level(logging.WARNING, logger="train"):
        for epoch, loss in enumerate(losses, start=1):
            train.judge(cfg, scripted_row(epoch, loss, cm), progress, job)
    return [r.getMessage() for r in caplog.records if "has not fallen" in r.getMessage()]


def test_a_val_split_without_farmland_keeps_the_latest_epoch_though_farmland_is_predicted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Farmland predicted where the labels hold none scores IoU 0, not 0/0: no reason to keep epoch 1.
    cfg, progress, job = Config(collapse_patience=2), train.Progress(), Distributed()
    no_farmland = np.array([[700, 300], [0, 0]])
    with caplog.at_level(logging.WARNING, logger="train"):
        for epoch in (1, 2, 3):
            assert train.judge(cfg, scripted_row(epoch, 0.7, no_farmland), progress, job)
    assert progress.best_epoch == 3 and not progress.scored
    assert "the val split is empty or holds no farmland" in caplog.text
    assert "collapsed" not in caplog.text


def test_loss_stall_by_hand() -> None:
    assert loss_stall([1.0]) == 0
    assert loss_stall([1.25, 0.99, 0.991, 0.989, 0.99]) == 3  # 0.989 is not 1 % below 0.99
    # A slow steady fall: 0.985 is more than 1 % below 1.0, where the streak began, so it resets it.
    assert loss_stall([1.0, 0.995, 0.99, 0.985, 0.98]) == 1
    assert loss_stall([0.5, 0.6, 0.7]) == 2  # a rising loss is not falling either


def test_the_stall_warning_fires_on_a_prior_predicting_network_only(caplog: pytest.LogCaptureFixture) -> None:
    # The reported case: ce_dice sat at about 0.99 from epoch 2 to 11; the network predicts the class prior.
    issue = [1.25, 0.990, 0.987, 0.992, 0.989, 0.991, 0.988, 0.990, 0.993, 0.989, 0.990]
    warnings = stall_warnings(issue, PRIOR_CM, caplog)
    assert len(warnings) == 1  # once per streak, though it lasts to epoch 11
    message = warnings[0]
    assert message.startswith("epoch 5: the training loss has not fallen by more than 1% for 3 epochs in a row")
    assert "(now 0.9890, 0.9900 at epoch 2)" in message
    assert "val farmland IoU (0.125) is little better than calling every pixel farmland (0.300)" in message
    assert "predicting the class prior, not the image" in message
    for fix in ("--lr=3e-4", "--colour_jitter=0 --scale_jitter=0 --dropout=0", "more epochs"):
        assert fix in message
    # Some farmland found (IoU 0.375), but less than a fifth of the way from the prior's 0.3 to 1: still a warning.
    assert len(stall_warnings(issue, np.array([[600, 100], [150, 150]]), caplog)) == 1
    # Normal training that levels off at a good IoU: no warning.
    normal = [1.0, 0.7, 0.55, 0.48, 0.44, 0.42, 0.415, 0.413, 0.412, 0.412, 0.4125]
    assert stall_warnings(normal, GOOD_CM, caplog) == []
    # A slow fall adds up past 1 % before the streak reaches 3: no warning either.
    assert stall_warnings([1.0, 0.995, 0.99, 0.985, 0.98, 0.975, 0.97], PRIOR_CM, caplog) == []
    # The loss falls again, then stalls again: a second streak, a second warning.
    twice = [1.2, 1.0, 1.0, 1.0, 1.0, 0.9, 0.9, 0.9, 0.9]
    assert [w.split(":")[0] for w in stall_warnings(twice, PRIOR_CM, caplog)] == ["epoch 5", "epoch 9"]


def test_no_stall_warning_for_a_loss_far_below_the_class_priors(caplog: pytest.LogCaptureFixture) -> None:
    # Seen at width 64 on deepglobe_agri: the loss levelled off at about 0.36 late in a 100-epoch run while
    # the val IoU (0.39) stayed within a fifth of the way from the prior's 0.244 to 1: the network had learned
    # the training scenes, not the prior, so "predicting the class prior" would be wrong.
    late = [1.0, 0.6, 0.45, 0.40, 0.3563, 0.3527, 0.3524, 0.3670, 0.3716, 0.3906]
    plateau = np.array([[5000, 1300], [1000, 1600]])  # farmland IoU 1600/3900 = 0.41, prior 2600/8900 = 0.29
    assert stall_warnings(late, plateau, caplog, loss_prior=1.04) == []
    assert len(stall_warnings(late, plateau, caplog)) == 1  # the prior's loss unknown: the val IoU alone judges
    # The reported case still warns: 0.99 is above three quarters of the prior's 1.1, and the figure is given.
    issue = [1.25, 0.990, 0.987, 0.992, 0.989, 0.991]
    warnings = stall_warnings(issue, PRIOR_CM, caplog, loss_prior=1.1)
    assert (
        len(warnings) == 1
        and "(now 0.9890, 0.9900 at epoch 2; ignoring the image scores 1.1000 at best)" in warnings[0]
    )


class MaskTiles:
    """Stands in for a FarmlandDataset: blank images beside the given masks."""

    def __init__(self, masks: list[torch.Tensor]) -> None:
        self.masks = masks

    def __len__(self) -> int:
        return len(self.masks)

    def tensors(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(3, *self.masks[index].shape), self.masks[index]


def best_constant(loss_of_q: Callable[[np.ndarray], np.ndarray]) -> float:
    """The lowest value of a two-class loss over constant farmland probabilities q, on a fine grid."""
    return float(loss_of_q(np.linspace(1e-4, 1 - 1e-4, 200_001)).min())


def test_the_best_loss_that_ignores_the_image_by_hand() -> None:
    quarter = torch.zeros(4, 4, dtype=torch.long)
    quarter[0] = 1  # 4 of 16 pixels farmland
    tiles = MaskTiles([quarter.roll(i, 0) for i in range(4)])
    # Cross-entropy's best constant is the shares themselves: the entropy of a quarter.
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert prior_loss(SegmentationLoss("ce"), tiles, 2, batch_size=2) == pytest.approx(entropy, abs=1e-5)
    # Class weights from these masks balance the classes: the best constant is 1/2, the loss log 2.
    balanced = SegmentationLoss("weighted_ce", class_weights([48, 16], 2))
    assert prior_loss(balanced, tiles, 2, batch_size=2) == pytest.approx(math.log(2), abs=1e-5)

    # Soft Dice pools each batch of two tiles (32 pixels, 8 farmland) with a smoothing of 1; plus cross-entropy.
    def ce_dice(q: np.ndarray) -> np.ndarray:
        farmland = (2 * q * 8 + 1) / (q * 32 + 8 + 1)
        background = (2 * (1 - q) * 24 + 1) / ((1 - q) * 32 + 24 + 1)
        return -(0.25 * np.log(q) + 0.75 * np.log(1 - q)) + 1 - (farmland + background) / 2

    def focal(q: np.ndarray) -> np.ndarray:  # gamma 2
        return -(0.25 * (1 - q) ** 2 * np.log(q) + 0.75 * q**2 * np.log(1 - q))

    assert best_constant(ce_dice) < ce_dice(np.array([0.25]))[0] - 1e-4  # Dice moves the optimum off the shares
    assert best_constant(focal) < focal(np.array([0.25]))[0] - 1e-2
    assert prior_loss(SegmentationLoss("ce_dice"), tiles, 2, batch_size=2) == pytest.approx(
        best_constant(ce_dice), abs=1e-5
    )
    assert prior_loss(SegmentationLoss("focal"), tiles, 2, batch_size=2) == pytest.approx(
        best_constant(focal), abs=1e-5
    )
    # Unlabelled pixels count for neither class. `tiles` masks are read: with one, the first.
    unlabelled = quarter.clone()
    unlabelled[1:] = torch.where(torch.arange(4) < 1, IGNORE, 0)[None]  # 3 of 16 unlabelled: shares over 13
    shares = torch.tensor([9 / 13, 4 / 13])
    expected = float(-(shares * shares.log()).sum())
    assert prior_loss(SegmentationLoss("ce"), MaskTiles([unlabelled, quarter]), 2, 1, tiles=1) == pytest.approx(
        expected, abs=1e-5
    )
    # Evenly spaced over the split: of four tiles, two are read, the first and the last.
    blank = torch.zeros(4, 4, dtype=torch.long)
    spread = MaskTiles([quarter, blank, blank, quarter])
    assert prior_loss(SegmentationLoss("ce"), spread, 2, 2, tiles=2) == pytest.approx(entropy, abs=1e-5)
    mixed = MaskTiles([quarter, torch.cat([quarter, quarter])])  # 4x4 and 8x4: batched alone, no error
    assert prior_loss(SegmentationLoss("ce"), mixed, 2, batch_size=2) == pytest.approx(entropy, abs=1e-5)
    assert math.isnan(prior_loss(SegmentationLoss("ce"), MaskTiles([torch.full((4, 4), IGNORE)]), 2, 1))
    assert math.isnan(prior_loss(SegmentationLoss("ce"), MaskTiles([]), 2, 1))


def test_small_batches_on_a_gpu_get_a_hint() -> None:
    hint = train.small_batch_hint(5, torch.device("cuda"))
    assert hint is not None and hint.startswith("batches of 5 tiles leave a GPU partly idle") and "--batch_size" in hint
    assert train.small_batch_hint(32, torch.device("cuda")) is None
    assert train.small_batch_hint(5, torch.device("cpu")) is None  # a CPU is busy at any batch


def test_weight_average_by_hand() -> None:
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    average = WeightAverage(model, decay=0.2)
    # Decay min(0.2, (1 + n) / (10 + n)): 0.1, 2/11, then 0.2.
    expected = []
    value = 1.0
    for new, decay in ((2.0, 0.1), (3.0, 2 / 11), (0.0, 0.2), (1.0, 0.2)):
        with torch.no_grad():
            model[0].weight.fill_(new)
        average.update()
        value = decay * value + (1 - decay) * new
        expected.append(value)
        assert average.model[0].weight.item() == pytest.approx(value, rel=1e-6)
    assert expected[:3] == pytest.approx([1.9, 2.8, 0.56])
    model[1].running_mean.fill_(0.7)
    averaged = average.averaged()
    assert averaged[1].running_mean.item() == pytest.approx(0.7) and not averaged.training  # buffers copied
    copy = WeightAverage(model, decay=0.2)
    copy.load_state_dict(average.state_dict())
    assert copy.updates == 4 and copy.model[0].weight.item() == average.model[0].weight.item()


def test_best_pth_takes_the_better_scoring_weights(
    square_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    assert split_dataset.main(args(square_data, run_dir)) == 0
    calls = []

    def evaluate(model: nn.Module, *_: object, **__: object) -> tuple[float, np.ndarray, np.ndarray]:
        calls.append(model)  # each epoch validates the trained weights, then their moving average
        cm = GOOD_CM if len(calls) % 2 == 0 else PRIOR_CM
        return 0.5, cm, np.zeros((2, 200), np.int64)

    monkeypatch.setattr(train, "evaluate", evaluate)
    assert train.main(args(square_data, run_dir, "--epochs=1", "--ema=0.9")) == 0
    assert len(calls) == 2 and calls[0] is not calls[1]
    best, last = (load_checkpoint(run_dir / "checkpoints" / name) for name in ("best.pth", "last.pth"))
    assert best["weights"] == "ema" and last["weights"] == "raw" and last["best_weights"] == "ema"
    assert all(torch.equal(best["model"][k], last["ema"]["model"][k]) for k in best["model"])
    assert not torch.equal(best["model"]["outc.weight"], last["model"]["outc.weight"])
    row = last["history"][0]
    assert row["weights"] == "ema" and row["val_ema_farmland_iou"] == pytest.approx(270 / 350)
    assert row["val_farmland_iou"] == pytest.approx(50 / 400)
    assert last["best_iou"] == pytest.approx(270 / 350)


def split_runs(square_data: Path, tmp_path: Path, *names: str) -> list[Path]:
    """Run folders under tmp_path, each with the same split of square_data: runs to compare."""
    run_dirs = [tmp_path / name for name in names]
    for run_dir in run_dirs:
        split_dataset.main(args(square_data, run_dir))
    return run_dirs


def test_resume_with_ema_ends_bit_identical(square_data: Path, tmp_path: Path) -> None:
    straight, interrupted = split_runs(square_data, tmp_path, "straight", "interrupted")
    assert train.main(args(square_data, straight, "--epochs=3", "--ema=0.9")) == 0
    assert train.main(args(square_data, interrupted, "--epochs=2", "--ema=0.9")) == 0
    assert train.main(args(square_data, interrupted, "--epochs=3", "--ema=0.9", "--resume=true")) == 0
    a, b = (load_checkpoint(run / "checkpoints" / "last.pth") for run in (straight, interrupted))
    assert a["ema"]["updates"] == b["ema"]["updates"] == 3 * 4  # 16 tiles in batches of 4, 3 epochs
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key])
        assert torch.equal(a["ema"]["model"][key], b["ema"]["model"][key])
    # The average trails the trained weights.
    assert not torch.equal(a["ema"]["model"]["outc.weight"], a["model"]["outc.weight"])
    assert [h["val_ema_farmland_iou"] for h in a["history"]] == [h["val_ema_farmland_iou"] for h in b["history"]]


def fake_clock(monkeypatch: pytest.MonkeyPatch, durations: dict[int, float], stop_at: int = 0) -> None:
    """A budget clock that only moves when an epoch trains: epoch e takes durations[e] (else durations[0])
    seconds. With ``stop_at``, that epoch is interrupted before it starts."""
    now = [0.0]

    def timed_epoch(cfg: Config, trainer: train.Trainer, job: Distributed, epoch: int) -> float:
        if epoch == stop_at:
            raise RuntimeError("interrupted")
        now[0] += durations.get(epoch, durations[0])
        return RUN_EPOCH(cfg, trainer, job, epoch)

    monkeypatch.setattr(train, "run_epoch", timed_epoch)
    monkeypatch.setattr(train, "budget_clock", lambda: now[0])


BUDGET = ["--time_budget=1", "--schedule=cosine", "--snapshot_every=0", "--tensorboard=false"]


def test_time_budget_plans_the_epochs_and_ends_the_cosine(
    square_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    straight, interrupted = split_runs(square_data, tmp_path, "straight", "interrupted")
    # 1 minute; epoch 1 takes 12 s (start-up), the others 6 s: planned 5 after epoch 1, then 2 + 42 // 6 = 9.
    fake_clock(monkeypatch, {0: 6.0, 1: 12.0})
    with caplog.at_level(logging.INFO, logger="train"):
        assert train.main(args(square_data, straight, *BUDGET, "--epochs=3")) == 0
    assert "--epochs=3 is ignored: --time_budget=1 plans the epochs" in caplog.text
    assert "time budget 1 min: about 12.0 s per epoch, planning 5 epochs" in caplog.text
    assert "time budget 1 min: about 6.0 s per epoch, planning 9 epochs (was 5" in caplog.text
    state = load_checkpoint(straight / "checkpoints" / "last.pth")
    lrs = [h["lr"] for h in state["history"]]
    assert len(lrs) == 9 and state["planned_epochs"] == 9 and state["elapsed"] == pytest.approx(60.0)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[-2] > 0  # the cosine ends with the last planned epoch
    assert lrs[0] == pytest.approx(0.01)  # epoch 1, before the plan: no decay yet
    assert state["config"]["epochs"] == 9
    # Interrupted during epoch 5, resumed: the same plan, the same schedule, the same weights.
    fake_clock(monkeypatch, {0: 6.0, 1: 12.0}, stop_at=5)
    with pytest.raises(RuntimeError, match="interrupted"):
        train.main(args(square_data, interrupted, *BUDGET))
    fake_clock(monkeypatch, {0: 6.0})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="train"):
        assert train.main(args(square_data, interrupted, *BUDGET, "--resume=true")) == 0
    assert "going on with the plan of 9 epochs (0.5 min spent)" in caplog.text
    resumed = load_checkpoint(interrupted / "checkpoints" / "last.pth")
    assert [h["lr"] for h in resumed["history"]] == lrs and resumed["elapsed"] == pytest.approx(60.0)
    a, b = weights(straight / "checkpoints" / "last.pth"), weights(interrupted / "checkpoints" / "last.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The finished run given a larger budget: planned anew at its pace so far (60 s over 9 epochs): 9 + 30 // 6.7.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="train"):
        assert train.main(args(square_data, straight, *BUDGET, "--time_budget=1.5", "--resume=true")) == 0
    assert "changed on the command line: time_budget 1.0 -> 1.5" in caplog.text
    assert "time budget 1.5 min (the saved run's: 1 min): 1.0 min spent, about 6.7 s per epoch, planning 13" in (
        caplog.text
    )
    assert "the cosine schedule now runs to epoch 13: the learning rate goes on from 2.16e-03 (the saved" in caplog.text
    longer = load_checkpoint(straight / "checkpoints" / "last.pth")
    assert [h["epoch"] for h in longer["history"]] == list(range(1, 14)) and longer["planned_epochs"] == 13
    assert longer["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12) and longer["elapsed"] == pytest.approx(84.0)


def test_the_second_plan_names_what_moved_it(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Epoch 1's time holds the start-up, epoch 2's the first epoch's checkpoints and log: the second plan says
    which of the two moved it, fewer epochs or more."""
    for first, second, planned, why in (
        (12.0, 6.0, (5, 9), "epoch 1 also paid for start-up"),
        (6.0, 12.0, (10, 5), "epoch 2 also paid for epoch 1's checkpoints and log"),
    ):
        clock = iter([first, first + second])
        monkeypatch.setattr(train, "budget_clock", lambda: next(clock))
        cfg, progress = Config(time_budget=1.0, epochs=0), train.Progress()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="train"):
            assert not train.plan_budget(cfg, progress, Distributed(), 1)
            assert cfg.epochs == planned[0]
            assert not train.plan_budget(cfg, progress, Distributed(), 2)
        assert cfg.epochs == planned[1]
        assert f"planning {planned[1]} epochs (was {planned[0]}; {why})" in caplog.text


def test_a_budget_given_to_a_run_trained_by_epochs_is_planned_at_its_epochs_pace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    progress = train.Progress(start_epoch=4, history=[{"epoch": e, "seconds": 10.0} for e in (1, 2, 3)])
    with caplog.at_level(logging.INFO, logger="train"):
        train.replan_budget(Config(time_budget=1.0), progress, saved_budget=0.0)
        assert (progress.planned_epochs, progress.elapsed) == (6, 30.0)  # 30 s spent, 30 s left at 10 s an epoch
        assert "planning 6 epochs" in caplog.text
        caplog.clear()
        train.replan_budget(Config(time_budget=0.25), progress, saved_budget=1.0)
    assert progress.planned_epochs == 3  # a budget already spent: nothing more to run, and the log does not plan
    assert "no further epoch fits: the run ends at epoch 3 (a larger --time_budget goes on)" in caplog.text
    assert "planning" not in caplog.text
    # 42 s spent at 14 s an epoch: the 18 s left hold one more epoch, not two (rounded down, never past the budget).
    progress = train.Progress(start_epoch=4, history=[{"epoch": e, "seconds": 14.0} for e in (1, 2, 3)])
    train.replan_budget(Config(time_budget=1.0), progress, saved_budget=0.0)
    assert progress.planned_epochs == 4


def test_time_budget_stops_when_epochs_slow_down(
    square_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    split_dataset.main(args(square_data, run_dir))
    # Planned 9 as above; from epoch 3 on an epoch takes 30 s: after epoch 3 (48 s) the next would end at 78 s.
    fake_clock(monkeypatch, {0: 30.0, 1: 12.0, 2: 6.0})
    with caplog.at_level(logging.INFO, logger="train"):
        assert train.main(args(square_data, run_dir, *BUDGET)) == 0
    assert "stopping after epoch 3 of the 9 planned, 0.8 min spent" in caplog.text
    assert "(epochs ran slower than planned: 16.0 s on average, the last 30.0 s)" in caplog.text
    assert len(load_checkpoint(run_dir / "checkpoints" / "last.pth")["history"]) == 3
    # The same command resumed: the budget is spent, so nothing more is trained (it had trained a 4th epoch, to 78 s).
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="train"):
        assert train.main(args(square_data, run_dir, *BUDGET, "--resume=true")) == 0
    assert "nothing to do: the checkpoint already finished epoch 3 of 3" in caplog.text
    assert "| epochs 4..3" not in caplog.text  # no start line for epochs that do not run
    state = load_checkpoint(run_dir / "checkpoints" / "last.pth")
    assert len(state["history"]) == 3 and state["elapsed"] == pytest.approx(48.0)
    # A larger budget goes on: 48 s spent at 16 s an epoch, 1.5 minutes hold 2 more.
    assert train.main(args(square_data, run_dir, *BUDGET, "--time_budget=1.5", "--resume=true")) == 0
    assert len(load_checkpoint(run_dir / "checkpoints" / "last.pth")["history"]) > 3


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("--n_classes=1", r"--n_classes=1: expected 2 or more classes .*; use --n_classes=2"),
        ("--epochs=0", r"--epochs=0: expected 1 or more epochs; use --epochs=100"),
        ("--time_budget=nan", r"--time_budget=nan: expected minutes of training \(e\.g\. 45\), or 0 for off; use"),
        ("--time_budget=inf", r"--time_budget=inf: expected minutes of training"),
        ("--scale_jitter=0.5", r"--scale_jitter=0.5: expected a zoom fraction from 0 \(off\) to below 0\.5"),
        ("--scale_jitter=-0.1", r"--scale_jitter=-0.1: expected a zoom fraction"),
        ("--focal_gamma=-0.5", r"--focal_gamma=-0.5: expected a focusing exponent of 0 or more; use --focal_gamma=2"),
        ("--collapse_patience=-1", r"--collapse_patience=-1: expected a number of epochs, or 0 for off"),
        ("--batch_size=0", r"--batch_size=0: expected 1 or more tiles per training step; use --batch_size=5"),
        ("--lr=-1", r"--lr=-1.0: expected a learning rate of 0 or more; use --lr=1e-4"),
        ("--lr=nan", r"--lr=nan: expected a learning rate of 0 or more"),
        ("--weight_decay=-1", r"--weight_decay=-1.0: expected a weight decay of 0 or more"),
        ("--step_size=0", r"--step_size=0: expected 1 or more epochs between learning-rate drops"),
        ("--gamma=0", r"--gamma=0.0: expected a factor above 0"),
        ("--warmup_epochs=-1", r"--warmup_epochs=-1.0: expected epochs of warm-up, or 0 for none"),
        ("--early_stop=-1", r"--early_stop=-1: expected a number of epochs, or 0 for never"),
        ("--snapshot_every=-1", r"--snapshot_every=-1: expected a number of epochs, or 0 for never"),
        ("--ignore_index=0", r"--ignore_index=0: expected the mask value of unlabelled pixels, not 0"),
        # Beyond 1 the contrast factor turns negative (tiles inverted); below 0 the jitter was silently off.
        ("--colour_jitter=5", r"--colour_jitter=5.0: expected a jitter amount from 0 \(off\) to below 1"),
        ("--colour_jitter=-0.1", r"--colour_jitter=-0.1: expected a jitter amount"),
        # Saved in the checkpoint: inf made predict.py resample scenes by a ratio of 0, nan crashed it.
        ("--pixel_size_m=inf", r"--pixel_size_m=inf: expected metres per pixel of the training tiles, or 0"),
        ("--pixel_size_m=nan", r"--pixel_size_m=nan: expected metres per pixel"),
        ("--pixel_size_m=-1", r"--pixel_size_m=-1.0: expected metres per pixel"),
    ],
)
def test_settings_that_would_fail_later_are_refused_before_any_tile_is_read(
    setting: str, message: str, shared_square_data: Path, run_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_tiles(*_: object) -> None:
        raise AssertionError("a tile was read before the settings were checked")

    monkeypatch.setattr(train, "load_splits", read_tiles)
    epochs = [] if setting.startswith("--epochs") else ["--epochs=1"]  # the old code trained with the others
    with pytest.raises(ValueError, match=message):
        train.main(args(shared_square_data, run_copy, *epochs, "--loss=focal", setting))


def test_epochs_are_not_checked_under_a_time_budget() -> None:
    train.check_settings(Config(epochs=0, time_budget=45.0))  # the budget plans the epochs: 0 is ignored
    with pytest.raises(ValueError, match=r"--epochs=0: expected 1 or more epochs"):
        train.check_settings(Config(epochs=0))


def test_a_refused_attempt_leaves_the_earlier_runs_config(shared_square_data: Path, run_copy: Path) -> None:
    saved = run_copy / "configs" / "train.json"
    before = saved.read_bytes()
    with pytest.raises(ValueError, match="--keep_epoch='first'"):
        train.main(args(shared_square_data, run_copy, "--keep_epoch=first", "--epochs=5"))
    val = run_copy / "splits" / "val.txt"
    val.write_text(val.read_text(encoding="utf-8") + "gone.png\tgone_mask.png\n", encoding="utf-8")
    with pytest.raises(DataError, match="no longer exist"):
        train.main(args(shared_square_data, run_copy, "--epochs=5"))
    assert saved.read_bytes() == before and json.loads(before)["epochs"] == 1  # trained_run's one epoch


def test_a_fresh_run_names_the_earlier_runs_outputs_it_leaves(
    shared_square_data: Path, run_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt_dir = run_copy / "checkpoints"
    (ckpt_dir / "epoch_004.pth").write_bytes((ckpt_dir / "last.pth").read_bytes())  # a snapshot of a longer run
    assert (run_copy / "threshold_curve.csv").is_file()
    with caplog.at_level(logging.WARNING, logger="train"):
        assert train.main(args(shared_square_data, run_copy, "--epochs=1", "--snapshot_every=0")) == 0
    warning = next(r.getMessage() for r in caplog.records if "an earlier run's checkpoints" in r.getMessage())
    assert "this fresh run overwrites last.pth and best.pth" in warning
    assert "the earlier run's checkpoints/epoch_004.pth, threshold_curve.csv, figures/threshold_curve.png" in warning
    assert "stay beside the new run's outputs" in warning and "or a new --run_dir" in warning
    assert (ckpt_dir / "epoch_004.pth").read_bytes()  # warned of, never deleted
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="train"):  # no earlier run, no warning
        train.warn_earlier_run(run_copy / "splits")
    assert not caplog.records


def test_collapse_patience_0_turns_the_collapse_warning_off(caplog: pytest.LogCaptureFixture) -> None:
    one_class = np.array([[700, 0], [300, 0]])  # every val pixel predicted background
    for patience, cms, warned in ((0, [GOOD_CM] * 3, []), (0, [one_class] * 3, []), (2, [one_class] * 3, [2])):
        caplog.clear()
        cfg, progress, job = Config(collapse_patience=patience), train.Progress(), Distributed()
        with caplog.at_level(logging.WARNING, logger="train"):
            for epoch, cm in enumerate(cms, start=1):
                train.judge(cfg, scripted_row(epoch, 0.5, cm), progress, job)
        found = [r.getMessage() for r in caplog.records if "collapsed" in r.getMessage()]
        assert [int(m.split(":")[0].removeprefix("epoch ")) for m in found] == warned


def test_the_collapse_warning_judges_the_tuned_threshold_not_the_argmax(caplog: pytest.LogCaptureFixture) -> None:
    # The argmax calls every val pixel farmland (probabilities 0.5-0.6 for background, 0.7-0.9 for farmland),
    # but the tuned cut, which best.pth and predict.py use, separates them: no collapse.
    all_farmland = np.array([[0, 700], [0, 300]])
    separated = np.zeros((2, 200), np.int64)
    separated[0, 100:120], separated[1, 150:180] = 35, 10
    cut, tuned = best_threshold(separated)
    assert 0.6 <= cut <= 0.7 and tuned == 1.0
    everywhere = np.zeros((2, 200), np.int64)  # the tuned cut calls every pixel farmland: a collapse still
    everywhere[0, 150:170], everywhere[1, 150:170] = 35, 15
    for histogram, warned in ((separated, []), (everywhere, [3])):
        caplog.clear()
        cfg, progress, job = Config(collapse_patience=3), train.Progress(), Distributed()
        with caplog.at_level(logging.WARNING, logger="train"):
            for epoch in (1, 2, 3):
                row = scripted_row(epoch, 0.5, all_farmland)
                row["val_threshold"], row["val_tuned_farmland_iou"] = best_threshold(histogram)
                row["histogram"] = histogram
                train.judge(cfg, row, progress, job)
        found = [r.getMessage() for r in caplog.records if "collapsed" in r.getMessage()]
        assert [int(m.split(":")[0].removeprefix("epoch ")) for m in found] == warned
        assert all("farmland everywhere" in m for m in found)


def test_bad_ema_and_time_budget_are_refused(shared_square_data: Path, run_copy: Path) -> None:
    with pytest.raises(ValueError, match=r"--ema=1.0: expected a decay from 0 \(off\) to below 1"):
        train.main(args(shared_square_data, run_copy, "--ema=1", "--epochs=1"))
    with pytest.raises(ValueError, match=r"--time_budget=-5.0: expected minutes of training"):
        train.main(args(shared_square_data, run_copy, "--time_budget=-5", "--epochs=1"))


def test_keep_epoch_last_makes_every_epoch_the_kept_one() -> None:
    scores = [GOOD_CM, PRIOR_CM, GOOD_CM, PRIOR_CM]  # farmland IoU 0.77, 0.125, 0.77, 0.125
    for keep, kept in (("best", [True, False, False, False]), ("last", [True, True, True, True])):
        cfg, progress, job = Config(keep_epoch=keep), train.Progress(), Distributed()
        found = [train.judge(cfg, scripted_row(e, 0.5, cm), progress, job) for e, cm in enumerate(scores, 1)]
        assert found == kept
        assert progress.best_epoch == (1 if keep == "best" else 4)
        assert progress.best_iou == pytest.approx(270 / 350 if keep == "best" else 50 / 400)


def test_keep_epoch_last_saves_the_last_epoch_as_best_pth(
    shared_square_data: Path, run_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ValueError, match=r"--keep_epoch='first': expected one of best, last, auto"):
        train.main(args(shared_square_data, run_copy, "--keep_epoch=first", "--epochs=1"))
    with caplog.at_level(logging.INFO, logger="train"):
        assert (
            train.main(args(shared_square_data, run_copy, "--keep_epoch=last", "--tune_threshold=true", "--epochs=2"))
            == 0
        )
    # The old log called the kept epoch "best" (best 0.29, epoch 2) after an epoch 1 that scored 0.58.
    said = [r.getMessage() for r in caplog.records]
    assert any("(kept " in m and ", epoch 2)" in m for m in said) and not any("(best " in m for m in said)
    assert any(m.startswith("kept the last epoch, 2 (val farmland IoU ") for m in said)
    best = load_checkpoint(run_copy / "checkpoints" / "best.pth")
    last = load_checkpoint(run_copy / "checkpoints" / "last.pth")
    assert best["epoch"] == 2 and best["threshold"] == last["history"][-1]["val_threshold"]
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])


def test_recompute_batchnorm_by_hand() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout2d(0.5), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    for layer in (model[1], model[3]):
        layer.running_mean.fill_(5.0)
        layer.running_var.fill_(math.inf)  # not carried over
        layer.momentum = 0.3
    images = (
        torch.rand(6, 3, 4, 5) * torch.tensor([1.0, 3.0, 0.5])[:, None, None]
        + torch.tensor([0.0, 2.0, -1.0])[:, None, None]
    )
    loader = DataLoader(list(zip(images, torch.zeros(6, 4, 5))), batch_size=4)  # batches of 4 and 2 tiles
    model.train()
    recompute_batchnorm(model, loader, torch.device("cpu"), torch.contiguous_format, None)
    assert model.training and model[0].training  # the mode it had
    assert model[1].momentum == model[3].momentum == 0.3 and int(model[3].num_batches_tracked) == 2
    x = images.double().numpy()
    # First layer: every pixel of the six tiles, dropout off (it would scale and zero some of them).
    assert model[1].running_mean.numpy() == pytest.approx(x.mean(axis=(0, 2, 3)), rel=1e-5)
    assert model[1].running_var.numpy() == pytest.approx(x.var(axis=(0, 2, 3), ddof=1), rel=1e-5)
    # Second layer: the convolution of the first layer's output, normalised by each batch's own statistics.
    seen = []
    for batch in (x[:4], x[4:]):
        mean, var = batch.mean(axis=(0, 2, 3), keepdims=True), batch.var(axis=(0, 2, 3), keepdims=True)
        normed = (batch - mean) / np.sqrt(var + model[1].eps)  # affine weight 1, bias 0 at initialisation
        weight, bias = model[2].weight.detach().double().numpy()[:, :, 0, 0], model[2].bias.detach().double().numpy()
        seen.append(np.einsum("oc,nchw->nohw", weight, normed) + bias[None, :, None, None])
    conv = np.concatenate(seen)
    assert model[3].running_mean.numpy() == pytest.approx(conv.mean(axis=(0, 2, 3)), rel=1e-4, abs=1e-6)
    assert model[3].running_var.numpy() == pytest.approx(conv.var(axis=(0, 2, 3), ddof=1), rel=1e-4)


def test_precise_bn_changes_the_statistics_and_nothing_else(shared_square_data: Path, tmp_path: Path) -> None:
    runs = {}
    for tiles in (0, 6):
        run_dir = tmp_path / f"bn{tiles}"
        assert split_dataset.main(args(shared_square_data, run_dir)) == 0
        assert (
            train.main(
                args(shared_square_data, run_dir, "--epochs=2", "--amp=off", "--ema=0.9", f"--precise_bn={tiles}")
            )
            == 0
        )
        runs[tiles] = load_checkpoint(run_dir / "checkpoints" / "last.pth")
    plain, precise = runs[0]["model"], runs[6]["model"]
    statistics = [key for key in plain if key.endswith(("running_mean", "running_var"))]
    assert statistics and all(not torch.equal(plain[key], precise[key]) for key in statistics)
    assert all(
        torch.equal(plain[key], precise[key]) for key in plain if key not in statistics and "num_batches" not in key
    )
    # The saved statistics are those of the saved weights over six training tiles drawn with the run's seed.
    cfg = Config(**{**runs[6]["config"], "num_workers": 0})
    train_set, _ = train.build_datasets(cfg, *train.load_splits(tmp_path / "bn6"))
    loader = batchnorm_loader(train_set, cfg)
    assert loader is not None and len(loader.dataset) == 6
    assert [t.tolist() for t in loader.dataset[0]] == [t.tolist() for t in train_set.tensors(loader.dataset.indices[0])]
    model = model_from_checkpoint({**runs[6], "model": plain}, torch.device("cpu"), True)
    recompute_batchnorm(model, loader, torch.device("cpu"), torch.channels_last, None)  # as trained: fp32
    for key in statistics:
        assert torch.allclose(model.state_dict()[key], precise[key], rtol=1e-5, atol=1e-7), key
    # The moving average gets statistics of its own weights (without precise_bn it takes the network's).
    average = runs[6]["ema"]["model"]
    model = model_from_checkpoint({**runs[6], "model": average}, torch.device("cpu"), True)
    recompute_batchnorm(model, loader, torch.device("cpu"), torch.channels_last, None)
    for key in statistics:
        assert torch.allclose(model.state_dict()[key], average[key], rtol=1e-5, atol=1e-7), key
        assert not torch.equal(average[key], precise[key])
        assert torch.equal(runs[0]["ema"]["model"][key], plain[key])


def test_bad_precise_bn_is_refused(shared_square_data: Path, run_copy: Path) -> None:
    with pytest.raises(ValueError, match=r"--precise_bn=-1: expected a number of training tiles, 2 or more"):
        train.main(args(shared_square_data, run_copy, "--precise_bn=-1", "--epochs=1"))
    # One tile: a ResNet encoder's one-pixel deepest map gives BatchNorm one value per channel, after epoch 1.
    with pytest.raises(ValueError, match=r"--precise_bn=1: expected .* 2 or more .*; use --precise_bn=256"):
        train.main(args(shared_square_data, run_copy, "--precise_bn=1", "--epochs=1", "--encoder=resnet18"))


@pytest.mark.parametrize(
    ("summary", "kept"),
    [
        ({"groups": {"train": 9, "val": 2, "test": 2}}, "last"),
        ({"groups": {"train": 9, "val": 3, "test": 1}}, "best"),
        ({"train": 16, "val": 2, "test": 2}, "best"),  # split by tile: no scenes counted
        (None, "best"),  # lists made by hand: no summary
        ("{not json", "best"),
    ],
)
def test_keep_epoch_auto_keeps_the_last_epoch_with_few_validation_scenes(
    summary: dict | str | None, kept: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "splits").mkdir()
    if summary is not None:
        text = summary if isinstance(summary, str) else json.dumps(summary)
        (tmp_path / "splits" / "summary.json").write_text(text, encoding="utf-8")
    cfg = Config(run_dir=str(tmp_path), keep_epoch="auto")
    with caplog.at_level(logging.INFO, logger="train"):
        train.resolve_keep_epoch(cfg, Distributed())
    assert cfg.keep_epoch == kept
    # The choice is in the log either way (docs/configuration.md: the values chosen are in the log).
    assert "keep_epoch=auto: " in caplog.text
    assert ("keeps the last epoch" if kept == "last" else "keeps the epoch with the best val") in caplog.text
    for fixed in ("best", "last"):  # given explicitly, whatever the split
        cfg = Config(run_dir=str(tmp_path), keep_epoch=fixed)
        train.resolve_keep_epoch(cfg, Distributed())
        assert cfg.keep_epoch == fixed


def test_early_stop_beside_keep_epoch_last_is_warned_of_whether_given_or_chosen(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "summary.json").write_text(json.dumps({"groups": {"val": 1}}), encoding="utf-8")
    for keep, warned in (("last", True), ("auto", True), ("best", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="train"):
            train.resolve_keep_epoch(Config(run_dir=str(tmp_path), keep_epoch=keep, early_stop=3), Distributed())
        assert ("--early_stop=3 has no effect when the last epoch is kept" in caplog.text) == warned, keep


class Tiles:
    """A stand-in for a FarmlandDataset of ``count`` tiles: batchnorm_loader only counts and indexes them."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def tensors(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((3, 4, 4), float(index)), torch.zeros(4, 4, dtype=torch.long)


@pytest.mark.parametrize(
    ("tiles", "precise_bn", "batch", "sizes"),
    [(20, 11, 5, [5, 6]), (20, 10, 5, [5, 5]), (20, 12, 5, [5, 5, 2]), (7, 256, 3, [3, 4]), (20, 3, 1, [1, 1, 1])],
)
def test_batchnorm_tiles_are_seeded_and_never_end_on_a_batch_of_one(
    tiles: int, precise_bn: int, batch: int, sizes: list[int]
) -> None:
    cfg = Config(precise_bn=precise_bn, batch_size=batch, seed=5)
    loader = batchnorm_loader(Tiles(tiles), cfg)
    assert loader is not None and [len(images) for images, _ in loader] == sizes
    drawn = [int(images[i, 0, 0, 0]) for images, _ in loader for i in range(len(images))]
    assert drawn == sorted(set(drawn)) and len(drawn) == min(precise_bn, tiles)  # distinct, in a fixed order
    again = batchnorm_loader(Tiles(tiles), cfg)
    assert drawn == [int(images[i, 0, 0, 0]) for images, _ in again for i in range(len(images))]
    assert batchnorm_loader(Tiles(tiles), Config(precise_bn=0)) is None


def stop_at_epoch(monkeypatch: pytest.MonkeyPatch, stop_at: int) -> None:
    """Make train.py stop (as if killed) when epoch ``stop_at`` begins, its earlier epochs saved."""

    def run_epoch(cfg: Config, trainer: train.Trainer, job: Distributed, epoch: int) -> float:
        if epoch == stop_at:
            raise RuntimeError("interrupted")
        return RUN_EPOCH(cfg, trainer, job, epoch)

    monkeypatch.setattr(train, "run_epoch", run_epoch)


def refuse_tile_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def read_tiles(*_: object) -> None:
        raise AssertionError("a tile was read before the resume was refused")

    monkeypatch.setattr(train, "load_splits", read_tiles)


RECOMMENDED_RUN = ["--recipe=recommended", "--epochs=3", "--snapshot_every=0", "--tensorboard=false"]


def test_resume_goes_on_with_the_saved_config_and_the_keys_given_over_it(
    square_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    straight, stopped = split_runs(square_data, tmp_path, "straight", "stopped")
    assert train.main(args(square_data, straight, *RECOMMENDED_RUN)) == 0
    stop_at_epoch(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="interrupted"):
        train.main(args(square_data, stopped, *RECOMMENDED_RUN))
    monkeypatch.undo()
    # Named by its run folder alone, the run goes on with its recipe, width, epochs and workers: the weights,
    # learning rates and tuned threshold of the uninterrupted run (the old code refused, downscale: 2 vs 1).
    with caplog.at_level(logging.INFO, logger="train"):
        assert train.main([f"--run_dir={stopped}", "--resume=true"]) == 0
    assert "resuming with the config saved in last.pth, as saved" in caplog.text
    a, b = (load_checkpoint(run / "checkpoints" / "last.pth") for run in (straight, stopped))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [h["lr"] for h in a["history"]] == [h["lr"] for h in b["history"]]
    saved = b["config"]
    assert (saved["loss"], saved["tune_threshold"], saved["downscale"], saved["base_width"]) == ("ce_dice", True, 2, 4)
    assert b["requested_speed"] == {"amp": "auto", "channels_last": True}  # as asked, before the fast path chose
    best_a, best_b = (load_checkpoint(run / "checkpoints" / "best.pth") for run in (straight, stopped))
    assert best_b["threshold"] is not None and best_b["threshold"] == best_a["threshold"]
    # The finished run resumed as it was: nothing to do (the old code began epoch 4/100, the cosine back at 1e-2).
    stamp = (straight / "checkpoints" / "last.pth").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="train"):
        assert train.main([f"--run_dir={straight}", "--resume=true"]) == 0
    assert "nothing to do: the checkpoint already finished epoch 3 of 3" in caplog.text
    assert (straight / "checkpoints" / "last.pth").stat().st_mtime_ns == stamp
    # Extended by a key given on the command line: logged, with the cosine it stretches.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="train"):
        assert train.main([f"--run_dir={straight}", "--resume=true", "--epochs=4", "--early_stop=5"]) == 0
    assert "changed on the command line: epochs 3 -> 4, early_stop 0 -> 5" in caplog.text
    assert "the cosine schedule now runs to epoch 4: the learning rate goes on from 1.46e-03" in caplog.text
    longer = load_checkpoint(straight / "checkpoints" / "last.pth")
    assert [h["epoch"] for h in longer["history"]] == [1, 2, 3, 4] and longer["config"]["loss"] == "ce_dice"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("--lr=0.001", r"the training differs \(lr: checkpoint 0.01 vs config 0.001\)\. .*drop --lr from the"),
        ("--recipe=recommended", r"\(recipe: checkpoint reference vs config recommended\)"),
        ("--tune_threshold=true", r"\(tune_threshold: checkpoint False vs config True\)"),
        ("--bands=3,2,1", r"\(bands: checkpoint '' vs config 3,2,1\)"),
        (
            "--base_width=8 --seed=1 --loss=dice",
            r"the network differs \(base_width: checkpoint 4 vs config 8\) and the training differs \(seed: "
            r"checkpoint 42 vs config 1; loss: checkpoint ce vs config dice\)\. A resumed run goes on with the "
            r"settings saved in its checkpoint: drop --base_width --seed --loss from the command line, or start a "
            r"new --run_dir to train with the new values",
        ),
    ],
)
def test_a_resume_that_would_change_the_training_is_refused_before_any_tile_is_read(
    given: str, message: str, shared_square_data: Path, run_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse_tile_reads(monkeypatch)
    record = (run_copy / "configs" / "train.json").read_bytes()
    with pytest.raises(DataError, match=message):
        train.main(args(shared_square_data, run_copy, "--epochs=2", "--resume=true", *given.split()))
    assert (run_copy / "configs" / "train.json").read_bytes() == record


def test_auto_values_given_on_resume_stand_for_the_runs_choice(
    shared_square_data: Path, run_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # trained_run: the reference's downscale=1 and keep_epoch=best, tiles without a pixel size. Auto would now
    # choose downscale 2 (the old code refused: downscale: checkpoint 1 vs config 2).
    auto = ["--downscale=0", "--keep_epoch=auto", "--pixel_size_m=0"]
    with caplog.at_level(logging.INFO, logger="train"):
        assert train.main(args(shared_square_data, run_copy, "--epochs=1", "--resume=true", *auto)) == 0
    # Only the folder differs from the saved run's (run_copy is a copy of trained_run), which is not a change.
    resumed = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming with the config"))
    assert resumed == "resuming with the config saved in last.pth, as saved"
    assert "nothing to do: the checkpoint already finished epoch 1 of 1" in caplog.text
    saved = json.loads((run_copy / "configs" / "train.json").read_text(encoding="utf-8"))
    assert (saved["downscale"], saved["keep_epoch"], saved["resume"]) == (1, "best", True)


def test_resume_without_last_pth_is_refused_before_any_work(
    shared_square_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, mistyped = tmp_path / "run", tmp_path / "mistyped"
    split_dataset.main(args(shared_square_data, run_dir))
    refuse_tile_reads(monkeypatch)
    for folder in (run_dir, mistyped):
        with pytest.raises(DataError) as refused:
            train.main(args(shared_square_data, folder, "--resume=true"))
        assert str(refused.value) == (
            f"{folder / 'checkpoints' / 'last.pth'}: checkpoint not found, so there is nothing to resume; drop "
            "--resume=true to start training, or point --run_dir at the run to resume"
        )
    assert not mistyped.exists()  # no folder made for a mistyped run_dir
    assert not (run_dir / "logs" / "train.log").exists()


def test_the_line_that_stops_training_goes_to_its_log_file_and_once_to_the_terminal(
    shared_square_data: Path, run_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(train, "train_epoch", lambda *a, **k: (float("nan"), 1))
    assert cli.run_main(lambda: train.main(args(shared_square_data, run_copy, "--epochs=1"))) == 2
    close_log_files()
    line = "error: epoch 1: the training loss became nan; training stopped and this epoch was not saved"
    assert capsys.readouterr().err.count(line) == 1
    log = (run_copy / "logs" / "train.log").read_text(encoding="utf-8")
    assert f"train ERROR {line}" in log


def test_a_run_that_ran_to_its_end_goes_on_and_one_stopped_early_stays_stopped() -> None:
    cfg = Config(epochs=6, early_stop=2)
    ended = train.Progress(start_epoch=4, best_epoch=1, saved_end=3)  # epochs 2 and 3 no better, but the end
    assert not train.stays_stopped(cfg, ended)
    stopped = train.Progress(start_epoch=4, best_epoch=1, saved_end=10)  # stopped at 3 of 10
    assert train.stays_stopped(cfg, stopped)
    assert not train.stays_stopped(Config(epochs=6, early_stop=5), stopped)  # a larger early_stop goes on
    assert not train.stays_stopped(cfg, train.Progress())  # a fresh run


def test_resume_config_keeps_timed_choices_as_requests_and_refuses_a_file_it_cannot_resume(tmp_path: Path) -> None:
    from training import check_resumable, resume_config

    last = tmp_path / "checkpoints" / "last.pth"
    last.parent.mkdir()
    saved = {**vars(Config(recipe="recommended", amp="bf16", channels_last=False, pixel_size_m=0.0, epochs=3))}
    state = {"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 3, "history": [], "config": saved}
    torch.save(state, last)
    resumed, changed = resume_config(Config(run_dir=str(tmp_path), epochs=5), {"epochs", "run_dir", "resume"})
    assert (resumed.amp, resumed.channels_last) == ("auto", True)  # fast_path takes the run's choice from last.pth
    assert resumed.recipe == "recommended" and changed == {"epochs": (3, 5)}
    resumed, _ = resume_config(Config(run_dir=str(tmp_path), amp="off"), {"amp", "run_dir"})
    assert resumed.amp == "off"  # typed: forced
    # What the run's command asked (kept in last.pth) stands: a precision forced there stays forced.
    torch.save({**state, "requested_speed": {"amp": "off", "channels_last": False}}, last)
    resumed, _ = resume_config(Config(run_dir=str(tmp_path)), {"run_dir"})
    assert (resumed.amp, resumed.channels_last) == ("off", False)
    torch.save({**state, "requested_speed": {"amp": "auto", "channels_last": True}}, last)
    assert resume_config(Config(run_dir=str(tmp_path)), {"run_dir"})[0].amp == "auto"
    torch.save({**state, "requested_speed": {"amp": None, "channels_last": "false"}}, last)  # not ours: ignored
    resumed, _ = resume_config(Config(run_dir=str(tmp_path)), {"run_dir"})
    assert (resumed.amp, resumed.channels_last) == ("auto", True)
    torch.save(state, last)
    # A run saved without a pixel size (an older version) resumes when training now reads one from the tiles.
    check_resumable(state, Config(**{**saved, "pixel_size_m": 0.5}), last)
    with pytest.raises(DataError, match="training differs \\(pixel_size_m: checkpoint 1.0 vs config 0.5\\)"):
        check_resumable(
            {**state, "config": {**saved, "pixel_size_m": 1.0}}, Config(**{**saved, "pixel_size_m": 0.5}), last
        )
    torch.save({"model": {}, "config": saved}, last)  # a weight snapshot (epoch_NNN.pth) copied over last.pth
    with pytest.raises(DataError, match="last.pth: not a checkpoint train.py can resume \\(no optimizer, scheduler"):
        resume_config(Config(run_dir=str(tmp_path)), {"run_dir"})


def test_a_second_training_into_the_same_run_folder_is_refused_and_a_dead_ones_lock_taken_over(
    shared_square_data: Path, run_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import socket
    import subprocess
    import sys

    lock = run_copy / "checkpoints" / "train.lock"
    best = (run_copy / "checkpoints" / "best.pth").read_bytes()
    # A training still running here (the process that started this one stands in for it): the old code trained
    # on, and the two runs overwrote each other's best.pth and last.pth, each then naming the other's weights.
    held = {"pid": os.getppid(), "host": socket.gethostname(), "started": "2026-01-01 08:00:00"}
    lock.write_text(json.dumps(held), encoding="utf-8")
    refuse_tile_reads(monkeypatch)
    running = rf"train.py \(process {os.getppid()} on .*\) is already running into this run"
    with pytest.raises(ValueError, match=running):
        train.main(args(shared_square_data, run_copy, "--epochs=1"))
    with pytest.raises(ValueError, match=r"delete .*train.lock"):
        train.main(args(shared_square_data, run_copy, "--epochs=2", "--resume=true"))
    assert (run_copy / "checkpoints" / "best.pth").read_bytes() == best and json.loads(lock.read_text()) == held
    monkeypatch.undo()
    # The lock of a training that has ended (killed with -9) is taken over, and released at the end.
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    lock.write_text(json.dumps(held | {"pid": int(ended.stdout)}), encoding="utf-8")
    # The half checkpoint it was saving stayed for good beside the new run's, as large as a checkpoint.
    half = files.atomic_temporary(run_copy / "checkpoints" / "last.pth")
    half.write_bytes(b"half a checkpoint")
    assert train.main(args(shared_square_data, run_copy, "--epochs=2", "--resume=true")) == 0
    assert not lock.exists() and not half.exists()


def test_a_lock_naming_this_very_process_is_stale(tmp_path: Path) -> None:
    import socket

    # A training killed with -9 in a container, started again there with the same pid (1, often) and host name:
    # the lock names this process, which has not taken it yet, so it is the dead one's; it was refused for ever.
    lock = tmp_path / "run" / "checkpoints" / "train.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "?"}), encoding="utf-8")
    with files.run_lock(lock, "train.py"):
        assert json.loads(lock.read_text(encoding="utf-8"))["started"] != "?"
    assert not lock.exists()


def test_a_lock_being_written_is_held_and_an_old_unreadable_one_stale(tmp_path: Path) -> None:
    # run_lock creates the file and then writes it: a second run reading it between the two took it as a dead
    # run's and took the lock too. Empty and young, it is held; empty and old (a run killed in that instant), stale.
    lock = tmp_path / "run" / "checkpoints" / "train.lock"
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"")
    with pytest.raises(ValueError, match=r"train.py \(process \? on \?, started a moment ago\) is already running"):
        with files.run_lock(lock, "train.py"):
            pass
    assert lock.read_bytes() == b""
    old = time.time() - 2 * files.LOCK_WRITING_S
    os.utime(lock, (old, old))
    with files.run_lock(lock, "train.py"):
        assert json.loads(lock.read_text(encoding="utf-8"))["pid"] == os.getpid()
    assert not lock.exists()


def test_a_lock_that_could_not_be_written_is_not_left_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    # A full disk as the lock was written left it empty: the next train.py was refused as if one were running.
    def full_disk(fd: int, mode: str) -> object:
        os.close(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    lock = tmp_path / "run" / "checkpoints" / "train.lock"
    lock.parent.mkdir(parents=True)
    with monkeypatch.context() as patch:
        patch.setattr(files.os, "fdopen", full_disk)
        with pytest.raises(OSError, match="No space left"):
            with files.run_lock(lock, "train.py"):
                pass
    assert not lock.exists()
    with files.run_lock(lock, "train.py"):
        assert lock.is_file()


def test_a_fresh_run_stopped_before_its_first_epoch_does_not_offer_the_earlier_runs_last_pth(
    shared_square_data: Path, run_copy: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the tiles are read, before epoch 1 of the new run

    monkeypatch.setattr(train, "load_splits", interrupted)
    # run_copy holds an earlier, finished run's last.pth: resuming it would go on with that run, not this one.
    with caplog.at_level(logging.WARNING, logger="train"), pytest.raises(KeyboardInterrupt):
        train.main(args(shared_square_data, run_copy, "--epochs=3", "--base_width=4"))
    assert "goes on from there" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="train"), pytest.raises(KeyboardInterrupt):
        train.main(args(shared_square_data, run_copy, "--epochs=3", "--resume=true"))
    assert "--resume=true goes on from there" in caplog.text  # a resumed run's last.pth is its own


def test_a_resumed_run_writes_the_reports_a_stop_after_last_pth_left_unwritten(
    shared_square_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    split_dataset.main(args(shared_square_data, run_dir))

    def stopped(*_: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C once last.pth of epoch 1 was saved, before its log and threshold curve

    monkeypatch.setattr(train, "report", stopped)
    with caplog.at_level(logging.WARNING, logger="train"), pytest.raises(KeyboardInterrupt):
        train.main(args(shared_square_data, run_dir, "--epochs=2", "--lr=0"))
    assert f"python train.py --run_dir={run_dir} --resume=true goes on from there" in caplog.text
    assert not (run_dir / "threshold_curve.csv").exists()
    monkeypatch.undo()
    # Epoch 2 (at lr 0) does not beat epoch 1: the old code never wrote epoch 1's threshold curve.
    assert train.main([f"--run_dir={run_dir}", "--resume=true"]) == 0
    assert load_checkpoint(run_dir / "checkpoints" / "best.pth")["epoch"] == 1
    assert (run_dir / "threshold_curve.csv").is_file() and (run_dir / "figures" / "threshold_curve.png").is_file()
    assert (run_dir / "train_log.csv").read_text(encoding="utf-8-sig").count("\n") == 3  # header, epochs 1 and 2


class FullDiskFile:
    """What os.fdopen gives on a full disk: a file whose writes fail as the OS fails them."""

    def __init__(self, fd: int, mode: str) -> None:
        os.close(fd)

    def __enter__(self) -> "FullDiskFile":
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def write(self, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_stops_training_with_one_line_and_keeps_the_checkpoints(
    shared_square_data: Path, run_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import figures

    def on_a_full_disk(path: Path, data: bytes) -> None:
        with monkeypatch.context() as patch:
            patch.setattr(files.os, "fdopen", FullDiskFile)
            files.atomic_write_bytes(path, data)

    # The disk fills as epoch 1's curves figure is written, after its checkpoints: the old code ended in a
    # traceback (OSError: [Errno 28] No space left on device) naming no file and no way on.
    last = (run_copy / "checkpoints" / "last.pth").read_bytes()
    monkeypatch.setattr(figures, "atomic_write_bytes", on_a_full_disk)
    status = cli.run_main(lambda: train.main(args(shared_square_data, run_copy, "--epochs=2", "--seed=1")))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert status == 1, err
    curves = run_copy / "figures" / "training_curves.png"
    assert f"error: {curves}: could not be written (No space left on device); free some space" in err
    assert "Traceback" not in err and "--resume=true goes on from there" in err
    assert not [p for p in curves.parent.iterdir() if p.name.endswith(".tmp")]
    assert (run_copy / "checkpoints" / "last.pth").read_bytes() != last  # epoch 1's, saved before the figure
    assert load_checkpoint(run_copy / "checkpoints" / "last.pth")["epoch"] == 1


def test_a_stopped_torchrun_run_is_told_to_resume_under_torchrun_with_its_ranks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pth").write_bytes(b"saved")
    with caplog.at_level(logging.WARNING, logger="train"):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        train.say_how_to_go_on(tmp_path, 0.0, 2)
        assert f"torchrun --standalone --nproc_per_node=2 train.py --run_dir={tmp_path} --resume=true" in caplog.text
        assert "2 ranks, as trained" in caplog.text and "python train.py" not in caplog.text
        caplog.clear()
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # two machines of 8
        train.say_how_to_go_on(tmp_path, 0.0, 16)
        assert "the same torchrun command on every machine with train.py" in caplog.text


def test_a_deterministic_run_leaves_the_next_run_in_the_process_its_own_kernels(
    shared_square_data: Path, tmp_path: Path
) -> None:
    # Two trainings in one process (a notebook calling main twice): the first's --deterministic=true must not stay
    # in force for the second, which did not ask for it.
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    run_dir = tmp_path / "run"
    split_dataset.main(args(shared_square_data, run_dir))
    settings = ["--epochs=1", "--snapshot_every=0", "--tensorboard=false", "--deterministic=true"]
    assert train.main(args(shared_square_data, run_dir, *settings)) == 0
    close_log_files()
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic) == before


def test_more_ranks_than_training_tiles_is_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    # 6 ranks on 4 tiles: each epoch pads the order with 2 repeats; rank 0 alone says so, and only where it happens.
    with caplog.at_level(logging.WARNING, logger="train"):
        train.warn_ranks_beyond_tiles(4, Distributed(rank=0, world=6))
        train.warn_ranks_beyond_tiles(4, Distributed(rank=1, world=6))
        train.warn_ranks_beyond_tiles(4, Distributed(rank=0, world=4))
        train.warn_ranks_beyond_tiles(4, Distributed())
    assert [r.getMessage() for r in caplog.records] == [
        "6 ranks for 4 training tile(s): every rank takes as many tiles an epoch, so 2 of each epoch's 6 are repeats, "
        "which count some tiles more than once; train with 4 rank(s) at most (torchrun's --nproc_per_node, times "
        "--nnodes), or add training tiles"
    ]
