"""Accuracy of the predicted masks against the labels: per-image and pooled, counts first.

For every test image the 2x2 confusion counts (rows = label, columns = prediction) are accumulated in
one vectorised pass; every figure is then a formula over counts:

- per-image IoU of farmland and of background, as in the reference: a class absent from both the label
  and the prediction of an image (0/0) is skipped for that image; the means are over the images that
  count (``per_image.*``);
- pooled figures from one confusion matrix summed over all test pixels (``pooled.*``): IoU per class,
  mIoU, precision, recall and F1 of farmland, overall accuracy and Cohen's kappa. A 0/0 pooled figure is
  reported as null;
- boundary IoU of farmland (``boundary_iou``): the IoU of the label's and the prediction's inner edge
  bands, ``boundary_width`` pixels deep, which scores the parcel outlines that field mapping cares about
  and that a pixel IoU dominated by parcel interiors hardly sees. Edges of the image are not parcel edges.
Unlabelled pixels (``ignore_index``) count in no figure.

Inputs: the test split (run_dir/splits/test.txt) and run_dir/predictions/<stem>_seg.png.
Outputs: run_dir/metrics.json, run_dir/per_image_metrics.csv, and run_dir/figures/: iou_per_image.png,
gallery_worst.png, gallery_best.png.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

import config
from data_preprocess import IGNORE, DataError, image_to_float, load_mask, read_image, read_pair_list

LOG = logging.getLogger("miou")
FARMLAND = 1


def confusion_counts(pred: torch.Tensor, target: torch.Tensor, n_classes: int = 2) -> torch.Tensor:
    """Count pixels by (label, prediction) on the tensors' own device: (n_classes, n_classes) int64, rows = label.

    No checks and no transfer, for use inside training loops; values must lie in [0, n_classes), and
    label pixels equal to IGNORE are left out.
    """
    target = target.reshape(-1).long()
    flat = target * n_classes + pred.reshape(-1).long()
    # Ignored pixels go to one extra bin that is dropped: no boolean indexing, so no device sync.
    flat = torch.where(target == IGNORE, n_classes * n_classes, flat)
    counts = torch.bincount(flat, minlength=n_classes * n_classes + 1)
    return counts[: n_classes * n_classes].reshape(n_classes, n_classes)


def confusion_matrix(
    pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, n_classes: int = 2
) -> np.ndarray:
    """Count pixels by (label, prediction): an (n_classes, n_classes) int64 numpy matrix, rows = label.

    Works on any shapes that match, on CPU or GPU tensors or numpy arrays, without Python loops. Label
    pixels equal to IGNORE (unlabelled) are not counted.

    Raises:
        ValueError: shapes differ, or a value lies outside [0, n_classes).
    """
    if isinstance(pred, torch.Tensor) or isinstance(target, torch.Tensor):
        pred_t = torch.as_tensor(pred)
        target_t = torch.as_tensor(target, device=pred_t.device)
        check_classes(pred_t, target_t, n_classes)
        return confusion_counts(pred_t, target_t, n_classes).cpu().numpy().astype(np.int64)
    pred_a, target_a = np.asarray(pred), np.asarray(target)
    check_classes(pred_a, target_a, n_classes)
    # Masks are small integers: index arithmetic in uint8 (when it fits) keeps the pass over pixels cheap.
    dtype = np.uint8 if n_classes * n_classes < 256 else np.int64
    target_flat = target_a.ravel()
    flat = target_flat.astype(dtype, copy=False) * dtype(n_classes) + pred_a.ravel().astype(dtype, copy=False)
    if (target_flat == IGNORE).any():
        flat[target_flat == IGNORE] = n_classes * n_classes  # an extra bin, dropped below
    counts = np.bincount(flat, minlength=n_classes * n_classes + 1)[: n_classes * n_classes]
    return counts.reshape(n_classes, n_classes).astype(np.int64)


def check_classes(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, n_classes: int) -> None:
    """Raises ValueError unless prediction and label have one shape and hold class indices in [0, n_classes)
    (the label may also hold IGNORE)."""
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(target.shape)}")
    if not math.prod(pred.shape):
        return
    labelled = target[target != IGNORE]
    size = labelled.numel() if isinstance(labelled, torch.Tensor) else labelled.size
    low = min(int(pred.min()), int(labelled.min()) if size else 0)
    high = max(int(pred.max()), int(labelled.max()) if size else 0)
    if low < 0 or high >= n_classes:
        raise ValueError(f"class indices must lie in [0, {n_classes}); re-check the masks' encoding")


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, or NaN when the denominator is 0 (a 0/0 figure is undefined, not 0 or 1)."""
    return float(numerator) / float(denominator) if denominator else math.nan


