"""Cut scenes and their farmland labels into the pipeline's tiles: images, 0/255 masks and a georeference table.

    python make_tiles.py --scene=scenes/a.tif --labels=survey/fields.gpkg --out=DATA --label_where="DLBM LIKE '01%'"

Inputs: one or more scenes (GeoTIFF; ``--scene=a.tif,b.tif`` or a folder of them) and the farmland as
polygons (GeoPackage, Shapefile, GeoJSON; ``label_where`` picks the farmland features, ``label_layer`` the
layer) or as a label raster (0 = background, 1 or 255 = farmland), in any CRS (see labels.py).
Outputs, under ``out`` (never inside a scene's or the labels' folder; the inputs are only read):
- ``images/<scene>_r<row>c<col>.png`` for 8-bit RGB scenes, else ``.tif`` with the scene's bands, pixel type,
  CRS and the tile's transform (row and col are the tile's top-left pixel in the scene);
- ``labels/<same><mask_suffix>.png``: 255 = farmland, 0 = background; with ``mark_unlabelled`` the pixels
  outside the labels' coverage, and the scene's nodata pixels, get ``ignore_index``;
- ``tiles.csv``: each tile's scene, row, col, size, CRS, affine transform (a, b, c, d, e, f) and pixel size,
  so predictions can be placed back; ``logs/make_tiles.log`` and ``configs/make_tiles.json``.
Tiles are ``tile_size`` pixels a side, every ``tile_stride`` pixels (the last row and column end at the
scene's edge); tiles with more than ``max_nodata_fraction`` nodata pixels (all bands 0 or the declared
nodata) are skipped, and nodata pixels are written as 0. A scene that cannot be tiled is reported and the
others go on (exit status 1). Re-running replaces the tiles of the scenes it tiles and keeps the others (another
tile size than theirs is refused).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
import rasterio.windows
from rasterio.windows import Window
from tqdm import tqdm

import cli
import files
from config import Config
from data_preprocess import TILED_NAMES, encode_tiff, read_image, unsupported_type_message, write_image
from files import DataError
from labels import Grid, GridLabels, Labels, open_labels
from rasters import (
    RASTER_SUFFIXES,
    REFLECTANCE_SLACK,
    TILE_TABLE,
    clipped_reflectance,
    gcp_only,
    nodata_pixels,
    open_raster,
    read_tile_table,
    rpc_only,
)

LOG = logging.getLogger("make_tiles")
TILE_DTYPES = ("uint8", "uint16", "float32", "float64")  # what the pipeline's tile reader takes (float64: as float32)
# A scene whose valid pixels are this much farmland or more is warned of: its labels most likely hold every
# land-use class (a whole land-survey layer, unfiltered), and tiles without background teach the network nothing.
ALL_FARMLAND = 0.99
COLUMNS = [
    "tile", "scene", "image", "mask", "row", "col", "width", "height", "crs",
    "a", "b", "c", "d", "e", "f", "pixel_size_x", "pixel_size_y", "nodata_fraction", "farmland_fraction",
]  # fmt: skip


def scene_paths(text: str, labels: Path | None = None) -> tuple[list[Path], list[Path]]:
    """The scenes named by ``--scene``: files separated by commas, or folders (their rasters, sorted), less the
    ``labels`` raster where it lies in such a folder (it is the labels, not a scene to tile); and the rasters so
    left out, under whatever name the folder holds them (a link to the labels too).

    Raises:
        ValueError: nothing named, or a folder without rasters.
    """
    if not text.strip():
        raise ValueError("--scene is empty; name the scene GeoTIFF(s): --scene=a.tif, --scene=a.tif,b.tif or a folder")
    paths: list[Path] = []
    left_out: list[Path] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        path = Path(part)
        if path.is_dir():
            rasters = folder_rasters(path)
            found = [p for p in rasters if labels is None or not is_same_file(p, labels)]
            left_out.extend(p for p in rasters if p not in found)
            if not found:
                besides = " besides the labels" if rasters else ""
                raise ValueError(f"--scene={part}: the folder holds no rasters{besides} ({', '.join(RASTER_SUFFIXES)})")
            paths.extend(found)
        else:
            paths.append(path)  # a missing file is reported with the other bad scenes
    return paths, left_out


def folder_rasters(folder: Path) -> list[Path]:
    """The rasters in a ``--scene`` folder (its files of RASTER_SUFFIXES), sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES)


