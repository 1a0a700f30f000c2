"""Reading images and masks, and the training Dataset.

What happens to each kind of image (C = bands in the file, ``in_channels`` from config):
- 8-bit images are scaled to [0, 1] by 1/255, 16-bit images by 1/65535 (so 12-bit sensor data looks dark,
  which the network learns around; convert to 8-bit first if you prefer). Float images are taken as reflectance
  in [0, 1]: values up to REFLECTANCE_SLACK outside it are clipped into it, further out refused.
- A TIFF image's pixels whose bands all hold its declared nodata value (65535, -9999) read as 0, the nodata.
- Grayscale (C = 1) with ``in_channels`` = 3 is repeated into three equal bands.
- RGBA PNGs (C = 4) with ``in_channels`` = 3 lose their alpha band. TIFFs are read through GDAL, every band
  in file order (for example B, G, R, NIR), whatever their sample layout or photometric tag; a 4-band TIFF
  needs ``in_channels=4`` or three of its bands picked with ``bands``.
- Any other band count that differs from ``in_channels`` is an error naming the file.
Masks hold 255 (or 1) for farmland and 0 for background; they become class indices 1 and 0. With
``ignore_index`` set, mask pixels of that value (unlabelled) become IGNORE, which losses and metrics skip.
Paths may contain spaces and non-ASCII (for example Chinese) characters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Iterator, NoReturn, Sequence

import cv2
import numpy as np
import rasterio
import torch
from rasterio import MemoryFile
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window
from torch.utils.data import Dataset, Sampler

from cli import FALSE_WORDS, TRUE_WORDS
from files import DataError, atomic_write_bytes, atomic_write_text, shell_quoted
from png_text import SIGNATURE as PNG_SIGNATURE
from png_text import with_text
from rasters import RASTER_SUFFIXES, REFLECTANCE_SLACK
from runtime import available_memory

__all__ = ["DataError"]  # re-exported: scripts name input errors from here, with the readers

IGNORE = 255  # class index of unlabelled pixels in decoded masks (never a real class: n_classes < 255)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TIFF_EXTENSIONS = (".tif", ".tiff")  # decoded by GDAL (decode_tiff), the others by OpenCV
GDAL_LOGGERS = ("rasterio._env", "rasterio._err")  # where rasterio passes GDAL's own messages on
MAX_TILE_BYTES_UNKNOWN_MEMORY = 4 * 2**30  # largest decoded tile where the free memory cannot be read
DECODING = threading.local()  # .active while this thread decodes or encodes a tile (quiet_gdal)


def is_image_file(path: Path) -> bool:
    """Say whether a path has one of the image extensions (any letter case), hidden files excluded."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """The image files of a folder (not of its sub-folders), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and is_image_file(p))


def image_entries(folder: Path) -> list[Path]:
    """Every entry of a folder named as an image, sorted by name: its image files, and also what only looks like
    one (a link whose target is gone, a folder called a.png), which read_image refuses by name rather than the
    entry being passed over while ``ls`` shows it."""
    return sorted(p for p in Path(folder).iterdir() if is_image_file(p))


def entry_problem(path: Path) -> str | None:
    """The error for what stands where an image file was expected: a folder, or a link whose target is gone;
    None for a file (or for nothing at all, which reading reports)."""
    if path.is_dir():
        return (
            f"{path}: a folder, not an image file; move it out of {path.parent}, or rename it without an image "
            "extension"
        )
    if path.is_symlink() and not path.exists():
        return (
            f"{path}: a link to {os.readlink(path)}, which does not exist; copy the image itself in place of the "
            "link (or mount the drive it points to), or remove the link"
        )
    return None


EXIF_ORIENTATION = 0x0112  # the EXIF tag a camera or phone sets instead of turning the pixels


def exif_turned(path: Path) -> bool:
    """Whether a JPEG carries an EXIF orientation other than "as stored" (2 to 8: mirrored or turned), which
    image viewers apply and this tool, as GDAL and QGIS, does not."""
    if Path(path).suffix.lower() not in (".jpg", ".jpeg"):
        return False
    from PIL import Image, UnidentifiedImageError  # matplotlib's own dependency; only JPEG tiles need it

    try:
        with Image.open(path) as image:
            return image.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1)
    except (OSError, UnidentifiedImageError, SyntaxError):  # unreadable: read_image reports it
        return False


def read_image(path: Path, nodata_as_zero: bool = False, palette_as_indices: bool = False) -> np.ndarray:
    """Read an image as (H, W, C) in file band order (RGB, RGBA, RGB+NIR), 8- or 16-bit or float; with
    ``nodata_as_zero`` (images, not masks) a TIFF's pixels of its declared nodata value read as 0, the nodata; with
    ``palette_as_indices`` (masks) a palette TIFF as its indices, not the colours they stand for.

    Raises:
        DataError: the file is missing, unreadable or not an image.
    """
    path = Path(path)
    if problem := entry_problem(path):
        raise DataError(problem)
    try:
        # np.fromfile + imdecode instead of imread: imread cannot open non-ASCII paths on Windows.
        raw = np.fromfile(str(path), dtype=np.uint8)
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror}); check that the file exists") from None
    tiff = raw.size and path.suffix.lower() in TIFF_EXTENSIONS
    image = decode_tiff(raw, path, nodata_as_zero, palette_as_indices) if tiff else None
    if image is None and raw.size:
        image = decode_other(raw, path)  # also a PNG or JPEG saved under a TIFF name
    if image is None:
        what = (
            "an empty file (0 bytes), as a copy cut short leaves"
            if not raw.size
            else "truncated, corrupt or not an image file"
        )
        raise DataError(
            f"{path}: not a readable image ({what}); re-export it as PNG or TIFF, or remove it from the folder"
        )
    return image


def decode_other(raw: np.ndarray, path: Path) -> np.ndarray | None:
    """A PNG, JPEG or BMP as (H, W, C), colour in RGB(A) order; None where OpenCV cannot decode it.

    Raises:
        DataError: the header declares more pixels than OpenCV decodes.
    """
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # a failure is reported, naming the file
    try:
        image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    except cv2.error:  # raised where the header declares more pixels than OpenCV decodes (2**30)
        raise DataError(
            f"{path}: declares a size OpenCV will not decode (over 2**30 pixels, or 2**20 a side); a whole scene "
            "saved as PNG or JPEG goes to predict.py as a GeoTIFF (gdal_translate in.png out.tif), which it reads in "
            "windows; if the file should be small, its header is corrupt: export it again"
        ) from None
    if image is None:
        return None
    if image.ndim == 2:
        return image[:, :, None]
    if image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image


def is_alpha_band(band: np.ndarray) -> bool:
    """Whether a band tagged alpha holds a mask: only 0 (empty) and its type's largest value or 255 (opaque; a
    16-bit or float file's alpha is often 0/255, as gdal_translate -b mask and older gdalwarp write it). GDAL tags
    the fourth band of every 4-band 8-bit TIFF written without PHOTOMETRIC/ALPHA options as alpha, so a B, G, R,
    NIR tile's near-infrared band, a spread of values, is tagged so too: it is kept, not dropped."""
    top = np.iinfo(band.dtype).max if np.issubdtype(band.dtype, np.integer) else 1.0
    return bool(np.isin(band, (0, 255, top)).all())


