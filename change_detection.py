"""Farmland change between two dates from their masks and farmland probability GeoTIFFs, in bounded memory.

The two dates are predicted by scene.py: ``<stem>_seg.tif`` (1 farmland, 0 background, 255 nodata: the
decision, made from the unrounded probability by the threshold ``t``) and ``<stem>_prob.tif`` (the farmland
probability in whole percent, 255 = nodata). This module turns the two dates into a change map on the
before-scene's grid, strip by strip:

- codes: 0 stable background, 1 stable farmland, 2 farmland lost, 3 farmland gained, 255 nodata (either date);
- a date's farmland is its mask, never its rounded probability, so that the change table's farmland of a date
  is the date's own mask and area;
- a pixel is lost (gained) only where the masks say farmland at one date and background at the other and both
  dates are confident: farmland probability, the whole percent the GeoTIFF holds, at least ``100 (t + margin)``
  at the one and at most ``100 (t - margin)`` at the other (ChangeRule.percent_cuts); every other pixel is
  stable: the class of its two masks where they agree, else farmland where the mean of its two probabilities
  is above ``t``;
- with an edge tolerance of N pixels, a lost pixel within N pixels of farmland of the after date (a gained
  pixel within N pixels of farmland of the before date) is stable: a field edge moved by misregistration;
- lost and gained patches (4-connected) smaller than the minimum mapping unit go back to stable. As in
  polygons.py, each strip is read with halo rows (the unit's pixels, capped at SIEVE_HALO_CAP, plus N), which
  makes the strip-by-strip map equal the map of the whole arrays.

When the two scenes differ in CRS, pixel size or extent, the after date is read through GDAL warped views on
the before-scene's grid (its mask nearest, its probability bilinear), window by window; outside the overlap is
nodata.
Then: lost and gained patches as polygons (with area and mean probabilities at both dates), a table of
hectares, an accuracy score against a true change map, and a preview figure.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import rasterio
import rasterio.features
import rasterio.warp
import shapely
import shapely.affinity
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine, array_bounds
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

import figures
import files
import polygons
import scene
from data_preprocess import picked_for_colour
from files import DataError
from rasters import north_up, write_palette_style

STABLE_BACKGROUND, STABLE_FARMLAND, LOST, GAINED = 0, 1, 2, 3
NODATA = scene.NODATA  # 255, as in the probability GeoTIFFs
CHANGE_NAMES = {
    STABLE_BACKGROUND: "stable background",
    STABLE_FARMLAND: "stable farmland",
    LOST: "farmland lost",
    GAINED: "farmland gained",
}
CHANGE_COLOURS = {
    STABLE_BACKGROUND: (40, 40, 40, 255),
    STABLE_FARMLAND: (235, 215, 120, 255),
    LOST: (215, 40, 40, 255),
    GAINED: (30, 110, 220, 255),
    NODATA: (255, 255, 255, 0),
}
# The version of the rule that makes the change classes and counts, recorded with every pair (change.py): a pair
# compared by an earlier rule is compared again. 2: a date's farmland is its mask (1: its probability rounded to
# whole percents, which counted the pixels written as exactly the threshold's percent as background).
RULE_VERSION = 2
STRIP = 1024  # change-map rows classified at a time (plus halo rows)
FIGURE_SIDE = 600  # longest side of each panel of the preview figure (about its size in the PNG)
CHANGE_FIELDS = [
    "pair",
    "before",
    "after",
    "grid",
    "crs",
    "pixel_area_m2",
    "valid_pixels",
    "valid_area_ha",
    "farmland_before_ha",
    "farmland_after_ha",
    "lost_ha",
    "gained_ha",
    "net_ha",
    "stable_farmland_ha",
    "stable_background_ha",
    "lost_patches",
    "gained_patches",
    "farmland_before_pixels",
    "farmland_after_pixels",
    "lost_pixels",
    "gained_pixels",
    "stable_farmland_pixels",
    "net_pixels",
    "stable_background_pixels",
    "change_map",
    "model",
    "epoch",
    "threshold",
    "change_margin",
]


class Date(NamedTuple):
    """One date as scene.py writes it: its mask (1 farmland, 0 background, 255 nodata; the decision) and its
    farmland probability in whole percent (255 nodata; for the margin and the mean). Arrays, open rasters or
    the files' paths."""

    mask: Any
    probability: Any


