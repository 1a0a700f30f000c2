"""Train the U-Net on the training split, validating on the val split every epoch.

The reference recipe (Adam, StepLR, cross-entropy, batch 5, 100 epochs) plus what a trainer needs:
- every epoch: validation loss and farmland IoU (pooled over the val split, with miou.py's code);
- run_dir/checkpoints/best.pth (best val farmland IoU), last.pth (model, optimizer, scheduler, epoch, best
  score, history and config: ``--resume=true`` continues exactly where it stopped) and, every
  ``snapshot_every`` epochs, epoch_NNN.pth with the weights;
- run_dir/train_log.csv, run_dir/figures/training_curves.png, one log line per epoch, a progress bar.
Data order, augmentation and dropout are seeded per epoch, so a resumed run ends with the same weights
as an uninterrupted one. Runs on CUDA when available, else on the CPU, and says which.

train() below is the loop; each of its steps is a function of this file or of training.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import cli
import files
from config import Config
from data_preprocess import (
    DataError,
    FarmlandDataset,
    parse_bands,
    read_pair_list,
    should_cache,
)
from figures import plot_curves
from losses import make_loss
from metrics import FARMLAND, class_iou
from net_structure import build_model, count_parameters, set_normalisation
from runtime import (
    Distributed,
    all_reduce_sum,
    close_distributed,
    describe_device,
    init_distributed,
    keep_freed_memory,
    load_checkpoint,
    memory_format,
    resolve_amp,
    save_checkpoint,
    select_device,
    set_deterministic,
    weights_digest,
)
from training import (
    THRESHOLD_BINS,
    best_threshold,
    check_resumable,
    collapse_message,
    evaluate,
    make_loader,
    make_optimizer,
    make_scheduler,
    open_tensorboard,
    tiles_pixel_size,
    train_epoch,
    write_log_csv,
)

LOG = logging.getLogger("train")


@dataclasses.dataclass
class Trainer:
    """What every epoch works with, built once before the first."""

    model: nn.Module  # the network whose state the checkpoints hold
    net: nn.Module  # what trains: the model itself, or DistributedDataParallel around it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    amp: torch.dtype | None
    layout: torch.memory_format


@dataclasses.dataclass
class Progress:
    """Where the run stands: restored on resume, updated after every epoch."""

    start_epoch: int = 1
    best_iou: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    collapsed: int = 0  # epochs in a row whose val predictions hold one class (or no correct farmland)


def load_splits(run_dir: Path) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """The training and validation pairs that split_dataset.py (and augment.py) listed.

    Raises:
        DataError: an empty training split, or listed files that no longer exist.
    """
    train_pairs = read_pair_list(run_dir / "splits" / "train.txt")
    val_pairs = read_pair_list(run_dir / "splits" / "val.txt")
    if not train_pairs:
        raise DataError(
            f"{run_dir / 'splits' / 'train.txt'}: the training split is empty; add data and re-run split_dataset.py"
        )
    missing = [str(p) for pair in train_pairs + val_pairs for p in pair if not p.is_file()]
    if missing:
        shown = "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else "")
        raise DataError(
            f"the split lists {len(missing)} file(s) that no longer exist; restore them or re-run "
            f"split_dataset.py (and augment.py):\n  {shown}"
        )
    return train_pairs, val_pairs


def prepare_device(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Apply the device-wide settings (allocator, determinism, cuDNN autotuning); return the autocast dtype."""
    amp = resolve_amp(cfg.amp, device)
    if cfg.reuse_memory:
        keep_freed_memory()
    if cfg.deterministic:
        set_deterministic()
    if device.type == "cuda" and not cfg.deterministic:
        torch.backends.cudnn.benchmark = True  # tiles share one size: pick the fastest kernels once
    return amp


