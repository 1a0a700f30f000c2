"""Train the U-Net on the training split, validating on the val split every epoch.

The reference recipe (Adam, StepLR, cross-entropy, batch 5, 100 epochs) plus what a trainer needs:
- every epoch: validation loss and farmland IoU (pooled over the val split, with miou.py's code);
- run_dir/checkpoints/best.pth (best val farmland IoU), last.pth (model, optimizer, scheduler, epoch, best
  score, history and config: ``--resume=true`` continues exactly where it stopped) and, every
  ``snapshot_every`` epochs, epoch_NNN.pth with the weights;
- run_dir/train_log.csv, run_dir/figures/training_curves.png, one log line per epoch, a progress bar.
Data order, augmentation and dropout are seeded per epoch, so a resumed run ends with the same weights
as an uninterrupted one. Runs on CUDA when available, else on the CPU, and says which.
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import dataclasses
import gc
import hashlib
import io
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import config
from data_preprocess import (
    IGNORE,
    DataError,
    EpochSampler,
    FarmlandDataset,
    parse_bands,
    read_pair_list,
    should_cache,
)
from losses import make_loss
from miou import FARMLAND, class_iou, confusion_counts, save_figure
from net_structure import build_model, count_parameters, set_normalisation

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
    "lr",
    "seconds",
]
THRESHOLD_BINS = 200  # farmland probability histogram resolution: thresholds are tuned in steps of 0.005
ARCHITECTURE_KEYS = ("in_channels", "n_classes", "base_width")


def select_device(name: str) -> torch.device:
    """Resolve the ``device`` key: 'auto' picks CUDA when available, else the CPU.

    Raises:
        ValueError: CUDA was asked for but is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={name}: CUDA is not available on this machine; use --device=cpu or auto")
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: stay in fp32 unless bf16 is asked for
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# mallopt parameters from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse rather than hand large blocks back to the system at once.

    By default glibc maps every block over 32 MiB afresh and unmaps it when freed, so each activation of a
    full-width U-Net is faulted in page by page again on every pass: on a 2-core CPU that was a fifth of the
    prediction time. With both thresholds raised, freed activations are reused from the heap. Returns
    whether the setting took (False off glibc, e.g. on macOS or Windows, where nothing changes).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # Blocks up to 1 GiB come from the heap (larger ones are still mapped), and the heap is not trimmed.
    mapped = mallopt(M_MMAP_THRESHOLD, 2**30)
    trimmed = mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # set even where the first one was refused
    return bool(mapped) and bool(trimmed)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """Resolve the ``amp`` key to the autocast dtype, or None for full fp32.

    auto: bf16 on GPUs and CPUs that run it natively, fp16 (with a gradient scaler) on older GPUs, else off.

    Raises:
        ValueError: an unknown value, or fp16 asked for on a CPU.
    """
    word = name.strip().lower()
    if word not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"--amp={name!r}: expected auto, bf16, fp16 or off")
    if word == "off":
        return None
    if word == "bf16":
        return torch.bfloat16
    if word == "fp16":
        if device.type != "cuda":
            raise ValueError("--amp=fp16 needs a CUDA device; on a CPU use --amp=bf16 or --amp=off")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None


@dataclasses.dataclass
class Distributed:
    """Where this process stands in a torchrun job (rank 0 of 1 when started without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0 alone writes logs, figures, checkpoints and reports."""
        return self.rank == 0


