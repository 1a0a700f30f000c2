"""Synthetic aerial "farmland" tiles for demos, tests and smoke runs, plus a per-pixel colour baseline.

Each tile is split into parcels (rotated rectangles from recursive subdivision, or Voronoi cells). Farmland
parcels (mask 255) carry crop rows or ploughed soil; background parcels carry meadow, orchard, forest, water or
farmyards, and roads, tracks, buildings and tree clumps are drawn on top. Crops and meadows share one seasonal
palette, and bare fields share soil colours with tracks and yards, so colour alone cannot separate the classes:
the texture (rows, furrows, crowns) and the context must. Everything follows a numpy Generator, so a seed
reproduces the data exactly.

make_demo_data.py is its command line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from data_preprocess import write_image
from files import DataError, atomic_write_text

GENERATOR_VERSION = 1  # bump when the rendering changes, so cached data sets are regenerated

# Seasonal crop palettes (RGB). Meadows draw from the same list as crops so colour cannot tell them apart.
SEASONS = {
    "spring": [(118, 162, 72), (98, 146, 64), (140, 170, 90), (128, 150, 84)],
    "summer": [(64, 112, 48), (80, 124, 56), (176, 160, 92), (96, 130, 62)],
    "autumn": [(182, 160, 96), (160, 132, 84), (120, 130, 70), (196, 176, 112)],
}
SOILS = [(140, 112, 84), (168, 148, 118), (112, 92, 72), (150, 126, 96), (124, 104, 88)]
FOREST = (46, 74, 40)
WATER = [(36, 52, 66), (44, 70, 58), (30, 44, 52)]
ROOFS = [(172, 172, 170), (150, 150, 156), (168, 76, 56), (140, 70, 52), (196, 190, 180)]


def _jitter(rng: np.random.Generator, colour: Sequence[float], amount: float) -> np.ndarray:
    """Return a colour moved by up to ``amount`` per channel, so parcels of one palette still differ."""
    return np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise (about ``cells`` blobs across), unit standard deviation, float32 (size, size)."""
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    field = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


