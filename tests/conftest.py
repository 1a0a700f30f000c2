"""Shared fixtures: tiny seeded data sets written the way users lay theirs out."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data_preprocess import write_image  # noqa: E402


def write_pair(data_dir: Path, stem: str, image: np.ndarray, mask: np.ndarray, ext: str = ".png") -> tuple[Path, Path]:
    """Write images/<stem><ext> and labels/<stem>_mask.png under data_dir."""
    image_path = data_dir / "images" / f"{stem}{ext}"
    mask_path = data_dir / "labels" / f"{stem}_mask.png"
    write_image(image_path, image)
    write_image(mask_path, mask)
    return image_path, mask_path


def square_tile(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A noisy tile with one bright square of 'farmland'; mask 0/255."""
    image = (rng.random((size, size, 3)) * 60).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    y, x = rng.integers(0, size // 2, 2)
    mask[y : y + size // 2, x : x + size // 2] = 255
    image[mask > 0] += 150
    return image, mask


@pytest.fixture
def square_data(tmp_path: Path) -> Path:
    """20 tiles of 32x32 with square masks, in a folder whose name has a space and Chinese characters."""
    data_dir = tmp_path / "农田 data"
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
