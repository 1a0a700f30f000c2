"""Compare the reference recipe with the recommended one on your own labelled data, side by side.

    python compare_recipes.py --data_dir=path/to/data --group_pattern='^(.+)_r\\d+c\\d+$' --base_width=16 --epochs=8

1. Split the data once by scene (``group_pattern``; all tiles of a scene in one split, so neighbouring
   tiles cannot leak from training into the test figures).
2. For the whole data set, and for a minority subset (the tiles with the least farmland, the share set by
   ``--minority_quantile``, kept within the same scene split), train the reference recipe
   (``--recipe=reference``) and the recommended one (``--recipe=recommended``) on the same number of tile
   passes, predict the test split and score it with miou.py.
3. Print a table and write run_dir/comparison.json: test farmland IoU pooled and per image, boundary IoU,
   best epoch, tuned threshold and training time of each run.

Any other ``--key=value`` is a config key passed to every run (for example ``--num_workers=4``).
Offline flips (augment.py) are left out of both recipes, so both see exactly the same tiles.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

import cli
import files
import miou
import predict
import split_dataset
import train
from data_preprocess import SPLIT_NAMES, load_mask, read_pair_list, write_pair_list
from runtime import load_checkpoint

LOG = logging.getLogger("compare_recipes")
RECIPES = ("reference", "recommended")


def farmland_fraction(mask_path: Path, mask_threshold: int = 0, ignore_index: int = -1) -> float:
    """Share of a mask's labelled pixels that are farmland."""
    mask = load_mask(mask_path, mask_threshold, ignore_index)
    labelled = mask <= 1
    return float((mask == 1).sum() / max(int(labelled.sum()), 1))


def minority_splits(
    splits: dict[str, list[tuple[Path, Path]]], quantile: float, mask_threshold: int = 0, ignore_index: int = -1
) -> tuple[dict[str, list[tuple[Path, Path]]], float]:
    """Keep, in every split, the tiles whose farmland share is at or below the ``quantile`` of all tiles.

    Returns:
        the filtered splits and the farmland share of the kept tiles' pixels (unweighted mean of tiles).
    """
    fractions = {pair: farmland_fraction(pair[1], mask_threshold, ignore_index) for s in splits.values() for pair in s}
    cut = float(np.quantile(list(fractions.values()), quantile))
    kept = {name: [p for p in pairs if fractions[p] <= cut] for name, pairs in splits.items()}
    shares = [fractions[p] for pairs in kept.values() for p in pairs]
    return kept, float(np.mean(shares)) if shares else float("nan")


def run_recipe(
    run_dir: Path, splits: dict[str, list[tuple[Path, Path]]], recipe: str, epochs: int, overrides: Sequence[str]
) -> dict:
    """Train, predict and score one recipe in ``run_dir``; return its figures."""
    for name in SPLIT_NAMES:
        write_pair_list(run_dir / "splits" / f"{name}.txt", splits[name])
    common = [*overrides, f"--run_dir={run_dir}"]  # the last value of a key wins
    started = time.perf_counter()
    if train.main([*common, f"--recipe={recipe}", f"--epochs={epochs}"]) != 0:
        raise RuntimeError(f"{run_dir}: training failed; see {run_dir / 'logs' / 'train.log'}")
    seconds = time.perf_counter() - started
    # A stale metrics.json from an earlier run must never pass for this one's.
    (run_dir / "metrics.json").unlink(missing_ok=True)
    if predict.main([*common, "--overlay=false"]) != 0:
        raise RuntimeError(f"{run_dir}: prediction failed; see {run_dir / 'logs' / 'predict.log'}")
    if miou.main(common) != 0:
        raise RuntimeError(f"{run_dir}: scoring failed; see {run_dir / 'logs' / 'miou.log'}")
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    best = load_checkpoint(run_dir / "checkpoints" / "best.pth")
    return {
        "recipe": recipe,
        "train_tiles": len(splits["train"]),
        "test_tiles": len(splits["test"]),
        "epochs": epochs,
        "tile_passes": epochs * len(splits["train"]),
        "best_epoch": best["epoch"],
        "threshold": best.get("threshold"),
        "train_minutes": round(seconds / 60, 2),
        "test_farmland_iou_pooled": metrics["pooled"]["farmland_iou"],
        "test_farmland_iou_per_image": metrics["per_image"]["farmland_iou"],
        "test_boundary_iou_pooled": metrics["pooled"]["boundary_iou"],
        "test_f1_pooled": metrics["pooled"]["f1"],
        "test_predicted_farmland": ratio_predicted(metrics["pooled_confusion"]),
    }


