"""Whole scenes: sliding-window prediction of images of any size, GeoTIFF outputs, field polygons, areas.

A scene is a GeoTIFF (read with rasterio, window by window) or a PNG/JPEG of any size (read whole with the
tile reader, no GDAL code path). It is predicted in square windows of ``window`` pixels that overlap by
``overlap`` pixels. Each window's class probabilities are weighted by a separable cosine ramp that falls
towards the window's edges (and never reaches 0, so the scene's own edges keep weight), summed, and divided
by the summed weights; the classes then come from inference.classes_from_probabilities with the checkpoint's
threshold, as for tiles. Windows are taken one row at a time and finished rows are written at once, so
memory follows one row of windows, not the scene. Window origins fall on a grid of ``window - overlap``
pixels, a multiple of 16 (32 with a ResNet encoder; times downscale) like the network's pooling grid, so a
window sees the scene exactly as the whole scene would, and the blend equals a whole-scene prediction
wherever the overlap covers the network's reach.

Outputs, beside the tile masks in run_dir/predictions:
- ``<stem>_seg.tif``: uint8, 1 = farmland, 0 = background, 255 = nodata, with a colour table; tiled and
  DEFLATE-compressed, with the input's CRS, transform and size.
- ``<stem>_prob.tif`` (``save_probability``): farmland probability in percent (0-100), 255 = nodata.
- ``<stem>_fields.geojson`` and ``<stem>_fields.gpkg`` (``polygons``): one polygon per field in the scene's
  CRS, with ``area_ha`` and ``pixels``; fields under ``min_field_area_ha`` are dropped, and outlines are
  simplified by ``simplify_tolerance`` (CRS units) when it is above 0.
- ``<stem>_area.json`` and one ``farmland_area.csv`` for the run: valid and farmland pixels, fractions and
  hectares.
- ``overlays/<stem>_overlay.png`` (``overlay``): the mask over the photo, at most 2048 pixels a side.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import rasterio
import rasterio.features
import rasterio.windows
import shapely
import shapely.affinity
import torch
from rasterio._err import CPLE_BaseError
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window
from tqdm import tqdm

import files
import polygons
from config import Config
from data_preprocess import (
    bands_beyond_error,
    colour_band_count,
    image_to_float,
    parse_bands,
    read_image,
    shown_channels,
    write_image,
)
from figures import stretched
from files import DataError
from inference import (
    averaged_probabilities,
    band_mean_ratio,
    choose_batch_size,
    classes_from_probabilities,
    decision_threshold,
    on_value_scale,
    overlay_image,
    training_means,
)
from png_text import SIGNATURE as PNG_SIGNATURE
from rasters import (
    RASTER_SUFFIXES,
    REFLECTANCE_SLACK,
    SAME_PIXEL_SIZE,
    area_problem,
    clipped_reflectance,
    gcp_only,
    ground_pixel_size,
    ground_pixel_size_estimate,
    metric_epsg,
    nodata_pixels,
    north_up,
    open_raster,
    pixel_area_m2,
    rpc_only,
    write_palette_style,
    zone_prefix_hint,
)
from runtime import handing_back_freed_memory

LOG = logging.getLogger("scene")
# Rasters no tile reader takes (a GDAL mosaic, ERDAS Imagine, JPEG 2000), as make_tiles.py's scenes: always scenes.
SCENE_ONLY_SUFFIXES = (".vrt", ".img", ".jp2")
FARMLAND = 1
NODATA = 255  # in the mask and the probability GeoTIFFs
MASK_COLOURS = {0: (0, 0, 0, 255), FARMLAND: (255, 220, 0, 255), NODATA: (255, 255, 255, 0)}
BLOCK = 256  # GeoTIFF tile side: what GIS software reads fastest
PREVIEW_SIDE = 2048  # longest side of a scene's overlay
GDAL_CACHE_MB = 128  # GDAL's block cache; its default (5 % of RAM) would let dirty blocks pile up
AREA_FIELDS = [
    "image",
    "width",
    "height",
    "crs",
    "pixel_area_m2",
    "valid_pixels",
    "farmland_pixels",
    "farmland_fraction",
    "valid_area_ha",
    "farmland_area_ha",
    "fields",
    "mask",
    "model",
    "epoch",
    "threshold",
]


# --- settings and paths ----------------------------------------------------------------------------------

# The config keys, besides the checkpoint, the threshold and the bands, that a finished prediction's outputs
# (mask, probability, fields) depend on: a re-run that changes one makes them again (predict.py, change.py).
OUTPUT_KEYS = (
    "tta",
    "window",
    "overlap",
    "resample_scenes",
    "pixel_size_m",  # stands in for a checkpoint without one: whether and how far scenes are resampled
    "min_field_area_ha",
    "min_field_pixels",
    "simplify_tolerance",
)


@dataclass
class SceneSettings:
    """The predict.py keys that shape scene prediction (see config.py)."""

    window: int = 512
    overlap: int = 128
    tta: bool = False
    save_probability: bool = True
    polygons: bool = True
    min_field_area_ha: float = 0.0
    min_field_pixels: int = 0
    save_sieved_mask: bool = False
    resample: bool = True
    pixel_size_m: float = 0.0  # the training tiles' pixel size where the checkpoint records none (0 = unknown)
    simplify_tolerance: float = 0.0
    bands: tuple[int, ...] = ()
    overlay: bool = True
    shown: tuple[int, ...] = ()  # the channels the overlay shows (data_preprocess.shown_channels); () = the first three
    batch_size: int = 0
    channels_last: bool = True
    grid: int = 16  # the network's pooling grid: 16 for the U-Net, 32 for a ResNet encoder, times downscale
    least: int = 32  # the shortest side the network works on without padding (the U-Net's: 32 times downscale)

    @classmethod
    def from_config(
        cls, cfg: Config, grid: int = 16, least: int = 32, in_channels: int | None = None
    ) -> "SceneSettings":
        """Read and check the scene keys of a config, for a network of this pooling ``grid`` and shortest side
        ``least`` (net_structure.input_padding) that reads ``in_channels`` bands (None: the config's).

        Raises:
            ValueError: a window, overlap or band selection that cannot work, with the fix.
        """
        bands = parse_bands(cfg.bands)
        settings = cls(
            window=cfg.window,
            overlap=cfg.overlap,
            tta=cfg.tta,
            save_probability=cfg.save_probability,
            polygons=cfg.polygons,
            min_field_area_ha=cfg.min_field_area_ha,
            min_field_pixels=cfg.min_field_pixels,
            save_sieved_mask=cfg.save_sieved_mask,
            resample=cfg.resample_scenes,
            pixel_size_m=cfg.pixel_size_m,
            simplify_tolerance=cfg.simplify_tolerance,
            bands=bands,
            overlay=cfg.overlay,
            shown=shown_channels(cfg.rgb_bands, bands, in_channels or cfg.in_channels),
            batch_size=cfg.predict_batch_size,
            channels_last=cfg.channels_last,
            grid=grid,
            least=least,
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Raises ValueError unless window and overlap keep windows on the network's pooling grid (``grid``) and
        the minimum mapping units, the simplification and the pixel size are finite and 0 or more."""
        g = self.grid
        why = (
            ""
            if g == 16
            else f" for this network (it pools the scene by {g} pixels: 16 for the U-Net, 32 with a ResNet encoder, "
            "times downscale)"
        )
        least = max(32, self.least)
        if self.window < least or self.window % g:
            raise ValueError(
                f"--window={self.window}: expected a multiple of {g}, at least {least} (for example 512){why}"
            )
        if not 0 <= self.overlap < self.window or self.overlap % g:
            raise ValueError(
                f"--overlap={self.overlap}: expected a multiple of {g} from 0 to window-{g} ({self.window - g}){why}; "
                f"windows must step by a multiple of {g} so that they see the scene as the whole scene would"
            )
        # nan and inf pass a sign test, then fail deep in the sieve (a pixel count) or resample to nothing.
        invalid = {
            key: value
            for key, value in (
                ("min_field_area_ha", self.min_field_area_ha),
                ("min_field_pixels", self.min_field_pixels),
                ("simplify_tolerance", self.simplify_tolerance),
                ("pixel_size_m", self.pixel_size_m),
            )
            if not (math.isfinite(value) and value >= 0)
        }
        if invalid:
            given = ", ".join(f"--{key}={value:g}" for key, value in invalid.items())
            zero = "0 turns it off" + ("; a pixel_size_m of 0 is unknown" if "pixel_size_m" in invalid else "")
            raise ValueError(f"{given}: expected a finite number of 0 or more ({zero}); give a value of 0 or above")


def scene_outputs(run_dir: Path, image: Path) -> dict[str, Path]:
    """Where the outputs of one scene go, by kind (all under run_dir/predictions)."""
    folder, stem = Path(run_dir) / "predictions", Path(image).stem
    return {
        "mask": folder / f"{stem}_seg.tif",
        "style": folder / f"{stem}_seg.qml",
        "sieved": folder / f"{stem}_sieved.tif",
        "sieved_style": folder / f"{stem}_sieved.qml",
        "probability": folder / f"{stem}_prob.tif",
        "geojson": folder / f"{stem}_fields.geojson",
        "gpkg": folder / f"{stem}_fields.gpkg",
        "area": folder / f"{stem}_area.json",
        "overlay": folder / "overlays" / f"{stem}_overlay.png",
    }


def wanted_outputs(outputs: dict[str, Path], settings: SceneSettings) -> list[Path]:
    """The outputs this configuration writes for a scene (used to tell a finished scene)."""
    kinds = ["mask", "style", "area"]
    kinds += ["sieved", "sieved_style"] if settings.polygons and settings.save_sieved_mask else []
    kinds += ["probability"] if settings.save_probability else []
    kinds += ["geojson", "gpkg"] if settings.polygons else []
    kinds += ["overlay"] if settings.overlay else []
    return [outputs[k] for k in kinds]


# --- reading scenes ------------------------------------------------------------------------------------


def image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of a PNG or JPEG from its header, without decoding the pixels; None if unknown."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(32)
            if head.startswith(PNG_SIGNATURE) and head[12:16] == b"IHDR":
                width, height = struct.unpack(">II", head[16:24])
                return height, width
            if head[:2] != b"\xff\xd8":
                return None
            handle.seek(2)
            while True:
                marker = handle.read(4)
                if len(marker) < 4 or marker[0] != 0xFF:
                    return None
                kind, length = marker[1], struct.unpack(">H", marker[2:4])[0]
                # Start-of-frame markers hold the size; C4 (Huffman), C8 and CC (arithmetic) do not.
                if 0xC0 <= kind <= 0xCF and kind not in (0xC4, 0xC8, 0xCC):
                    height, width = struct.unpack(">HH", handle.read(5)[1:5])
                    return height, width
                handle.seek(length - 2, os.SEEK_CUR)
    except (OSError, struct.error):
        return None


def band_count(path: Path) -> int | None:
    """The bands in an image file less an alpha band (data_preprocess.colour_band_count, as train.py counts its
    tiles'); None where it cannot be read (reported later)."""
    try:
        return colour_band_count(path)
    except DataError:
        return None


def is_scene(path: Path, window: int) -> bool:
    """Whether an image takes the scene route: a georeferenced TIFF, or any image larger than one window.

    Tiles (not georeferenced, at most one window a side) keep predict.py's batched tile route.
    """
    path = Path(path)
    if path.suffix.lower() in SCENE_ONLY_SUFFIXES:
        return True  # unreadable: the scene route reports it with GDAL's reason
    if path.suffix.lower() in RASTER_SUFFIXES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(path) as src:
                    placed = src.crs is not None or not src.transform.is_identity or bool(src.rpcs or src.gcps[0])
                    return placed or max(src.shape) > window
        except rasterio.RasterioIOError:
            return False  # unreadable: the tile route reports it with the usual message
    size = image_size(path)
    if size is None and path.suffix.lower() == ".bmp":
        try:
            size = read_image(path).shape[:2]
        except DataError:
            return False
    return size is not None and max(size) > window


class Scene:
    """An open scene: size, georeferencing and bands, read by rows in the file's own pixel type.

    ``read_rows`` returns (rows, width, selected bands). Use as a context manager.
    """

    path: Path
    width: int
    height: int
    count: int  # bands in the file
    dtype: np.dtype
    crs: "rasterio.crs.CRS | None" = None
    transform: Affine = Affine.identity()
    nodata: float | None = None
    bands: tuple[int, ...] = ()  # 1-based selection, after open_scene: never empty

    def read_rows(self, top: int, bottom: int) -> np.ndarray:
        """Rows [top, bottom) of the selected bands as (rows, width, bands), in the file's pixel type."""
        raise NotImplementedError

    def read_preview(self, height: int, width: int) -> np.ndarray:
        """The selected bands shrunk to (height, width, bands), without reading the scene whole."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> "Scene":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RasterScene(Scene):
    """A raster read through rasterio, one block of rows at a time."""

    def __init__(self, path: Path, warn: bool = True) -> None:
        self.path = Path(path)
        self.src = open_raster(self.path)
        self.width, self.height, self.count = self.src.width, self.src.height, self.src.count
        self.dtype = np.dtype(self.src.dtypes[0])
        self.crs, self.transform, self.nodata = self.src.crs, self.src.transform, self.src.nodata
        # An alpha band or an internal mask (drone orthophotos, gdalwarp -dstalpha) marks where the scene has no
        # data, whatever its colour there (often white): such pixels are read as all-zero, which is nodata.
        flags = self.src.mask_flag_enums[0] if self.src.count else []
        self.masked = MaskFlags.alpha in flags or MaskFlags.per_dataset in flags
        if warn and (unplaced := rpc_only(self.src) or gcp_only(self.src)):
            LOG.warning("%s: %s; as it is, its mask and fields are in pixel coordinates (column, row)", path, unplaced)
        bounds = rasterio.windows.bounds(Window(0, 0, self.width, self.height), self.transform)
        if warn and (misplaced := zone_prefix_hint(self.path, self.crs, bounds)):
            LOG.warning("%s; as it is, its mask and fields lie far from its ground in a GIS", misplaced)

    def read_rows(self, top: int, bottom: int) -> np.ndarray:
        where = Window(0, top, self.width, bottom - top)
        block = self.src.read(list(self.bands), window=where)
        if self.masked:
            block[:, self.src.dataset_mask(window=where) == 0] = 0
        return block.transpose(1, 2, 0)

    def read_preview(self, height: int, width: int) -> np.ndarray:
        shape = (len(self.bands), height, width)
        small = self.src.read(list(self.bands), out_shape=shape, resampling=Resampling.average)
        if self.masked:
            small[:, self.src.dataset_mask(out_shape=(height, width), resampling=Resampling.nearest) == 0] = 0
        return small.transpose(1, 2, 0)

    def close(self) -> None:
        self.src.close()


class ImageScene(Scene):
    """A PNG, JPEG or plain image of any size, decoded whole by the tile reader (no GDAL code path)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.image = read_image(self.path)
        self.height, self.width, self.count = self.image.shape
        self.dtype = self.image.dtype

    def read_rows(self, top: int, bottom: int) -> np.ndarray:
        return self.image[top:bottom][:, :, [b - 1 for b in self.bands]]

    def read_preview(self, height: int, width: int) -> np.ndarray:
        small = cv2.resize(self.image, (width, height), interpolation=cv2.INTER_AREA)
        return small.reshape(height, width, -1)[:, :, [b - 1 for b in self.bands]]


class ResampledScene(Scene):
    """A raster scene seen on a grid of another pixel size (bilinear, through a GDAL warped VRT, read a block
    of rows at a time): the scene as the network saw its training tiles."""

    def __init__(self, base: RasterScene, ratio: float) -> None:
        self.base, self.path = base, base.path
        self.width, self.height = max(1, round(base.width * ratio)), max(1, round(base.height * ratio))
        self.count, self.dtype, self.crs, self.nodata = base.count, base.dtype, base.crs, base.nodata
        self.bands = base.bands
        self.transform = base.transform @ Affine.scale(base.width / self.width, base.height / self.height)
        self.vrt = WarpedVRT(
            base.src,
            crs=base.crs,
            transform=self.transform,
            width=self.width,
            height=self.height,
            resampling=Resampling.bilinear,
        )

    def read_rows(self, top: int, bottom: int) -> np.ndarray:
        block = self.vrt.read(list(self.bands), window=Window(0, top, self.width, bottom - top))
        return block.transpose(1, 2, 0)

    def read_preview(self, height: int, width: int) -> np.ndarray:
        return self.base.read_preview(height, width)

    def close(self) -> None:
        self.vrt.close()


def scene_reader(path: Path, warn: bool = True) -> Scene:
    """A scene file opened by the reader its suffix calls for: GDAL, by windows, for RASTER_SUFFIXES; else the whole
    image decoded (ImageScene). ``warn``: of a raster placed only by RPCs, or off its Gauss-Kruger zone.

    Raises:
        DataError: the file cannot be read.
    """
    path = Path(path)
    return RasterScene(path, warn) if path.suffix.lower() in RASTER_SUFFIXES else ImageScene(path)


def open_scene(path: Path, bands: Sequence[int], in_channels: int, trained: str = "", warn: bool = True) -> Scene:
    """Open a scene, select its bands and check them against the network's, before any work starts; ``trained``:
    the checkpoint's ``bands`` key, offered as the fix where they fit the file; ``warn``: of a scene placed only
    by RPCs (off for the check before prediction, which opens it again).

    Raises:
        DataError: unreadable file, a band number beyond the file's bands, or a band count (after the
            selection) that the network cannot take.
    """
    path = Path(path)
    scene = scene_reader(path, warn)
    try:
        if any(b > scene.count for b in bands):
            raise bands_beyond_error(path, bands, scene.count, in_channels, "file")
        scene.bands = tuple(bands) or tuple(range(1, scene.count + 1))
        try:
            # The tile rules, on one pixel: the same band-count and pixel-type checks as for tiles.
            image_to_float(np.zeros((1, 1, len(scene.bands)), scene.dtype), in_channels, path)
        except DataError:
            if len(scene.bands) == in_channels:
                raise  # the pixel type, not the bands
            example = ",".join(str(b) for b in range(1, min(in_channels, scene.count) + 1))
            known = parse_bands(trained)
            if len(known) == in_channels and max(known) <= scene.count:
                example = f"{trained}, the bands it was trained on"
            selected = f" selected with --bands={','.join(map(str, bands))}" if bands else ""
            fix = (
                f"pick {in_channels} of the file's {scene.count} bands with --bands (for example --bands={example}), "
                f"or predict with a checkpoint trained on {len(scene.bands)} bands"
                if scene.count >= in_channels
                else f"the file has only {scene.count}: predict it with a checkpoint trained on {scene.count} bands, "
                f"or use a product of the scene with all {in_channels} bands"
            )
            raise DataError(
                f"{path}: has {len(scene.bands)} band(s){selected}, expected in_channels={in_channels}, the bands "
                f"the checkpoint's network was trained on; {fix}"
            ) from None
    except BaseException:
        scene.close()
        raise
    return scene


# --- windows, weights, test-time augmentation ----------------------------------------------------------


def window_origins(size: int, window: int, overlap: int) -> list[int]:
    """Origins of the windows along one axis: every ``window - overlap`` pixels until the scene is covered.

    The last window may reach past the scene; its outside part is reflect-padded and cropped away.
    """
    stride = window - overlap
    count = max(1, math.ceil((size - overlap) / stride))
    return [i * stride for i in range(count)]


def blend_weight(window: int, overlap: int) -> np.ndarray:
    """1-D weight of a window's pixels: a raised-cosine ramp over ``overlap`` pixels at each end, 1 between.

    Two neighbours' ramps add up to 1 across their overlap, and no pixel gets 0, so a pixel covered by a
    single window (at the scene's edges) still has a prediction.
    """
    weight = np.ones(window, np.float64)
    if overlap:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap) + 0.5) / overlap)
        weight[:overlap] = ramp
        weight[window - overlap :] = ramp[::-1]
    return weight.astype(np.float32)


