"""Rasters on the ground: opening a GeoTIFF with an error a user can act on, and the size of its pixels.

Shared by scene prediction, tile making, training (the tiles' pixel size) and change detection.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import rasterio
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine

from files import DataError


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


def pixel_area_m2(crs: CRS | None, transform: Affine) -> float | None:
    """Area of one pixel in square metres for a projected CRS; None for a geographic CRS or none at all."""
    if crs is None or not crs.is_projected:
        return None
    _, metres_per_unit = crs.linear_units_factor
    return abs(transform.a * transform.e - transform.b * transform.d) * metres_per_unit**2


def pixel_size_m(crs: CRS | None, transform: Affine) -> float | None:
    """Metres per pixel (the side of a square of the pixel's area) for a projected CRS; None otherwise."""
    area = pixel_area_m2(crs, transform)
    return math.sqrt(area) if area else None