def decode_tiff(
    raw: np.ndarray, path: Path, nodata_as_zero: bool = False, palette_as_indices: bool = False
) -> np.ndarray | None:
    """A TIFF's bands as (H, W, C) in file order, palette colours expanded to RGB (unless ``palette_as_indices``),
    an alpha band after grey or RGB dropped (is_alpha_band: a band tagged alpha that holds image values is kept);
    None where GDAL cannot read it.

    OpenCV reads a TIFF by its photometric tag: a 3- or 4-band 16-bit TIFF tagged grey (as GDAL writes them)
    comes back as one band of wrong values, and more than 4 bands not at all. GDAL reads every layout.

    Raises:
        DataError: the TIFF declares more pixels than memory holds (a whole scene, or a corrupt header).
    """
    try:
        with quiet_gdal(), MemoryFile(raw.tobytes()) as memory, memory.open(driver="GTiff") as src:
            declared = (path, src.height, src.width, src.count, np.dtype(src.dtypes[0]).itemsize)
            check_tile_size(*declared)
            try:
                bands = src.read()
            except MemoryError:
                raise_too_large(*declared)
            palette = src.count == 1 and src.colorinterp[0] == ColorInterp.palette
            if palette and not palette_as_indices:
                bands = palette_colours(bands[0], src.colormap(1))
            elif src.count in (2, 4) and src.colorinterp[-1] == ColorInterp.alpha and is_alpha_band(bands[-1]):
                # Grey or RGB and alpha (QGIS or gdalwarp -dstalpha exports): the colour, as of an RGBA PNG, not a
                # band to train on; pixels the alpha marks as empty read as all-zero, nodata, as in a scene.
                bands, alpha = bands[:-1], bands[-1]
                bands[:, alpha == 0] = 0
            if nodata_as_zero and not palette:  # a palette's nodata is an index
                declared_nodata_to_zero(bands, src.nodata)
    except RasterioError:
        return None
    return np.ascontiguousarray(bands.transpose(1, 2, 0))


ALPHA_SAMPLE = 256  # rows across a raster's middle whose last band tells an alpha mask from image values (a few blocks)


def colour_band_count(path: Path) -> int:
    """The bands of an image file as the network can be given them: a palette's expanded to red, green and blue,
    and a last band of alpha after grey or RGB left out (an RGBA PNG's; a TIFF's holding a mask, is_alpha_band, as
    QGIS and gdalwarp -dstalpha write it), which never moves the numbers of the bands before it. A raster (a
    GeoTIFF scene) is read by its header and that last band's rows across its middle, not whole. train.py records
    its tiles' count so; prediction compares an input's with it (inference.other_band_count).

    Raises:
        DataError: the file is missing, unreadable or not an image.
    """
    path = Path(path)
    if path.suffix.lower() not in RASTER_SUFFIXES:
        count = int(read_image(path).shape[2])  # OpenCV: a PNG's 2 or 4 channels are grey or RGB and alpha
        return count - 1 if count in (2, 4) else count
    try:
        with quiet_gdal(), rasterio.open(path) as src:
            count, last = src.count, src.colorinterp[-1] if src.count else None
            if count == 1 and last == ColorInterp.palette:
                return 3
            if count in (2, 4) and last == ColorInterp.alpha:
                rows = min(src.height, ALPHA_SAMPLE)
                middle = Window(0, (src.height - rows) // 2, src.width, rows)
                return count - int(is_alpha_band(src.read(count, window=middle)))
            return count
    except RasterioError as err:
        raise DataError(f"{path}: not a readable raster ({err}); export it again as a GeoTIFF") from None


def declared_nodata_to_zero(bands: np.ndarray, nodata: float | None) -> None:
    """Set, in place, the pixels of a (C, H, W) tile whose bands all hold the TIFF's declared nodata value (65535
    around a 16-bit tile, -9999 in a float one; a declared NaN in any band) to 0, the pipeline's nodata: as scenes
    and make_tiles.py count them, so they stay out of the band statistics and the value-scale checks, and no
    nodata value reaches the network as a pixel (65535 as full brightness, NaN) or fails the float [0, 1] check.
    NaN a float tile does not declare is left as it is (check_tile_values names it)."""
    if nodata is None or nodata == 0:
        return
    if math.isnan(nodata):
        bands[:, np.isnan(bands).any(axis=0)] = 0
    else:
        bands[:, (bands == np.float64(nodata)).all(axis=0)] = 0


def check_tile_size(path: Path, height: int, width: int, count: int, itemsize: int) -> None:
    """Refuse a tile whose decoded size would take more than half the memory available (4 GiB where unknown).

    Raises:
        DataError: naming the file, its declared size and what to do with it.
    """
    free = available_memory()
    limit = free // 2 if free is not None else MAX_TILE_BYTES_UNKNOWN_MEMORY
    if height * width * count * itemsize > limit:
        raise_too_large(path, height, width, count, itemsize)


def raise_too_large(path: Path, height: int, width: int, count: int, itemsize: int) -> NoReturn:
    """Raise the error for a tile too large to decode whole."""
    gib = height * width * count * itemsize / 2**30
    raise DataError(
        f"{path}: declares {width} x {height} pixels in {count} band(s), {gib:.1f} GiB decoded, more than this "
        "machine's memory holds as one tile; a whole scene goes to predict.py as it is (read in windows, "
        "docs/scenes.md) or is cut into tiles for training with make_tiles.py; if the file should be small, its "
        "header is corrupt: export it again"
    ) from None


@contextlib.contextmanager
def quiet_gdal() -> Iterator[None]:
    """Decode or encode a tile in memory without GDAL's own notes on it (INFO and WARNING records that name an
    in-memory copy, not the file, and the warning that it has no georeference): read_image reports a tile it
    cannot read by its name. Other threads' records pass."""
    for name in GDAL_LOGGERS:
        logger = logging.getLogger(name)
        if not_while_decoding not in logger.filters:
            logger.addFilter(not_while_decoding)
    DECODING.active = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            yield
    finally:
        DECODING.active = False


def not_while_decoding(record: logging.LogRecord) -> bool:
    """A logging filter: False while this thread decodes or encodes a tile (quiet_gdal)."""
    return not getattr(DECODING, "active", False)


def palette_colours(indices: np.ndarray, colormap: dict[int, tuple[int, ...]]) -> np.ndarray:
    """(3, H, W) uint8 RGB of a palette image's indices."""
    table = np.zeros((max(int(indices.max()), *colormap) + 1, 3), np.uint8)
    for index, colour in colormap.items():
        table[index] = colour[:3]
    return table[indices].transpose(2, 0, 1)


FULL_SCALE = {"uint8": 255.0, "uint16": 65535.0}  # what images of each pixel type are divided by (float: as they are)


def full_scale(dtype: np.dtype | str) -> float | None:
    """What image_to_float divides images of a pixel type by: 255, 65535, 1 for every float type (reflectance in
    [0, 1] already), None for a type it refuses."""
    if str(dtype) in FULL_SCALE:
        return FULL_SCALE[str(dtype)]
    return 1.0 if np.issubdtype(np.dtype(dtype), np.floating) else None


def image_to_float(image: np.ndarray, in_channels: int, path: Path) -> np.ndarray:
    """Convert an (H, W, C) image to float32 (in_channels, H, W) in [0, 1], following the module's rules.

    Raises:
        DataError: the band count or the value range does not fit.
    """
    image = match_bands(image, in_channels, path)
    if str(image.dtype) in FULL_SCALE:
        scaled = image.astype(np.float32) / FULL_SCALE[str(image.dtype)]
    elif np.issubdtype(image.dtype, np.floating):
        scaled = image.astype(np.float32)
        # NaN is left to the callers: a scene's nodata, a tile's fault (check_tile_values).
        low, high = (float(np.nanmin(scaled)), float(np.nanmax(scaled))) if scaled.size else (0.0, 1.0)
        if low < -REFLECTANCE_SLACK or high > 1.0 + REFLECTANCE_SLACK:
            raise DataError(
                f"{path}: floating-point image with values outside [0, 1] "
                f"(found {low:.3g} to {high:.3g}); rescale it to [0, 1] or 8/16 bit"
            )
        if low < 0.0 or high > 1.0:  # reflectance a little outside [0, 1]: clipped, as in scenes and make_tiles.py
            scaled = np.clip(scaled, 0.0, 1.0)
    else:
        raise DataError(unsupported_type_message(image.dtype, Path(path)))
    return np.ascontiguousarray(scaled.transpose(2, 0, 1))


def unsupported_type_message(dtype: np.dtype, path: Path) -> str:
    """What to say of an image of a pixel type the tool does not read (signed, 32-bit): the gdal_translate command
    that converts a copy to the nearest type it reads."""
    target, suffix = ("Byte", "uint8") if np.dtype(dtype).itemsize == 1 else ("UInt16", "uint16")
    top = 255 if target == "Byte" else 65535
    return (
        f"{path}: pixel type {dtype} is not supported; expected 8- or 16-bit unsigned, or float in [0, 1]; convert "
        f"a copy: gdal_translate -ot {target} {shell_quoted(path)} "
        f"{shell_quoted(path.with_name(f'{path.stem}_{suffix}.tif'))} (negative values become 0; add -scale MIN MAX "
        f"0 {top} where values exceed {top})"
    )


def check_tile_values(image: np.ndarray, path: Path) -> None:
    """Refuse a float tile with NaN pixels, which would make the loss NaN (scenes treat NaN as nodata).

    Raises:
        DataError: naming the file and how to fill them.
    """
    if np.issubdtype(image.dtype, np.floating) and np.isnan(image).any():
        raise DataError(
            f"{path}: floating-point image with NaN pixels (nodata?); fill them with 0, which counts as nodata "
            "(max_nodata_fraction), for example with gdal_calc or numpy.nan_to_num, declare NaN the TIFF's nodata "
            f"value (gdal_edit.py -a_nodata nan {shell_quoted(path)}), which reads as 0, or export the tile as 8/16 bit"
        )


def image_for_network(image: np.ndarray, in_channels: int, path: Path) -> np.ndarray:
    """(in_channels, H, W) for the network: 8-bit images stay uint8, to be scaled by 1/255 where they are
    used (a quarter of the bytes to hand between processes and to the GPU); others as image_to_float.

    Raises:
        DataError: the band count or the value range does not fit.
    """
    if image.dtype != np.uint8:
        return image_to_float(image, in_channels, path)
    return np.ascontiguousarray(match_bands(image, in_channels, path).transpose(2, 0, 1))


def match_bands(image: np.ndarray, in_channels: int, path: Path) -> np.ndarray:
    """The (H, W, C) image with in_channels bands: grey repeated to RGB, a PNG's alpha dropped.

    Raises:
        DataError: any other band count than in_channels.
    """
    bands = image.shape[2]
    if bands != in_channels:
        if bands == 1 and in_channels == 3:
            image = np.repeat(image, 3, axis=2)
        elif bands == 4 and in_channels == 3 and Path(path).suffix.lower() == ".png":
            image = image[:, :, :3]
        else:
            raise DataError(
                f"{path}: has {bands} band(s), expected in_channels={in_channels}; set --in_channels={bands} "
                + (
                    f"for this data, pick {in_channels} of its bands with --bands (e.g. --bands="
                    f"{','.join(str(b) for b in range(1, in_channels + 1))}), or convert it"
                    if bands > in_channels
                    else "for this data, or convert it"
                )
            )
    return image


def trained_bands(image: np.ndarray, in_channels: int, path: Path) -> np.ndarray:
    """match_bands for a network already trained (prediction, export), whose band count the checkpoint or the
    exported model fixes: a file of another band count is refused with the fixes open there (pick bands, or a
    model of the file's band count), not training's ``--in_channels``.

    Raises:
        DataError: a band count the network cannot take.
    """
    try:
        return match_bands(image, in_channels, path)
    except DataError:
        bands = image.shape[2]
        example = ",".join(str(b) for b in range(1, in_channels + 1))
        pick = f"pick {in_channels} of its bands with --bands (for example --bands={example}), or "
        pick = pick if bands > in_channels else ""
        raise DataError(
            f"{path}: has {bands} band(s), but the model was trained on {in_channels} (in_channels={in_channels}, "
            f"fixed by the checkpoint or the exported model); {pick}use a model trained on {bands}-band images"
        ) from None


def parse_bands(text: str, key: str = "bands") -> tuple[int, ...]:
    """The ``bands`` key (or another ``key`` of band numbers): 1-based band numbers such as ``3,2,1``; empty =
    every band in file order.

    Raises:
        ValueError: anything other than positive integers separated by commas.
    """
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"--{key}={text!r}: expected 1-based band numbers separated by commas, for example 3,2,1")
    return tuple(int(p) for p in parts)