def build_datasets(
    cfg: Config, train_pairs: list[tuple[Path, Path]], val_pairs: list[tuple[Path, Path]]
) -> tuple[FarmlandDataset, FarmlandDataset]:
    """The training set (online augmentation, jitters) and the validation set (as is)."""
    cache = should_cache(cfg.cache_tiles, train_pairs + val_pairs)
    bands = parse_bands(cfg.bands)
    train_set = FarmlandDataset(
        train_pairs,
        cfg.in_channels,
        cfg.online_aug,
        cfg.mask_threshold,
        cache,
        cfg.ignore_index,
        cfg.scale_jitter,
        cfg.colour_jitter,
        bands,
    )
    val_set = FarmlandDataset(
        val_pairs, cfg.in_channels, False, cfg.mask_threshold, cache, cfg.ignore_index, bands=bands
    )
    return train_set, val_set


def split_statistics(cfg: Config, train_set: FarmlandDataset) -> tuple[list[float], list[float], list[int]] | None:
    """Band means and deviations and class pixel counts of the training split, when normalisation or class
    weights need them (None otherwise: reading every tile costs time)."""
    if not (cfg.normalise or cfg.loss == "weighted_ce"):
        return None
    statistics = train_set.statistics()
    LOG.info(
        "training split: band means %s, deviations %s; class pixels %s",
        [round(v, 4) for v in statistics[0]],
        [round(v, 4) for v in statistics[1]],
        statistics[2][: cfg.n_classes],
    )
    return statistics


def build_network(cfg: Config, statistics: Any, job: Distributed, layout: torch.memory_format) -> nn.Module:
    """The seeded U-Net with the split's band normalisation, SyncBatchNorm under torchrun when asked, on the device.

    Raises:
        ValueError: sync_bn asked for on CPUs.
    """
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.in_channels, cfg.n_classes, cfg.base_width, cfg.dropout)
    if cfg.normalise and statistics:
        set_normalisation(model, statistics[0], statistics[1])
    if cfg.sync_bn and job.world > 1:
        if job.device.type != "cuda":
            raise ValueError(
                "--sync_bn=true needs CUDA devices (torch's SyncBatchNorm runs on GPUs only); drop it on CPUs"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(job.device, memory_format=layout)


def restore(cfg: Config, trainer: Trainer, ckpt_dir: Path, job: Distributed) -> Progress:
    """With ``resume``, load everything the next epoch depends on from last.pth; else start afresh.

    Raises:
        DataError: last.pth is missing, unreadable or of another network.
    """
    last = ckpt_dir / "last.pth"
    if not cfg.resume:
        if job.main and last.exists():
            LOG.warning("%s exists and will be overwritten; use --resume=true to continue that run", last)
        return Progress()
    state = load_checkpoint(last, job.device)
    check_resumable(state, cfg, last)
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):  # empty when the earlier run was not in fp16
        trainer.scaler.load_state_dict(state["scaler"])
    progress = Progress(state["epoch"] + 1, state["best_iou"], state["best_epoch"], list(state["history"]))
    LOG.info(
        "resuming after epoch %d (best val farmland IoU %.4f at epoch %d)",
        state["epoch"],
        progress.best_iou,
        progress.best_epoch,
    )
    return progress


