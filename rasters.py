"""Rasters on the ground: opening a GeoTIFF with an error a user can act on, the size of its pixels, its nodata and
its float reflectance a little outside [0, 1] clipped; make_tiles.py's table of where each tile sits.

Shared by scene prediction, tile making, training (the tiles' pixel size) and change detection.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
import rasterio.warp
from rasterio._err import CPLE_BaseError
from rasterio.crs import CRS
from rasterio.errors import CRSError, NotGeoreferencedWarning
from rasterio.transform import Affine

from files import DataError, atomic_write_text, shell_quoted

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2")  # scenes and label rasters, read through GDAL


TILE_TABLE = "tiles.csv"  # make_tiles.py's table of where each tile sits on the ground, beside images/ and labels/


def read_tile_table(path: Path) -> list[dict[str, str]]:
    """The rows of a tiles.csv (TILE_TABLE), or none where there is no such file."""
    if not path.is_file():
        return []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def gauss_kruger_match(params: dict, zone: int) -> str:
    """The EPSG code (``EPSG:4527``) of the CGCS2000, Xian 1980 or Beijing 1954 Gauss-Kruger CRS with these PROJ
    parameters, else the PROJ string itself (which ``-a_srs`` also takes). ``zone`` (3-degree zones are numbered
    25 to 45, 6-degree ones 13 to 23) tells the two apart where they share a central meridian (117 E)."""
    three = (range(4513, 4555), range(2349, 2391), range(2401, 2443))
    six = (range(4491, 4513), range(2327, 2349), range(21413, 21424), range(21453, 21464))
    for code in (code for codes in (three if zone > 23 else six) for code in codes):
        try:
            if CRS.from_epsg(code).to_dict() == params:
                return f"EPSG:{code}"
        except CRSError:
            continue
    return " ".join(f"+{k}={v}" if v is not True else f"+{k}" for k, v in params.items())


def zone_prefix_hint(path: Path | str, crs: CRS | None, box: Sequence[float]) -> str:
    """A sentence for a Gauss-Kruger file whose eastings and CRS disagree on the zone number prefix, else "".

    Chinese survey data give eastings either with the zone number in front (39 510 000 m in 3-degree zone 39)
    or without it (510 000 m); a CRS of the other kind puts the file thousands of kilometres away.
    """
    try:
        params = crs.to_dict() if crs else {}
    except CRSError:  # a CRS PROJ cannot write as parameters: not a plain Gauss-Kruger one
        return ""
    if params.get("proj") != "tmerc" or "lon_0" not in params or not all(map(math.isfinite, box)):
        return ""
    false_easting, lon_0, left, right = float(params.get("x_0", 0)), float(params["lon_0"]), box[0], box[2]
    if false_easting == 500000 and 1e7 <= left and right < 1e8 and int(left // 1e6) == int(right // 1e6):
        zone = int(left // 1e6)
        if lon_0 != (3 * zone if zone > 23 else 6 * zone - 3):
            return ""
        wanted = {**params, "x_0": zone * 1000000 + 500000}
        found = f"eastings from {left:.1f} carry the zone number {zone} in front, which its CRS lacks"
    elif false_easting >= 1e7 and 0 < left and right < 1e6:
        wanted, zone = {**params, "x_0": 500000}, int(false_easting // 1e6)
        found = f"eastings from {left:.1f} lack the zone number {zone} its CRS puts in front"
    else:
        return ""
    code, source = gauss_kruger_match(wanted, zone), Path(path)
    if source.suffix.lower() in RASTER_SUFFIXES:  # gdal_translate takes the source first, ogr2ogr the copy first
        copy = source.with_name(f"{source.stem}_crs.tif")
        command = f"gdal_translate -a_srs {shell_quoted(code)} {shell_quoted(source)} {shell_quoted(copy)}"
    else:
        copy = source.with_name(f"{source.stem}_crs{source.suffix}")
        command = f"ogr2ogr -a_srs {shell_quoted(code)} {shell_quoted(copy)} {shell_quoted(source)}"
    return (
        f"{path}: its {found} ({crs.to_string()}, false easting {false_easting:.0f}): it is probably in {code}; "
        f"declare that CRS on a copy ({command})"
    )


def open_raster(path: Path, fix: str = "check the file or re-export it as GeoTIFF") -> rasterio.io.DatasetReader:
    """Open a raster for reading (a plain image without georeference is no warning here: callers check).

    Raises:
        DataError: the file cannot be read as a raster, naming it, GDAL's reason and ``fix``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(Path(path))
    except rasterio.RasterioIOError as err:
        raise DataError(f"{path}: not a readable raster ({str(err)[:200]}); {fix}") from None


