"""Shared fixtures: tiny seeded data sets written the way users lay theirs out, and a tiny trained run for the
tests that only need one to exist."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

# One intra-op thread in every process of the test run, subprocesses included (torchrun's ranks, the trainer
# killed with -9, bench.py's measurements). On two cores shared with other jobs, two OpenMP threads per
# process wait on each other: a width-4 training step took 0.2-0.45 s instead of 0.02 s. Set before torch is
# imported; a value already in the environment is kept, and every process uses the same one, so weights
# compared across processes (kill -9 and resume) come from the same arithmetic.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import rasterio
import torch
from rasterio.rpc import RPC
from rasterio.transform import Affine

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import split_dataset
import train
from data_preprocess import write_image

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a plugin imported torch first

TINY = ["--base_width=4", "--batch_size=4", "--num_workers=0", "--lr=0.01", "--step_size=2", "--snapshot_every=2"]


def args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """The tiny settings every pipeline test starts from, for this data and run folder."""
    return [f"--data_dir={data_dir}", f"--run_dir={run_dir}", *TINY, *extra]


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The model weights saved in a checkpoint."""
    return torch.load(path, weights_only=True)["model"]


def write_pair(data_dir: Path, stem: str, image: np.ndarray, mask: np.ndarray, ext: str = ".png") -> tuple[Path, Path]:
    """Write images/<stem><ext> and labels/<stem>_mask.png under data_dir."""
    image_path = data_dir / "images" / f"{stem}{ext}"
    mask_path = data_dir / "labels" / f"{stem}_mask.png"
    write_image(image_path, image)
    write_image(mask_path, mask)
    return image_path, mask_path


def write_geotiff(path: Path, bands: np.ndarray, crs: str | None, transform: Affine, **extra) -> Path:
    """Write (bands, H, W) as a GeoTIFF in ``crs`` with ``transform`` (and any other profile keys), making its
    folder; the test modules bind their own scene's CRS and transform."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "width": bands.shape[2], "height": bands.shape[1], "count": bands.shape[0]}
    with rasterio.open(path, "w", dtype=bands.dtype, crs=crs, transform=transform, **profile, **extra) as dst:
        dst.write(bands)
    return path


def declare_size(path: Path, width: int, height: int) -> None:
    """Rewrite a little-endian TIFF's width, height and rows-per-strip tags in place (as LONGs), leaving its
    pixels."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"II*\x00"
    ifd = int.from_bytes(data[4:8], "little")
    for entry in range(ifd + 2, ifd + 2 + 12 * int.from_bytes(data[ifd : ifd + 2], "little"), 12):
        value = {256: width, 257: height, 278: height}.get(int.from_bytes(data[entry : entry + 2], "little"))
        if value is not None:  # type LONG (4), one value, held in the entry itself
            data[entry + 2 : entry + 12] = (
                (4).to_bytes(2, "little") + (1).to_bytes(4, "little") + value.to_bytes(4, "little")
            )
    path.write_bytes(bytes(data))


def square_tile(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A noisy tile with one bright square of 'farmland'; mask 0/255."""
    image = (rng.random((size, size, 3)) * 60).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    y, x = rng.integers(0, size // 2, 2)
    mask[y : y + size // 2, x : x + size // 2] = 255
    image[mask > 0] += 150
    return image, mask


def write_square_data(data_dir: Path) -> Path:
    """20 tiles of 32x32 with square masks (seed 0) under data_dir."""
    rng = np.random.default_rng(0)
    for i in range(20):
        write_pair(data_dir, f"tile {i:02d}", *square_tile(rng))
    return data_dir


def folder_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under a folder, by relative path: proves a folder was left untouched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def close_log_files() -> None:
    """Detach the log handlers the last script's main set up, so that later tests log nowhere near its run."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "farmland_pipeline", False)]:
        root.removeHandler(handler)
        handler.close()


@pytest.fixture
def square_data(tmp_path: Path) -> Path:
    """20 tiles of 32x32 with square masks, in a folder whose name has a space and Chinese characters."""
    return write_square_data(tmp_path / "农田 data")


@pytest.fixture(scope="session")
def shared_square_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiles of square_data written once for the whole run, for tests that only read them (a test that
    moves, changes or adds files takes square_data); checked untouched at the end."""
    data_dir = write_square_data(tmp_path_factory.mktemp("shared") / "农田 data")
    before = folder_digest(data_dir)
    yield data_dir
    assert folder_digest(data_dir) == before, "a test wrote into shared_square_data; give it square_data instead"


@pytest.fixture(scope="session")
def trained_run(shared_square_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A run folder split and trained once for the whole run (width 4, one epoch on shared_square_data), for
    tests that need a trained network to exist. Read-only: a test that writes into a run takes run_copy.
    Checked untouched at the end."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert split_dataset.main(args(shared_square_data, run_dir)) == 0
    assert train.main(args(shared_square_data, run_dir, "--epochs=1")) == 0
    close_log_files()
    before = folder_digest(run_dir)
    yield run_dir
    assert folder_digest(run_dir) == before, "a test wrote into trained_run; give it run_copy instead"


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of trained_run of the test's own to write into (file times kept: checkpoints stay older than
    anything the test writes)."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def spread_probabilities_(model: torch.nn.Module, logits: torch.Tensor) -> None:
    """Rescale a random network's output layer in place so that, on the images that gave ``logits``, its
    farmland margin has its median at 0 and its quartiles at -2 and +2: probabilities spread over (0, 1)
    and split the images into farmland and background, instead of all sitting near 0.5."""
    margin = (logits[:, 1] - logits[:, 0]).flatten()
    low, mid, high = margin.quantile(torch.tensor([0.25, 0.5, 0.75])).tolist()
    scale = 4 / (high - low)
    model.outc.weight.mul_(scale)
    model.outc.bias.mul_(scale)
    model.outc.bias[1] -= mid * scale


def write_rpc_tiff(path: Path, bands: np.ndarray) -> Path:
    """Write (bands, H, W) as a TIFF placed only by RPCs, without CRS or geotransform: a Level-1 product (L1A)."""
    height, width = bands.shape[1:]
    rpcs = RPC(
        height_off=0, height_scale=500, lat_off=40.0, lat_scale=0.01, long_off=116.4, long_scale=0.01,
        line_off=height / 2, line_scale=height / 2, samp_off=width / 2, samp_scale=width / 2,
        line_num_coeff=[0, 0, -1] + [0] * 17, line_den_coeff=[1] + [0] * 19,
        samp_num_coeff=[0, 1] + [0] * 18, samp_den_coeff=[1] + [0] * 19,
    )  # fmt: skip
    return write_geotiff(path, bands, None, Affine.identity(), rpcs=rpcs)