def class_iou(cm: np.ndarray) -> np.ndarray:
    """IoU of each class from a confusion matrix: tp / (tp + fp + fn), NaN where a class is absent from both."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def scores(cm: np.ndarray, positive: int = FARMLAND) -> dict[str, float]:
    """All pooled figures from one confusion matrix (rows = label, columns = prediction).

    Returns:
        farmland_iou, background_iou, miou (mean over classes that occur), precision, recall and f1 of the
        positive class, accuracy, and Cohen's kappa. 0/0 figures are NaN.
    """
    total = cm.sum()
    tp = cm[positive, positive]
    fp = cm[:, positive].sum() - tp
    fn = cm[positive, :].sum() - tp
    ious = class_iou(cm)
    accuracy = ratio(np.trace(cm), total)
    expected = ratio((cm.sum(axis=0) * cm.sum(axis=1)).sum(), float(total) ** 2)
    present = ious[~np.isnan(ious)]
    return {
        "farmland_iou": float(ious[positive]),
        "background_iou": float(ious[1 - positive]) if cm.shape[0] == 2 else float(ious[0]),
        "miou": float(present.mean()) if present.size else math.nan,
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": accuracy,
        "kappa": ratio(accuracy - expected, 1.0 - expected) if not math.isnan(expected) else math.nan,
    }


def boundary_band(mask: np.ndarray, width: int) -> np.ndarray:
    """The pixels of a binary mask within ``width`` pixels (chessboard distance) of its edge: the mask minus
    its erosion. The image border does not count as an edge (erosion treats outside pixels as inside)."""
    mask = mask.astype(np.uint8)
    eroded = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=max(width, 1), borderType=cv2.BORDER_REPLICATE)
    return (mask > eroded).astype(bool)


def boundary_counts(pred: np.ndarray, label: np.ndarray, width: int, positive: int = FARMLAND) -> tuple[int, int]:
    """Intersection and union of the label's and the prediction's edge bands of the positive class.

    Boundary IoU = intersection / union; labelled pixels only.
    """
    labelled = label != IGNORE
    label_band = boundary_band(label == positive, width) & labelled
    pred_band = boundary_band(pred == positive, width) & labelled
    return int(np.count_nonzero(label_band & pred_band)), int(np.count_nonzero(label_band | pred_band))


def nan_to_none(value: float) -> float | None:
    """JSON has no NaN: undefined figures are written as null."""
    return None if isinstance(value, float) and math.isnan(value) else value


def prediction_path(run_dir: Path, image_path: Path) -> Path:
    """Where predict.py writes the mask for an image: run_dir/predictions/<stem>_seg.png."""
    return Path(run_dir) / "predictions" / f"{Path(image_path).stem}_seg.png"


def evaluate_pairs(
    items: Sequence[tuple[str, Path, Path]],
    mask_threshold: int = 0,
    n_classes: int = 2,
    ignore_index: int = -1,
    boundary_width: int = 3,
) -> tuple[list[dict], np.ndarray, list[str]]:
    """Score each (name, label path, prediction path); unreadable items are reported and skipped.

    Returns:
        per-image rows (name, counts, IoUs, boundary counts), the pooled confusion matrix, and error messages.
    """
    rows: list[dict] = []
    pooled = np.zeros((n_classes, n_classes), dtype=np.int64)
    errors: list[str] = []
    for name, label_path, pred_path in items:
        try:
            label = load_mask(label_path, mask_threshold, ignore_index)
            if not Path(pred_path).is_file():
                raise DataError(f"{pred_path}: prediction not found; run predict.py with the same --run_dir")
            pred = load_mask(pred_path)
            if pred.shape != label.shape:
                raise DataError(f"{pred_path}: prediction is {pred.shape} pixels, label {label_path} is {label.shape}")
        except DataError as err:
            errors.append(str(err))
            LOG.error("%s", err)
            continue
        cm = confusion_matrix(pred, label, n_classes)
        pooled += cm
        ious = class_iou(cm)
        edge_inter, edge_union = boundary_counts(pred, label, boundary_width)
        rows.append(
            {
                "name": name,
                "tp": int(cm[1, 1]),
                "fp": int(cm[0, 1]),
                "fn": int(cm[1, 0]),
                "tn": int(cm[0, 0]),
                "farmland_iou": float(ious[FARMLAND]),
                "background_iou": float(ious[0]),
                "boundary_iou": ratio(edge_inter, edge_union),
                "boundary_intersection": edge_inter,
                "boundary_union": edge_union,
            }
        )
    return rows, pooled, errors


def summarise(rows: list[dict], pooled: np.ndarray) -> dict:
    """The metrics.json content: per-image means (classes absent in an image skipped) and pooled figures."""
    per_image = {}
    for key in ("farmland_iou", "background_iou", "boundary_iou"):
        values = np.array([r.get(key, math.nan) for r in rows], dtype=np.float64)
        counted = values[~np.isnan(values)]
        per_image[key] = nan_to_none(float(counted.mean()) if counted.size else math.nan)
        per_image[f"{key}_images_counted"] = int(counted.size)
    present = [v for v in (per_image["farmland_iou"], per_image["background_iou"]) if v is not None]
    per_image["miou"] = nan_to_none(float(np.mean(present)) if present else math.nan)
    pooled_scores = scores(pooled)
    pooled_scores["boundary_iou"] = ratio(
        sum(r.get("boundary_intersection", 0) for r in rows), sum(r.get("boundary_union", 0) for r in rows)
    )
    return {
        "n_images": len(rows),
        "per_image": per_image,
        "pooled": {k: nan_to_none(v) for k, v in pooled_scores.items()},
        "pooled_confusion": {
            "tp": int(pooled[1, 1]),
            "fp": int(pooled[0, 1]),
            "fn": int(pooled[1, 0]),
            "tn": int(pooled[0, 0]),
        },
        "notes": "per_image: mean over images of each image's IoU, an image skipped for a class absent from "
        "both its label and prediction; pooled: from one confusion matrix over all test pixels; boundary_iou: "
        "farmland edge bands of boundary_width pixels; unlabelled pixels not counted; null = 0/0",
    }


def plot_iou_curves(rows: list[dict], path: Path) -> None:
    """Save the per-image farmland and background IoU, with their means, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    index = np.arange(len(rows))
    for key, colour in (("farmland_iou", "tab:green"), ("background_iou", "tab:brown")):
        values = np.array([r[key] for r in rows], dtype=np.float64)
        mean = np.nanmean(values) if np.isfinite(values).any() else math.nan
        ax.plot(index, values, ".-", color=colour, lw=0.8, label=f"{key.replace('_', ' ')} (mean {mean:.3f})")
        if not math.isnan(mean):
            ax.axhline(mean, color=colour, ls="--", lw=1)
    ax.set(
        xlabel="test image",
        ylabel="IoU",
        ylim=(0, 1.02),
        title="Per-image IoU (gaps: class absent in label and prediction)",
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    save_figure(fig, path)


def save_figure(fig: "object", path: Path) -> None:
    """Render a matplotlib figure to PNG in memory, then write it atomically, and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    config.atomic_write_bytes(path, buffer.getvalue())


def gallery(
    rows: list[dict], lookup: dict[str, tuple[Path, Path, Path]], cfg: config.Config, path: Path, title: str
) -> None:
    """Save a photo | label | prediction grid of the given rows as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.4 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows):
        image_path, label_path, pred_path = lookup[row["name"]]
        # Show the first three bands (RGB of an RGB+NIR tile); a single band is shown in grey.
        raw = read_image(image_path)[:, :, :3]
        photo = image_to_float(raw, raw.shape[2], image_path).transpose(1, 2, 0)
        ax_row[0].imshow(photo if photo.shape[2] == 3 else photo[:, :, 0], cmap="gray")
        ax_row[1].imshow(load_mask(label_path, cfg.mask_threshold, cfg.ignore_index), cmap="gray", vmin=0, vmax=1)
        ax_row[2].imshow(load_mask(pred_path), cmap="gray", vmin=0, vmax=1)
        ax_row[0].set_ylabel(f"{row['name']}\nIoU {row['farmland_iou']:.3f}", fontsize=8)
        for ax, label in zip(ax_row, ("photo", "label", "prediction")):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(label, fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def write_csv(rows: list[dict], path: Path) -> None:
    """Write the per-image counts and IoUs as CSV (empty IoU cell = class absent in label and prediction)."""
    buffer = io.StringIO()
    fields = [
        "name",
        "farmland_iou",
        "background_iou",
        "boundary_iou",
        "tp",
        "fp",
        "fn",
        "tn",
        "boundary_intersection",
        "boundary_union",
    ]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(row[k], float) and math.isnan(row[k]) else row[k]) for k in fields})
    config.atomic_write_text(path, buffer.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
    """Score run_dir/predictions against the test split's labels; write metrics, CSV and figures."""
    cfg = config.parse_args(argv, __doc__ or "")
    config.check_paths(cfg)
    config.setup_logging(cfg, "miou")
    run_dir = Path(cfg.run_dir)
    config.save_config(cfg, "miou")
    pairs = read_pair_list(run_dir / "splits" / "test.txt")
    lookup = {p[0].stem: (p[0], p[1], prediction_path(run_dir, p[0])) for p in pairs}
    rows, pooled, errors = evaluate_pairs(
        [(n, v[1], v[2]) for n, v in lookup.items()],
        cfg.mask_threshold,
        cfg.n_classes,
        cfg.ignore_index,
        cfg.boundary_width,
    )
    if not rows:
        LOG.error("no test image could be scored (%d problem(s) above)", len(errors))
        return 1
    summary = summarise(rows, pooled)
    config.atomic_write_text(run_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
    write_csv(rows, run_dir / "per_image_metrics.csv")
    figures = run_dir / "figures"
    plot_iou_curves(rows, figures / "iou_per_image.png")
    ranked = sorted((r for r in rows if not math.isnan(r["farmland_iou"])), key=lambda r: r["farmland_iou"])
    count = min(cfg.gallery_size, len(ranked))
    if count:
        gallery(ranked[:count], lookup, cfg, figures / "gallery_worst.png", f"{count} lowest farmland IoU")
        gallery(ranked[::-1][:count], lookup, cfg, figures / "gallery_best.png", f"{count} highest farmland IoU")
    pooled_s, per_image = summary["pooled"], summary["per_image"]
    LOG.info(
        "%d test images | pooled: farmland IoU %s, background IoU %s, mIoU %s, F1 %s, accuracy %s, kappa %s, "
        "boundary IoU %s",
        len(rows),
        *(
            fmt(pooled_s[k])
            for k in ("farmland_iou", "background_iou", "miou", "f1", "accuracy", "kappa", "boundary_iou")
        ),
    )
    LOG.info(
        "per-image means: farmland IoU %s (%d images), background IoU %s (%d images)",
        fmt(per_image["farmland_iou"]),
        per_image["farmland_iou_images_counted"],
        fmt(per_image["background_iou"]),
        per_image["background_iou_images_counted"],
    )
    LOG.info("wrote %s, %s and figures in %s", run_dir / "metrics.json", run_dir / "per_image_metrics.csv", figures)
    if errors:
        LOG.error("%d test image(s) could not be scored; see the messages above", len(errors))
        return 1
    return 0


def fmt(value: float | None) -> str:
    """Format a figure for the log, with 'n/a' for an undefined (0/0) one."""
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(config.run_main(main))
