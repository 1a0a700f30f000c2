"""Figures saved as PNG files (drawn by matplotlib's Agg, outside pyplot: no display needed)."""

from __future__ import annotations

import functools
import io
import logging
import math
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from data_preprocess import image_to_float, picked_for_colour, select_bands
from files import atomic_write_bytes

if TYPE_CHECKING:  # matplotlib is imported when the first figure is drawn (subplots), not with this module
    from matplotlib.figure import Figure

LOG = logging.getLogger("figures")

# Fonts with Chinese characters, tried in this order where installed (Linux, Windows, macOS): figures name tiles
# and scenes, whose names DejaVu Sans, matplotlib's own font, would show as empty boxes.
CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    # matplotlib before 3.11 sees only the first face of a .ttc collection, which in Noto's is the Japanese one:
    # its Han characters serve Chinese names as well.
    "Noto Sans CJK JP",
    "Source Han Sans JP",
    "Droid Sans Fallback",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Microsoft YaHei",
    "SimHei",
    "PingFang SC",
    "Heiti SC",
    "Arial Unicode MS",
)


@functools.cache
def matplotlib_fonts() -> None:
    """Put the first installed font of CJK_FONTS after DejaVu Sans in matplotlib's font.family, so that a glyph
    DejaVu lacks is drawn from it (matplotlib falls back along font.family)."""
    import matplotlib
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    matplotlib.rcParams["font.family"] = ["DejaVu Sans", *[name for name in CJK_FONTS if name in installed][:1]]


def subplots(*grid: int, figsize: tuple[float, float] | None = None, **options: Any) -> tuple[Figure, Any]:
    """A figure and its axes as pyplot.subplots makes them (``grid``: rows, columns; ``options``: squeeze, ...),
    but outside pyplot, on an Agg canvas: no display needed, and the backend of the process (a notebook's inline
    one, say) is left as it was. Nothing to close: the figure goes when its last reference does."""
    matplotlib_fonts()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(*grid, **options)


MISSING_GLYPH = "missing from font"  # in matplotlib's warning for a character no font of font.family draws
# Other warnings raised while a figure is drawn, passed on once each (message, category, file, line), as Python
# shows a warning once per place: catch_warnings forgets what was shown, and every figure would repeat them.
PASSED_ON: set[tuple[str, type, str, int]] = set()


# The log handlers warn_missing_glyphs has written to: each script's run sets up its own (cli.setup_logging), so a
# second run in one process (a notebook calling miou.py's main again) says it in its own log too.
GLYPHS_SAID_TO: weakref.WeakSet[logging.Handler] = weakref.WeakSet()


def warn_missing_glyphs() -> None:
    """Say once per run, in its log, that names show as boxes and how to fix it, in place of matplotlib's warning
    per character and figure (a screenful of UserWarnings on a machine without a Chinese font)."""
    handlers = logging.getLogger().handlers or [logging.lastResort]  # lastResort: where a record goes without any
    if all(handler in GLYPHS_SAID_TO for handler in handlers if handler is not None):
        return
    GLYPHS_SAID_TO.update(handler for handler in handlers if handler is not None)
    LOG.warning(
        "names in the figures hold characters (Chinese, say) that no installed font draws, so they show as empty "
        "boxes; install a Chinese font (fonts-noto-cjk or fonts-wqy-zenhei on Debian and Ubuntu), then delete "
        "matplotlib's font cache (~/.cache/matplotlib), which does not see fonts installed after it was made"
    )


