"""Predict farmland masks with a trained U-Net.

Input: the test split (default), or any image file or folder given as ``--predict_input``.
Output: run_dir/predictions/<stem>_seg.png, 0 = background and 255 = farmland, the argmax of the
network's class scores; with ``overlay`` also run_dir/predictions/overlays/<stem>_overlay.png, the mask
drawn over the photo. The network's shape (width, bands, classes) is read from the checkpoint, so only
the checkpoint has to be named. Tiles are read in background workers, batched by size, and run in eval
mode without gradients. Unreadable images are reported and skipped; the exit status is then 1.

Scenes (a georeferenced GeoTIFF, or any image larger than ``window``, given as ``--predict_input``) are
predicted by scene.py in overlapping windows into GeoTIFF masks, probabilities, field polygons and an
area table (run_dir/predictions/farmland_area.csv); see scene.py. The test split is always read as tiles.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import config
from data_preprocess import (
    DataError,
    available_memory,
    image_for_network,
    is_image_file,
    read_image,
    read_pair_list,
    select_bands,
    write_image,
)
from miou import prediction_path
from net_structure import fold_batchnorm
from train import (
    all_reduce_sum,
    close_distributed,
    init_distributed,
    keep_freed_memory,
    load_checkpoint,
    memory_format,
    model_from_checkpoint,
    resolve_amp,
)

LOG = logging.getLogger("predict")
OVERLAY_COLOUR = np.array([255, 220, 0], dtype=np.float32)  # farmland tint: yellow reads on green and brown


def list_inputs(cfg: config.Config) -> list[Path]:
    """The images to predict: ``predict_input`` (a file or a folder), or the test split's images.

    Raises:
        DataError: the input does not exist or holds no images.
    """
    if not cfg.predict_input:
        return [image for image, _ in read_pair_list(Path(cfg.run_dir) / "splits" / "test.txt")]
    source = Path(cfg.predict_input)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DataError(f"--predict_input={source}: no such file or folder")
    images = sorted(p for p in source.iterdir() if p.is_file() and is_image_file(p))
    if not images:
        raise DataError(f"{source}: holds no images (.png .jpg .tif); point --predict_input at a folder of tiles")
    return images


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
            image = select_bands(read_image(path), self.bands, path)
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


def usable_cores() -> int:
    """CPU cores this process may run on (a container's or taskset's limit, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def writer_threads(device: torch.device) -> int:
    """Threads that write outputs: one on a CPU (its cores run the network; one thread overlaps the writing
    with the next batch), several beside a GPU, which leaves the cores free."""
    return 1 if device.type == "cpu" else max(1, min(8, usable_cores() // 2))


def overlay_path(mask_path: Path) -> Path:
    """Where the overlay of a mask goes: predictions/overlays/<stem>_overlay.png."""
    return mask_path.parent / "overlays" / f"{mask_path.stem.removesuffix('_seg')}_overlay.png"


def is_complete(mask_path: Path, checkpoint: Path, overlay: bool) -> bool:
    """Whether an earlier run already wrote this image's outputs with this checkpoint.

    Outputs are written atomically, so an existing file is whole; it counts when it is newer than the
    checkpoint (an older mask came from other weights).
    """
    wanted = [mask_path, overlay_path(mask_path)] if overlay else [mask_path]
    made = Path(checkpoint).stat().st_mtime
    return all(p.is_file() and p.stat().st_mtime >= made for p in wanted)


def overlay_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Blend the farmland tint over a (C, H, W) image, float in [0, 1] or uint8; return uint8 RGB."""
    photo = image[:3].transpose(1, 2, 0) if image.shape[0] >= 3 else np.repeat(image[:1].transpose(1, 2, 0), 3, axis=2)
    rgb = photo.astype(np.float32) if photo.dtype == np.uint8 else photo * 255.0
    farmland = mask.astype(bool)
    rgb[farmland] = 0.55 * rgb[farmland] + 0.45 * OVERLAY_COLOUR
    return np.clip(rgb, 0, 255).astype(np.uint8)


def inference_model(
    state: dict, device: torch.device, channels_last: bool = True, amp: torch.dtype | None = None
) -> torch.nn.Module:
    """The checkpoint's network ready for prediction: BatchNorm folded into the convolutions, Dropout removed,
    weights in the ``amp`` dtype (bf16 or fp16; fp32 when None) and in the chosen memory layout."""
    model = fold_batchnorm(model_from_checkpoint(state, device, channels_last))
    return model.to(dtype=amp or torch.float32, memory_format=memory_format(channels_last)).eval()


@torch.inference_mode()
def network_logits(
    model: torch.nn.Module, images: torch.Tensor, device: torch.device, channels_last: bool = True
) -> torch.Tensor:
    """The network's class scores (N, n_classes, H, W), inputs moved to the device and cast to the weights'
    dtype and memory layout; uint8 inputs are scaled to [0, 1] there (in float32, as image_to_float does)."""
    dtype = next(model.parameters()).dtype
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        # Divided by a tensor on the device: CUDA turns division by a Python number into a multiplication by
        # its reciprocal, which differs from image_to_float's x / 255 in the last bit for half the values.
        images = images.float().div_(torch.full((), 255.0, device=images.device))  # filled there, not copied
    images = images.to(dtype=dtype, memory_format=memory_format(channels_last))
    return model(images)


def predict_probabilities(
    model: torch.nn.Module, images: torch.Tensor, device: torch.device, channels_last: bool = True
) -> torch.Tensor:
    """Class probabilities (N, n_classes, H, W), float32 on the model's device (softmax of the logits).

    The softmax runs in float32 so blended or averaged probabilities (overlapping windows, test-time
    augmentation) do not accumulate bf16 rounding.
    """
    return network_logits(model, images, device, channels_last).float().softmax(1)


def decision_threshold(state: dict) -> float | None:
    """The farmland probability threshold a checkpoint carries (tuned on validation), or None for argmax."""
    value = state.get("threshold")
    return None if value is None else float(value)


def classes_from_probabilities(probabilities: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Class indices (N, H, W) uint8 from probabilities (N, C, H, W).

    With two classes and a threshold t, a pixel is farmland when its farmland probability exceeds t
    (t = 0.5 is the argmax); otherwise the argmax over classes. Without a threshold, logits serve as well
    as probabilities: the softmax keeps their order.
    """
    if threshold is not None and probabilities.shape[1] == 2:
        return (probabilities[:, 1] > threshold).to(torch.uint8)
    if probabilities.shape[1] == 2:
        # The argmax of two classes, ties to class 0 as argmax does, without torch's slow reduction over a
        # two-element axis (seconds per strip of a large scene on a CPU).
        return (probabilities[:, 1] > probabilities[:, 0]).to(torch.uint8)
    return probabilities.argmax(1).to(torch.uint8)


@torch.inference_mode()
def predict_batch(
    model: torch.nn.Module,
    images: torch.Tensor,
    device: torch.device,
    channels_last: bool = True,
    threshold: float | None = None,
) -> np.ndarray:
    """Class indices (N, H, W) uint8 for a batch of images: argmax, or the farmland threshold when given."""
    if threshold is None:  # the argmax straight from the logits: no softmax pass needed
        scores = network_logits(model, images, device, channels_last)
    else:
        scores = predict_probabilities(model, images, device, channels_last)
    return classes_from_probabilities(scores, threshold).cpu().numpy()


@torch.inference_mode()
def choose_batch_size(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device, requested: int) -> int:
    """The ``predict_batch_size`` key: as requested when > 0, else sized to half the device's free memory.

    On CUDA the memory of one tile is measured with a trial batch of two; on a CPU, where larger batches
    gain little (measured: batches of 4 beat 8 and 16), it is estimated from the widest activations, capped at 4.
    """
    if requested > 0:
        return requested
    dtype = next(model.parameters()).dtype
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        model(torch.zeros((2, *shape), device=device, dtype=dtype))
        per_tile = max((torch.cuda.max_memory_allocated(device) - before) // 2, 1)
        free = torch.cuda.mem_get_info(device)[0]
        # Beyond about a hundred 256-pixel tiles a pass is long enough that per-batch costs vanish; larger
        # batches would only hold more memory in flight (loader workers' shared memory, pinned copies, writes).
        return int(max(1, min(128, free // 2 // per_tile)))
    width = model.outc.in_channels
    # The full-size level holds about 6 activations of `width` channels at once (convolutions, skip, concat).
    per_tile = 6 * width * shape[-2] * shape[-1] * torch.finfo(dtype).bits // 8
    free = available_memory() or 4 * 2**30
    return int(max(1, min(4, free // 2 // per_tile)))


def predict_tiles(
    model: torch.nn.Module,
    paths: Sequence[Path],
    outputs: Sequence[Path],
    cfg: config.Config,
    state: dict,
    checkpoint: Path,
    device: torch.device,
    amp: torch.dtype | None,
    bands: Sequence[int] = (),
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Predict tiles in batches of equal size; write each mask (and overlay). Return (written, failed).

    ``progress``, when given, is called after each batch with the number of images handled so far (their
    outputs may still be being written).
    """
    if not paths:
        return 0, 0
    threshold = decision_threshold(state)
    files = ImageFiles(paths, state["config"]["in_channels"], bands)
    _, first = files[0]  # read here for its shape, which sizes the batches (and again by a worker)
    batch_size = cfg.predict_batch_size or 4  # used as is when the first image is unreadable
    if not isinstance(first, str):
        batch_size = choose_batch_size(model, tuple(first.shape), device, cfg.predict_batch_size)
    loader = DataLoader(
        ImageBatches(files, batch_size),
        batch_size=None,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )
    LOG.info(
        "predicting %d image(s) with %s (epoch %s) on %s, %s, batches of up to %d",
        len(paths),
        checkpoint,
        state.get("epoch"),
        device,
        str(amp or torch.float32).removeprefix("torch."),
        batch_size,
    )

    def write_outputs(index: int, image: np.ndarray | None, mask: np.ndarray) -> None:
        write_image(outputs[index], mask * np.uint8(255))
        if image is not None:
            write_image(overlay_path(outputs[index]), overlay_image(image, mask))

    failures, done = 0, 0
    with tqdm(total=len(paths), desc="predicting", unit="image", disable=None) as bar:
        # Room for two batches of jobs, so the device goes on with the next batch while one is written.
        with BackgroundWriter(writer_threads(device), pending=2 * batch_size) as writer:
            for groups in loader:
                for indices, images, error in groups:
                    if error is not None:
                        LOG.error("%s", error)
                        failures += 1
                    else:
                        masks = predict_batch(model, images, device, cfg.channels_last, threshold)
                        photos = images.numpy() if cfg.overlay else [None] * len(indices)
                        for index, photo, mask in zip(indices, photos, masks):
                            writer.submit(write_outputs, index, photo, mask)
                        done += len(indices)
                    bar.update(len(indices))
                    if progress is not None:
                        progress(done + failures)
    return done, failures


def main(argv: Sequence[str] | None = None) -> int:
    """Predict every input image and write its mask (and overlay) under run_dir/predictions."""
    try:
        return predict_all(argv)
    finally:
        close_distributed()


def predict_all(argv: Sequence[str] | None = None) -> int:
    """The body of main: parse the config, join torchrun's job if any, predict this rank's share."""
    import scene  # scene.py builds on this module's functions, so it is imported here rather than at the top

    cfg = config.parse_args(argv, __doc__ or "")
    config.check_paths(cfg)
    job = init_distributed(cfg.device)
    config.setup_logging(cfg, "predict", job.rank)
    run_dir = Path(cfg.run_dir)
    device = job.device
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else run_dir / "checkpoints" / "best.pth"
    state = load_checkpoint(checkpoint, device)
    if not cfg.bands:
        # The bands the network was trained on, unless the user names others for these images.
        cfg.bands = str(state["config"].get("bands", ""))
    if job.main:
        config.save_config(cfg, "predict")  # as resolved, bands included
    amp = resolve_amp(cfg.amp, device)
    if cfg.reuse_memory:
        keep_freed_memory()
    model = inference_model(state, device, cfg.channels_last, amp)
    paths = list_inputs(cfg)
    predictions = (run_dir / "predictions").resolve()
    if any(p.resolve().parent == predictions or predictions in p.resolve().parents for p in paths):
        raise DataError(
            f"--predict_input={cfg.predict_input}: lies in the output folder {predictions}; predict another folder"
        )
    settings = scene.SceneSettings.from_config(cfg)
    # Scenes only when the user names the input: the test split holds tiles that miou.py scores as PNGs.
    scene_route = [bool(cfg.predict_input) and scene.is_scene(p, settings.window) for p in paths]
    all_paths, all_routes = list(paths), list(scene_route)
    outputs = [prediction_path(run_dir, p) for p in paths]
    seen: dict[Path, Path] = {}
    for path, out in zip(paths, outputs):
        if out in seen:
            raise DataError(f"{path} and {seen[out]} would both be written to {out}; give them distinct names")
        seen[out] = path
    if job.world > 1:
        # Under torchrun each rank takes every world-th image: no mask is written twice, none is missed.
        # Shard before skipping finished masks: the other ranks are writing theirs meanwhile.
        paths, outputs = paths[job.rank :: job.world], outputs[job.rank :: job.world]
        scene_route = scene_route[job.rank :: job.world]
        LOG.info("distributed prediction: %d ranks, %d image(s) on rank 0", job.world, len(paths))
    done_before = [
        i
        for i, out in enumerate(outputs)
        if not scene_route[i] and cfg.skip_existing and is_complete(out, checkpoint, cfg.overlay)
    ]
    if done_before:
        LOG.info(
            "%d of %d image(s) already have masks from this checkpoint and are skipped (--skip_existing=false redoes them)",
            len(done_before),
            len(paths),
        )
        skip = set(done_before)
        paths = [p for i, p in enumerate(paths) if i not in skip]
        outputs = [o for i, o in enumerate(outputs) if i not in skip]
        scene_route = [r for i, r in enumerate(scene_route) if i not in skip]
    scene_at = {i for i, is_scene in enumerate(scene_route) if is_scene}
    tiles = [i for i, p in enumerate(paths) if i not in scene_at]
    tile_paths, tile_outputs = [paths[i] for i in tiles], [outputs[i] for i in tiles]
    done, failures = predict_tiles(model, tile_paths, tile_outputs, cfg, state, checkpoint, device, amp, settings.bands)
    if scene_at:
        scene_done, scene_failures = scene.predict_scenes(
            model, [paths[i] for i in sorted(scene_at)], run_dir, state, device, settings, checkpoint, cfg.skip_existing
        )
        done, failures = done + scene_done, failures + scene_failures
    if job.world > 1:
        done, failures = (int(v) for v in all_reduce_sum(torch.tensor([done, failures], device=device)))
    if job.main and any(all_routes):
        # After the reduction above every rank has finished, so every scene's area file is in place.
        scene.write_run_table([p for p, is_scene in zip(all_paths, all_routes) if is_scene], run_dir)
    LOG.info("wrote %d mask(s) to %s", done, run_dir / "predictions")
    if failures:
        LOG.error("%d image(s) could not be predicted; see the messages above", failures)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(config.run_main(main))