@dataclass(frozen=True)
class ChangeRule:
    """What counts as change: the decision threshold ``t`` (farmland probability), the confidence margin
    around it, the edge tolerance in pixels and the minimum mapping unit in pixels."""

    threshold: float = 0.5
    margin: float = 0.2
    edge_tolerance: int = 0
    min_pixels: int = 0

    def check(self) -> None:
        """Raises ValueError unless the margin and tolerance can work."""
        if not 0 <= self.margin < 0.5:
            raise ValueError(f"--change_margin={self.margin}: expected 0 to below 0.5 (for example 0.2)")
        if self.margin > min(self.threshold, 1 - self.threshold) + 1e-9:
            raise ValueError(
                f"--change_margin={self.margin} with the threshold {self.threshold:g}: a change would need a farmland "
                f"probability of at most {self.threshold - self.margin:g} at one date and at least "
                f"{self.threshold + self.margin:g} at the other, outside 0-1, so nothing could change; expected a "
                f"margin of at most {min(self.threshold, 1 - self.threshold):g} (or another --threshold)"
            )
        if self.edge_tolerance < 0:
            raise ValueError(f"--change_edge_tolerance={self.edge_tolerance}: expected 0 or more pixels")

    def percent_cuts(self) -> tuple[int, int, int]:
        """The rule on the whole percents P the probability GeoTIFFs hold: (confident farmland at or above,
        confident background at or below, the two dates' mean farmland when their sum is above), exactly
        P >= 100 (t + margin), P <= 100 (t - margin) and P_before + P_after > 200 t. With margin 0 nothing is
        asked of the probability: the masks alone decide (a mask cut at a t between two percents would
        otherwise fail P >= 100 t on the pixels written as the percent below t)."""
        levels = (self.threshold, self.threshold + self.margin, self.threshold - self.margin)
        centre, high, low = (round(100 * v, 6) for v in levels)  # 100 * (0.56 + 0.2) is 76.00000000000001
        if self.margin == 0:
            return 0, 100, math.floor(2 * centre)
        return math.ceil(high), math.floor(low), math.floor(2 * centre)


# --- the classes, on arrays ---------------------------------------------------------------------------


def farmland(mask: np.ndarray) -> np.ndarray:
    """Where a date's mask (1 farmland, 0 background, 255 nodata) is farmland: the date's own decision."""
    return mask == scene.FARMLAND


def holds_data(date: Date) -> np.ndarray:
    """Where a date holds data: in its mask and in its probability (scene.py writes both from the same pixels;
    resampled, the bilinear probability holds data wherever the nearest mask does)."""
    return (date.mask != NODATA) & (date.probability <= 100)


def stable_codes(before: Date, after: Date, rule: ChangeRule) -> np.ndarray:
    """The stable class of every pixel: the class of the two masks where they agree; where they differ,
    farmland (1) where the mean of the two probabilities is above the threshold, else background (0); nodata
    (255) where either date is nodata. uint8, the inputs' shape."""
    twice_centre = rule.percent_cuts()[2]
    farm_before, farm_after = farmland(before.mask), farmland(after.mask)
    total = before.probability.astype(np.int16)
    total += after.probability
    codes = np.where(farm_before == farm_after, farm_before, total > twice_centre).astype(np.uint8)
    codes[~(holds_data(before) & holds_data(after))] = NODATA
    return codes


def change_codes(before: Date, after: Date, rule: ChangeRule) -> np.ndarray:
    """The change classes of two dates on one grid, pixel by pixel (no tolerance, no minimum mapping unit).

    Args:
        before, after: each date's mask (1 farmland, 0 background, 255 nodata) and farmland probability in
            whole percent (0-100, 255 = nodata), any integer type.
        rule: threshold and margin.

    Returns:
        uint8 codes: 2 lost where the before mask is farmland with probability >= 100 (t + margin) and the
        after mask is background with probability <= 100 (t - margin), 3 gained the other way round, else the
        stable class (stable_codes); 255 where either date is nodata.
    """
    high, low, _ = rule.percent_cuts()
    farm_before, farm_after = farmland(before.mask), farmland(after.mask)
    lost = farm_before & ~farm_after & (before.probability >= high) & (after.probability <= low)
    gained = ~farm_before & farm_after & (after.probability >= high) & (before.probability <= low)
    codes = stable_codes(before, after, rule)
    codes[lost & (codes != NODATA)] = LOST
    codes[gained & (codes != NODATA)] = GAINED
    return codes


def absorb_edges(codes: np.ndarray, stable: np.ndarray, before: Date, after: Date, rule: ChangeRule) -> np.ndarray:
    """With an edge tolerance of N > 0 pixels: lost pixels within N pixels (Euclidean) of the after date's
    farmland, and gained pixels within N pixels of the before date's farmland, become stable. A copy."""
    n = rule.edge_tolerance
    if n <= 0:
        return codes
    # A disc of radius N: OpenCV's MORPH_ELLIPSE is not one (from N = 2 it reaches farther along rows than along
    # columns), so a field moved east would be forgiven more than one moved south.
    y, x = np.ogrid[-n : n + 1, -n : n + 1]
    kernel = (x * x + y * y <= n * n).astype(np.uint8)
    out = codes.copy()
    for code, other in ((LOST, after), (GAINED, before)):
        near = cv2.dilate(farmland(other.mask).view(np.uint8), kernel).view(bool)
        absorbed = (codes == code) & near
        out[absorbed] = stable[absorbed]
    return out


def sieve_changes(
    codes: np.ndarray, stable: np.ndarray, min_pixels: int, cut_top: bool = False, cut_bottom: bool = False
) -> np.ndarray:
    """Lost and gained patches (4-connected) of fewer than ``min_pixels`` pixels back to their stable class.

    Patches touching the top row when ``cut_top`` (the bottom row when ``cut_bottom``) go on beyond the block
    and are kept (polygons.small_pieces). A copy.
    """
    out = codes.copy()
    if min_pixels <= 1:
        return out
    for code in (LOST, GAINED):
        small = polygons.small_pieces(codes == code, min_pixels, cut_top, cut_bottom)
        out[small] = stable[small]
    return out