def declared_nodata(path: Path) -> float | None:
    """The nodata value a TIFF tile declares (65535 or -9999, say), or None: no TIFF, none declared, unreadable
    (the tile reader reports that)."""
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        with open_raster(path) as src:
            return src.nodata
    except DataError:
        return None


def rpc_only(src: rasterio.io.DatasetReader) -> str:
    """For a raster placed only by RPCs (a Level-1 product, not orthorectified), what it is and the fix; else ''."""
    if src.crs is not None or not src.transform.is_identity or not src.rpcs:
        return ""
    path = Path(src.name)
    return (
        "it is placed only by RPCs (rational polynomial coefficients), as Level-1 products such as Gaofen-2 PMS "
        "L1A are, not on a map grid: orthorectify a copy first, for example gdalwarp -rpc -to RPC_DEM=dem.tif "
        f"-t_srs EPSG:{zone_epsg(src.rpcs.long_off, src.rpcs.lat_off, cgcs2000=True)} -tr 1 1 -r bilinear "
        f"{shell_quoted(path)} {shell_quoted(path.with_name(f'{path.stem}_ortho.tif'))} "
        "(the CRS and pixel size of your choice)"
    )


def gcp_only(src: rasterio.io.DatasetReader) -> str:
    """For a raster placed only by ground control points (GCPs, no geotransform: a scan or a raw product
    georeferenced by hand), what it is and the fix; else ''."""
    points, points_crs = src.gcps
    if src.crs is not None or not src.transform.is_identity or not points:
        return ""
    if points_crs is not None and points_crs.is_projected and not area_problem(points_crs) and points_crs.to_epsg():
        target = f"EPSG:{points_crs.to_epsg()}"
    elif points_crs is not None and points_crs.is_geographic:
        lon, lat = np.mean([(p.x, p.y) for p in points], axis=0)
        target = f"EPSG:{zone_epsg(float(lon), float(lat), cgcs2000=points_crs.to_epsg() == 4490)}"
    else:
        target = "EPSG:NNNN"
    path = Path(src.name)
    return (
        f"it is placed only by {len(points)} ground control points (GCPs), not on a map grid, so it has no CRS or "
        f"geotransform of its own: warp a copy onto a projected grid first, for example gdalwarp -t_srs {target} "
        f"-r bilinear {shell_quoted(path)} {shell_quoted(path.with_name(f'{path.stem}_warped.tif'))} "
        "(a projected CRS in ground metres of your choice)"
    )


# Projections whose map metres stretch with latitude (Mercator, Web Mercator included, by 1/cos(latitude) each
# way: a pixel of the map's 1 m x 1 m covers 0.65 m2 at 36 degrees): their units measure no ground area.
STRETCHED_PROJECTIONS = {"merc": "Mercator", "webmerc": "Mercator", "eqc": "plate carree", "mill": "Miller"}


def area_problem(crs: CRS | None) -> str:
    """Why a CRS gives no ground area, in words for a warning ('' where its units are metres on the ground)."""
    if crs is None:
        return "no CRS"
    if not crs.is_projected:
        return "a geographic CRS"
    try:
        projection = crs.to_dict().get("proj", "")
    except (CRSError, ValueError):  # a CRS PROJ cannot write as a dict is left to its linear unit
        projection = ""
    if projection in STRETCHED_PROJECTIONS:
        return f"a {STRETCHED_PROJECTIONS[projection]} projection, whose metres stretch with latitude"
    return ""


def map_pixel_area(crs: CRS | None, transform: Affine) -> float | None:
    """Area of one pixel in the square metres of a projected CRS's map units; None without one."""
    if crs is None or not crs.is_projected:
        return None
    _, metres_per_unit = crs.linear_units_factor
    return abs(transform.determinant) * metres_per_unit**2