def parse_bands_for(text: str, in_channels: int) -> tuple[int, ...]:
    """The ``bands`` key for a network of ``in_channels`` inputs: as many bands as it takes (or one, repeated
    into three grey bands), so that a mismatch is one message at the start, not one per tile.

    Raises:
        ValueError: a malformed key, or another number of bands than in_channels.
    """
    bands = parse_bands(text)
    if bands and len(bands) != in_channels and not (len(bands) == 1 and in_channels == 3):
        example = ",".join(str(b) for b in range(1, in_channels + 1))
        raise ValueError(
            f"--bands={text} picks {len(bands)} band(s) but in_channels={in_channels}; set --in_channels={len(bands)} "
            f"or pick {in_channels} bands (for example --bands={example})"
        )
    return bands


def shown_channels(rgb_bands: str, bands: Sequence[int], in_channels: int) -> tuple[int, ...]:
    """The ``rgb_bands`` key as 0-based positions among the channels the network reads (the ``bands`` picked,
    or the file's first in_channels): three shown as red, green and blue, or one shown in grey; empty: ().

    Raises:
        ValueError: not one or three band numbers, or a band the network does not read, with the fix.
    """
    rgb = parse_bands(rgb_bands, "rgb_bands")
    used = list(bands) if bands else list(range(1, in_channels + 1))
    if rgb and len(rgb) not in (1, 3):
        raise ValueError(f"--rgb_bands={rgb_bands}: expected three bands (red, green, blue) or one (grey)")
    if any(b not in used for b in rgb):
        raise ValueError(
            f"--rgb_bands={rgb_bands}: figures and overlays show bands the network reads, and it reads "
            f"{','.join(map(str, used))} of the file"
            + (f" (--bands={','.join(map(str, bands))})" if bands else "")
            + "; name three of those (or one, for grey), for example --rgb_bands="
            + (
                "3,2,1 (red, green, blue of Gaofen-2's B, G, R, NIR)"
                if {1, 2, 3} <= set(used)
                else ",".join(map(str, used[:3]))
            )
        )
    return tuple(used.index(b) for b in rgb)


def rgb_bands_for(given: str, bands: str, trained: dict) -> str:
    """The ``rgb_bands`` key of a prediction: as given, else the training's (``trained``: its config) where the
    bands read are the training's; else empty (the first three)."""
    if given or parse_bands(bands) != parse_bands(str(trained.get("bands", ""))):
        return given
    return str(trained.get("rgb_bands", ""))


def picked_for_colour(channels: int, shown: Sequence[int] = ()) -> list[int]:
    """The positions of ``channels`` to show: ``shown`` (shown_channels) where it fits, else the first three
    (RGB of an RGB+NIR image) or, with fewer, the first (grey)."""
    if shown and max(shown) < channels:
        return list(shown)
    return [0, 1, 2] if channels >= 3 else [0]


def select_bands(image: np.ndarray, bands: Sequence[int], path: Path, in_channels: int = 0) -> np.ndarray:
    """The ``bands`` key on an (H, W, C) image: those 1-based bands in that order; all when empty. ``in_channels``,
    where given: the network's band count, which an image of fewer bands cannot be given by any choice.

    Raises:
        DataError: a band number beyond the image's bands.
    """
    if not bands:
        return image
    if max(bands) > image.shape[2]:
        raise bands_beyond_error(path, bands, image.shape[2], in_channels, "image")
    return image[:, :, [b - 1 for b in bands]]


