"""Figures saved as PNG files (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import io
from pathlib import Path

from files import atomic_write_bytes


def save_figure(fig: "object", path: Path) -> None:
    """Render a matplotlib figure to PNG in memory, then write it atomically, and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


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