def _rotated(xx: np.ndarray, yy: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in a frame turned by ``angle`` radians (used for parcels, rows and orchard grids)."""
    c, s = np.cos(angle), np.sin(angle)
    return xx * c + yy * s, -xx * s + yy * c


def _subdivision_parcels(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, size: int) -> np.ndarray:
    """Label map of rotated rectangular parcels from recursive splits, like a consolidated field pattern."""
    u, v = _rotated(xx, yy, rng.uniform(0, np.pi))
    min_area = size * size / rng.uniform(3, 9)
    stack = [(u.min(), u.max() + 1, v.min(), v.max() + 1)]
    labels = np.zeros((size, size), np.int32)
    count = 0
    while stack:
        u0, u1, v0, v1 = stack.pop()
        area = (u1 - u0) * (v1 - v0)
        if area > min_area and (area > 4 * min_area or rng.random() < 0.7):
            # Split the longer side so parcels stay field-shaped rather than sliver-shaped.
            t = rng.uniform(0.3, 0.7)
            if (u1 - u0) >= (v1 - v0):
                cut = u0 + t * (u1 - u0)
                stack += [(u0, cut, v0, v1), (cut, u1, v0, v1)]
            else:
                cut = v0 + t * (v1 - v0)
                stack += [(u0, u1, v0, cut), (u0, u1, cut, v1)]
            continue
        inside = (u >= u0) & (u < u1) & (v >= v0) & (v < v1)
        if inside.any():
            labels[inside] = count
            count += 1
    return labels


def _voronoi_parcels(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, size: int) -> np.ndarray:
    """Label map of Voronoi cells, stretched along a random direction for irregular, elongated fields."""
    angle = rng.uniform(0, np.pi)
    u, v = _rotated(xx, yy, angle)
    # Seeds spill past the border so cells run off the tile edges like real fields do.
    seeds = rng.uniform(-0.2 * size, 1.2 * size, (int(rng.integers(4, 11)), 2)).astype(np.float32)
    su, sv = _rotated(seeds[:, 0], seeds[:, 1], angle)
    stretch = rng.uniform(1.0, 2.0)
    dist = (u[..., None] - su) ** 2 + ((v[..., None] - sv) * stretch) ** 2
    return np.argmin(dist, axis=2).astype(np.int32)


def _crop_rows(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, crop: np.ndarray, soil: np.ndarray, scale: float
) -> np.ndarray:
    """Parallel crop rows at a per-parcel orientation and period; the gaps show soil or darker crop."""
    u, _ = _rotated(xx, yy, rng.uniform(0, np.pi))
    period = rng.uniform(3.5, 6.0) * scale  # >= 3.5 px so the rows survive the sensor blur
    wave = np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
    rows = np.clip(wave * rng.uniform(1.0, 2.0), -1, 1)[..., None]  # >1 gain squares the rows off
    gap = crop * rng.uniform(0.5, 0.7) if rng.random() < 0.5 else 0.4 * crop + 0.6 * soil * 0.85
    strength = rng.uniform(0.75, 1.0)
    return crop + (gap - crop) * (0.5 - 0.5 * rows) * strength


def _ploughed(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, soil: np.ndarray, scale: float) -> np.ndarray:
    """Bare soil with faint furrows, so it differs from tracks and yards only by its fine regular texture."""
    u, _ = _rotated(xx, yy, rng.uniform(0, np.pi))
    furrows = np.sin(2 * np.pi * u / (rng.uniform(3.0, 4.5) * scale))[..., None]
    return soil * (1.0 + rng.uniform(0.12, 0.2) * furrows)


def _orchard(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, ground: np.ndarray, scale: float) -> np.ndarray:
    """Crop-coloured ground under a regular grid of dark round tree crowns."""
    u, v = _rotated(xx, yy, rng.uniform(0, np.pi))
    spacing = rng.uniform(5.0, 8.0) * scale
    du = np.mod(u, spacing) - spacing / 2
    dv = np.mod(v, spacing) - spacing / 2
    radius = spacing * rng.uniform(0.22, 0.32)
    crowns = np.exp(-(du**2 + dv**2) / (2 * radius**2))[..., None]
    return ground + (_jitter(rng, FOREST, 10) - ground) * np.clip(crowns * 1.6, 0, 1)


def _meadow(rng: np.random.Generator, size: int, grass: np.ndarray) -> np.ndarray:
    """Grass with blotchy low-frequency brightness and hue variation, and no rows."""
    light = _smooth_noise(rng, size, int(rng.integers(3, 8)))[..., None]
    hue = _smooth_noise(rng, size, int(rng.integers(2, 6)))[..., None] * np.array([1.0, -0.5, 0.6], np.float32)
    return grass * (1.0 + rng.uniform(0.06, 0.14) * light) + rng.uniform(3, 9) * hue


def _forest(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dark green canopy with irregular crown-sized texture (blurred noise rather than a grid)."""
    canopy = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 1.0)
    canopy = canopy / (canopy.std() + 1e-6)
    return _jitter(rng, FOREST, 10) * (1.0 + 0.22 * canopy[..., None])


def _blob(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, size: int, radius: float) -> np.ndarray:
    """Irregular roundish blob (bool) for tree clumps and ponds: an ellipse with a noisy edge."""
    cx, cy = rng.uniform(0, size, 2)
    ax, ay = radius * rng.uniform(0.6, 1.4, 2)
    u, v = _rotated(xx - cx, yy - cy, rng.uniform(0, np.pi))
    return (u / ax) ** 2 + (v / ay) ** 2 + 0.35 * _smooth_noise(rng, size, 6) < 1.0


def _draw_building(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, centre: np.ndarray, angle: float, zoom: float
) -> None:
    """Rotated rectangular roof with a small cast shadow (drawn first, offset); both are background."""
    w, h = rng.uniform(2.5, 7.0, 2) * zoom
    c, s = np.cos(angle), np.sin(angle)
    corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]], np.float32) / 2 @ np.array([[c, s], [-s, c]])
    shadow = image[int(centre[1]), int(centre[0])] * 0.45  # darkened ground under the building
    roof = _jitter(rng, ROOFS[rng.integers(len(ROOFS))], 12)
    for offset, colour in ((max(1.0, zoom), shadow), (0.0, roof)):
        # 4 fractional bits (x16, shift=4): sub-pixel corners keep small roofs from looking like pixel blocks.
        pts = np.round((corners + centre + offset) * 16).astype(np.int32)[None]
        cv2.fillPoly(image, pts, [float(x) for x in colour], lineType=cv2.LINE_8, shift=4)
        cv2.fillPoly(mask, pts, 0, lineType=cv2.LINE_8, shift=4)


