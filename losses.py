"""Training losses for imbalanced farmland masks, chosen by the ``loss`` key.

- ``ce``: cross-entropy, as the reference.
- ``weighted_ce``: cross-entropy with class weights N / (K * n_c) from the training split's pixel counts
  (K classes, n_c pixels of class c, N in all), so every class carries the same total weight.
- ``dice``: 1 - mean over classes of the soft Dice coefficient, pooled over the batch's pixels.
- ``ce_dice``: cross-entropy + Dice.
- ``focal``: cross-entropy scaled by (1 - p_t) ** focal_gamma, which quiets the many easy pixels.
Every loss skips pixels whose target is IGNORE (unlabelled), and all of them run in float32 whatever
the network's precision.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from data_preprocess import IGNORE

LOSSES = ("ce", "weighted_ce", "dice", "ce_dice", "focal")
DICE_SMOOTH = 1.0  # added to numerator and denominator: a class absent from target and prediction scores 1


def class_weights(class_pixels: Sequence[int], n_classes: int) -> torch.Tensor:
    """Balanced class weights N / (K * n_c); a class with no pixels gets weight 1 (it never occurs anyway).

    Raises:
        ValueError: the training split holds no labelled pixels.
    """
    counts = torch.tensor([float(c) for c in list(class_pixels)[:n_classes]] + [0.0] * (n_classes - len(class_pixels)))
    total = float(counts.sum())
    if total <= 0:
        raise ValueError("weighted_ce: the training split holds no labelled pixels; check the masks and ignore_index")
    return torch.where(counts > 0, total / (n_classes * counts.clamp(min=1.0)), torch.ones_like(counts))


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean over classes of (2 |P * G| + s) / (|P| + |G| + s), with P the softmax and G the one-hot target.

    Sums run over every labelled pixel of the batch at once (pooled, like the IoU the trainer reports).
    """
    probabilities = logits.float().softmax(1)
    labelled = target != IGNORE
    classes = torch.where(labelled, target, torch.zeros_like(target))
    one_hot = F.one_hot(classes, logits.shape[1]).permute(0, 3, 1, 2).float()
    weight = labelled[:, None].float()
    dims = (0, 2, 3)
    intersection = (probabilities * one_hot * weight).sum(dims)
    total = (probabilities * weight).sum(dims) + (one_hot * weight).sum(dims)
    return 1.0 - ((2.0 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean over labelled pixels of -(1 - p_t) ** gamma * log p_t (p_t: probability of the true class)."""
    log_p = F.log_softmax(logits.float(), 1)
    labelled = target != IGNORE
    classes = torch.where(labelled, target, torch.zeros_like(target))
    log_pt = log_p.gather(1, classes[:, None])[:, 0]
    # 1 - p_t from log p_t without cancellation, kept above 0: at p_t = 1 the power's gradient for gamma < 1
    # would be infinite, and infinity times log p_t = 0 is NaN, which would poison every weight.
    easy = (-torch.expm1(log_pt)).clamp_min(torch.finfo(log_pt.dtype).tiny)
    losses = -(easy**gamma) * log_pt
    return (losses * labelled).sum() / labelled.sum().clamp(min=1)


def weighted_mean_ce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy averaged over the labelled pixels (each weighted by its class weight, as torch's mean
    reduction does). A batch with no labelled pixel gives 0 with zero gradients rather than NaN, decided on
    the device: no host sync per training step."""
    total = F.cross_entropy(logits.float(), target, weight=weights, ignore_index=IGNORE, reduction="sum")
    labelled = target != IGNORE
    if weights is None:
        denominator = labelled.sum().float()
    else:
        classes = torch.where(labelled, target, torch.zeros_like(target))
        denominator = (weights[classes] * labelled).sum()
    return total / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


class SegmentationLoss(nn.Module):
    """One of LOSSES as a module: ``loss(logits (N, K, H, W), target (N, H, W) int64) -> scalar``."""

    def __init__(self, name: str, weights: torch.Tensor | None = None, focal_gamma: float = 2.0) -> None:
        super().__init__()
        if name not in LOSSES:
            raise ValueError(f"--loss={name!r}: expected one of {', '.join(LOSSES)}")
        if name == "weighted_ce" and weights is None:
            raise ValueError("weighted_ce needs class weights (from class_weights)")
        self.name = name
        self.focal_gamma = focal_gamma
        self.register_buffer("weights", weights if name == "weighted_ce" else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.name == "focal":
            return focal_loss(logits, target, self.focal_gamma)
        if self.name == "dice":
            return soft_dice_loss(logits, target)
        ce = weighted_mean_ce(logits, target, self.weights)
        return ce + soft_dice_loss(logits, target) if self.name == "ce_dice" else ce


def make_loss(name: str, class_pixels: Sequence[int] | None, n_classes: int, focal_gamma: float) -> SegmentationLoss:
    """Build the ``loss`` key's loss; ``class_pixels`` (training-split counts) are needed by weighted_ce only."""
    weights = class_weights(class_pixels, n_classes) if name == "weighted_ce" and class_pixels is not None else None
    return SegmentationLoss(name, weights, focal_gamma)
