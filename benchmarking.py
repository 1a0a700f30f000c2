"""What bench.py and bench_scene.py share: a synthetic GeoTIFF scene, a random checkpoint, a scene
predicted by predict.py in a fresh process with its time and peak memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import rasterio
import torch
from rasterio.transform import Affine
from rasterio.windows import Window

from net_structure import build_model

ROOT = Path(__file__).resolve().parent


STRIP = 512  # rows generated at a time


def scene_profile(size: int) -> dict[str, Any]:
    """A tiled 3-band 8-bit GeoTIFF in UTM with 1 m pixels and nodata 0."""
    return {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32615",
        "transform": Affine(1.0, 0.0, 400000.0, 0.0, -1.0, 4600000.0),
        "nodata": 0,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "BIGTIFF": "YES",
    }


def write_synthetic_scene(path: Path, size: int, seed: int = 0, cell: int = 64) -> None:
    """A size x size RGB GeoTIFF of blocks of ``cell`` pixels, each of its own colour, with noise (``cell=1``:
    pure noise, which gives any network a speckled mask), written strip by strip (never whole)."""
    rng = np.random.default_rng(seed)
    with rasterio.open(path, "w", **scene_profile(size)) as dst:
        for top in range(0, size, STRIP):
            rows = min(STRIP, size - top)
            first_cell, last_cell = top // cell, (top + rows - 1) // cell
            colours = rng.integers(40, 220, (3, last_cell - first_cell + 1, -(-size // cell)), dtype=np.uint8)
            block = np.repeat(np.repeat(colours, cell, axis=1), cell, axis=2)
            offset = top - first_cell * cell
            block = block[:, offset : offset + rows, :size]
            block = block + rng.integers(0, 16, block.shape, dtype=np.uint8)
            if top < size // 10:
                block[:, : min(rows, size // 10 - top), : size // 10] = 0  # nodata corner
            dst.write(block, window=Window(0, top, size, rows))


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM from /proc; ru_maxrss where /proc is absent). VmHWM is the
    process's own: Linux carries the forking process's resident memory into ru_maxrss across fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def random_checkpoint(width: int, folder: Path) -> Path:
    """Save a seeded, untrained 3-band U-Net of this width as a checkpoint predict.py can load."""
    torch.manual_seed(0)
    model = build_model(3, 2, width, 0.3)
    checkpoint = folder / f"random_{width}.pth"
    saved = {"in_channels": 3, "n_classes": 2, "base_width": width, "dropout": 0.3}
    torch.save({"model": model.state_dict(), "config": saved, "epoch": 0}, checkpoint)
    return checkpoint


def speckle_checkpoint(width: int, folder: Path) -> Path:
    """A random U-Net whose farmland bias is set so that it calls half of a noise image farmland: on a noise
    scene its mask is speckle (over 100,000 pieces and as many holes in 2,000 x 2,000 pixels), the worst
    mask a weak model, haze or water can give the polygon step. (An untouched random network calls nearly
    everything one class.)"""
    torch.manual_seed(0)
    model = build_model(3, 2, width, 0.3).eval()
    noise = torch.randint(40, 236, (1, 3, 256, 256), generator=torch.Generator().manual_seed(1)).float() / 255
    with torch.no_grad():
        logits = model(noise)
        model.outc.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    checkpoint = folder / f"speckle_{width}.pth"
    saved = {"in_channels": 3, "n_classes": 2, "base_width": width, "dropout": 0.3}
    torch.save({"model": model.state_dict(), "config": saved, "epoch": 0}, checkpoint)
    return checkpoint


def write_mosaic_scene(path: Path, size: int, tiles: Sequence[np.ndarray], seed: int = 0) -> None:
    """A size x size RGB GeoTIFF tiled with the given (H, W, 3) uint8 tiles in a seeded random order, written
    strip by strip: a scene of realistic fields from a few hundred demo tiles."""
    rng = np.random.default_rng(seed)
    side = tiles[0].shape[0]
    columns = -(-size // side)
    with rasterio.open(path, "w", **scene_profile(size)) as dst:
        for top in range(0, size, side):
            rows = min(side, size - top)
            picks = rng.integers(0, len(tiles), columns)
            strip = np.concatenate([tiles[i] for i in picks], axis=1)[:rows, :size]
            dst.write(strip.transpose(2, 0, 1), window=Window(0, top, size, rows))


def measure_scene(
    size: int,
    checkpoint: Path,
    folder: Path,
    settings: dict[str, Any],
    write_scene: Callable[[Path, int], None] = write_synthetic_scene,
) -> dict[str, Any]:
    """Generate one scene with ``write_scene``, predict it in a fresh process, return MP/s, the seconds of the
    field polygons (when ``polygons`` is on) and peak resident memory. Polygons are off unless asked for."""
    image = folder / f"scene_{size}.tif"
    started = time.perf_counter()
    write_scene(image, size)
    generated = time.perf_counter() - started
    overrides = [
        f"--run_dir={folder / f'run_{size}'}",
        f"--checkpoint={checkpoint}",
        f"--predict_input={image}",
        *(f"--{key}={value}" for key, value in {"polygons": False, **settings}.items()),
    ]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench_scene.py"), "--worker", *overrides],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"predicting the {size}-pixel scene failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    image.unlink()
    return {
        "size": size,
        "megapixels": size * size / 1e6,
        "input_gib": size * size * 3 / 2**30,
        "generate_s": generated,
        "predict_s": result["seconds"],
        "fields_s": result.get("fields_seconds", 0.0),
        "fields": result.get("fields"),
        "megapixels_per_s": size * size / 1e6 / result["seconds"],
        "peak_rss_bytes": result["peak_rss"],
    }
