"""Train the U-Net on the training split, validating on the val split every epoch.

The reference recipe (Adam, StepLR, cross-entropy, batch 5, 100 epochs) plus what a trainer needs:
- every epoch: validation loss and farmland IoU (pooled over the val split, counted by metrics.py as miou.py counts);
- run_dir/checkpoints/best.pth (best val farmland IoU), last.pth (model, optimizer, scheduler, epoch, best
  score, history and config: ``--resume=true`` continues exactly where it stopped, with the config saved
  there and the keys given on the command line over it) and, every
  ``snapshot_every`` epochs, epoch_NNN.pth with the weights;
- run_dir/train_log.csv, run_dir/figures/training_curves.png, one log line per epoch, a progress bar;
- for two classes, the best epoch's val IoU, precision and recall against the farmland threshold:
  run_dir/threshold_curve.csv and run_dir/figures/threshold_curve.png;
- with ``ema``, a moving average of the weights validated beside them (best.pth takes the better); with
  ``time_budget``, as many epochs as fit in the minutes given, the schedule planned to end with them.
Data order, augmentation and dropout are seeded per epoch, so a resumed run ends with the same weights
as an uninterrupted one. Runs on CUDA when available, else on the CPU, and says which.

train() below is the loop; each of its steps is a function of this file or of training.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import cli
import files
import resolution
from config import Config
from data_preprocess import (
    FEW_SCENES,
    DataError,
    FarmlandDataset,
    colour_band_count,
    original_training_pairs,
    parse_bands_for,
    read_pair_list,
    should_cache,
    shown_channels,
    split_scenes,
)
from encoders import imagenet_normalisation, load_encoder_weights
from fast_path import training_choice
from figures import plot_curves, plot_threshold_curve
from losses import make_loss
from metrics import FARMLAND, class_iou
from net_structure import ENCODERS, build_model, count_parameters, set_normalisation, smallest_batch
from runtime import (
    Distributed,
    RankStopped,
    all_reduce_sum,
    apply_reuse_memory,
    describe_device,
    init_distributed,
    kernel_settings_restored,
    leaving_distributed,
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
    WeightAverage,
    batchnorm_loader,
    best_threshold,
    check_resumable,
    collapse_message,
    counts_at,
    evaluate,
    iou_at,
    load_farmland_weights,
    loss_stall,
    make_loader,
    make_optimizer,
    make_scheduler,
    make_weight_average,
    near_prior,
    near_prior_loss,
    open_tensorboard,
    prior_iou,
    prior_loss,
    recompute_batchnorm,
    resume_config,
    stall_message,
    starting_checkpoint,
    threshold_curve,
    tiles_pixel_size,
    train_epoch,
    training_batch,
    write_log_csv,
    write_threshold_curve,
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
    ema: WeightAverage | None = None  # the moving average of the model's weights (ema key), or None
    bn_tiles: DataLoader | None = None  # the tiles BatchNorm statistics are recomputed over (precise_bn), or None


@dataclasses.dataclass
class Progress:
    """Where the run stands: restored on resume, updated after every epoch."""

    start_epoch: int = 1
    best_iou: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    collapsed: int = 0  # epochs in a row whose val predictions hold one class (or no correct farmland)
    best_weights: str = "raw"  # which weights best.pth holds: raw (as trained) or ema (their moving average)
    planned_epochs: int = 0  # time_budget: the epochs planned (0 = not yet, the first epoch is being timed)
    elapsed: float = 0.0  # time_budget: seconds spent so far, over every epoch of this run and the runs it resumes
    stall_warned: bool = False  # the loss-not-falling warning was given for the current streak
    scored: bool = True  # the latest epoch's val split held farmland to score (not kept in checkpoints)
    prior_loss: float = math.nan  # best training loss of a prediction ignoring the image (not kept in checkpoints)
    band_means: list[float] | None = None  # the training tiles' band means (value_means), kept in every checkpoint
    tile_bands: int | None = None  # the band count of the training tiles' files, before --bands picks from them
    best_histogram: np.ndarray | None = None  # the best epoch's val probability histogram (threshold curve)
    mark: float = 0.0  # time_budget: budget_clock() when the latest epoch began (not kept in checkpoints)
    saved_end: int = 0  # resumed: the last epoch the saved run was to train (its epochs, or its budget's plan)
    # The precision and layout the run's command asked for (auto, or forced), before fast_path settled them: kept
    # in last.pth, so that a resume times an auto choice again where it must and keeps a forced one.
    requested_speed: dict[str, Any] = dataclasses.field(default_factory=dict)


budget_clock = time.monotonic  # the clock a time budget is measured by (tests put a fake one here)


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
    apply_reuse_memory(cfg.reuse_memory)
    if cfg.deterministic:
        set_deterministic()
    if device.type == "cuda" and not cfg.deterministic:
        torch.backends.cudnn.benchmark = True  # tiles share one size: pick the fastest kernels once
    return amp


def build_datasets(
    cfg: Config, train_pairs: list[tuple[Path, Path]], val_pairs: list[tuple[Path, Path]]
) -> tuple[FarmlandDataset, FarmlandDataset]:
    """The training set (online augmentation, jitters) and the validation set (as is)."""
    bands = parse_bands_for(cfg.bands, cfg.in_channels)
    cache = should_cache(cfg.cache_tiles, train_pairs + val_pairs)
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


def check_batch(cfg: Config, tile: Sequence[int], tiles: int, world: int) -> None:
    """Raises ValueError when a training batch would hold fewer tiles than BatchNorm can train on (a ResNet
    encoder on tiles of 32 px or less, times ``downscale``, needs two; under torchrun with ``sync_bn`` the ranks'
    tiles count together), with the ways out."""
    batch = training_batch(cfg, tiles, world)
    pooled = batch * (world if cfg.sync_bn and world > 1 else 1)  # the tiles each BatchNorm layer normalises over
    needed = smallest_batch(cfg.encoder, *tile[-2:], cfg.downscale)
    if pooled >= needed:
        return
    if batch < cfg.batch_size:
        fix = f"the training split holds {tiles} tile(s), {batch} per process: add training tiles"
    else:
        fix = f"use --batch_size={needed} or more (per process under torchrun)"
    # A finer working resolution is a way out only where it gives the tile a deepest map of more than one pixel.
    finer = [
        factor
        for factor in (cfg.downscale // 2, cfg.downscale // 4)
        if factor >= 1 and pooled >= smallest_batch(cfg.encoder, *tile[-2:], factor)
    ]
    raise ValueError(
        f"--encoder={cfg.encoder} on {tile[-1]}x{tile[-2]}-pixel tiles with batches of {batch} tile(s): the "
        "encoder's deepest map of such a tile is one pixel, and BatchNorm cannot train on one value per "
        f"channel; {fix}, or use tiles of more than {32 * cfg.downscale} px, or --encoder=unet"
        + (f", or --downscale={finer[0]}" if finer else "")
    )


def warn_ranks_beyond_tiles(tiles: int, job: Distributed) -> None:
    """Warn when torchrun started more ranks than there are training tiles: every rank takes as many tiles an
    epoch, so the epoch's order is padded with repeats and some ranks train only on tiles another rank also took."""
    if not 0 < tiles < job.world or not job.main:
        return
    LOG.warning(
        "%d ranks for %d training tile(s): every rank takes as many tiles an epoch, so %d of each epoch's %d are "
        "repeats, which count some tiles more than once; train with %d rank(s) at most (torchrun's --nproc_per_node, "
        "times --nnodes), or add training tiles",
        job.world,
        tiles,
        job.world - tiles,
        job.world,
        tiles,
    )


DIM_FOR_IMAGENET = 0.25  # brightest value below this share of the 0..1 range: ImageNet's scaling sees a flat image