def build_trainer(cfg: Config, job: Distributed, ckpt_dir: Path) -> tuple[Trainer, Progress, tuple[int, int]]:
    """Data, loss, network, optimiser, schedule and scaler, restored when resuming and wrapped for torchrun.
    Returns the trainer, the progress so far and the (training, validation) tile counts."""
    train_pairs, val_pairs = load_splits(Path(cfg.run_dir))
    if cfg.pixel_size_m <= 0:  # stored with the config in every checkpoint: scenes are resampled to it
        cfg.pixel_size_m = tiles_pixel_size(train_pairs) or 0.0
    amp = prepare_device(cfg, job.device)
    train_set, val_set = build_datasets(cfg, train_pairs, val_pairs)
    statistics = split_statistics(cfg, train_set)
    criterion = make_loss(cfg.loss, statistics[2] if statistics else None, cfg.n_classes, cfg.focal_gamma)
    layout = memory_format(cfg.channels_last)
    model = build_network(cfg, statistics, job, layout)
    # Room for best.pth, last.pth and its temporary copy, and a snapshot: weights plus Adam's two moments each.
    files.check_writable(ckpt_dir, 4 * 3 * 4 * count_parameters(model))
    optimizer = make_optimizer(model, cfg, job.device)
    train_loader = make_loader(train_set, cfg, job.device, True, job.rank, job.world)
    trainer = Trainer(
        model=model,
        net=model,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, cfg, len(train_loader)),
        scaler=torch.amp.GradScaler(job.device.type, enabled=amp == torch.float16),
        criterion=criterion.to(job.device),
        train_loader=train_loader,
        val_loader=make_loader(val_set, cfg, job.device, False, job.rank, job.world),
        amp=amp,
        layout=layout,
    )
    progress = restore(cfg, trainer, ckpt_dir, job)
    if job.world > 1:  # DDP last, after the resumed weights are in: it starts every rank from rank 0's copy
        device_ids = [job.device.index] if job.device.type == "cuda" else None
        trainer.net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return trainer, progress, (len(train_set), len(val_set))


def log_start(cfg: Config, trainer: Trainer, job: Distributed, tiles: tuple[int, int], start_epoch: int) -> None:
    """One line saying where, how and on what the training runs."""
    LOG.info(
        "training on %s, %s, %s layout%s | U-Net width %d, %d parameters | %d training tiles, %d validation tiles"
        " | epochs %d..%d",
        describe_device(job.device),
        f"{str(trainer.amp).removeprefix('torch.')} mixed precision" if trainer.amp else "fp32",
        "channels-last" if cfg.channels_last else "contiguous",
        ", tiles cached in memory" if trainer.train_loader.dataset.cached is not None else "",
        cfg.base_width,
        count_parameters(trainer.model),
        tiles[0],
        tiles[1],
        start_epoch,
        cfg.epochs,
    )


def run_epoch(cfg: Config, trainer: Trainer, job: Distributed, epoch: int) -> float:
    """One pass over the training tiles, seeded by epoch so that a resumed run repeats it exactly; return the
    training loss averaged over ranks.

    Raises:
        FloatingPointError: the loss is not finite (the epoch is not saved).
    """
    # Dropout, distinct on every rank; data order and augmentation follow the sampler's epoch.
    torch.manual_seed(cfg.seed + epoch + 1_000_003 * job.rank)
    trainer.train_loader.sampler.set_epoch(epoch)
    loss, _ = train_epoch(
        trainer.net,
        trainer.train_loader,
        trainer.optimizer,
        trainer.scaler,
        job.device,
        trainer.layout,
        trainer.amp,
        f"epoch {epoch}/{cfg.epochs}" if job.main else "",
        criterion=trainer.criterion,
        scheduler=trainer.scheduler,
    )
    loss = float(all_reduce_sum(torch.tensor(loss, device=job.device))) / job.world
    if job.world > 1:
        # Each rank's last forward pass moved its own BatchNorm statistics: take rank 0's everywhere, so
        # that validation and the checkpoint see one network.
        for buffer in trainer.model.buffers():
            torch.distributed.broadcast(buffer, 0)
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"epoch {epoch}: the training loss became {loss}; training stopped and this epoch was not saved, "
            f"the last good checkpoint is {Path(cfg.run_dir) / 'checkpoints' / 'last.pth'}. "
            "Lower --lr, or check the images for NaN values"
        )
    return loss


