"""Pair every image with its mask, check each pair, and split them into train / val / test (8:1:1).

Inputs: data_dir/image_subdir/<stem>.<png|jpg|tif...> and data_dir/label_subdir/<stem><mask_suffix>.png.
Outputs (all under run_dir/splits; the data folder is only read):
- train.txt, val.txt, test.txt: one ``image<TAB>mask`` pair of absolute paths per line;
- rejected.csv: every file left out and why (unusable pair, quality filter, orphan image or mask);
- summary.json: the counts and each split's farmland share.
Unusable pairs (unreadable, sizes differ, mask values not 0/255 or 0/1, wrong band count) are reported
one by one, the rest are still split, and the exit status is 1 so that a pipeline stops to look.
The split is reproducible: the same files and seed give the same lists. With ``stratify`` (the default) the
seeded shuffle is drawn again until val and test each hold about the whole set's farmland share, so that
the threshold and the best epoch are not chosen on scenes without farmland, nor scored on them.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import logging
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np

import cli
import files
from config import Config
from data_preprocess import (
    FEW_SCENES,
    FULL_SCALE,
    SPLIT_NAMES,
    TILED_NAMES,
    DataError,
    check_tile_values,
    exif_turned,
    farmland_pixels,
    flipped_copies,
    image_entries,
    image_to_float,
    is_image_file,
    list_images,
    mask_to_classes,
    parse_bands,
    parse_bands_for,
    quiet_gdal,
    read_image,
    read_mask,
    read_pair_list,
    scene_groups,
    select_bands,
    write_pair_list,
)
from rasters import declared_nodata, nodata_pixels

LOG = logging.getLogger("split_dataset")


@dataclass
class Scan:
    """What was found in the image and label folders."""

    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    rejected: list[tuple[Path, str, str]] = field(default_factory=list)  # (file, kind, reason)


FOLDERS_SHOWN = 8  # sub-folders of data_dir named when the one expected is not there
CONTENT = {"image_subdir": "images", "label_subdir": "masks"}  # what each folder key names


def what_is_there(folder: Path, key: str) -> str:
    """What the folder above a missing image or mask folder holds, for its error: the folder names to choose from
    (a data set's own image/ and label/, say), or that it does not exist or holds the images itself."""
    parent = folder.parent
    if not parent.is_dir():
        return f"; {parent} does not exist either: check --data_dir"
    found = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    if found:
        shown = ", ".join(found[:FOLDERS_SHOWN]) + (", ..." if len(found) > FOLDERS_SHOWN else "")
        return f"; {parent} holds the folder(s) {shown}: name the one with the {CONTENT[key]} as --{key}=NAME"
    if list_images(parent):
        return (
            f"; {parent} holds images itself and no folders: point --data_dir at the folder above it, or, with masks "
            "beside the images, give --image_subdir=. --label_subdir=. and --mask_suffix"
        )
    return f"; {parent} holds no folders"


def nested_image_folders(folder: Path, other: Path) -> list[tuple[Path, int]]:
    """The sub-folders of ``folder``, at any depth, that hold image files, each with their count; hidden folders
    and ``other`` (the other of the image and mask folders, which may lie inside this one) are passed over.
    Tiles are read from the image and mask folders themselves only, so the images of these are never read."""
    folder, other = Path(folder), Path(other).resolve()
    found = []
    for top, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and Path(top, d).resolve() != other)
        if Path(top) != folder and (count := sum(is_image_file(Path(top, name)) for name in names)):
            found.append((Path(top), count))
    return found