def init_distributed(device_name: str) -> Distributed:
    """Join the torchrun job if there is one: NCCL on GPUs (one per local rank), gloo on CPUs.

    Without torchrun (no WORLD_SIZE, or 1) nothing changes: one process on ``select_device(device_name)``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(device=select_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=rank, world=world, device=device)


def close_distributed() -> None:
    """Leave the torchrun job cleanly: without this, gloo can abort the process as it exits."""
    if torch.distributed.is_initialized():
        # DistributedDataParallel sits in reference cycles: free it while its process group still exists,
        # or its destructor runs at interpreter exit against a torn-down group and aborts the process.
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (a no-op without torchrun)."""
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def weights_digest(model: nn.Module) -> str:
    """A SHA-256 of the weights and buffers, to check that every rank holds the same network."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def set_deterministic() -> None:
    """Ask torch for deterministic kernels, so that the same seed gives the same weights on the same machine."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for repeatable results
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def describe_device(device: torch.device) -> str:
    """A short description of the device for the log."""
    if device.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(device)})"
    return f"CPU ({torch.get_num_threads()} threads){'' if torch.cuda.is_available() else ', no CUDA device found'}"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialise to memory, then write to a temporary file and rename: a kill never leaves half a file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    config.atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain values only, never code.

    Raises:
        DataError: the file is missing or is not a checkpoint of this project.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found; train first (python train.py) or set --checkpoint")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises several types for foreign or damaged files
        raise DataError(f"{path}: not a loadable checkpoint ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise DataError(f"{path}: not a checkpoint written by train.py (expected a dict with 'model' and 'config')")
    return state


def memory_format(channels_last: bool) -> torch.memory_format:
    """The tensor layout for the network's inputs and weights (the ``channels_last`` key)."""
    return torch.channels_last if channels_last else torch.contiguous_format


def model_from_checkpoint(state: dict[str, Any], device: torch.device, channels_last: bool = True) -> nn.Module:
    """Rebuild the network with the architecture stored in a checkpoint and load its weights."""
    saved = state["config"]
    model = build_model(saved["in_channels"], saved["n_classes"], saved["base_width"], saved["dropout"])
    weights = dict(state["model"])
    # Checkpoints written before normalisation was stored in the network: identity normalisation, as trained.
    weights.setdefault("band_mean", model.band_mean)
    weights.setdefault("band_std", model.band_std)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # weights that do not fit the architecture the checkpoint itself declares
        raise DataError(f"checkpoint weights do not fit a U-Net of its own config ({str(err)[:300]})") from None
    return model.to(device, memory_format=memory_format(channels_last))


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
    pixels, from which best_threshold finds the best cut (zeros unless ``thresholds``). Unlabelled pixels
    count nowhere.

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
            bins = (farmland * THRESHOLD_BINS).long().clamp_(max=THRESHOLD_BINS - 1)
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
) -> tuple[float, int]:
    """One pass of training over a loader (at most ``max_steps`` batches when > 0).

    ``criterion`` defaults to cross-entropy; ``scheduler``, when given, steps after every batch.

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
        # Summed on the device: reading the loss every step would stall a GPU.
        loss_sum += loss.detach().float()
        steps += 1
        if steps % 20 == 0:
            bar.set_postfix(loss=f"{float(loss_sum) / steps:.4f}")
        if steps == max_steps:
            break
    return float(loss_sum) / max(steps, 1), steps


def make_optimizer(model: nn.Module, cfg: config.Config, device: torch.device) -> torch.optim.Optimizer:
    """Adam as in the reference; the fused CUDA kernel on GPUs (one launch for all parameters)."""
    return torch.optim.Adam(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda" or None
    )


SCHEDULES = ("step", "cosine")


def schedule_factor(step: int, cfg: config.Config, steps_per_epoch: int) -> float:
    """The learning rate at training step ``step`` (0-based) as a fraction of ``lr``.

    A linear warm-up over ``warmup_epochs`` multiplies the schedule: ``step`` drops by ``gamma`` every
    ``step_size`` epochs (the reference's StepLR, epoch by epoch); ``cosine`` falls from 1 to 0 over all epochs.
    """
    warm_steps = cfg.warmup_epochs * steps_per_epoch
    warm = min(1.0, (step + 1) / warm_steps) if warm_steps > 0 else 1.0
    if cfg.schedule == "cosine":
        total = max(cfg.epochs * steps_per_epoch, 1)
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    return warm * cfg.gamma ** (step // steps_per_epoch // max(cfg.step_size, 1))


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: config.Config, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``schedule`` key's learning-rate schedule with warm-up, stepped after every batch.

    Raises:
        ValueError: an unknown schedule name.
    """
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"--schedule={cfg.schedule!r}: expected one of {', '.join(SCHEDULES)}")
    steps = max(steps_per_epoch, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule_factor(step, cfg, steps))


def collapse_message(epoch: int, streak: int, predicted_farmland: float) -> str:
    """The warning for validation predictions stuck on one class: what it means, the likely causes, what to try."""
    kind = {0.0: "no farmland at all", 1.0: "farmland everywhere"}.get(predicted_farmland, "no correct farmland")
    return (
        f"epoch {epoch}: for {streak} epochs in a row the network predicted {kind} on the validation tiles. "
        "The model has collapsed to one class. Likely causes: farmland is a small share of the "
        "pixels (class imbalance), the learning rate is too low or too high for this budget, or the masks are "
        "encoded differently than expected (0/255 vs 0/1; check run_dir/splits/summary.json and a few masks). "
        "Try --loss=ce_dice or --loss=weighted_ce, --lr=1e-3 with --warmup_epochs=1, or --recipe=recommended"
    )