def classify_block(
    before: Date,
    after: Date,
    rule: ChangeRule,
    keep: slice = slice(None),
    cut_top: bool = False,
    cut_bottom: bool = False,
) -> np.ndarray:
    """The change map of rows ``keep`` of a block: the classes and the edge tolerance on the whole block, then
    the minimum mapping unit on the kept rows (the whole arrays by default)."""
    stable = stable_codes(before, after, rule)
    codes = absorb_edges(change_codes(before, after, rule), stable, before, after, rule)
    return sieve_changes(codes[keep], stable[keep], rule.min_pixels, cut_top, cut_bottom)


# --- the two grids -------------------------------------------------------------------------------------


def grid_of(item: scene.Scene | rasterio.io.DatasetReader) -> dict:
    """The pixel grid (crs, transform, width, height) of an open scene or raster."""
    return {"crs": item.crs, "transform": item.transform, "width": item.width, "height": item.height}


def extent(grid: dict) -> tuple[float, float, float, float]:
    """(west, south, east, north) of a grid (grid_of) in its CRS's units, west below east and south below north
    whatever way its rows run: rasterio's array_bounds gives a south-up grid's (positive y pixel size, rows from
    south to north) north as its south."""
    west, south, east, north = array_bounds(grid["height"], grid["width"], grid["transform"])
    return min(west, east), min(south, north), max(west, east), max(south, north)


def same_crs(first: rasterio.crs.CRS | None, second: rasterio.crs.CRS | None) -> bool:
    """Whether two CRSs are the same: equal, or both identified as one EPSG code (the same CRS written in another
    dialect, as an ESRI WKT, which rasterio does not call equal)."""
    if first is None or second is None:
        return first is second
    if first == second:
        return True
    try:
        code = first.to_epsg(confidence_threshold=90)
        return code is not None and code == second.to_epsg(confidence_threshold=90)
    except rasterio.errors.CRSError:  # a CRS that PROJ cannot identify
        return False


def check_grids(before: scene.Scene, after: scene.Scene) -> bool:
    """Whether the after scene lies on the before scene's grid (True) or must be resampled onto it (False).

    Raises:
        DataError: naming both files: one has a CRS and the other none, neither has one and their grids
            differ, or they do not overlap.
    """
    names = f"{before.path} (before) and {after.path} (after)"
    if (before.crs is None) != (after.crs is None):
        missing, other = (before, after) if before.crs is None else (after, before)
        raise DataError(
            f"{names}: {missing.path} has no CRS, {other.path} has {other.crs.to_string()}; the dates cannot be put "
            "on one grid. Georeference both (gdal_translate -a_srs / -a_ullr), or give two tiles of the same size "
            "without georeference"
        )
    same_size = (before.width, before.height) == (after.width, after.height)
    if before.crs is None:
        # As with a CRS below: judged in pixels (same_pixels), as a world file in degrees has pixels of 2.7e-6 at 0.3 m.
        if same_size and same_pixels(before.transform, after.transform, before.width, before.height):
            return True
        if same_size:  # placed by geotransforms (world files) alone, at other places or pixel sizes
            b, a = before.transform, after.transform
            raise DataError(
                f"{names}: neither has a CRS, and their geotransforms differ ({transform_text(b)} against "
                f"{transform_text(a)}), so their pixels are not the same places; expected the same geotransform, or "
                "name the CRS of both (gdal_translate -a_srs EPSG:xxxx) so that the after date can be resampled onto "
                "the before grid"
            )
        raise DataError(
            f"{names}: neither has a CRS, and their grids differ ({before.width}x{before.height} against "
            f"{after.width}x{after.height} pixels); expected the same size, or georeference both"
        )
    if (
        same_size
        and same_crs(before.crs, after.crs)
        and same_pixels(before.transform, after.transform, before.width, before.height)
    ):
        return True
    west, south, east, north = extent(grid_of(before))
    try:
        a_west, a_south, a_east, a_north = rasterio.warp.transform_bounds(
            after.crs, before.crs, *extent(grid_of(after)), densify_pts=21
        )
    except (rasterio.errors.CRSError, ValueError) as err:  # GDAL cannot project one onto the other
        raise DataError(f"{names}: the after scene cannot be projected onto the before scene's CRS ({err})") from None
    if min(east, a_east) <= max(west, a_west) or min(north, a_north) <= max(south, a_south):
        raise DataError(
            f"{names}: the scenes do not overlap: before covers x {west:.1f} to {east:.1f}, y {south:.1f} to "
            f"{north:.1f} and after x {a_west:.1f} to {a_east:.1f}, y {a_south:.1f} to {a_north:.1f} in "
            f"{before.crs.to_string()}; expected two dates of the same place"
        )
    return False