def is_same_file(a: Path, b: Path) -> bool:
    """Whether the paths ``a`` and ``b`` name one existing file (however written: relative, by a link)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing or unreadable: not shown to be the same
        return False


def check_settings(cfg: Config) -> None:
    """Refuse tile settings that cannot work, before any file is read.

    Raises:
        ValueError: naming the key and the fix.
    """
    if cfg.tile_size < 16:
        raise ValueError(f"--tile_size={cfg.tile_size}: expected at least 16 pixels, for example --tile_size=256")
    if cfg.tile_stride < 0:
        raise ValueError(f"--tile_stride={cfg.tile_stride}: expected 0 (= tile_size) or a positive number of pixels")
    cli.check_fraction(cfg, "max_nodata_fraction")  # below 0 every tile was skipped as "more than -50% nodata"
    if cfg.mark_unlabelled and not 1 < cfg.ignore_index < 255:
        raise ValueError(
            f"--mark_unlabelled=true needs --ignore_index=N, the mask value of unlabelled pixels, other than 0, 1 "
            f"and 255 (found {cfg.ignore_index}); for example --ignore_index=128, and pass the same to "
            "split_dataset.py, train.py and miou.py"
        )
    if not cfg.labels:
        raise ValueError("--labels is empty; name the farmland polygons (.gpkg .shp .geojson) or label raster (.tif)")
    if not cfg.out:
        raise ValueError("--out is empty; name the data folder to write, for example --out=data/tiles")


def check_out(out: Path, inputs: Sequence[Path], subdirs: Sequence[str] = ("images", "labels")) -> None:
    """Refuse an output folder that is, or lies inside, the folder of a scene or of the labels, and one whose
    tile folders (``subdirs``) are, or hold, such a folder.

    Raises:
        ValueError: naming both folders and the fix; or the folder cannot be written.
    """
    target = out.resolve()
    for path in inputs:
        folder = (path if path.is_dir() else path.parent).resolve()
        if target == folder or folder in target.parents:
            raise ValueError(
                f"--out={out} lies inside {folder}, the folder of {path}; nothing is ever written beside your "
                "scenes and labels: choose an --out outside it, for example ../tiles"
            )
        for sub in (target / name for name in subdirs):
            if folder == sub or sub in folder.parents:
                raise ValueError(
                    f"--out={out} would write its tiles into {sub}, where {path} lies; nothing is ever written "
                    "beside your scenes and labels: choose another --out, for example ../tiles"
                )
    files.check_writable(target, key="--out")


def check_tile_size(out: Path, scenes: Sequence[Path], tile: int) -> None:
    """Refuse a tile size other than that of the tiles an earlier run left in ``out`` for scenes not tiled now:
    re-running keeps those tiles, and training batches need one size. Tiles of another file of a scene's name (in
    another folder) are kept too: that scene is refused as their namesake, not tiled again.

    Raises:
        DataError: naming the folder, both sizes, the scenes kept and the fix.
    """
    now = {path.resolve() for path in scenes}
    other = {
        Path(row.get("scene", "")).stem: f"{row.get('width')}x{row.get('height')}"
        for row in read_tile_table(out / TILE_TABLE)
        if Path(row.get("scene", "")).resolve() not in now and (row.get("width"), row.get("height")) != (str(tile),) * 2
    }
    if other:
        names = sorted(other)
        shown = ", ".join(f"{name} ({other[name]})" for name in names[:5]) + (", ..." if len(names) > 5 else "")
        raise DataError(
            f"{out / TILE_TABLE}: holds tiles of {len(names)} other scene(s) of another size, {shown}, which this run "
            f"keeps, and it cuts {tile}x{tile} tiles; training batches need one size (split_dataset.py refuses the "
            f"tiles of the less common size): give --tile_size={other[names[0]].split('x')[0]} as before, re-tile "
            "those scenes too (name them in --scene), or tile into another --out"
        )


def tile_origins(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis: every ``stride`` pixels, the last one ending at the scene's edge."""
    if size < tile:
        return []
    origins = list(range(0, size - tile + 1, stride))
    if origins[-1] != size - tile:
        origins.append(size - tile)
    return origins