def find_pairs(image_dir: Path, label_dir: Path, mask_suffix: str) -> Scan:
    """Pair images with masks by stem: a.png goes with a<mask_suffix>.png (extensions in any case).

    Non-image files (Thumbs.db, .DS_Store, ...) are ignored; images without a mask and masks without an
    image are recorded as orphans; two images or two masks with the same stem are recorded as ambiguous.
    Entries named as images that are not files (a link to nothing, a folder a.png) pair as files do, and
    check_pair reports them by name. One folder may hold both, told apart by the suffix.

    Raises:
        DataError: a folder is missing, or one folder holds both and the suffix is empty.
    """
    for folder, key in ((image_dir, "image_subdir"), (label_dir, "label_subdir")):
        if not folder.is_dir():
            raise DataError(
                f"{folder}: folder not found; expected data_dir/{folder.name} holding the {CONTENT[key]} "
                f"(set --data_dir or --{key}){what_is_there(folder, key)}"
            )
    # Images and masks side by side in one folder (a.jpg beside a_label.png): the suffix alone tells them apart,
    # so a file without it is an image there, not a misnamed mask, and a mask is not an image without a mask.
    shared = image_dir.resolve() == label_dir.resolve()
    if shared and not mask_suffix:
        raise DataError(
            f"{image_dir}: holds both images and masks (--image_subdir and --label_subdir name the same folder), "
            "so masks need a suffix that tells them from their images: set --mask_suffix (--mask_suffix=_label for "
            "a_label.png beside a.png), or put the masks in a folder of their own and name it with --label_subdir"
        )
    scan = Scan()
    masks: dict[str, list[Path]] = {}
    misnamed: list[Path] = []
    for path in image_entries(label_dir):
        if problem := files.name_problem(path):
            scan.rejected.append((Path(files.shown_path(path)), "error", problem))
        elif path.stem.endswith(mask_suffix):
            # An empty suffix pairs labels/a.png with images/a.png.
            masks.setdefault(path.stem[: len(path.stem) - len(mask_suffix)], []).append(path)
        elif not shared:
            misnamed.append(path)
    images: dict[str, list[Path]] = {}
    for path in image_entries(image_dir):
        if shared and path.stem.endswith(mask_suffix):
            continue  # a mask, paired above
        if problem := files.name_problem(path):
            if not shared:  # in a shared folder the mask loop above reported it already
                scan.rejected.append((Path(files.shown_path(path)), "error", problem))
        else:
            images.setdefault(path.stem, []).append(path)
    for path in misnamed:
        reason = f"mask name does not end in '{mask_suffix}' before the extension"
        if path.stem in images:  # before any shorter stem: labels/10.png is 10.png's mask, not 1.png's with "0"
            reason += "; if masks are named as their images, pass --mask_suffix= (empty)"
        elif suffix := suffix_after_image(path.stem, images):
            image = path.stem[: len(path.stem) - len(suffix)]
            if mask_suffix and suffix.startswith(mask_suffix) and image in masks:
                # "a_mask (copy).png" beside a_mask.png: a second file of a's mask, not another naming rule
                reason += f"; it looks like another copy of {image}'s mask {image}{mask_suffix}: left out, not paired"
            else:
                reason += f"; if masks are named <image name>{suffix}, pass --mask_suffix={suffix}"
        scan.rejected.append((path, "orphan", reason))
    lone_images = sorted(stem for stem in images if stem not in masks)
    for stem in sorted(set(images) | set(masks)):
        found_images, found_masks = images.get(stem, []), masks.get(stem, [])
        if len(found_images) > 1 or len(found_masks) > 1:
            reason = several_of_a_stem(stem, found_images, found_masks, mask_suffix)
            scan.rejected.extend((path, "error", reason) for path in found_images + found_masks)
        elif not found_masks:
            scan.rejected.append((found_images[0], "orphan", f"no mask {stem}{mask_suffix}.png in {label_dir}"))
        elif not found_images:
            reason = f"no image {stem}.png/.jpg/.tif in {image_dir}"
            if extra := suffix_after_mask(stem, lone_images):
                image = images[f"{stem}{extra}"][0]
                reason += (
                    f"; the image {image.name} has no mask of its own and is named as this mask's image with "
                    f"'{extra}' added (DeepGlobe's <id>_sat.jpg beside <id>_mask.png, say): tiles pair with masks "
                    f"by name alone, so rename the images without '{extra}' ({stem}{image.suffix})"
                )
            scan.rejected.append((found_masks[0], "orphan", reason))
        else:
            scan.pairs.append((found_images[0], found_masks[0]))
    folders = {image_dir: ("image_subdir", label_dir), label_dir: ("label_subdir", image_dir)}
    for top, (key, other) in folders.items():
        for folder, count in nested_image_folders(top, other):
            reason = (
                f"a sub-folder of {top} holding {count} image file(s), none of them read: tiles and masks are read "
                f"from {top} itself, not from its sub-folders; move them up into {top}, or name this folder "
                f"with --{key}"
            )
            scan.rejected.append((folder, "orphan", reason))
    return scan