def warn_dim_for_imagenet(cfg: Config, train_set: FarmlandDataset, job: Distributed, tiles: int = 8) -> None:
    """Warn when ImageNet's input scaling (``encoder_weights`` without ``normalise``) meets tiles whose values
    fill little of the 0..1 range, as 10- or 12-bit data stored in 16-bit files does (scaled by 1/65535): after
    ImageNet's mean and deviation every pixel is nearly the same value, and the pretrained filters see a flat,
    black image. The split's own statistics (``normalise``) scale such data to what the filters expect."""
    if not cfg.encoder_weights or cfg.normalise or not job.main or not len(train_set):
        return
    picked = np.unique(np.linspace(0, len(train_set) - 1, min(tiles, len(train_set))).astype(int))
    brightest = max(float(train_set.tensors(int(i))[0].float().max()) for i in picked)
    if brightest >= DIM_FOR_IMAGENET:
        return
    LOG.warning(
        "the training tiles' brightest value is %.4f of their type's range (%d tiles looked at; 16-bit files holding "
        "10- or 12-bit data are scaled by 1/65535): ImageNet's normalisation, which --encoder_weights uses without "
        "--normalise, then turns every pixel into nearly the same value and the pretrained encoder sees a flat image; "
        "add --normalise=true (the split's own band statistics), or convert the tiles to 8 bit",
        brightest,
        len(picked),
    )


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


VALUE_TILES = 64  # training tiles, spread over the split, whose band means a checkpoint keeps without normalise


def value_means(train_set: FarmlandDataset, statistics: Any) -> list[float]:
    """The training tiles' band means, scaled to [0, 1] as tiles are (8-bit / 255, 16-bit / 65535), which every
    checkpoint keeps so that predict.py can warn of images of another product (16-bit DN given to a network trained
    on 8-bit tiles, which it then calls all background): the split's (split_statistics) where they were read, else
    those of VALUE_TILES tiles spread over the split (its lists run scene by scene)."""
    if statistics:
        return [float(v) for v in statistics[0]]
    count = min(VALUE_TILES, len(train_set))
    chosen = np.unique(np.linspace(0, len(train_set) - 1, count).round().astype(int)) if count else []
    return [float(v) for v in train_set.statistics([int(i) for i in chosen])[0]]


def tile_band_count(pairs: list[tuple[Path, Path]]) -> int | None:
    """The band count of the first readable training tile's file, before ``bands`` picks from it, an alpha band
    left out (colour_band_count) (a model of bands 3,2,1 of B,G,R,NIR tiles given an R,G,B product takes 3,2,1 of
    it too, which prediction warns of)."""
    for image, _ in pairs[:8]:
        try:
            return colour_band_count(image)
        except DataError:
            continue  # the loader reports a bad tile
    return None


def build_network(cfg: Config, statistics: Any, job: Distributed, layout: torch.memory_format) -> nn.Module:
    """The seeded network of the ``encoder`` key with its band normalisation (the split's with ``normalise``,
    else ImageNet's with ``encoder_weights``), the ImageNet weights loaded when a run starts (on resume
    last.pth holds the weights), SyncBatchNorm under torchrun when asked, on the device.

    Raises:
        ValueError: an unknown encoder, encoder_weights without a ResNet encoder, sync_bn asked for on CPUs.
        DataError: an encoder_weights file that is not the encoder's torchvision state dict.
    """
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.in_channels, cfg.n_classes, cfg.base_width, cfg.dropout, cfg.encoder, cfg.downscale)
    if cfg.normalise and statistics:
        set_normalisation(model, statistics[0], statistics[1])
    elif cfg.encoder_weights:  # the input scaling the ImageNet weights were trained with
        set_normalisation(model, *imagenet_normalisation(cfg.in_channels))
    if cfg.encoder_weights and not cfg.resume:
        loaded = load_encoder_weights(model, Path(cfg.encoder_weights))
        LOG.info("%s encoder: %d ImageNet tensors loaded from %s", cfg.encoder, loaded, cfg.encoder_weights)
    if cfg.init_weights and not cfg.resume:
        loaded = load_farmland_weights(model, cfg, warn=job.main)
        if job.main:
            LOG.info(
                "started from %s: %d tensors loaded (its weights; schedule and threshold anew)",
                cfg.init_weights,
                loaded,
            )
    if cfg.sync_bn and job.world > 1:
        if job.device.type != "cuda":
            raise ValueError(
                "--sync_bn=true needs CUDA devices (torch's SyncBatchNorm runs on GPUs only); drop it on CPUs"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(job.device, memory_format=layout)


def restore(cfg: Config, trainer: Trainer, ckpt_dir: Path, job: Distributed) -> Progress:
    """With ``resume``, load everything the next epoch depends on from last.pth (and plan anew for another
    ``time_budget``); else start afresh.

    Raises:
        DataError: last.pth is missing, unreadable, or of another network or training (training.check_resumable).
    """
    last = ckpt_dir / "last.pth"
    if not cfg.resume:
        if job.main:
            warn_earlier_run(Path(cfg.run_dir))
        return Progress()
    state = load_checkpoint(last, job.device)
    check_resumable(state, cfg, last)
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):  # empty when the earlier run was not in fp16
        trainer.scaler.load_state_dict(state["scaler"])
    if trainer.ema is not None and state.get("ema"):
        trainer.ema.load_state_dict(state["ema"])
    elif trainer.ema is not None:
        LOG.warning("%s holds no moving average of the weights: it starts from the resumed weights", last)
        trainer.ema = make_weight_average(trainer.model, cfg)
    realign_schedule(trainer, state["epoch"], last, job)
    progress = Progress(state["epoch"] + 1, state["best_iou"], state["best_epoch"], list(state["history"]))
    progress.best_weights = state.get("best_weights", "raw")
    progress.planned_epochs, progress.elapsed = state.get("planned_epochs", 0), state.get("elapsed", 0.0)
    progress.collapsed, progress.stall_warned = state.get("collapsed", 0), state.get("stall_warned", False)
    progress.band_means = state.get("band_means")  # the run's own, not read again from its tiles
    progress.tile_bands = state.get("tile_bands")
    saved_budget = state["config"].get("time_budget", 0.0)
    progress.saved_end = progress.planned_epochs if saved_budget > 0 else int(state["config"].get("epochs", 0))
    if state.get("best_histogram") is not None:  # threshold_curve.csv is written from it again
        progress.best_histogram = np.asarray(state["best_histogram"], dtype=np.int64)
    LOG.info(
        "resuming after epoch %d (best val farmland IoU %.4f at epoch %d)",
        state["epoch"],
        progress.best_iou,
        progress.best_epoch,
    )
    if cfg.time_budget > 0 and cfg.time_budget != saved_budget:
        replan_budget(cfg, progress, saved_budget)
    return progress


def realign_schedule(trainer: Trainer, done: int, path: Path, job: Distributed) -> None:
    """Put the learning-rate schedule, stepped per batch, at the end of epoch ``done`` for this run's steps per
    epoch. A run resumed with another number of ranks (or of training tiles) takes another number of steps per
    epoch; the saved step count read at the new rate would put the schedule epochs off (past the end of a cosine:
    a learning rate of 0 for the rest of the run). Each step then also averages another number of tiles, so the
    run goes on, but not as the saved one would have: the log says so."""
    scheduler, steps = trainer.scheduler, len(trainer.train_loader)
    saved = scheduler.last_epoch
    if saved == done * steps:
        return
    # The learning rate itself stays: the saved one is the schedule's at the end of epoch ``done`` either way.
    scheduler.last_epoch = done * steps
    if job.main:
        LOG.warning(
            "%s was trained with %d step(s) per epoch (%d steps in %d epochs), this run takes %d (%d rank(s) of %d "
            "tile(s) per batch): another number of ranks or training tiles. The learning-rate schedule goes on from "
            "the end of epoch %d, but each step now averages another number of tiles, so the result will differ "
            "from the saved run's going on; resume with the number of ranks it was trained on to continue it exactly",
            path,
            saved // max(done, 1),
            saved,
            done,
            steps,
            job.world,
            trainer.train_loader.batch_size or 0,
            done,
        )