def bands_beyond_error(path: Path, bands: Sequence[int], count: int, in_channels: int, holder: str) -> DataError:
    """The refusal of a --bands asking for a band beyond the ``count`` a file (the ``holder``: image or file) has:
    another choice where the file has the network's ``in_channels`` bands or more (0: not known), else what can
    give the network its bands, as no choice among fewer can."""
    fix = (
        f"no choice of them makes the {in_channels} the model was trained on: predict it with a model trained "
        f"on {count} bands, or use a product of it with all {in_channels} bands"
        if count < in_channels
        else f"choose band numbers from 1 to {count}"
    )
    return DataError(
        f"{path}: --bands={','.join(map(str, bands))} asks for band {max(bands)}, but the {holder} has "
        f"{count} band(s); {fix}"
    )


def load_image(path: Path, in_channels: int) -> np.ndarray:
    """Read an image file straight to float32 (in_channels, H, W) in [0, 1]."""
    return image_to_float(read_image(path, nodata_as_zero=True), in_channels, path)


LOSSY_SUFFIXES = (".jpg", ".jpeg")  # mask formats whose values stray from 0/255 at edges
ZERO_ONE_TOP = 2  # the most a 0/1 mask holds (1 = farmland; 2 where a lossy format rounded an edge up)
CLASS_NUMBER_TOP = 15  # the most a mask of class numbers (0, 1 = farmland, 2 = water, ...) is taken to hold


COLOURS_SHOWN = 4  # colours of a colour mask named in its refusal, the most frequent first
PNG_PALETTE = 3  # the IHDR colour type of a palette PNG (byte 25 of the file)