def _field_texture(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, green: np.ndarray, soil: np.ndarray, scale: float
) -> np.ndarray:
    """Texture of a farmland parcel: crop rows, or ploughed soil, under faint low-frequency shading."""
    texture = (
        _crop_rows(rng, xx, yy, green, soil, scale)
        if rng.random() < 0.75
        else _ploughed(rng, xx, yy, _jitter(rng, soil, 6), scale)
    )
    return texture * (1.0 + 0.04 * _smooth_noise(rng, xx.shape[0], 4)[..., None])


def _background_texture(
    rng: np.random.Generator,
    kind: str,
    xx: np.ndarray,
    yy: np.ndarray,
    green: np.ndarray,
    soil: np.ndarray,
    scale: float,
) -> np.ndarray:
    """Texture of a background parcel of ``kind``: meadow, orchard, forest, water or yard."""
    size = xx.shape[0]
    if kind == "meadow":
        return _meadow(rng, size, green)
    if kind == "orchard":
        return _orchard(rng, xx, yy, _meadow(rng, size, green), scale)
    if kind == "forest":
        return _forest(rng, size)
    if kind == "water":
        ripple = 1 + 0.03 * _smooth_noise(rng, size, 3)[..., None]
        return _jitter(rng, WATER[rng.integers(len(WATER))], 6) * ripple
    # farmyard: trampled soil, the same colours as bare fields, with buildings added later
    return _meadow(rng, size, _jitter(rng, soil, 8))


