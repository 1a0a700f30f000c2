"""Benchmark: whole-scene prediction speed and peak memory as the scene grows.

    python bench_scene.py                                  # 5,000 and 20,000 pixels a side, width 8
    python bench_scene.py --sizes=2000,4000 --width=16

For each size it writes a synthetic 3-band 8-bit GeoTIFF (UTM CRS, 1 m pixels, an all-zero nodata corner)
window by window, then runs ``predict.py`` on it in a fresh process with a random width-``width`` network:
mask and probability GeoTIFFs and the overlay are written; polygons are off (a random network's mask is
noise, whose millions of one-pixel "fields" would measure the noise, not the pipeline). It reports
megapixels per second (wall time of predict.py's main, file writing included) and the process's peak
resident memory (VmHWM), so that one can see that memory does not grow with the scene. The table is
printed and written as JSON with the machine, width, window and overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import rasterio
import torch
from rasterio.transform import Affine
from rasterio.windows import Window

import config
from bench import machine
from net_structure import build_model

STRIP = 512  # rows generated at a time


def write_synthetic_scene(path: Path, size: int, seed: int = 0) -> None:
    """A size x size RGB GeoTIFF of field-like blocks with noise, written strip by strip (never whole)."""
    rng = np.random.default_rng(seed)
    cell = 64  # "parcels" of 64 x 64 pixels, each of its own colour
    profile = {
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
    with rasterio.open(path, "w", **profile) as dst:
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
    """This process's peak resident memory in bytes (VmHWM from /proc; ru_maxrss where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def worker(args: Sequence[str]) -> int:
    """In the fresh process: run predict.py's main on one scene, print seconds and peak memory as JSON."""
    import predict

    started = time.perf_counter()
    code = predict.main(list(args))
    seconds = time.perf_counter() - started
    print(json.dumps({"code": code, "seconds": seconds, "peak_rss": peak_rss()}))
    return code


def random_checkpoint(width: int, folder: Path) -> Path:
    """Save a seeded, untrained 3-band U-Net of this width as a checkpoint predict.py can load."""
    torch.manual_seed(0)
    model = build_model(3, 2, width, 0.3)
    checkpoint = folder / f"random_{width}.pth"
    saved = {"in_channels": 3, "n_classes": 2, "base_width": width, "dropout": 0.3}
    torch.save({"model": model.state_dict(), "config": saved, "epoch": 0}, checkpoint)
    return checkpoint


def measure(size: int, checkpoint: Path, folder: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Generate one scene, predict it in a fresh process, return MP/s and peak resident memory."""
    image = folder / f"scene_{size}.tif"
    started = time.perf_counter()
    write_synthetic_scene(image, size)
    generated = time.perf_counter() - started
    overrides = [
        f"--run_dir={folder / f'run_{size}'}",
        f"--checkpoint={checkpoint}",
        f"--predict_input={image}",
        "--polygons=false",
        *(f"--{key}={value}" for key, value in settings.items()),
    ]
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", *overrides],
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
        "megapixels_per_s": size * size / 1e6 / result["seconds"],
        "peak_rss_bytes": result["peak_rss"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every size, print the table and write the JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5000,20000", help="scene sides in pixels, comma separated")
    parser.add_argument("--width", type=int, default=8, help="U-Net base width (random weights)")
    parser.add_argument("--window", type=int, default=config.Config.window, help="window side in pixels")
    parser.add_argument("--overlap", type=int, default=config.Config.overlap, help="overlap in pixels")
    parser.add_argument("--amp", default="auto", help="auto, bf16 or off")
    parser.add_argument("--device", default="cpu", help="cpu, auto or cuda")
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench_scene.json"), help="the JSON")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    settings = {"window": args.window, "overlap": args.overlap, "amp": args.amp, "device": args.device}
    info = machine()
    print(f"{info['cpu']} ({info['cpu_cores']} cores), torch {info['torch']}")
    print(f"U-Net width {args.width}, window {args.window}, overlap {args.overlap}, amp {args.amp}")
    results: dict[str, Any] = {"machine": info, "width": args.width, **settings, "scenes": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        checkpoint = random_checkpoint(args.width, Path(tmp))
        for size in sizes:
            print(f"{size} x {size} ...", flush=True)
            results["scenes"].append(measure(size, checkpoint, Path(tmp), settings))
    print(f"{'scene':>15} {'MP':>7} {'input GiB':>9} {'MP/s':>7} {'seconds':>8} {'peak RSS MiB':>12}")
    for row in results["scenes"]:
        print(
            f"{row['size']:>7} x {row['size']:<5} {row['megapixels']:>7.0f} {row['input_gib']:>9.2f} "
            f"{row['megapixels_per_s']:>7.2f} {row['predict_s']:>8.0f} {row['peak_rss_bytes'] / 2**20:>12.0f}"
        )
    config.atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