def north_up(picture: np.ndarray, transform: Affine) -> np.ndarray:
    """A picture (H, W, ...) of a grid's rows and columns as a map shows it, north up and east right: rows turned
    over for a south-up grid (positive y pixel size: rows run from south to north, as GIS software does not show
    them), columns for one whose x runs west; a rotated grid, or one without a geotransform (the identity: rows run
    down as in any image), is left as it is."""
    if transform.b or transform.d or transform.is_identity:
        return picture
    if transform.e > 0:
        picture = picture[::-1]
    if transform.a < 0:
        picture = picture[:, ::-1]
    return np.ascontiguousarray(picture)


def pixel_area_m2(crs: CRS | None, transform: Affine) -> float | None:
    """Area of one pixel in square metres on the ground, for a projected CRS whose units are metres (or feet)
    there; None for a geographic CRS, none at all, or one that stretches with latitude (area_problem)."""
    return None if area_problem(crs) else map_pixel_area(crs, transform)


# Pixel sizes within 2 % of each other are one size: training tiles are grouped by it, and a scene is resampled to
# the model's pixel size (or --pixel_size_m called different from the checkpoint's) only beyond it.
SAME_PIXEL_SIZE = 0.02


def pixel_size_m(crs: CRS | None, transform: Affine) -> float | None:
    """Metres per pixel (the side of a square of the pixel's area) in a projected CRS's map units; None
    otherwise."""
    area = map_pixel_area(crs, transform)
    return math.sqrt(area) if area else None


def ground_pixel_size(crs: CRS | None, transform: Affine, width: int, height: int) -> float | None:
    """Metres on the ground per pixel (the side of a square of its area) of a grid in a projected CRS, which
    resampling compares between tiles and scenes: its map metres where they are ground metres, else (Mercator,
    whose metres stretch with latitude: 1 m of Web Mercator spans 0.77 m at 40 degrees) estimated at the grid's
    centre (ground_pixel_size_estimate); None in degrees or without a CRS."""
    if crs is None or not crs.is_projected:
        return None
    if area_problem(crs):
        return ground_pixel_size_estimate(crs, transform, width, height)
    return pixel_size_m(crs, transform)


def metres_per_degree(lat: float) -> tuple[float, float]:
    """Metres per degree of latitude and of longitude at latitude ``lat`` (radians), on WGS 84 (series)."""
    per_lat = 111132.92 - 559.82 * math.cos(2 * lat) + 1.175 * math.cos(4 * lat)
    per_lon = 111412.84 * math.cos(lat) - 93.5 * math.cos(3 * lat)
    return per_lat, per_lon


def ground_pixel_size_estimate(crs: CRS | None, transform: Affine, width: int, height: int) -> float | None:
    """About how many metres on the ground a pixel spans at the grid's centre (the side of a square of its area,
    on the WGS 84 ellipsoid), for a grid in a geographic CRS (degrees) or in a projection whose metres stretch
    with latitude (area_problem); None for any other grid, or where its centre cannot be placed on the globe."""
    if crs is None or not area_problem(crs):
        return None
    if crs.is_geographic:
        try:
            degrees_per_unit = math.degrees(crs.units_factor[1])
        except (CRSError, TypeError, IndexError):  # a unit PROJ does not name: degrees, as nearly all are
            degrees_per_unit = 1.0
        lat = math.radians((transform @ (width / 2, height / 2))[1] * degrees_per_unit)
        if not -math.pi / 2 <= lat <= math.pi / 2:
            return None
        per_lat, per_lon = metres_per_degree(lat)
        degrees_area = abs(transform.determinant) * degrees_per_unit**2
        return math.sqrt(degrees_area * per_lat * per_lon) or None
    if not crs.is_projected:  # an engineering (local) CRS: no place on the globe
        return None
    # A projection: the centre pixel's corner and its neighbours across and down, in degrees, then in metres.
    corners = [transform @ (width / 2 + dx, height / 2 + dy) for dx, dy in ((0, 0), (1, 0), (0, 1))]
    try:
        lons, lats = rasterio.warp.transform(crs, "EPSG:4326", *zip(*corners))
    except (CRSError, CPLE_BaseError, rasterio.errors.RasterioError, ValueError):  # PROJ finds no way (Mars)
        return None
    if not all(map(math.isfinite, [*lons, *lats])) or not -90 < lats[0] < 90:
        return None
    per_lat, per_lon = metres_per_degree(math.radians(lats[0]))
    # A centre pixel across the antimeridian: its corners' longitudes differ by a pixel, not by 360 degrees.
    east = [((lon - lons[0] + 180) % 360 - 180) * per_lon for lon in lons[1:]]
    north = [(lat - lats[0]) * per_lat for lat in lats[1:]]
    return math.sqrt(abs(east[0] * north[1] - east[1] * north[0])) or None


