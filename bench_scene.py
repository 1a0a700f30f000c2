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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import files
import predict
from benchmarking import measure_scene, peak_rss, random_checkpoint
from config import Config
from runtime import machine


def worker(args: Sequence[str]) -> int:
    """In the fresh process: run predict.py's main on one scene, print seconds and peak memory as JSON."""
    started = time.perf_counter()
    code = predict.main(list(args))
    seconds = time.perf_counter() - started
    print(json.dumps({"code": code, "seconds": seconds, "peak_rss": peak_rss()}))
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every size, print the table and write the JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5000,20000", help="scene sides in pixels, comma separated")
    parser.add_argument("--width", type=int, default=8, help="U-Net base width (random weights)")
    parser.add_argument("--window", type=int, default=Config.window, help="window side in pixels")
    parser.add_argument("--overlap", type=int, default=Config.overlap, help="overlap in pixels")
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
            results["scenes"].append(measure_scene(size, checkpoint, Path(tmp), settings))
    print(f"{'scene':>15} {'MP':>7} {'input GiB':>9} {'MP/s':>7} {'seconds':>8} {'peak RSS MiB':>12}")
    for row in results["scenes"]:
        print(
            f"{row['size']:>7} x {row['size']:<5} {row['megapixels']:>7.0f} {row['input_gib']:>9.2f} "
            f"{row['megapixels_per_s']:>7.2f} {row['predict_s']:>8.0f} {row['peak_rss_bytes'] / 2**20:>12.0f}"
        )
    files.atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