def replan_budget(cfg: Config, progress: Progress, saved_budget: float) -> None:
    """A run resumed under another ``time_budget`` than its plan was made for (``saved_budget``; 0: it trained by
    epochs): plan the epochs the new budget holds at the pace of the epochs run so far (their wall time under a
    budget, else their training and validation time), at least those already run."""
    done = progress.start_epoch - 1
    if saved_budget <= 0 or progress.elapsed <= 0:
        progress.elapsed = sum(row.get("seconds", 0.0) for row in progress.history)
    if done < 1 or progress.elapsed <= 0:
        return  # no pace to plan by: the next epoch is timed, as at a start
    pace = progress.elapsed / done
    progress.planned_epochs = max(done, done + math.floor((60 * cfg.time_budget - progress.elapsed) / pace))
    # A budget the epochs run already fill plans no further one: "planning N epochs" would read as more training.
    plan = (
        f"planning {progress.planned_epochs} epochs"
        if progress.planned_epochs > done
        else f"no further epoch fits: the run ends at epoch {done} (a larger --time_budget goes on)"
    )
    LOG.info(
        "time budget %g min (the saved run's: %s): %.1f min spent, about %s per epoch, %s",
        cfg.time_budget,
        f"{saved_budget:g} min" if saved_budget > 0 else "none",
        progress.elapsed / 60,
        f"{pace / 60:.1f} min" if pace >= 60 else f"{pace:.1f} s",
        plan,
    )


# What an earlier run leaves that a fresh one may not overwrite, beside its checkpoints (relative to run_dir).
EARLIER_OUTPUTS = ("threshold_curve.csv", "figures/threshold_curve.png", "tensorboard")


def warn_earlier_run(run_dir: Path) -> None:
    """Warn when a fresh run starts in a run folder holding an earlier run's checkpoints: last.pth and best.pth
    are overwritten, but its weight snapshots (epoch_NNN.pth), threshold curve and TensorBoard logs stay beside
    the new run's unless it writes files of the same names. Nothing is deleted: they may be all that is left."""
    ckpt_dir = run_dir / "checkpoints"
    checkpoints = [ckpt_dir / name for name in ("last.pth", "best.pth") if (ckpt_dir / name).exists()]
    snapshots = sorted(ckpt_dir.glob("epoch_*.pth"))
    if not checkpoints and not snapshots:
        return
    others = [name for name in EARLIER_OUTPUTS if (run_dir / name).exists()]
    kept = [f"checkpoints/{p.name}" for p in snapshots] + others
    parts = [f"this fresh run overwrites {' and '.join(p.name for p in checkpoints)}"] if checkpoints else []
    if kept:
        shown = ", ".join(kept[:12]) + (f" and {len(kept) - 12} more" if len(kept) > 12 else "")
        parts.append(f"the earlier run's {shown} stay beside the new run's outputs and will be mixed with them")
    LOG.warning(
        "%s holds an earlier run's checkpoints: %s; use --resume=true to continue that run, or a new --run_dir "
        "to keep the two apart (nothing is deleted)",
        run_dir,
        "; ".join(parts),
    )


KEEP_EPOCHS = ("best", "last", "auto")  # the keep_epoch key's values


def resolve_keep_epoch(cfg: Config, job: Distributed) -> None:
    """keep_epoch=auto becomes last when split_dataset.py counted fewer than FEW_SCENES validation scenes (a
    few scenes pick an epoch nearly at random), best otherwise (split by tile, or lists made by hand).

    Raises:
        ValueError: a keep_epoch that is none of KEEP_EPOCHS.
    """
    if cfg.keep_epoch not in KEEP_EPOCHS:
        raise ValueError(f"--keep_epoch={cfg.keep_epoch!r}: expected one of {', '.join(KEEP_EPOCHS)}")
    if cfg.keep_epoch == "auto":
        scenes = split_scenes(Path(cfg.run_dir), "val")
        cfg.keep_epoch = "last" if scenes is not None and scenes < FEW_SCENES else "best"
        if job.main and cfg.keep_epoch == "last":
            LOG.info(
                "keep_epoch=auto: the val split holds %d scene(s), too few to pick an epoch by; best.pth keeps the "
                "last epoch (--keep_epoch=best to pick by val IoU anyway)",
                scenes,
            )
        elif job.main:
            counted = f"the val split holds {scenes} scenes" if scenes is not None else "no scene count (split by tile)"
            LOG.info("keep_epoch=auto: %s, so best.pth keeps the epoch with the best val farmland IoU", counted)
    # Given or chosen, keep_epoch=last runs every epoch: an early_stop beside it would be dropped without a word.
    if job.main and cfg.keep_epoch == "last" and cfg.early_stop > 0:
        LOG.warning("--early_stop=%d has no effect when the last epoch is kept: every epoch runs", cfg.early_stop)


def resolve_downscale(cfg: Config, job: Distributed) -> None:
    """downscale=0 (auto) becomes the factor that suits the tiles' pixel size (resolution.factor_for_pixel);
    the checkpoint stores the factor, so resuming, prediction and export follow it."""
    if cfg.downscale != resolution.AUTO:
        return
    cfg.downscale = resolution.factor_for_pixel(cfg.pixel_size_m)
    if not job.main:
        return
    if cfg.pixel_size_m > 0:
        LOG.info(
            "downscale=0 (auto): tiles of %.3g m per pixel, the network works at %.3g m (downscale=%d)",
            cfg.pixel_size_m,
            cfg.pixel_size_m * cfg.downscale,
            cfg.downscale,
        )
    else:
        LOG.info(
            "downscale=0 (auto): the tiles carry no pixel size in metres (tiles without a georeference or "
            "make_tiles.py's tiles.csv, or in a geographic CRS, whose pixels are degrees), so the network works at "
            "half resolution "
            "(downscale=%d); give --pixel_size_m=METRES to let it follow the tiles (0.5 m: 4, 1 m: 2, 2 m: 1)",
            cfg.downscale,
        )