def _paint_parcels(
    rng: np.random.Generator,
    parcels: np.ndarray,
    palette: Sequence[Sequence[float]],
    soils: Sequence[np.ndarray],
    farm_share: float,
    xx: np.ndarray,
    yy: np.ndarray,
    scale: float,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Fill each parcel with a field or background texture; return (image float32, farmland, farmyards)."""
    size = parcels.shape[0]
    image = np.zeros((size, size, 3), np.float32)
    farm = np.zeros((size, size), bool)
    yards = []
    for label in np.unique(parcels):
        inside = parcels == label
        soil = soils[rng.integers(2)]
        green = _jitter(rng, palette[rng.integers(len(palette))], 12)
        if rng.random() < farm_share:
            farm |= inside
            texture = _field_texture(rng, xx, yy, green, soil, scale)
        else:
            kind = rng.choice(["meadow", "orchard", "forest", "water", "yard"], p=[0.45, 0.17, 0.15, 0.08, 0.15])
            texture = _background_texture(rng, kind, xx, yy, green, soil, scale)
            if kind == "yard":
                yards.append(inside)
        image[inside] = texture[inside]
    return image, farm, yards


def _draw_tracks(
    rng: np.random.Generator,
    image: np.ndarray,
    mask: np.ndarray,
    parcels: np.ndarray,
    soils: Sequence[np.ndarray],
    zoom: float,
) -> None:
    """Tracks along the edges of some parcels: thin soil-coloured lines between fields, background in the mask."""
    kernel = np.ones((2 * max(1, round(zoom / 2)) + 1,) * 2, np.uint8)
    for label in np.unique(parcels):
        if rng.random() < 0.2:
            cell = (parcels == label).astype(np.uint8)
            edge = (cell - cv2.erode(cell, kernel, borderType=cv2.BORDER_REPLICATE)) > 0
            # Compacted tracks are lighter than the soil they are cut into; lighter keeps them visible.
            image[edge] = _jitter(rng, soils[rng.integers(2)], 8) * rng.uniform(1.18, 1.4)
            mask[edge] = 0


def _draw_roads(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, soils: Sequence[np.ndarray], zoom: float
) -> None:
    """Straight dirt or paved roads crossing the tile from border to border."""
    size = mask.shape[0]
    for _ in range(rng.choice(3, p=[0.45, 0.4, 0.15])):
        ends = rng.uniform(-0.1 * size, 1.1 * size, (2, 2))
        ends[:, rng.integers(2)] = [-1, size]  # run from one border to the opposite one
        p0, p1 = (tuple(int(round(x)) for x in e) for e in ends)
        width = max(1, int(round(rng.uniform(1, 2.6) * zoom)))
        dirt = rng.random() < 0.75  # dirt roads (lighter than the soil) or grey paved ones
        road = _jitter(rng, soils[rng.integers(2)] * rng.uniform(1.15, 1.35) if dirt else (160, 158, 152), 8)
        cv2.line(image, p0, p1, [float(x) for x in road], width)
        cv2.line(mask, p0, p1, 0, width)


def _draw_clumps(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> None:
    """Tree clumps and ponds over any parcel, fields included (the trees are not farmland)."""
    size = mask.shape[0]
    for _ in range(rng.choice(4, p=[0.35, 0.35, 0.2, 0.1])):
        clump = _blob(rng, xx, yy, size, rng.uniform(0.05, 0.15) * size)
        image[clump] = (
            _forest(rng, size)
            if rng.random() < 0.8
            else np.broadcast_to(_jitter(rng, WATER[rng.integers(len(WATER))], 6), image.shape)
        )[clump]
        mask[clump] = 0


def _place_buildings(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, yards: Sequence[np.ndarray], zoom: float
) -> None:
    """Buildings: clustered in farmyards, a few scattered on any background."""
    groups = [(np.argwhere(y), int(rng.integers(2, 6))) for y in yards]
    groups += [(np.argwhere(mask == 0), 1) for _ in range(int(rng.integers(0, 3)))]
    for cells, count in groups:
        angle = rng.uniform(0, np.pi)  # buildings of one yard share an orientation
        for _ in range(count if len(cells) else 0):
            centre = cells[rng.integers(len(cells))][::-1].astype(np.float32)
            _draw_building(rng, image, mask, centre, angle + rng.choice([0, np.pi / 2]), zoom)


def _sensor(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """The whole tile as the sensor sees it: per-tile gain and haze, slight optical blur, then noise; uint8."""
    image = image * rng.uniform(0.88, 1.12) * rng.uniform(0.96, 1.04, 3)
    haze = rng.uniform(0.0, 0.15)
    image = image * (1 - haze) + haze * np.float32(180)
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), rng.uniform(0.35, 0.65))
    image = image + rng.normal(0, rng.uniform(1.5, 4.5), image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def render_tile(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Return (image uint8 HxWx3 RGB, mask uint8 HxW with values 0/255)."""
    # A tile always shows about the same ground area: objects grow with the tile (zoom), while row and
    # crown textures grow more slowly (scale) so they stay fine-grained on small tiles and visible on big ones.
    zoom = size / 64.0
    scale = max(zoom, 0.5) ** 0.5
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    palette = SEASONS[list(SEASONS)[rng.integers(len(SEASONS))]]
    soils = [_jitter(rng, SOILS[i], 8) for i in rng.choice(len(SOILS), 2, replace=False)]
    parcels = (_subdivision_parcels if rng.random() < 0.6 else _voronoi_parcels)(rng, xx, yy, size)
    farm_share = rng.uniform(0.1, 0.95)  # mixes mostly-farmland and mostly-background tiles
    image, farm, yards = _paint_parcels(rng, parcels, palette, soils, farm_share, xx, yy, scale)
    mask = farm.astype(np.uint8) * 255
    # Each step draws from rng in turn, so reordering them changes every tile of a seed (bump GENERATOR_VERSION).
    _draw_tracks(rng, image, mask, parcels, soils, zoom)
    _draw_roads(rng, image, mask, soils, zoom)
    _draw_clumps(rng, image, mask, xx, yy)
    _place_buildings(rng, image, mask, yards, zoom)
    return _sensor(rng, image), mask


def _tile_rng(seed: int, index: int) -> np.random.Generator:
    """Generator for one tile, so tile i is the same whatever n_tiles is (a larger set extends a smaller one)."""
    return np.random.default_rng([seed, index])


def generate_dataset(out_dir: Path, n_tiles: int = 400, size: int = 64, seed: int = 0) -> list[Path]:
    """Write out_dir/images/tile_0000.png and out_dir/labels/tile_0000_mask.png ...; return image paths.

    Skips the work when out_dir/demo_manifest.json records the same n_tiles/size/seed and generator version
    and every file exists; otherwise (re)writes the set and removes tiles left over from a larger earlier one.
    """
    out_dir = Path(out_dir)
    images_dir, labels_dir = out_dir / "images", out_dir / "labels"
    names = [f"tile_{i:04d}" for i in range(n_tiles)]
    images = [images_dir / f"{name}.png" for name in names]
    labels = [labels_dir / f"{name}_mask.png" for name in names]
    manifest_path = out_dir / "demo_manifest.json"
    wanted = {"n_tiles": n_tiles, "size": size, "seed": seed, "version": GENERATOR_VERSION}
    try:
        cached = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = None
    if cached == wanted and all(p.is_file() for p in images + labels):
        return images
    holds_files = any(f.is_dir() and any(f.iterdir()) for f in (images_dir, labels_dir))
    if cached is None and holds_files:
        # Never overwrite or delete files this generator did not write: a user's data set, say.
        raise DataError(
            f"{out_dir}: holds images or labels but no {manifest_path.name}, so it is not a demo data folder; "
            "choose an empty or new folder for the demo data"
        )
    # Drop the manifest first: an interrupted run must not look complete next time.
    manifest_path.unlink(missing_ok=True)
    keep = set(images + labels)
    for folder in (images_dir, labels_dir):
        for stale in folder.glob("tile_*.png") if folder.is_dir() else []:
            if stale not in keep:
                stale.unlink()
    for index, (image_path, label_path) in enumerate(zip(images, labels)):
        image, mask = render_tile(_tile_rng(seed, index), size)
        write_image(image_path, image)
        write_image(label_path, mask)
    atomic_write_text(manifest_path, json.dumps(wanted, indent=2) + "\n")
    return images


def scene_profile(side: int) -> dict:
    """The GeoTIFF profile of a demo scene: side x side uint8 pixels of 1 m in UTM zone 50N, tiled, DEFLATE."""
    from rasterio.transform import Affine  # only the scenes need GDAL; the tile data sets do not

    return {
        "driver": "GTiff",
        "width": side,
        "height": side,
        "dtype": "uint8",
        "crs": "EPSG:32650",
        "transform": Affine(1.0, 0.0, 500000.0, 0.0, -1.0, 3500000.0),
        "tiled": True,
        "compress": "deflate",
    }


def write_demo_scene(path: Path, tiles: int = 12, size: int = 64, seed: int = 1) -> Path:
    """Write a GeoTIFF scene mosaicked from tiles x tiles demo tiles, and its label beside it.

    The scene has a UTM CRS (zone 50N) and 1 m pixels; the label, ``<stem>_label.tif``, holds 1 for farmland
    and 0 for background. Tiles are rendered one row at a time, so large mosaics stay small in memory.
    Returns the label's path.
    """
    import rasterio  # only the scene needs GDAL; the tile data sets do not

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    label_path = path.with_name(f"{path.stem}_label.tif")
    side = tiles * size
    profile = scene_profile(side)
    with (
        rasterio.open(path, "w", count=3, **profile) as image_file,
        rasterio.open(label_path, "w", count=1, **profile) as label_file,
    ):
        for row in range(tiles):
            rendered = [render_tile(_tile_rng(seed, row * tiles + col), size) for col in range(tiles)]
            window = rasterio.windows.Window(0, row * size, side, size)
            image_file.write(np.concatenate([r[0] for r in rendered], axis=1).transpose(2, 0, 1), window=window)
            label_file.write((np.concatenate([r[1] for r in rendered], axis=1) > 0).astype(np.uint8), 1, window=window)
    return label_path


def _colour_cells(image: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel colour cell indices (r, g, b), each in [0, bins)."""
    quantised = (np.asarray(image)[..., :3].astype(np.int32) * bins) // 256
    return quantised[..., 0], quantised[..., 1], quantised[..., 2]


def fit_colour_classifier(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], bins: int = 16) -> np.ndarray:
    """Per-pixel colour baseline: quantise RGB into bins**3 cells, count farmland vs background pixels per cell
    on the given (training) tiles, return a bool lookup table (bins, bins, bins), True where farmland is the
    majority (ties and unseen colours count as background)."""
    farm_counts = np.zeros(bins**3, np.int64)
    all_counts = np.zeros(bins**3, np.int64)
    for image, mask in zip(images, masks):
        r, g, b = _colour_cells(image, bins)
        cell = ((r * bins + g) * bins + b).ravel()
        all_counts += np.bincount(cell, minlength=bins**3)
        farm_counts += np.bincount(cell, weights=(np.asarray(mask).ravel() > 0), minlength=bins**3).astype(np.int64)
    return (2 * farm_counts > all_counts).reshape(bins, bins, bins)


def apply_colour_classifier(table: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Return a uint8 HxW mask (0/1) by looking up each pixel's colour cell; vectorised."""
    r, g, b = _colour_cells(image, table.shape[0])
    return table[r, g, b].astype(np.uint8)


# --- a second date: farmland lost and gained -------------------------------------------------------------

LOSS_CHANCE = 0.4  # chance that a tile loses part of its farmland to buildings, a road or a pond by the second date
GAIN_CHANCE = 0.3  # chance that a tile turns part of its background (bare land, meadow, yard) into a field


def _patch_region(rng: np.random.Generator, allowed: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """A rotated rectangle (part of a parcel or more) around a random ``allowed`` pixel, clipped to ``allowed``;
    empty when under 5 % of the tile is allowed."""
    size = allowed.shape[0]
    cells = np.argwhere(allowed)
    if len(cells) < 0.05 * size * size:
        return np.zeros_like(allowed)
    cy, cx = cells[rng.integers(len(cells))]
    u, v = _rotated(xx - cx, yy - cy, rng.uniform(0, np.pi))
    half = rng.uniform(0.12, 0.28, 2) * size
    return (np.abs(u) < half[0]) & (np.abs(v) < half[1]) & allowed


def _lost_farmland(
    rng: np.random.Generator, farm: np.ndarray, xx: np.ndarray, yy: np.ndarray, zoom: float
) -> tuple[np.ndarray, np.ndarray]:
    """(where, new ground before the sensor) of farmland taken by buildings on a yard, a new paved road or a
    pond."""
    size = farm.shape[0]
    kind = rng.choice(["buildings", "road", "water"], p=[0.5, 0.25, 0.25])
    if kind == "buildings":
        region = _patch_region(rng, farm, xx, yy)
        ground = _meadow(rng, size, _jitter(rng, SOILS[rng.integers(len(SOILS))], 8))
        scratch, cells, angle = np.zeros(farm.shape, np.uint8), np.argwhere(region), rng.uniform(0, np.pi)
        for _ in range(int(rng.integers(2, 6)) if len(cells) else 0):
            centre = cells[rng.integers(len(cells))][::-1].astype(np.float32)
            _draw_building(rng, ground, scratch, centre, angle + rng.choice([0, np.pi / 2]), zoom)
        return region, ground
    if kind == "road":
        band = np.zeros(farm.shape, np.uint8)
        ends = rng.uniform(-0.1 * size, 1.1 * size, (2, 2))
        ends[:, rng.integers(2)] = [-1, size]  # from one border to the opposite one
        p0, p1 = (tuple(int(round(x)) for x in e) for e in ends)
        cv2.line(band, p0, p1, 1, max(3, int(round(rng.uniform(3, 6) * zoom))))
        paved = _jitter(rng, (160, 158, 152), 8)
        return band.astype(bool) & farm, np.broadcast_to(paved, (size, size, 3)).astype(np.float32)
    region = _blob(rng, xx, yy, size, rng.uniform(0.15, 0.25) * size) & farm
    ripple = 1 + 0.03 * _smooth_noise(rng, size, 3)[..., None]
    return region, _jitter(rng, WATER[rng.integers(len(WATER))], 6) * ripple


def _gained_farmland(
    rng: np.random.Generator, farm: np.ndarray, xx: np.ndarray, yy: np.ndarray, zoom: float
) -> tuple[np.ndarray, np.ndarray]:
    """(where, new ground before the sensor) of background, away from its thin roads and tracks, turned into a
    field with crop rows or ploughed soil."""
    open_land = cv2.erode((~farm).astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2).astype(bool)
    region = _patch_region(rng, open_land, xx, yy)
    scale = max(zoom, 0.5) ** 0.5
    soil = _jitter(rng, SOILS[rng.integers(len(SOILS))], 8)
    if rng.random() < 0.75:
        palette = SEASONS[list(SEASONS)[rng.integers(len(SEASONS))]]
        return region, _crop_rows(rng, xx, yy, _jitter(rng, palette[rng.integers(len(palette))], 12), soil, scale)
    return region, _ploughed(rng, xx, yy, soil, scale)


def changed_tile(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ground of a rendered tile at a second date: with LOSS_CHANCE part of its farmland became buildings,
    a road or a pond, with GAIN_CHANCE part of its background became a field; the new ground is blurred and
    noised as the sensor does, and the whole tile gets the other date's light (gain and haze).

    Returns:
        (image uint8 HxWx3, mask uint8 HxW 0/255) of the second date.
    """
    size = mask.shape[0]
    zoom = size / 64.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    after, after_mask, farm = image.astype(np.float32), mask.copy(), mask > 0
    changes = []
    if rng.random() < LOSS_CHANCE:
        changes.append((*_lost_farmland(rng, farm, xx, yy, zoom), 0))
    if rng.random() < GAIN_CHANCE:
        changes.append((*_gained_farmland(rng, farm, xx, yy, zoom), 255))
    for region, ground, label in changes:
        ground = cv2.GaussianBlur(np.ascontiguousarray(ground, np.float32), (0, 0), 0.5)
        ground = ground + rng.normal(0, rng.uniform(1.5, 4.5), ground.shape)
        after[region] = ground[region]
        after_mask[region] = label
    haze = rng.uniform(0.0, 0.1)
    after = after * rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, 3) * (1 - haze) + haze * np.float32(180)
    return np.clip(np.round(after), 0, 255).astype(np.uint8), after_mask


def write_demo_change_pair(folder: Path, tiles: int = 12, size: int = 64, seed: int = 1) -> dict[str, Path]:
    """Write two dates of a demo scene and the true change between them into ``folder``.

    The before date is exactly write_demo_scene's scene of the same seed; in the after date parcels of some
    tiles lost farmland to buildings, roads or ponds and some bare land became fields (changed_tile). Both
    are GeoTIFFs in UTM zone 50N with 1 m pixels, written one row of tiles at a time.

    Returns:
        Paths by kind: before, after (RGB scenes), before_label, after_label (1 = farmland) and truth (0 stable
        background, 1 stable farmland, 2 farmland lost, 3 farmland gained: change_detection.py's codes).
    """
    import rasterio  # only the scenes need GDAL; the tile data sets do not

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = {"before": "before.tif", "after": "after.tif", "before_label": "before_label.tif"}
    names |= {"after_label": "after_label.tif", "truth": "change_truth.tif"}
    paths = {kind: folder / name for kind, name in names.items()}
    side = tiles * size
    profile = scene_profile(side)
    bands = {"before": 3, "after": 3, "before_label": 1, "after_label": 1, "truth": 1}
    handles = {kind: rasterio.open(paths[kind], "w", count=bands[kind], **profile) for kind in paths}
    try:
        for row in range(tiles):
            strips: dict[str, list[np.ndarray]] = {kind: [] for kind in paths}
            for col in range(tiles):
                index = row * tiles + col
                image, mask = render_tile(_tile_rng(seed, index), size)
                after, after_mask = changed_tile(np.random.default_rng([seed, index, 2]), image, mask)
                was, now = mask > 0, after_mask > 0
                truth = np.where(was, np.where(now, 1, 2), np.where(now, 3, 0)).astype(np.uint8)
                for kind, array in zip(paths, (image, after, was, now, truth)):
                    strips[kind].append(array)
            window = rasterio.windows.Window(0, row * size, side, size)
            for kind, parts in strips.items():
                block = np.concatenate(parts, axis=1).astype(np.uint8)
                handles[kind].write(block.transpose(2, 0, 1) if block.ndim == 3 else block[None], window=window)
    finally:
        for handle in handles.values():
            handle.close()
    return paths
