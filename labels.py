"""Farmland labels on a scene's pixel grid: vector polygons or a label raster, read window by window.

Two kinds of label source, opened by ``open_labels`` and checked before any scene is touched:
- **Vector polygons** (GeoPackage, Shapefile, GeoJSON, anything GDAL reads): an SQL WHERE filter
  (``label_where``, for example ``DLBM LIKE '01%'``, the land survey's cultivated land) picks the farmland
  polygons. For each scene only the polygons in its extent are read, reprojected to the scene's CRS
  (every vertex, with rasterio.warp.transform) and burnt in per window (rasterio.features.rasterize,
  pixel centres). The labels' coverage is the layer's extent (its bounding box, reprojected as a polygon).
- **A label raster** (GeoTIFF): 0 = background, 1 (or 255 when there is no 1) = farmland, 255 beside 1 and
  the declared nodata = unlabelled. It is resampled (nearest) onto the scene's grid through a warped view;
  its coverage is its valid pixels. A raster far coarser than the scene is refused (MAX_PIXEL_RATIO).

``source.on_grid(grid)`` gives a scene's labels; its ``read(window)`` returns (farmland, labelled) boolean
arrays. Files are only read. Every error is a DataError naming the file, what was expected, what was found
and the fix.
"""

from __future__ import annotations

import ast
import logging
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyogrio
import pyogrio.errors
import rasterio
import rasterio.features
import rasterio.warp
import rasterio.windows
import shapely
from pyogrio.raw import read as read_vector
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from data_preprocess import CLASS_NUMBER_TOP
from files import DataError
from rasters import RASTER_SUFFIXES, open_raster, zone_prefix_hint

LOG = logging.getLogger("labels")
MAX_PIXEL_RATIO = 4.0  # a label raster with pixels more than this many times the scene's is refused
ALLOWED_VALUES = (0, 1, 255)
SQL_WORDS = frozenset(  # words of a WHERE clause that are not field names
    (
        "and or not like ilike in is null between glob escape true false cast as integer int real text numeric "
        "varchar char character float double bigint date timestamp string boolean"
    ).split()
)
EXAMPLE_FILTER = "--label_where=\"DLBM LIKE '01%'\""
UNDECLARED = "ISO-8859-1"  # what GDAL reads a .dbf as when neither a .cpg file nor the .dbf names its code page
# GDAL's note on every open of a WAL-mode GeoPackage (as QGIS leaves them) in a folder the user cannot write, which
# it then reads as the file stands: "attempt to write a readonly database", raised by pyogrio as a RuntimeWarning.
# The file is only read; read_only_wal says so once, in words, instead.
WAL_READ_ONLY = r"(?s).*this file is a WAL-enabled database.*IMMUTABLE=YES"


@dataclass(frozen=True)
class Grid:
    """A scene's pixel grid: CRS, affine transform and size; ``name`` is the scene file, for messages."""

    crs: CRS
    transform: Affine
    width: int
    height: int
    name: str

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the grid's CRS."""
        return rasterio.windows.bounds(Window(0, 0, self.width, self.height), self.transform)

    def pixel_size(self) -> float:
        """The side of one pixel in CRS units (the mean of x and y for non-square pixels)."""
        return (math.hypot(self.transform.a, self.transform.d) + math.hypot(self.transform.b, self.transform.e)) / 2


