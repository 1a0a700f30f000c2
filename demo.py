"""The whole pipeline in one command, on synthetic farmland generated on the spot.

    python demo.py

1. make_demo_data.py writes 500 synthetic 64x64 tiles into demo_data/ (images/ and labels/, laid out like
   a user's data set; skipped when already there);
2. split_dataset.py, augment.py, train.py, predict.py and miou.py run in order on it, with the small
   config below given as ordinary ``--key=value`` overrides (the same code path a user runs);
3. a per-pixel colour classifier is fitted on the same training tiles and scored on the same test tiles,
   to show what colour alone achieves on this data;
4. the test IoU of both and the folder of figures are printed.

Any config key can still be overridden, e.g. ``python demo.py --epochs=5 --run_dir=runs/demo2``.
On a 2-core CPU the default demo takes a few minutes.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

import augment
import cli
import files
import miou
import predict
import split_dataset
import train
from data_preprocess import (
    load_mask,
    original_training_pairs,
    read_image,
    read_pair_list,
)
from demo_data import apply_colour_classifier, fit_colour_classifier, generate_dataset
from metrics import confusion_matrix, scores

LOG = logging.getLogger("demo")
N_TILES, TILE_SIZE, DATA_SEED = 500, 64, 0
# A narrow network and a short, brisk schedule: the reference recipe (width 64, lr 1e-4, 100 epochs)
# needs a GPU; these overrides fit a 2-core CPU in minutes.
DEMO_OVERRIDES = [
    "--data_dir=demo_data",
    "--run_dir=runs/demo",
    "--base_width=16",
    "--epochs=20",
    "--batch_size=16",
    "--lr=0.002",
    "--step_size=7",
    "--gamma=0.5",
    "--dropout=0.1",
    "--snapshot_every=0",
    "--num_workers=0",
    "--predict_batch_size=32",
]


def colour_baseline_iou(run_dir: Path, mask_threshold: int = 0) -> float:
    """Fit the per-pixel colour classifier on the original training tiles; pooled farmland IoU on the test split."""
    train_pairs = original_training_pairs(run_dir)
    table = fit_colour_classifier(
        [read_image(i)[:, :, :3] for i, _ in train_pairs], [load_mask(m, mask_threshold) for _, m in train_pairs]
    )
    cm = np.zeros((2, 2), dtype=np.int64)
    for image_path, mask_path in read_pair_list(run_dir / "splits" / "test.txt"):
        cm += confusion_matrix(
            apply_colour_classifier(table, read_image(image_path)[:, :, :3]), load_mask(mask_path, mask_threshold)
        )
    return scores(cm)["farmland_iou"]


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the demo data, run the five scripts on it, and compare with the colour classifier."""
    overrides = DEMO_OVERRIDES + list(sys.argv[1:] if argv is None else argv)
    cfg = cli.parse_args(overrides, __doc__ or "")
    cli.setup_logging(cfg, "demo")
    started = time.perf_counter()
    data_dir, run_dir = Path(cfg.data_dir), Path(cfg.run_dir)
    generate_dataset(data_dir, N_TILES, TILE_SIZE, DATA_SEED)
    LOG.info("demo data: %d tiles of %dx%d in %s", N_TILES, TILE_SIZE, TILE_SIZE, data_dir)
    for stage in (split_dataset.main, augment.main, train.main, predict.main, miou.main):
        LOG.info("---- %s.py %s", stage.__module__, " ".join(overrides))
        code = stage(overrides)
        cli.setup_logging(cfg, "demo")
        if code != 0:
            LOG.error("%s.py failed with status %d; see the messages above", stage.__module__, code)
            return code
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    colour_iou = colour_baseline_iou(run_dir, cfg.mask_threshold)
    minutes = (time.perf_counter() - started) / 60
    summary = {
        "unet_pooled_farmland_iou": metrics["pooled"]["farmland_iou"],
        "unet_per_image_farmland_iou": metrics["per_image"]["farmland_iou"],
        "colour_classifier_pooled_farmland_iou": colour_iou,
        "test_images": metrics["n_images"],
        "minutes": round(minutes, 2),
    }
    files.atomic_write_text(run_dir / "demo_summary.json", json.dumps(summary, indent=2) + "\n")
    print(
        f"\nDemo finished in {minutes:.1f} min on {metrics['n_images']} synthetic test tiles:\n"
        f"  U-Net             pooled farmland IoU {metrics['pooled']['farmland_iou']:.3f} "
        f"(per-image mean {metrics['per_image']['farmland_iou']:.3f})\n"
        f"  colour classifier pooled farmland IoU {colour_iou:.3f} "
        "(per-pixel colour lookup fitted on the same training tiles)\n"
        f"Figures: {run_dir / 'figures'}   Metrics: {run_dir / 'metrics.json'}   Masks: {run_dir / 'predictions'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