def is_palette_png(path: Path) -> bool:
    """Say whether a file is a palette PNG, whose indices OpenCV hands over as the colours they stand for."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(26)
    except OSError:
        return False
    return len(head) == 26 and head.startswith(PNG_SIGNATURE) and head[25] == PNG_PALETTE


def colour_mask_error(mask: np.ndarray, path: Path) -> DataError:
    """The refusal of a mask whose bands differ, naming the colours found and how to write the mask expected.

    A conversion to grey is not the fix: it turns a farmland colour into another grey (red into 76), which the
    value check refuses again or ``--mask_threshold=128`` reads as background."""
    colours, counts = np.unique(
        mask[:, :, : min(3, mask.shape[2])].reshape(-1, min(3, mask.shape[2])), axis=0, return_counts=True
    )
    shown = ", ".join(f"({', '.join(str(int(v)) for v in colours[i])})" for i in np.argsort(-counts)[:COLOURS_SHOWN])
    shown += ", ..." if len(colours) > COLOURS_SHOWN else ""
    expected = "expected a single-band mask with 255 (or 1) = farmland and 0 = background"
    drawn = [tuple(int(v) for v in colours[i]) for i in np.argsort(-counts) if colours[i].any()]
    colour = str(drawn[0] if drawn else (255, 0, 0))  # the most frequent colour other than black, for the example
    return DataError(
        f"{path}: colour mask drawn in {len(colours)} colour(s), most frequent first {shown}; {expected}. Write "
        "255 where the farmland colour is and 0 elsewhere (Python, with PIL: rgb = numpy.array(Image.open(src)"
        f".convert('RGB')).astype(int); Image.fromarray(numpy.where(numpy.abs(rgb - {colour}).max(axis=2) < 64, 255, "
        f"0).astype(numpy.uint8)).save(dst) with dst a .png, and farmland's colour in place of {colour} if it is "
        "another); converting the colours to grey does not do it (red becomes 76, which the mask check refuses and "
        "--mask_threshold=128 reads as background)"
    )


def fills_a_block(mask: np.ndarray, values: np.ndarray) -> bool:
    """Whether some pixel of a 2-D mask holds one of ``values`` and its eight neighbours hold the same: an area of
    a class, which the 1-pixel fringe that anti-aliasing draws along an edge never is."""
    if mask.ndim != 2 or min(mask.shape) < 3 or not values.size:
        return False
    height, width = mask.shape
    centre = mask[1:-1, 1:-1]
    same = np.isin(centre, values)
    for dy in range(3):
        for dx in range(3):
            same &= mask[dy : dy + height - 2, dx : dx + width - 2] == centre
    return bool(same.any())


def holds_class_numbers(mask: np.ndarray, path: Path, values: np.ndarray) -> bool:
    """Whether a mask of ``values`` (those found, unlabelled ones left out) looks like one of class numbers
    (0 = background, 1 = farmland, 2 and up other classes), as labelme and GIS classification exports write them:
    whole numbers from 2 to CLASS_NUMBER_TOP, where neither anti-aliasing nor JPEG rounding explains them (JPEG
    rounds a 0/1 mask's edges up to 2, not further), one of them filling an area (fills_a_block): a tile of an
    anti-aliased 0/255 mask that holds only the faint fringe of a field beyond its edge is no such mask."""
    top = int(values.max()) if values.size else 0
    lossless = Path(path).suffix.lower() not in LOSSY_SUFFIXES
    within = (2 if lossless else ZERO_ONE_TOP + 1) <= top <= CLASS_NUMBER_TOP
    return np.issubdtype(mask.dtype, np.integer) and within and fills_a_block(mask, values[values > 0])


def class_numbers_error(
    values: np.ndarray, path: Path, found: str, ignore_index: int, void: int | None = None
) -> DataError:
    """The refusal of a mask of class numbers (``found``: what was wrong with it), with a recoding that keeps
    farmland and makes every other class background; neither --mask_threshold nor --ignore_index does that.
    ``void``: a value beside the classes that marks unlabelled pixels (VOC's 255), kept by the recoding and offered
    as --ignore_index."""
    kept = ignore_index if ignore_index >= 0 else void
    others = [int(v) for v in values if v >= 2 and v != kept]
    lossy = (
        "; JPEG has changed the numbers near the edges, so export the masks from the labelling tool as PNG if you can"
        if Path(path).suffix.lower() in LOSSY_SUFFIXES
        else ""
    )
    unlabelled = (
        f"; if {others[0]} marks unlabelled pixels rather than a class, set --ignore_index={others[0]} instead"
        if len(others) == 1 and kept is None
        else ""
    )
    recoding = "numpy.where(mask == 1, 1, 0)"
    if kept is not None:  # unlabelled pixels stay unlabelled, not background
        recoding = f"numpy.where(mask == 1, 1, numpy.where(mask == {kept}, {kept}, 0))"
    void_fix = (
        f", and set --ignore_index={void}: {void} beside the classes looks like unlabelled pixels (VOC marks them so)"
        if void is not None and ignore_index < 0
        else ""
    )
    return DataError(
        f"{path}: {found}; it looks like a mask of class numbers (0 = background, 1 = farmland, "
        f"{', '.join(str(v) for v in others[:6])} = {'another class' if len(others) == 1 else 'other classes'} such "
        "as water or roads); expected only 0 and 255 "
        "(or 0 and 1), every class that is not farmland being 0. Recode the masks so: in Python, "
        f"{recoding}.astype(numpy.uint8) saved as PNG (put farmland's number in place of 1 if it "
        f"has another){void_fix}; --mask_threshold cannot pick one class out (it reads every value from N up as "
        f"farmland){unlabelled}{lossy}"
    )


def mask_values_error(mask: np.ndarray, values: np.ndarray, path: Path, ignore_index: int) -> DataError:
    """The refusal of a mask holding values outside {0, 255} and {0, 1} (``values``: its values, ``ignore_index``
    left out), with the fix its values point to: a 16-bit mask, 255 around a 0/1 mask, or one value more."""
    shown = ", ".join(str(v) for v in values[:8]) + (", ..." if values.size > 8 else "")
    other = values[~np.isin(values, (0, 1, 255))]
    one_more = other.size == 1 and float(other[0]).is_integer()
    one_more = one_more and any(np.isin(values, (0, top, *other)).all() for top in (1, 255))
    if float(values.min()) >= 0 and holds_class_numbers(mask, path, values):
        return class_numbers_error(values, path, f"holds values {{{shown}}}", ignore_index)
    labelled = values[values != 255]  # class numbers with 255 for unlabelled pixels, as VOC's masks hold them
    if ignore_index < 0 and labelled.size < values.size and np.isin((0, 1), labelled).all():
        if float(labelled.min()) >= 0 and holds_class_numbers(mask, path, labelled):
            return class_numbers_error(values, path, f"holds values {{{shown}}}", ignore_index, void=255)
    if mask.dtype == np.uint16 and np.isin(values, (0, 65535)).all():  # 16-bit full scale, not unlabelled
        fix = (
            "it looks like a 16-bit mask with 65535 = farmland: save the masks as 8-bit PNGs of 0 and 255, or "
            "set --mask_threshold=128 to read values >= 128 as farmland"
        )
    elif np.isin((1, 255), values).all() and np.isin(values, (0, 1, 255)).all():
        # A 0/1 raster with 255 around it, as GIS tools write nodata: --mask_threshold=128 would make the
        # nodata farmland and the farmland background.
        fix = (
            "it looks like a 0/1 mask with 255 for nodata (unlabelled pixels, as GIS rasters hold around the "
            "labelled area): set --ignore_index=255; if 255 is farmland as 1 is, set --mask_threshold=1 "
            "(not 128, which would read the 1s as background)"
        )
    elif one_more and ignore_index < 0 and other[0] < 0:  # a nodata value --ignore_index cannot take
        fix = (
            f"if {other[0]:g} marks nodata (unlabelled pixels), give them a value from 2 to 254 instead, for "
            f"example numpy.where(mask == {other[0]:g}, 128, mask) saved as an 8-bit PNG, and set "
            "--ignore_index=128 (--ignore_index takes no negative value: -1 means none)"
        )
    elif one_more and ignore_index < 0:  # 0/255 or 0/1 and one more value: most likely unlabelled pixels
        value = int(other[0])
        fix = (
            f"if {value} marks unlabelled pixels (make_tiles.py --mark_unlabelled writes the --ignore_index "
            f"it is given), set --ignore_index={value}; else re-export the masks losslessly (PNG, not JPEG)"
        )
    else:
        fix = "re-export masks losslessly (PNG, not JPEG), or set --mask_threshold=128"
        fix += "" if ignore_index >= 0 else ", or --ignore_index=N when value N marks unlabelled pixels"
    return DataError(
        f"{path}: holds values {{{shown}}}; expected only 0 and 255 (or 0 and 1). {fix[0].upper()}{fix[1:]}"
    )


def mask_to_classes(mask: np.ndarray, path: Path, threshold: int = 0, ignore_index: int = -1) -> np.ndarray:
    """Turn a mask of 0/255 (or 0/1) into class indices 0/1 (uint8, H x W), unlabelled pixels into IGNORE.

    Args:
        mask: (H, W) or (H, W, C) array as read from the file.
        path: the file, for messages.
        threshold: 0 accepts only {0, 255} or {0, 1}; N > 0 makes every value >= N farmland.
        ignore_index: the mask value of unlabelled pixels (-1: none); they become IGNORE.

    Raises:
        DataError: the mask has several differing bands, or values outside the accepted sets.
    """
    if mask.ndim == 3:
        if mask.shape[2] > 1 and not all(
            np.array_equal(mask[:, :, 0], mask[:, :, b]) for b in range(1, min(3, mask.shape[2]))
        ):
            raise colour_mask_error(mask, path)
        mask = mask[:, :, 0]
    if np.issubdtype(mask.dtype, np.floating) and np.isnan(mask).any():  # a float raster's nodata; int(NaN) fails
        raise DataError(
            f"{path}: floating-point mask with NaN pixels (nodata?); expected only 0 and 255 (or 0 and 1). Give them "
            "a value of their own in an 8-bit mask, for example numpy.nan_to_num(mask, nan=128), and set "
            "--ignore_index=128; or fill them with 0 where they are background"
        )
    unlabelled = mask == ignore_index if ignore_index >= 0 else None
    if threshold <= 0 and Path(path).suffix.lower() in LOSSY_SUFFIXES:
        raise DataError(
            f"{path}: a JPEG mask; expected a lossless mask (PNG), because JPEG blurs the field edges into values "
            "between 0 and 255 (or 0 and 1) even where they happen to pass the check. Re-export the masks as PNG, "
            "or set --mask_threshold=128 to read values >= 128 as farmland"
        )
    if threshold > 0:
        if np.issubdtype(mask.dtype, np.integer) and threshold > np.iinfo(mask.dtype).max:
            bits, most = np.iinfo(mask.dtype).bits, np.iinfo(mask.dtype).max
            raise DataError(
                f"{path}: its {bits}-bit values reach {most} at most, and --mask_threshold={threshold} is above that, "
                "so all of it would read as background; give a threshold within its range (--mask_threshold=128 for "
                "0/255 masks), or leave it out"
            )
        classes = (mask >= threshold).astype(np.uint8)
        # The labelled pixels' top: an unlabelled value at or above the threshold (128, VOC's 255) hides none of
        # the checks below, which a 0/1 mask with unlabelled pixels would pass read as all background.
        labelled = mask[mask != ignore_index] if ignore_index >= 0 else mask
        top = int(labelled.max()) if labelled.size else 0
        values = np.unique(labelled) if 0 < top < threshold else np.zeros(0, mask.dtype)  # all background: why?
        if values.size and holds_class_numbers(mask, path, values):
            shown = ", ".join(str(v) for v in values.tolist())
            found = f"holds values {{{shown}}}, all below --mask_threshold={threshold}, so all of it would read as "
            raise class_numbers_error(values, path, found + "background", ignore_index)
        if ignore_index < 0 and top == 255 and mask.dtype == np.uint8:
            # Class numbers with VOC's 255 for unlabelled pixels: only the unlabelled pixels would read as farmland.
            found_values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
            lower = found_values[found_values != 255]
            if 1 in lower and int(lower.max()) < threshold and holds_class_numbers(mask, path, lower):
                shown = ", ".join(str(v) for v in found_values.tolist())
                found = (
                    f"holds values {{{shown}}}; under --mask_threshold={threshold} only the 255s would read as farmland"
                )
                raise class_numbers_error(found_values, path, found, ignore_index, void=255)
            lossless = Path(path).suffix.lower() not in LOSSY_SUFFIXES
            zero_one = np.isin(found_values, (0, 1, 255)).all() and fills_a_block(mask, lower[lower == 1])
            if lossless and zero_one and threshold > 1:
                # A 0/1 mask with 255 for unlabelled pixels (VOC's): the farmland would read as background.
                raise DataError(
                    f"{path}: holds values {{0, 1, 255}}; under --mask_threshold={threshold} only the 255s would read "
                    "as farmland and the 1s as background; it looks like a 0/1 mask (1 = farmland) with 255 for "
                    "unlabelled pixels, as VOC marks them: leave --mask_threshold out and set --ignore_index=255 (if "
                    "255 is farmland as 1 is, set --mask_threshold=1)"
                )
        # A 0/1 mask's farmland fills an area; a faint anti-aliased fringe (values 1 and 2) reads as background.
        if 0 < top < min(threshold, ZERO_ONE_TOP + 1) and fills_a_block(mask, values[values > 0]):
            lossy = top == ZERO_ONE_TOP and Path(path).suffix.lower() in LOSSY_SUFFIXES
            raise DataError(
                f"{path}: holds values 0 to {top}, all below --mask_threshold={threshold}, so all of it would read as "
                "background; it looks like a 0/1 mask (1 = farmland). 0/1 masks need no threshold: leave "
                "--mask_threshold out (for lossy 0/1 masks, --mask_threshold=1)"
                + (
                    "; but where 2 is a class of its own (water, say) rather than JPEG's rounding of 1, "
                    "--mask_threshold=1 would make it farmland: export the masks as PNG with every class but "
                    "farmland as 0"
                    if lossy
                    else ""
                )
            )
    else:
        # A histogram is linear in the pixels where np.unique sorts them: this check runs on every mask read.
        values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)) if mask.dtype == np.uint8 else np.unique(mask)
        if ignore_index >= 0:
            values = values[values != ignore_index]
        if np.isin(values, (0, 255)).all():
            classes = (mask == 255).astype(np.uint8)
        elif np.isin(values, (0, 1)).all():
            classes = mask.astype(np.uint8)
        else:
            raise mask_values_error(mask, values, path, ignore_index)
    if unlabelled is not None:
        classes[unlabelled] = IGNORE
    return classes


def read_mask(path: Path) -> np.ndarray:
    """Read a mask file's values as (H, W, C): a palette PNG or TIFF (labelme's, VOC's, ArcGIS's class rasters) as
    its indices, the class values its colours only draw; any other file as read_image reads it.

    Raises:
        DataError: the file is missing, unreadable or not an image.
    """
    if is_palette_png(path):  # OpenCV hands a palette PNG over as its colours: GDAL reads its indices
        try:
            with quiet_gdal(), MemoryFile(np.fromfile(str(path), dtype=np.uint8).tobytes()) as memory:
                with memory.open() as src:
                    return src.read(1)[:, :, None]
        except (OSError, RasterioError):
            pass  # read_image says what is wrong with the file
    return read_image(path, palette_as_indices=True)


def load_mask(path: Path, threshold: int = 0, ignore_index: int = -1) -> np.ndarray:
    """Read a mask file as class indices (uint8, H x W: 1 = farmland, 0 = background, IGNORE = unlabelled)."""
    return mask_to_classes(read_mask(path), path, threshold, ignore_index)


def farmland_pixels(classes: np.ndarray) -> tuple[int, int]:
    """A decoded mask's farmland pixels (class 1 and up) and labelled pixels."""
    labelled = classes != IGNORE
    return int(((classes >= 1) & labelled).sum()), int(labelled.sum())


def farmland_share(classes: np.ndarray) -> float:
    """Share of a decoded mask's labelled pixels that are farmland (class 1 and up); 0 when none is labelled."""
    farmland, labelled = farmland_pixels(classes)
    return farmland / max(labelled, 1)


def png_holds(image: np.ndarray) -> bool:
    """Whether a PNG holds an (H, W) or (H, W, C) array as it is: 1, 3 or 4 bands of 8- or 16-bit values."""
    bands = 1 if image.ndim == 2 else image.shape[2]
    return bands in (1, 3, 4) and image.dtype in (np.uint8, np.uint16)


def write_image(path: Path, image: np.ndarray, text: dict[str, str] | None = None) -> None:
    """Write an (H, W) or (H, W, C) array losslessly and atomically (temporary file, then rename).

    The format follows the extension: .png for what a PNG holds (png_holds), .tif for any band count and pixel
    type (through GDAL where a PNG could not hold it). Non-ASCII paths work. ``text``: keys and texts a PNG
    stores beside its pixels (png_text.py); other formats are written without them.

    Raises:
        DataError: the array cannot be written in that format, with the name to use instead.
    """
    path = Path(path)
    suffix = path.suffix.lower() or ".png"
    if suffix in TIFF_EXTENSIONS and not png_holds(image):
        try:
            encoded = encode_tiff(image.reshape(*image.shape[:2], -1).transpose(2, 0, 1))
        except RasterioError as err:
            raise DataError(f"{path}: cannot write an array of type {image.dtype} as a TIFF ({err})") from None
    elif suffix == ".png" and not png_holds(image):
        raise DataError(
            f"{path}: a PNG holds 1, 3 or 4 bands of 8 or 16 bits, not an array of shape {image.shape} and type "
            f"{image.dtype}; give it a .tif name"
        )
    else:
        encoded = encode_with_opencv(path, image, suffix)
    if suffix == ".png":
        for key, value in (text or {}).items():
            encoded = with_text(encoded, key, value)
    atomic_write_bytes(path, encoded)


def encode_with_opencv(path: Path, image: np.ndarray, suffix: str) -> bytes:
    """The bytes of an (H, W) or (H, W, C) grey, RGB or RGBA array in the format of ``suffix``."""
    bands = 1 if image.ndim == 2 else image.shape[2]
    try:
        array = image
        if bands == 3:
            array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
        elif bands == 4:
            array = cv2.cvtColor(array, cv2.COLOR_RGBA2BGRA)
        ok, encoded = cv2.imencode(suffix, array)
    except cv2.error:
        ok = False
    if not ok:
        raise DataError(f"{path}: cannot encode an array of shape {image.shape} and type {image.dtype} as {suffix}")
    return encoded.tobytes()


def encode_tiff(bands: np.ndarray, descriptions: Sequence[str | None] = (), **profile: object) -> bytes:
    """A (C, H, W) array as the bytes of a DEFLATE-compressed TIFF; ``descriptions``: a name per band (None or
    empty: none), which GIS software shows; ``profile``: more creation options of rasterio's GTiff driver (crs,
    transform, nodata, photometric)."""
    shape = {"width": bands.shape[2], "height": bands.shape[1], "count": bands.shape[0], "dtype": bands.dtype.name}
    with quiet_gdal(), MemoryFile() as memory:
        with memory.open(driver="GTiff", compress="deflate", **shape, **profile) as tiff:
            tiff.write(bands)
            for band, text in enumerate(descriptions, start=1):
                if text:
                    tiff.set_band_description(band, text)
        return memory.read()


TILED_NAMES = r"^(.+)_r\d+c\d+$"  # <scene>_r<row>c<col>: make_tiles.py's tile names, the docs' --group_pattern


def scene_groups(pairs: Sequence[tuple[Path, Path]], pattern: str) -> tuple[list[str], int]:
    """The group of each pair: the first capture group that took part (else the whole match) of ``pattern`` in the
    image's stem, so tiles cut from one scene stay together. An empty pattern makes every tile its own group.

    Returns:
        one group name per pair, and how many stems did not match (each then forms a group of its own).

    Raises:
        ValueError: the pattern is not a valid regular expression.
    """
    if not pattern:
        return [p[0].stem for p in pairs], 0
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(
            f"--group_pattern={shell_quoted(pattern)}: not a valid regular expression ({err}); "
            f"for tiles named <scene>_r<row>c<col> use --group_pattern={shell_quoted(TILED_NAMES)}"
        ) from None
    groups, unmatched = [], 0
    for image, _ in pairs:
        match = regex.search(image.stem)
        if match is None:
            unmatched += 1
            groups.append(image.stem)
        else:
            # The first group that took part: in a|b patterns each alternative may have its own.
            groups.append(next((g for g in match.groups() if g is not None), match.group(0)))
    return groups, unmatched


FEW_SCENES = 3  # a validation or test split of fewer scenes is warned of; keep_epoch=auto then keeps the last epoch


def split_scenes(run_dir: Path, split: str) -> int | None:
    """The scenes (groups) of one split as split_dataset.py counted them (splits/summary.json), or None where
    it did not (split by tile, lists made by hand, or an unreadable summary)."""
    try:
        summary = json.loads((Path(run_dir) / "splits" / "summary.json").read_text(encoding="utf-8"))
        count = summary["groups"][split]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return count if isinstance(count, int) else None


EMPTY_TEST_SPLIT = (
    "the test split lists no tiles (too few tiles or scenes to fill it, or --split_ratios gave it none); run "
    "split_dataset.py again with a test share in --split_ratios and enough tiles or scenes for it"
)


def read_pair_list(path: Path) -> list[tuple[Path, Path]]:
    """Read a split list written by split_dataset.py: one ``image<TAB>mask`` pair per line.

    Raises:
        DataError: the list is missing, not UTF-8 text, or a line is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split list not found; run split_dataset.py first with the same --run_dir")
    try:
        # utf-8-sig: an editor that saved the list with a byte-order mark would glue it to the first path.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: expected UTF-8 text, found byte {err.object[err.start]:#04x}, which is not UTF-8 there; "
            "save the list as UTF-8 (the encoding split_dataset.py writes), or re-run split_dataset.py"
        ) from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataError(f"{path}:{number}: expected 'image<TAB>mask', found {line!r}; re-run split_dataset.py")
        pairs.append((Path(parts[0]), Path(parts[1])))
    return pairs


def check_split_in_data_dir(
    pairs: Sequence[tuple[Path, Path]], list_path: Path, data_dir: str, subdirs: Sequence[str] = ()
) -> None:
    """Refuse a ``--data_dir`` given to a script that reads a split list naming files outside that folder: such
    a script reads the files the list names, so the folder given would be silently ignored (a corrected copy of
    the labels scored as if it were the originals).

    A pair with either file inside data_dir counts as its own (a ``label_subdir`` may lie beside the folder), and
    so does one whose files are each inside it or pointed to by a link in data_dir's ``subdirs`` (image_subdir,
    label_subdir): split_dataset.py lists a linked file by its target. Links to the images beside copies of the
    labels (corrected ones) are not the split's folder: its labels are not those the list names.

    Raises:
        ValueError: a pair of the list lies outside data_dir; the message names one and the fix.
    """
    root = Path(data_dir).resolve()
    outside = [pair for pair in pairs if not any(Path(path).resolve().is_relative_to(root) for path in pair)]
    if outside:
        linked = {entry.resolve() for sub in subdirs if (root / sub).is_dir() for entry in (root / sub).iterdir()}
        outside = [
            pair
            for pair in outside
            if not all(Path(path).resolve() in linked or Path(path).resolve().is_relative_to(root) for path in pair)
        ]
    if outside:
        raise ValueError(
            f"--data_dir={data_dir}: {list_path} names files outside it ({len(outside)} of its {len(pairs)} pairs, "
            f"for example {outside[0][0]}), and the files a list names are the ones read; to use those in "
            f"{data_dir}, split them into a new run (python split_dataset.py --data_dir={shell_quoted(data_dir)} "
            "--run_dir=NEW_RUN) "
            f"or write their paths into {list_path}; leave --data_dir out to use the files the list names"
        )


def read_test_split(
    run_dir: Path | str, data_dir: str | None, subdirs: Sequence[str] = (), fix: str = ""
) -> list[tuple[Path, Path]]:
    """The test split's (image, mask) pairs, checked against ``data_dir`` where one was given (None: not given).

    Raises:
        DataError: the list is missing, unreadable or empty (``fix``: another way on, added to the message).
        ValueError: the pairs lie outside data_dir (check_split_in_data_dir).
    """
    listed = Path(run_dir) / "splits" / "test.txt"
    pairs = read_pair_list(listed)
    if not pairs:
        raise DataError(f"{listed}: {EMPTY_TEST_SPLIT}{fix}")
    if data_dir is not None:
        check_split_in_data_dir(pairs, listed, data_dir, subdirs)
    return pairs


def random_d4(
    image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one of the 8 flips/90-degree rotations, drawn from ``generator``, to an image and its mask alike."""
    choice = int(torch.randint(0, 8, (1,), generator=generator).item())
    if choice & 1:
        image, mask = image.flip(-1), mask.flip(-1)
    if choice & 2:
        image, mask = image.flip(-2), mask.flip(-2)
    if choice & 4 and image.shape[-1] == image.shape[-2]:
        image, mask = image.transpose(-1, -2), mask.transpose(-1, -2)
    return image.contiguous(), mask.contiguous()