# Settings checked before any tile is read: (key, whether a value is valid, what is expected, the fix).
SETTING_RULES: tuple[tuple[str, Callable[[Any], bool], str, str], ...] = (
    ("in_channels", lambda v: v >= 1, "1 or more bands", "--in_channels=3 for RGB, 4 for RGB+NIR"),
    ("n_classes", lambda v: v >= 2, "2 or more classes (0 = background, 1 = farmland)", "--n_classes=2"),
    ("base_width", lambda v: v >= 1, "1 or more channels", "--base_width=64 as the reference"),
    ("encoder", lambda v: v in ENCODERS, f"one of {', '.join(ENCODERS)}", "--encoder=unet"),
    ("dropout", lambda v: 0 <= v < 1, "a rate from 0 to below 1", "--dropout=0.3 as the reference, or 0"),
    # epochs: checked in check_settings, where the time budget is known (under one it is planned, not read).
    (
        "time_budget",
        lambda v: math.isfinite(v) and v >= 0,
        "minutes of training (e.g. 45), or 0 for off",
        "--time_budget=45, or 0 to train --epochs",
    ),
    # A zoom out by half or more would need more reflect padding than the shrunk tile holds.
    ("scale_jitter", lambda v: 0 <= v < 0.5, "a zoom fraction from 0 (off) to below 0.5", "--scale_jitter=0.1"),
    # The contrast factor 1 + c (c within +-amount) reaches 0 at 1: a tile flattened to its mean, or inverted beyond.
    (
        "colour_jitter",
        lambda v: 0 <= v < 1,
        "a jitter amount from 0 (off) to below 1",
        "--colour_jitter=0.1, or 0 for off",
    ),
    # Kept in the checkpoint: scenes are resampled to it, downscale=0 follows it (nan, inf: a crash or a ratio of 0).
    (
        "pixel_size_m",
        lambda v: math.isfinite(v) and v >= 0,
        "metres per pixel of the training tiles, or 0 to read them from the tiles",
        "--pixel_size_m=0.5, or 0",
    ),
    ("focal_gamma", lambda v: v >= 0, "a focusing exponent of 0 or more", "--focal_gamma=2 (0 is cross-entropy)"),
    ("collapse_patience", lambda v: v >= 0, "a number of epochs, or 0 for off", "--collapse_patience=3"),
    ("batch_size", lambda v: v >= 1, "1 or more tiles per training step", "--batch_size=5 as the reference"),
    # 0 is allowed: the weights stay as they are (BatchNorm statistics still move), as for checking a pipeline.
    ("lr", lambda v: math.isfinite(v) and v >= 0, "a learning rate of 0 or more", "--lr=1e-4 as the reference"),
    ("weight_decay", lambda v: math.isfinite(v) and v >= 0, "a weight decay of 0 or more", "--weight_decay=1e-8"),
    ("step_size", lambda v: v >= 1, "1 or more epochs between learning-rate drops", "--step_size=20"),
    ("gamma", lambda v: math.isfinite(v) and v > 0, "a factor above 0 for each learning-rate drop", "--gamma=0.5"),
    ("warmup_epochs", lambda v: math.isfinite(v) and v >= 0, "epochs of warm-up, or 0 for none", "--warmup_epochs=1"),
    ("early_stop", lambda v: v >= 0, "a number of epochs, or 0 for never", "--early_stop=10, or 0"),
    ("snapshot_every", lambda v: v >= 0, "a number of epochs, or 0 for never", "--snapshot_every=10, or 0"),
    # 0 is background in every mask: as the unlabelled value it would leave only farmland to learn from.
    ("ignore_index", lambda v: v != 0, "the mask value of unlabelled pixels, not 0 (background)", "--ignore_index=128"),
    # One tile's one-pixel deepest maps (a ResNet encoder's) give BatchNorm no statistics.
    (
        "precise_bn",
        lambda v: v == 0 or v >= 2,
        "a number of training tiles, 2 or more (BatchNorm cannot take statistics of a single tile's one-pixel "
        "maps), or 0 for off",
        "--precise_bn=256 as the recommended recipe does, or 0",
    ),
)


def check_settings(cfg: Config) -> None:
    """Refuse, before any tile is read, a setting that would fail or mislead later (the architecture keys before
    the split statistics and the prior loss that use n_classes, epochs and the time budget before the loop).

    Raises:
        ValueError: the first key of SETTING_RULES whose value is not valid, naming what was expected and the fix.
        DataError: an ``init_weights`` file missing, not a checkpoint, or of another network.
    """
    resolution.check_setting(cfg.downscale)
    if cfg.epochs < 1 and cfg.time_budget == 0:
        raise ValueError(
            f"--epochs={cfg.epochs}: expected 1 or more epochs; use --epochs=100 as the reference, or "
            "--time_budget=MINUTES"
        )
    if cfg.init_weights and cfg.encoder_weights:
        raise ValueError(
            f"--init_weights={cfg.init_weights} and --encoder_weights={cfg.encoder_weights}: a network starts from "
            "one or the other; drop --encoder_weights to fine-tune the checkpoint (its encoder was trained already)"
        )
    if cfg.init_weights and not cfg.resume:  # a missing file or another network, refused before any tile is read
        starting_checkpoint(cfg, mmap=True)
    for key, valid, expected, fix in SETTING_RULES:
        value = getattr(cfg, key)
        if not valid(value):
            raise ValueError(f"--{key}={value}: expected {expected}; use {fix}")


def build_trainer(cfg: Config, job: Distributed, ckpt_dir: Path) -> tuple[Trainer, Progress, tuple[int, int]]:
    """Data, loss, network, optimiser, schedule and scaler, restored when resuming and wrapped for torchrun.
    Returns the trainer, the progress so far and the (training, validation) tile counts."""
    check_settings(cfg)
    train_pairs, val_pairs = load_splits(Path(cfg.run_dir))  # a missing split first, before what it would decide
    resolve_keep_epoch(cfg, job)
    if cfg.pixel_size_m <= 0:  # stored with the config in every checkpoint: scenes are resampled to it
        # augment.py's flipped copies are in no tiles.csv and tell nothing the tiles they copy do not
        cfg.pixel_size_m = tiles_pixel_size(original_training_pairs(Path(cfg.run_dir))) or 0.0
        if cfg.pixel_size_m > 0 and job.main:
            LOG.info(
                "pixel_size_m=0: the training tiles have %.3g m pixels, kept in the checkpoint (scenes of another "
                "pixel size are resampled to it)",
                cfg.pixel_size_m,
            )
    resolve_downscale(cfg, job)
    amp = prepare_device(cfg, job.device)
    train_set, val_set = build_datasets(cfg, train_pairs, val_pairs)
    tile = tuple(train_set[0][0].shape)
    check_batch(cfg, tile, len(train_set), job.world)
    warn_ranks_beyond_tiles(len(train_set), job)
    warn_dim_for_imagenet(cfg, train_set, job)
    statistics = split_statistics(cfg, train_set)
    criterion = make_loss(cfg.loss, statistics[2] if statistics else None, cfg.n_classes, cfg.focal_gamma)
    # The stall warning's yardstick, measured only when the warning is on.
    loss_prior = prior_loss(criterion, train_set, cfg.n_classes, cfg.batch_size) if cfg.collapse_patience else math.nan
    layout = memory_format(cfg.channels_last)
    model = build_network(cfg, statistics, job, layout)
    # amp=auto on a CPU: the faster precision and layout, timed on this network and tile size (fast_path.py).
    batch = training_batch(cfg, len(train_set), job.world)
    choice = training_choice(cfg, model, criterion, tile, job.device, batch)
    amp, layout = choice.candidate.amp, choice.candidate.layout
    # Room for best.pth, last.pth and its temporary copy, and a snapshot: weights plus Adam's two moments each
    # (and the weights' moving average). A best.pth or last.pth already there (a run resumed after space was freed)
    # is replaced in place: its room is held already.
    held = sum(path.stat().st_size for path in (ckpt_dir / "best.pth", ckpt_dir / "last.pth") if path.is_file())
    files.check_writable(ckpt_dir, max(4 * (3 + (cfg.ema > 0)) * 4 * count_parameters(model) - held, 0))
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
        ema=make_weight_average(model, cfg),
        bn_tiles=batchnorm_loader(train_set, cfg),
    )
    progress = restore(cfg, trainer, ckpt_dir, job)
    progress.prior_loss = loss_prior
    if progress.band_means is None:  # a new run, or one resumed from a checkpoint that keeps none
        progress.band_means = value_means(train_set, statistics)
    if progress.tile_bands is None:  # prediction warns of products of another band count
        progress.tile_bands = tile_band_count(train_pairs)
    if job.main and math.isfinite(progress.prior_loss):
        LOG.info(
            "a prediction that ignores the image scores a training loss of %.4f at best: a learning network "
            "falls well below it",
            progress.prior_loss,
        )
    if job.world > 1:  # DDP last, after the resumed weights are in: it starts every rank from rank 0's copy
        device_ids = [job.device.index] if job.device.type == "cuda" else None
        trainer.net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return trainer, progress, (len(train_set), len(val_set))