def metric_epsg(crs: CRS, transform: Affine, width: int, height: int) -> int:
    """The EPSG code of a projected CRS in ground metres for the centre of a grid in degrees or in a projection whose
    metres stretch with latitude (Web Mercator): zone_epsg, Gauss-Kruger for a CGCS2000 grid."""
    lon, lat = transform @ (width / 2, height / 2)  # degrees, as geographic CRSs have them
    if crs.is_projected:  # map metres: the centre in degrees first
        (lon,), (lat,) = rasterio.warp.transform(crs, "EPSG:4326", [lon], [lat])
    return zone_epsg(lon, lat, cgcs2000=crs.to_epsg() == 4490)


def zone_epsg(lon: float, lat: float, cgcs2000: bool) -> int:
    """The projected CRS in ground metres of the zone a point in degrees lies in: with ``cgcs2000`` and within
    China's zones, CGCS2000 3-degree Gauss-Kruger without zone prefix (central meridians 75E..135E: EPSG:4534..
    4554, as Chinese land surveys use), else the WGS 84 UTM zone (32601..32660 north, 32701..32760 south)."""
    if cgcs2000 and 73.5 <= lon < 136.5 and lat >= 0:
        return 4534 + int((lon - 73.5) // 3)
    zone = min(60, max(1, int((lon + 180) // 6) + 1))
    return (32600 if lat >= 0 else 32700) + zone


def nodata_pixels(block: np.ndarray, nodata: float | None, axis: int) -> np.ndarray:
    """Where a block's bands (along ``axis``) are all zero, or all the declared nodata value, or (a float block)
    any of them NaN, declared or not: bool, bands gone. NaN is no value the network can take."""
    empty = ~block.any(axis=axis)
    if np.issubdtype(block.dtype, np.floating):
        empty |= np.isnan(block).any(axis=axis)
    if nodata is not None:
        same = np.isnan(block) if math.isnan(nodata) else block == np.asarray(nodata).astype(block.dtype)
        empty |= same.all(axis=axis)
    return empty


# Float scenes: values up to this far outside [0, 1] are reflectance that overshoots (bright clouds, glint, an
# atmospheric correction's small negatives) and are clipped into it; beyond it a scene is on another scale, refused.
REFLECTANCE_SLACK = 0.5


def clipped_reflectance(block: np.ndarray, nodata: np.ndarray) -> tuple[np.ndarray, int]:
    """A float (H, W, C) block of a scene or tile with its values slightly outside [0, 1] (REFLECTANCE_SLACK)
    clipped into it, and how many pixels with data were; other blocks as they are (image_to_float refuses those
    out of range)."""
    if not np.issubdtype(block.dtype, np.floating):
        return block, 0
    with np.errstate(invalid="ignore"):
        outside = ((block < 0) | (block > 1)).any(axis=2) & ~nodata
    count = int(outside.sum())
    if not count:
        return block, 0
    values = block[outside]
    if np.nanmin(values) < -REFLECTANCE_SLACK or np.nanmax(values) > 1 + REFLECTANCE_SLACK:
        return block, 0
    return np.clip(block, 0.0, 1.0), count


def write_palette_style(path: Path, entries: Sequence[tuple[int, tuple[int, int, int], int, str]]) -> None:
    """A QGIS layer style for a paletted single-band GeoTIFF (QGIS loads <name>.qml with <name>.tif): one
    (value, (r, g, b), alpha, label) per class; values not listed (nodata) are transparent."""
    lines = "".join(
        f'        <paletteEntry value="{value}" color="#{r:02x}{g:02x}{b:02x}" alpha="{alpha}" label="{label}"/>\n'
        for value, (r, g, b), alpha, label in entries
    )
    atomic_write_text(
        path,
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.28" styleCategories="AllStyleCategories">\n'
        "  <pipe>\n"
        '    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">\n'
        f"      <colorPalette>\n{lines}      </colorPalette>\n"
        "    </rasterrenderer>\n"
        "  </pipe>\n"
        "</qgis>\n",
    )