def save_figure(fig: Figure, path: Path) -> None:
    """Render a matplotlib figure to PNG in memory, then write it atomically."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=110)
    for warning in caught:
        if MISSING_GLYPH in str(warning.message):
            warn_missing_glyphs()
        elif (key := (str(warning.message), warning.category, warning.filename, warning.lineno)) not in PASSED_ON:
            PASSED_ON.add(key)  # any other warning as it would have been shown: once
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    atomic_write_bytes(path, buffer.getvalue())


STRETCH_PERCENTILES = (2.0, 98.0)  # each shown band from its 2nd to its 98th percentile, as GIS viewers do


def photo_to_show(image: np.ndarray, path: Path, bands: Sequence[int] = (), shown: Sequence[int] = ()) -> np.ndarray:
    """An (H, W, C) tile in [0, 1] for imshow: of the ``bands`` picked (the key; empty: all), those at ``shown``
    (data_preprocess.shown_channels) as colour or grey, by default the first three or the first; each band stretched
    (STRETCH_PERCENTILES), so that 10- or 12-bit values in a 16-bit file are not shown black."""
    picked = select_bands(image.reshape(*image.shape[:2], -1), bands, path)
    colour = picked[:, :, picked_for_colour(picked.shape[2], shown)]
    photo = stretched(image_to_float(colour, colour.shape[2], path), channel_axis=0).transpose(1, 2, 0)
    return photo if photo.shape[2] == 3 else photo[:, :, 0]


def stretched(photo: np.ndarray, channel_axis: int, valid: np.ndarray | None = None) -> np.ndarray:
    """A float image in [0, 1], each band stretched from its STRETCH_PERCENTILES over the ``valid`` pixels
    (all where None; nodata would pull the cuts to its value), a constant band left as it is: 10- or 12-bit
    values of a 16-bit file (Gaofen-2's) shown as they are would be black."""
    bands = np.moveaxis(photo, channel_axis, -1)
    pixels = bands.reshape(-1, bands.shape[-1])
    if valid is not None and valid.any():
        pixels = pixels[valid.reshape(-1)]
    low, high = np.nanpercentile(pixels, STRETCH_PERCENTILES, axis=0) if pixels.size else (0.0, 1.0)
    spread = np.where(high > low, high - low, 1.0)
    out = np.where(high > low, np.clip((bands - low) / spread, 0.0, 1.0), np.clip(bands, 0.0, 1.0))
    return np.moveaxis(out, -1, channel_axis).astype(np.float32)


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """Save the training and validation loss and the val IoU per epoch as a PNG."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_iou) = subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    ax_loss.set(xlabel="epoch", ylabel="loss (the loss key)", title="Loss")
    ax_loss.legend()
    ax_iou.plot(epochs, [h["val_farmland_iou"] for h in history], color="tab:green", label="val farmland IoU")
    ema = [h.get("val_ema_farmland_iou", math.nan) for h in history]  # the moving average's (ema key)
    if any(math.isfinite(v) for v in ema):
        ax_iou.plot(epochs, ema, color="tab:olive", linestyle="--", label="val farmland IoU, moving average")
    ax_iou.plot(epochs, [h["val_miou"] for h in history], color="tab:gray", label="val mIoU")
    ax_iou.set(xlabel="epoch", ylabel="IoU (pooled over val)", ylim=(0, 1), title="Validation IoU")
    ax_iou.legend(loc="lower right")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_iou):  # epochs are whole: no tick at epoch 1.25
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    save_figure(fig, path)


def plot_threshold_curve(curve: list[dict[str, float]], threshold: float, tuned: bool, epoch: int, path: Path) -> None:
    """Save the val farmland IoU, precision and recall against the farmland probability cut as a PNG, with a
    vertical line at ``threshold`` (the tuned cut when ``tuned``, else the argmax's 0.5)."""
    cuts = [row["threshold"] for row in curve]
    fig, ax = subplots(figsize=(6, 4))
    # IoU drawn last and widest: where precision is 1 it equals recall, and would hide under it.
    for key, label, colour, width in (
        ("precision", "precision", "tab:blue", 1.2),
        ("recall", "recall", "tab:orange", 1.2),
        ("val_farmland_iou", "farmland IoU", "tab:green", 2.4),
    ):
        ax.plot(cuts, [row[key] for row in curve], label=label, color=colour, linewidth=width, alpha=0.85)
    line = f"tuned threshold {threshold:.3f}" if tuned else "argmax (0.5)"
    ax.axvline(threshold, color="tab:gray", linestyle="--", label=line)
    ax.set(xlabel="farmland probability cut", ylabel="pooled over val", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title(f"Validation scores against the threshold (epoch {epoch})")
    ax.legend(loc="best")
    save_figure(fig, path)