def log_start(cfg: Config, trainer: Trainer, job: Distributed, tiles: tuple[int, int], start_epoch: int) -> None:
    """One line saying where, how and on what the training runs (none for a finished run resumed: nothing runs)."""
    if 0 < cfg.epochs < start_epoch:
        return
    LOG.info(
        "training on %s, %s, %s layout%s | %s width %d, %d parameters | %d training tiles, %d validation tiles"
        " | epochs %d..%s",
        describe_device(job.device),
        f"{str(trainer.amp).removeprefix('torch.')} mixed precision" if trainer.amp else "fp32",
        "channels-last" if cfg.channels_last else "contiguous",
        ", tiles cached in memory" if trainer.train_loader.dataset.cached is not None else "",
        "U-Net" if cfg.encoder == "unet" else f"{cfg.encoder} U-Net, decoder",
        cfg.base_width,
        count_parameters(trainer.model),
        tiles[0],
        tiles[1],
        start_epoch,
        cfg.epochs or "? (planned after the first, by the time budget)",
    )
    hint = small_batch_hint(cfg.batch_size, job.device)
    if hint:
        LOG.info("%s", hint)


SMALL_GPU_BATCH = 8  # batches this small leave a GPU partly idle between the steps' arithmetic


def small_batch_hint(batch_size: int, device: torch.device) -> str | None:
    """A note when a GPU trains on small batches; None otherwise. On one H100, batches of 32 trained the
    width-64 U-Net at 328 tiles/s and resnet34 at 1,209, while two runs at batch 5 sharing the card managed
    about 175 each (docs/performance.md)."""
    if device.type != "cuda" or batch_size > SMALL_GPU_BATCH:
        return None
    return (
        f"batches of {batch_size} tiles leave a GPU partly idle: a larger --batch_size (32, memory allowing) "
        "trains faster; the recipes' accuracy figures were measured at batch 5"
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
        f"epoch {epoch}/{cfg.epochs or '?'}" if job.main else "",
        criterion=trainer.criterion,
        scheduler=trainer.scheduler,
        ema=trainer.ema,
    )
    loss = float(all_reduce_sum(torch.tensor(loss, device=job.device))) / job.world
    # Each rank's last forward pass moved its own BatchNorm statistics: take rank 0's everywhere, so that
    # validation and the checkpoint see one network.
    share_buffers(trainer.model, job)
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"epoch {epoch}: the training loss became {loss}; training stopped and this epoch was not saved, "
            f"the last good checkpoint is {Path(cfg.run_dir) / 'checkpoints' / 'last.pth'}. "
            "Lower --lr, or check the images for NaN values"
        )
    return loss


def share_buffers(model: nn.Module, job: Distributed) -> None:
    """Under torchrun, give every rank rank 0's buffers (BatchNorm statistics): ranks that computed them apart,
    perhaps with different kernels, then hold one network."""
    if job.world > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)


def refresh_batchnorm(trainer: Trainer, job: Distributed, model: nn.Module) -> None:
    """With precise_bn, recompute ``model``'s BatchNorm statistics over the chosen training tiles, the same on
    every rank; nothing when off."""
    if trainer.bn_tiles is not None:
        recompute_batchnorm(model, trainer.bn_tiles, job.device, trainer.layout, trainer.amp)
        share_buffers(model, job)


def measure(cfg: Config, trainer: Trainer, job: Distributed, model: nn.Module) -> tuple[float, np.ndarray, np.ndarray]:
    """One set of weights on the val split: loss, confusion matrix and farmland probability histogram (for two
    classes always: the threshold curve reads it even when the threshold is not tuned)."""
    if not len(trainer.val_loader.dataset):
        return math.nan, np.zeros((cfg.n_classes,) * 2, dtype=np.int64), np.zeros((2, THRESHOLD_BINS), np.int64)
    return evaluate(
        model, trainer.val_loader, job.device, cfg.n_classes, trainer.layout, trainer.amp, trainer.criterion, True
    )


def epoch_score(row: dict, prefix: str = "val_") -> float:
    """The figure an epoch's weights are judged by: the farmland IoU at the tuned threshold when tuned, else at
    the argmax. ``prefix`` val_ reads the trained weights' figures, val_ema_ their moving average's."""
    tuned, cut = row[f"{prefix}tuned_farmland_iou"], row[f"{prefix}threshold"]
    return tuned if math.isfinite(cut) and math.isfinite(tuned) else row[f"{prefix}farmland_iou"]


def validate(cfg: Config, trainer: Trainer, job: Distributed, epoch: int, train_loss: float, started: float) -> dict:
    """Validation loss, pooled IoU (miou.py's confusion counts) and the tuned threshold: the epoch's history row.
    With ``ema`` the moving average of the weights is validated too, and ``weights`` names the better-scoring
    of the two. The row also carries, not logged, the trained weights' val confusion matrix under ``cm`` and the
    better weights' farmland probability histogram under ``histogram``."""
    tune = cfg.tune_threshold and cfg.n_classes == 2
    refresh_batchnorm(trainer, job, trainer.model)
    val_loss, cm, histogram = measure(cfg, trainer, job, trainer.model)
    ious = class_iou(cm)
    cut, tuned_iou = best_threshold(histogram) if tune else (None, math.nan)
    predicted = cm.sum(axis=0)
    row = {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_farmland_iou": float(np.nan_to_num(ious[FARMLAND])),
        "val_miou": float(np.nanmean(ious)) if np.isfinite(ious).any() else math.nan,
        "val_threshold": math.nan if cut is None else cut,
        "val_tuned_farmland_iou": tuned_iou,
        "val_predicted_farmland": float(predicted[FARMLAND] / predicted.sum()) if predicted.sum() else math.nan,
        "val_ema_farmland_iou": math.nan,
        "val_ema_threshold": math.nan,
        "val_ema_tuned_farmland_iou": math.nan,
        "weights": "raw",
        "lr": trainer.optimizer.param_groups[0]["lr"],  # where the schedule stands at the end of the epoch
        "cm": cm,
        "histogram": histogram,
    }
    if trainer.ema is not None:
        averaged = trainer.ema.averaged()
        refresh_batchnorm(trainer, job, averaged)  # the average's own statistics, for its own weights
        _, ema_cm, ema_histogram = measure(cfg, trainer, job, averaged)
        ema_cut, ema_tuned = best_threshold(ema_histogram) if tune else (None, math.nan)
        row["val_ema_farmland_iou"] = float(np.nan_to_num(class_iou(ema_cm)[FARMLAND]))
        row["val_ema_threshold"] = math.nan if ema_cut is None else ema_cut
        row["val_ema_tuned_farmland_iou"] = ema_tuned
        if epoch_score(row, "val_ema_") > epoch_score(row):
            row["weights"], row["histogram"] = "ema", ema_histogram
    row["seconds"] = round(time.perf_counter() - started, 3)
    return row


def judge(cfg: Config, row: dict, progress: Progress, job: Distributed) -> bool:
    """Record the epoch: whether it is the best so far (by val farmland IoU, at the tuned threshold when
    tuning, of the better of the trained and averaged weights; with nothing to score, or with keep_epoch=last,
    the latest epoch is the best), and warn of a collapse to one class or of a training loss that does not fall."""
    cm, histogram = row.pop("cm"), row.pop("histogram")
    progress.history.append(row)
    # No farmland among the val labels (rows of cm): IoU is 0 for any farmland predicted and says nothing of the epoch.
    scoreless = not cm[FARMLAND].sum()
    progress.scored = not scoreless
    if scoreless and row["epoch"] == progress.start_epoch:
        LOG.warning("the val split is empty or holds no farmland: best.pth will be the latest epoch's weights")
    score = epoch_score(row, "val_ema_" if row["weights"] == "ema" else "val_")
    # keep_epoch=last: a few validation scenes pick an epoch nearly at random; the annealed last one is steadier.
    improved = scoreless or cfg.keep_epoch == "last" or score > progress.best_iou
    if improved:
        progress.best_iou, progress.best_epoch, progress.best_weights = score, row["epoch"], row["weights"]
        progress.best_histogram = histogram
    check_stall(cfg, progress, job, score, cm)
    # A one-class network is the commonest silent failure: say so, with causes and fixes.
    iou, share = classes_used(row, histogram)
    stuck = not scoreless and (iou == 0.0 or share in (0.0, 1.0))  # every val pixel background, or every one farmland
    progress.collapsed = progress.collapsed + 1 if stuck else 0
    if 0 < cfg.collapse_patience == progress.collapsed and job.main:  # 0: the warning is off
        LOG.warning("%s", collapse_message(row["epoch"], progress.collapsed, share, cfg))
    return improved


