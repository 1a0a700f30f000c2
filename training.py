"""The pieces of training that train.py's loop calls and bench.py times: data loaders, the optimiser and
learning-rate schedule, one epoch, validation with the threshold histogram, the tuned threshold, the
collapse warning, the weight average (``ema``) and BatchNorm statistics recomputed (``precise_bn``), the
per-epoch log (CSV, TensorBoard), the config a resumed run goes on with and the changes it refuses, and the
training tiles' pixel size (their georeference or make_tiles.py's tiles.csv).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import logging
import math
from pathlib import Path
from typing import Any, Collection, Iterator

import numpy as np
import rasterio
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import Config
from data_preprocess import IGNORE, EpochSampler, FarmlandDataset, PlainSubset, quiet_gdal
from encoders import first_conv_for_bands
from files import DataError, atomic_write_csv, shown_path
from metrics import confusion_counts
from rasters import SAME_PIXEL_SIZE, TILE_TABLE, ground_pixel_size, open_raster, read_tile_table
from runtime import all_reduce_sum, load_checkpoint

LOG = logging.getLogger("train")


LOG_FIELDS = [
    "epoch",
    "train_loss",
    "val_loss",
    "val_farmland_iou",
    "val_miou",
    "val_threshold",
    "val_tuned_farmland_iou",
    "val_predicted_farmland",
    "val_ema_farmland_iou",  # the averaged weights' figures (ema key); nan when off
    "val_ema_threshold",
    "val_ema_tuned_farmland_iou",
    "weights",  # raw or ema: the better-scoring weights of the epoch, the ones best.pth takes
    "lr",
    "seconds",
]


THRESHOLD_BINS = 200  # farmland probability histogram resolution: thresholds are tuned in steps of 0.005


ARCHITECTURE_KEYS = ("in_channels", "n_classes", "base_width", "encoder", "downscale")

# Beside the architecture, the keys a resumed run cannot change: what the weights are trained on and towards (the
# tiles as read, seed, augmentation, loss, optimiser, schedule) and what best.pth keeps (tuned threshold, BatchNorm
# statistics, moving average, which epoch). With another value the run would not go on but become another run
# from part of the way, under the first one's history, best score and best.pth. How long it trains (epochs,
# time_budget, early_stop), where and how fast (device, workers, precision, layout, cache) and what it reports
# may change; keys train.py does not read change nothing.
TRAINING_KEYS = (
    "recipe",
    "seed",
    "mask_threshold",
    "ignore_index",
    "bands",
    "pixel_size_m",
    "normalise",
    "online_aug",
    "scale_jitter",
    "colour_jitter",
    "dropout",
    "encoder_weights",
    "init_weights",
    "batch_size",
    "lr",
    "weight_decay",
    "loss",
    "focal_gamma",
    "schedule",
    "step_size",
    "gamma",
    "warmup_epochs",
    "tune_threshold",
    "precise_bn",
    "ema",
    "keep_epoch",
)

# Values that let training choose (auto): given on resume, they stand for the choice the run made, which its
# checkpoint's config holds.
CHOSEN_BY_TRAINING: dict[str, Any] = {"downscale": 0, "keep_epoch": "auto", "pixel_size_m": 0.0}
AMP_REQUESTS = ("auto", "bf16", "fp16", "off")  # the amp key's values
RESUME_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "config")  # what last.pth holds to resume


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    n_classes: int,
    layout: torch.memory_format,
    amp: torch.dtype | None = None,
    criterion: nn.Module | None = None,
    thresholds: bool = False,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Validate: mean loss per labelled pixel, the pooled confusion matrix of argmax predictions, and the
    histogram of farmland probabilities (2, THRESHOLD_BINS) of background (row 0) and farmland (row 1)
    pixels, bin k holding the probabilities in (k / bins, (k + 1) / bins], from which best_threshold finds the
    best cut (zeros unless ``thresholds``). Unlabelled pixels count nowhere.

    ``criterion`` is the training loss (cross-entropy when None), weighted by each batch's labelled pixels.
    """
    model.eval()
    criterion = criterion or nn.CrossEntropyLoss(ignore_index=IGNORE)
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    pixels = torch.zeros((), device=device, dtype=torch.float64)
    cm = torch.zeros((n_classes, n_classes), dtype=torch.int64, device=device)
    histogram = torch.zeros((2, THRESHOLD_BINS), dtype=torch.int64, device=device)
    for images, masks in loader:
        images = images.to(device, memory_format=layout, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(images)
        labelled = (masks != IGNORE).sum()
        # A batch without labelled pixels has a NaN mean loss: weigh it out on the device, with no sync.
        batch_loss = criterion(logits.float(), masks).double() * labelled
        total_loss += torch.where(labelled > 0, batch_loss, torch.zeros_like(batch_loss))
        pixels += labelled
        # Counts stay on the device until the end: no transfer and no stall per batch.
        cm += confusion_counts(logits.argmax(1), masks, n_classes)
        if thresholds and n_classes == 2:
            farmland = logits.float().softmax(1)[:, 1]
            # Bin k holds (k / bins, (k + 1) / bins], so bins k and above are the pixels whose probability
            # exceeds k / bins, as predict.py cuts: a pixel at exactly 0.5 (a tie) is background there and here.
            bins = (farmland * THRESHOLD_BINS).ceil_().long().sub_(1).clamp_(0, THRESHOLD_BINS - 1)
            # One bincount over (label, bin), unlabelled pixels in a dropped extra bin: no boolean indexing,
            # so no device sync.
            index = torch.where(masks <= 1, masks * THRESHOLD_BINS + bins, 2 * THRESHOLD_BINS)
            histogram += torch.bincount(index.reshape(-1), minlength=2 * THRESHOLD_BINS + 1)[:-1].view(2, -1)
    # Under torchrun each rank saw its share of the tiles: sum the counts, never average rank-level IoUs.
    totals = all_reduce_sum(torch.stack([total_loss, pixels]))
    cm = all_reduce_sum(cm)
    histogram = all_reduce_sum(histogram)
    loss = float(totals[0]) / float(totals[1]) if float(totals[1]) else math.nan
    return loss, cm.cpu().numpy(), histogram.cpu().numpy()


def best_threshold(histogram: np.ndarray) -> tuple[float, float]:
    """The farmland probability cut with the best farmland IoU on a (2, bins) histogram, and that IoU.

    The cut k / bins makes farmland every pixel whose probability bin is k or above. Ties go to the cut
    nearest 0.5 (the argmax). Returns (0.5, nan) when there is no farmland to score.
    """
    bins = histogram.shape[1]
    # Pixels at or above each cut: reversed cumulative sums.
    true_pos = np.cumsum(histogram[1][::-1])[::-1].astype(np.float64)
    false_pos = np.cumsum(histogram[0][::-1])[::-1].astype(np.float64)
    positives = float(histogram[1].sum())
    if positives == 0:
        return 0.5, math.nan
    iou = true_pos / (positives + false_pos)  # tp / (tp + fp + fn), with tp + fn = all farmland pixels
    cuts = np.arange(bins) / bins
    best = np.flatnonzero(iou == iou.max())
    k = int(best[np.argmin(np.abs(cuts[best] - 0.5))])
    return float(cuts[k]), float(iou[k])


CURVE_FIELDS = ["threshold", "val_farmland_iou", "precision", "recall"]


def threshold_curve(histogram: np.ndarray) -> list[dict[str, float]]:
    """Farmland IoU, precision and recall at every cut k / bins of a (2, bins) histogram (evaluate's), one row
    per cut: farmland is every pixel whose probability bin is k or above, as in best_threshold.

    From the counts at each cut: tp (farmland bins >= k), fp (background bins >= k), fn = farmland - tp;
    IoU = tp / (tp + fp + fn), precision = tp / (tp + fp), recall = tp / (tp + fn). A 0/0 figure is NaN
    (precision where nothing is called farmland; all three without farmland in the labels).
    """
    bins = histogram.shape[1]
    true_pos = np.cumsum(histogram[1][::-1])[::-1].astype(np.float64)
    false_pos = np.cumsum(histogram[0][::-1])[::-1].astype(np.float64)
    positives = float(histogram[1].sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = true_pos / (positives + false_pos)
        precision = true_pos / (true_pos + false_pos)
        recall = true_pos / positives if positives else np.full(bins, math.nan)
    columns = (np.arange(bins) / bins, iou, precision, recall)
    return [dict(zip(CURVE_FIELDS, (float(c[k]) for c in columns))) for k in range(bins)]


def counts_at(histogram: np.ndarray, cut: float) -> tuple[int, int]:
    """Pixels called farmland and pixels called background at the bin edge nearest ``cut`` (to 1 / bins) on the
    (2, bins) histogram: farmland is every pixel whose probability bin is at or above the cut's, as in
    best_threshold."""
    bins = histogram.shape[1]
    first = min(bins - 1, max(0, math.floor(cut * bins + 0.5)))
    return int(histogram[:, first:].sum()), int(histogram[:, :first].sum())


def iou_at(histogram: np.ndarray, cut: float) -> float:
    """Farmland IoU at the bin edge nearest ``cut`` (to 1 / bins) on the (2, bins) histogram (threshold_curve's
    row there)."""
    bins = histogram.shape[1]
    return threshold_curve(histogram)[min(bins - 1, max(0, math.floor(cut * bins + 0.5)))]["val_farmland_iou"]


def write_threshold_curve(curve: list[dict[str, float]], path: Path) -> None:
    """Write threshold_curve's rows as CSV (columns CURVE_FIELDS; a NaN figure is an empty cell)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CURVE_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in curve:
        writer.writerow({key: "" if math.isnan(value) else round(value, 6) for key, value in row.items()})
    atomic_write_csv(path, buffer.getvalue())


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    layout: torch.memory_format,
    amp: torch.dtype | None,
    description: str = "",
    max_steps: int = 0,
    criterion: nn.Module | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: WeightAverage | None = None,
) -> tuple[float, int]:
    """One pass of training over a loader (at most ``max_steps`` batches when > 0).

    ``criterion`` defaults to cross-entropy; ``scheduler``, when given, steps after every batch, and so does
    ``ema``, the moving average of the weights.

    Returns:
        the mean training loss and the number of steps taken.
    """
    model.train()
    criterion = criterion or nn.CrossEntropyLoss(ignore_index=IGNORE)
    loss_sum, steps = torch.zeros((), device=device), 0
    bar = tqdm(loader, desc=description, unit="batch", leave=False, disable=None if description else True)
    for images, masks in bar:
        images = images.to(device, memory_format=layout, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = criterion(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # the scaler is a no-op unless training in fp16
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update()
        # Summed on the device: reading the loss every step would stall a GPU.
        loss_sum += loss.detach().float()
        steps += 1
        if steps % 20 == 0:
            bar.set_postfix(loss=f"{float(loss_sum) / steps:.4f}")
        if steps == max_steps:
            break
    return float(loss_sum) / max(steps, 1), steps


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """Adam as in the reference, with the fused kernel on GPUs (one launch for all parameters) and CPUs (one
    pass over each parameter instead of a dozen: 40 ms instead of 200 ms per step for the full-width U-Net on
    one core, 1.4 ms instead of 9 ms at width 16)."""
    return torch.optim.Adam(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type in ("cuda", "cpu") or None
    )


SCHEDULES = ("step", "cosine")


def schedule_factor(step: int, cfg: Config, steps_per_epoch: int) -> float:
    """The learning rate at training step ``step`` (0-based) as a fraction of ``lr``.

    A linear warm-up over ``warmup_epochs`` multiplies the schedule: ``step`` drops by ``gamma`` every
    ``step_size`` epochs (the reference's StepLR, epoch by epoch); ``cosine`` falls from 1 to 0 over ``epochs``
    (under ``time_budget``, the planned epochs; 0 while the first epoch is timed, which holds the cosine at 1).
    """
    warm_steps = cfg.warmup_epochs * steps_per_epoch
    warm = min(1.0, (step + 1) / warm_steps) if warm_steps > 0 else 1.0
    if cfg.schedule == "cosine":
        if cfg.epochs <= 0:  # time_budget before its plan (the first epoch is being timed): no decay yet
            return warm
        total = max(cfg.epochs * steps_per_epoch, 1)
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    return warm * cfg.gamma ** (step // steps_per_epoch // max(cfg.step_size, 1))


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``schedule`` key's learning-rate schedule with warm-up, stepped after every batch. It reads the
    config at every step, so a time_budget plan (train.py sets ``epochs`` to it) applies from the next step.

    Raises:
        ValueError: an unknown schedule name.
    """
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"--schedule={cfg.schedule!r}: expected one of {', '.join(SCHEDULES)}")
    steps = max(steps_per_epoch, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule_factor(step, cfg, steps))


def collapse_message(epoch: int, streak: int, predicted_farmland: float, cfg: Config | None = None) -> str:
    """The warning for validation predictions stuck on one class: what it means, the likely causes, what to try
    (leaving out what ``cfg`` already does)."""
    kind = {0.0: "no farmland at all", 1.0: "farmland everywhere"}.get(predicted_farmland, "no correct farmland")
    tries = [
        ("--loss=ce_dice or --loss=weighted_ce", cfg is None or cfg.loss not in ("ce_dice", "weighted_ce")),
        ("--lr=1e-3 with --warmup_epochs=1", cfg is None or cfg.lr < 1e-3 or cfg.warmup_epochs <= 0),
        ("--recipe=recommended", cfg is None or cfg.recipe != "recommended"),
        ("more epochs (--epochs) or a wider network (--base_width)", cfg is not None),
    ]
    return (
        f"epoch {epoch}: for {streak} epochs in a row the network predicted {kind} on the validation tiles. "
        "The model has collapsed to one class. Likely causes: farmland is a small share of the "
        "pixels (class imbalance), the learning rate is too low or too high for this budget, or the masks are "
        "encoded differently than expected (0/255 vs 0/1; check run_dir/splits/summary.json and a few masks). "
        f"Try {', or '.join(text for text, useful in tries if useful)}"
    )


STALL_TOLERANCE = 0.01  # a training loss that has not fallen 1 % below where a streak began is not falling
STALL_SHARE = 0.2  # a val IoU closing less of the gap from the class prior's IoU to 1 than this has learned little


def loss_stall(losses: list[float], tolerance: float = STALL_TOLERANCE) -> int:
    """Epochs in a row, up to the latest, whose training loss has not fallen more than ``tolerance`` (relative)
    below the loss of the epoch that began the streak; 0 when the latest epoch fell below it.

    Measured against the streak's start, not the previous epoch, so a slow steady fall resets the streak once it
    adds up to ``tolerance``, while a loss wandering around one level does not.
    """
    streak, reference = 0, math.inf
    for loss in losses:
        if loss < reference * (1 - tolerance):
            streak, reference = 0, loss
        else:
            streak += 1
    return streak


PRIOR_TILES = 64  # training masks the class prior's loss is measured on
PRIOR_LOSS_SHARE = 0.75  # a training loss above this share of the best that ignores the image has learned little


def spread_masks(dataset: FarmlandDataset, tiles: int) -> list[torch.Tensor]:
    """Up to ``tiles`` training masks (class indices), evenly spaced over the split: lists run scene by scene."""
    count = min(tiles, len(dataset))
    chosen = np.unique(np.linspace(0, len(dataset) - 1, count).round().astype(int)) if count else []
    return [dataset.tensors(int(i))[1].long() for i in chosen]


def mask_batches(masks: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """The masks in batches of ``batch_size``, in order; tiles of different sizes cannot share one, and are then
    batched alone."""
    size = max(batch_size, 1)
    batches = []
    for start in range(0, len(masks), size):
        group = masks[start : start + size]
        batches += [torch.stack(group)] if len({m.shape for m in group}) == 1 else [m[None] for m in group]
    return batches


def prior_loss(
    criterion: nn.Module, dataset: FarmlandDataset, n_classes: int, batch_size: int, tiles: int = PRIOR_TILES
) -> float:
    """The lowest training loss of a prediction that ignores the image: one probability per class at every
    pixel, fitted to ``tiles`` training masks (spread_masks) with the run's own loss, in batches of
    ``batch_size`` as training scores them. The fit starts from the classes' shares, cross-entropy's optimum;
    weighted and focal losses and Dice have theirs elsewhere. A network that learned nothing of the images
    scores no better; NaN without labelled pixels."""
    masks = spread_masks(dataset, tiles)
    counts = sum((torch.bincount(m[m != IGNORE], minlength=n_classes)[:n_classes] for m in masks), torch.zeros(1))
    if not masks or counts.sum() == 0:
        return math.nan
    device = next(iter(criterion.buffers()), torch.empty(0)).device  # the loss's class weights live there
    batches = [batch.to(device) for batch in mask_batches(masks, batch_size)]
    logits = (counts.double() / counts.sum()).clamp_min(1e-6).log().float().to(device).requires_grad_(True)

    def mean_loss() -> torch.Tensor:
        return torch.stack(
            [criterion(logits[None, :, None, None].expand(len(b), -1, *b.shape[-2:]), b) for b in batches]
        ).mean()

    with torch.no_grad():
        at_shares = float(mean_loss())
    optimiser = torch.optim.LBFGS([logits], max_iter=25, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = mean_loss()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        return min(at_shares, float(mean_loss()))


def near_prior_loss(loss: float, prior: float) -> bool:
    """Whether a training loss is above PRIOR_LOSS_SHARE of the best that ignores the image (prior_loss); True
    when that is unknown (NaN), so the val IoU alone judges."""
    return not math.isfinite(prior) or loss > PRIOR_LOSS_SHARE * prior


def prior_iou(cm: np.ndarray) -> float:
    """The farmland IoU of calling every pixel farmland: the farmland share of the labelled val pixels (the IoU
    a network predicting the class prior reaches at its best threshold); NaN without labelled pixels."""
    total = cm.sum()
    return float(cm[1].sum() / total) if total else math.nan


def near_prior(score: float, cm: np.ndarray) -> bool:
    """Whether a val farmland IoU is little better than the class prior's (prior_iou): it closes less than
    STALL_SHARE of the gap from there to 1. False without labelled farmland: nothing to judge."""
    prior = prior_iou(cm)
    return bool(cm[1].sum() > 0) and score < prior + STALL_SHARE * (1 - prior)


def stall_message(
    epoch: int, streak: int, losses: list[float], score: float, prior: float, loss_prior: float = math.nan
) -> str:
    """The warning for a training loss that stopped falling near the best that ignores the image (``loss_prior``)
    while the val IoU is little better than the class prior's: what it means, the likely causes, what to try."""
    known = f"; ignoring the image scores {loss_prior:.4f} at best" if math.isfinite(loss_prior) else ""
    return (
        f"epoch {epoch}: the training loss has not fallen by more than {STALL_TOLERANCE:.0%} for {streak} epochs "
        f"in a row (now {losses[-1]:.4f}, {losses[-1 - streak]:.4f} at epoch {epoch - streak}{known}), and the val "
        f"farmland IoU ({score:.3f}) is little better than calling every pixel farmland ({prior:.3f}). The network is "
        "predicting the class prior, not the image. Likely causes: a learning rate too high for this data with "
        "strong augmentation, too much augmentation or dropout for a small budget, or labels that do not match "
        "the images (look at a few masks over their photos). Try --lr=3e-4, --colour_jitter=0 --scale_jitter=0 "
        "--dropout=0, or more epochs"
    )


class WeightAverage:
    """An exponential moving average of a network's weights (the ``ema`` key), updated after every optimiser
    step: ``average = d * average + (1 - d) * weights``. The decay is warmed up, d = min(ema, (1 + n) / (10 + n))
    at the n-th update (0-based), so that the random initial weights fade within the first steps and a short run
    benefits too. Buffers (BatchNorm's running statistics, the band normalisation) are not averaged but copied
    from the network when the average is used (``averaged``), unless ``copy_buffers`` is False (precise_bn
    recomputes the average's own). Under torchrun every rank averages its own
    unwrapped network, whose parameters are identical on all ranks after every step: so are the averages.
    """

    def __init__(self, model: nn.Module, decay: float, copy_buffers: bool = True) -> None:
        """``copy_buffers`` False: the average keeps BatchNorm statistics of its own (precise_bn recomputes them
        for the averaged weights) instead of taking the network's."""
        self.source = model
        self.decay = decay
        self.copy_buffers = copy_buffers
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0
        self.mine = list(self.model.parameters())
        self.theirs = list(model.parameters())

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the network's current parameters (one fused kernel for all of them)."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.mine, [p.detach() for p in self.theirs], 1.0 - decay)
        self.updates += 1

    @torch.no_grad()
    def averaged(self) -> nn.Module:
        """The averaged network, with the network's current buffers (unless it keeps its own), in eval mode."""
        if self.copy_buffers:
            for mine, theirs in zip(self.model.buffers(), self.source.buffers()):
                mine.copy_(theirs)
        return self.model.eval()

    def state_dict(self) -> dict[str, Any]:
        """What last.pth keeps for an exact resume: the averaged weights and the update count."""
        return {"model": self.averaged().state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def make_weight_average(model: nn.Module, cfg: Config) -> WeightAverage | None:
    """The moving average of ``model``'s weights when ``ema`` is on, else None.

    Raises:
        ValueError: a decay outside [0, 1).
    """
    if not 0 <= cfg.ema < 1:
        raise ValueError(f"--ema={cfg.ema}: expected a decay from 0 (off) to below 1, for example 0.999")
    return WeightAverage(model, cfg.ema, copy_buffers=not cfg.precise_bn) if cfg.ema > 0 else None


def batchnorm_loader(dataset: FarmlandDataset, cfg: Config) -> DataLoader | None:
    """The training tiles BatchNorm statistics are recomputed over (``precise_bn``): that many, drawn once with
    the run's seed, in a fixed order, not augmented; None when off. Every rank reads all of them. train.py's
    check_settings refused a ``precise_bn`` of 1 or below 0.
    """
    if not cfg.precise_bn or not len(dataset):
        return None
    count = min(cfg.precise_bn, len(dataset))
    chosen = np.sort(np.random.default_rng(cfg.seed).choice(len(dataset), count, replace=False))
    starts = list(range(0, count, cfg.batch_size))
    if cfg.batch_size > 1 and len(starts) > 1 and count - starts[-1] == 1:
        starts.pop()  # a last batch of one tile joins the one before: BatchNorm needs two values per channel
    batches = [list(range(start, end)) for start, end in zip(starts, [*starts[1:], count])]
    return DataLoader(PlainSubset(dataset, chosen.tolist()), batch_sampler=batches, num_workers=0)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of the network (SyncBatchNorm under torchrun included)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_batchnorm(
    model: nn.Module, loader: DataLoader, device: torch.device, layout: torch.memory_format, amp: torch.dtype | None
) -> None:
    """Set every BatchNorm layer's running mean and (unbiased) variance to those of its inputs over all the
    loader's pixels, for the weights as they are now.

    Training keeps running averages over the last few batches, taken while the weights moved and with dropout
    on: with batches of a few tiles from different scenes they jump from epoch to epoch, and dropout shifts the
    variance the network meets at prediction. Here dropout is off, each layer normalises by its batch as in
    training, and every batch's mean and variance are pooled over all pixels. Under torchrun every rank reads
    the same tiles (train.py then gives all ranks rank 0's figures, in case their kernels differ).
    """
    layers = batchnorm_layers(model)
    if not layers:
        return
    sums = {layer: [0.0, 0.0, 0] for layer in layers}
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

    def collect(layer: nn.Module, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        # With momentum 1 the running figures are this batch's own, as the layer computed them: read them
        # instead of reducing the activations a second time.
        count = inputs[0].numel() // inputs[0].shape[1]
        # SyncBatchNorm pooled every rank's copy of the batch (the same tiles) and unbiased by their count.
        pooled = count * (world if isinstance(layer, nn.SyncBatchNorm) else 1)
        mean = layer.running_mean.double()
        var = layer.running_var.double() * ((pooled - 1) / pooled)  # kept unbiased; the batch's own variance
        entry = sums[layer]
        entry[0] = entry[0] + mean * count
        entry[1] = entry[1] + (var + mean**2) * count
        entry[2] += count

    hooks = [layer.register_forward_hook(collect) for layer in layers]
    try:
        with batch_statistics_mode(model, layers):
            for images, _ in loader:
                images = images.to(device, memory_format=layout, non_blocking=True)
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    model(images)
    finally:
        for hook in hooks:
            hook.remove()
    for layer, (total, squares, count) in sums.items():
        if count < 2:
            continue
        mean = total / count
        var = (squares / count - mean**2).clamp_(min=0) * (count / (count - 1))
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)


@contextlib.contextmanager
def batch_statistics_mode(model: nn.Module, layers: list[nn.Module]) -> Iterator[None]:
    """The model in eval mode (no dropout) but its BatchNorm ``layers`` normalising by each batch and keeping that
    batch's own figures as their running ones (momentum 1), from reset statistics; restored on leaving."""
    momenta = [layer.momentum for layer in layers]
    training = model.training
    model.eval()
    for layer in layers:
        layer.reset_running_stats()  # momentum 1 would carry a NaN or infinite figure over
        layer.train()
        layer.momentum = 1.0
    try:
        yield
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(training)


def open_tensorboard(folder: Path) -> Any:
    """A TensorBoard SummaryWriter logging to ``folder``, or None (with a warning) when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        LOG.warning("tensorboard is not installed: curves go to train_log.csv only (pip install tensorboard)")
        return None
    return SummaryWriter(log_dir=str(folder))


def tiles_per_process(tiles: int, world: int = 1) -> int:
    """Training tiles each process draws per epoch: equal shares, the last padded (EpochSampler)."""
    return -(-tiles // world)


def training_batch(cfg: Config, tiles: int, world: int = 1) -> int:
    """Tiles in a training batch of each process: ``batch_size``, or fewer where the split holds fewer per
    process (make_loader then keeps the one short batch)."""
    return min(cfg.batch_size, tiles_per_process(tiles, world))


def make_loader(
    dataset: FarmlandDataset, cfg: Config, device: torch.device, shuffle: bool, rank: int = 0, world: int = 1
) -> DataLoader:
    """A DataLoader with seeded order (EpochSampler, this rank's share), workers kept alive between epochs,
    pinned memory on CUDA."""
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=EpochSampler(len(dataset), cfg.seed, shuffle, rank, world),
        drop_last=shuffle and tiles_per_process(len(dataset), world) > cfg.batch_size,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=device.type == "cuda",
        # Its own generator: the loader then never draws from the global RNG, which dropout uses, so
        # persistent workers (one draw) and no workers (a draw per epoch) give the same training.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def write_log_csv(history: list[dict[str, float]], path: Path) -> None:
    """Rewrite train_log.csv from the whole history (kept in the checkpoint, so it survives a resume)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_csv(path, buffer.getvalue())


def saved_config(state: dict[str, Any]) -> Config:
    """The config a checkpoint was written with. A key it lacks was added since: it then held the key's default
    (encoder: unet); a key no longer known is dropped."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{key: value for key, value in state["config"].items() if key in known})


def resume_config(cfg: Config, given: Collection[str]) -> tuple[Config, dict[str, tuple[Any, Any]]]:
    """The config a resumed run goes on with: last.pth's, with the keys given on the command line (``given``,
    cli.parse_command's) over it, and ``run_dir`` as given (last.pth was found there). Only the config is read.

    Returns:
        that config, and each key whose value differs from the saved run's, as {key: (saved, now)}.

    Raises:
        DataError: run_dir holds no last.pth (nothing to resume) or a file that is not a checkpoint, or a key of
            ARCHITECTURE_KEYS or TRAINING_KEYS is given with another value than the saved run's.
    """
    last = Path(cfg.run_dir) / "checkpoints" / "last.pth"
    if not last.is_file():
        raise DataError(
            f"{last}: checkpoint not found, so there is nothing to resume; drop --resume=true to start training, "
            "or point --run_dir at the run to resume"
        )
    state = load_checkpoint(last, mmap=True)
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing or not isinstance(state.get("config"), dict):
        raise DataError(
            f"{last}: not a checkpoint train.py can resume (no {', '.join(missing) or 'config'}: weights alone, or "
            "another tool's file); put back the last.pth the run wrote, or start afresh in a new --run_dir"
        )
    saved = saved_config(state)
    resumed = dataclasses.replace(saved, run_dir=cfg.run_dir, resume=True, **requested_speed(cfg, state))
    for key in given:
        value = getattr(cfg, key)
        if key not in CHOSEN_BY_TRAINING or value != CHOSEN_BY_TRAINING[key]:
            setattr(resumed, key, value)
    refuse_changes(saved, resumed, last)
    changed = {
        f.name: (getattr(saved, f.name), getattr(resumed, f.name))
        for f in dataclasses.fields(Config)
        if f.name in given
        and f.name not in ("resume", "run_dir")
        and getattr(saved, f.name) != getattr(resumed, f.name)
    }
    return resumed, changed


def requested_speed(cfg: Config, state: dict[str, Any]) -> dict[str, Any]:
    """The precision and layout a resumed run asks for, where the command line does not say: what the run's command
    asked (last.pth's ``requested_speed``, kept before fast_path settled them), so that a choice made by timing
    (auto) is taken again from last.pth where this machine allows it, while one the user forced stays forced.
    Without that record (a run of an older version, or an unreadable one), the command's (auto by default)."""
    asked = state.get("requested_speed")
    asked = asked if isinstance(asked, dict) else {}
    amp, layout = asked.get("amp"), asked.get("channels_last")
    return {
        "amp": amp if isinstance(amp, str) and amp in AMP_REQUESTS else cfg.amp,
        "channels_last": layout if isinstance(layout, bool) else cfg.channels_last,
    }


def check_resumable(state: dict[str, Any], cfg: Config, path: Path) -> None:
    """Refuse to resume a checkpoint whose network or training (ARCHITECTURE_KEYS, TRAINING_KEYS) differs from
    the config's, once training has settled its auto keys.

    Raises:
        DataError: naming the differing keys, both values, and how to fix them.
    """
    saved = saved_config(state)
    # A key the saved run left at its auto value (an older version saved no pixel size, say) was settled now.
    for key, auto in CHOSEN_BY_TRAINING.items():
        if getattr(saved, key) == auto:
            setattr(saved, key, getattr(cfg, key))
    refuse_changes(saved, cfg, path)


def shown_value(value: Any) -> str:
    """A config value in a message: as written, an empty one as ''."""
    return "''" if value == "" else str(value)


def refuse_changes(saved: Config, cfg: Config, path: Path) -> None:
    """Raises DataError when ``cfg`` differs from ``saved`` (the checkpoint at ``path``'s) in a key a resumed run
    cannot change, naming each with both values, and the fix."""
    network = [key for key in ARCHITECTURE_KEYS if getattr(saved, key) != getattr(cfg, key)]
    training = [key for key in TRAINING_KEYS if getattr(saved, key) != getattr(cfg, key)]
    if not network and not training:
        return

    def listed(keys: list[str]) -> str:
        return "; ".join(
            f"{k}: checkpoint {shown_value(getattr(saved, k))} vs config {shown_value(getattr(cfg, k))}" for k in keys
        )

    parts = [f"the network differs ({listed(network)})"] if network else []
    parts += [f"the training differs ({listed(training)})"] if training else []
    flags = " ".join(f"--{key}" for key in network + training)
    raise DataError(
        f"{path}: cannot resume, {' and '.join(parts)}. A resumed run goes on with the settings saved in its "
        f"checkpoint: drop {flags} from the command line, or start a new --run_dir to train with the new "
        "value" + ("s" if len(network + training) > 1 else "")
    )


NORMALISATION_BUFFERS = ("band_mean", "band_std")


def check_same_network(saved: Config, cfg: Config, path: Path) -> None:
    """Refuse a checkpoint to start from whose network is not this run's (ARCHITECTURE_KEYS but the working
    resolution, which changes no weight; more bands than the checkpoint's are taken with ``normalise``).

    Raises:
        DataError: naming the file, each differing key with both values, and the fix.
    """
    more_bands = cfg.normalise and cfg.in_channels > saved.in_channels
    skipped = ("downscale", "in_channels") if more_bands else ("downscale",)
    differ = [key for key in ARCHITECTURE_KEYS if key not in skipped and getattr(saved, key) != getattr(cfg, key)]
    if not differ:
        return
    fix = " ".join(f"--{key}={shown_value(getattr(saved, key))}" for key in differ)
    if differ == ["in_channels"] and cfg.in_channels > saved.in_channels:
        fix += f" to fine-tune it on {saved.in_channels} of your bands (--bands), or --normalise=true to add bands"
    else:
        fix += " to fine-tune it"
    raise DataError(
        f"--init_weights={path}: a network of "
        + ", ".join(f"{key}={shown_value(getattr(saved, key))}" for key in differ)
        + ", but this run builds "
        + ", ".join(f"{key}={shown_value(getattr(cfg, key))}" for key in differ)
        + f"; give {fix}, or start from a checkpoint of the same network"
    )


def widened_first_layer(weights: dict[str, torch.Tensor], bands: int, in_channels: int) -> dict[str, torch.Tensor]:
    """``weights`` of a network of ``bands`` input bands made to take ``in_channels`` (more): the filters of the
    first convolution (the first 4-d tensor over ``bands`` channels) widened as ImageNet's are
    (encoders.first_conv_for_bands: the extra bands, NIR beside RGB say, from the mean of the others')."""
    if in_channels == bands:
        return weights
    key = next(k for k, v in weights.items() if v.dim() == 4 and v.shape[1] == bands)
    return weights | {key: first_conv_for_bands(weights[key].float(), in_channels).to(weights[key].dtype)}


def starting_checkpoint(cfg: Config, mmap: bool = False) -> tuple[dict[str, Any], Config]:
    """The checkpoint of the ``init_weights`` key and its config, checked to be of this run's network
    (check_same_network); ``mmap``: its tensors mapped, not read (a check before any tile is read).

    Raises:
        DataError: naming the file: missing, not a checkpoint, or a network of another architecture than this run's.
    """
    path = Path(cfg.init_weights)
    if not path.exists():  # load_checkpoint's advice (train first, --checkpoint) is prediction's
        raise DataError(
            f"--init_weights={path}: no such file; give the checkpoint of the run to start from, such as "
            "RUN/checkpoints/best.pth, or leave --init_weights out to start from random weights"
        )
    state = load_checkpoint(path, mmap=mmap)
    saved = saved_config(state)
    check_same_network(saved, cfg, path)
    return state, saved


def load_farmland_weights(model: nn.Module, cfg: Config, warn: bool = True) -> int:
    """Start ``model`` from the weights of another run's checkpoint (the ``init_weights`` key): a network trained on
    farmland elsewhere, fine-tuned here. The schedule, threshold and history start afresh. With ``normalise`` the
    band normalisation is this run's (its split's statistics, already set), else the checkpoint's, which its weights
    were trained with; with ``normalise`` a run of more bands than the checkpoint's gets the extra bands' filters
    from the others' (widened_first_layer). ``warn``: say when it learned at another working resolution (under
    torchrun rank 0 alone says so). Returns the number of tensors loaded.

    Raises:
        DataError: naming the file: missing, not a checkpoint, or a network of another architecture than this run's.
    """
    path = Path(cfg.init_weights)
    state, saved = starting_checkpoint(cfg)
    weights = widened_first_layer(dict(state["model"]), saved.in_channels, cfg.in_channels)
    if cfg.normalise:
        for key in NORMALISATION_BUFFERS:
            weights[key] = model.state_dict()[key]
    for key in NORMALISATION_BUFFERS:  # checkpoints of older versions kept none: identity, as they were trained
        weights.setdefault(key, model.state_dict()[key])
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise DataError(
            f"--init_weights={path}: its weights do not fit the network its own config declares ({detail}); "
            "the file was altered or mixed up: use a best.pth or last.pth as train.py wrote it"
        ) from None
    there, here = saved.pixel_size_m * saved.downscale, cfg.pixel_size_m * cfg.downscale
    if warn and there > 0 and here > 0 and max(there, here) / min(there, here) > 1.5:
        LOG.warning(
            "--init_weights=%s learned at %.3g m per working pixel and this run works at %.3g m: fields look %.3g "
            "times as large to it; give --downscale so that the two match, where the tiles allow",
            path,
            there,
            here,
            there / here,
        )
    return len(state["model"])


SIZE_SAMPLE = 500  # training tiles whose pixel size is read, spread over the split: a header read each


def tiles_pixel_size(pairs: list[tuple[Path, Path]]) -> float | None:
    """Metres per pixel of the training tiles (at most SIZE_SAMPLE of them, spread over the list): each tile's own
    georeference (a GeoTIFF in a projected CRS), else its row of make_tiles.py's tiles.csv beside the images
    folder; None when no tile tells. Tiles of several sizes, or mostly of none, get a warning, and the size most of
    them share is the one returned."""
    tables: dict[Path, dict[str, float | None]] = {}
    sample = pairs[:: max(1, -(-len(pairs) // SIZE_SAMPLE))]
    groups: list[list[tuple[float, Path]]] = []  # each: (size, tile), sizes within SAME_PIXEL_SIZE of the first
    for image, _ in sample:
        size = tile_pixel_size(image, tables)
        if size is None:
            continue
        group = next((g for g in groups if abs(size / g[0][0] - 1) <= SAME_PIXEL_SIZE), None)
        if group is None:
            groups.append(group := [])
        group.append((size, image))
    if not groups:
        return None
    common = max(groups, key=len)
    unknown = len(sample) - sum(len(g) for g in groups)
    if len(groups) > 1 or unknown > len(common):
        LOG.warning(mixed_sizes_message(groups, common, unknown, len(sample) < len(pairs)))
    return common[0][0]


def mixed_sizes_message(
    groups: list[list[tuple[float, Path]]], common: list[tuple[float, Path]], unknown: int, sampled: bool
) -> str:
    """The warning for training tiles of several pixel sizes, or mostly of none: how many of each, one example of
    each other size, and what to do."""
    of = " (of the tiles read, spread over the split)" if sampled else ""
    size = f"{common[0][0]:.3g} m"
    if len(groups) == 1:
        return (
            f"only {len(common)} of the training tiles{of} carry a pixel size ({size}; {unknown} carry none): {size} "
            "is taken for all of them. If the others differ, give --pixel_size_m=METRES"
        )
    ordered = sorted(groups, key=len, reverse=True)
    counts = ", ".join(f"{len(g)} at {g[0][0]:.3g} m" for g in ordered) + (
        f", {unknown} without one" if unknown else ""
    )
    examples = "".join(f"; {shown_path(g[0][1])} is {g[0][0]:.3g} m" for g in ordered if g is not common)
    return (
        f"the training tiles{of} have several pixel sizes ({counts}{examples}): the network works at one, so "
        f"{size}, the most common, sets it and the other tiles are seen at a scale the model will not be used at. "
        "Resample the scenes to one pixel size before tiling (gdalwarp -tr; a Mercator scene, whose pixels span less "
        "ground the farther it lies from the equator, into a CRS in ground metres: gdalwarp -t_srs EPSG:NNNN -tr), "
        "train one model per size, or give --pixel_size_m=METRES to say which size to work at"
    )


def tile_pixel_size(image: Path, tables: dict[Path, dict[str, float | None]]) -> float | None:
    """One tile's metres per pixel on the ground (rasters.ground_pixel_size), from its georeference or its folder's
    tiles.csv (read once into ``tables``)."""
    try:
        with quiet_gdal(), open_raster(image) as src:  # libtiff's notes on a B,G,R,NIR tile's tags, once a tile
            size = ground_pixel_size(src.crs, src.transform, src.width, src.height)
    except DataError:
        size = None
    if size:
        return size
    table = image.parent.parent / TILE_TABLE
    if table not in tables:
        tables[table] = pixel_sizes_from_table(table)
    return tables[table].get(image.stem)


def pixel_sizes_from_table(table: Path) -> dict[str, float | None]:
    """Metres per pixel of each tile (by stem) as tiles.csv records it (its CRS must be projected); {} without
    the table."""
    return {row.get("tile") or "": row_pixel_size(row) for row in read_tile_table(table)}


def row_pixel_size(row: dict[str, str]) -> float | None:
    """Metres per pixel of one tiles.csv row; None when its CRS is missing, unreadable or geographic."""
    if not row.get("crs"):
        return None
    try:
        crs = rasterio.crs.CRS.from_user_input(row["crs"])
        transform = rasterio.Affine(*(float(row[k]) for k in "abcdef"))
    except (KeyError, TypeError, ValueError, rasterio.errors.CRSError):
        return None
    return ground_pixel_size(crs, transform, row_side(row, "width"), row_side(row, "height"))


def row_side(row: dict[str, str], key: str) -> int:
    """A tiles.csv row's tile width or height in pixels, which places a Mercator tile's centre alone: 1 where the
    cell is empty or no whole number ("64.0", as a spreadsheet saves it, is 64)."""
    try:
        return max(1, int(float(row.get(key) or 1)))
    except (TypeError, ValueError, OverflowError):
        return 1