def coverage(size: int, origins: Sequence[int], weight: np.ndarray) -> np.ndarray:
    """Sum of the windows' weights at each position along one axis (the blend's divisor), float32."""
    total = np.zeros(origins[-1] + len(weight), np.float64)
    for origin in origins:
        total[origin : origin + len(weight)] += weight
    return total[:size].astype(np.float32)


def pad_to(block: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Reflect-pad an (h, w, C) block at its bottom and right to (rows, cols, C)."""
    extra_rows, extra_cols = rows - block.shape[0], cols - block.shape[1]
    if extra_rows <= 0 and extra_cols <= 0:
        return block
    # A one-pixel side has nothing to reflect: repeat it instead.
    mode = "reflect" if min(block.shape[:2]) > 1 else "edge"
    return np.pad(block, ((0, max(extra_rows, 0)), (0, max(extra_cols, 0)), (0, 0)), mode=mode)


# How scene windows feed nodata pixels to the network (filled_nodata), recorded with predict.py's and change.py's
# outputs: those whose record lacks it were made with nodata fed as zeros, and are made again.
NODATA_FED_AS = "nearest pixel with data"


def filled_nodata(block: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """An (h, w, C) block whose nodata pixels (``empty``) take the value of the nearest pixel that holds data, so
    that the network does not take a zero collar or a masked cloud for black ground: fed as zeros, they turn
    the fields along them into background tens of pixels deep (false loss along every collar in change.py).
    The block itself when it has no nodata, or no pixel with data."""
    if not empty.any() or empty.all():
        return block
    # The labels of the distance transform name each pixel's nearest zero, here its nearest pixel with data.
    _, labels = cv2.distanceTransformWithLabels(empty.view(np.uint8), cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_PIXEL)
    with_data = np.flatnonzero(~empty)  # row-major, as the labels number the zeros (from 1)
    nearest = with_data[labels[empty] - 1]
    filled = block.copy()
    # By row and column: the block is often a transposed view, which a flat reshape would copy whole.
    filled[empty] = block[nearest // block.shape[1], nearest % block.shape[1]]
    return filled


def blended_rows(
    model: torch.nn.Module,
    scene: Scene,
    in_channels: int,
    n_classes: int,
    device: torch.device,
    settings: SceneSettings,
    progress: tqdm | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Predict a scene window by window and yield its finished rows in order, top to bottom.

    Yields:
        (first row, blended class probabilities (C, rows, width) float32, nodata (rows, width) bool).
        Memory holds one row of windows: the rows that later windows still overlap are kept, the rest
        are yielded and dropped.

    Raises:
        DataError: a block of the file cannot be read or scaled.
    """
    window, overlap = settings.window, settings.overlap
    stride = window - overlap
    rows_at, cols_at = window_origins(scene.height, window, overlap), window_origins(scene.width, window, overlap)
    weight = blend_weight(window, overlap)
    weight_2d = torch.from_numpy(np.outer(weight, weight))
    row_cover, col_cover = coverage(scene.height, rows_at, weight), coverage(scene.width, cols_at, weight)
    padded_width = cols_at[-1] + window
    batch = choose_batch_size(model, (in_channels, window, window), device, settings.batch_size)
    summed = torch.zeros((n_classes, window, padded_width), dtype=torch.float32)
    warned = False
    for strip, top in enumerate(rows_at):
        bottom = min(top + window, scene.height)
        try:
            raw = scene.read_rows(top, bottom)
        except rasterio.RasterioIOError as err:
            # rasterio's own text only says "see previous exception"; GDAL's reason is the cause.
            reason = str(err.__cause__ or err)[:200]
            raise DataError(
                f"{scene.path}: rows {top}-{bottom} cannot be read ({reason}); expected a complete GeoTIFF: the file "
                "is truncated or corrupt, so copy or export it again (gdal_translate), or remove it"
            ) from None
        nodata = nodata_pixels(raw, scene.nodata, axis=2)
        # A row of windows without a pixel of data has nothing to copy: fed as zeros, not as its nodata value
        # (-9999 or NaN in a float scene failed the [0, 1] check or spread NaN); its rows are nodata anyway.
        filled = np.zeros_like(raw) if nodata.all() else filled_nodata(raw, nodata)
        filled, clipped = clipped_reflectance(filled, nodata)
        if clipped and not warned:  # once a scene: the scene's first such rows, not every row of windows
            LOG.warning(
                "%s: %d pixel(s) of rows %d-%d lie a little outside [0, 1] (bright cloud or haze in reflectance): "
                "clipped to [0, 1]; values further than %g outside it are refused",
                scene.path,
                clipped,
                top,
                bottom,
                REFLECTANCE_SLACK,
            )
            warned = True
        padded = pad_to(filled, window, padded_width)
        for start in range(0, len(cols_at), batch):
            lefts = cols_at[start : start + batch]
            tiles = [image_to_float(padded[:, x : x + window], in_channels, scene.path) for x in lefts]
            probabilities = averaged_probabilities(
                model, torch.from_numpy(np.stack(tiles)), device, settings.channels_last, settings.tta
            )
            for x, p in zip(lefts, probabilities):
                summed[:, :, x : x + window] += p * weight_2d
            if progress is not None:
                progress.update(len(lefts))
        last = strip == len(rows_at) - 1
        done = bottom - top if last else stride
        divisor = torch.from_numpy(np.outer(row_cover[top : top + done], col_cover))
        blended = summed[:, :done, : scene.width] / divisor
        yield top, blended.numpy(), nodata[:done]
        if not last:
            # Keep the rows the next row of windows overlaps; clear the rest for it.
            summed[:, : window - stride] = summed[:, stride:].clone()
            summed[:, window - stride :] = 0


# --- writing rasters -----------------------------------------------------------------------------------


def raster_profile(scene: Scene) -> dict:
    """A tiled, DEFLATE-compressed single-band uint8 GeoTIFF with the scene's size, CRS and transform."""
    return {
        "driver": "GTiff",
        "width": scene.width,
        "height": scene.height,
        "count": 1,
        "dtype": "uint8",
        "crs": scene.crs,
        "transform": scene.transform,
        "nodata": NODATA,
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",  # masks of very large scenes pass 4 GB before compression
    }


# What GDAL raises where it cannot write a GeoTIFF, or open or read one cut short (rasterio.open's TypeError): the
# disk's error when it is full (files.written_or_disk_error).
GDAL_WRITE_ERRORS = (RasterioError, CPLE_BaseError, TypeError)


def finish_geotiff(temporary: Path, target: Path, resampling: Resampling) -> None:
    """Add overviews to a GeoTIFF written under ``temporary``, read it back whole and rename it to ``target``.

    libtiff writes the last blocks and the directory as the file is closed, and a failure there (a full disk) is
    only printed, not raised: every block is read back before the rename, so that no file cut short is left under
    the output's name, and the disk's error names ``target``.
    """
    with files.written_or_disk_error(target, GDAL_WRITE_ERRORS):
        add_overviews(temporary, resampling)
        with rasterio.open(temporary) as src:
            for _, window in src.block_windows(1):
                src.read(1, window=window)
    os.replace(temporary, target)


def add_overviews(path: Path, resampling: Resampling) -> None:
    """Build internal overviews (halving until a level fits in one block) into a finished GeoTIFF."""
    with rasterio.open(path, "r+") as dst:
        factors, factor = [], 2
        while max(dst.width, dst.height) / factor >= BLOCK // 2:
            factors.append(factor)
            factor *= 2
        if factors:
            dst.build_overviews(factors, resampling)
            dst.update_tags(ns="rio_overview", resampling=resampling.name)


def write_mask_style(path: Path) -> None:
    """A QGIS layer style beside a mask GeoTIFF: farmland in the overlay's yellow, background faint, nodata
    transparent."""
    r, g, b, _ = MASK_COLOURS[FARMLAND]
    write_palette_style(path, [(0, (0, 0, 0), 60, "background"), (FARMLAND, (r, g, b), 255, "farmland")])


@dataclass
class SceneCounts:
    """Pixel counts of one predicted scene."""

    valid: int = 0
    farmland: int = 0


def predict_scene(
    model: torch.nn.Module,
    scene: Scene,
    state: dict,
    threshold: float | None,
    device: torch.device,
    settings: SceneSettings,
    outputs: dict[str, Path],
) -> SceneCounts:
    """Predict a scene and write its mask (and probability) GeoTIFFs row by row; return its pixel counts.

    Both files are written under temporary names and renamed when complete.
    """
    saved = state["config"]
    rows_at = window_origins(scene.height, settings.window, settings.overlap)
    cols_at = window_origins(scene.width, settings.window, settings.overlap)
    counts = SceneCounts()
    profile = raster_profile(scene)
    targets = {"mask": outputs["mask"]} | ({"probability": outputs["probability"]} if settings.save_probability else {})
    temporary = {kind: files.temporary_beside(path) for kind, path in targets.items()}
    for path in targets.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), files.written_or_disk_error(outputs["mask"], GDAL_WRITE_ERRORS):
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            handles = {kind: rasterio.open(path, "w", **profile) for kind, path in temporary.items()}
            try:
                handles["mask"].write_colormap(1, MASK_COLOURS)
                with tqdm(total=len(rows_at) * len(cols_at), desc=scene.path.name, unit="window", disable=None) as bar:
                    for top, probabilities, empty in blended_rows(
                        model, scene, saved["in_channels"], saved["n_classes"], device, settings, bar
                    ):
                        classes = classes_from_probabilities(torch.from_numpy(probabilities[None]), threshold)[0]
                        mask = classes.numpy()
                        mask[empty] = NODATA
                        counts.valid += int(empty.size - empty.sum())
                        counts.farmland += int(np.count_nonzero(mask == FARMLAND))
                        where = Window(0, top, scene.width, mask.shape[0])
                        handles["mask"].write(mask, 1, window=where)
                        if "probability" in handles:
                            percent = np.rint(probabilities[FARMLAND] * 100).astype(np.uint8)
                            percent[empty] = NODATA
                            handles["probability"].write(percent, 1, window=where)
            finally:
                for handle in handles.values():
                    handle.close()
        for kind, path in targets.items():
            # Overviews inside the file, so that GIS software opens even a 20,000-pixel mask at once.
            finish_geotiff(temporary[kind], path, Resampling.nearest if kind == "mask" else Resampling.average)
        write_mask_style(outputs["style"])
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)
    return counts