def classes_used(row: dict, histogram: np.ndarray | None) -> tuple[float, float]:
    """An epoch's val farmland IoU and share of val pixels called farmland as its masks are made: at the tuned
    threshold of the weights its history ``row`` names (``histogram``: theirs) when tuned, else at the argmax.
    A tuned cut above 0.5 can split the pixels well where the argmax calls them all farmland."""
    cut = row["val_ema_threshold" if row["weights"] == "ema" else "val_threshold"]
    share = share_at(histogram, cut)
    if share is None:
        return row["val_farmland_iou"], row["val_predicted_farmland"]
    return float(np.nan_to_num(iou_at(histogram, cut))), share


def share_at(histogram: np.ndarray | None, cut: float) -> float | None:
    """The share of val pixels a tuned ``cut`` calls farmland on an epoch's probability ``histogram``
    (training.counts_at); None where no cut was tuned or there is no histogram to read it on."""
    if not math.isfinite(cut) or histogram is None or not histogram.sum():
        return None
    farmland, background = counts_at(histogram, cut)
    return farmland / (farmland + background)


def check_stall(cfg: Config, progress: Progress, job: Distributed, score: float, cm: np.ndarray) -> None:
    """Warn, once per streak, when the training loss has not fallen for ``collapse_patience`` epochs in a row
    (training.loss_stall), still near the best loss of a prediction that ignores the image (training.prior_loss,
    near_prior_loss), while the epoch's val farmland IoU (``score``) is little better than calling every pixel farmland
    (training.near_prior): the network predicts the class prior, whether or not its predictions hold one class.
    A loss that levels off at a good IoU is a converged network; one that levels off far below the prior's
    while the val IoU stays low has learned the training scenes but not the validation ones: no stall."""
    losses = [h["train_loss"] for h in progress.history]
    streak = loss_stall(losses)
    if streak == 0:
        progress.stall_warned = False
    stalled = 0 < cfg.collapse_patience <= streak and near_prior_loss(losses[-1], progress.prior_loss)
    if stalled and near_prior(score, cm) and not progress.stall_warned:
        progress.stall_warned = True
        if job.main:
            epoch = progress.history[-1]["epoch"]
            LOG.warning("%s", stall_message(epoch, streak, losses, score, prior_iou(cm), progress.prior_loss))


def save_checkpoints(cfg: Config, trainer: Trainer, progress: Progress, improved: bool, ckpt_dir: Path) -> None:
    """best.pth when the epoch improved, a weight snapshot every ``snapshot_every`` epochs, last.pth always.

    best.pth and the snapshots hold the epoch's better-scoring weights, the trained ones or (``ema``) their moving
    average, named under ``weights``, with their own tuned threshold; last.pth holds the trained weights and the
    average under ``ema``, so that a resumed run goes on exactly."""
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
        "best_weights": progress.best_weights,
        # The best epoch's val probability histogram, from which its val IoU at any cut can be computed.
        "best_histogram": None if progress.best_histogram is None else progress.best_histogram.tolist(),
        "threshold": cut,  # the farmland probability cut tuned on val for these weights; None = argmax
        "weights": "raw",  # which weights "model" holds: raw (as trained) or ema (their moving average)
        "ema": None if trainer.ema is None else trainer.ema.state_dict(),
        "planned_epochs": progress.planned_epochs,  # time_budget: the plan the schedule follows (0 = none)
        "elapsed": progress.elapsed,
        # The warnings' streaks, so that a resumed run warns where the run it continues would have.
        "collapsed": progress.collapsed,
        "stall_warned": progress.stall_warned,
        "history": progress.history,
        "config": dataclasses.asdict(cfg),
        "requested_speed": progress.requested_speed,
        "band_means": progress.band_means,  # the training tiles' band means, scaled to [0, 1] (value_means)
        "tile_bands": progress.tile_bands,  # the training tiles' band count, before --bands
    }
    chosen = state
    if row["weights"] == "ema":
        ema_cut = None if math.isnan(row["val_ema_threshold"]) else row["val_ema_threshold"]
        chosen = {**state, "model": state["ema"]["model"], "threshold": ema_cut, "weights": "ema"}
    if improved:
        save_checkpoint(ckpt_dir / "best.pth", chosen)
    if cfg.snapshot_every > 0 and epoch % cfg.snapshot_every == 0:
        snapshot = {
            key: chosen[key] for key in ("model", "epoch", "threshold", "weights", "config", "band_means", "tile_bands")
        }
        save_checkpoint(ckpt_dir / f"epoch_{epoch:03d}.pth", snapshot)
    save_checkpoint(ckpt_dir / "last.pth", state)


def report(cfg: Config, progress: Progress, board: Any) -> None:
    """The epoch's log line, train_log.csv, the curves figure, the best epoch's threshold curve and TensorBoard."""
    row, run_dir = progress.history[-1], Path(cfg.run_dir)
    tuned = math.isfinite(row["val_threshold"])
    ema = ""
    if math.isfinite(row["val_ema_farmland_iou"]):
        ema_tuned = f", {row['val_ema_tuned_farmland_iou']:.4f}" if math.isfinite(row["val_ema_threshold"]) else ""
        ema = f" | EMA {row['val_ema_farmland_iou']:.4f}{ema_tuned}"
    if progress.scored:
        cut = f", {row['val_tuned_farmland_iou']:.4f} at threshold {row['val_threshold']:.3f}" if tuned else ""
        # keep_epoch=last keeps every epoch in best.pth, whatever it scored: "best" would name a worse one.
        kept = f"{'kept' if cfg.keep_epoch == 'last' else 'best'} {progress.best_iou:.4f}, epoch {progress.best_epoch}"
        kept += ", EMA weights" if progress.best_weights == "ema" else ""
        scores = f"val loss {row['val_loss']:.4f} | val farmland IoU {row['val_farmland_iou']:.4f}{cut}{ema} ({kept})"
    else:  # an IoU of 0/0 printed as 0.0000 reads as a network that found nothing
        scores = f"val loss {row['val_loss']:.4f} | no val farmland to score: keeping this epoch"
    LOG.info(
        "epoch %d/%d | train loss %.4f | %s | next lr %.2e | %.1f s",
        row["epoch"],
        cfg.epochs,
        row["train_loss"],
        scores,
        row["lr"],
        row["seconds"],
    )
    write_log_csv(progress.history, run_dir / "train_log.csv")
    plot_curves(progress.history, run_dir / "figures" / "training_curves.png")
    if progress.best_epoch == row["epoch"]:
        save_threshold_curve(progress, run_dir)
    if board is not None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, float) and math.isfinite(value):
                board.add_scalar(key, value, row["epoch"])
        board.flush()


def restore_reports(progress: Progress, run_dir: Path) -> None:
    """On resume, write train_log.csv, the curves and the best epoch's threshold curve again from last.pth: a run
    stopped after last.pth was saved but before its report lacks them, and later epochs that do not beat the best
    one would never write its threshold curve."""
    write_log_csv(progress.history, run_dir / "train_log.csv")
    plot_curves(progress.history, run_dir / "figures" / "training_curves.png")
    save_threshold_curve(progress, run_dir)


def start_budget(cfg: Config, progress: Progress) -> None:
    """Start the budget's clock. Under ``time_budget``, ``epochs`` gives way to the plan: the one kept in last.pth
    (or made anew for another budget, replan_budget) when resuming, else 0 until the first epoch has been timed
    (plan_budget). check_settings refused a budget that is negative or not finite."""
    progress.mark = budget_clock()
    if cfg.time_budget == 0:
        return
    cfg.epochs = progress.planned_epochs
    if cfg.epochs:
        LOG.info(
            "time budget %g min: going on with the plan of %d epochs (%.1f min spent)",
            cfg.time_budget,
            cfg.epochs,
            progress.elapsed / 60,
        )


