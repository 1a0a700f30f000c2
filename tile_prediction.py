"""The tile loop of predict.py: images read in batches by loader workers, masks (and overlays) written by
background threads while the device goes on, unreadable images reported and skipped.
"""

from __future__ import annotations

import collections
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cli import Progress
from config import Config
from data_preprocess import (
    check_tile_values,
    exif_turned,
    image_for_network,
    read_image,
    select_bands,
    trained_bands,
    write_image,
)
from fast_path import prediction_choice
from figures import stretched
from files import DataError, file_digest, file_stamp, shown_path, written_after
from inference import (
    VALUE_SCALE_LIMIT,
    choose_batch_size,
    decision_threshold,
    on_value_scale,
    overlay_image,
    predict_batch,
    training_means,
)
from net_structure import downscale_of
from png_text import read_texts
from polygons import sieve_block
from runtime import usable_cores

LOG = logging.getLogger("predict")


class ImageFiles(Dataset):
    """Reads one image per item as (index, tensor C x H x W: uint8 for 8-bit images, else float in [0, 1]),
    or (index, error message)."""

    def __init__(self, paths: Sequence[Path], in_channels: int, bands: Sequence[int] = ()) -> None:
        self.paths = list(paths)
        self.in_channels = in_channels
        self.bands = tuple(bands)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | str]:
        path = self.paths[index]
        try:
            image = select_bands(read_image(path, nodata_as_zero=True), self.bands, path, self.in_channels)
            image = trained_bands(image, self.in_channels, path)
            check_tile_values(image, path)  # NaN would spread through the network to an all-background mask
            return index, torch.from_numpy(image_for_network(image, self.in_channels, path))
        except DataError as err:
            return index, str(err)  # reported by the main process; one bad file does not stop the rest


def batches_by_size(
    items: Iterator[tuple[int, torch.Tensor | str]], batch_size: int
) -> Iterator[tuple[list[int], torch.Tensor | None, str | None]]:
    """Group consecutive images of the same size and type into batches; pass errors through one by one."""
    indices: list[int] = []
    tensors: list[torch.Tensor] = []
    for index, item in items:
        if isinstance(item, str):
            yield [index], None, item
            continue
        if tensors and (item.shape != tensors[0].shape or item.dtype != tensors[0].dtype or len(tensors) == batch_size):
            yield indices, torch.stack(tensors), None
            indices, tensors = [], []
        indices.append(index)
        tensors.append(item)
    if tensors:
        yield indices, torch.stack(tensors), None


class ImageBatches(Dataset):
    """Reads the images of one batch per item, in a loader worker: each run of equal-sized images comes back
    stacked as one tensor, so a worker hands over one tensor per batch rather than one per image (at
    thousands of tiles a second the hand-over per tensor costs more than the decoding). Items are lists of
    (indices, images, error) as batches_by_size yields them."""

    def __init__(self, files: ImageFiles, batch_size: int) -> None:
        self.files = files
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.files) // self.batch_size)

    def __getitem__(self, item: int) -> list[tuple[list[int], torch.Tensor | None, str | None]]:
        start = item * self.batch_size
        indices = range(start, min(start + self.batch_size, len(self.files)))
        return list(batches_by_size((self.files[i] for i in indices), self.batch_size))


class BackgroundWriter:
    """Runs output-writing jobs on background threads, so that the device is not idle while masks are
    encoded (PNG encoding and file writes release the GIL). At most ``pending`` jobs wait at a time, so
    memory stays bounded; the first job that fails raises its error on the next submit or at the close.
    With ``threads=0`` jobs run at once in the caller's thread."""

    def __init__(self, threads: int, pending: int = 64) -> None:
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="writer") if threads > 0 else None
        self.pending = pending
        self.futures: collections.deque[Future] = collections.deque()

    def submit(self, job: Callable[..., None], *args: Any) -> None:
        if self.executor is None:
            job(*args)
            return
        self.futures.append(self.executor.submit(job, *args))
        while len(self.futures) > self.pending or (self.futures and self.futures[0].done()):
            self.futures.popleft().result()

    def close(self) -> None:
        """Wait for every job; raise the first failure."""
        try:
            while self.futures:
                self.futures.popleft().result()
        finally:
            if self.executor is not None:
                self.executor.shutdown(wait=True, cancel_futures=True)

    def abandon(self) -> None:
        """Drop the jobs not started, wait for the running ones, raise nothing: the caller is already failing,
        and its error is the one to see."""
        self.futures.clear()
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