def ratio_predicted(counts: dict) -> float:
    """Share of test pixels predicted farmland (0 = the collapse the reference recipe can fall into)."""
    total = sum(counts.values())
    return (counts["tp"] + counts["fp"]) / total if total else float("nan")


def table(rows: list[dict]) -> str:
    """The comparison as a Markdown table."""
    lines = [
        "| data | recipe | train tiles | epochs | tile passes | test IoU pooled | test IoU per image | "
        "boundary IoU | predicted farmland | best epoch | threshold | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        threshold = "argmax" if r["threshold"] is None else f"{r['threshold']:.3f}"
        lines.append(
            f"| {r['data']} | {r['recipe']} | {r['train_tiles']} | {r['epochs']} | {r['tile_passes']} | "
            f"{fmt(r['test_farmland_iou_pooled'])} | {fmt(r['test_farmland_iou_per_image'])} | "
            f"{fmt(r['test_boundary_iou_pooled'])} | {r['test_predicted_farmland']:.3f} | {r['best_epoch']} | "
            f"{threshold} | {r['train_minutes']:.1f} |"
        )
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    """Three decimals, or n/a for an undefined figure."""
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Split once, run both recipes on the whole data and on its minority subset, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minority_quantile", type=float, default=0.25, help="share of tiles (least farmland) kept")
    parser.add_argument("--minority_epochs", type=int, default=0, help="0: as many tile passes as the whole set")
    parser.add_argument("--skip_minority", action="store_true", help="compare on the whole data set only")
    known, overrides = parser.parse_known_args(argv)
    cfg = cli.parse_args(overrides, __doc__ or "")
    if cfg.recipe != "reference":
        raise ValueError("compare_recipes.py sets --recipe itself; leave it out")
    root = Path(cfg.run_dir)
    overrides = [a for a in overrides if not a.startswith("--epochs=")]
    cli.check_paths(cfg)
    if split_dataset.main([*overrides]) != 0:
        LOG.warning("some pairs were left out of the split; see %s", root / "splits" / "rejected.csv")
    cli.setup_logging(cfg, "compare_recipes")
    splits = {name: read_pair_list(root / "splits" / f"{name}.txt") for name in SPLIT_NAMES}
    datasets = [("all", splits, cfg.epochs)]
    if not known.skip_minority:
        subset, share = minority_splits(splits, known.minority_quantile, cfg.mask_threshold, cfg.ignore_index)
        passes = cfg.epochs * len(splits["train"])
        epochs = known.minority_epochs or max(1, round(passes / max(len(subset["train"]), 1)))
        LOG.info(
            "minority subset: %s tiles, %.1f%% farmland per tile on average",
            {k: len(v) for k, v in subset.items()},
            100 * share,
        )
        datasets.append(("minority", subset, epochs))
    rows = []
    for data_name, data_splits, epochs in datasets:
        for recipe in RECIPES:
            run_dir = root / data_name / recipe
            row = {"data": data_name, **run_recipe(run_dir, data_splits, recipe, epochs, overrides)}
            rows.append(row)
            cli.setup_logging(cfg, "compare_recipes")  # the scripts above set up their own logs
            LOG.info("%s", json.dumps(row))
            files.atomic_write_text(root / "comparison.json", json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
