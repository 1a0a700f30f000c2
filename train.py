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
from data_preprocess import DataError, EpochSampler, FarmlandDataset, read_pair_list, should_cache
from miou import FARMLAND, class_iou, confusion_counts, save_figure
from net_structure import build_model, count_parameters

LOG = logging.getLogger("train")
LOG_FIELDS = ["epoch", "train_loss", "val_loss", "val_farmland_iou", "val_miou", "lr", "seconds"]
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
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy per pixel and the pooled confusion matrix of argmax predictions over a loader."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    pixels = 0
    cm = torch.zeros((n_classes, n_classes), dtype=torch.int64, device=device)
    for images, masks in loader:
        images = images.to(device, memory_format=layout, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(images)
        total_loss += criterion(logits.float(), masks)
        pixels += masks.numel()
        # Counts stay on the device until the end: no transfer and no stall per batch.
        cm += confusion_counts(logits.argmax(1), masks, n_classes)
    # Under torchrun each rank saw its share of the tiles: sum the counts, never average rank-level IoUs.
    totals = all_reduce_sum(torch.stack([total_loss, torch.tensor(float(pixels), device=device, dtype=torch.float64)]))
    cm = all_reduce_sum(cm)
    return float(totals[0]) / max(float(totals[1]), 1.0), cm.cpu().numpy()


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
) -> tuple[float, int]:
    """One pass of cross-entropy training over a loader (at most ``max_steps`` batches when > 0).

    Returns:
        the mean training loss and the number of steps taken.
    """
    model.train()
    criterion = nn.CrossEntropyLoss()
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
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
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
    if cfg.deterministic:
        set_deterministic()
    cache = should_cache(cfg.cache_tiles, train_pairs + val_pairs)
    train_set = FarmlandDataset(train_pairs, cfg.in_channels, cfg.online_aug, cfg.mask_threshold, cache)
    val_set = FarmlandDataset(val_pairs, cfg.in_channels, False, cfg.mask_threshold, cache)
    train_loader = make_loader(train_set, cfg, device, True, job.rank, job.world)
    val_loader = make_loader(val_set, cfg, device, False, job.rank, job.world)
    # 2. Network, optimiser, schedule, loss scaling.
    if device.type == "cuda" and not cfg.deterministic:
        torch.backends.cudnn.benchmark = True  # tiles share one size: pick the fastest kernels once
    torch.manual_seed(cfg.seed)
    layout = memory_format(cfg.channels_last)
    model = build_model(cfg.in_channels, cfg.n_classes, cfg.base_width, cfg.dropout)
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
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
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
    for epoch in range(start_epoch, cfg.epochs + 1):
        # 4. One pass over the training tiles, seeded by epoch so that a resumed run repeats it exactly.
        started = time.perf_counter()
        # Dropout, distinct on every rank; data order and augmentation follow the sampler's epoch.
        torch.manual_seed(cfg.seed + epoch + 1_000_003 * job.rank)
        train_loader.sampler.set_epoch(epoch)
        train_loss, _ = train_epoch(
            net, train_loader, optimizer, scaler, device, layout, amp, f"epoch {epoch}/{cfg.epochs}" if job.main else ""
        )
        train_loss = float(all_reduce_sum(torch.tensor(train_loss, device=device))) / job.world
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
        scheduler.step()
        # 5. Validation: loss and pooled IoU with the same confusion-count code as miou.py.
        val_loss, cm = (
            evaluate(model, val_loader, device, cfg.n_classes, layout, amp)
            if len(val_set)
            else (math.nan, np.zeros((cfg.n_classes,) * 2, dtype=np.int64))
        )
        ious = class_iou(cm)
        farmland_iou = float(np.nan_to_num(ious[FARMLAND]))
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_farmland_iou": farmland_iou,
                "val_miou": float(np.nanmean(ious)) if np.isfinite(ious).any() else math.nan,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        # 6. Checkpoints: best by val farmland IoU, last every epoch, weight snapshots every N epochs.
        # No val tiles, or no farmland in them: the IoU says nothing, so best.pth follows the latest epoch.
        scoreless = not np.isfinite(ious[FARMLAND])
        if scoreless and epoch == start_epoch:
            LOG.warning("the val split is empty or holds no farmland: best.pth will be the latest epoch's weights")
        improved = scoreless or farmland_iou > best_iou
        if improved:
            best_iou, best_epoch = farmland_iou, epoch
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "best_iou": best_iou,
            "best_epoch": best_epoch,
            "history": history,
            "config": dataclasses.asdict(cfg),
        }
        if not job.main:
            continue
        if improved:
            save_checkpoint(ckpt_dir / "best.pth", state)
        if cfg.snapshot_every > 0 and epoch % cfg.snapshot_every == 0:
            save_checkpoint(
                ckpt_dir / f"epoch_{epoch:03d}.pth",
                {"model": state["model"], "epoch": epoch, "config": state["config"]},
            )
        save_checkpoint(ckpt_dir / "last.pth", state)
        # 7. Log line, CSV and curves.
        row = history[-1]
        LOG.info(
            "epoch %d/%d | train loss %.4f | val loss %.4f | val farmland IoU %.4f (best %.4f, epoch %d) | lr %.2e | %.1f s",
            epoch,
            cfg.epochs,
            row["train_loss"],
            val_loss,
            farmland_iou,
            best_iou,
            best_epoch,
            row["lr"],
            row["seconds"],
        )
        write_log_csv(history, run_dir / "train_log.csv")
        plot_curves(history, run_dir / "figures" / "training_curves.png")
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
