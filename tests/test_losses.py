"""Each loss against hand-computed values, with ignored pixels and batches without labels."""

from __future__ import annotations

import math

import pytest
import torch

from data_preprocess import IGNORE
from losses import SegmentationLoss, class_weights, make_loss


def pixels(logits: list[list[float]], targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of one 1 x P image: logits (1, K, 1, P) and targets (1, 1, P) from per-pixel lists."""
    return torch.tensor(logits).T[None, :, None, :].contiguous(), torch.tensor([[targets]])


# Pixel 0: p(background) = 3/4, label background; pixel 1: p = 1/2 each, label farmland;
# pixel 2: unlabelled, with logits that would dominate every loss if it counted.
LOGITS, TARGETS = pixels([[math.log(3.0), 0.0], [0.0, 0.0], [50.0, -50.0]], [0, 1, IGNORE])


def test_cross_entropy_by_hand() -> None:
    expected = (math.log(4 / 3) + math.log(2)) / 2
    assert float(SegmentationLoss("ce")(LOGITS, TARGETS)) == pytest.approx(expected, rel=1e-6)


def test_weighted_cross_entropy_by_hand() -> None:
    weights = class_weights([3, 1], 2)  # N / (K n_c): 4 / 6 and 4 / 2
    assert weights.tolist() == pytest.approx([2 / 3, 2.0])
    loss = make_loss("weighted_ce", [3, 1], 2, 2.0)(LOGITS, TARGETS)
    expected = (2 / 3 * math.log(4 / 3) + 2.0 * math.log(2)) / (2 / 3 + 2.0)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_class_weights_of_an_absent_class_and_of_no_pixels() -> None:
    assert class_weights([5, 0], 2).tolist() == pytest.approx([0.5, 1.0])
    with pytest.raises(ValueError, match="no labelled pixels"):
        class_weights([0, 0], 2)


def test_dice_by_hand() -> None:
    # Two labelled pixels at p = 1/2 each: per class, intersection 1/2, |P| = 1, |G| = 1.
    logits, targets = pixels([[0.0, 0.0], [0.0, 0.0], [9.0, 0.0]], [0, 1, IGNORE])
    dice = (2 * 0.5 + 1.0) / (1.0 + 1.0 + 1.0)
    assert float(SegmentationLoss("dice")(logits, targets)) == pytest.approx(1 - dice, rel=1e-6)


def test_dice_is_pooled_over_the_batch_not_averaged_per_image() -> None:
    # Two 1 x 1 images at p = 1/2, labelled background and farmland. Pooled, each class has intersection 1/2,
    # |P| = 1, |G| = 1: dice (1 + 1) / (2 + 1). Per image it would be (0.8 + 2/3) / 2 per class instead.
    logits, targets = torch.zeros(2, 2, 1, 1), torch.tensor([[[0]], [[1]]])
    assert float(SegmentationLoss("dice")(logits, targets)) == pytest.approx(1 - 2 / 3, rel=1e-6)


def test_dice_of_a_perfect_prediction_is_zero_and_of_an_empty_mask_is_small() -> None:
    logits, targets = pixels([[30.0, -30.0], [-30.0, 30.0]], [0, 1])
    assert float(SegmentationLoss("dice")(logits, targets)) == pytest.approx(0.0, abs=1e-6)
    # An all-background tile predicted all background: farmland absent from both scores 1 (smoothing).
    logits, targets = pixels([[30.0, -30.0], [30.0, -30.0]], [0, 0])
    assert float(SegmentationLoss("dice")(logits, targets)) == pytest.approx(0.0, abs=1e-6)


def test_ce_dice_is_the_sum() -> None:
    total = SegmentationLoss("ce_dice")(LOGITS, TARGETS)
    parts = SegmentationLoss("ce")(LOGITS, TARGETS) + SegmentationLoss("dice")(LOGITS, TARGETS)
    assert float(total) == pytest.approx(float(parts), rel=1e-6)


def test_focal_by_hand() -> None:
    gamma = 2.0
    expected = ((1 / 4) ** gamma * math.log(4 / 3) + (1 / 2) ** gamma * math.log(2)) / 2
    assert float(SegmentationLoss("focal", focal_gamma=gamma)(LOGITS, TARGETS)) == pytest.approx(expected, rel=1e-6)
    # gamma = 0 is plain cross-entropy.
    ce = SegmentationLoss("ce")(LOGITS, TARGETS)
    assert float(SegmentationLoss("focal", focal_gamma=0.0)(LOGITS, TARGETS)) == pytest.approx(float(ce), rel=1e-6)


@pytest.mark.parametrize("name", ["ce", "weighted_ce", "dice", "ce_dice", "focal"])
def test_every_loss_ignores_unlabelled_pixels_and_survives_an_unlabelled_batch(name: str) -> None:
    loss = make_loss(name, [3, 1], 2, 2.0)
    changed = LOGITS.clone()
    changed[0, :, 0, 2] = torch.tensor([-70.0, 70.0])  # move only the unlabelled pixel
    assert float(loss(changed, TARGETS)) == pytest.approx(float(loss(LOGITS, TARGETS)), rel=1e-6)
    logits = torch.zeros((1, 2, 1, 3), requires_grad=True)
    value = loss(logits, torch.full((1, 1, 3), IGNORE))
    assert math.isfinite(float(value.detach()))
    value.backward()  # no NaN gradient either
    assert torch.isfinite(logits.grad).all()


def test_unknown_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of ce, weighted_ce, dice, ce_dice, focal"):
        make_loss("lovasz", None, 2, 2.0)


@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_equals_torchs_mean_with_unlabelled_pixels(weighted: bool) -> None:
    torch.manual_seed(3)
    logits = torch.randn(2, 2, 5, 5, requires_grad=True)
    target = torch.randint(0, 2, (2, 5, 5))
    target[0, :2] = IGNORE
    weights = torch.tensor([0.3, 1.7]) if weighted else None
    loss = make_loss("weighted_ce" if weighted else "ce", [70, 30], 2, 2.0)
    expected = torch.nn.functional.cross_entropy(logits, target, weight=weights, ignore_index=IGNORE)
    if weighted:
        loss.weights.copy_(weights)
    assert float(loss(logits, target)) == pytest.approx(float(expected), rel=1e-6)


def test_an_unlabelled_batch_gives_zero_loss_and_zero_gradients_without_nan() -> None:
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    value = make_loss("ce", None, 2, 2.0)(logits, torch.full((1, 4, 4), IGNORE))
    value.backward()
    assert float(value) == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_gradients_stay_finite_when_the_true_class_is_certain(gamma: float) -> None:
    # Pixel 0: a margin of 200, so p_t rounds to 1 in float32 and (1 - p_t) to 0, where the old (1 - p_t) ** gamma
    # had an infinite gradient for gamma < 1; pixel 1: p = 1/2 each, label farmland.
    logits, target = pixels([[200.0, 0.0], [0.0, 0.0]], [0, 1])
    logits.requires_grad_(True)
    value = SegmentationLoss("focal", focal_gamma=gamma)(logits, target)
    value.backward()
    assert float(value) == pytest.approx(0.5**gamma * math.log(2) / 2, rel=1e-6)  # the certain pixel adds 0
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, :, 0, 0].abs().max() < 1e-12  # nothing left to learn from the certain pixel
    # Pixel 1 by hand: d/dz_1 of -(1 - p) ** gamma * log p with p = sigmoid(z_1 - z_0) = 1/2, halved by the mean.
    d_dp = gamma * 0.5 ** (gamma - 1) * math.log(0.5) - 0.5**gamma / 0.5
    assert float(logits.grad[0, 1, 0, 1]) == pytest.approx(d_dp * 0.25 / 2, rel=1e-5)
    assert float(logits.grad[0, 0, 0, 1]) == pytest.approx(-d_dp * 0.25 / 2, rel=1e-5)
