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
import io
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
from tqdm import tqdm

import config
from data_preprocess import DataError, FarmlandDataset, read_pair_list
from miou import FARMLAND, class_iou, confusion_matrix, save_figure
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
    model.load_state_dict(state["model"])
    return model.to(device, memory_format=memory_format(channels_last))


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, n_classes: int, layout: torch.memory_format
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy per pixel and the pooled confusion matrix of argmax predictions over a loader."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss, pixels = 0.0, 0
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    for images, masks in loader:
        images, masks = images.to(device, memory_format=layout), masks.to(device)
        logits = model(images)
        total_loss += float(criterion(logits, masks))
        pixels += masks.numel()
        cm += confusion_matrix(logits.argmax(1), masks, n_classes)
    return total_loss / max(pixels, 1), cm


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


def train(cfg: config.Config) -> dict[str, Any]:
    """Run the whole training; return a summary (best val IoU, its epoch, checkpoint paths)."""
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    # 1. Data: the split lists written by split_dataset.py (and augment.py).
    train_pairs = read_pair_list(run_dir / "splits" / "train.txt")
    val_pairs = read_pair_list(run_dir / "splits" / "val.txt")
    if not train_pairs:
        raise DataError(
            f"{run_dir / 'splits' / 'train.txt'}: the training split is empty; add data and re-run split_dataset.py"
        )
    train_set = FarmlandDataset(train_pairs, cfg.in_channels, cfg.online_aug, cfg.mask_threshold)
    val_set = FarmlandDataset(val_pairs, cfg.in_channels, False, cfg.mask_threshold)
    device = select_device(cfg.device)
    loader_generator = torch.Generator()
    common = {"num_workers": cfg.num_workers, "pin_memory": device.type == "cuda"}
    train_loader = DataLoader(
        train_set,
        cfg.batch_size,
        shuffle=True,
        drop_last=len(train_set) > cfg.batch_size,
        generator=loader_generator,
        **common,
    )
    val_loader = DataLoader(val_set, cfg.batch_size, shuffle=False, **common)
    # 2. Network, optimiser, schedule, loss.
    torch.manual_seed(cfg.seed)
    layout = memory_format(cfg.channels_last)
    model = build_model(cfg.in_channels, cfg.n_classes, cfg.base_width, cfg.dropout).to(device, memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    criterion = nn.CrossEntropyLoss()
    # 3. Resume: restore everything the next epoch depends on.
    start_epoch, best_iou, best_epoch, history = 1, -1.0, 0, []
    if cfg.resume:
        state = load_checkpoint(ckpt_dir / "last.pth", device)
        check_resumable(state, cfg, ckpt_dir / "last.pth")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_iou, best_epoch = state["epoch"] + 1, state["best_iou"], state["best_epoch"]
        history = list(state["history"])
        LOG.info(
            "resuming after epoch %d (best val farmland IoU %.4f at epoch %d)", state["epoch"], best_iou, best_epoch
        )
    elif (ckpt_dir / "last.pth").exists():
        LOG.warning("%s exists and will be overwritten; use --resume=true to continue that run", ckpt_dir / "last.pth")
    LOG.info(
        "training on %s | U-Net width %d, %d parameters | %d training tiles, %d validation tiles | epochs %d..%d",
        describe_device(device),
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
        torch.manual_seed(cfg.seed + epoch)
        loader_generator.manual_seed(cfg.seed + epoch)
        model.train()
        loss_sum, steps = torch.zeros((), device=device), 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False, disable=None)
        for images, masks in bar:
            images = images.to(device, memory_format=layout, non_blocking=True)
            masks = masks.to(device, non_blocking=True)
            loss = criterion(model(images), masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Summed on the device: reading the loss every step would stall a GPU.
            loss_sum += loss.detach()
            steps += 1
            if steps % 20 == 0:
                bar.set_postfix(loss=f"{float(loss_sum) / steps:.4f}")
        train_loss = float(loss_sum) / max(steps, 1)
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"epoch {epoch}: the training loss became {train_loss}; training stopped and this epoch was not "
                f"saved, the last good checkpoint is {ckpt_dir / 'last.pth'}. Lower --lr, or check the images for NaN values"
            )
        scheduler.step()
        # 5. Validation: loss and pooled IoU with the same confusion-count code as miou.py.
        val_loss, cm = (
            evaluate(model, val_loader, device, cfg.n_classes, layout)
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
        improved = farmland_iou > best_iou
        if improved:
            best_iou, best_epoch = farmland_iou, epoch
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "best_iou": best_iou,
            "best_epoch": best_epoch,
            "history": history,
            "config": dataclasses.asdict(cfg),
        }
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
    config.setup_logging(cfg, "train")
    config.save_config(cfg, "train")
    summary = train(cfg)
    LOG.info("best val farmland IoU %.4f at epoch %d: %s", summary["best_iou"], summary["best_epoch"], summary["best"])
    return 0


if __name__ == "__main__":
    sys.exit(config.run_main(main))
