"""The reference U-Net: four max-pool downs, four transposed-convolution ups, skip concatenations.

Shapes follow the U-Net figure. With base width w, the encoder produces x1 (w channels, full size),
x2 (2w, 1/2), x3 (4w, 1/4), x4 (8w, 1/8) and x5 (16w, 1/16); the decoder climbs back, concatenating each
skip, and a 1x1 convolution gives one logit per class. Every convolution pads by reflection.

Any height and width are accepted: the input is reflect-padded up to a multiple of 16 (and at least 32,
so the 1/16 level is at least 2 pixels wide, as the reflect padding of its convolutions needs), and the
logits are cropped back to the input size.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DoubleConv(nn.Module):
    """(3x3 conv with reflect padding, BatchNorm, Dropout2d, LeakyReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for channels_in in (in_channels, out_channels):
            layers += [
                nn.Conv2d(channels_in, out_channels, 3, padding=1, padding_mode="reflect", bias=False),
                nn.BatchNorm2d(out_channels),
                nn.Dropout2d(dropout),
                nn.LeakyReLU(inplace=True),
            ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Down(nn.Module):
    """2x2 max-pool, then a double convolution."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(in_channels, out_channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    """2x2 transposed convolution (stride 2), concatenation with the skip, then a double convolution."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net for per-pixel classification of (N, in_channels, H, W) images into n_classes logits."""

    def __init__(self, in_channels: int = 3, n_classes: int = 2, base_width: int = 64, dropout: float = 0.3) -> None:
        super().__init__()
        if in_channels < 1 or n_classes < 2 or base_width < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(
                f"UNet: expected in_channels >= 1, n_classes >= 2, base_width >= 1 and 0 <= dropout < 1; "
                f"got {in_channels}, {n_classes}, {base_width}, {dropout}"
            )
        w = base_width
        self.in_channels = in_channels
        # Per-band input normalisation, computed on the training split by train.py and saved with the weights,
        # so prediction always standardises exactly as training did. Identity until set.
        self.register_buffer("band_mean", torch.zeros(in_channels))
        self.register_buffer("band_std", torch.ones(in_channels))
        self.inc = DoubleConv(in_channels, w, dropout)
        self.down1 = Down(w, 2 * w, dropout)
        self.down2 = Down(2 * w, 4 * w, dropout)
        self.down3 = Down(4 * w, 8 * w, dropout)
        self.down4 = Down(8 * w, 16 * w, dropout)
        self.up1 = Up(16 * w, 8 * w, dropout)
        self.up2 = Up(8 * w, 4 * w, dropout)
        self.up3 = Up(4 * w, 2 * w, dropout)
        self.up4 = Up(2 * w, w, dropout)
        self.outc = nn.Conv2d(w, n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet: expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}; "
                "check in_channels against the images' band count"
            )
        x = (x - self.band_mean[:, None, None]) / self.band_std[:, None, None]
        height, width = x.shape[-2:]
        padded_h, padded_w = (max(32, -(-size // 16) * 16) for size in (height, width))
        pad_h, pad_w = padded_h - height, padded_w - width
        if pad_h or pad_w:
            # Reflection needs the pad to be smaller than the side; tiny inputs fall back to replication.
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        logits = self.outc(x)
        return logits[..., :height, :width]


def set_normalisation(model: UNet, mean: Sequence[float], std: Sequence[float]) -> None:
    """Store per-band mean and standard deviation (of the [0, 1] scaled input) in the network.

    Raises:
        ValueError: the lengths differ from the network's bands, or a deviation is not positive.
    """
    if len(mean) != model.in_channels or len(std) != model.in_channels or min(std) <= 0:
        raise ValueError(
            f"normalisation: expected {model.in_channels} means and {model.in_channels} positive deviations, "
            f"got {list(mean)} and {list(std)}"
        )
    with torch.no_grad():
        model.band_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        model.band_std.copy_(torch.as_tensor(std, dtype=torch.float32))


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(in_channels: int, n_classes: int, base_width: int, dropout: float) -> UNet:
    """Build the U-Net from config values (one place, so train.py and predict.py agree)."""
    return UNet(in_channels=in_channels, n_classes=n_classes, base_width=base_width, dropout=dropout)


@torch.no_grad()
def fold_batchnorm(model: UNet) -> UNet:
    """Return an inference copy of the network: each BatchNorm folded into the convolution before it,
    each Dropout2d dropped.

    In eval mode BatchNorm is a fixed per-channel affine map and Dropout2d the identity, so the copy computes
    the same function (to float rounding) with two fewer passes over memory per convolution. For
    prediction only: the copy has no BatchNorm statistics left to train.
    """
    folded = copy.deepcopy(model).eval()
    for block in folded.modules():
        if not isinstance(block, DoubleConv):
            continue
        layers: list[nn.Module] = []
        for layer in block.block:
            if isinstance(layer, nn.BatchNorm2d):
                conv = layers[-1]
                assert isinstance(conv, nn.Conv2d) and conv.bias is None
                scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
                fused = nn.Conv2d(
                    conv.in_channels, conv.out_channels, 3, padding=1, padding_mode="reflect", bias=True
                ).to(conv.weight.device)
                fused.weight.copy_(conv.weight * scale[:, None, None, None])
                fused.bias.copy_(layer.bias - layer.running_mean * scale)
                layers[-1] = fused
            elif not isinstance(layer, nn.Dropout2d):
                layers.append(layer)
        block.block = nn.Sequential(*layers)
    return folded
