"""Field polygons from a class mask GeoTIFF, in bounded memory and time whatever the mask looks like.

A minimum mapping unit comes first, as GIS practice does it: farmland islands smaller than ``min_pixels``
become background and background holes smaller than it become farmland (4-connected pieces, nodata left
alone). The mask is then vectorised a strip of rows at a time. A field that does not reach a strip's seam
is written at once; only the pieces that reach a seam wait for their continuation in the next strip, where
they are joined. Pixel coordinates are whole numbers, so shared edges match exactly.

The sieve works on a strip with ``halo`` extra rows above and below. A piece that reaches the strip's rows
and the edge of the halo spans more than ``halo`` rows, so it has more than ``halo`` pixels: with a halo of
``min_pixels`` rows the sieve is exact. The halo is capped at SIEVE_HALO_CAP rows, so a very large unit
(more pixels than the cap) may keep a thin sliver longer than the cap rows; a piece that reaches a cut edge
is never removed on a guess.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import cv2
import numpy as np
import rasterio
import rasterio.enums
import rasterio.features
import shapely
import shapely.affinity
from pyogrio import read_info
from pyogrio.errors import DataLayerError, DataSourceError
from pyogrio.raw import write as write_vector
from rasterio.transform import Affine
from rasterio.windows import Window

import files

FARMLAND = 1
STRIP = 1024  # mask rows sieved and vectorised at a time
SIEVE_HALO_CAP = 2048  # most rows read above and below a strip for the sieve
BATCH = 4096  # polygons written to the vector files at a time
LARGE = 100_000  # coordinates of a polygon written on its own, its GeoJSON a block at a time
CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8)  # a pixel's 4-connected neighbours and itself


def small_pieces(
    binary: np.ndarray, min_pixels: int, cut_top: bool, cut_bottom: bool, near: np.ndarray | None = None
) -> np.ndarray:
    """Where the 4-connected pieces of ``binary`` (bool, H x W) with fewer than ``min_pixels`` pixels lie; with
    ``near`` (bool, H x W), only the pieces that hold a pixel of it.

    Pieces that touch the top row when ``cut_top`` (or the bottom row when ``cut_bottom``) continue beyond
    the block: they are never counted small.
    """
    _, labels, stats, _ = cv2.connectedComponentsWithStats(binary.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    small = stats[:, cv2.CC_STAT_AREA] < min_pixels
    if near is not None:
        touching = np.zeros_like(small)
        touching[np.unique(labels[near & binary])] = True
        small &= touching
    small[0] = False  # label 0 is everything outside ``binary``
    if cut_top:
        small[np.unique(labels[0])] = False
    if cut_bottom:
        small[np.unique(labels[-1])] = False
    return small[labels]


def sieve_block(block: np.ndarray, min_pixels: int, cut_top: bool, cut_bottom: bool) -> np.ndarray:
    """A copy of a block of mask rows with farmland islands, then background holes, under ``min_pixels``
    removed (islands first, so a speck inside a small hole does not keep the hole open). Nodata stays.

    A hole is background beside farmland: a removed island with only nodata and the block's edges around it
    would otherwise come back as a hole, in the sieved mask but under the unit, so without a field.
    """
    mask = block.copy()
    if min_pixels <= 1:
        return mask
    mask[small_pieces(mask == FARMLAND, min_pixels, cut_top, cut_bottom)] = 0
    beside = cv2.dilate((mask == FARMLAND).view(np.uint8), CROSS).view(bool)
    mask[small_pieces(mask == 0, min_pixels, cut_top, cut_bottom, beside)] = FARMLAND
    return mask


def sieved_strips(src: rasterio.io.DatasetReader, min_pixels: int, strip: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, sieved rows) of a mask GeoTIFF, ``strip`` rows (STRIP when 0) at a time, each sieved with a
    halo of rows."""
    strip = strip or STRIP
    halo = min(max(min_pixels, 0), SIEVE_HALO_CAP)
    for top in range(0, src.height, strip):
        bottom = min(top + strip, src.height)
        low, high = max(0, top - halo), min(src.height, bottom + halo)
        block = src.read(1, window=Window(0, low, src.width, high - low))
        sieved = sieve_block(block, min_pixels, low > 0, high < src.height)
        yield top, sieved[top - low : bottom - low]