@contextlib.contextmanager
def on_grid(path: Path, grid: dict, aligned: bool, resampling: Resampling = Resampling.bilinear) -> Iterator:
    """A raster opened for reading on ``grid``: the file itself when it lies on it, else a warped view of it
    (``resampling``; outside the file's extent is nodata)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            if aligned:
                yield src
                return
            with WarpedVRT(src, resampling=resampling, nodata=NODATA, src_nodata=NODATA, **grid) as vrt:
                yield vrt


@contextlib.contextmanager
def open_dates(before: Date, after: Date, aligned: bool) -> Iterator[tuple[Date, Date]]:
    """Both dates' mask and probability opened on the before grid: the after ones as they are when ``aligned``,
    else through warped views (the mask nearest, so that it stays a mask; the probability bilinear)."""
    with rasterio.open(before.mask) as b_mask, rasterio.open(before.probability) as b_prob:
        grid = grid_of(b_prob)
        with (
            on_grid(after.mask, grid, aligned, Resampling.nearest) as a_mask,
            on_grid(after.probability, grid, aligned) as a_prob,
        ):
            yield Date(b_mask, b_prob), Date(a_mask, a_prob)


# --- the change map --------------------------------------------------------------------------------------


@dataclass
class ChangeCounts:
    """Pixel counts of one change map (farmland at each date, by its mask, counted where both dates hold
    data)."""

    valid: int = 0
    farmland_before: int = 0
    farmland_after: int = 0
    lost: int = 0
    gained: int = 0
    stable_farmland: int = 0
    disagree: int = 0  # farmland at one date and not the other by the masks alone, margin or not
    sure: int = 0  # of those, the ones past the margin at both dates (before the edge tolerance and the sieve)

    def add(self, codes: np.ndarray, before: Date, after: Date, rule: ChangeRule) -> None:
        """Count a strip of the map and its two dates."""
        valid = codes != NODATA
        self.valid += int(np.count_nonzero(valid))
        farmland_before, farmland_after = farmland(before.mask) & valid, farmland(after.mask) & valid
        self.farmland_before += int(np.count_nonzero(farmland_before))
        self.farmland_after += int(np.count_nonzero(farmland_after))
        self.disagree += int(np.count_nonzero(farmland_before != farmland_after))
        self.sure += int(np.count_nonzero(valid & np.isin(change_codes(before, after, rule), (LOST, GAINED))))
        self.lost += int(np.count_nonzero(codes == LOST))
        self.gained += int(np.count_nonzero(codes == GAINED))
        self.stable_farmland += int(np.count_nonzero(codes == STABLE_FARMLAND))


def margin_hides_change(counts: ChangeCounts) -> bool:
    """Whether the confidence margin keeps most of the change by the threshold out of the map: at least 1 % of
    the valid pixels differ between the dates by the threshold, and under a quarter of those lie past the margin
    at both dates (a network whose probabilities seldom leave threshold +- margin, as one trained briefly); the
    edge tolerance and the minimum mapping unit, which remove change for other reasons, are not counted."""
    return counts.disagree >= 0.01 * counts.valid and counts.sure < 0.25 * counts.disagree


def margin_warning(name: str, counts: ChangeCounts, rule: ChangeRule) -> str:
    """The warning for a pair whose confidence margin hides most of the change by the threshold
    (margin_hides_change): both shares, the probabilities' band, and a smaller margin to try than the one used."""
    low, high = (round(rule.threshold + sign * rule.margin, 4) for sign in (-1, 1))
    return (
        f"{name}: {100 * counts.disagree / counts.valid:.1f}% of the valid pixels are farmland at one date and not "
        f"the other by the threshold {round(rule.threshold, 4):g}, but only {100 * counts.sure / counts.valid:.1f}% "
        f"pass the confidence margin (--change_margin={rule.margin:g}): the network's probabilities seldom leave "
        f"{low:g} to {high:g}. A smaller --change_margin (for example {rule.margin / 2:g}) finds more change, less "
        "surely; a network trained longer separates the classes better"
    )


def change_strips(
    before: Date, after: Date, rule: ChangeRule, strip: int = 0
) -> Iterator[tuple[int, np.ndarray, Date, Date]]:
    """(first row, change codes, before and after rows) of two dates' open rasters on one grid, ``strip`` rows
    (STRIP when 0) at a time, each classified with halo rows: exactly classify_block of the whole rasters."""
    strip = strip or STRIP
    height, width = before.mask.height, before.mask.width
    sieve_halo = min(rule.min_pixels, polygons.SIEVE_HALO_CAP) if rule.min_pixels > 1 else 0
    halo = sieve_halo + rule.edge_tolerance
    for top in range(0, height, strip):
        bottom = min(top + strip, height)
        low, high = max(0, top - halo), min(height, bottom + halo)
        window = Window(0, low, width, high - low)
        b, a = (Date(*(raster.read(1, window=window) for raster in date)) for date in (before, after))
        # The tolerance is right on every row but the outer ``edge_tolerance`` ones: sieve only these.
        s_low, s_high = max(0, top - sieve_halo), min(height, bottom + sieve_halo)
        codes = classify_block(b, a, rule, slice(s_low - low, s_high - low), s_low > 0, s_high < height)
        kept = slice(top - low, bottom - low)
        rows = [Date(date.mask[kept], date.probability[kept]) for date in (b, a)]
        yield top, codes[top - s_low : bottom - s_low], rows[0], rows[1]