def validate(cfg: Config, trainer: Trainer, job: Distributed, epoch: int, train_loss: float, started: float) -> dict:
    """Validation loss, pooled IoU (miou.py's confusion counts) and the tuned threshold: the epoch's history row.
    The row also carries the val confusion matrix under ``cm`` (not logged)."""
    tune = cfg.tune_threshold and cfg.n_classes == 2
    if len(trainer.val_loader.dataset):
        model, loader = trainer.model, trainer.val_loader
        val_loss, cm, histogram = evaluate(
            model, loader, job.device, cfg.n_classes, trainer.layout, trainer.amp, trainer.criterion, tune
        )
    else:
        val_loss, cm = math.nan, np.zeros((cfg.n_classes,) * 2, dtype=np.int64)
        histogram = np.zeros((2, THRESHOLD_BINS), np.int64)
    ious = class_iou(cm)
    cut, tuned_iou = best_threshold(histogram) if tune else (None, math.nan)
    predicted = cm.sum(axis=0)
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_farmland_iou": float(np.nan_to_num(ious[FARMLAND])),
        "val_miou": float(np.nanmean(ious)) if np.isfinite(ious).any() else math.nan,
        "val_threshold": math.nan if cut is None else cut,
        "val_tuned_farmland_iou": tuned_iou,
        "val_predicted_farmland": float(predicted[FARMLAND] / predicted.sum()) if predicted.sum() else math.nan,
        "lr": trainer.optimizer.param_groups[0]["lr"],  # where the schedule stands at the end of the epoch
        "seconds": round(time.perf_counter() - started, 3),
        "cm": cm,
    }


def judge(cfg: Config, row: dict, progress: Progress, job: Distributed) -> bool:
    """Record the epoch: whether it is the best so far (by val farmland IoU, at the tuned threshold when
    tuning; with nothing to score, the latest epoch is the best), and warn of a collapse to one class."""
    cm = row.pop("cm")
    progress.history.append(row)
    scoreless = not np.isfinite(class_iou(cm)[FARMLAND])
    if scoreless and row["epoch"] == progress.start_epoch:
        LOG.warning("the val split is empty or holds no farmland: best.pth will be the latest epoch's weights")
    tuned = row["val_tuned_farmland_iou"]
    score = tuned if math.isfinite(row["val_threshold"]) and math.isfinite(tuned) else row["val_farmland_iou"]
    improved = scoreless or score > progress.best_iou
    if improved:
        progress.best_iou, progress.best_epoch = score, row["epoch"]
    # A one-class network is the commonest silent failure: say so, with causes and fixes.
    one_class = int((cm.sum(axis=0) > 0).sum()) == 1  # every val pixel predicted background, or every one farmland
    stuck = not scoreless and (row["val_farmland_iou"] == 0.0 or one_class)
    progress.collapsed = progress.collapsed + 1 if stuck else 0
    if progress.collapsed == cfg.collapse_patience and job.main:
        LOG.warning("%s", collapse_message(row["epoch"], progress.collapsed, row["val_predicted_farmland"]))
    return improved


def save_checkpoints(cfg: Config, trainer: Trainer, progress: Progress, improved: bool, ckpt_dir: Path) -> None:
    """best.pth when the epoch improved, a weight snapshot every ``snapshot_every`` epochs, last.pth always."""
    row = progress.history[-1]
    epoch = row["epoch"]
    cut = None if math.isnan(row["val_threshold"]) else row["val_threshold"]
    state = {
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "epoch": epoch,
        "best_iou": progress.best_iou,
        "best_epoch": progress.best_epoch,
        "threshold": cut,  # the farmland probability cut tuned on val for these weights; None = argmax
        "history": progress.history,
        "config": dataclasses.asdict(cfg),
    }
    if improved:
        save_checkpoint(ckpt_dir / "best.pth", state)
    if cfg.snapshot_every > 0 and epoch % cfg.snapshot_every == 0:
        snapshot = {"model": state["model"], "epoch": epoch, "threshold": cut, "config": state["config"]}
        save_checkpoint(ckpt_dir / f"epoch_{epoch:03d}.pth", snapshot)
    save_checkpoint(ckpt_dir / "last.pth", state)