def open_tensorboard(folder: Path) -> Any:
    """A TensorBoard SummaryWriter logging to ``folder``, or None (with a warning) when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        LOG.warning("tensorboard is not installed: curves go to train_log.csv only (pip install tensorboard)")
        return None
    return SummaryWriter(log_dir=str(folder))


def make_loader(
    dataset: FarmlandDataset, cfg: config.Config, device: torch.device, shuffle: bool, rank: int = 0, world: int = 1
) -> DataLoader:
    """A DataLoader with seeded order (EpochSampler, this rank's share), workers kept alive between epochs,
    pinned memory on CUDA."""
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=EpochSampler(len(dataset), cfg.seed, shuffle, rank, world),
        drop_last=shuffle and -(-len(dataset) // world) > cfg.batch_size,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=device.type == "cuda",
        # Its own generator: the loader then never draws from the global RNG, which dropout uses, so
        # persistent workers (one draw) and no workers (a draw per epoch) give the same training.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """Save the training and validation loss and the val IoU per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    ax_loss.set(xlabel="epoch", ylabel="loss (the loss key)", title="Loss")
    ax_loss.legend()
    ax_iou.plot(epochs, [h["val_farmland_iou"] for h in history], color="tab:green", label="val farmland IoU")
    ax_iou.plot(epochs, [h["val_miou"] for h in history], color="tab:gray", label="val mIoU")
    ax_iou.set(xlabel="epoch", ylabel="IoU (pooled over val)", ylim=(0, 1), title="Validation IoU")
    ax_iou.legend(loc="lower right")
    save_figure(fig, path)


def write_log_csv(history: list[dict[str, float]], path: Path) -> None:
    """Rewrite train_log.csv from the whole history (kept in the checkpoint, so it survives a resume)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    config.atomic_write_text(path, buffer.getvalue())


def check_resumable(state: dict[str, Any], cfg: config.Config, path: Path) -> None:
    """Refuse to resume a checkpoint whose network differs from the config's.

    Raises:
        DataError: naming the differing keys and how to fix them.
    """
    saved = state["config"]
    differing = [
        f"{k}: checkpoint {saved.get(k)} vs config {getattr(cfg, k)}"
        for k in ARCHITECTURE_KEYS
        if saved.get(k) != getattr(cfg, k)
    ]
    if differing:
        raise DataError(
            f"{path}: cannot resume, the network differs ({'; '.join(differing)}); pass the checkpoint's values "
            "on the command line, or start a new run_dir"
        )


def train(cfg: config.Config, job: Distributed | None = None) -> dict[str, Any]:
    """Run the whole training; return a summary (best val IoU, its epoch, checkpoint paths).

    Under torchrun (``job``) every rank trains on its share of each batch list through
    DistributedDataParallel; rank 0 alone writes checkpoints, logs and figures.
    """
    job = job or Distributed(device=select_device(cfg.device))
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    # 1. Data: the split lists written by split_dataset.py (and augment.py).
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
    device = job.device
    amp = resolve_amp(cfg.amp, device)
    if cfg.reuse_memory:
        keep_freed_memory()
    if cfg.deterministic:
        set_deterministic()
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
        parse_bands(cfg.bands),
    )
    val_set = FarmlandDataset(
        val_pairs, cfg.in_channels, False, cfg.mask_threshold, cache, cfg.ignore_index, bands=parse_bands(cfg.bands)
    )
    train_loader = make_loader(train_set, cfg, device, True, job.rank, job.world)
    val_loader = make_loader(val_set, cfg, device, False, job.rank, job.world)
    # Band statistics and class counts of the training split: for normalisation and class weights.
    statistics = train_set.statistics() if cfg.normalise or cfg.loss == "weighted_ce" else None
    if statistics:
        LOG.info(
            "training split: band means %s, deviations %s; class pixels %s",
            [round(v, 4) for v in statistics[0]],
            [round(v, 4) for v in statistics[1]],
            statistics[2][: cfg.n_classes],
        )
    criterion = make_loss(cfg.loss, statistics[2] if statistics else None, cfg.n_classes, cfg.focal_gamma).to(device)
    # 2. Network, optimiser, schedule, loss scaling.
    if device.type == "cuda" and not cfg.deterministic:
        torch.backends.cudnn.benchmark = True  # tiles share one size: pick the fastest kernels once
    torch.manual_seed(cfg.seed)
    layout = memory_format(cfg.channels_last)
    model = build_model(cfg.in_channels, cfg.n_classes, cfg.base_width, cfg.dropout)
    if cfg.normalise and statistics:
        set_normalisation(model, statistics[0], statistics[1])
    if cfg.sync_bn and job.world > 1:
        if device.type != "cuda":
            raise ValueError(
                "--sync_bn=true needs CUDA devices (torch's SyncBatchNorm runs on GPUs only); drop it on CPUs"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=layout)
    # Room for best.pth, last.pth and its temporary copy, and a snapshot: weights plus Adam's two moments each.
    config.check_writable(ckpt_dir, 4 * 3 * 4 * count_parameters(model))
    optimizer = make_optimizer(model, cfg, device)
    scheduler = make_scheduler(optimizer, cfg, len(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    # 3. Resume: restore everything the next epoch depends on.
    start_epoch, best_iou, best_epoch, history = 1, -1.0, 0, []
    if cfg.resume:
        state = load_checkpoint(ckpt_dir / "last.pth", device)
        check_resumable(state, cfg, ckpt_dir / "last.pth")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # empty when the earlier run was not in fp16
            scaler.load_state_dict(state["scaler"])
        start_epoch, best_iou, best_epoch = state["epoch"] + 1, state["best_iou"], state["best_epoch"]
        history = list(state["history"])
        LOG.info(
            "resuming after epoch %d (best val farmland IoU %.4f at epoch %d)", state["epoch"], best_iou, best_epoch
        )
    elif job.main and (ckpt_dir / "last.pth").exists():
        LOG.warning("%s exists and will be overwritten; use --resume=true to continue that run", ckpt_dir / "last.pth")
    # DDP last, after the resumed weights are in: it starts every rank from rank 0's copy.
    net = model
    if job.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    LOG.info(
        "training on %s, %s, %s layout%s | U-Net width %d, %d parameters | %d training tiles, %d validation tiles"
        " | epochs %d..%d",
        describe_device(device),
        f"{str(amp).removeprefix('torch.')} mixed precision" if amp else "fp32",
        "channels-last" if cfg.channels_last else "contiguous",
        ", tiles cached in memory" if cache else "",
        cfg.base_width,
        count_parameters(model),
        len(train_set),
        len(val_set),
        start_epoch,
        cfg.epochs,
    )
    board = open_tensorboard(run_dir / "tensorboard") if cfg.tensorboard and job.main else None
    collapsed = 0  # epochs in a row whose val predictions hold one class (or no correct farmland)
    for epoch in range(start_epoch, cfg.epochs + 1):
        # 4. One pass over the training tiles, seeded by epoch so that a resumed run repeats it exactly.
        started = time.perf_counter()
        # Dropout, distinct on every rank; data order and augmentation follow the sampler's epoch.
        torch.manual_seed(cfg.seed + epoch + 1_000_003 * job.rank)
        train_loader.sampler.set_epoch(epoch)
        train_loss, _ = train_epoch(
            net,
            train_loader,
            optimizer,
            scaler,
            device,
            layout,
            amp,
            f"epoch {epoch}/{cfg.epochs}" if job.main else "",
            criterion=criterion,
            scheduler=scheduler,
        )
        train_loss = float(all_reduce_sum(torch.tensor(train_loss, device=device))) / job.world
        lr = optimizer.param_groups[0]["lr"]  # where the schedule stands at the end of the epoch
        if job.world > 1:
            # Each rank's last forward pass moved its own BatchNorm statistics: take rank 0's everywhere, so
            # that validation and the checkpoint see one network.
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, 0)
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"epoch {epoch}: the training loss became {train_loss}; training stopped and this epoch was not "
                f"saved, the last good checkpoint is {ckpt_dir / 'last.pth'}. Lower --lr, or check the images for NaN values"
            )
        # 5. Validation: loss and pooled IoU with the same confusion-count code as miou.py.
        val_loss, cm, histogram = (
            evaluate(model, val_loader, device, cfg.n_classes, layout, amp, criterion, cfg.tune_threshold)
            if len(val_set)
            else (math.nan, np.zeros((cfg.n_classes,) * 2, dtype=np.int64), np.zeros((2, THRESHOLD_BINS), np.int64))
        )
        ious = class_iou(cm)
        farmland_iou = float(np.nan_to_num(ious[FARMLAND]))
        cut, tuned_iou = best_threshold(histogram) if cfg.tune_threshold and cfg.n_classes == 2 else (None, math.nan)
        predicted = cm.sum(axis=0)
        predicted_farmland = float(predicted[FARMLAND] / predicted.sum()) if predicted.sum() else math.nan
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_farmland_iou": farmland_iou,
                "val_miou": float(np.nanmean(ious)) if np.isfinite(ious).any() else math.nan,
                "val_threshold": math.nan if cut is None else cut,
                "val_tuned_farmland_iou": tuned_iou,
                "val_predicted_farmland": predicted_farmland,
                "lr": lr,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        # 6. Checkpoints: best by val farmland IoU (at the tuned threshold when tuning), last every epoch,
        # weight snapshots every N epochs. No val tiles, or no farmland in them: the IoU says nothing, so
        # best.pth follows the latest epoch.
        scoreless = not np.isfinite(ious[FARMLAND])
        if scoreless and epoch == start_epoch:
            LOG.warning("the val split is empty or holds no farmland: best.pth will be the latest epoch's weights")
        score = tuned_iou if cut is not None and math.isfinite(tuned_iou) else farmland_iou
        improved = scoreless or score > best_iou
        if improved:
            best_iou, best_epoch = score, epoch
        # A one-class network is the commonest silent failure: say so, with causes and fixes.
        one_class = int((predicted > 0).sum()) == 1  # every val pixel predicted background, or every one farmland
        collapsed = collapsed + 1 if not scoreless and (farmland_iou == 0.0 or one_class) else 0
        if collapsed == cfg.collapse_patience and job.main:
            LOG.warning("%s", collapse_message(epoch, collapsed, predicted_farmland))
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "best_iou": best_iou,
            "best_epoch": best_epoch,
            "threshold": cut,  # the farmland probability cut tuned on val for these weights; None = argmax
            "history": history,
            "config": dataclasses.asdict(cfg),
        }
        # Every rank holds the same reduced scores, so every rank reaches the same decision.
        stop_early = cfg.early_stop > 0 and epoch - best_epoch >= cfg.early_stop and epoch < cfg.epochs
        if not job.main:
            if stop_early:
                break
            continue
        if improved:
            save_checkpoint(ckpt_dir / "best.pth", state)
        if cfg.snapshot_every > 0 and epoch % cfg.snapshot_every == 0:
            save_checkpoint(
                ckpt_dir / f"epoch_{epoch:03d}.pth",
                {"model": state["model"], "epoch": epoch, "threshold": cut, "config": state["config"]},
            )
        save_checkpoint(ckpt_dir / "last.pth", state)
        # 7. Log line, CSV, curves and TensorBoard.
        row = history[-1]
        LOG.info(
            "epoch %d/%d | train loss %.4f | val loss %.4f | val farmland IoU %.4f%s (best %.4f, epoch %d) | lr %.2e | %.1f s",
            epoch,
            cfg.epochs,
            row["train_loss"],
            val_loss,
            farmland_iou,
            "" if cut is None else f", {tuned_iou:.4f} at threshold {cut:.3f}",
            best_iou,
            best_epoch,
            row["lr"],
            row["seconds"],
        )
        write_log_csv(history, run_dir / "train_log.csv")
        plot_curves(history, run_dir / "figures" / "training_curves.png")
        if board is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, float) and math.isfinite(value):
                    board.add_scalar(key, value, epoch)
            board.flush()
        if stop_early:
            LOG.info(
                "early stop after epoch %d: no better val farmland IoU for %d epochs (best %.4f at epoch %d)",
                epoch,
                cfg.early_stop,
                best_iou,
                best_epoch,
            )
            break
    if board is not None:
        board.close()
    if job.world > 1:
        digests = [None] * job.world
        torch.distributed.all_gather_object(digests, weights_digest(model))
        if len(set(digests)) != 1:
            raise RuntimeError(f"the ranks ended with different weights: {digests}")
        LOG.info("weights identical on all %d ranks (sha256 %s)", job.world, digests[0][:16])
    if start_epoch > cfg.epochs:
        LOG.info("nothing to do: the checkpoint already finished epoch %d of %d", start_epoch - 1, cfg.epochs)
    return {
        "best_iou": best_iou,
        "best_epoch": best_epoch,
        "best": ckpt_dir / "best.pth",
        "last": ckpt_dir / "last.pth",
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Train with the config and command-line overrides; print where the results are."""
    cfg = config.parse_args(argv, __doc__ or "")
    config.check_paths(cfg)
    job = init_distributed(cfg.device)
    config.setup_logging(cfg, "train", job.rank)
    if job.main:
        config.save_config(cfg, "train")
    if job.world > 1:
        LOG.info("distributed training: %d ranks, batch %d per rank", job.world, cfg.batch_size)
    try:
        summary = train(cfg, job)
    finally:
        close_distributed()
    LOG.info("best val farmland IoU %.4f at epoch %d: %s", summary["best_iou"], summary["best_epoch"], summary["best"])
    return 0


if __name__ == "__main__":
    sys.exit(config.run_main(main))