def several_of_a_stem(stem: str, images: Sequence[Path], masks: Sequence[Path], mask_suffix: str) -> str:
    """The error of a name with several images or several masks (a.tif and a.png: files are paired by name, whatever
    the extension), naming each file with its folder and what to do."""
    found = []
    for kind, paths, name in (("images", images, stem), ("masks", masks, f"{stem}{mask_suffix}")):
        if len(paths) > 1:
            found.append(f"{len(paths)} {kind} named {name} in {paths[0].parent} ({', '.join(p.name for p in paths)})")
    return (
        f"{' and '.join(found)}; expected one image and one mask of each name, whatever their extensions; keep one "
        "and move the others out of the folder (a mask converted to PNG beside its original, say), or rename them"
    )


def suffix_after_image(mask_stem: str, images: Collection[str]) -> str:
    """What follows the longest image stem that begins ``mask_stem`` ("_label" for a_label beside image a);
    empty when no image stem begins it."""
    for end in range(len(mask_stem) - 1, 0, -1):
        if mask_stem[:end] in images:
            return mask_stem[end:]
    return ""


def suffix_after_mask(mask_base: str, lone_images: Sequence[str]) -> str:
    """What an image stem without a mask adds after ``mask_base``, the name a mask gives its image ("_sat" for
    image 1_sat beside mask 1_mask); empty when no such image stem begins ``mask_base`` and then a separator
    (_ - . or space), so that image t10 is not taken for t1's. ``lone_images`` is sorted: the stems that begin
    ``mask_base`` follow one another from where it would sort, so a set of orphans is not searched once per mask."""
    for index in range(bisect.bisect_left(lone_images, mask_base), len(lone_images)):
        stem = lone_images[index]
        if not stem.startswith(mask_base):
            break
        if stem[len(mask_base) : len(mask_base) + 1] in ("_", "-", ".", " "):
            return stem[len(mask_base) :]
    return ""


MIXED_SCALE_LIMIT = 4.0  # tiles of two pixel types whose typical values lie this many times apart are two products


def value_level(image: np.ndarray, nodata: np.ndarray) -> float:
    """The median over bands of an (H, W, C) image's band means over its pixels with data (``nodata`` False),
    scaled to [0, 1] as training scales it (8-bit / 255, 16-bit / 65535); NaN without such pixels."""
    data = image[~nodata]
    if not data.size:
        return math.nan
    return float(np.median(data.mean(axis=0, dtype=np.float64))) / FULL_SCALE.get(str(image.dtype), 1.0)


def check_pair(
    image_path: Path, mask_path: Path, cfg: Config
) -> tuple[str, str] | tuple[int, int, int, int, str, float]:
    """Check one pair; return its (height, width, farmland pixels, labelled pixels, pixel type, value level
    (value_level)) if usable, else (kind, reason), kind 'error' or 'filtered'."""
    try:
        image = select_bands(read_image(image_path, nodata_as_zero=True), parse_bands(cfg.bands), image_path)
        # Band count and pixel type; the value range of float tiles, whose every pixel is checked.
        image_to_float(image if np.issubdtype(image.dtype, np.floating) else image[:1, :1], cfg.in_channels, image_path)
        check_tile_values(image, image_path)
        mask = mask_to_classes(read_mask(mask_path), mask_path, cfg.mask_threshold, cfg.ignore_index)
    except DataError as err:
        return "error", str(err)
    if image.shape[:2] != mask.shape:
        return "error", (
            f"{image_path}: image is {image.shape[1]}x{image.shape[0]} pixels but its mask {mask_path.name} is "
            f"{mask.shape[1]}x{mask.shape[0]}; they must be the same size"
        )
    # All bands 0, or the value a TIFF tile declares as nodata (65535 around a 16-bit tile, say), as scenes count it.
    with quiet_gdal():  # libtiff's notes on a B,G,R,NIR tile's tags, once a tile
        declared = declared_nodata(image_path)
    empty = nodata_pixels(image, declared, axis=2)
    # An RGBA PNG loses its alpha (match_bands); its transparent pixels, often white, are nodata all the same.
    transparent = image.shape[2] == 4 and cfg.in_channels == 3 and image_path.suffix.lower() == ".png"
    nodata = float((empty | (image[:, :, 3] == 0) if transparent else empty).mean())
    if nodata > cfg.max_nodata_fraction:
        what = "all bands 0" + (f" or the declared nodata {declared:g}" if declared not in (None, 0) else "")
        return (
            "filtered",
            f"{nodata:.0%} of pixels are nodata ({what}{', or transparent' if transparent else ''}) > "
            f"max_nodata_fraction={cfg.max_nodata_fraction}",
        )
    return image.shape[0], image.shape[1], *farmland_pixels(mask), str(image.dtype), value_level(image, empty)