def random_scale(
    image: torch.Tensor, mask: torch.Tensor, amount: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom an image (C, H, W) and its mask (H, W) by one random factor in [1 - amount, 1 + amount].

    The image is resampled bilinearly, the mask by nearest neighbour (classes never blend); a zoom in is
    cropped back to H x W at a random place, a zoom out reflect-padded, so the tile keeps its size. A zoom out
    keeps more than half of each side: reflection cannot pad by as much as the side it reflects (train.py
    refuses an ``amount`` of 0.5 or more; rounding on small tiles could still reach half).
    """
    factor = 1.0 + amount * (2.0 * float(torch.rand((), generator=generator)) - 1.0)
    height, width = mask.shape
    size = (max(height // 2 + 1, round(height * factor)), max(width // 2 + 1, round(width * factor)))
    if size == (height, width):
        return image, mask
    image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    mask = torch.nn.functional.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    if size[0] < height or size[1] < width:
        pad_h, pad_w = max(0, height - size[0]), max(0, width - size[1])
        # Reflection keeps parcels continuous at the new edge; masks follow the same reflection.
        image = torch.nn.functional.pad(image[None], (0, pad_w, 0, pad_h), mode="reflect")[0]
        mask = torch.nn.functional.pad(mask[None, None].float(), (0, pad_w, 0, pad_h), mode="reflect")[0, 0].long()
    top = int(torch.randint(0, image.shape[-2] - height + 1, (1,), generator=generator))
    left = int(torch.randint(0, image.shape[-1] - width + 1, (1,), generator=generator))
    return (
        image[:, top : top + height, left : left + width].contiguous(),
        mask[top : top + height, left : left + width].contiguous(),
    )


# YIQ: luma and two chroma axes; a hue shift is a rotation of the chroma plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def colour_jitter(image: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random brightness, contrast and hue changes of up to ``amount`` on an image (C, H, W) in [0, 1].

    Brightness is a gain of 1 +- amount and contrast a stretch about each band's mean by as much, both on every
    band and both relative to the tile's own values: 16-bit tiles of 10- or 12-bit data, which fill only the
    bottom of [0, 1], are jittered as much as 8-bit ones (a shift of +-amount would blank them or lift them far
    above any real pixel). The hue rotation (up to amount x 180 degrees) applies only to the first three bands,
    read as RGB. The mask is untouched: colour changes move no parcel edge.
    """
    draws = 2.0 * torch.rand(3, generator=generator) - 1.0
    brightness, contrast, hue = (float(v) * amount for v in draws)
    mean = image.mean(dim=(-2, -1), keepdim=True)
    image = ((image - mean) * (1.0 + contrast) + mean) * (1.0 + brightness)
    if image.shape[0] >= 3 and hue:
        angle = hue * math.pi
        rotate = torch.tensor(
            [[1.0, 0.0, 0.0], [0.0, math.cos(angle), -math.sin(angle)], [0.0, math.sin(angle), math.cos(angle)]]
        )
        matrix = torch.linalg.inv(_RGB_TO_YIQ) @ rotate @ _RGB_TO_YIQ
        rgb = torch.einsum("ij,jhw->ihw", matrix, image[:3])
        image = torch.cat([rgb, image[3:]])
    return image.clamp(0.0, 1.0)


class EpochSampler(Sampler):
    """Shuffles the indices anew each epoch and gives each item its own augmentation seed.

    Both follow only from (seed, epoch), never from worker processes' random state, so the order and the
    augmentation of an epoch are the same with 0 or 8 loader workers, persistent or not, and after a resume.
    Under distributed training each of ``world`` ranks takes every world-th item of the same order; when
    shuffling (training) the order is padded by repeating its start so that every rank takes as many steps.
    """

    def __init__(self, n_items: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        self.n_items, self.seed, self.shuffle, self.epoch = n_items, seed, shuffle, 0
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and seeds the next iteration yields."""
        self.epoch = epoch

    def positions(self) -> list[int]:
        """The positions in the epoch's order that this rank takes."""
        total = -(-self.n_items // self.world) * self.world if self.shuffle else self.n_items
        return [i % max(self.n_items, 1) for i in range(self.rank, total, self.world)] if self.n_items else []

    def __len__(self) -> int:
        return len(self.positions())

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n_items, generator=generator) if self.shuffle else torch.arange(self.n_items)
        seeds = torch.randint(0, 2**62, (self.n_items,), generator=generator)
        return iter([(int(order[i]), int(seeds[i])) for i in self.positions()])


def decoded_size(pairs: Sequence[tuple[Path, Path]]) -> int:
    """Bytes that the decoded tiles of a split would take, estimated from its first pair."""
    if not pairs:
        return 0
    image, mask = read_image(pairs[0][0]), read_image(pairs[0][1])
    return len(pairs) * (image.nbytes + mask.shape[0] * mask.shape[1])


def should_cache(setting: str, pairs: Sequence[tuple[Path, Path]]) -> bool:
    """Resolve the ``cache_tiles`` key: yes, no, or auto (when the tiles fit in a quarter of free memory).

    Raises:
        ValueError: an unknown setting.
    """
    word = setting.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    if word != "auto":
        raise ValueError(f"--cache_tiles={setting!r}: expected auto, yes or no")
    free = available_memory()
    return free is not None and decoded_size(pairs) < free // 4


class FarmlandDataset(Dataset):
    """Pairs of (image float32 C x H x W in [0, 1], mask int64 H x W of class indices).

    Items are indexed by position, or by (position, augmentation seed) as EpochSampler yields them. With
    ``cache`` the tiles are decoded once, up front, and kept as compact integer arrays; loader workers
    forked afterwards share them instead of decoding every tile every epoch.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        in_channels: int = 3,
        augment: bool = False,
        mask_threshold: int = 0,
        cache: bool = False,
        ignore_index: int = -1,
        scale_jitter: float = 0.0,
        colour_jitter: float = 0.0,
        bands: Sequence[int] = (),
    ) -> None:
        """Args: pairs of image and mask paths; augment: random flips and 90-degree rotations, and with it
        ``scale_jitter`` / ``colour_jitter`` (see random_scale, colour_jitter); cache: see above;
        bands: the 1-based bands to keep, in that order (empty: all)."""
        self.pairs = list(pairs)
        self.in_channels = in_channels
        self.augment = augment
        self.mask_threshold = mask_threshold
        self.ignore_index = ignore_index
        self.scale_jitter = scale_jitter
        self.colour_jitter = colour_jitter
        self.bands = tuple(bands)
        self.cached: list[tuple[np.ndarray, np.ndarray]] | None = None
        if cache:
            self.cached = [self.read(i) for i in range(len(self.pairs))]

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode one pair: the image as stored (H x W x C) and the mask as class indices, sizes checked."""
        image_path, mask_path = self.pairs[index]
        image = select_bands(read_image(image_path, nodata_as_zero=True), self.bands, image_path)
        mask = load_mask(mask_path, self.mask_threshold, self.ignore_index)
        if image.shape[:2] != mask.shape:
            raise DataError(
                f"{image_path}: image is {image.shape[:2]} pixels but its mask {mask_path} is "
                f"{mask.shape}; they must match"
            )
        return image, mask

    def tensors(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One pair as tensors, as stored: never augmented."""
        image, mask = self.cached[index] if self.cached is not None else self.read(index)
        image_t = torch.from_numpy(image_to_float(image, self.in_channels, self.pairs[index][0]))
        return image_t, torch.from_numpy(mask).long()

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image_t, mask_t = self.tensors(index)
        if self.augment:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            image_t, mask_t = random_d4(image_t, mask_t, generator)
            if self.scale_jitter > 0:
                image_t, mask_t = random_scale(image_t, mask_t, self.scale_jitter, generator)
            if self.colour_jitter > 0:
                image_t = colour_jitter(image_t, self.colour_jitter, generator)
        return image_t, mask_t

    def statistics(self, indices: Sequence[int] | None = None) -> tuple[list[float], list[float], list[int]]:
        """Per-band mean and standard deviation of the [0, 1] scaled images, and pixel counts per class, over the
        tiles at ``indices`` (None = every tile).

        Sums run in float64 over every pixel of every tile (not augmented), so the figures do not depend
        on tile order or size; nodata pixels (all bands zero: a scene's edge) are left out of the band figures,
        which would otherwise pull the means down and inflate the deviations. A constant band gets a deviation
        of 1 (nothing to scale).
        """
        sums = np.zeros(self.in_channels)
        squares = np.zeros(self.in_channels)
        classes = np.zeros(256, dtype=np.int64)
        pixels = 0
        for index in range(len(self.pairs)) if indices is None else indices:
            image, mask = self.cached[index] if self.cached is not None else self.read(index)
            bands = image_to_float(image, self.in_channels, self.pairs[index][0]).reshape(self.in_channels, -1)
            bands = bands[:, bands.any(axis=0)]
            sums += bands.sum(axis=1, dtype=np.float64)
            squares += np.square(bands, dtype=np.float64).sum(axis=1)
            pixels += bands.shape[1]
            classes += np.bincount(mask.ravel(), minlength=256)
        mean = sums / max(pixels, 1)
        std = np.sqrt(np.maximum(squares / max(pixels, 1) - mean**2, 0.0))
        std = np.where(std > 1e-6, std, 1.0)
        return mean.tolist(), std.tolist(), classes[:IGNORE].tolist()


class PlainSubset(Dataset):
    """Some tiles of a FarmlandDataset, in a fixed order and never augmented (whatever the dataset's own
    ``augment``): what BatchNorm statistics are recomputed over."""

    def __init__(self, dataset: FarmlandDataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset.tensors(self.indices[position])


SPLIT_NAMES = ("train", "val", "test")


def write_pair_list(path: Path, pairs: Sequence[tuple[Path, Path]]) -> None:
    """Write ``image<TAB>mask`` lines of absolute paths, atomically."""
    lines = [f"{Path(i).resolve()}\t{Path(m).resolve()}\n" for i, m in pairs]
    atomic_write_text(path, "".join(lines))


def flipped_copies(pairs: Sequence[tuple[Path, Path]], run_dir: Path) -> list[tuple[Path, Path]]:
    """The pairs that are augment.py's flipped copies: entries under run_dir/augmented, or under another run
    folder's (a run folder copied whole lists the copies of the run it was copied from)."""
    augmented = (Path(run_dir) / "augmented").resolve()

    def is_copy(image: Path) -> bool:
        resolved = image.resolve()
        if augmented in resolved.parents:
            return True
        folder, run = resolved.parent, resolved.parent.parent.parent
        return folder.name == "images" and folder.parent.name == "augmented" and (run / "splits").is_dir()

    return [p for p in pairs if is_copy(p[0])]


def original_training_pairs(run_dir: Path) -> list[tuple[Path, Path]]:
    """The training split without the flipped copies of an earlier run (flipped_copies), so that re-running
    never duplicates and other tools see the user's own tiles."""
    pairs = read_pair_list(Path(run_dir) / "splits" / "train.txt")
    copies = set(flipped_copies(pairs, run_dir))
    return [p for p in pairs if p not in copies]
