"""The network's working resolution (the ``downscale`` key): tiles shrunk by an integer factor before the
network, its logits grown back to the tile's own size after it.

A network at ``downscale=2`` sees a 256-pixel tile as 128 pixels (each 2 x 2 block averaged), so it does about
a quarter of the work per tile and each of its pooling levels reaches twice as far on the ground. Masks,
losses and metrics stay at full resolution: the logits are grown back by bilinear interpolation, which puts
each block's value at the block's centre. Both networks apply it inside ``forward``, so training, prediction,
scenes and the exported graph all work at the resolution the checkpoint was trained at.

``downscale=0`` (auto, the recommended recipe's) lets the tiles' pixel size choose: the factor whose working
pixel lies nearest WORKING_PIXEL_M (0.5 m tiles: 4, 1 m: 2, 2 m and coarser: 1), half resolution when the
pixel size is unknown. train.py settles it before building the network; checkpoints hold the factor chosen.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

# 1 = full resolution. Powers of two keep the scene defaults (window 512, overlap 128) on the network's pooling
# grid; beyond 4 a 256-pixel tile keeps too little of a field's edge.
FACTORS = (1, 2, 4)
FACTOR_MEANING = "(1 = full resolution, 2 = half the pixels on each side)"  # said by every refusal of a factor
AUTO = 0  # downscale=0: the factor follows the tiles' pixel size (factor_for_pixel)
# Both real data sets scored best with the network working at about 2 m per pixel (docs/real_data.md, section 11):
# deepglobe_agri's 0.5 m tiles at a quarter, NAIP's 1 m tiles at half, either set averaged to 2 m at full.
WORKING_PIXEL_M = 2.0
UNKNOWN_PIXEL_FACTOR = 2  # tiles without a pixel size: half resolution, the better choice on both sets


def check_factor(factor: int) -> int:
    """Return ``factor`` when it is a supported downscale factor.

    Raises:
        ValueError: any other value, with the valid ones.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor not in FACTORS:
        raise ValueError(f"--downscale={factor!r}: expected one of {', '.join(map(str, FACTORS))} {FACTOR_MEANING}")
    return factor


def check_setting(value: int) -> int:
    """Return the ``downscale`` key's ``value`` when it is AUTO or one of FACTORS.

    Raises:
        ValueError: any other value, with the valid ones.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value == AUTO:
        return value
    try:
        return check_factor(value)
    except ValueError:
        raise ValueError(
            f"--downscale={value!r}: expected 0 (auto: chosen from the tiles' pixel size) or one of "
            f"{', '.join(map(str, FACTORS))} {FACTOR_MEANING}"
        ) from None


def factor_for_pixel(pixel_size_m: float) -> int:
    """The factor in FACTORS whose working pixel (``pixel_size_m`` times it) lies nearest WORKING_PIXEL_M on
    a log scale (switching at 0.71 m and 1.41 m); UNKNOWN_PIXEL_FACTOR when the pixel size is unknown (0 or less)."""
    if not pixel_size_m > 0:
        return UNKNOWN_PIXEL_FACTOR
    return min(FACTORS, key=lambda f: (abs(math.log(pixel_size_m * f / WORKING_PIXEL_M)), f))


def shrink(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average each ``factor`` x ``factor`` block of (N, C, H, W) images; a side that is not a multiple of
    ``factor`` is first extended by repeating its last row or column."""
    if factor == 1:
        return x
    pad_h, pad_w = (-side % factor for side in x.shape[-2:])
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return F.avg_pool2d(x, factor)


def grow(logits: torch.Tensor, factor: int, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Logits of shrunk images back to the images' own (height, width) ``size``: bilinear interpolation by
    ``factor`` (block centres on block centres), then the padded rows and columns cropped away."""
    if factor != 1:
        logits = F.interpolate(logits, scale_factor=factor, mode="bilinear", align_corners=False)
    return logits[..., : size[0], : size[1]]


def padded_side(side: int, grid: int, minimum: int = 0) -> int:
    """A side padded up to a multiple of ``grid``, and at least ``minimum``."""
    return max(minimum, -(-side // grid) * grid)


def pad_to_grid(x: torch.Tensor, grid: int, minimum: int = 0) -> torch.Tensor:
    """Pad (N, C, H, W) images at the bottom and right to padded_side, by reflection; by replication where the
    pad is too long to reflect (tiny inputs)."""
    height, width = x.shape[-2:]
    pad_h, pad_w = (padded_side(side, grid, minimum) - side for side in (height, width))
    if pad_h or pad_w:
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x


def run_at_scale(
    body: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, factor: int, grid: int, minimum: int = 0
) -> torch.Tensor:
    """A fully convolutional ``body`` that needs sides on a ``grid`` (and at least ``minimum``) applied to
    images of any size at 1/``factor`` resolution: padded in full resolution to the grid times the factor
    (so that any window of a scene on that grid shrinks to the same blocks), shrunk, run, its logits grown
    back and cropped to the images' size."""
    size = x.shape[-2:]
    padded = pad_to_grid(x, grid * factor, minimum * factor)
    return grow(body(shrink(padded, factor)), factor, size)