def report(cfg: Config, progress: Progress, board: Any) -> None:
    """The epoch's log line, train_log.csv, the curves figure and TensorBoard."""
    row, run_dir = progress.history[-1], Path(cfg.run_dir)
    tuned = math.isfinite(row["val_threshold"])
    LOG.info(
        "epoch %d/%d | train loss %.4f | val loss %.4f | val farmland IoU %.4f%s (best %.4f, epoch %d) | lr %.2e | %.1f s",
        row["epoch"],
        cfg.epochs,
        row["train_loss"],
        row["val_loss"],
        row["val_farmland_iou"],
        f", {row['val_tuned_farmland_iou']:.4f} at threshold {row['val_threshold']:.3f}" if tuned else "",
        progress.best_iou,
        progress.best_epoch,
        row["lr"],
        row["seconds"],
    )
    write_log_csv(progress.history, run_dir / "train_log.csv")
    plot_curves(progress.history, run_dir / "figures" / "training_curves.png")
    if board is not None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, float) and math.isfinite(value):
                board.add_scalar(key, value, row["epoch"])
        board.flush()


def check_ranks_agree(model: nn.Module, job: Distributed) -> None:
    """Under torchrun, fail unless every rank ended with the same weights.

    Raises:
        RuntimeError: the ranks' weights differ.
    """
    if job.world == 1:
        return
    digests = [None] * job.world
    torch.distributed.all_gather_object(digests, weights_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError(f"the ranks ended with different weights: {digests}")
    LOG.info("weights identical on all %d ranks (sha256 %s)", job.world, digests[0][:16])


def train(cfg: Config, job: Distributed | None = None) -> dict[str, Any]:
    """Run the whole training; return a summary (best val IoU, its epoch, checkpoint paths).

    Under torchrun (``job``) every rank trains on its share of each batch list through
    DistributedDataParallel; rank 0 alone writes checkpoints, logs and figures.
    """
    job = job or Distributed(device=select_device(cfg.device))
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    # 1. Data, loss, network, optimiser and schedule; restored from last.pth when resuming.
    trainer, progress, tiles = build_trainer(cfg, job, ckpt_dir)
    log_start(cfg, trainer, job, tiles, progress.start_epoch)
    board = open_tensorboard(Path(cfg.run_dir) / "tensorboard") if cfg.tensorboard and job.main else None
    for epoch in range(progress.start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        # 2. One pass over the training tiles.
        train_loss = run_epoch(cfg, trainer, job, epoch)
        # 3. Validation, best score, collapse warning.
        improved = judge(cfg, validate(cfg, trainer, job, epoch, train_loss, started), progress, job)
        # Every rank holds the same reduced scores, so every rank reaches the same decision.
        stop_early = cfg.early_stop > 0 and epoch - progress.best_epoch >= cfg.early_stop and epoch < cfg.epochs
        if job.main:
            # 4. Checkpoints, then the log line, CSV, curves and TensorBoard.
            save_checkpoints(cfg, trainer, progress, improved, ckpt_dir)
            report(cfg, progress, board)
        if stop_early:
            LOG.info(
                "early stop after epoch %d: no better val farmland IoU for %d epochs (best %.4f at epoch %d)",
                epoch,
                cfg.early_stop,
                progress.best_iou,
                progress.best_epoch,
            )
            break
    if board is not None:
        board.close()
    check_ranks_agree(trainer.model, job)
    if progress.start_epoch > cfg.epochs:
        LOG.info("nothing to do: the checkpoint already finished epoch %d of %d", progress.start_epoch - 1, cfg.epochs)
    return {
        "best_iou": progress.best_iou,
        "best_epoch": progress.best_epoch,
        "best": ckpt_dir / "best.pth",
        "last": ckpt_dir / "last.pth",
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Train with the config and command-line overrides; print where the results are."""
    cfg = cli.parse_args(argv, __doc__ or "")
    cli.check_paths(cfg)
    job = init_distributed(cfg.device)
    cli.setup_logging(cfg, "train", job.rank)
    if job.main:
        cli.save_config(cfg, "train")
    if job.world > 1:
        LOG.info("distributed training: %d ranks, batch %d per rank", job.world, cfg.batch_size)
    try:
        summary = train(cfg, job)
    finally:
        close_distributed()
    LOG.info("best val farmland IoU %.4f at epoch %d: %s", summary["best_iou"], summary["best_epoch"], summary["best"])
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