def split_counts(n: int, ratios: Sequence[float]) -> list[int]:
    """How many items go to train, val and test: val and test rounded, at least one each when n >= 3, and train
    never empty (rounding up a few items, or scenes, could take them all)."""
    counts = [0, 0, 0]
    for i in (1, 2):
        counts[i] = int(round(n * ratios[i]))
        if ratios[i] > 0 and counts[i] == 0 and n >= 3:
            counts[i] = 1
    counts[0] = n - counts[1] - counts[2]
    while counts[0] < 1 and counts[1] + counts[2] > 0:
        larger = 1 if counts[1] >= counts[2] else 2
        counts[larger] -= 1
        counts[0] += 1
    return counts


def check_ratios(ratios: Sequence[float]) -> None:
    """Raises ValueError unless the ratios are three finite non-negative numbers summing to 1 with train > 0."""
    # Written as what is valid: nan fails every comparison, so a test for what is invalid let nan,0.5,0.5 through.
    valid = (
        len(ratios) == 3
        and all(math.isfinite(r) and r >= 0 for r in ratios)
        and ratios[0] > 0
        and abs(sum(ratios) - 1.0) <= 1e-6
    )
    if not valid:
        raise ValueError(
            f"split_ratios={','.join(str(r) for r in ratios)}: expected three non-negative fractions for "
            "train, val and test that sum to 1, for example --split_ratios=0.8,0.1,0.1"
        )


BALANCE_TOLERANCE = 0.25  # val's and test's farmland share within this fraction of the rarer class's share
BALANCE_TRIES = 2000  # shuffles drawn before the closest one is taken


def imbalance(order: np.ndarray, counts: Sequence[int], farmland: np.ndarray, labelled: np.ndarray) -> float:
    """How far val's or test's farmland share lies from the whole set's, in units of the rarer class's share.

    Args:
        order: the groups in shuffled order, cut by ``counts`` into train, val and test.
        farmland, labelled: per group, its farmland pixels and its labelled pixels.
    """
    if labelled.sum() == 0:
        return 0.0
    overall = farmland.sum() / labelled.sum()
    scale = min(overall, 1.0 - overall)
    parts = np.split(order, np.cumsum(counts)[:2])[1:]
    gaps = [abs(farmland[part].sum() / labelled[part].sum() - overall) for part in parts if labelled[part].sum()]
    return max(gaps, default=0.0) / scale if scale > 0 else 0.0


