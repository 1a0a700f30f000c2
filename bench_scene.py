"""Benchmark: whole-scene prediction and field polygons, speed and peak memory, as the scene grows.

    python bench_scene.py                                  # 8,000 and 20,000 pixels a side, both cases
    python bench_scene.py --sizes=2000,4000 --cases=worst --width=16

For each size and case it writes a synthetic 3-band 8-bit GeoTIFF (UTM CRS, 1 m pixels) strip by strip, then
runs ``predict.py`` on it in a fresh process, with masks, probabilities, overviews, the overlay and the field
polygons written, and reports megapixels per second (wall time of predict.py's main, file writing included),
the seconds of the polygon step alone, the number of fields and the process's peak resident memory (VmHWM):

- ``realistic``: a network trained for a few epochs on demo tiles predicts a mosaic of other demo tiles, so
  the mask holds fields as a real one does;
- ``worst``: a random network, its bias set to call half of a noise image farmland, predicts pure noise,
  so the mask is speckle: over 30,000 pieces and as many holes per million pixels, the case a weak model,
  haze or water gives;
- ``prediction``: a random network on blocks of colour, polygons off (the prediction alone).

The table is printed and written as JSON with the machine, width, window and overlap.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import files
import predict
import scene
import split_dataset
import train
from benchmarking import (
    measure_scene,
    peak_rss,
    random_checkpoint,
    speckle_checkpoint,
    write_mosaic_scene,
    write_synthetic_scene,
)
from config import Config
from data_preprocess import read_image
from demo_data import generate_dataset
from net_structure import padding_of
from runtime import machine, resolve_amp, select_device

CASES = ("realistic", "worst", "prediction")
# Each case's network works at this downscale (the realistic one is trained on demo tiles, which carry no pixel size,
# at train.py's choice for them): it sets the pooling grid that --window and --overlap must keep to.
DOWNSCALE = {"realistic": 2, "worst": 1, "prediction": 1}


def worker(args: Sequence[str]) -> int:
    """In the fresh process: run predict.py's main on one scene, print seconds, the polygon step's seconds and
    field count, and peak memory as JSON."""
    timings = {"fields_seconds": 0.0, "fields": None}
    write_fields = scene.write_fields

    def timed(*call: Any) -> int:
        started = time.perf_counter()
        count = write_fields(*call)
        timings["fields_seconds"] += time.perf_counter() - started
        timings["fields"] = count
        return count

    scene.write_fields = timed  # the polygon step, timed apart from the prediction
    started = time.perf_counter()
    code = predict.main(list(args))
    seconds = time.perf_counter() - started
    print(json.dumps({"code": code, "seconds": seconds, "peak_rss": peak_rss(), **timings}))
    return code


def trained_checkpoint(width: int, folder: Path) -> tuple[Path, list[Any]]:
    """Train a small network on demo tiles for a few epochs (under a minute on 2 cores); return its
    checkpoint and other demo tiles, unseen in training, to build the realistic scene from."""
    images = generate_dataset(folder / "demo", 320, 64, seed=0)
    run = folder / "trained"
    common = [f"--data_dir={folder / 'demo'}", f"--run_dir={run}", "--num_workers=0"]
    settings = [f"--base_width={width}", "--epochs=6", "--batch_size=16", "--recipe=recommended", "--tensorboard=false"]
    settings.append(f"--downscale={DOWNSCALE['realistic']}")
    if split_dataset.main(common) != 0 or train.main([*common, *settings, "--snapshot_every=0"]) != 0:
        raise RuntimeError(f"training the realistic case's network failed; see {run / 'logs'}")
    tiles = [read_image(path)[:, :, :3] for path in images[-64:]]
    return run / "checkpoints" / "best.pth", tiles


def case_inputs(case: str, width: int, folder: Path) -> tuple[Path, Callable[[Path, int], None], dict[str, Any]]:
    """The checkpoint, the scene writer and the extra settings of one case."""
    folder.mkdir(parents=True, exist_ok=True)
    if case == "realistic":
        checkpoint, tiles = trained_checkpoint(width, folder)
        return checkpoint, functools.partial(write_mosaic_scene, tiles=tiles), {"polygons": True}
    if case == "worst":
        return speckle_checkpoint(width, folder), functools.partial(write_synthetic_scene, cell=1), {"polygons": True}
    return random_checkpoint(width, folder), write_synthetic_scene, {"polygons": False}


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every size, print the table and write the JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="8000,20000", help="scene sides in pixels, comma separated")
    parser.add_argument("--cases", default="realistic,worst", help=f"comma separated, of {', '.join(CASES)}")
    parser.add_argument("--width", type=int, default=8, help="U-Net base width")
    parser.add_argument("--window", type=int, default=Config.window, help="window side in pixels")
    parser.add_argument("--overlap", type=int, default=Config.overlap, help="overlap in pixels")
    parser.add_argument("--amp", default="auto", help="auto, bf16 or off")
    parser.add_argument("--device", default="cpu", help="cpu, auto or cuda")
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench_scene.json"), help="the JSON")
    args = parser.parse_args(argv)
    sizes, cases = checked_arguments(args, parser)
    settings = {"window": args.window, "overlap": args.overlap, "amp": args.amp, "device": args.device}
    info = machine()
    print(f"{info['cpu']} ({info['cpu_cores']} cores), torch {info['torch']}")
    print(f"U-Net width {args.width}, window {args.window}, overlap {args.overlap}, amp {args.amp}")
    results: dict[str, Any] = {"machine": info, "width": args.width, **settings, "scenes": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for case in cases:
            checkpoint, write_scene, extra = case_inputs(case, args.width, Path(tmp) / case)
            for size in sizes:
                print(f"{case}: {size} x {size} ...", flush=True)
                row = measure_scene(size, checkpoint, Path(tmp) / case, {**settings, **extra}, write_scene)
                results["scenes"].append({"case": case, **row})
    print_table(results["scenes"])
    files.atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


def checked_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[list[int], list[str]]:
    """The scene sides and cases asked for; anything that would fail only after minutes of training or writing
    scenes (a side that is not a positive number, an unknown amp or device, an --out that cannot be written) is
    refused first, and so are a window and overlap off the networks' pooling grids."""
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        parser.error(f"--sizes={args.sizes}: expected comma-separated scene sides in pixels, such as 2000,4000")
    cases = [c for c in args.cases.split(",") if c]
    if set(cases) - set(CASES):
        parser.error(f"--cases: expected some of {', '.join(CASES)}")
    if args.width < 1:
        parser.error(f"--width={args.width}: expected a positive U-Net base width, such as 8")
    for case in cases:  # the networks' pooling grids: else predict.py refuses them after the training
        grid, least = padding_of("unet", DOWNSCALE[case])
        try:
            scene.SceneSettings(window=args.window, overlap=args.overlap, grid=grid, least=least).check()
        except ValueError as err:
            parser.error(f"{err} (--cases={case})")
    try:
        resolve_amp(args.amp, select_device(args.device))
    except ValueError as err:
        parser.error(str(err))
    problem = files.out_problem(args.out, "bench_scene.json")
    if problem:
        parser.error(f"--out={args.out}: {problem}")
    return sizes, cases


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per case and size: megapixels/s, seconds of the whole run and of the polygons, peak memory."""
    print(f"{'case':>10} {'scene':>15} {'MP/s':>6} {'seconds':>8} {'polygons s':>10} {'fields':>8} {'peak MiB':>8}")
    for row in rows:
        print(
            f"{row['case']:>10} {row['size']:>7} x {row['size']:<5} {row['megapixels_per_s']:>6.2f} "
            f"{row['predict_s']:>8.0f} {row['fields_s']:>10.0f} {'-' if row['fields'] is None else row['fields']:>8} "
            f"{row['peak_rss_bytes'] / 2**20:>8.0f}"
        )


if __name__ == "__main__":
    sys.exit(main())