def note_schedule_change(cfg: Config, trainer: Trainer, progress: Progress) -> None:
    """On resume, say so when the learning rate the schedule gives from here differs from the one the saved run
    stood at: more epochs, or another time budget's plan, stretch a cosine (which had fallen towards 0)."""
    if progress.start_epoch == 1 or progress.start_epoch > cfg.epochs:
        return
    scheduler = trainer.scheduler
    stood = trainer.optimizer.param_groups[0]["lr"]
    goes = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch)
    if not math.isclose(goes, stood, rel_tol=1e-9, abs_tol=1e-12 * scheduler.base_lrs[0]):
        LOG.info(
            "the %s schedule now runs to epoch %d: the learning rate goes on from %.2e (the saved run stood at %.2e)",
            cfg.schedule,
            cfg.epochs,
            goes,
            stood,
        )


def epoch_numbers(cfg: Config, start: int) -> Iterator[int]:
    """The epochs to run from ``start`` to ``epochs``, which is read again before each: under ``time_budget`` it
    is the plan, 0 until the first epoch has been timed."""
    epoch = start
    while epoch <= cfg.epochs or (cfg.time_budget > 0 and cfg.epochs == 0):
        yield epoch
        epoch += 1


def plan_budget(cfg: Config, progress: Progress, job: Distributed, epoch: int) -> bool:
    """Under ``time_budget``: count the epoch's wall time (training, validation, and the previous epoch's
    checkpoints and log) against the budget, and plan the epochs that fit. After the first timed epoch: as many
    as the budget holds at its pace; once more after the second, which no longer pays for start-up (loader
    workers, tile cache, kernel selection), unless the plan ends within 2 epochs of it. The plan becomes
    ``epochs``, which the learning-rate schedule reads, so a cosine reaches 0 at the planned last epoch; last.pth
    keeps it, so a resumed run follows the same plan. Under torchrun every rank plans from rank 0's clock.

    Returns:
        whether to stop before the plan's end: the next epoch would end more than half an epoch past the budget
        (the epochs became slower than planned).
    """
    if cfg.time_budget <= 0:
        return False
    now = budget_clock()
    seconds = max(now - progress.mark, 1e-6)
    progress.mark = now
    if job.world > 1:
        measured = torch.tensor([seconds], dtype=torch.float64, device=job.device)
        torch.distributed.broadcast(measured, 0)
        seconds = float(measured)
    progress.elapsed += seconds
    budget = 60 * cfg.time_budget
    if cfg.epochs == 0 or (epoch == 2 and cfg.epochs - epoch >= 3):
        planned = max(epoch, epoch + math.floor((budget - progress.elapsed) / seconds))
        # Epoch 1's time holds the start-up but not its own checkpoints and log, which epoch 2's holds: say which
        # of the two moved the plan.
        why = (
            "epoch 1 also paid for start-up"
            if planned >= cfg.epochs
            else "epoch 2 also paid for epoch 1's checkpoints and log"
        )
        LOG.info(
            "time budget %g min: about %s per epoch, planning %d epochs%s",
            cfg.time_budget,
            f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s",
            planned,
            f" (was {cfg.epochs}; {why})" if cfg.epochs else "",
        )
        cfg.epochs = progress.planned_epochs = planned
    if epoch < cfg.epochs and progress.elapsed + seconds > budget + seconds / 2:
        LOG.warning(
            "time budget %g min: stopping after epoch %d of the %d planned, %.1f min spent: the next epoch would "
            "end past the budget (epochs ran slower than planned: %.1f s on average, the last %.1f s), so the "
            "learning rate did not reach the end of its schedule",
            cfg.time_budget,
            epoch,
            cfg.epochs,
            progress.elapsed / 60,
            progress.elapsed / epoch,
            seconds,
        )
        # The plan ends here, in last.pth too: resumed under the same budget, the run is over rather than trained
        # past its budget (a larger budget plans anew and goes on).
        cfg.epochs = progress.planned_epochs = epoch
        return True
    return False


def stays_stopped(cfg: Config, progress: Progress) -> bool:
    """Whether a resumed run trains no further: it had stopped early (before the end it was to train to) and
    ``early_stop`` still says so; one that ran to its end goes on to a new end."""
    done = progress.start_epoch - 1
    return 0 < done < progress.saved_end and stop_early(cfg, progress, done)


def stop_early(cfg: Config, progress: Progress, epoch: int) -> bool:
    """Whether ``early_stop`` ends the run after this epoch (said in the log). Every rank holds the same reduced
    scores, so every rank reaches the same decision."""
    stop = cfg.early_stop > 0 and epoch - progress.best_epoch >= cfg.early_stop and epoch < cfg.epochs
    if stop:
        LOG.info(
            "early stop after epoch %d: no better val farmland IoU for %d epochs (best %.4f at epoch %d)",
            epoch,
            cfg.early_stop,
            progress.best_iou,
            progress.best_epoch,
        )
    return stop


def save_threshold_curve(progress: Progress, run_dir: Path) -> None:
    """run_dir/threshold_curve.csv and figures/threshold_curve.png: the best epoch's val farmland IoU, precision
    and recall at every farmland probability cut, with its tuned threshold (else the argmax's 0.5) marked.
    Nothing for more than two classes, or without labelled farmland in the val split."""
    histogram = progress.best_histogram
    if histogram is None or not histogram[1].any():
        return
    row = next(h for h in reversed(progress.history) if h["epoch"] == progress.best_epoch)
    cut = row["val_ema_threshold" if progress.best_weights == "ema" else "val_threshold"]
    curve = threshold_curve(histogram)
    write_threshold_curve(curve, run_dir / "threshold_curve.csv")
    tuned = math.isfinite(cut)
    plot_threshold_curve(curve, cut if tuned else 0.5, tuned, row["epoch"], run_dir / "figures" / "threshold_curve.png")