@dataclass
class Strip:
    """One strip's farmland pieces with their 4-connected component labels, and the labels of its first and
    last rows (0 = not farmland), by which pieces are linked across seams."""

    top: int
    bottom: int
    pieces: list[tuple[int, shapely.Polygon]]
    first_row: np.ndarray
    last_row: np.ndarray


def strip_pieces(rows: np.ndarray, top: int) -> Strip:
    """Label the farmland of a strip of mask rows (4-connected) and trace each label's polygon in scene pixel
    coordinates: one polygon per label, holes included."""
    farmland = rows == FARMLAND
    count, labels = cv2.connectedComponents(farmland.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    pieces: list[tuple[int, shapely.Polygon]] = []
    if count > 1:
        shapes = rasterio.features.shapes(labels, mask=farmland, connectivity=4, transform=Affine.translation(0, top))
        pieces = [(int(value), shapely.geometry.shape(geometry)) for geometry, value in shapes]
    return Strip(top, top + rows.shape[0], pieces, labels[0].copy(), labels[-1].copy())


@dataclass
class SeamJoiner:
    """Joins the pieces of regions cut by strip seams and hands back every region once it is whole.

    Pieces are linked by their labels where a pixel of one strip's last row sits above one of the next
    strip's first row (4-connectivity), with union-find over (strip, label) keys; no geometry is compared.
    A region's pieces wait (as ``keep`` stores them) until no piece of it reaches the latest seam, then
    ``merge`` joins them once. Items are (label, piece); fields are polygons, change.py's patches carry
    their probability sums too.
    """

    height: int
    merge: Callable[[list[Any]], list[Any]]
    keep: Callable[[Any], Any] = lambda piece: piece
    parent: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    members: dict[tuple[int, int], list[Any]] = field(default_factory=dict)
    previous: Strip | None = None

    def find(self, key: tuple[int, int]) -> tuple[int, int]:
        """The root key of a piece's region (path halving)."""
        while self.parent.get(key, key) != key:
            self.parent[key] = self.parent.get(self.parent[key], self.parent[key])
            key = self.parent[key]
        return key

    def link(self, a: tuple[int, int], b: tuple[int, int]) -> None:
        """Put two pieces in one region; the smaller member list moves into the larger."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if len(self.members.get(ra, ())) < len(self.members.get(rb, ())):
            ra, rb = rb, ra
        self.members.setdefault(ra, []).extend(self.members.pop(rb, []))
        self.parent[rb] = ra

    def add_strip(self, strip: Strip, items: list[tuple[int, Any]] | None = None) -> list[Any]:
        """Take one strip (its own pieces, or ``items`` for it); return the regions it finishes."""
        linked = set()
        if self.previous is not None:
            above, below = self.previous.last_row, strip.first_row
            touching = (above > 0) & (below > 0)
            for a, b in set(zip(above[touching].tolist(), below[touching].tolist())):
                self.link((self.previous.top, a), (strip.top, b))
                linked.add(b)
        reaching = set(strip.last_row[strip.last_row > 0].tolist()) if strip.bottom < self.height else set()
        finished: list[Any] = []
        for label, piece in strip.pieces if items is None else items:
            if label in linked or label in reaching:
                self.members.setdefault(self.find((strip.top, label)), []).append(self.keep(piece))
            else:
                finished.append(piece)  # whole within this strip
        still_open = {self.find((strip.top, label)) for label in reaching}
        for root in [r for r in self.members if r not in still_open]:
            finished += self.merge(self.members.pop(root))
        self.previous = strip
        return finished

    def close(self) -> list[Any]:
        """The regions still waiting at the end (none when the last strip reached the scene's bottom)."""
        rest = [region for root in list(self.members) for region in self.merge(self.members.pop(root))]
        self.parent.clear()
        return rest


def whole_fields(waiting: list[bytes]) -> list[shapely.Polygon]:
    """The pieces of one field joined, split where they meet at a corner only (4-connectivity).

    A piece's holes lie inside its strip (a gap open to the strip's edge is no hole), so no other piece can
    touch them: only the outer rings are unioned, and the holes are put back into the part that holds them.
    A field whose holes hold most of its outline (a farmland region around many parcels of background)
    is then joined at the cost of its outer ring alone.
    """
    if len(waiting) == 1:
        return [shapely.from_wkb(waiting.pop())]
    shells, holes = [], []
    while waiting:  # each piece parsed, taken apart and dropped: the field is held once, in its rings
        piece = shapely.from_wkb(waiting.pop())
        shells.append(shapely.Polygon(piece.exterior))
        holes += piece.interiors
        del piece
    union = shapely.union_all(shells)
    del shells
    parts = list(getattr(union, "geoms", [union]))
    if not holes:
        return parts
    owner = np.zeros(len(holes), np.int64)
    if len(parts) > 1:
        inside = shapely.point_on_surface(shapely.polygons(holes))
        for index, part in enumerate(parts):
            owner[shapely.contains(part, inside)] = index
    return [
        shapely.Polygon(part.exterior, [*part.interiors, *(holes[j] for j in np.flatnonzero(owner == index))])
        for index, part in enumerate(parts)
    ]


def handed_out(fields: list[shapely.Polygon]) -> Iterator[shapely.Polygon]:
    """Yield the fields in order, each dropped from the list as it goes: a large field is not kept here
    while the caller turns it into another copy."""
    fields.reverse()
    while fields:
        yield fields.pop()


def mask_fields(mask_path: Path, min_pixels: int, sieved_path: Path | None = None) -> Iterator[shapely.Polygon]:
    """Every field of a mask GeoTIFF, in pixel coordinates, after the minimum mapping unit; each as soon as
    it is whole. With ``sieved_path`` the sieved mask is written there too (same grid and profile)."""
    with rasterio.open(mask_path) as src:
        # Waiting pieces are kept as WKB: a field spanning the scene may wait for all its strips.
        joiner = SeamJoiner(src.height, merge=whole_fields, keep=shapely.to_wkb)
        sieved = None
        if sieved_path is not None:
            sieved = rasterio.open(sieved_path, "w", **src.profile)
            if src.colorinterp[0] == rasterio.enums.ColorInterp.palette:
                sieved.write_colormap(1, src.colormap(1))
        try:
            for top, rows in sieved_strips(src, min_pixels):
                if sieved is not None:
                    sieved.write(rows, 1, window=Window(0, top, src.width, rows.shape[0]))
                yield from handed_out(joiner.add_strip(strip_pieces(rows, top)))
            yield from handed_out(joiner.close())
        finally:
            if sieved is not None:
                sieved.close()


# Without a CRS the polygons are in pixel coordinates; a GeoJSON file without a ``crs`` member is read as WGS 84
# degrees (the format's default), which put the fields of a 384-pixel scene at 384 degrees north.
PIXEL_CRS = 'LOCAL_CS["pixel coordinates (column, row)",UNIT["unknown",1]]'
# A scene with a geotransform but no CRS (a TIFF placed by a .tfw world file alone): its fields are in the map
# coordinates of that transform, in a CRS nobody named, not in pixels.
UNNAMED_CRS = 'LOCAL_CS["map coordinates of the scene\'s geotransform, CRS unknown",UNIT["unknown",1]]'


def crs_member(crs: rasterio.crs.CRS | None, placed: bool = False) -> dict:
    """The GeoJSON ``crs`` member GDAL reads back (an EPSG URN where there is a code, else the WKT; without a CRS
    a local one, so that no reader takes the coordinates for degrees: named for pixel coordinates, or with
    ``placed`` (a geotransform, no CRS) for map coordinates of an unknown CRS)."""
    if crs is None:
        return {"type": "name", "properties": {"name": UNNAMED_CRS if placed else PIXEL_CRS}}
    code = crs.to_epsg()
    name = f"urn:ogc:def:crs:EPSG::{code}" if code else crs.to_wkt()
    return {"type": "name", "properties": {"name": name}}


class PolygonWriter:
    """Writes polygons with attributes to a GeoPackage and a GeoJSON file as they come, a batch at a time,
    under temporary names renamed when complete (nothing half-written is ever left under the real names).
    ``placed``: without a CRS, the polygons are in map coordinates (a geotransform), not pixels."""

    def __init__(
        self,
        paths: dict[str, Path],
        columns: dict[str, type],
        crs: rasterio.crs.CRS | None,
        layer: str = "fields",
        placed: bool = False,
    ) -> None:
        self.paths = paths
        self.columns = columns
        self.crs = crs
        self.layer = layer
        # Hidden names beside the outputs; those a killed run left for them are removed.
        self.temporary = {k: files.temporary_beside(p) for k, p in paths.items()}
        self.geometries: list[shapely.Geometry] = []
        self.values: dict[str, list] = {name: [] for name in columns}
        self.count = 0
        self.gpkg_started = False
        for path in self.temporary.values():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
        self.geojson = open(self.temporary["geojson"], "w", encoding="utf-8") if "geojson" in paths else None
        if self.geojson is not None:
            head = {"type": "FeatureCollection", "name": layer}
            head["crs"] = crs_member(crs, placed)
            self.geojson.write(json.dumps(head)[:-1] + ', "features": [\n')

    def add(self, geometry: shapely.Geometry, **values: float | int | str | None) -> None:
        """Queue one polygon; a full batch is written at once."""
        self.geometries.append(geometry)
        for name in self.columns:
            self.values[name].append(values[name])
        if len(self.geometries) >= BATCH or shapely.get_num_coordinates(geometry) > LARGE:
            self.flush()  # a very large field goes out at once rather than wait in memory

    def flush(self) -> None:
        """Write the queued polygons to both files."""
        if not self.geometries and self.gpkg_started:
            return
        arrays = [self.array(name) for name in self.columns]
        if "gpkg" in self.paths:
            with files.written_or_disk_error(self.paths["gpkg"], (DataSourceError, DataLayerError)):
                self.write_gpkg(arrays)
        if self.geojson is not None:
            with files.written_or_disk_error(self.paths["geojson"]):
                self.write_geojson()
        self.count += len(self.geometries)
        self.geometries, self.values = [], {name: [] for name in self.columns}

    def array(self, name: str) -> np.ndarray:
        """One attribute column of the queued polygons as a typed array (None becomes NaN for floats)."""
        kind = self.columns[name]
        if kind is float:
            return np.array([math.nan if v is None else v for v in self.values[name]], np.float64)
        return np.array(self.values[name], np.int64 if kind is int else object)

    def write_gpkg(self, arrays: list[np.ndarray]) -> None:
        geometry = shapely.to_wkb(np.array(self.geometries, dtype=object)) if self.geometries else np.array([], object)
        with warnings.catch_warnings():
            # Without a CRS the polygons are in pixel coordinates (column, row), as documented: no need to warn.
            warnings.filterwarnings("ignore", "'crs' was not provided")
            write_vector(
                str(self.temporary["gpkg"]),
                geometry,
                arrays,
                list(self.columns),
                layer=self.layer,
                driver="GPKG",
                geometry_type="Polygon",
                crs=self.crs.to_wkt() if self.crs is not None else None,
                promote_to_multi=False,
                append=self.gpkg_started,
            )
        self.gpkg_started = True

    def write_geojson(self) -> None:
        for i, geometry in enumerate(self.geometries):
            properties = {name: clean(self.values[name][i]) for name in self.columns}
            separator = ",\n" if self.count + i else ""
            self.geojson.write(f'{separator}{{"type": "Feature", "properties": {json.dumps(properties)}, "geometry": ')
            if shapely.get_num_coordinates(geometry) > LARGE:
                write_large_polygon(self.geojson, geometry)
            else:
                self.geojson.write(shapely.to_geojson(geometry))
            self.geojson.write("}")

    def close(self) -> int:
        """Write what is queued, finish both files and move them into place; return the polygon count."""
        self.flush()
        if self.geojson is not None:
            with files.written_or_disk_error(self.paths["geojson"]):
                self.geojson.write("\n]}\n")
                self.geojson.close()
        if "gpkg" in self.paths:
            self.check_gpkg()
        for kind, path in self.paths.items():
            os.replace(self.temporary[kind], path)
        return self.count

    def check_gpkg(self) -> None:
        """Read the GeoPackage back before it is renamed: GDAL closes it without a word where SQLite could not
        write its last pages (a full disk), and a file without its tables would be left under the output's name."""
        target = self.paths["gpkg"]
        with files.written_or_disk_error(target, (DataSourceError, DataLayerError)):
            features = read_info(str(self.temporary["gpkg"]), layer=self.layer)["features"]
        if features != self.count:
            raise files.disk_error_at(target) or OSError(
                errno.EIO, f"{features} of its {self.count} features could be read back", str(target)
            )

    def abandon(self) -> None:
        """Remove the temporary files after a failure."""
        if self.geojson is not None and not self.geojson.closed:
            # Its buffer cannot be written where the disk is full: that must neither hide the error being raised
            # nor leave the temporary files.
            with contextlib.suppress(OSError):
                self.geojson.close()
        for path in self.temporary.values():
            path.unlink(missing_ok=True)

    def __enter__(self) -> "PolygonWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:
            self.abandon()


def write_large_polygon(handle: TextIO, polygon: shapely.Polygon) -> None:
    """Write a polygon's GeoJSON geometry a block of coordinates at a time: a field of tens of millions of
    points never becomes one string of hundreds of megabytes."""
    handle.write('{"type": "Polygon", "coordinates": [')
    for index, ring in enumerate([polygon.exterior, *polygon.interiors]):
        coordinates = shapely.get_coordinates(ring)
        handle.write(",[" if index else "[")
        for start in range(0, len(coordinates), LARGE):
            block = coordinates[start : start + LARGE].tolist()
            handle.write(("," if start else "") + ",".join(f"[{x!r},{y!r}]" for x, y in block))
        handle.write("]")
    handle.write("]}")


def clean(value: object) -> object:
    """A JSON-safe attribute value: NaN becomes null."""
    return None if isinstance(value, float) and math.isnan(value) else value


def right_hand(polygon: shapely.Polygon) -> shapely.Polygon:
    """The polygon with its outer ring counter-clockwise and its holes clockwise on the map, as RFC 7946 requires of
    GeoJSON; the polygon itself where it already is (the fields of a north-up grid are; those of a south-up grid,
    with a positive y pixel size, were traced the other way round). Traced and unioned polygons wind their holes
    against their outer ring, so the outer ring tells, and a field of many holes is not copied to find out."""
    if polygon.is_empty or polygon.exterior.is_ccw:
        return polygon
    return shapely.orient_polygons(polygon)


def simplification_overlap(tolerance: float, transform: Affine) -> str:
    """Why outlines simplified one by one by ``tolerance`` (CRS units) on a grid of this ``transform`` may overlap
    their neighbours, for a warning ('' when it is at most one pixel, or off).

    Each outline is simplified on its own (Douglas-Peucker, each field kept valid), so two fields a pixel apart (a
    ridge or ditch between parcels) can each move into the gap and overlap. On masks of parcels separated by
    one-pixel lines none overlapped up to a tolerance of one pixel; at 1.25 pixels some did, at 1.5 many.
    """
    pixel = math.sqrt(abs(transform.determinant))
    if tolerance <= 0 or not pixel or tolerance <= pixel * (1 + 1e-9):
        return ""
    return (
        f"--simplify_tolerance={tolerance:g} is {tolerance / pixel:.3g} pixels ({pixel:g} CRS units each): each "
        "outline is simplified on its own, so neighbouring polygons a pixel apart can overlap, and their areas be "
        f"counted twice; give at most one pixel ({pixel:g}) for outlines that never overlap"
    )


def min_pixels_for(min_area_ha: float, pixel_m2: float | None, min_pixels: int) -> int:
    """The minimum mapping unit in pixels: from hectares with a projected CRS, else the pixel count given."""
    if pixel_m2 is None:
        return max(min_pixels, 0)
    return max(int(math.ceil(min_area_ha * 1e4 / pixel_m2 - 1e-9)), 0)
