"""Predict farmland masks with a trained U-Net.

Input: the test split (default), or any image file or folder given as ``--predict_input``.
Output: run_dir/predictions/<stem>_seg.png, 0 = background and 255 = farmland: farmland where the
farmland probability exceeds ``--threshold`` when given, else the threshold tuned on validation and stored in
the checkpoint (``tune_threshold``), else the argmax of the network's class scores; farmland pieces and holes
under ``sieve_cells`` pixels of the network's working grid are then joined to their surroundings. With
``overlay`` also run_dir/predictions/overlays/<stem>_overlay.png, the mask drawn over the photo. The network's
shape (width, bands, classes) is read from the checkpoint, so only the checkpoint has to be named. Tiles are read in
background workers, batched by size, and run in eval mode without gradients. Unreadable images are
reported and skipped; the exit status is then 1.

Scenes (a georeferenced GeoTIFF, or any image larger than ``window``, given as ``--predict_input``) are
predicted by scene.py in overlapping windows into GeoTIFF masks, probabilities, field polygons and an
area table (run_dir/predictions/farmland_area.csv); see scene.py. The test split is always read as tiles.

``--backend=onnx`` predicts with the model export_onnx.py wrote (``onnx_model``, by default
run_dir/export/farmland.onnx) in onnxruntime on the CPU instead of the checkpoint in PyTorch: the same
tiles, scenes and outputs, with the bands, class count and threshold read from the model's metadata.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Collection, Sequence

import torch

import cli
import scene
from config import Config
from data_preprocess import (
    image_entries,
    parse_bands,
    read_test_split,
    rgb_bands_for,
)
from exported_model import OnnxSegmenter, load_segmenter, stale_export
from files import DataError, file_stamp, name_problem, prediction_path, read_record, remembered_digests, shown_path
from inference import checkpoint_file, inference_model, other_band_count, warn_network_keys, with_threshold
from net_structure import input_padding
from output_record import Since, outputs_since
from runtime import (
    Distributed,
    all_reduce_sum,
    apply_reuse_memory,
    init_distributed,
    leaving_distributed,
    load_checkpoint,
    resolve_amp,
)
from tile_prediction import LOADED_STAMP, is_complete, predict_tiles, sieve_pixels

LOG = logging.getLogger("predict")


def list_inputs(cfg: Config, given: Collection[str] = ()) -> list[Path]:
    """The images to predict: ``predict_input`` (a file or a folder), or the test split's images (``given``: the
    keys on the command line; a ``data_dir`` given must hold them).

    Raises:
        DataError: the input does not exist or holds no images.
        ValueError: a data_dir given does not hold the test split's files.
    """
    if not cfg.predict_input:
        given_dir = cfg.data_dir if "data_dir" in given else None
        subdirs = (cfg.image_subdir, cfg.label_subdir)
        pairs = read_test_split(cfg.run_dir, given_dir, subdirs, ", or predict a folder with --predict_input")
        return [image for image, _ in pairs]
    source = Path(cfg.predict_input)
    if source.is_file():
        return [source]
    if source.is_symlink() and not source.exists():
        raise DataError(
            f"--predict_input={source}: a link to {os.readlink(source)}, which does not exist; point --predict_input "
            "at the image itself, or mount the drive the link points to"
        )
    if not source.is_dir():
        raise DataError(f"--predict_input={source}: no such file or folder")
    mosaics = [p for p in source.iterdir() if p.is_file() and p.suffix.lower() in scene.SCENE_ONLY_SUFFIXES]
    images = sorted(image_entries(source) + [p for p in mosaics if not p.name.startswith(".")])
    if not images:
        raise DataError(
            f"{source}: holds no images (.png .jpg .tif, or .vrt .img .jp2 scenes); point --predict_input at a "
            "folder of tiles or scenes"
        )
    return without_masks(images, mask_suffixes(cfg))


def mask_suffixes(cfg: Config) -> set[str]:
    """The mask suffixes of this run: the key's, and the one split_dataset.py recorded in run_dir (masks named
    a_label.png there, say, while predict.py is run without --mask_suffix); empty suffixes left out."""
    recorded = read_record(Path(cfg.run_dir) / "configs" / "split_dataset.json")
    split_suffix = recorded.get("mask_suffix", "") if isinstance(recorded, dict) else ""
    return {suffix for suffix in (cfg.mask_suffix, split_suffix) if isinstance(suffix, str) and suffix}


def without_masks(images: list[Path], suffixes: set[str]) -> list[Path]:
    """A folder's images less the masks lying beside them (a_mask.png next to a.jpg): predicted as photos they would
    give masks of masks. Said in the log; a folder of masks alone, or a mask named as --predict_input, is predicted."""
    stems = {path.stem for path in images}
    masks = [p for p in images if any(p.stem.endswith(s) and p.stem[: -len(s)] in stems for s in suffixes)]
    if masks:
        LOG.info(
            "left out %d mask(s) lying beside their images in %s (%s, ...: named <image>%s); to predict one as an "
            "image, give it as --predict_input",
            len(masks),
            masks[0].parent,
            masks[0].name,
            " or <image>".join(sorted(suffixes)),
        )
    left_out = set(masks)
    return [path for path in images if path not in left_out]


@dataclasses.dataclass(frozen=True)
class Job:
    """One input image: where its mask goes, and whether it is a scene (scene.py) or a tile."""

    image: Path
    output: Path
    is_scene: bool


def plan_jobs(
    cfg: Config, paths: list[Path], settings: scene.SceneSettings, report: bool = True
) -> tuple[list[Job], int]:
    """One job per input image, and how many inputs were left out: images that share a name (a.tif and a.jpg)
    would overwrite each other's outputs, so each such name is reported and skipped, and the others go on.

    Scenes only when the user names the input: the test split holds tiles that miou.py scores as PNGs.
    ``report``: log the namesakes (under torchrun, rank 0 alone does).

    Raises:
        DataError: an input inside run_dir/predictions.
    """
    run_dir = Path(cfg.run_dir)
    predictions = (run_dir / "predictions").resolve()
    if any(p.resolve().parent == predictions or predictions in p.resolve().parents for p in paths):
        raise DataError(
            f"--predict_input={cfg.predict_input}: lies in the output folder {predictions}; predict another folder"
        )
    by_name: dict[Path, list[Path]] = {}
    jobs, refused = [], 0
    for path in paths:  # outputs are named by the stem: a tile's mask, a scene's files
        if problem := name_problem(path):
            (LOG.error if report else LOG.debug)("%s", problem)
            refused += 1
            continue
        by_name.setdefault(prediction_path(run_dir, path), []).append(path)
    for output, namesakes in by_name.items():
        if len(namesakes) > 1 and cfg.predict_input:
            namesakes = without_browse_images(namesakes, settings, report)
        if len(namesakes) > 1:
            (LOG.error if report else LOG.debug)(
                "%s: share the name %s, so their outputs in %s would overwrite each other; all %d skipped: rename "
                "them apart, or move all but one out of the folder (a.tif and a.tiff of one scene, for example)",
                " and ".join(map(str, namesakes)),
                namesakes[0].stem,
                predictions,
                len(namesakes),
            )
            refused += len(namesakes)
            continue
        path = namesakes[0]
        jobs.append(Job(path, output, bool(cfg.predict_input) and scene.is_scene(path, settings.window)))
    return jobs, refused


BROWSE_SUFFIXES = (".jpg", ".jpeg", ".png")  # the browse image a satellite delivery puts beside its scene


def without_browse_images(namesakes: list[Path], settings: scene.SceneSettings, report: bool) -> list[Path]:
    """Of images sharing a name, the one GeoTIFF scene where the others are JPEG or PNG pictures of it (a Gaofen-2
    delivery's browse .jpg beside its .tiff), the pictures logged as left out; else all of them, as given."""
    rasters = [p for p in namesakes if p.suffix.lower() in scene.RASTER_SUFFIXES]
    pictures = [p for p in namesakes if p.suffix.lower() in BROWSE_SUFFIXES]
    if len(rasters) != 1 or len(pictures) != len(namesakes) - 1 or not scene.is_scene(rasters[0], settings.window):
        return namesakes
    (LOG.info if report else LOG.debug)(
        "%s: left out, a picture of the scene %s beside it (its browse image); move it away to predict it",
        " and ".join(map(str, pictures)),
        rasters[0],
    )
    return rasters


def unfinished(jobs: list[Job], cfg: Config, checkpoint: Path, since: float = 0.0) -> list[Job]:
    """The jobs still to do: tiles whose outputs this checkpoint already wrote after ``since`` (the time this
    run's settings took effect, output_record) are skipped (``skip_existing``); scenes decide for themselves in
    scene.py."""
    if not cfg.skip_existing:
        return jobs
    todo = [j for j in jobs if j.is_scene or not is_complete(j.output, j.image, checkpoint, cfg.overlay, since)]
    if redone := [j for j in todo if not j.is_scene and j.output.is_file()]:
        LOG.info(
            "%d image(s) have masks made before the model, the settings or the image file last changed, or from "
            "another file of that name, and are predicted again: %s",
            len(redone),
            ", ".join(j.output.name for j in redone[:3]) + (f" and {len(redone) - 3} more" if len(redone) > 3 else ""),
        )
    if len(todo) < len(jobs):
        LOG.info(
            "%d of %d image(s) already have masks from this checkpoint and are skipped "
            "(--skip_existing=false redoes them)",
            len(jobs) - len(todo),
            len(jobs),
        )
    return todo


def open_network(cfg: Config, job: Distributed) -> tuple[Path, dict, OnnxSegmenter | None, torch.device]:
    """The file to predict with, its checkpoint state (for an ONNX model, the same keys from its metadata), the
    onnxruntime model when ``backend`` is onnx (else None: the PyTorch network is built from the state), and
    the device.

    Raises:
        ValueError: an unknown backend, or the onnx backend under torchrun.
        DataError: the checkpoint or model cannot be used.
    """
    run_dir = Path(cfg.run_dir)
    if cfg.backend == "torch":
        checkpoint = checkpoint_file(cfg)
        return checkpoint, load_pinned(checkpoint, lambda: load_checkpoint(checkpoint, job.device)), None, job.device
    if cfg.backend != "onnx":
        raise ValueError(f"--backend={cfg.backend!r}: expected torch or onnx")
    if job.world > 1:
        raise ValueError("--backend=onnx runs in one process on the CPU; start predict.py without torchrun")
    model_path = Path(cfg.onnx_model) if cfg.onnx_model else run_dir / "export" / "farmland.onnx"
    segmenter, state = load_pinned_model(model_path)
    LOG.info("backend onnx: %s in onnxruntime on the CPU", model_path)
    if problem := stale_export(model_path, state, run_dir):
        LOG.warning(problem)
    return model_path, state, segmenter, torch.device("cpu")


LOAD_TRIES = 3  # a model file replaced while it is read (train.py saving best.pth) is read again, this many times


def loaded_stamp(path: Path) -> str:
    """The file's stamp (files.file_stamp), or "" where it cannot be found (load_checkpoint names that)."""
    try:
        return file_stamp(path)
    except OSError:
        return ""


def load_pinned(path: Path, load: Callable[[], dict]) -> dict:
    """``load()`` the model file at ``path``, with its stamp as read under LOADED_STAMP: train.py may save a new
    best.pth in the same run while predict.py starts, and the outputs must record the weights that made them,
    not the file that stands there later.

    Raises:
        DataError: the file was replaced during each of LOAD_TRIES reads.
    """
    for _ in range(LOAD_TRIES):
        before = loaded_stamp(path)
        state = load()
        if before and loaded_stamp(path) == before:
            return {**state, LOADED_STAMP: before}
    raise DataError(
        f"{shown_path(path)}: replaced while being read, {LOAD_TRIES} times in a row (is train.py saving it?); "
        "predict once training has finished, or name a weight snapshot that stays: --checkpoint=RUN/checkpoints/"
        "epoch_NNN.pth"
    )


def load_pinned_model(path: Path) -> tuple[OnnxSegmenter, dict]:
    """load_segmenter, with the model file's stamp as read kept in its state (load_pinned)."""
    loaded: list[OnnxSegmenter] = []

    def load() -> dict:
        segmenter, state = load_segmenter(path)
        loaded[:] = [segmenter]
        return state

    state = load_pinned(path, load)
    return loaded[0], state


def warn_replaced(checkpoint: Path, state: dict) -> None:
    """Warn when the model file was replaced while predicting (train.py still running in this run): the outputs
    are of the weights loaded at the start, and say so in their records."""
    if loaded_stamp(checkpoint) != state[LOADED_STAMP]:
        LOG.warning(
            "%s was replaced while predicting (is train.py still training in this run?): these outputs are of the "
            "weights loaded at the start (epoch %s) and record them, so miou.py will not score them as the new "
            "file's; run predict.py again once training has finished",
            shown_path(checkpoint),
            state.get("epoch", "?"),
        )


def check_fixed_side(jobs: list[Job], segmenter: OnnxSegmenter | None, settings: scene.SceneSettings) -> None:
    """Refuse at once an ONNX model of fixed sides (farmland_qgis.onnx) that a scene's windows or a tile (by its
    PNG or JPEG header; other tiles when predicted) cannot go through, rather than after the outputs' record says
    every earlier output was made otherwise.

    Raises:
        DataError: the model's message, with the fix.
    """
    if segmenter is None or segmenter.fixed_side is None:
        return
    for job in jobs:
        size = (settings.window, settings.window) if job.is_scene else scene.image_size(job.image)
        if size is not None and (problem := segmenter.size_problem(*size)):
            raise DataError(problem)


def resolve_bands(cfg: Config, trained: dict) -> None:
    """Set ``bands`` and ``rgb_bands`` in ``cfg`` to the training's (``trained``: the checkpoint's config) unless
    the user gave others for these images (warn_other_bands warns of those once the inputs are known)."""
    if not cfg.bands:
        cfg.bands = str(trained.get("bands", ""))  # the bands the network was trained on, unless the user names others
    cfg.rgb_bands = rgb_bands_for(cfg.rgb_bands, cfg.bands, trained)


def warn_other_bands(given: str, state: dict, counts: Sequence[int]) -> None:
    """Warn where the bands the user gave (``given``, empty where none) differ from those the network was trained
    on, unless every input checked (``counts``, their band counts) has another band count than the training tiles
    (the checkpoint's ``tile_bands``): those bands name this product's, as inference.other_band_count asks."""
    trained = state["config"]
    bands = str(trained.get("bands", ""))
    # A training that named no bands read every band of its tiles in file order: 1..in_channels.
    read = bands or ",".join(str(band) for band in range(1, int(trained.get("in_channels", 3)) + 1))
    if not given or parse_bands(given) == parse_bands(read):
        return
    tile_bands = state.get("tile_bands")
    if tile_bands and counts and all(count != tile_bands for count in counts):
        LOG.info(
            "--bands=%s of these %s-band input(s) stand for bands %s of the %d-band training tiles",
            given,
            ",".join(str(count) for count in sorted(set(counts))),
            read,
            tile_bands,
        )
        return
    LOG.warning(
        "--bands=%s differs from the bands the network was trained on (--bands=%s%s): right only where these "
        "images hold those bands at other numbers; leave --bands out to use the training's",
        given,
        read,
        "" if bands else ", every band of its tiles in file order",
    )


def warn_band_counts(jobs: list[Job], state: dict, bands_given: bool, given: str = "") -> None:
    """Warn of inputs whose band count is not the training tiles' where the training's bands are picked from them
    and no --bands is given (inference.other_band_count), and of --bands (``given``) other than the training's
    (warn_other_bands): every scene, and the first tile of a folder (tiles come as one product)."""
    checked = [j.image for j in jobs if j.is_scene] + [j.image for j in jobs if not j.is_scene][:1]
    counts = [scene.band_count(path) for path in checked]
    warn_other_bands(given, state, [count for count in counts if count is not None])
    for path, count in zip(checked, counts):
        if count is not None and (message := other_band_count(count, path, state, bands_given)):
            LOG.warning("%s", message)


def my_share(jobs: list[Job], job: Distributed) -> list[Job]:
    """This rank's jobs: under torchrun every world-th, so that no output is written twice and none is missed.
    Shard before skipping finished outputs: the other ranks are writing theirs meanwhile."""
    if job.world == 1:
        return jobs
    mine = jobs[job.rank :: job.world]
    LOG.info("distributed prediction: %d ranks, %d image(s) on rank 0", job.world, len(mine))
    return mine


def predict_jobs(
    jobs: list[Job],
    model: torch.nn.Module,
    cfg: Config,
    state: dict,
    checkpoint: Path,
    device: torch.device,
    amp: torch.dtype | None,
    settings: scene.SceneSettings,
    since: Since,
) -> tuple[int, int]:
    """Predict the tiles, then the scenes, among ``jobs``; return (written, failed)."""
    tiles = [j for j in jobs if not j.is_scene]
    scenes = [j.image for j in jobs if j.is_scene]
    done, failures = predict_tiles(
        model,
        [j.image for j in tiles],
        [j.output for j in tiles],
        cfg,
        state,
        checkpoint,
        device,
        amp,
        settings.bands,
        shown=settings.shown,
    )
    if scenes:
        scene_done, scene_failures = scene.predict_scenes(
            model, scenes, Path(cfg.run_dir), state, device, settings, checkpoint, cfg.skip_existing, since.scenes
        )
        done, failures = done + scene_done, failures + scene_failures
    return done, failures


def main(argv: Sequence[str] | None = None) -> int:
    """Predict every input image and write its mask (and overlay) under run_dir/predictions."""
    with leaving_distributed(), remembered_digests():
        return predict_all(argv)


def predict_all(argv: Sequence[str] | None = None) -> int:
    """The body of main: parse the config, join torchrun's job if any, predict this rank's share."""
    cfg, given = cli.parse_command(argv, __doc__ or "")
    cli.check_paths(cfg)
    job = init_distributed(cfg.device)
    cli.setup_logging(cfg, "predict", job.rank)
    run_dir = Path(cfg.run_dir)
    checkpoint, state, segmenter, device = open_network(cfg, job)
    if job.main:  # once, not once per torchrun rank
        warn_network_keys(cfg, given, state["config"], checkpoint, exported=segmenter is not None)
    state = with_threshold(state, cfg.threshold)  # the user's cut, if given
    sieve_pixels(cfg.sieve_cells, state["config"])  # a bad sieve_cells refused before any output is redone
    resolve_bands(cfg, state["config"])
    # Scene keys checked (and rgb_bands against the bands) before the outputs' record is touched.
    settings = scene.SceneSettings.from_config(cfg, *input_padding(state["config"]), state["config"]["in_channels"])
    jobs, refused = plan_jobs(cfg, list_inputs(cfg, given), settings, job.main)
    check_fixed_side(jobs, segmenter, settings)  # before the outputs' record is touched: a refusal redoes nothing
    if job.main:
        warn_band_counts(jobs, state, "bands" in given, cfg.bands if "bands" in given else "")
    since = outputs_since(cfg, checkpoint, job, state[LOADED_STAMP])
    if job.main:
        cli.save_config(cfg, "predict")  # as resolved, bands included
    amp = None if segmenter is not None else resolve_amp(cfg.amp, device)  # an ONNX model runs in its own dtype
    apply_reuse_memory(cfg.reuse_memory)
    model = segmenter if segmenter is not None else inference_model(state, device, cfg.channels_last, amp)
    mine = unfinished(my_share(jobs, job), cfg, checkpoint, since.tiles)
    done, failures = predict_jobs(mine, model, cfg, state, checkpoint, device, amp, settings, since)
    failures += refused if job.main else 0  # every rank saw them; counted once
    if job.world > 1:
        done, failures = (int(v) for v in all_reduce_sum(torch.tensor([done, failures], device=device)))
    if job.main and any(j.is_scene for j in jobs):
        # After the reduction above every rank has finished, so every scene's area file is in place.
        scene.write_run_table(run_dir)
    LOG.info("wrote %d mask(s) to %s", done, run_dir / "predictions")
    warn_replaced(checkpoint, state)
    if failures:
        LOG.error("%d image(s) could not be predicted; see the messages above", failures)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