# --- areas, polygons, overview ---------------------------------------------------------------------------


def write_fields(scene: Scene, settings: SceneSettings, outputs: dict[str, Path]) -> int:
    """Sieve the mask to the minimum mapping unit and write its fields as GeoJSON and GeoPackage in the
    scene's CRS as they are found (polygons.py); return how many were written.

    Each field carries ``area_ha`` (from its pixels, before simplification; empty without a projected CRS)
    and ``pixels``. With ``save_sieved_mask`` the sieved mask is written too, with overviews and a style.
    """
    pixel_m2 = pixel_area_m2(scene.crs, scene.transform)
    min_pixels = polygons.min_pixels_for(settings.min_field_area_ha, pixel_m2, settings.min_field_pixels)
    if pixel_m2 is None and settings.min_field_area_ha > 0 and not settings.min_field_pixels:
        LOG.warning(
            "%s: %s, so min_field_area_ha cannot apply; set --min_field_pixels for a minimum mapping unit in "
            "pixels, or %s",
            scene.path,
            area_problem(scene.crs),
            assign_crs_fix(scene) or "reproject the scene to UTM",
        )
    if pixel_m2 is not None and settings.min_field_pixels:
        LOG.warning(
            "%s: --min_field_pixels=%d is left unused: it is the unit for scenes without metres, and this scene's CRS "
            "has them, so --min_field_area_ha=%g (%d pixels of %.3g m2) is its minimum mapping unit; set "
            "--min_field_area_ha for another unit",
            scene.path,
            settings.min_field_pixels,
            settings.min_field_area_ha,
            min_pixels,
            pixel_m2,
        )
    overlap = polygons.simplification_overlap(settings.simplify_tolerance, scene.transform)
    if overlap:
        LOG.warning("%s: %s", scene.path, overlap)
    sieved = files.temporary_beside(outputs["sieved"]) if settings.save_sieved_mask else None
    columns = {"field_id": int, "area_ha": float, "pixels": int}
    t, kept = scene.transform, 0
    try:
        targets, placed = {k: outputs[k] for k in ("geojson", "gpkg")}, not t.is_identity
        with polygons.PolygonWriter(targets, columns, scene.crs, placed=placed) as writer:
            for polygon in polygons.mask_fields(outputs["mask"], min_pixels, sieved):
                # By pixels, with or without a CRS: a sliver longer than the sieve's halo cap can come out of
                # the strips in pieces under the unit (polygons.SIEVE_HALO_CAP), which are no fields.
                if polygon.area < min_pixels:
                    continue
                area_ha = None if pixel_m2 is None else round(polygon.area * pixel_m2 / 1e4, 6)  # to 0.01 m2
                pixels = int(round(polygon.area))
                shape = shapely.affinity.affine_transform(polygon, [t.a, t.b, t.d, t.e, t.c, t.f])
                polygon = None  # a field can be very large: one copy in memory at a time
                if settings.simplify_tolerance > 0:
                    shape = shape.simplify(settings.simplify_tolerance, preserve_topology=True)
                shape = polygons.right_hand(shape)
                kept += 1
                writer.add(shape, field_id=kept, area_ha=area_ha, pixels=pixels)
            written = writer.close()
        if sieved is not None:
            finish_geotiff(sieved, outputs["sieved"], Resampling.nearest)
            write_mask_style(outputs["sieved_style"])
    finally:
        if sieved is not None:
            sieved.unlink(missing_ok=True)
    return written