def boxes_meet(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two (left, bottom, right, top) boxes share some area."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def reproject(geometries: np.ndarray, src: CRS, dst: CRS) -> np.ndarray:
    """Shapely geometries from ``src`` to ``dst`` CRS, every vertex at once (x = easting/longitude first)."""
    if src == dst or not len(geometries):
        return geometries

    def move(coords: np.ndarray) -> np.ndarray:
        xs, ys = rasterio.warp.transform(src, dst, coords[:, 0], coords[:, 1])
        return np.column_stack([xs, ys])

    return shapely.transform(geometries, move)


def no_overlap(labels: Path, grid: Grid, label_box: Sequence[float], crs: CRS) -> DataError:
    """The error for labels that miss a scene, with both extents in the scene's CRS (or the labels' own where their
    box cannot be put in the scene's CRS), and a hint when a Gauss-Kruger zone number prefix is the cause."""
    box = rasterio.warp.transform_bounds(crs, grid.crs, *label_box, densify_pts=21)
    # Fixed decimals, not significant digits: Gauss-Kruger northings have 7 digits before the point.
    decimals = 6 if grid.crs.is_geographic else 1
    scene = ", ".join(f"{v:.{decimals}f}" for v in grid.bounds)
    if all(map(math.isfinite, box)):
        where = f"the labels cover ({', '.join(f'{v:.{decimals}f}' for v in box)}) and the scene ({scene}), both in "
        where += f"the scene's CRS {grid.crs.to_string()}"
    else:  # off the projection's map: shown in their own CRS rather than as inf
        own = ", ".join(f"{v:.{6 if crs.is_geographic else 1}f}" for v in label_box)
        where = (
            f"the labels cover ({own}) in their CRS {crs.to_string()}, which lies off the map of the scene's CRS "
            f"{grid.crs.to_string()}, where the scene covers ({scene})"
        )
    hints = (zone_prefix_hint(labels, crs, label_box), zone_prefix_hint(grid.name, grid.crs, grid.bounds))
    hint = "".join(f"; {h}" for h in hints if h)
    return DataError(
        f"{labels}: does not overlap the scene {grid.name}: {where}; check that both show the same place and that "
        f"each file's CRS is right{hint}"
    )


def check_crs(path: Path, crs: CRS | None, kind: str) -> CRS:
    """The file's CRS, or a DataError saying how to give it one."""
    if crs is None or not crs:
        fix = (
            "assign it on a copy (gdal_translate -a_srs EPSG:xxxx in.tif out.tif)"
            if kind == "raster"
            else "add the .prj file beside a Shapefile, or re-export the layer with its CRS (ogr2ogr -a_srs EPSG:xxxx)"
        )
        raise DataError(f"{path}: has no CRS (coordinate reference system); expected a georeferenced {kind}; {fix}")
    return CRS.from_user_input(crs)


def check_shapefile_parts(path: Path, where: str) -> None:
    """Raises DataError naming the missing file where a Shapefile lacks its .shx index, or its .dbf attribute table
    when a filter needs it, rather than GDAL's note on the .shx or the filter's "not a field of the layer"."""
    if path.suffix.lower() != ".shp":
        return
    roles = {".shx": "the index of its shapes", ".dbf": "the attribute table --label_where reads"}
    for suffix, role in roles.items():
        if suffix == ".dbf" and not where:
            continue
        if not any(path.with_suffix(ext).exists() for ext in (suffix, suffix.upper())):
            raise DataError(
                f"{path}: {path.stem}{suffix} ({role}) is missing beside it; a Shapefile is the .shp, .shx, .dbf, "
                f".prj (and .cpg) files of one name in one folder: copy {path.stem}{suffix} from where {path.name} "
                "came from"
            )


class Labels:
    """A label source; ``on_grid`` gives one scene's labels. Use as a context manager."""

    path: Path

    def on_grid(self, grid: Grid) -> GridLabels:
        """The labels on one scene's grid; raises DataError when they cannot be placed there."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line saying what the labels are, for the log."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""

    def __enter__(self) -> Labels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GridLabels:
    """One scene's labels: ``read(window)`` -> (farmland, labelled), boolean (rows, cols)."""

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(farmland, labelled) of the scene's pixels in ``window``, boolean (rows, cols)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""


# --- vector polygons ------------------------------------------------------------------------------------


def choose_layer(path: Path, layer: str) -> str:
    """The layer to read: the one named, or the file's only layer.

    Raises:
        DataError: unreadable file, an unknown layer name, or several layers and none named.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layers = [str(name) for name, _ in pyogrio.list_layers(path)]
        for warning in caught:
            if re.match(WAL_READ_ONLY, str(warning.message)):
                read_only_wal(path)
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as err:
        raise DataError(
            f"{path}: not a readable vector file ({str(err)[:200]}); expected polygons as GeoPackage, Shapefile "
            "or GeoJSON, or a label raster (.tif)"
        ) from None
    if layer and layer not in layers:
        raise DataError(f"{path}: has no layer {layer!r}; its layers are: {', '.join(layers)}; fix --label_layer")
    if not layer and len(layers) > 1:
        raise DataError(
            f"{path}: holds {len(layers)} layers ({', '.join(layers)}); name the one with the farmland "
            f"polygons, for example --label_layer={layers[0]}"
        )
    return layer or layers[0]


def read_only_wal(path: Path) -> None:
    """Say once, in words, that a WAL-mode GeoPackage in a folder this user cannot write is read as the file stands
    (GDAL opens it immutable), and hide GDAL's warning about it on every later read of the file in this process."""
    warnings.filterwarnings("ignore", message=WAL_READ_ONLY, category=RuntimeWarning)
    journal = Path(f"{path}-wal")
    if journal.exists() and journal.stat().st_size > 0:
        LOG.warning(
            "%s: a GeoPackage in WAL mode with unsaved changes in %s, in a folder this user cannot write: it is read "
            "as the file stands, without them; to include them, close the layer in QGIS (or whatever holds the file "
            "open) so the changes are written into it, or copy the file with its -wal file to a folder you can write",
            path,
            journal.name,
        )
    else:
        LOG.info("%s: a GeoPackage in WAL mode in a folder this user cannot write: read as it stands, unchanged", path)


def filter_names(where: str, bare: bool = False) -> list[str]:
    """Field names an SQL WHERE clause seems to use (identifiers outside quotes, minus SQL words and functions);
    with ``bare``, only those not in double quotes. Identifiers may be Chinese (地类编码)."""
    text = re.sub(r"'(?:[^']|'')*'", " ", where)
    names = re.findall(r'"([^"]+)"|\b([^\W\d]\w*)\b(?!\s*\()', text)
    found = [name for quoted, name in names if name] if bare else [quoted or name for quoted, name in names]
    return [name for name in found if name.lower() not in SQL_WORDS]


def gdal_message(err: Exception) -> str:
    """GDAL's error text, with the bytes reprs pyogrio leaves in it (layer b'\\xe5\\x9c\\xb0...') shown as text."""

    def decoded(match: re.Match) -> str:
        try:
            return ast.literal_eval(match.group(0)).decode("utf-8")
        except (ValueError, SyntaxError, UnicodeDecodeError):
            return match.group(0)

    return re.sub(r"b'(?:[^'\\]|\\.)*'", decoded, str(err))[:300]


def field_values(path: Path, layer: str, names: Sequence[str], limit: int = 10, encoding: str = "") -> str:
    """A few distinct values of some fields, read from the first features, for messages."""
    if not names:
        return ""
    _, _, _, data = read_vector(
        path, layer=layer, columns=list(names), read_geometry=False, max_features=5000, encoding=encoding or None
    )
    parts = []
    for name, values in zip(names, data):
        distinct = sorted({str(v) for v in values})
        more = ", ..." if len(distinct) > limit else ""
        parts.append(f"{name} holds {', '.join(repr(v) for v in distinct[:limit])}{more}")
    return "; " + "; ".join(parts)


def check_filter(path: Path, layer: str, where: str, fields: Sequence[str], encoding: str = "") -> None:
    """Run the filter once: refuse a filter GDAL cannot run or one that selects no feature.

    Raises:
        DataError: naming the unknown fields and the layer's fields, or the values the named fields hold.
    """
    unknown = [n for n in filter_names(where) if n.lower() not in {f.lower() for f in fields}]
    listing = f"the fields of layer {layer} are: {', '.join(fields) or '(none)'}"
    hint = f"; --label_where names {', '.join(unknown)}, not a field of the layer" if unknown else ""
    try:
        # Every column is read: some drivers (Shapefile) see only the fetched fields in a filter.
        _, fids, _, _ = read_vector(
            path,
            layer=layer,
            where=where,
            read_geometry=False,
            return_fids=True,
            max_features=1,
            encoding=encoding or None,
        )
    except UnicodeDecodeError:  # the text, not the filter: open_labels names the encoding to give
        raise
    except (pyogrio.errors.DataLayerError, ValueError) as err:  # GDAL's error, or ValueError (OGR SQL)
        quote = [n for n in filter_names(where, bare=True) if not n.isascii() and n not in unknown]
        if quote:  # OGR SQL (Shapefile, GeoJSON) reads only ASCII names bare
            quoted = ", ".join(f'"{name}"' for name in quote)
            hint += f"; put field names that are not plain ASCII in double quotes: {quoted}"
        raise DataError(
            f"{path}: --label_where={where!r} cannot be run on layer {layer} ({gdal_message(err)}){hint}; {listing}; "
            f"fix the filter (text values go in single quotes: DLBM = '0101'), for example {EXAMPLE_FILTER}"
        ) from None
    if len(fids) == 0:
        known = [f for f in fields if f.lower() in {n.lower() for n in filter_names(where)}]
        raise DataError(
            f"{path}: --label_where={where!r} selects none of the features of layer {layer}{hint}"
            f"{field_values(path, layer, known, encoding=encoding)}; {listing}; fix the filter (values are matched "
            f"as text, case and leading zeros count), for example {EXAMPLE_FILTER}"
        )


def undeclared_chinese(path: Path, layer: str, limit: int = 200) -> tuple[str, str, str] | None:
    """A text value of the first features that, read as ISO-8859-1, is really Chinese in UTF-8 or GBK: (as
    read, as meant, the encoding); None when the text holds no such value (ASCII only, or other bytes)."""
    _, _, _, data = read_vector(path, layer=layer, read_geometry=False, max_features=limit)
    texts = [v for column in data for v in column if isinstance(v, str) and not v.isascii()]
    for encoding in ("UTF-8", "GBK"):  # UTF-8 first: its byte patterns rarely decode by chance, GBK's often do
        try:
            meant = [v.encode("latin-1").decode(encoding) for v in texts]
        except (UnicodeEncodeError, UnicodeDecodeError):
            continue
        chinese = [(v, m) for v, m in zip(texts, meant) if re.search(r"[\u4e00-\u9fff]", m)]
        if chinese:
            return (*chinese[0], encoding)
    return None  # real ISO-8859-1 text, or another code page: left as read


def check_encoding(path: Path, layer: str, where: str, declared: str) -> None:
    """Refuse a filter with non-ASCII text on a layer whose text reads as Chinese taken for ISO-8859-1 (a
    Shapefile without a .cpg file, as ArcGIS and many Chinese tools write it): its Chinese values would match
    nothing, or, under NOT or <>, everything. An ASCII filter (DLBM LIKE '01%') works either way: a warning.

    Raises:
        DataError: naming a garbled value, what it reads as in its likely encoding, and the fix.
    """
    if declared.upper() != UNDECLARED:
        return
    sample = undeclared_chinese(path, layer)
    if sample is None:
        return
    read_as, meant, encoding = sample
    seen = f"text such as {read_as!r}, which is {meant!r} read as {encoding}"
    fix = f"give --label_encoding={encoding}, or put a file {path.stem}.cpg holding {encoding} beside {path.name}"
    if where and not where.isascii():
        raise DataError(
            f"{path}: its text fields declare no encoding (no .cpg file) and read as {UNDECLARED} they hold {seen}; "
            f"--label_where={where!r} compares Chinese text with that garbled text, so it would pick the wrong "
            f"polygons; {fix}"
        )
    LOG.warning("%s: its text fields declare no encoding and hold %s; if so, %s", path, seen, fix)


def polygon_parts(geometry: shapely.Geometry) -> list[shapely.Polygon]:
    """The polygons of a geometry, those inside (nested) geometry collections included; none of a point or line."""
    if geometry.geom_type == "GeometryCollection":
        return [polygon for part in shapely.get_parts(geometry) for polygon in polygon_parts(part)]
    return [p for p in shapely.get_parts(geometry) if not p.is_empty] if "Polygon" in geometry.geom_type else []


def polygonal(geometries: np.ndarray) -> np.ndarray:
    """The polygons and multipolygons among ``geometries``; a geometry collection (as clipping tools write
    them) gives the multipolygon of its polygons. Empty and missing geometries, points and lines are left out."""
    kept = []
    for geometry in geometries:
        if geometry is None or geometry.is_empty:
            continue
        if "Polygon" in geometry.geom_type:
            kept.append(geometry)
        elif polygons := polygon_parts(geometry):
            kept.append(shapely.MultiPolygon(polygons))
    return np.array(kept, dtype=object)


class VectorLabels(Labels):
    """Farmland polygons from a vector layer, selected by an SQL WHERE filter."""

    def __init__(self, path: Path, where: str = "", layer: str = "", encoding: str = "") -> None:
        self.path, self.where, self.encoding = Path(path), where, encoding
        self.layer = choose_layer(self.path, layer)
        info = pyogrio.read_info(self.path, layer=self.layer, force_total_bounds=True, encoding=encoding or None)
        self.crs = check_crs(self.path, info["crs"], "layer")
        self.fields = [str(f) for f in info["fields"]]
        self.features = int(info["features"])
        kind = str(info["geometry_type"] or "Unknown")
        flat = kind.lower().removesuffix(" z")  # a 3D layer ("GeometryCollection Z") is read as a 2D one
        if "polygon" not in flat and flat not in ("unknown", "geometry", "geometrycollection"):
            raise DataError(
                f"{self.path}: layer {self.layer} holds {kind} geometries; expected polygons (farmland parcels); "
                "choose the parcel layer with --label_layer, or buffer lines/points into polygons first"
            )
        if self.features == 0:
            raise DataError(f"{self.path}: layer {self.layer} holds no features; expected farmland polygons")
        self.extent = tuple(float(v) for v in info["total_bounds"])
        if not encoding:
            check_encoding(self.path, self.layer, where, str(info.get("encoding") or ""))
        if where:
            check_filter(self.path, self.layer, where, self.fields, encoding)

    def describe(self) -> str:
        # The layer's count: counting the filter's selection would read the whole layer (a province's survey).
        chosen = f", those where {self.where} used" if self.where else " (all used)"
        return f"{self.path} layer {self.layer}: {self.features} polygons in {self.crs.to_string()}{chosen}"

    def on_grid(self, grid: Grid) -> PolygonsOnGrid:
        """Read the filtered polygons in the scene's extent and reproject them to its CRS.

        Raises:
            DataError: the layer's extent misses the scene.
        """
        box = rasterio.warp.transform_bounds(grid.crs, self.crs, *grid.bounds, densify_pts=21)
        if not boxes_meet(box, self.extent):
            raise no_overlap(self.path, grid, self.extent, self.crs)
        try:
            _, _, wkb, _ = read_vector(
                self.path, layer=self.layer, where=self.where or None, bbox=box, encoding=self.encoding or None
            )
        except UnicodeDecodeError as err:
            raise undecodable(self.path, self.encoding, err) from None
        geometries = polygonal(shapely.from_wkb(wkb) if len(wkb) else np.array([], dtype=object))
        extent = shapely.segmentize(shapely.box(*self.extent), max((self.extent[2] - self.extent[0]) / 64, 1e-9))
        coverage = reproject(np.array([extent]), self.crs, grid.crs)[0]
        polygons = reproject(geometries, self.crs, grid.crs)
        if not len(polygons):
            LOG.warning(
                "%s: no farmland polygons within the scene %s: its masks are all background", self.path, grid.name
            )
        return PolygonsOnGrid(grid, polygons, coverage)


class PolygonsOnGrid(GridLabels):
    """Polygons in a scene's CRS, burnt in window by window (only those the window's box meets)."""

    def __init__(self, grid: Grid, polygons: np.ndarray, coverage: shapely.Geometry) -> None:
        self.grid, self.polygons, self.coverage = grid, polygons, coverage
        self.tree = shapely.STRtree(polygons)
        self.count = len(polygons)

    def burn(self, shapes: Sequence[shapely.Geometry], window: Window) -> np.ndarray:
        """Pixels of the window whose centres fall inside any of the shapes."""
        shape = (int(window.height), int(window.width))
        if not len(shapes):
            return np.zeros(shape, bool)
        transform = rasterio.windows.transform(window, self.grid.transform)
        burnt = rasterio.features.rasterize(
            ((s, 1) for s in shapes), out_shape=shape, transform=transform, dtype="uint8"
        )
        return burnt.astype(bool)

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        box = shapely.box(*rasterio.windows.bounds(window, self.grid.transform))
        hits = self.tree.query(box)
        return self.burn(self.polygons[hits], window), self.burn([self.coverage], window)


# --- label rasters --------------------------------------------------------------------------------------


def raster_values(src: rasterio.DatasetReader) -> np.ndarray:
    """The distinct values of band 1 outside its declared nodata, read block by block."""
    found: set = set()
    for _, window in src.block_windows(1):
        block = src.read(1, window=window)
        if block.dtype == np.uint8:
            values = np.flatnonzero(np.bincount(block.ravel(), minlength=256))
        else:
            values = np.unique(block[~np.isnan(block)] if block.dtype.kind == "f" else block)
        found.update(values.tolist())
    if src.nodata is not None:
        found.discard(src.nodata)
    return np.array(sorted(found))


class RasterLabels(Labels):
    """A label raster: 0 = background, 1 (or 255 without 1) = farmland, 255 beside 1 or nodata = unlabelled."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.src = open_raster(self.path, "re-export the labels as GeoTIFF")
        try:
            self.crs = check_crs(self.path, self.src.crs, "raster")
            if self.src.count != 1:
                raise DataError(
                    f"{path}: has {self.src.count} bands; expected a single-band label raster "
                    "(0 = background, 1 or 255 = farmland); save one band (gdal_translate -b 1)"
                )
            values = raster_values(self.src)
            bad = [v for v in values.tolist() if v not in ALLOWED_VALUES]
            if bad:
                shown = ", ".join(f"{v:g}" for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
                fix = (
                    "recode the raster (gdal_calc.py), or declare the value that marks unlabelled pixels as nodata "
                    "(gdal_translate -a_nodata N)"
                )
                if all(float(v).is_integer() and 2 <= v <= CLASS_NUMBER_TOP for v in bad):  # a classification
                    others = "another class" if len(bad) == 1 else "other classes"
                    fix = (
                        f"it looks like class numbers ({shown} = {others} such as water or roads): make every "
                        f'class but farmland 0, for example gdal_calc.py -A "{path}" --outfile=farmland.tif '
                        '--calc="A==1" --type=Byte (farmland\'s number in place of 1 if it has another); declaring '
                        "them nodata (gdal_translate -a_nodata N) would leave those places out of training instead "
                        "of making them background"
                    )
                raise DataError(
                    f"{path}: holds the values {{{shown}}}; expected only 0 = background, 1 or 255 = farmland, "
                    f"255 (beside 1) or the declared nodata = unlabelled; {fix}"
                )
        except BaseException:
            self.src.close()
            raise
        self.farmland = 1 if 1 in values else 255
        self.unlabelled = (255,) if self.farmland == 1 and 255 in values else ()

    def describe(self) -> str:
        extra = ", 255 = unlabelled" if self.unlabelled else ""
        nodata = f", nodata {self.src.nodata:g} = unlabelled" if self.src.nodata is not None else ""
        return f"{self.path}: label raster in {self.crs.to_string()}, {self.farmland} = farmland{extra}{nodata}"

    def on_grid(self, grid: Grid) -> RasterOnGrid:
        """The raster warped (nearest) onto the scene's grid.

        Raises:
            DataError: no overlap, or pixels more than MAX_PIXEL_RATIO times the scene's.
        """
        if not boxes_meet(
            rasterio.warp.transform_bounds(self.crs, grid.crs, *self.src.bounds, densify_pts=21), grid.bounds
        ):
            raise no_overlap(self.path, grid, self.src.bounds, self.crs)
        left, bottom, right, top = rasterio.warp.transform_bounds(self.crs, grid.crs, *self.src.bounds, densify_pts=21)
        pixel = ((right - left) / self.src.width + (top - bottom) / self.src.height) / 2
        if pixel > MAX_PIXEL_RATIO * grid.pixel_size():
            raise DataError(
                f"{self.path}: label pixels are about {pixel:.3g} {grid.crs.linear_units or 'units'} wide, "
                f"{pixel / grid.pixel_size():.1f} times the pixels of the scene {grid.name} ({grid.pixel_size():.3g}); "
                f"more than {MAX_PIXEL_RATIO:g} times would give blocky masks; label at the scene's resolution, "
                "or give the farmland as polygons"
            )
        vrt = WarpedVRT(
            self.src,
            crs=grid.crs,
            transform=grid.transform,
            width=grid.width,
            height=grid.height,
            resampling=Resampling.nearest,
            add_alpha=True,
        )
        return RasterOnGrid(vrt, self.farmland, self.unlabelled)

    def close(self) -> None:
        self.src.close()


class RasterOnGrid(GridLabels):
    """A label raster's warped view on a scene's grid; its alpha band marks where it has data."""

    def __init__(self, vrt: WarpedVRT, farmland: float, unlabelled: Sequence[float]) -> None:
        self.vrt, self.farmland, self.unlabelled = vrt, farmland, tuple(unlabelled)

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        values, alpha = self.vrt.read(window=window)
        labelled = alpha > 0
        if self.unlabelled:
            labelled &= ~np.isin(values, self.unlabelled)
        return labelled & (values == self.farmland), labelled

    def close(self) -> None:
        self.vrt.close()


def undecodable(path: Path, encoding: str, err: UnicodeDecodeError) -> DataError:
    """The error for a vector file whose field names or text do not decode, with the likely cause and fix."""
    if encoding:
        return DataError(
            f"{path}: holds a field name or text that is not valid {encoding}, the --label_encoding given; "
            "leave --label_encoding out to read it as the file declares, or give its encoding (GBK for most "
            "Chinese survey data)"
        )
    declared = err.encoding.upper().replace("_", "-")
    raw = err.object if isinstance(err.object, bytes) else b""
    if err.reason == "unexpected end of data":  # valid up to a character cut at the end: a cut field name
        raw = b""
    for candidate in ("GBK", "UTF-8"):  # text of another code page than the one declared (a wrong .cpg file)
        try:
            meant = raw.decode(candidate)
        except UnicodeDecodeError:
            continue
        if candidate != declared and re.search(r"[\u4e00-\u9fff]", meant):
            cpg = path.with_suffix(".cpg")
            written = cpg.read_text(encoding="ascii", errors="replace").strip() if cpg.exists() else ""
            where = f" (its {cpg.name} says {written!r})" if cpg.exists() else ""
            fix = f", or write {candidate} into {cpg.name}" if cpg.exists() else ""
            return DataError(
                f"{path}: declares its text {declared}{where}, but holds text such as {raw!r} that is not valid "
                f"{declared} and reads as {meant!r} in {candidate}; give --label_encoding={candidate}{fix}"
            )
    return DataError(
        f"{path}: holds a field name or text that is not valid {err.encoding.upper()}, the encoding it declares; "
        "a Shapefile's field names hold at most 10 bytes, so a Chinese name of 4 characters in UTF-8 (12 bytes) "
        "is cut inside a character. Re-export the layer as a GeoPackage (ogr2ogr -f GPKG out.gpkg in.shp) or "
        "with shorter or ASCII field names (DLBM, DLMC), or give its real encoding with --label_encoding"
    )


def open_labels(path: Path, where: str = "", layer: str = "", encoding: str = "") -> Labels:
    """Open and check a label source: a raster by its extension (.tif, .tiff, .img, .vrt, .jp2), else vectors.

    Raises:
        DataError: a missing or unreadable file, no CRS, a filter on a raster, a bad filter or layer, bad values.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found; expected farmland polygons (.gpkg .shp .geojson) or a label raster (.tif)")
    if path.suffix.lower() in RASTER_SUFFIXES:
        if where or layer or encoding:
            raise DataError(
                f"{path}: is a raster; --label_where, --label_layer and --label_encoding apply to vector labels "
                "only; leave them out"
            )
        return RasterLabels(path)
    try:
        "".encode(encoding or "utf-8")
    except LookupError:
        raise DataError(
            f"{path}: --label_encoding={encoding!r} is not an encoding Python knows; expected a name such as GBK, "
            "GB18030, UTF-8 or CP1252"
        ) from None
    check_shapefile_parts(path, where)
    try:
        return VectorLabels(path, where, layer, encoding)
    except UnicodeDecodeError as err:  # a subclass of ValueError: it would reach the user without the file's name
        raise undecodable(path, encoding, err) from None