def open_scene(path: Path, tile: int) -> rasterio.DatasetReader:
    """Open a scene and check that it can be tiled: readable, a CRS, pixel type, size.

    Raises:
        DataError: naming the scene, what was found and the fix.
    """
    if not path.is_file():
        raise DataError(f"{path}: scene not found; check the path given to --scene")
    src = open_raster(path)
    problem = ""
    if src.crs is None:
        fix = rpc_only(src) or gcp_only(src) or "assign its CRS on a copy (gdal_translate -a_srs EPSG:xxxx)"
        problem = f"has no CRS; expected a georeferenced scene; {fix}"
    elif src.dtypes[0] not in TILE_DTYPES:
        src.close()
        raise DataError(unsupported_type_message(np.dtype(src.dtypes[0]), path))
    elif min(src.width, src.height) < tile:
        problem = f"is {src.width}x{src.height} pixels, smaller than tile_size={tile}; lower --tile_size"
    if problem:
        src.close()
        raise DataError(f"{path}: {problem}")
    return src


def write_tile_image(path: Path, block: np.ndarray, src: rasterio.DatasetReader, window: Window) -> None:
    """Write a (bands, rows, cols) tile: PNG for 8-bit RGB, else a georeferenced TIFF the tile reader opens."""
    if path.suffix == ".png":
        write_image(path, np.ascontiguousarray(block.transpose(1, 2, 0)))
        return
    profile = {
        "crs": src.crs,
        "transform": rasterio.windows.transform(window, src.transform),
        "nodata": 0 if src.nodata is not None else None,
    }
    if block.shape[0] in (3, 4):  # image viewers show the first three bands as colour
        profile["photometric"] = "RGB"
    if block.shape[0] == 4:
        profile["alpha"] = "UNSPECIFIED"
    # Band names (Gaofen-2's blue, green, red, NIR) travel with the tile, so GIS software still shows them.
    files.atomic_write_bytes(path, encode_tiff(block, src.descriptions, **profile))


def tile_mask(farmland: np.ndarray, labelled: np.ndarray, nodata: np.ndarray, cfg: Config) -> np.ndarray:
    """The 0/255 mask; with mark_unlabelled, unlabelled and nodata pixels get ignore_index."""
    mask = np.where(farmland, 255, 0).astype(np.uint8)
    if cfg.mark_unlabelled:
        mask[~labelled | nodata] = cfg.ignore_index
    return mask


def table_row(name: str, src: rasterio.DatasetReader, window: Window, cfg: Config, fractions: tuple) -> dict:
    """One row of tiles.csv: where the tile sits in its scene and on the ground."""
    transform = rasterio.windows.transform(window, src.transform)
    suffix = ".png" if is_png(src) else ".tif"
    return {
        "tile": name,
        "scene": str(Path(src.name).resolve()),
        "image": f"{cfg.image_subdir}/{name}{suffix}",
        "mask": f"{cfg.label_subdir}/{name}{cfg.mask_suffix}.png",
        "row": int(window.row_off),
        "col": int(window.col_off),
        "width": int(window.width),
        "height": int(window.height),
        "crs": src.crs.to_string(),
        **{k: repr(float(v)) for k, v in zip("abcdef", transform[:6])},
        "pixel_size_x": repr(math.hypot(transform.a, transform.d)),
        "pixel_size_y": repr(math.hypot(transform.b, transform.e)),
        "nodata_fraction": f"{fractions[0]:.4f}",
        "farmland_fraction": f"{fractions[1]:.4f}",
    }


def is_png(src: rasterio.DatasetReader) -> bool:
    """8-bit RGB scenes give PNG tiles; every other kind keeps its bands and bit depth in a TIFF."""
    return src.count == 3 and src.dtypes[0] == "uint8"


class PartlyTiled(DataError):
    """A scene that failed after some of its tiles were written: none of its tiles may stay."""