def assign_crs_fix(scene: Scene) -> str:
    """For a scene with a geotransform but no CRS (a TIFF placed by a .tfw world file alone), the fix: name the CRS
    its coordinates are in, as nothing can be reprojected from an unknown one; '' for any other scene."""
    if scene.crs is not None or scene.transform.is_identity:
        return ""
    path = Path(scene.path)
    return (
        "assign on a copy the CRS its geotransform's map coordinates are in (it names none), for example "
        f"gdal_translate -a_srs EPSG:xxxx {files.shell_quoted(path)} "
        f"{files.shell_quoted(path.with_name(f'{path.stem}_crs.tif'))}"
    )


def area_row(scene: Scene, counts: SceneCounts, fields: int | None, mask: Path, model_file: Path, state: dict) -> dict:
    """One line of the area table: pixel counts and fractions always, hectares with a projected CRS, and the
    model file, its epoch and the cut that made the mask (empty: argmax), so that a table holding scenes
    predicted before a retraining says which rows are whose."""
    pixel_m2 = pixel_area_m2(scene.crs, scene.transform)
    if pixel_m2 is None:
        # Degrees or a Mercator projection whose centre lies on the Earth: the zone is known, and so is the command.
        placed = ground_pixel_size_estimate(scene.crs, scene.transform, scene.width, scene.height) is not None
        fix = "reproject the scene to a projected CRS in ground metres for hectares" + (
            f", for example: {reprojection_command(scene)}" if placed else " (UTM or CGCS2000 Gauss-Kruger)"
        )
        if unnamed := assign_crs_fix(scene):
            fix = f"for hectares, {unnamed}"
        src = getattr(scene, "src", None)  # a Level-1 scene placed by RPCs, or a scan by GCPs: a grid comes first
        if src is not None and (rpc_only(src) or gcp_only(src)):
            fix = "for hectares, put it on a map grid first (gdalwarp: the command is in its warning above)"
        LOG.warning(
            "%s: %s, so areas are left empty (pixel counts and fractions only); %s",
            scene.path,
            area_problem(scene.crs),
            fix,
        )
    hectares = (lambda pixels: round(pixels * pixel_m2 / 1e4, 6)) if pixel_m2 is not None else (lambda pixels: None)
    return {
        "image": str(scene.path),
        "image_file": str(Path(scene.path).resolve()),  # the file itself, however its path was spelt
        "image_stamp": files.file_stamp(scene.path),  # and as it was: a copy with an older time is told apart
        "image_sha256": files.file_digest(scene.path),  # an edit in place of the same size, its time set back, too
        "width": scene.width,
        "height": scene.height,
        "crs": scene.crs.to_string() if scene.crs is not None else "",
        "pixel_area_m2": pixel_m2,
        "valid_pixels": counts.valid,
        "farmland_pixels": counts.farmland,
        "farmland_fraction": round(counts.farmland / counts.valid, 6) if counts.valid else None,
        "valid_area_ha": hectares(counts.valid),
        "farmland_area_ha": hectares(counts.farmland),
        "fields": fields,
        "mask": mask.name,
        "model": str(Path(model_file).resolve()),
        "epoch": state.get("epoch"),
        "threshold": decision_threshold(state),
    }


