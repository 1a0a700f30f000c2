"""Offline flip augmentation of the training split, as in the reference recipe.

Each training tile is chosen with probability ``aug_prob`` (0.6); a chosen tile gets two new copies, one
flipped vertically and one horizontally, its mask flipped identically. The copies are written losslessly
(PNG, or TIFF where a PNG cannot hold the tile: 2 or more than 4 bands, float values) to
run_dir/augmented/{images,labels} and appended to run_dir/splits/train.txt. Re-running replaces the earlier
copies instead of adding more: the list is rebuilt from the original tiles each time, and the choice of tiles
depends only on the seed.
A preview figure (run_dir/figures/augment_preview.png) shows a few tiles with their flips and masks.

Online flips and 90-degree rotations at load time (``online_aug``, on by default in train.py) are an
alternative; this offline step is optional.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

import cli
from config import Config
from data_preprocess import (
    IGNORE,
    DataError,
    mask_to_classes,
    original_training_pairs,
    parse_bands,
    png_holds,
    read_image,
    read_mask,
    shown_channels,
    write_image,
    write_pair_list,
)
from figures import photo_to_show, save_figure, subplots

LOG = logging.getLogger("augment")
FLIPS = {"vflip": 0, "hflip": 1}  # name -> numpy axis


def copy_names(image_path: Path, flip: str, mask_suffix: str, image: np.ndarray, mask: np.ndarray) -> tuple[str, str]:
    """File names of a flipped copy: <stem>_<flip>.png and <stem>_<flip><mask_suffix>.png, each .tif where a PNG
    cannot hold it (2 or more than 4 bands, or float or 32-bit values: such masks are read from TIFFs too)."""
    stem = f"{Path(image_path).stem}_{flip}"
    extension, mask_extension = (".png" if png_holds(array) else ".tif" for array in (image, mask[:, :, 0]))
    return f"{stem}{extension}", f"{stem}{mask_suffix}{mask_extension}"


def choose_tiles(n: int, probability: float, seed: int) -> np.ndarray:
    """Indices of the tiles that get flipped copies: each with the given probability, fixed by the seed."""
    return np.flatnonzero(np.random.default_rng(seed).random(n) < probability)


# tile, image, mask classes (0, 1, IGNORE), flips of both
Sample = tuple[Path, np.ndarray, np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]


def preview(samples: list[Sample], path: Path, bands: Sequence[int] = (), shown: Sequence[int] = ()) -> None:
    """Save a figure: each row is a tile and its mask, then each flip and its mask; ``bands``: the tiles' bands
    (the ``bands`` key), as training reads them, of which those at ``shown`` (shown_channels) are shown; masks
    as classes: farmland white, background black, unlabelled grey."""
    columns = 2 + 2 * len(FLIPS)
    fig, axes = subplots(len(samples), columns, figsize=(1.8 * columns, 1.9 * len(samples)), squeeze=False)
    for ax_row, (tile, image, mask, flips) in zip(axes, samples):
        panels = [("original", photo_to_show(image, tile, bands, shown)), ("mask", mask)]
        for name, (flipped, flipped_mask) in flips.items():
            panels += [(name, photo_to_show(flipped, tile, bands, shown)), (f"{name} mask", flipped_mask)]
        for ax, (title, array) in zip(ax_row, panels):
            if title.endswith("mask"):  # on a fixed scale: scaled to its own values, one all farmland was black
                ax.imshow(np.where(array == IGNORE, 0.5, array), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(array, cmap="gray")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    save_figure(fig, path)


def write_flips(
    image_path: Path, image: np.ndarray, mask: np.ndarray, out_dir: Path, mask_suffix: str
) -> tuple[list[tuple[Path, Path]], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Write a tile's flipped copies under ``out_dir``; return their (image, mask) paths and the flipped arrays."""
    added, flips = [], {}
    for flip, axis in FLIPS.items():
        image_name, mask_name = copy_names(image_path, flip, mask_suffix, image, mask)
        flipped, flipped_mask = np.flip(image, axis), np.flip(mask, axis)
        # Masks are kept as read (0/255 or 0/1); image arrays keep their bit depth.
        write_image(
            out_dir / "images" / image_name,
            np.ascontiguousarray(flipped.squeeze(2) if flipped.shape[2] == 1 else flipped),
        )
        write_image(out_dir / "labels" / mask_name, np.ascontiguousarray(flipped_mask[:, :, 0]))
        added.append((out_dir / "images" / image_name, out_dir / "labels" / mask_name))
        flips[flip] = (flipped, flipped_mask)
    return added, flips


def preview_sample(
    image_path: Path, mask_path: Path, image: np.ndarray, mask: np.ndarray, flips: dict, cfg: Config
) -> Sample:
    """A tile and its flips for the preview, masks drawn as classes.

    Raises:
        DataError: the mask cannot be read as classes with the split's ``mask_threshold`` and ``ignore_index``.
    """
    classes = mask_to_classes(mask, mask_path, cfg.mask_threshold, cfg.ignore_index)
    shown_flips = {flip: (flipped, np.flip(classes, FLIPS[flip])) for flip, (flipped, _) in flips.items()}
    return image_path, image, classes, shown_flips


def main(argv: Sequence[str] | None = None) -> int:
    """Flip the chosen training tiles, write the copies and extend train.txt."""
    cfg = cli.parse_args(argv, __doc__ or "")
    cli.check_fraction(cfg, "aug_prob")  # taken as 1 or 0 without a word
    cli.check_paths(cfg)
    cli.setup_logging(cfg, "augment")
    bands = parse_bands(cfg.bands)
    shown = shown_channels(cfg.rgb_bands, bands, cfg.in_channels)
    cli.save_config(cfg, "augment")
    run_dir = Path(cfg.run_dir)
    out_dir = (run_dir / "augmented").resolve()
    originals = original_training_pairs(run_dir)
    chosen = choose_tiles(len(originals), cfg.aug_prob, cfg.seed)
    added: list[tuple[Path, Path]] = []
    samples: list[Sample] = []
    failures = 0
    unreadable_preview = False  # a mask the preview could not read as classes was warned of
    for index in cli.progress(chosen, "flipping", "tile", LOG):
        image_path, mask_path = originals[index]
        try:
            image, mask = read_image(image_path, nodata_as_zero=True), read_mask(mask_path)
        except DataError as err:
            LOG.error("%s", err)
            failures += 1
            continue
        copies, flips = write_flips(image_path, image, mask, out_dir, cfg.mask_suffix)
        added += copies
        if len(samples) < cfg.preview_count:
            try:
                samples.append(preview_sample(image_path, mask_path, image, mask, flips, cfg))
            except DataError as err:  # flipped as read all the same: the values only matter to the preview
                if not unreadable_preview:
                    LOG.warning(
                        "%s. Flipped all the same, but left out of the preview, which draws masks as classes: pass "
                        "augment.py the --mask_threshold and --ignore_index the split was made with",
                        err,
                    )
                unreadable_preview = True
    write_pair_list(run_dir / "splits" / "train.txt", originals + added)
    if samples:
        preview(samples, run_dir / "figures" / "augment_preview.png", bands, shown)
    LOG.info(
        "%d of %d training tiles flipped: train.txt now lists %d tiles (%d originals + %d copies in %s)",
        len(chosen) - failures,
        len(originals),
        len(originals) + len(added),
        len(originals),
        len(added),
        out_dir,
    )
    if failures:
        LOG.error("%d tile(s) could not be read and were not augmented; see the messages above", failures)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