def cut_tiles(
    src: rasterio.DatasetReader, on_grid: GridLabels, cfg: Config, out: Path, written: list[Path]
) -> tuple[list[dict], int]:
    """Write the tiles of one open scene, each file added to ``written`` once whole; return the table rows and
    how many tiles were skipped as nodata."""
    tile, stride = cfg.tile_size, cfg.tile_stride or cfg.tile_size
    stem, suffix = Path(src.name).stem, ".png" if is_png(src) else ".tif"
    windows = [
        Window(col, row, tile, tile)
        for row in tile_origins(src.height, tile, stride)
        for col in tile_origins(src.width, tile, stride)
    ]
    rows, skipped, clipped = [], 0, 0
    for window in tqdm(windows, desc=stem, unit="tile", disable=None):
        block = src.read(window=window)
        nodata = nodata_pixels(block, src.nodata, axis=0)
        block = block.astype(np.float32) if block.dtype == np.float64 else block  # reflectance: float32 is plenty
        if nodata.mean() > cfg.max_nodata_fraction:
            skipped += 1
            continue
        block[:, nodata] = 0
        # Reflectance a little outside [0, 1] (a bright cloud) is clipped, as predict.py clips it in a scene: the
        # tile reader refuses a float tile outside [0, 1], and split_dataset.py would leave the tile out.
        pixels, outside = clipped_reflectance(block.transpose(1, 2, 0), nodata)
        block, clipped = np.ascontiguousarray(pixels.transpose(2, 0, 1)), clipped + outside
        farmland, labelled = on_grid.read(window)
        mask = tile_mask(farmland & ~nodata, labelled, nodata, cfg)
        name = f"{stem}_r{int(window.row_off)}c{int(window.col_off)}"
        image_path, mask_path = (
            out / cfg.image_subdir / f"{name}{suffix}",
            out / cfg.label_subdir / f"{name}{cfg.mask_suffix}.png",
        )
        write_tile_image(image_path, block, src, window)
        written.append(image_path)
        write_image(mask_path, mask)
        written.append(mask_path)
        rows.append(table_row(name, src, window, cfg, (float(nodata.mean()), float((mask == 255).mean()))))
    if clipped:
        LOG.warning(
            "%s: %d pixel(s) of its tiles lie a little outside [0, 1] (bright cloud or haze in reflectance): clipped "
            "to [0, 1] in the tiles; values further than %g outside it are left as they are, and those tiles refused "
            "by split_dataset.py",
            src.name,
            clipped,
            REFLECTANCE_SLACK,
        )
    return rows, skipped


def tile_scene(path: Path, labels: Labels, cfg: Config, out: Path) -> list[dict]:
    """Cut one scene and its labels into tiles under ``out``; return their table rows.

    Raises:
        DataError: the scene cannot be read or tiled, or the labels cannot be placed on it.
    """
    with open_scene(path, cfg.tile_size) as src:
        grid = Grid(src.crs, src.transform, src.width, src.height, str(path))
        on_grid = labels.on_grid(grid)
        written: list[Path] = []
        try:
            rows, skipped = cut_tiles(src, on_grid, cfg, out, written)
        except rasterio.RasterioIOError as err:
            for tile in written:  # half a scene's tiles would go into training unnoticed
                tile.unlink(missing_ok=True)
            reason = "; ".join(dict.fromkeys(str(e)[:200] for e in (err.__cause__ or err.__context__, err) if e))
            raise PartlyTiled(
                f"{path}: reading failed part way ({reason}); the scene or the label raster may be truncated: "
                "check them (gdalinfo -checksum) and re-run (its tiles were removed, an earlier run's too)"
            ) from None
        finally:
            on_grid.close()
    if not rows:
        raise DataError(
            f"{path}: every one of its {skipped} tiles is more than {cfg.max_nodata_fraction:.0%} nodata; "
            "check the scene, or raise --max_nodata_fraction"
        )
    # Of the valid pixels of the tiles written (pixels of overlapping tiles count once per tile), not the scene's.
    valid = sum(1 - float(r["nodata_fraction"]) for r in rows)
    farmland = sum(float(r["farmland_fraction"]) for r in rows) / valid if valid else 0.0
    LOG.info(
        "%s: %d tiles written, %d skipped as nodata; farmland is %.1f%% of their valid pixels",
        path, len(rows), skipped, 100 * farmland,
    )  # fmt: skip
    if farmland >= ALL_FARMLAND:
        LOG.warning("%s", all_farmland_message(path, farmland, cfg))
    return rows