def writer_threads(device: torch.device) -> int:
    """Threads that write outputs: one on a CPU (its cores run the network; one thread overlaps the writing
    with the next batch), several beside a GPU, which leaves the cores free."""
    return 1 if device.type == "cpu" else max(1, min(8, usable_cores() // 2))


def overlay_path(mask_path: Path) -> Path:
    """Where the overlay of a mask goes: predictions/overlays/<stem>_overlay.png."""
    return mask_path.parent / "overlays" / f"{mask_path.stem.removesuffix('_seg')}_overlay.png"


def sieve_pixels(cells: int, config: dict) -> int:
    """The tile pixels under which a farmland piece or hole of a tile's mask is sieved away: ``cells`` pixels of
    the network's working grid (``sieve_cells``), each downscale x downscale tile pixels (net_structure.downscale_of
    of the checkpoint's ``config``). The network decides no finer than its grid, so such pieces are speckle.

    Raises:
        ValueError: a negative ``cells``.
    """
    if cells < 0:
        raise ValueError(f"--sieve_cells={cells}: expected a number of working pixels, or 0 to keep every piece")
    return cells * downscale_of(config) ** 2


SIEVE_SHARE = 16  # a piece of more than this share of a tile (1/16) is never speck, however small the tile


def sieve_tile(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """A copy of a tile's mask (H x W, 0/1) with its farmland pieces, then its holes, under ``min_pixels``
    (sieve_pixels) joined to their surroundings; pieces at the tile's edge too, and never one of more than
    1/SIEVE_SHARE of the tile, so that a small tile of one class, or of two large pieces, stays as it is."""
    return sieve_block(mask, min(min_pixels, mask.size // SIEVE_SHARE), False, False)


SOURCE_KEY = "farmland-source"  # the PNG text of a tile's mask and overlay naming the image
STAMP_KEY = "farmland-source-stamp"  # and the image file's size and modification time then
DIGEST_KEY = "farmland-source-sha256"  # and the SHA-256 of its bytes then


def source_texts(image: Path) -> dict[str, str]:
    """What a tile's outputs record of the image file they are made from: its full path, its size and
    modification time (a file copied in with its old time, cp -p or rsync -a, differs from the one before) and
    the SHA-256 of its bytes (a file edited in place to the same size, its old time set back with touch -r).

    Raises:
        OSError: the image cannot be found or read.
    """
    return {SOURCE_KEY: shown_path(image.resolve()), STAMP_KEY: file_stamp(image), DIGEST_KEY: file_digest(image)}


MADE_WITH_KEY = "farmland-made-with"  # the PNG text of a tile's mask and overlay naming its model and settings
# The keys of MADE_WITH_KEY that a tile's mask depends on, which miou.py compares across the test masks: the
# model file's size and time, the --threshold given (-1: the model's own), the bands read, sieve_cells, tta.
MADE_WITH_COMPARED = ("model_stamp", "threshold", "bands", "sieve_cells", "tta")


# The key under which predict.py keeps, in the state it loaded, the model file's stamp (files.file_stamp) as it was
# read: train.py may replace best.pth while predict.py runs, and the outputs must name the weights that made them.
LOADED_STAMP = "loaded_file_stamp"


def made_with(cfg: Config, state: dict, model: Path) -> dict[str, Any]:
    """What a tile's outputs record of how they were made (MADE_WITH_KEY), so that miou.py can tell masks of
    another model or other settings from the rest: the ``model`` file (a checkpoint or an ONNX model), the keys of
    MADE_WITH_COMPARED as ``cfg`` holds them (``bands`` as resolved), and ``cut``, the farmland probability cut
    applied (None: the argmax). The model's stamp is the one it had when it was loaded (LOADED_STAMP), where
    the state holds it. Empty where the model file cannot be found (bench.py's stand-ins): then
    nothing says which weights these are."""
    try:
        stamp = state.get(LOADED_STAMP) or file_stamp(model)
    except OSError:
        return {}
    keys = {key: getattr(cfg, key) for key in MADE_WITH_COMPARED if key != "model_stamp"}
    return {"model": shown_path(Path(model).resolve()), "model_stamp": stamp, **keys, "cut": decision_threshold(state)}


def made_with_of(texts: dict[str, str]) -> dict[str, Any] | None:
    """The MADE_WITH_KEY record among a mask's PNG ``texts`` (png_text.read_texts): None where it holds none
    (a mask of an older version, or made otherwise), empty where it cannot be read (it then matches nothing)."""
    if MADE_WITH_KEY not in texts:
        return None
    try:
        made = json.loads(texts[MADE_WITH_KEY])
    except ValueError:
        return {}
    return made if isinstance(made, dict) else {}


def is_complete(mask_path: Path, image: Path, checkpoint: Path, overlay: bool, since: float = 0.0) -> bool:
    """Whether an earlier run already wrote this image's outputs with this checkpoint and settings: newer than
    the checkpoint and than ``since`` (output_record.Since), and each made from this very image file as it is
    now (another folder's tiles of the same names write the same outputs; an image may be exported again)."""
    outputs = [mask_path, overlay_path(mask_path)] if overlay else [mask_path]
    if not written_after(outputs, checkpoint, since):
        return False
    try:
        source = source_texts(image)
    except OSError:
        return False
    return all(source.items() <= read_texts(p).items() for p in outputs)


def _write_tile_outputs(
    mask_path: Path,
    source: Path,
    image: np.ndarray | None,
    mask: np.ndarray,
    min_pixels: int,
    shown: Sequence[int],
    made: dict[str, str] | None = None,
) -> None:
    """Write one tile's sieved mask and, given the ``image``, its overlay; each names its ``source`` image file
    (is_complete) and holds the texts ``made`` (MADE_WITH_KEY: the model and settings)."""
    mask = sieve_tile(mask, min_pixels)
    text = dict(made or {})
    try:
        text |= source_texts(source)
    except OSError:
        pass  # the image went after it was read: these outputs name no source, and are made again
    write_image(mask_path, mask * np.uint8(255), text)
    if image is not None:
        photo = image if image.dtype == np.uint8 else stretched(image, 0, image.any(axis=0))  # 16-bit: not black
        write_image(overlay_path(mask_path), overlay_image(photo, mask, shown), text)


FIRST_TRIES = 8  # images read to find one that sizes the batches and times the precisions


def first_readable(files: ImageFiles) -> torch.Tensor | None:
    """The first of the first FIRST_TRIES images that reads, or None: an unreadable first file (reported with
    the others later) must not leave the batches unsized and the precision untimed."""
    for index in range(min(FIRST_TRIES, len(files))):
        _, image = files[index]
        if not isinstance(image, str):
            return image
    return None


# A single tile of a run whose tiles are on the training scale is warned of only this far off: a tile of water,
# shadow or cloud sits 4 to 10 times below or above the training means; another bit depth (8-bit against 12-bit
# data in 16 bits) 16 times or more.
TILE_SCALE_LIMIT = 16.0
SCALE_SAMPLE_STEP = 4  # rows and columns apart of the pixels whose band means are compared: ample for 4 times


def tile_scale_ratios(model: torch.nn.Module, state: dict, images: torch.Tensor) -> list[tuple[int, float]]:
    """(position in the batch, ratio) of each tile with data: the median over bands of its band means over its pixels
    with data, scaled as in training (8-bit / 255, 16-bit / 65535), over the training tiles' (inference.training_means);
    none where the model keeps no training means for these bands. Every SCALE_SAMPLE_STEP-th row and column of the
    whole batch at once: every pixel of each tile in turn held up the device (a fourth of a second for 128 256-px
    tiles on 2 cores)."""
    trained = training_means(model, state)
    if trained is None or len(trained) != images.shape[1]:
        return []
    sample = images[:, :, ::SCALE_SAMPLE_STEP, ::SCALE_SAMPLE_STEP]
    sums = sample.sum(dim=(2, 3), dtype=torch.float64)  # nodata pixels (all bands zero) add nothing
    counts = sample.any(dim=1).sum(dim=(1, 2))
    means = (sums / counts.clamp(min=1).unsqueeze(1)).numpy() / (255.0 if images.dtype == torch.uint8 else 1.0)
    return [(i, float(np.median(means[i] / trained))) for i in torch.nonzero(counts).flatten().tolist()]


def off_scale_tiles(ratios: Sequence[float]) -> list[int]:
    """Positions in ``ratios`` (each tile's, tile_scale_ratios) of the tiles on another value scale than the
    training tiles'. Judged as a scene is, on the run's tiles together (their median) against VALUE_SCALE_LIMIT,
    since one tile of water or shadow is as dark as another product; in a run on the training scale, a tile is
    named only beyond TILE_SCALE_LIMIT (a tile of another bit depth among the others)."""
    if not ratios:
        return []
    typical = float(np.median(ratios))
    limit = TILE_SCALE_LIMIT if on_value_scale(typical) else VALUE_SCALE_LIMIT
    return [i for i, ratio in enumerate(ratios) if not 1 / limit <= ratio <= limit]


def warn_off_scale(off_scale: list[tuple[Path, float]], count: int, model: torch.nn.Module, state: dict) -> None:
    """Warn once for the tiles of a run on another value scale than the training tiles', naming a few."""
    trained = training_means(model, state)
    if not off_scale or trained is None:
        return
    named = "; ".join(f"{path} ({ratio:.3g} times)" for path, ratio in off_scale[:3])
    LOG.warning(
        "%d of %d tile(s) average several times above or below the training tiles' band means (%s, scaled to "
        "[0, 1] as 8-bit / 255, 16-bit / 65535), e.g. %s: the network sees values it never saw and their masks are "
        "not to be trusted. Predict the product the model was trained on (the same bit depth and processing: 16-bit "
        "DN, not an 8-bit stretch or reflectance), or train on tiles of this product",
        len(off_scale),
        count,
        ", ".join(f"{v:.3g}" for v in trained.tolist()),
        named,
    )


def _prediction_setup(
    model: torch.nn.Module,
    files: ImageFiles,
    cfg: Config,
    state: dict,
    device: torch.device,
    amp: torch.dtype | None,
) -> tuple[torch.nn.Module, torch.dtype | None, bool, int]:
    """The model, precision, layout and batch size to predict with: (model, amp, channels_last, batch_size)."""
    first = first_readable(files)  # read here for its shape, which sizes the batches (and again by a worker)
    batch_size = cfg.predict_batch_size or 4  # used as is when no image in reach is readable
    channels_last = cfg.channels_last
    if first is not None:
        # amp=auto on a CPU: the faster precision and layout, timed on this network and tile size (fast_path.py).
        model, choice = prediction_choice(model, state, cfg.amp, cfg.channels_last, device, tuple(first.shape))
        if choice.measured:
            amp, channels_last = choice.candidate.amp, choice.candidate.channels_last
        batch_size = choose_batch_size(model, tuple(first.shape), device, cfg.predict_batch_size)
    return model, amp, channels_last, batch_size


def _batch_loader(files: ImageFiles, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """A loader that reads one batch of images per item, in ``workers`` worker processes (0: in this one)."""
    return DataLoader(
        ImageBatches(files, batch_size),
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )


def _log_plan(
    count: int,
    checkpoint: Path,
    state: dict,
    device: torch.device,
    amp: torch.dtype | None,
    batch_size: int,
    cfg: Config,
    min_pixels: int,
) -> None:
    """Log what is predicted, with which checkpoint, and how."""
    LOG.info(
        "predicting %d image(s) with %s (epoch %s) on %s, %s, batches of up to %d%s%s",
        count,
        checkpoint,
        state.get("epoch"),
        device,
        str(amp or torch.float32).removeprefix("torch."),
        batch_size,
        ", averaged over 8 flips and turns (--tta)" if cfg.tta else "",
        f", pieces and holes under {min_pixels} pixels sieved (--sieve_cells={cfg.sieve_cells})" if min_pixels else "",
    )


def warn_exif_turned(paths: Sequence[Path], outputs: Sequence[Path]) -> None:
    """Warn of JPEG tiles a viewer shows turned or mirrored (EXIF orientation): they are predicted as stored, as
    GDAL and QGIS read them, so their masks and overlays do not line up with the photo an image viewer shows."""
    turned = [(path, output) for path, output in zip(paths, outputs) if exif_turned(path)]
    if turned:
        LOG.warning(
            "%d JPEG tile(s) (%s%s) carry an EXIF orientation: image viewers show them turned or mirrored, but they "
            "are predicted as stored, as GDAL and QGIS read them, so their masks (%s%s) do not line up with the "
            "photo a viewer shows; to have both turned, save the tiles with the turn applied to their pixels "
            "(exiftran -ai, or PIL's ImageOps.exif_transpose) and predict them again",
            len(turned),
            ", ".join(str(path) for path, _ in turned[:3]),
            ", ..." if len(turned) > 3 else "",
            ", ".join(output.name for _, output in turned[:3]),
            ", ..." if len(turned) > 3 else "",
        )


def predict_tiles(
    model: torch.nn.Module,
    paths: Sequence[Path],
    outputs: Sequence[Path],
    cfg: Config,
    state: dict,
    checkpoint: Path,
    device: torch.device,
    amp: torch.dtype | None,
    bands: Sequence[int] = (),
    progress: Callable[[int], None] | None = None,
    shown: Sequence[int] = (),
) -> tuple[int, int]:
    """Predict tiles in batches of equal size; write each mask, sieved (``sieve_cells``: sieve_pixels), and its
    overlay (of the ``bands`` read, those at ``shown``: SceneSettings.shown). Return (written, failed).

    ``progress``, when given, is called after each batch with the number of images handled so far (their
    outputs may still be being written).
    """
    min_pixels = sieve_pixels(cfg.sieve_cells, state["config"])
    if not paths:
        return 0, 0
    warn_exif_turned(paths, outputs)
    threshold = decision_threshold(state)
    made = made_with(cfg, state, checkpoint)
    made_text = {MADE_WITH_KEY: json.dumps(made, ensure_ascii=False)} if made else {}
    files = ImageFiles(paths, state["config"]["in_channels"], bands)
    trained_model = model  # the model as loaded, which keeps the training tiles' band means
    scale_tiles: list[int] = []  # indices in paths of the tiles of scale_ratios
    scale_ratios: list[float] = []
    model, amp, channels_last, batch_size = _prediction_setup(model, files, cfg, state, device, amp)
    loader = _batch_loader(files, batch_size, cfg.num_workers, device)
    _log_plan(len(paths), checkpoint, state, device, amp, batch_size, cfg, min_pixels)
    failures, done = 0, 0
    with Progress(len(paths), "predicting", "image", LOG) as bar:
        # Room for two batches of jobs, so the device goes on with the next batch while one is written.
        with BackgroundWriter(writer_threads(device), pending=2 * batch_size) as writer:
            for groups in loader:
                for indices, images, error in groups:
                    if error is not None:
                        LOG.error("%s", error)
                        failures += 1
                    else:
                        for position, ratio in tile_scale_ratios(trained_model, state, images):
                            scale_tiles.append(indices[position])
                            scale_ratios.append(ratio)
                        masks = predict_batch(model, images, device, channels_last, threshold, cfg.tta)
                        photos = images.numpy() if cfg.overlay else [None] * len(indices)
                        for index, photo, mask in zip(indices, photos, masks):
                            writer.submit(
                                _write_tile_outputs,
                                outputs[index],
                                paths[index],
                                photo,
                                mask,
                                min_pixels,
                                shown,
                                made_text,
                            )
                        done += len(indices)
                    bar.update(len(indices))
                    if progress is not None:
                        progress(done + failures)
    off_scale = [(paths[scale_tiles[i]], scale_ratios[i]) for i in off_scale_tiles(scale_ratios)]
    warn_off_scale(off_scale, done, trained_model, state)
    return done, failures