def write_area_table(rows: Sequence[dict], path: Path) -> None:
    """Write the per-scene area rows as CSV (atomically); empty cells where a figure is undefined."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=AREA_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in AREA_FIELDS})
    files.atomic_write_csv(path, buffer.getvalue())


def write_overlay(scene: Scene, mask_path: Path, path: Path, shown: Sequence[int] = ()) -> None:
    """The farmland tint over the photo (its channels at ``shown``: SceneSettings.shown), shrunk to at most
    PREVIEW_SIDE pixels a side, north up as GIS software shows the scene."""
    scale = min(1.0, PREVIEW_SIDE / max(scene.height, scene.width))
    height, width = max(1, round(scene.height * scale)), max(1, round(scene.width * scale))
    photo = preview_photo(scene, scene.read_preview(height, width))
    with rasterio.open(mask_path) as src:
        mask = src.read(1, out_shape=(height, width), resampling=Resampling.nearest)
    write_image(path, north_up(overlay_image(photo, mask == FARMLAND, shown), scene.transform))


def preview_photo(scene: Scene, block: np.ndarray) -> np.ndarray:
    """A shrunk (H, W, C) block of the scene's bands as a float (C, H, W) photo in [0, 1] to show (overlays, the
    change figure): nodata black, reflectance a little outside [0, 1] clipped as the prediction clips it, and the
    bands of a scene that is not 8-bit stretched over the pixels with data, or 10- or 12-bit values of a 16-bit
    scene would be black."""
    block = block.astype(scene.dtype)  # a copy: the caller's block stays as read
    empty = nodata_pixels(block, scene.nodata, axis=2)
    # A declared nodata value outside the pixel scale (-9999 in a float scene) is no colour: shown as black.
    block[empty] = 0
    photo = image_to_float(clipped_reflectance(block, empty)[0], len(scene.bands), scene.path)
    return stretched(photo, 0, ~empty) if scene.dtype != np.uint8 else photo


# --- one scene, start to end -----------------------------------------------------------------------------


def resample_ratio(scene: Scene, state: dict, settings: SceneSettings) -> float | None:
    """The scene's pixel size over the training tiles' (``pixel_size_m`` in the checkpoint) when the scene is
    to be resampled to the model's pixel size; None when the sizes agree (within SAME_PIXEL_SIZE), either is unknown,
    or resampling is off or impossible, with a warning when they differ by more than a quarter."""
    trained, given = float(state["config"].get("pixel_size_m") or 0.0), settings.pixel_size_m
    if trained <= 0:
        trained = given  # a checkpoint of tiles without a pixel size (PNG): the size the user gives
    elif given > 0 and abs(given / trained - 1) >= SAME_PIXEL_SIZE:
        LOG.warning(
            "%s: --pixel_size_m=%g is left unused: the checkpoint records the training tiles' pixel size, %g m",
            scene.path,
            given,
            trained,
        )
    size = ground_pixel_size(scene.crs, scene.transform, scene.width, scene.height)
    if trained > 0 and size is None and scene.crs is None:
        LOG.info(
            "%s: no CRS, so its pixel size is unknown: predicted on its own pixels, taken to be the model's %.3g m "
            "(a scene of other pixels, 0.5 m for a model of 1 m say, gives poorer masks; a GeoTIFF of it with a CRS "
            "is resampled to the model's size, with --resample_scenes=true)",
            scene.path,
            trained,
        )
    elif trained > 0 and size is None:
        warn_geographic_size(scene, trained)
    if trained <= 0 or size is None or abs(size / trained - 1) < SAME_PIXEL_SIZE:
        return None
    if settings.resample and isinstance(scene, RasterScene):
        LOG.info("%s: %.3g m pixels, the model's %.3g m: predicted at the model's size", scene.path, size, trained)
        return size / trained
    if abs(size / trained - 1) > 0.25:
        LOG.warning(
            "%s: %.3g m pixels, but the model was trained on %.3g m pixels and the scene is not resampled (%s); "
            "expect poorer masks",
            scene.path,
            size,
            trained,
            "--resample_scenes=false" if not settings.resample else "not a GeoTIFF",
        )
    return None


def warn_geographic_size(scene: Scene, trained: float) -> None:
    """A scene in degrees is predicted on its own pixels: warn, with the reprojection that fixes it, when they
    span more than a quarter more or less ground than the model's (estimated at the scene's centre)."""
    size = ground_pixel_size_estimate(scene.crs, scene.transform, scene.width, scene.height)
    if size is None or abs(size / trained - 1) <= 0.25:
        return
    LOG.warning(
        "%s: a geographic CRS, pixels of about %.3g m on the ground, but the model was trained on %.3g m pixels and "
        "a scene in degrees is predicted on its own pixels; expect poorer masks. Reproject it to the model's pixel "
        "size first, for example: %s",
        scene.path,
        size,
        trained,
        reprojection_command(scene, trained),
    )


def reprojection_command(scene: Scene, pixel_m: float = 0.0) -> str:
    """A gdalwarp command that writes a copy of a scene in degrees or in Mercator in ground metres (at ``pixel_m``,
    0: GDAL's choice), beside it: CGCS2000 Gauss-Kruger for CGCS2000 scenes in China, UTM otherwise."""
    epsg = metric_epsg(scene.crs, scene.transform, scene.width, scene.height)
    size = f" -tr {pixel_m:g} {pixel_m:g}" if pixel_m > 0 else ""
    target = scene.path.with_name(f"{scene.path.stem}_{epsg}.tif")
    paths = f"{files.shell_quoted(scene.path)} {files.shell_quoted(target)}"
    return f"gdalwarp -t_srs EPSG:{epsg}{size} -r bilinear {paths}"


def predict_resampled(
    model: torch.nn.Module,
    scene: RasterScene,
    ratio: float,
    state: dict,
    device: torch.device,
    settings: SceneSettings,
    outputs: dict[str, Path],
) -> SceneCounts:
    """Predict a scene on the model's pixel grid, then bring mask (nearest) and probability (bilinear) back to
    the scene's own grid window by window; return the pixel counts on the scene's grid."""
    folder = outputs["mask"].parent
    folder.mkdir(parents=True, exist_ok=True)
    with ResampledScene(scene, ratio) as view, tempfile.TemporaryDirectory(dir=folder, prefix=".resampled.") as tmp:
        inner = {**outputs, "mask": Path(tmp) / "mask.tif", "probability": Path(tmp) / "prob.tif"}
        inner["style"] = Path(tmp) / "mask.qml"
        predict_scene(model, view, state, decision_threshold(state), device, settings, inner)
        counts = warp_back(inner["mask"], scene, outputs["mask"], Resampling.nearest)
        if settings.save_probability:
            warp_back(inner["probability"], scene, outputs["probability"], Resampling.bilinear)
    write_mask_style(outputs["style"])
    return counts


def warp_back(source: Path, scene: Scene, target: Path, resampling: Resampling) -> SceneCounts:
    """Write ``source`` (a mask or probability on another grid) onto the scene's grid at ``target``, a strip of
    rows at a time, with overviews; return its valid and farmland pixel counts (meaningful for a mask)."""
    counts, temporary = SceneCounts(), files.temporary_beside(target)
    grid = {"crs": scene.crs, "transform": scene.transform, "width": scene.width, "height": scene.height}
    try:
        with rasterio.open(source) as src, WarpedVRT(src, resampling=resampling, nodata=NODATA, **grid) as vrt:
            with (
                files.written_or_disk_error(target, GDAL_WRITE_ERRORS),
                rasterio.open(temporary, "w", **raster_profile(scene)) as dst,
            ):
                if resampling == Resampling.nearest:
                    dst.write_colormap(1, MASK_COLOURS)
                for top in range(0, scene.height, BLOCK * 4):
                    where = Window(0, top, scene.width, min(BLOCK * 4, scene.height - top))
                    rows = vrt.read(1, window=where)
                    # A pixel with data whose pixel on the model's grid was nodata (mostly nodata, where a nodata
                    # edge or speck cuts across it) takes the nearest prediction: it is no nodata of the scene.
                    rows = filled_nodata(rows[:, :, None], rows == NODATA)[:, :, 0]
                    # The scene's own nodata, which resampling blurred into its neighbours' classes.
                    pixels = scene.read_rows(top, top + int(where.height))
                    rows[nodata_pixels(pixels, scene.nodata, axis=2)] = NODATA
                    dst.write(rows, 1, window=where)
                    counts.valid += int(np.count_nonzero(rows != NODATA))
                    counts.farmland += int(np.count_nonzero(rows == FARMLAND))
        finish_geotiff(temporary, target, resampling if resampling == Resampling.nearest else Resampling.average)
    finally:
        temporary.unlink(missing_ok=True)
    return counts


VALUE_SAMPLE_ROWS = 256  # rows across the middle of a scene whose values are compared with the training tiles'


def warn_value_scale(model: torch.nn.Module, scene: Scene, state: dict) -> float | None:
    """Warn when the scene's pixels, scaled as tiles are (8-bit / 255, 16-bit / 65535), sit on another scale than
    the training tiles' (inference.on_value_scale): an 8-bit product of a scene predicted by a model trained on
    its 16-bit product, or the reverse, or reflectance. The network then sees values it never saw, and its mask is
    not worth reading. Return the median ratio of the scene's band means to the training tiles' (warned of or not),
    or None where there is nothing to compare."""
    trained = training_means(model, state)
    if trained is None:
        return None  # no training means to compare with: spare reading the scene
    top = max(0, scene.height // 2 - VALUE_SAMPLE_ROWS // 2)
    block = scene.read_rows(top, min(scene.height, top + VALUE_SAMPLE_ROWS))
    valid = ~nodata_pixels(block, scene.nodata, axis=2)  # NaN included: nodata_pixels counts it as nodata
    if not valid.any():
        return None
    try:  # reflectance a little outside [0, 1] (a bright cloud) clipped, as the prediction clips it
        values = image_to_float(clipped_reflectance(block, ~valid)[0], len(scene.bands), scene.path)
    except DataError:
        return None  # the prediction reports it
    means = values[:, valid].mean(axis=1)
    ratio = band_mean_ratio(model, state, means)
    if ratio is None or on_value_scale(ratio):
        return ratio
    shown = ", ".join(f"{v:.3g}" for v in means)
    expected = ", ".join(f"{v:.3g}" for v in trained.tolist())
    LOG.warning(
        "%s: its pixels (%s, scaled to [0, 1] %s) average %s per band, %.3g times the training tiles' (%s): "
        "the network will see values it never saw and its mask is not to be trusted. Predict the product the model "
        "was trained on (the same bit depth and processing: 16-bit DN, not an 8-bit stretch or reflectance), or "
        "train on tiles of this product",
        scene.path,
        scene.dtype,
        {"uint8": "as 8-bit / 255", "uint16": "as 16-bit / 65535"}.get(str(scene.dtype), "already"),
        shown,
        ratio,
        expected,
    )
    return ratio


def run_scene(
    model: torch.nn.Module,
    scene: Scene,
    state: dict,
    device: torch.device,
    settings: SceneSettings,
    outputs: dict[str, Path],
    model_file: Path,
) -> dict:
    """Predict one open scene with the network of ``model_file`` and write all its outputs; return its area
    row (also saved as JSON).

    GDAL's block cache is held to GDAL_CACHE_MB throughout: by default it may grow to 5 % of the machine's
    memory, and would fill with the scene's blocks as they are read.
    """
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        value_ratio = warn_value_scale(model, scene, state)
        ratio = resample_ratio(scene, state, settings)
        if ratio is None:
            counts = predict_scene(model, scene, state, decision_threshold(state), device, settings, outputs)
        else:
            counts = predict_resampled(model, scene, ratio, state, device, settings, outputs)
        fields = None
        with handing_back_freed_memory():  # peak memory: the polygons' or the prediction's, not both
            if settings.polygons:
                fields = write_fields(scene, settings, outputs)
            if settings.overlay:
                write_overlay(scene, outputs["mask"], outputs["overlay"], settings.shown)
    row = area_row(scene, counts, fields, outputs["mask"], model_file, state)
    remove_stale_outputs(outputs, settings)
    files.atomic_write_text(outputs["area"], json.dumps(row, indent=2, ensure_ascii=False) + "\n")
    LOG.info(
        "%s: %d x %d pixels, farmland %s of the valid pixels%s%s",
        scene.path.name,
        scene.width,
        scene.height,
        "n/a" if row["farmland_fraction"] is None else f"{row['farmland_fraction']:.1%}",
        "" if row["farmland_area_ha"] is None else f", {row['farmland_area_ha']:.2f} ha",
        "" if fields is None else f", {fields} field(s)",
    )
    if counts.valid == 0:
        warn_no_valid_pixel(scene.path)
    elif counts.valid >= ALL_FARMLAND_PIXELS and counts.farmland >= ALL_FARMLAND_SHARE * counts.valid:
        warn_all_farmland(scene.path, counts.farmland / counts.valid, value_ratio)
    return row


# Valid pixels (512 x 512) of a scene that cannot be farmland from edge to edge: four of make_tiles.py's 256-px
# tiles, which predict.py maps as scenes where georeferenced (16-bit or 4-band tiles), and which are all farmland
# wherever they were cut from inside a field.
ALL_FARMLAND_PIXELS = 512 * 512
ALL_FARMLAND_SHARE = 0.995  # the share of them farmland that calls a scene all farmland


def warn_all_farmland(path: Path, share: float, value_ratio: float | None) -> None:
    """Warn that (nearly) every valid pixel of a scene came out farmland: rare at that size (roads, ditches and
    villages break the fields up), but what a network given values brighter or otherwise unlike its training tiles'
    (another gain or processing, bands in another order) does, which the value-scale warning lets pass within 4
    times. A scene inside one large field is the false alarm; a warning, not a refusal."""
    compared = "" if value_ratio is None else f" (its band means are {value_ratio:.3g} times the training tiles')"
    LOG.warning(
        "%s: %.2f %% of its valid pixels are farmland, rare for a scene of this size (roads, ditches and villages "
        "break fields up): unless it lies inside one large field, the network most likely sees values unlike its "
        "training tiles'%s. Check that --bands gives the "
        "bands in the training tiles' order and that the scene is the product trained on (bit depth, gain, "
        "processing), or train on tiles of this product (make_tiles.py)",
        path,
        100 * share,
        compared,
    )


def warn_no_valid_pixel(path: Path) -> None:
    """Warn that a scene holds no pixel with data: its row of 0 ha would otherwise read as land without farmland."""
    LOG.warning(
        "%s: every pixel is nodata (the declared nodata value, 0 in every band, NaN or transparent), so nothing was "
        "predicted and its row in farmland_area.csv counts no area; expected imagery: check that the file is the "
        "export you meant (not an empty clip or a failed mosaic) and predict it again, or remove it from the folder",
        path,
    )


def remove_stale_outputs(outputs: dict[str, Path], settings: SceneSettings) -> None:
    """Remove the outputs of an earlier prediction of this scene that this configuration does not write (a
    probability, sieved mask, fields or overlay from other settings), so that none is left beside the new mask
    that disagrees with it."""
    wanted = set(wanted_outputs(outputs, settings))
    stale = [path for path in outputs.values() if path not in wanted and path.is_file()]
    for path in stale:
        path.unlink()
    if stale:
        LOG.info(
            "%s: removed %s, made by an earlier run with other settings",
            outputs["mask"].stem,
            ", ".join(p.name for p in stale),
        )


def is_finished(
    outputs: dict[str, Path], settings: SceneSettings, checkpoint: Path, image: Path, since: float = 0.0
) -> bool:
    """Whether an earlier run wrote every output this configuration wants for this very ``image`` file (its
    area file names it), after the checkpoint was made, after the image last changed and after ``since``
    (output_record.Since: older outputs were made with other settings). A scene of the same name from another
    folder (another date), or one exported again, is predicted again rather than taken for done."""
    since = max(since, Path(image).stat().st_mtime)
    return files.written_after(wanted_outputs(outputs, settings), checkpoint, since) and made_from(
        outputs["area"], image
    )


def made_from(area: Path, image: Path) -> bool:
    """Whether a scene's area file was written for ``image`` (the same file, however the path was spelt) as it
    is now (its size and time, and the SHA-256 of its bytes, where the area file records them)."""
    return record_made_from(files.read_record(area), image)


def record_made_from(row: object, image: Path) -> bool:
    """made_from, of an area file's record (files.read_record) already read."""
    recorded = (row.get("image_file") or row.get("image")) if isinstance(row, dict) else None
    # Unreadable, or from a version that did not record it: predict again.
    if not isinstance(recorded, str) or Path(recorded).resolve() != Path(image).resolve():
        return False
    stamp = files.file_stamp(image)
    if row.get("image_stamp", stamp) != stamp:
        return False
    return "image_sha256" not in row or row["image_sha256"] == files.file_digest(image)


def remove_outputs_of_earlier_version(outputs: dict[str, Path], image: Path) -> None:
    """After ``image`` failed: remove the outputs an earlier run made from an earlier version of this very file (one
    exported again), so that neither they nor their row in farmland_area.csv pass for it. Outputs of another file of
    the same name (another folder's) stay, as true for that file; outputs of the file as it is now stay too."""
    row = files.read_record(outputs["area"]) if outputs["area"].is_file() else None
    recorded = (row.get("image_file") or row.get("image")) if isinstance(row, dict) else None
    if not isinstance(recorded, str) or record_made_from(row, image):
        return
    if Path(recorded).resolve() != Path(image).resolve():
        LOG.warning("%s: the outputs of its name in %s are still those of %s", image, outputs["area"].parent, recorded)
        return
    stale = [path for path in outputs.values() if path.is_file()]
    for path in stale:
        path.unlink()
    LOG.warning(
        "%s: removed %s, made from an earlier version of this file, which no longer match it (and its row in "
        "farmland_area.csv); predict it again once it reads",
        image,
        ", ".join(path.name for path in stale),
    )


def predict_scenes(
    model: torch.nn.Module,
    paths: Sequence[Path],
    run_dir: Path,
    state: dict,
    device: torch.device,
    settings: SceneSettings,
    checkpoint: Path,
    skip_existing: bool = True,
    since: float = 0.0,
) -> tuple[int, int]:
    """Predict scenes one after another; return (predicted, failed). With ``skip_existing``, scenes whose outputs
    are newer than the checkpoint and than ``since`` are kept.

    Every scene is opened and its bands checked before the first is predicted, so a wrong band count
    is reported at once, not after hours of work on the scenes before it; bad scenes are reported and
    skipped, the others predicted.
    """
    in_channels, trained = state["config"]["in_channels"], str(state["config"].get("bands", ""))
    logging.getLogger("pyogrio").setLevel(logging.WARNING)  # it logs every file it writes at INFO
    if settings.save_sieved_mask and not settings.polygons:
        LOG.warning(
            "--save_sieved_mask=true writes no sieved mask with --polygons=false: the minimum mapping unit is applied "
            "as the fields are drawn; set --polygons=true for both"
        )
    done_before = [
        skip_existing and p.is_file() and is_finished(scene_outputs(run_dir, p), settings, checkpoint, p, since)
        for p in paths
    ]
    todo = [p for p, done in zip(paths, done_before) if not done]
    if len(todo) < len(paths):
        LOG.info(
            "%d of %d scene(s) already have their outputs from this checkpoint and are skipped "
            "(--skip_existing=false redoes them)",
            len(paths) - len(todo),
            len(paths),
        )
    failures, ready = 0, []
    for path in todo:
        try:
            with open_scene(path, settings.bands, in_channels, trained, warn=False):
                ready.append(path)
        except DataError as err:
            LOG.error("%s", err)
            remove_outputs_of_earlier_version(scene_outputs(run_dir, path), path)
            failures += 1
    if ready:
        LOG.info(
            "predicting %d scene(s) in windows of %d pixels overlapping by %d%s",
            len(ready),
            settings.window,
            settings.overlap,
            ", averaged over 8 flips and turns" if settings.tta else "",
        )
    done = 0
    for path in ready:
        try:
            with open_scene(path, settings.bands, in_channels, trained) as scene:
                run_scene(model, scene, state, device, settings, scene_outputs(run_dir, path), checkpoint)
            done += 1
        except DataError as err:
            LOG.error("%s", err)
            remove_outputs_of_earlier_version(scene_outputs(run_dir, path), path)
            failures += 1
    return done, failures


def write_run_table(run_dir: Path) -> Path:
    """Collect the area files of every scene predicted in run_dir (by this command or an earlier one) into
    run_dir/predictions/farmland_area.csv."""
    folder = Path(run_dir) / "predictions"
    rows = [json.loads(area.read_text(encoding="utf-8")) for area in sorted(folder.glob("*_area.json"))]
    table = folder / "farmland_area.csv"
    write_area_table(rows, table)
    return table