def write_change_map(before: Date, after: Date, aligned: bool, rule: ChangeRule, target: Path) -> ChangeCounts:
    """Classify two dates' masks and probability GeoTIFFs (the after ones resampled onto the before grid,
    nearest and bilinear, unless ``aligned``) into a change GeoTIFF at ``target`` on the before grid: uint8
    with a colour table, tiled, compressed, with overviews and a QGIS style beside it. Written under a
    temporary name, then renamed."""
    counts, temporary = ChangeCounts(), files.temporary_beside(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            with open_dates(before, after, aligned) as (b, a):
                with rasterio.open(temporary, "w", **scene.raster_profile(b.probability)) as dst:
                    dst.write_colormap(1, CHANGE_COLOURS)
                    for top, codes, b_rows, a_rows in change_strips(b, a, rule):
                        dst.write(codes, 1, window=Window(0, top, dst.width, codes.shape[0]))
                        counts.add(codes, b_rows, a_rows, rule)
            scene.add_overviews(temporary, Resampling.nearest)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
    write_change_style(target.with_suffix(".qml"))
    return counts


def write_change_style(path: Path) -> None:
    """A QGIS layer style beside a change GeoTIFF: a paletted renderer with the four classes, nodata clear."""
    entries = [
        (code, (r, g, b), 90 if code == STABLE_BACKGROUND else 255, CHANGE_NAMES[code])
        for code, (r, g, b, _) in CHANGE_COLOURS.items()
        if code != NODATA
    ]
    write_palette_style(path, entries)


# --- patches as polygons -------------------------------------------------------------------------------


Patch = tuple[shapely.Polygon, np.ndarray]  # pixel coordinates; [sum of before %, sum of after %, pixels]


def strip_patches(
    codes: np.ndarray, before: np.ndarray, after: np.ndarray, code: int, top: int
) -> tuple[polygons.Strip, np.ndarray]:
    """The 4-connected pieces of ``code`` in a strip of change rows: their labels and polygons in scene pixel
    coordinates, and per label the sums of the two probabilities and the pixel count."""
    binary = codes == code
    count, labels = cv2.connectedComponents(binary.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    inside = binary.ravel()
    flat = labels.ravel()[inside]  # only the patches' pixels: usually a small share of the strip
    sums = np.stack([np.bincount(flat, w, count) for w in (before.ravel()[inside], after.ravel()[inside], None)], 1)
    pieces: list[tuple[int, shapely.Polygon]] = []
    if count > 1:
        shapes = rasterio.features.shapes(labels, mask=binary, connectivity=4, transform=Affine.translation(0, top))
        pieces = [(int(value), shapely.geometry.shape(geometry)) for geometry, value in shapes]
    return polygons.Strip(top, top + codes.shape[0], pieces, labels[0].copy(), labels[-1].copy()), sums


def whole_patches(pieces: list[Patch]) -> list[Patch]:
    """The pieces of one patch unioned, with their sums added; were the union to fall apart into parts
    (pieces meeting at a corner only), each piece's sums go to the part that holds it."""
    if len(pieces) == 1:
        return pieces
    union = shapely.union_all([shape for shape, _ in pieces])
    parts = list(getattr(union, "geoms", [union]))
    totals = [np.zeros(3) for _ in parts]
    for shape, sums in pieces:
        inside = shape.representative_point()
        totals[next((k for k, part in enumerate(parts) if part.intersects(inside)), 0)] += sums
    return list(zip(parts, totals))


def change_patches(
    change: rasterio.io.DatasetReader, before: rasterio.io.DatasetReader, after: rasterio.io.DatasetReader
) -> Iterator[tuple[int, Patch]]:
    """(LOST or GAINED, patch) for every lost and gained patch of a change map, each as soon as it is whole,
    with the sums of the two probabilities over it: a strip of rows at a time, pieces cut by a seam joined."""
    joiners = {code: polygons.SeamJoiner(change.height, merge=whole_patches) for code in (LOST, GAINED)}
    for top in range(0, change.height, STRIP):
        window = Window(0, top, change.width, min(STRIP, change.height - top))
        codes, b, a = change.read(1, window=window), before.read(1, window=window), after.read(1, window=window)
        for code, joiner in joiners.items():
            strip, sums = strip_patches(codes, b, a, code, top)
            items = [(label, (piece, sums[label])) for label, piece in strip.pieces]
            yield from ((code, patch) for patch in joiner.add_strip(strip, items))
    for code, joiner in joiners.items():
        yield from ((code, patch) for patch in joiner.close())


def write_change_polygons(
    change_path: Path,
    before_prob: Path,
    after_prob: Path,
    aligned: bool,
    targets: dict[str, Path],
    min_pixels: int,
    simplify_tolerance: float = 0.0,
) -> dict[str, int]:
    """Write the lost and gained patches of a change map as GeoPackage and GeoJSON (``targets``: "gpkg",
    "geojson") in its CRS, with ``change`` (lost or gained), ``area_ha`` (empty without a projected CRS),
    ``pixels`` and the mean farmland probability at both dates; return the patch count of each kind.

    Patches under ``min_pixels`` are left out (the map's sieve has removed them already, except where a
    unit above polygons.SIEVE_HALO_CAP pixels made it keep a long sliver)."""
    columns = {
        "patch_id": int,
        "change": str,
        "area_ha": float,
        "pixels": int,
        "prob_before": float,
        "prob_after": float,
    }
    written = {"lost": 0, "gained": 0}
    with (
        rasterio.open(before_prob) as before,
        on_grid(after_prob, grid_of(before), aligned) as after,
        rasterio.open(change_path) as change,
    ):
        t, pixel_m2 = before.transform, scene.pixel_area_m2(before.crs, before.transform)
        placed = not t.is_identity  # without a CRS, map coordinates of a geotransform or pixels
        with polygons.PolygonWriter(targets, columns, before.crs, layer="changes", placed=placed) as writer:
            for code, (polygon, sums) in change_patches(change, before, after):
                pixels = int(sums[2])
                if pixels < min_pixels:
                    continue
                shape = shapely.affinity.affine_transform(polygon, [t.a, t.b, t.d, t.e, t.c, t.f])
                if simplify_tolerance > 0:
                    shape = shape.simplify(simplify_tolerance, preserve_topology=True)
                shape = polygons.right_hand(shape)
                kind = "lost" if code == LOST else "gained"
                written[kind] += 1
                writer.add(
                    shape,
                    patch_id=sum(written.values()),
                    change=kind,
                    area_ha=None if pixel_m2 is None else round(pixels * pixel_m2 / 1e4, 6),
                    pixels=pixels,
                    prob_before=round(float(sums[0] / pixels / 100), 4),
                    prob_after=round(float(sums[1] / pixels / 100), 4),
                )
            writer.close()
    return written


# --- the table, the score, the figure --------------------------------------------------------------------


def change_row(
    name: str,
    before: Path,
    after: Path,
    grid: dict,
    aligned: bool,
    counts: ChangeCounts,
    patches: dict[str, int],
    change_map: Path,
) -> dict:
    """One line of the change table: pixel counts always, hectares with a projected CRS on the before grid
    (net = gained - lost; stable background = valid - stable farmland - lost - gained)."""
    pixel_m2 = scene.pixel_area_m2(grid["crs"], grid["transform"])

    def hectares(pixels: int) -> float | None:
        return None if pixel_m2 is None else round(pixels * pixel_m2 / 1e4, 6)

    stable_background = counts.valid - counts.stable_farmland - counts.lost - counts.gained
    return {
        "pair": name,
        "before": str(before),
        "after": str(after),
        "grid": "aligned" if aligned else "after resampled onto before",
        "crs": grid["crs"].to_string() if grid["crs"] is not None else "",
        "pixel_area_m2": pixel_m2,
        "valid_pixels": counts.valid,
        "valid_area_ha": hectares(counts.valid),
        "farmland_before_ha": hectares(counts.farmland_before),
        "farmland_after_ha": hectares(counts.farmland_after),
        "lost_ha": hectares(counts.lost),
        "gained_ha": hectares(counts.gained),
        "net_ha": hectares(counts.gained - counts.lost),
        "stable_farmland_ha": hectares(counts.stable_farmland),
        "stable_background_ha": hectares(stable_background),
        "lost_patches": patches["lost"],
        "gained_patches": patches["gained"],
        "farmland_before_pixels": counts.farmland_before,
        "farmland_after_pixels": counts.farmland_after,
        "lost_pixels": counts.lost,
        "gained_pixels": counts.gained,
        "stable_farmland_pixels": counts.stable_farmland,
        "net_pixels": counts.gained - counts.lost,
        "stable_background_pixels": stable_background,
        "change_map": change_map.name,
    }


def write_change_table(rows: list[dict], path: Path) -> None:
    """Write the change rows of a run as CSV (atomically); empty cells where a figure is undefined. The net and
    stable background pixels that rows of earlier versions lack are derived from their other pixel counts."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CHANGE_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        counts = [row.get(f"{k}_pixels") for k in ("valid", "stable_farmland", "lost", "gained")]
        if all(isinstance(count, int) for count in counts):
            valid, stable_farmland, lost, gained = counts
            row = {
                "net_pixels": gained - lost,
                "stable_background_pixels": valid - stable_farmland - lost - gained,
            } | row
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in CHANGE_FIELDS})
    files.atomic_write_csv(path, buffer.getvalue())


def score_change(change_path: Path, truth_path: Path) -> dict:
    """IoU of "lost" and of "gained" of a change map against a true change map on the same grid (codes 0-3,
    255 = unknown), over the pixels both hold data for, and the hectares of each (pixels without a projected
    CRS); read a strip of rows at a time.

    Raises:
        DataError: the truth cannot be read, lies on another grid or holds values other than 0-3 and 255.
    """
    with rasterio.open(change_path) as pred:
        check_truth(truth_path, grid_of(pred), f"the change map {change_path.name}")
        with rasterio.open(truth_path) as truth:
            counts = np.zeros((2, 3), np.int64)  # lost, gained x (both, predicted only, true only)
            found: set[int] = set()
            for top in range(0, pred.height, STRIP):
                window = Window(0, top, pred.width, min(STRIP, pred.height - top))
                p, t = pred.read(1, window=window), truth.read(1, window=window)
                found.update(np.unique(t).tolist())
                valid = (p != NODATA) & (t != NODATA)
                for i, code in enumerate((LOST, GAINED)):
                    is_p, is_t = (p == code) & valid, (t == code) & valid
                    counts[i] += [
                        np.count_nonzero(is_p & is_t),
                        np.count_nonzero(is_p & ~is_t),
                        np.count_nonzero(~is_p & is_t),
                    ]
            pixel_m2 = scene.pixel_area_m2(pred.crs, pred.transform)
    if stray := sorted(found - {*CHANGE_NAMES, NODATA}):
        raise DataError(
            f"--change_truth={truth_path}: holds the values {sorted(found)}; expected the change codes 0 stable "
            f"background, 1 stable farmland, 2 farmland lost, 3 farmland gained and 255 unknown, not {stray}. "
            "Recode it (a map of changed/unchanged pixels cannot say lost from gained)"
        )
    return accuracy_from_counts(counts, pixel_m2)


def check_truth(truth_path: Path, grid: dict, where: str) -> None:
    """Check a true change map against the before scene's ``grid`` (grid_of): readable, of the same size and,
    when georeferenced, of the same CRS and transform (a truth without a CRS is taken as the same pixels).

    Raises:
        DataError: naming the truth, the grid expected (``where``: the change map or the before scene) and the
            grid found.
    """
    try:
        truth = rasterio.open(truth_path)
    except rasterio.RasterioIOError as err:
        raise DataError(f"--change_truth={truth_path}: not a readable raster ({str(err)[:200]})") from None
    with truth:
        t, g, crs = truth.transform, grid["transform"], grid["crs"]
        same_size = (truth.width, truth.height) == (grid["width"], grid["height"])
        if truth.crs is None and not same_size:
            raise DataError(
                f"--change_truth={truth_path}: {truth.width}x{truth.height} pixels, expected the before "
                f"scene's grid of {grid['width']}x{grid['height']} ({where}); a truth without a CRS is taken as the "
                "before scene's pixels: give it the before scene's size, or its CRS and geotransform and warp it there"
            )
        on_grid = same_size and same_crs(truth.crs, crs) and same_pixels(t, g, grid["width"], grid["height"])
        if truth.crs is not None and not on_grid:
            raise DataError(
                f"--change_truth={truth_path}: lies on another grid than the before scene ({truth.crs.to_string()}, "
                f"{truth.width}x{truth.height} pixels, {transform_text(t)} against "
                f"{crs.to_string() if crs else 'no CRS'}, {grid['width']}x{grid['height']} pixels, "
                f"{transform_text(g)} in {where}); expected the true change on the before scene's "
                f"grid: {truth_warp_command(Path(truth_path), grid)}"
            )


def same_pixels(first: Affine, second: Affine, width: int, height: int) -> bool:
    """Whether two geotransforms put the pixels of a ``width`` x ``height`` grid at the same places: each corner
    within a millionth of a pixel, so that float noise in large map coordinates (a unit in the last place of a Web
    Mercator or a southern UTM origin, above almost_equals' 1e-9) is no move, whatever the pixel size."""
    if not second.determinant:  # no pixel grid at all
        return first == second
    to_second = ~second @ first
    corners = ((0, 0), (width, 0), (0, height), (width, height))
    return all(math.dist(to_second @ corner, corner) < 1e-6 for corner in corners)


def transform_text(transform: Affine) -> str:
    """A geotransform as a message shows it: its origin and pixel width and height (negative height: north-up),
    and its rotation terms where there are any, so that two grids told apart are told apart in the message too."""
    t = transform
    text = f"origin {t.c:.12g}, {t.f:.12g}, pixel {t.a:.12g} x {t.e:.12g}"
    return text + (f", rotation {t.b:.12g}, {t.d:.12g}" if t.b or t.d else "")


def truth_warp_command(truth_path: Path, grid: dict) -> str:
    """How to put a true change map on the before scene's ``grid`` (grid_of): a gdalwarp command with the grid's
    CRS (its EPSG code where that names the same CRS, else its WKT), extent and size (nearest, 255 outside the
    truth); for a grid without a CRS, or rotated or south-up (gdalwarp -te/-ts writes north-up grids only), what to
    do instead."""
    g, crs = grid["transform"], grid["crs"]
    size = f"{grid['width']}x{grid['height']}"
    target = truth_path.with_name(f"{truth_path.stem}_on_before_grid.tif")
    if crs is None:
        return (
            f"the before scene has no CRS, so nothing can be warped onto it: give the truth its {size} pixels and "
            "no CRS (taken as the same pixels), or name the before scene's CRS (gdal_translate -a_srs EPSG:xxxx)"
        )
    if g.b or g.d or g.a < 0 or g.e > 0:
        return (
            "the before grid is rotated or south-up, which gdalwarp -te/-ts cannot write: warp the truth into a copy "
            "of the before grid holding 255, for example gdal_create -if <before scene> -bands 1 -ot Byte -burn 255 "
            f"-a_nodata 255 {files.shell_quoted(target)}, then gdalwarp -r near {files.shell_quoted(truth_path)} "
            f"{files.shell_quoted(target)}"
        )
    west, south, east, north = (float(v) for v in array_bounds(grid["height"], grid["width"], g))
    code = crs.to_epsg()  # confidence 70: where that names another CRS, the warped truth would be refused again
    srs = f"EPSG:{code}" if code and same_crs(rasterio.crs.CRS.from_epsg(code), crs) else crs.to_wkt()
    return (
        f"warp it there, for example gdalwarp -t_srs {files.shell_quoted(srs)} -te {west!r} {south!r} {east!r} "
        f"{north!r} -ts {grid['width']} {grid['height']} -r near -dstnodata 255 {files.shell_quoted(truth_path)} "
        f"{files.shell_quoted(target)}"
    )


def accuracy_from_counts(counts: np.ndarray, pixel_m2: float | None) -> dict:
    """IoU, predicted and true area, and the area error of lost and gained from (both, predicted only,
    true only) pixel counts; areas in hectares with a pixel area, else in pixels; the true pixels counted too
    (an area of a few pixels under centimetre pixels rounds to 0 ha)."""
    unit, scale = ("ha", pixel_m2 / 1e4) if pixel_m2 else ("pixels", 1.0)
    result: dict = {"area_unit": unit}
    for (both, predicted_only, true_only), kind in zip(counts.tolist(), ("lost", "gained")):
        union = both + predicted_only + true_only
        predicted, true = (both + predicted_only) * scale, (both + true_only) * scale
        result[f"{kind}_iou"] = round(both / union, 4) if union else None
        result[f"{kind}_predicted"] = round(predicted, 4)
        result[f"{kind}_true"] = round(true, 4)
        result[f"{kind}_true_pixels"] = both + true_only
        result[f"{kind}_error"] = round(predicted - true, 4)
        result[f"{kind}_relative_error"] = round((predicted - true) / true, 4) if true else None
    return result


def preview_shape(height: int, width: int, side: int = FIGURE_SIDE) -> tuple[int, int]:
    """(height, width) of a preview at most ``side`` pixels a side."""
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def photo_preview(
    image: scene.Scene, grid: dict, aligned: bool, shape: tuple[int, int], shown: Sequence[int] = ()
) -> np.ndarray:
    """An (H, W, 3) float RGB preview of a scene on the before grid, its channels at ``shown`` (SceneSettings)
    as colour or grey, shrunk without reading it whole (the scene's own reader when aligned; else a warped
    view of its file)."""
    if aligned:
        small = image.read_preview(*shape)
    else:
        small_grid = {**grid, "height": shape[0], "width": shape[1]}
        small_grid["transform"] = grid["transform"] @ Affine.scale(grid["width"] / shape[1], grid["height"] / shape[0])
        with rasterio.open(image.path) as src, WarpedVRT(src, resampling=Resampling.average, **small_grid) as vrt:
            small = vrt.read(list(image.bands)).transpose(1, 2, 0)
    photo = scene.preview_photo(image, small)
    picked = photo[picked_for_colour(photo.shape[0], shown)]
    return np.clip(np.broadcast_to(picked.transpose(1, 2, 0), (*shape, 3)), 0, 1)


def write_change_figure(
    before: scene.Scene, after: scene.Scene, aligned: bool, change_path: Path, target: Path, shown: Sequence[int] = ()
) -> None:
    """Before, after (their channels at ``shown``: SceneSettings.shown) and the change map side by side, each
    shrunk to at most FIGURE_SIDE pixels a side and north up (PNG)."""
    from matplotlib.patches import Patch

    grid = grid_of(before)
    shape = preview_shape(before.height, before.width)
    with rasterio.open(change_path) as src:
        codes = src.read(1, out_shape=shape, resampling=Resampling.nearest)
    lut = np.zeros((256, 4), np.float32)
    for code, colour in CHANGE_COLOURS.items():
        lut[code] = np.asarray(colour) / 255
    fig, axes = figures.subplots(1, 3, figsize=(15, 5.6))
    panels = [
        (photo_preview(before, grid, True, shape, shown), f"before: {before.path.name}"),
        (photo_preview(after, grid, aligned, shape, shown), f"after: {after.path.name}"),
        (lut[codes], "change"),
    ]
    for ax, (picture, title) in zip(axes, panels):
        ax.imshow(north_up(picture, grid["transform"]), interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    legend = [Patch(color=lut[code][:3], label=CHANGE_NAMES[code]) for code in CHANGE_NAMES]
    axes[2].legend(handles=legend, loc="lower right", fontsize=8, framealpha=0.85)
    figures.save_figure(fig, target)
