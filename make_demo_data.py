"""Write synthetic aerial "farmland" tiles and masks (or a GeoTIFF scene) for demos, tests and smoke runs.

Usage: python make_demo_data.py --out=demo_data --n_tiles=400 --size=64 --seed=0
       python make_demo_data.py --scene=demo_scene/scene.tif --scene_tiles=12 --seed=1   # a GeoTIFF scene
       python make_demo_data.py --change_pair=demo_change --scene_tiles=12 --seed=1        # two dates and their change

The generator itself lives in demo_data.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from data_preprocess import read_image
from demo_data import generate_dataset, write_demo_change_pair, write_demo_scene


def main(argv: list[str] | None = None) -> int:
    """Command line: write a demo data set and print where it went and how much of it is farmland."""
    parser = argparse.ArgumentParser(description="Write synthetic farmland tiles and masks for demos and tests.")
    parser.add_argument("--out", type=Path, default=Path("demo_data"), help="output folder (images/, labels/)")
    parser.add_argument("--n_tiles", type=int, default=400, help="number of tiles")
    parser.add_argument("--size", type=int, default=64, help="tile side in pixels (32 to 256 look right)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same tiles")
    parser.add_argument("--scene", type=Path, help="instead of tiles, write one GeoTIFF scene here (and its label)")
    parser.add_argument("--scene_tiles", type=int, default=12, help="the scene is a mosaic of N x N tiles")
    parser.add_argument(
        "--change_pair", type=Path, help="instead, write two dates of a scene and their true change into this folder"
    )
    args = parser.parse_args(argv)
    if args.n_tiles < 1 or args.size < 8 or args.seed < 0 or args.scene_tiles < 1:
        parser.error("--n_tiles and --scene_tiles must be >= 1, --size >= 8 and --seed >= 0")
    if args.change_pair is not None:
        paths = write_demo_change_pair(args.change_pair, args.scene_tiles, args.size, args.seed)
        print("two dates of a scene and their change: " + ", ".join(f"{k} {v}" for k, v in paths.items()))
        return 0
    if args.scene is not None:
        label = write_demo_scene(args.scene, args.scene_tiles, args.size, args.seed)
        side = args.scene_tiles * args.size
        print(f"scene of {side}x{side} pixels in {args.scene}, its label (1 = farmland) in {label}")
        return 0
    paths = generate_dataset(args.out, args.n_tiles, args.size, args.seed)
    masks = [read_image(args.out / "labels" / f"{path.stem}_mask.png") for path in paths]
    share = float(np.mean([np.mean(mask > 0) for mask in masks]))
    print(
        f"{len(paths)} tiles of {args.size}x{args.size} in {args.out / 'images'}, masks in {args.out / 'labels'}; "
        f"{share:.0%} farmland"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