def check_ranks_agree(model: nn.Module, job: Distributed, what: str = "weights") -> None:
    """Under torchrun, fail unless every rank ended with the same weights (``what`` names them in the log).

    Raises:
        RuntimeError: the ranks' weights differ.
    """
    if job.world == 1:
        return
    digests = [None] * job.world
    torch.distributed.all_gather_object(digests, weights_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError(f"the ranks ended with different {what}: {digests}")
    LOG.info("%s identical on all %d ranks (sha256 %s)", what, job.world, digests[0][:16])


ALL_FARMLAND = 0.98  # a kept epoch that calls this share of the val pixels farmland has learned only the prior


def kept_farmland_share(row: dict, progress: Progress) -> float:
    """Share of the val pixels the kept epoch (its history ``row``) called farmland where best.pth is judged: at
    its tuned threshold when tuned (from the best epoch's probability histogram), else at the argmax. A tuned cut
    above 0.5 can call far fewer pixels farmland than the argmax, and best.pth is judged and used at that cut."""
    cut = row.get("val_ema_threshold" if progress.best_weights == "ema" else "val_threshold", math.nan)
    share = share_at(progress.best_histogram, cut)
    return row["val_predicted_farmland"] if share is None else share


def warn_kept_prior(cfg: Config, progress: Progress) -> None:
    """Warn when the epoch best.pth keeps called nearly every val pixel farmland: its IoU is what the class prior
    scores, which can beat the later epochs of a short run (the collapse warning needs several such epochs)."""
    kept = [row for row in progress.history if row["epoch"] == progress.best_epoch]
    share = kept_farmland_share(kept[0], progress) if kept else math.nan
    if not share >= ALL_FARMLAND or not progress.scored:  # NaN: nothing predicted; unscored: no val farmland
        return
    advice = "more epochs (--epochs or --time_budget)"
    advice += "" if cfg.recipe == "recommended" else " or --recipe=recommended"
    LOG.warning(
        "best.pth keeps epoch %d, which called %.1f%% of the val pixels farmland: its val farmland IoU (%.4f) is what "
        "calling every pixel farmland scores, so the network has learned nothing of the images yet; try %s",
        progress.best_epoch,
        100 * share,
        progress.best_iou,
        advice,
    )


def train(cfg: Config, job: Distributed | None = None) -> dict[str, Any]:
    """Run the whole training; return a summary (best val IoU, its epoch, checkpoint paths). The config as given
    goes to run_dir/configs/train.json once the inputs are checked and the trainer is built.

    Under torchrun (``job``) every rank trains on its share of each batch list through
    DistributedDataParallel; rank 0 alone writes checkpoints, logs and figures.
    """
    job = job or Distributed(device=select_device(cfg.device))
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    given = dataclasses.replace(cfg)  # the command as given: build_trainer settles the auto keys in cfg
    # 1. Data, loss, network, optimiser, schedule (and a time budget's plan); restored from last.pth when resuming.
    trainer, progress, tiles = build_trainer(cfg, job, ckpt_dir)
    progress.requested_speed = {"amp": given.amp, "channels_last": given.channels_last}
    if job.main:  # only once the inputs passed: a failed attempt leaves the earlier run's record as it was
        cli.save_config(given, "train")
    start_budget(cfg, progress)
    if job.main:
        note_schedule_change(cfg, trainer, progress)
    log_start(cfg, trainer, job, tiles, progress.start_epoch)
    if job.main and progress.history:
        restore_reports(progress, Path(cfg.run_dir))
    board = open_tensorboard(Path(cfg.run_dir) / "tensorboard") if cfg.tensorboard and job.main else None
    stopped = stays_stopped(cfg, progress)
    for epoch in [] if stopped else epoch_numbers(cfg, progress.start_epoch):
        started = time.perf_counter()
        # 2. One pass over the training tiles (the moving average of the weights follows every step).
        train_loss = run_epoch(cfg, trainer, job, epoch)
        # 3. Validation (of the moving average too), best score, collapse and stalled-loss warnings.
        improved = judge(cfg, validate(cfg, trainer, job, epoch, train_loss, started), progress, job)
        # 4. Under a time budget: the epochs that fit, planned from the time the epochs take.
        out_of_time = plan_budget(cfg, progress, job, epoch)
        if job.main:
            # 5. Checkpoints, then the log line, CSV, curves, threshold curve and TensorBoard.
            save_checkpoints(cfg, trainer, progress, improved, ckpt_dir)
            report(cfg, progress, board)
        if out_of_time or stop_early(cfg, progress, epoch):
            break
    if board is not None:
        board.close()
    check_ranks_agree(trainer.model, job)
    if trainer.ema is not None:
        check_ranks_agree(trainer.ema.averaged(), job, "moving averages of the weights")
    if progress.start_epoch > cfg.epochs:
        LOG.info("nothing to do: the checkpoint already finished epoch %d of %d", progress.start_epoch - 1, cfg.epochs)
    elif job.main:
        warn_kept_prior(cfg, progress)
    return {
        "best_iou": progress.best_iou,
        "best_epoch": progress.best_epoch,
        "best": ckpt_dir / "best.pth",
        "last": ckpt_dir / "last.pth",
        "scored": progress.scored,
    }


@contextlib.contextmanager
def training_lock(cfg: Config, job: Distributed) -> Iterator[None]:
    """Hold run_dir/checkpoints/train.lock while training (rank 0 takes it, every rank learns whether it could), so
    a second train.py started into the same run folder stops at once instead of mixing two runs' checkpoints.

    Raises:
        ValueError: another train.py is training into this run folder (every rank raises).
    """
    lock = Path(cfg.run_dir) / "checkpoints" / "train.lock"
    with contextlib.ExitStack() as stack:
        refusal = ""
        if job.main:
            try:
                stack.enter_context(files.run_lock(lock, "train.py"))
            except ValueError as err:
                refusal = str(err)
            else:  # the folder is this run's alone now: a run killed while saving left its half checkpoint there
                for left in files.remove_left_temporaries(lock.parent):
                    LOG.info("%s: removed, a checkpoint half written by a run that was stopped", left)
        if job.world > 1 and int(all_reduce_sum(torch.tensor([int(bool(refusal))], device=job.device))):
            refusal = refusal or f"{lock}: rank 0 found another train.py training into this run folder"
        if refusal:
            raise ValueError(refusal)
        yield


def say_how_to_go_on(run_dir: Path, since: float = 0.0, world: int = 1) -> None:
    """Before the line that says why training stopped (interrupted, terminated, a full disk): how to go on from the
    last epoch saved, where there is one of this run: a last.pth written before ``since`` (seconds since the epoch;
    a fresh run's start) is an earlier run's, which a resume would continue instead. A run of ``world`` ranks is
    resumed under torchrun with as many, the one way it continues exactly (docs/distributed.md)."""
    last = run_dir / "checkpoints" / "last.pth"
    command = f"train.py --run_dir={files.shell_quoted(run_dir)} --resume=true"
    if world == 1:
        command = f"python {command}"
    elif int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world:  # one machine
        command = f"torchrun --standalone --nproc_per_node={world} {command}"
    else:
        command = f"the same torchrun command on every machine with {command}"
    ranks = f" ({world} ranks, as trained: another number does not continue it exactly)" if world > 1 else ""
    with contextlib.suppress(OSError):
        if last.is_file() and last.stat().st_mtime >= since:
            LOG.warning(
                "training stopped; checkpoints/last.pth holds the last finished epoch: %s goes on from there%s",
                command,
                ranks,
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Train with the config and command-line overrides (resuming: last.pth's config and the keys given over it);
    print where the results are."""
    cfg, given = cli.parse_command(argv, __doc__ or "")
    changed: dict[str, tuple[Any, Any]] = {}
    if cfg.resume:  # refused here, before any tile is read or folder made: nothing to resume, or another training
        cfg, changed = resume_config(cfg, given)
    cli.check_paths(cfg)
    # Kept in the checkpoint for predict.py's and change.py's figures: a bad one is refused here, not there.
    shown_channels(cfg.rgb_bands, parse_bands_for(cfg.bands, cfg.in_channels), cfg.in_channels)
    job = init_distributed(cfg.device)
    cli.setup_logging(cfg, "train", job.rank)
    if cfg.resume:
        LOG.info(
            "resuming with the config saved in last.pth%s",
            "; changed on the command line: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            if changed
            else ", as saved",
        )
    if cfg.time_budget > 0 and "epochs" in given:
        LOG.info("--epochs=%d is ignored: --time_budget=%g plans the epochs", cfg.epochs, cfg.time_budget)
    if job.world > 1:
        LOG.info("distributed training: %d ranks, batch %d per rank", job.world, cfg.batch_size)
    started = time.time()  # a fresh run stopped before its first last.pth leaves an earlier run's in place
    try:
        with leaving_distributed(), training_lock(cfg, job), kernel_settings_restored():
            summary = train(cfg, job)
    except (KeyboardInterrupt, OSError, RankStopped):
        if job.main:
            say_how_to_go_on(Path(cfg.run_dir), 0.0 if cfg.resume else started, job.world)
        raise
    if not summary["scored"]:
        LOG.info("kept the last epoch, %d (no val farmland to score it by): %s", summary["best_epoch"], summary["best"])
    elif cfg.keep_epoch == "last":
        LOG.info(
            "kept the last epoch, %d (val farmland IoU %.4f; keep_epoch=last), whatever earlier epochs scored: %s",
            summary["best_epoch"],
            summary["best_iou"],
            summary["best"],
        )
    else:
        LOG.info(
            "best val farmland IoU %.4f at epoch %d: %s", summary["best_iou"], summary["best_epoch"], summary["best"]
        )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