def all_farmland_message(path: Path, farmland: float, cfg: Config) -> str:
    """What to say of a scene whose tiles are (almost) all farmland: which labels to check, and the filter."""
    if cfg.label_where:
        fix = f'check that --label_where="{cfg.label_where}" picks the farmland alone'
    else:
        fix = (
            "if the labels hold every land-use class (a land-survey layer such as DLTB), pick the farmland with "
            "--label_where, for example --label_where=\"DLBM LIKE '01%'\""
        )
    return (
        f"{path}: {100 * farmland:.1f}% of the valid pixels of its tiles are farmland, expected a mix of farmland "
        f"and background (a network learns nothing from tiles without background): the labels {cfg.labels} "
        f"cover the whole scene; {fix}"
    )


def write_table(out: Path, rows: list[dict], done: set[str]) -> Path:
    """Write tiles.csv: this run's rows and an earlier run's rows of the scenes not tiled now.

    Tiles an earlier run wrote for a scene tiled now, and not written again, are removed (they were ours).
    """
    path = out / TILE_TABLE
    kept = []
    names = {r["tile"] for r in rows}
    for old in read_tile_table(path):
        if Path(old.get("scene", "")).stem not in done:
            kept.append(old)
        elif old.get("tile") not in names:
            for rel in (old.get("image"), old.get("mask")):
                if rel and not Path(rel).is_absolute() and ".." not in Path(rel).parts:
                    (out / rel).unlink(missing_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(sorted(kept + rows, key=lambda r: (r["scene"], int(r["row"]), int(r["col"]))))
    files.atomic_write_csv(path, buffer.getvalue())
    return path


def tile_all(
    scenes: Sequence[Path], labels: Labels, cfg: Config, out: Path
) -> tuple[list[dict], set[str], set[str], int]:
    """Tile every scene; a bad one is reported and the others go on. Returns rows, scenes done, scenes whose
    tiles must all go (PartlyTiled; an earlier run's half-overwritten tiles with them; or a bad one whose earlier
    tiles are of another size than this run's), failures."""
    rows: list[dict] = []
    done: set[str] = set()
    dropped: set[str] = set()
    failed = 0
    earlier_rows = read_tile_table(out / TILE_TABLE)
    earlier = {Path(r.get("scene", "")).stem: r.get("scene", "") for r in earlier_rows}
    size = (str(cfg.tile_size),) * 2
    resized = {Path(r.get("scene", "")).stem for r in earlier_rows if (r.get("width"), r.get("height")) != size}
    for path in scenes:
        if problem := files.name_problem(path):
            LOG.error("%s", problem)
            failed += 1
            continue
        if path.stem in done:
            LOG.error("%s: a scene named %s was already tiled in this run; rename one of them", path, path.stem)
            failed += 1
            continue
        if earlier.get(path.stem, str(path.resolve())) != str(path.resolve()):
            # Tiles are named by the scene's stem: tiling this one would overwrite the other's tiles.
            LOG.error(
                "%s: %s holds the tiles of %s, another scene of the same name; rename one of them or tile "
                "into another --out",
                path,
                out,
                earlier[path.stem],
            )
            failed += 1
            continue
        try:
            rows.extend(tile_scene(path, labels, cfg, out))
            done.add(path.stem)
        except DataError as err:
            LOG.error("%s", err)
            failed += 1
            if isinstance(err, PartlyTiled):
                dropped.add(path.stem)
            elif path.stem in resized:  # kept, its tiles would sit beside this run's of another size
                LOG.error(
                    "%s: its tiles from an earlier run in %s are removed too: they are of another size than this "
                    "run's %dx%d tiles, and training batches need one size; re-run it once fixed",
                    path,
                    out,
                    cfg.tile_size,
                    cfg.tile_size,
                )
                dropped.add(path.stem)
    return rows, done, dropped, failed


def scene_bands(out: Path, rows: list[dict]) -> dict[str, int]:
    """The band count of each scene's tiles in ``out`` (its first tile read), by the scene's path."""
    first: dict[str, str] = {}
    for row in rows:
        first.setdefault(row["scene"], row["image"])
    return {scene: read_image(out / image).shape[2] for scene, image in first.items()}


def next_step(cfg: Config, out: Path, rows: list[dict]) -> str:
    """The split command for these tiles, with the keys every later script needs for them too: the band count
    when it is not 3, and the mask value of unlabelled pixels."""
    keys = ""
    bands = scene_bands(out, rows)
    tiles = {count: sum(bands[row["scene"]] == count for row in rows) for count in set(bands.values())}
    common = max(tiles, key=lambda count: (tiles[count], count)) if rows else 3  # the count most tiles have
    if len(tiles) > 1:
        counts = ", ".join(f"{Path(scene).name}: {count} bands" for scene, count in bands.items())
        LOG.warning(
            "the scenes in %s have different band counts (%s): a network takes one count, so split_dataset.py "
            "will leave out the tiles without %d bands; tile scenes of another band count into another --out, or "
            "give every scene the same bands first (gdal_translate -b 1 -b 2 -b 3 ...)", out, counts, common
        )  # fmt: skip
    keys += f" --in_channels={common}" if common != 3 else ""
    keys += f" --ignore_index={cfg.ignore_index}" if cfg.mark_unlabelled else ""
    data = files.shell_quoted(out)
    command = f"next: python split_dataset.py --data_dir={data} --run_dir=RUN"
    scenes = {row.get("scene") for row in read_tile_table(out / TILE_TABLE)} or {row["scene"] for row in rows}
    by_scene = f" --group_pattern={files.shell_quoted(TILED_NAMES)}"
    also = f" (and{keys} on train.py and miou.py too)" if keys else ""
    if len(scenes) >= 3:
        return command + by_scene + keys + also
    # split_dataset.py refuses a scene split that leaves val or test without a scene of its own.
    return (
        f"{command}{keys}{also}: split by tile, as {len(scenes)} scene(s) are too few to give val and test scenes "
        f"of their own (val and test tiles then neighbour training tiles and score higher than new scenes would); "
        f"with 3 or more scenes in {data}, add{by_scene} to keep each scene's tiles in one split"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Cut every scene and its labels into tiles, masks and tiles.csv under ``out``."""
    cfg = cli.parse_args(argv, __doc__ or "")
    check_settings(cfg)
    (scenes, left_out), out = scene_paths(cfg.scene, Path(cfg.labels)), Path(cfg.out)
    inputs = [*(Path(p.strip()) for p in cfg.scene.split(",") if p.strip()), Path(cfg.labels)]
    check_out(out, inputs, (cfg.image_subdir, cfg.label_subdir))
    check_tile_size(out, scenes, cfg.tile_size)
    logged = dataclasses.replace(cfg, run_dir=str(out))
    cli.setup_logging(logged, "make_tiles")
    cli.save_config(logged, "make_tiles")
    for left in left_out:
        LOG.info(
            "%s: the labels lie in a --scene folder; read as the labels, not tiled as a scene (--labels=%s)",
            left,
            cfg.labels,
        )
    with open_labels(Path(cfg.labels), cfg.label_where, cfg.label_layer, cfg.label_encoding) as labels:
        LOG.info("labels: %s", labels.describe())
        rows, done, dropped, failed = tile_all(scenes, labels, cfg, out)
    if done or dropped:  # a dropped scene's earlier rows and tiles go too: this run overwrote some of them
        table = write_table(out, rows, done | dropped)
    if done:
        LOG.info("%d tiles from %d of %d scene(s) in %s (table %s); %s", len(rows), len(done), len(scenes), out,
                 table, next_step(cfg, out, rows))  # fmt: skip
    if failed:
        LOG.error("%d scene(s) could not be tiled (messages above); fix them and re-run", failed)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main, output_key="--out"))
