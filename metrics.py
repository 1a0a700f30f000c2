"""Scores of predicted masks: confusion counts first, then IoU, precision, recall, F1, accuracy and kappa
from the counts, per image and pooled over a split, and the boundary IoU of parcel edges.

train.py validates with these functions and miou.py reports with them, so the two always agree.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from data_preprocess import IGNORE, load_mask
from files import DataError

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

    Boundary IoU = intersection / union; labelled pixels only. Unlabelled pixels count as inside in both masks,
    so the edge of an unlabelled area is no parcel edge (its true outline is unknown), as the image border is not.
    """
    unlabelled = label == IGNORE
    label_band = boundary_band((label == positive) | unlabelled, width) & ~unlabelled
    pred_band = boundary_band((pred == positive) | unlabelled, width) & ~unlabelled
    return int(np.count_nonzero(label_band & pred_band)), int(np.count_nonzero(label_band | pred_band))


def nan_to_none(value: float) -> float | None:
    """JSON has no NaN: undefined figures are written as null."""
    return None if isinstance(value, float) and math.isnan(value) else value


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
            # A mask's own fixes (--ignore_index, --mask_threshold, re-export) are for labels; a prediction that
            # is not as predict.py writes it (0 and 255, its image's size) is made again.
            again = "predict the test split again (python predict.py with this --run_dir)"
            try:
                pred = load_mask(pred_path)
            except DataError as err:
                found = str(err).removeprefix(f"{pred_path}: ").split("; ")[0]
                raise DataError(
                    f"{pred_path}: {found}; expected a mask as predict.py writes them (0 and 255): {again}"
                ) from None
            if pred.shape != label.shape:
                raise DataError(
                    f"{pred_path}: prediction is {pred.shape[1]}x{pred.shape[0]} pixels, but its label {label_path} "
                    f"is {label.shape[1]}x{label.shape[0]}; predict.py writes each mask at its image's size: {again}"
                )
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


def summarise(rows: list[dict], pooled: np.ndarray, split: Sequence[str] | None = None) -> dict:
    """The metrics.json content: per-image means (classes absent in an image skipped) and pooled figures.

    ``split``: the names of every image of the split scored; with it, ``n_test_images`` counts them and
    ``not_scored`` names those without a row, so the figures do not pass for the whole split's.
    """
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
    scored = {r["name"] for r in rows}
    coverage = {}
    if split is not None:
        coverage = {"n_test_images": len(split), "not_scored": [n for n in split if n not in scored]}
    return {
        "n_images": len(rows),
        **coverage,
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


INTERVAL_LEVEL = 0.95  # the share of resampled test splits the interval holds
INTERVAL_DRAWS = 2000  # resampled test splits; fixed seed, so the interval is the same on every run
FEW_UNITS = 5  # with fewer test scenes (or images) holding farmland in a label or prediction, no interval is given
DRAWN_AT_ONCE = 2_000_000  # units drawn in one block of resamplings: 32 MB with its float copy, however many images


def farmland_units(rows: Sequence[dict], units: Sequence[str]) -> int:
    """How many of the units (each row's scene, or its own name) hold farmland in a label or a prediction of
    theirs: those alone move the farmland IoU (an image of neither counts 0/0, in no figure)."""
    return len({unit for row, unit in zip(rows, units) if row["tp"] + row["fp"] + row["fn"] > 0})


def resampled_interval(
    rows: Sequence[dict], units: Sequence[str], level: float = INTERVAL_LEVEL, draws: int = INTERVAL_DRAWS
) -> dict[str, list[float] | None]:
    """How far the test figures would move on another test split from the same place: percentile bootstrap
    intervals of the pooled and the per-image farmland IoU, drawing whole units (``units``: each row's scene,
    or its own name) with replacement, since tiles of one scene err together. None where fewer than FEW_UNITS
    units hold farmland in a label or prediction (farmland_units): the others change neither figure, so the draws
    would repeat those few."""
    names = sorted(set(units))
    if farmland_units(rows, units) < FEW_UNITS:
        return {"pooled_farmland_iou": None, "per_image_farmland_iou": None}
    position = {name: i for i, name in enumerate(names)}
    index = np.array([position[unit] for unit in units])
    sums = np.zeros((len(names), 5))  # per unit: tp, fp, fn, sum of per-image IoUs, images counted
    for row, unit in zip(rows, index):
        iou = row["farmland_iou"]
        sums[unit] += [row["tp"], row["fp"], row["fn"], 0.0 if math.isnan(iou) else iou, not math.isnan(iou)]
    rng = np.random.default_rng(0)
    # In blocks of draws (the same draws as in one): one draws x units matrix would take 1.6 GB at 100,000 images.
    block = max(1, DRAWN_AT_ONCE // len(names))
    chances = np.full(len(names), 1.0 / len(names))
    drawn = np.concatenate(
        [
            rng.multinomial(len(names), chances, size=min(block, draws - start)).astype(np.float64) @ sums
            for start in range(0, draws, block)
        ]
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = drawn[:, 0] / drawn[:, :3].sum(axis=1)
        per_image = drawn[:, 3] / drawn[:, 4]
    tails = 100 * np.array([(1 - level) / 2, (1 + level) / 2])

    def bounds(values: np.ndarray) -> list[float] | None:
        values = values[np.isfinite(values)]
        return [float(v) for v in np.percentile(values, tails)] if values.size else None

    return {"pooled_farmland_iou": bounds(pooled), "per_image_farmland_iou": bounds(per_image)}