def balanced_order(
    counts: Sequence[int], seed: int, farmland: np.ndarray | None = None, labelled: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """A seeded shuffle of the groups and its imbalance (0 without ``farmland``).

    With ``farmland`` and ``labelled`` pixels per group, shuffles are drawn until one is within BALANCE_TOLERANCE
    (the first draw is the plain shuffle, kept when it already is), else the closest of BALANCE_TRIES (all
    draws, the first included) is taken.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(sum(counts))
    if farmland is None or labelled is None:
        return order, 0.0
    best, best_gap = order, imbalance(order, counts, farmland, labelled)
    for _ in range(BALANCE_TRIES - 1):
        if best_gap <= BALANCE_TOLERANCE:
            break
        order = rng.permutation(sum(counts))
        gap = imbalance(order, counts, farmland, labelled)
        if gap < best_gap:
            best, best_gap = order, gap
    return best, best_gap


def split_pairs(
    pairs: Sequence[tuple[Path, Path]],
    ratios: Sequence[float],
    seed: int,
    groups: Sequence[str] | None = None,
    pixels: Sequence[tuple[int, int]] | None = None,
) -> dict[str, list[tuple[Path, Path]]]:
    """Shuffle the groups (sorted first, so the folder's listing order does not matter) and cut them by ratio.

    Without ``groups`` every pair is a group of its own. With them, the ratios apply to groups (scenes),
    and all pairs of a group land in the same split. With ``pixels`` (each pair's farmland and labelled pixels)
    the shuffle is one whose val and test splits hold about the whole set's farmland share (balanced_order).
    """
    check_ratios(ratios)
    keys = list(groups) if groups is not None else [p[0].name for p in pairs]
    members: dict[str, list[tuple[Path, Path]]] = {}
    for key, pair in zip(keys, pairs):
        members.setdefault(key, []).append(pair)
    ordered = sorted(members)
    counts = split_counts(len(ordered), ratios)
    farmland = labelled = None
    if pixels is not None:
        pixels_of = dict(zip(pairs, pixels))
        sums = np.array([np.sum([pixels_of[p] for p in members[k]], axis=0) for k in ordered]).reshape(-1, 2)
        farmland, labelled = sums[:, 0], sums[:, 1]
    order, gap = balanced_order(counts, seed, farmland, labelled)
    if gap > BALANCE_TOLERANCE:
        LOG.warning(
            "no split of these %d %s gives val and test about the whole set's farmland share (closest: off by "
            "%.0f%% of the rarer class's share); the split below is the closest found. More scenes, or larger "
            "--split_ratios for val and test, balance it better",
            len(ordered),
            "scenes" if len(ordered) < len(pairs) else "tiles",
            100 * gap,
        )
    shuffled = [ordered[i] for i in order]
    n_train, n_val, _ = counts
    parts = {
        "train": shuffled[:n_train],
        "val": shuffled[n_train : n_train + n_val],
        "test": shuffled[n_train + n_val :],
    }
    return {name: sorted(pair for key in chosen for pair in members[key]) for name, chosen in parts.items()}


def split_share(pixels: Sequence[tuple[int, int]]) -> float | None:
    """The farmland share of a split's labelled pixels (rounded to 4 places); None when none is labelled."""
    farmland, labelled = np.sum(pixels, axis=0) if pixels else (0, 0)
    return round(float(farmland / labelled), 4) if labelled else None


def warn_few_scenes(groups: dict[str, int]) -> None:
    """Warn when the validation or test split holds fewer than FEW_SCENES scenes (``groups``: scenes per split).

    Training picks its best epoch and tunes its threshold on the validation scenes; scenes differ (season,
    light, crops), and on one or two of them both choices can be good there and poor on the others.
    """
    for name, purpose in (("val", "the best epoch and the threshold are chosen on"), ("test", "the scores come from")):
        count = groups.get(name, FEW_SCENES)
        if count == 0:  # not few: none, so that nothing is chosen on it or scored
            LOG.warning(
                "the %s split holds no scene, though %s: its share of --split_ratios gives none of the %d scene(s); "
                "give it a larger share (--split_ratios), tile more scenes (%d or more each for val and test), or "
                "leave --group_pattern out to split by tile",
                name,
                purpose.replace("are chosen on", "are chosen on it").replace("come from", "come from it"),
                sum(groups.values()),
                FEW_SCENES,
            )
        elif count < FEW_SCENES:
            LOG.warning(
                "the %s split holds %d scene(s), which %s: with so few, expect them to differ from scene to "
                "scene; give it %d or more scenes (--split_ratios), or split several ways (compare_recipes.py "
                "--split_seeds) and compare",
                name,
                count,
                purpose,
                FEW_SCENES,
            )


def _check_pairs(scan: Scan, cfg: Config) -> tuple[list[tuple[Path, Path]], dict[tuple[Path, Path], tuple[int, int]]]:
    """Check every pair found; reject the unusable ones into ``scan.rejected``; return (usable, pixels of each)."""
    usable, sizes, pixels_of, levels = [], [], {}, {}
    for image_path, mask_path in cli.progress(scan.pairs, "checking pairs", "pair", LOG):
        result = check_pair(image_path, mask_path, cfg)
        if isinstance(result[0], str):
            scan.rejected.append((image_path, *result))
        else:
            usable.append((image_path, mask_path))
            sizes.append(result[:2])
            pixels_of[(image_path, mask_path)] = (int(result[2]), int(result[3]))
            levels[image_path] = (result[4], result[5])
    _keep_common_size(usable, sizes, scan.rejected)
    warn_exif_turned([image for image, _ in usable])
    warn_mixed_value_scales({image: levels[image] for image, _ in usable})
    return usable, pixels_of


def warn_mixed_value_scales(levels: dict[Path, tuple[str, float]]) -> None:
    """Warn when the tiles come in pixel types whose typical values, scaled as training scales them (8-bit / 255,
    16-bit / 65535), lie more than MIXED_SCALE_LIMIT times apart: 8-bit tiles exported by a labelling tool beside
    16-bit tiles of 10- or 12-bit DN. The network sees the same land at two brightness levels, one of them
    near black, and learns neither well; normalise cannot help, since it scales both alike."""
    by_type: dict[str, list[tuple[Path, float]]] = {}
    for image, (dtype, level) in levels.items():
        if math.isfinite(level) and level > 0:
            by_type.setdefault(dtype, []).append((image, level))
    if len(by_type) < 2:
        return
    typical = {dtype: float(np.median([level for _, level in tiles])) for dtype, tiles in by_type.items()}
    low, high = min(typical, key=typical.get), max(typical, key=typical.get)
    if typical[high] <= MIXED_SCALE_LIMIT * typical[low]:
        return
    kinds = "; ".join(
        f"{len(tiles)} {dtype} (e.g. {tiles[0][0]}), typically {typical[dtype]:.3g} of full scale"
        for dtype, tiles in by_type.items()
    )
    LOG.warning(
        "the tiles come in %d pixel types whose values, scaled as training scales them (8-bit / 255, 16-bit / 65535), "
        "lie %.3g times apart: %s. The network would learn the same land at two brightness levels and predict both "
        "poorly, with or without --normalise. Train on one product: cut every tile from the same scenes with "
        "make_tiles.py (16-bit scenes give 16-bit tiles), or move the %s tiles out of the data folder, then split "
        "again",
        len(by_type),
        typical[high] / typical[low],
        kinds,
        low if len(by_type[low]) < len(by_type[high]) else high,
    )


def warn_exif_turned(images: list[Path]) -> None:
    """Warn of JPEG tiles a viewer shows turned or mirrored (EXIF orientation) while they are read as stored: a
    mask drawn on the turned view does not match them, and a square tile gives no size error to tell."""
    turned = [path for path in images if exif_turned(path)]
    if turned:
        LOG.warning(
            "%d JPEG tile(s) (%s%s) carry an EXIF orientation: image viewers show them turned or mirrored, but they "
            "are read as stored, as GDAL and QGIS read them. If their masks were drawn on the view a viewer shows, "
            "they do not match: save the tiles with the turn applied to their pixels (exiftran -ai, or PIL's "
            "ImageOps.exif_transpose) and split again",
            len(turned),
            ", ".join(str(p) for p in turned[:3]),
            ", ..." if len(turned) > 3 else "",
        )


def _keep_common_size(
    usable: list[tuple[Path, Path]], sizes: list[tuple[int, int]], rejected: list[tuple[Path, str, str]]
) -> None:
    """Move the pairs whose size is not the most common one from ``usable`` to ``rejected``."""
    if not sizes:
        return
    # Training stacks tiles into batches, which needs one tile size: keep the most common one.
    common = Counter(sizes).most_common(1)[0][0]
    pairs = list(usable)
    usable[:] = [pair for pair, size in zip(pairs, sizes) if size == common]  # one pass: sets hold many tiles
    for pair, size in zip(pairs, sizes):
        if size != common:
            reason = (
                f"{pair[0]}: is {size[1]}x{size[0]} pixels but most tiles are {common[1]}x{common[0]}; "
                "training batches need one size: cut it to that size, or predict it with --predict_input"
            )
            rejected.append((pair[0], "error", reason))


def _log_rejected(rejected: Sequence[tuple[Path, str, str]]) -> None:
    """Log each file left out: errors as errors, filtered files and orphans as warnings."""
    for path, kind, reason in rejected:
        said = reason if reason.startswith(f"{path}:") else f"{path}: {reason}"  # the readers' errors name it
        (LOG.error if kind == "error" else LOG.warning)("%s %s", kind, said)


def _scenes_of(usable: Sequence[tuple[Path, Path]], pattern: str) -> list[str]:
    """Each usable pair's scene (scene_groups), warning about the names ``pattern`` does not match."""
    groups, unmatched = scene_groups(usable, pattern)
    if not pattern and len(usable) > 1:
        scenes, left = scene_groups(usable, TILED_NAMES)
        if not left and 1 < len(set(scenes)) < len(scenes):  # some scene of several tiles, and more than one scene
            LOG.info(
                "the %d tile names all read <scene>_r<row>c<col>, from %d scenes, but no --group_pattern is given: "
                "tiles are split one by one, so val and test tiles neighbour training tiles of their scene and score "
                "higher than new scenes would; --group_pattern=%s keeps each scene in one split",
                len(usable),
                len(set(scenes)),
                files.shell_quoted(TILED_NAMES),
            )
    if pattern and len(usable) > 1 and len(set(groups)) == 1:
        raise ValueError(
            f"--group_pattern={files.shell_quoted(pattern)} puts all {len(usable)} tiles in one scene "
            f"({groups[0]!r}), which leaves no scene for val and test. If the tiles all come from that one scene, "
            "tile more scenes (3 or more give val and test scenes of their own), or leave --group_pattern out to "
            "split by tile (val and test tiles then neighbour training tiles, and score higher than new scenes "
            "would); if not, the pattern's first group must name each tile's scene: for tiles named "
            f"<scene>_r<row>c<col>, --group_pattern={files.shell_quoted(TILED_NAMES)}"
        )
    if unmatched:
        LOG.warning(
            "%d of %d tile names do not match --group_pattern=%s; each of those is split as a scene of its own",
            unmatched,
            len(usable),
            files.shell_quoted(pattern),
        )
    return groups


def _write_rejected(path: Path, rejected: Sequence[tuple[Path, str, str]]) -> None:
    """Write rejected.csv: one (file, kind, reason) row per file left out."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "kind", "reason"])
    writer.writerows((str(p), k, r) for p, k, r in rejected)
    files.atomic_write_csv(path, buffer.getvalue())


def _summary(
    splits: dict[str, list[tuple[Path, Path]]],
    rejected: Sequence[tuple[Path, str, str]],
    pixels_of: dict[tuple[Path, Path], tuple[int, int]],
    group_of: dict[tuple[Path, Path], str] | None,
) -> dict[str, Any]:
    """summary.json's content: pairs (and scenes, given ``group_of``) per split, farmland shares, rejections."""
    kinds = [k for _, k, _ in rejected]
    summary: dict[str, Any] = {name: len(splits[name]) for name in SPLIT_NAMES}
    if group_of is not None:
        summary["groups"] = {name: len({group_of[p] for p in splits[name]}) for name in SPLIT_NAMES}
    summary["farmland_share"] = {name: split_share([pixels_of[p] for p in splits[name]]) for name in SPLIT_NAMES}
    summary.update(
        {"errors": kinds.count("error"), "filtered": kinds.count("filtered"), "orphans": kinds.count("orphan")}
    )
    return summary


def _log_summary(summary: dict[str, Any], n_usable: int, rejected_path: Path, ignore_index: int = -1) -> None:
    """Log the farmland shares and the split counts."""
    LOG.info("farmland share of the pixels: %s", ", ".join(f"{k} {v}" for k, v in summary["farmland_share"].items()))
    if n_usable and not any(summary["farmland_share"].values()):
        cause = (
            f" --ignore_index={ignore_index} makes every pixel of value {ignore_index} unlabelled, which in "
            f"0/{ignore_index} masks is all the farmland: leave --ignore_index out unless another value marks "
            "unlabelled pixels."
            if ignore_index in (1, 255, 65535)
            else ""
        )
        LOG.warning(
            "no mask holds any farmland: a network trained on these learns to call everything background.%s Check "
            "that farmland is 255 (or 1) in the masks and, if --mask_threshold is set, that farmland reaches it",
            cause,
        )
    LOG.info(
        "split %d pairs: train %d, val %d, test %d | files left out: unusable %d, filtered %d, orphans %d (see %s)",
        n_usable,
        summary["train"],
        summary["val"],
        summary["test"],
        summary["errors"],
        summary["filtered"],
        summary["orphans"],
        rejected_path,
    )


def warn_no_farmland(
    splits: dict[str, list[tuple[Path, Path]]], pixels_of: dict[tuple[Path, Path], tuple[int, int]], stratify: bool
) -> None:
    """Warn when the val or test split holds tiles but not one farmland pixel, while the set holds some
    (``pixels_of``: each pair's farmland and labelled pixels): no epoch or threshold can be chosen on such a val
    split, and a test split without farmland scores a farmland IoU of 0 whenever the network calls any;
    ``stratify``: whether the split was balanced already (then only another seed or share is offered)."""
    if not any(pixels_of[p][0] for pairs in splits.values() for p in pairs):
        return  # no farmland anywhere: warned of as such
    purposes = {
        "val": "training cannot choose its best epoch or tune its threshold on it (it keeps the last epoch at 0.5)",
        "test": "its farmland IoU is 0 wherever the network calls any farmland, whatever the network has learned",
    }
    for name, purpose in purposes.items():
        if splits[name] and not any(pixels_of[p][0] for p in splits[name]):
            LOG.warning(
                "the %s split holds no farmland in its %d tile(s), though the set holds some: %s. Draw another "
                "split (--seed=N%s), or give %s a larger share (--split_ratios)",
                name,
                len(splits[name]),
                purpose,
                "" if stratify else "; --stratify=true balances farmland across the splits where the scenes allow it",
                name,
            )


def warn_replaced_splits(run_dir: Path, splits: dict[str, list[tuple[Path, Path]]]) -> None:
    """Before the lists of an earlier split in ``run_dir`` are replaced: warn when they held augment.py's flipped
    copies, which the new training list leaves out, and when the split changed under a model already trained."""
    earlier: dict[str, list[tuple[Path, Path]]] = {}
    for name in SPLIT_NAMES:
        try:
            earlier[name] = read_pair_list(run_dir / "splits" / f"{name}.txt")
        except DataError:  # no earlier split, or one that cannot be read: nothing to compare
            return
    copies = flipped_copies(earlier["train"], run_dir)
    if copies:
        LOG.warning(
            "the new train.txt leaves out the %d flipped copies that augment.py added under %s: run augment.py again "
            "to add them",
            len(copies),
            (run_dir / "augmented").resolve(),
        )
    own = {name: {p for p in earlier[name] if p not in copies} for name in SPLIT_NAMES}
    changed = [name for name in SPLIT_NAMES if own[name] != {(i.resolve(), m.resolve()) for i, m in splits[name]}]
    trained = [p for p in (run_dir / "checkpoints" / n for n in ("best.pth", "last.pth")) if p.is_file()]
    if changed and trained:
        LOG.warning(
            "the %s split(s) changed, but %s was trained on the earlier split: some of the new test tiles may be "
            "tiles it learned from, and its scores would flatter it. Train again (without --resume) before "
            "predict.py and miou.py, or split into a new --run_dir",
            ", ".join(changed),
            trained[0],
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Scan, check and split the data set; write the lists and the report under run_dir/splits."""
    cfg = cli.parse_args(argv, __doc__ or "")
    check_ratios(cfg.split_ratios)
    if cfg.ignore_index == 0:
        raise ValueError(
            "--ignore_index=0: 0 is background in every mask, so all background would count in no loss and no "
            "metric; give the value that marks unlabelled pixels (--ignore_index=128), or leave it out"
        )
    cli.check_fraction(cfg, "max_nodata_fraction")  # below 0 every tile was left out as "0% nodata > -0.5"
    parse_bands_for(cfg.bands, cfg.in_channels)
    cli.check_paths(cfg)
    cli.setup_logging(cfg, "split_dataset")
    cli.save_config(cfg, "split_dataset")
    data_dir = Path(cfg.data_dir)
    scan = find_pairs(data_dir / cfg.image_subdir, data_dir / cfg.label_subdir, cfg.mask_suffix)
    usable, pixels_of = _check_pairs(scan, cfg)
    _log_rejected(scan.rejected)
    if not usable:
        raise DataError(
            f"no usable image/mask pairs in {data_dir}: expected {cfg.image_subdir}/<name>.png with "
            f"{cfg.label_subdir}/<name>{cfg.mask_suffix}.png ({len(scan.rejected)} file(s) rejected, listed above); "
            "masks named otherwise need --mask_suffix (--mask_suffix=_label for a_label.png, --mask_suffix= for "
            "masks named as their images), other folders --image_subdir and --label_subdir"
        )
    groups = _scenes_of(usable, cfg.group_pattern)
    pixels = [pixels_of[p] for p in usable] if cfg.stratify else None
    splits = split_pairs(usable, cfg.split_ratios, cfg.seed, groups, pixels)
    out = Path(cfg.run_dir) / "splits"
    warn_replaced_splits(Path(cfg.run_dir), splits)
    # An earlier split's lists go first: a split stopped between its lists (kill -9, a power cut) would otherwise
    # leave the new train.txt beside the old test.txt, sharing tiles, and training would go on unwarned. A list
    # missing is refused by the next script, naming the file.
    for name in (*(f"{n}.txt" for n in SPLIT_NAMES), "rejected.csv", "summary.json"):
        (out / name).unlink(missing_ok=True)
    for name in SPLIT_NAMES:
        write_pair_list(out / f"{name}.txt", splits[name])
    _write_rejected(out / "rejected.csv", scan.rejected)
    summary = _summary(splits, scan.rejected, pixels_of, dict(zip(usable, groups)) if cfg.group_pattern else None)
    files.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    warn_few_scenes(summary.get("groups", {}))
    _log_summary(summary, len(usable), out / "rejected.csv", cfg.ignore_index)
    warn_no_farmland(splits, pixels_of, cfg.stratify)
    if summary["errors"]:
        LOG.error("%d file(s) are unusable and were left out; fix them (messages above) and re-run", summary["errors"])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
