"""Export a trained network to ONNX: for QGIS (the Deepness plugin) and for prediction with onnxruntime.

    python export_onnx.py --run_dir=RUN                       # RUN/checkpoints/best.pth
    python export_onnx.py --run_dir=RUN --checkpoint=FILE     # any checkpoint of this project
    python export_onnx.py --run_dir=RUN --quantize=int8       # also an 8-bit copy for CPUs
    python export_onnx.py --run_dir=RUN --threshold=0.4       # QGIS's farmland cut: 0.4, not the tuned one

Writes under run_dir/export/:
- ``farmland.onnx``: float32 input N x C x H x W (batch, height and width dynamic) scaled to 0..1 as Deepness and
  most tools feed it (8-bit / 255, 16-bit / 65535); the checkpoint's per-band normalisation, the folded
  BatchNorm and the softmax inside; output N x 2 x H x W probabilities (background, farmland); Deepness's
  metadata keys and this project's (see onnx_build.py). Checked at once against PyTorch's fp32 prediction on
  real tiles and on random ones drawn like the training data (probabilities within 1e-4, masks agreeing at the
  cut the file carries); removed, and the script fails, if not.
- ``farmland_qgis.onnx``: the same network with height and width fixed to ``window`` (Deepness reads its tile
  size from the input's shape), its farmland probability moved so that the file's cut falls at 0.5 (qgis_state):
  Deepness can only draw farmland where it is the more probable class.
- ``farmland_int8.onnx`` (``--quantize=int8``): statically quantised, calibrated on ``calibration_tiles``
  training tiles; kept only where, on the run's test split, its pooled farmland IoU is within 0.01 of the
  fp32 model's and its masks agree on at least 99 % of the pixels (written with a warning when the run has no
  test split; removed, exit status 1, when it fails).
- ``export_report.json``: the checks' figures.

Predict with the export: ``python predict.py --run_dir=RUN --backend=onnx`` (``--onnx_model=FILE`` for another).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

import cli
import exported_model
import files
import onnx_build
import onnx_quantize
import scene
from config import Config
from data_preprocess import original_training_pairs, read_image, read_pair_list
from files import DataError, atomic_write_text, check_writable
from inference import (
    checkpoint_file,
    decision_threshold,
    model_from_checkpoint,
    training_means,
    warn_network_keys,
    with_threshold,
)
from net_structure import encoder_of, input_padding
from rasters import SAME_PIXEL_SIZE
from runtime import load_checkpoint
from training import tiles_pixel_size

LOG = logging.getLogger("export_onnx")
# Band means below this share of full scale (4095 / 65535) are those of 10- or 12-bit values stored as 16-bit.
FEW_BIT_MEANS = 4095 / 65535


def checked_network(state: dict[str, Any], checkpoint: Path) -> torch.nn.Module:
    """The checkpoint's network in fp32 on the CPU, its weights checked against the architecture it declares.

    Raises:
        DataError: naming the file, for a config without the architecture, a class count other than 2, or
            weights of another band count or width than the config says.
    """
    config = state["config"]
    try:
        bands, classes, width = int(config["in_channels"]), int(config["n_classes"]), int(config["base_width"])
    except (KeyError, TypeError, ValueError):
        raise DataError(
            f"{checkpoint}: its config lacks in_channels, n_classes or base_width; export a checkpoint train.py wrote"
        ) from None
    if classes != 2:
        raise DataError(f"{checkpoint}: a network of {classes} classes; the export expects 2 (background, farmland)")
    first = state["model"].get("inc.block.0.weight")
    if first is not None and tuple(first.shape[:2]) != (width, bands):
        raise DataError(
            f"{checkpoint}: its weights are of a {first.shape[1]}-band network of width {first.shape[0]}, but its "
            f"config says in_channels={bands}, base_width={width}; the file was altered or mixed up with another "
            "run's: export the checkpoint train.py wrote"
        )
    try:
        return model_from_checkpoint(state, torch.device("cpu"), channels_last=False).eval()
    except DataError as err:
        raise DataError(f"{checkpoint}: {err}") from None


def resolution_cm(cfg: Config, state: dict[str, Any]) -> float | None:
    """The training data's pixel size in cm for Deepness: ``pixel_size_m`` given here, else the checkpoint's,
    else the run's training tiles' georeference; None when none tells."""
    trained = float(state["config"].get("pixel_size_m") or 0.0)
    if cfg.pixel_size_m and trained and abs(cfg.pixel_size_m / trained - 1) > SAME_PIXEL_SIZE:
        LOG.warning(
            "--pixel_size_m=%g differs from the %g m pixels the checkpoint was trained on: Deepness will resample "
            "layers to %g cm per pixel, predict.py to %g m; leave --pixel_size_m out unless the checkpoint's is wrong",
            cfg.pixel_size_m,
            trained,
            cfg.pixel_size_m * 100,
            trained,
        )
    metres = cfg.pixel_size_m or trained
    train = Path(cfg.run_dir) / "splits" / "train.txt"
    if not metres and train.is_file():
        metres = tiles_pixel_size(original_training_pairs(Path(cfg.run_dir))) or 0.0
    return round(metres * 100, 4) if metres > 0 else None


def qgis_state(state: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint state the QGIS file is made from: the farmland logit lowered by logit(t), so that its
    farmland probability is 0.5 exactly where the checkpoint's is its cut t, and the cut 0.5.

    Deepness zeroes each class below its threshold and then takes the more probable class, so it draws farmland
    only where the farmland probability is at least 0.5 as well: a cut t below 0.5 would do nothing there. With
    the cut moved to 0.5, Deepness's mask is predict.py's at t. The state itself where the cut is 0.5 or unset.
    """
    cut = decision_threshold(state)
    if cut is None or cut == 0.5:
        return state
    weights = dict(state["model"])
    bias = weights["outc.bias"].clone()  # the last 1x1 convolution's, the logits' offset, in every encoder
    # A tuned cut may be 0 (training's lowest bin: every pixel farmland), whose logit is infinite; 1e-6 from 0 or 1
    # draws the same farmland wherever float32 probabilities tell them apart.
    near = min(max(cut, 1e-6), 1 - 1e-6)
    bias[1] -= math.log(near / (1 - near))  # softmax of two classes: p = sigmoid(farmland logit - background logit)
    weights["outc.bias"] = bias
    return {**state, "model": weights, "threshold": 0.5}


def export_qgis(
    cfg: Config, state: dict[str, Any], model: onnx.ModelProto, metadata: dict[str, Any], qgis: Path, written: Path
) -> None:
    """Write farmland_qgis.onnx (qgis_state's network, fixed to the window) to ``written`` and check it against
    PyTorch; the caller renames it to ``qgis``. ``model`` is farmland.onnx's graph, with ``metadata``: traced again
    only where the cut is moved.

    Raises:
        DataError: the file disagrees with PyTorch (it is then removed).
    """
    moved = qgis_state(state)
    cut = decision_threshold(state)
    if moved is not state:
        LOG.info(
            "%s: its farmland probability is moved so that the cut %.3g falls at 0.5, Deepness's: in QGIS the "
            "threshold 0.5 draws predict.py's farmland (docs/qgis.md)",
            qgis,
            cut,
        )
        metadata = metadata | {"seg_thresh": 0.5, "farmland_threshold": 0.5, "farmland_cut_moved_from": cut}
        network = model_from_checkpoint(moved, torch.device("cpu"), channels_last=False).eval()
        model = onnx_build.with_metadata(onnx_build.export_graph(network), metadata)
    with files.written_or_disk_error(qgis):
        onnx_build.write_model(onnx_build.fixed_size_copy(model, cfg.window), written)
    try:
        shape = (1, int(state["config"]["in_channels"]), cfg.window, cfg.window)
        window = onnx_build.noise_like_training(np.random.default_rng(1), shape, onnx_build.input_statistics(state))
        segmenter, exported = exported_model.load_segmenter(written)
        segmenter.path = qgis  # its messages name the file it becomes
        onnx_build.compare_with_torch(segmenter, moved, [window], exported)
    except BaseException:
        written.unlink(missing_ok=True)
        raise


PIXEL_TYPE_TRIES = 8  # training tiles tried, in list order, to learn the tiles' pixel type


def training_pixel_type(cfg: Config) -> str | None:
    """The pixel type ("uint8", "uint16", ...) of the run's first readable training tile (splits/train.txt); None
    where the split is missing or none of the first few of its tiles can be read."""
    try:
        pairs = read_pair_list(Path(cfg.run_dir) / "splits" / "train.txt")
    except DataError:  # no split (a checkpoint exported on its own): the means alone decide
        return None
    for image, _ in pairs[:PIXEL_TYPE_TRIES]:
        try:
            return str(read_image(image).dtype)
        except DataError:
            continue
    return None


def warn_few_bit_training(means: np.ndarray | None, pixel_type: str | None = None) -> None:
    """Warn where the training tiles' band means (scaled to [0, 1]) say 10- or 12-bit values stored as 16-bit: a
    QGIS plugin that divides every layer by 255 (Deepness) cannot feed farmland_qgis.onnx such values, and the
    colleagues who receive the file would not know it. ``pixel_type``: the training tiles' (training_pixel_type);
    tiles of another type than 16-bit (dark 8-bit imagery, whose means are as low) are not warned of, and where it
    is unknown (None) the means alone decide."""
    if means is None or not len(means) or float(np.max(means)) >= FEW_BIT_MEANS:
        return
    if pixel_type is not None and pixel_type != "uint16":
        return
    LOG.warning(
        "the training tiles' band means (%s of full scale) are those of 10- or 12-bit values stored as 16-bit: "
        "Deepness divides every layer by 255, so farmland_qgis.onnx cannot map such scenes there, even rescaled "
        "to 8 bits by the full 16-bit range. Map them with predict.py (its masks and fields open in QGIS), or train "
        "on tiles stretched once to 8 bits (docs/qgis.md, 16-bit layers)",
        ", ".join(f"{float(m):.4g}" for m in means),
    )


def export_fp32(cfg: Config, state: dict[str, Any], checkpoint: Path, folder: Path) -> dict[str, Any]:
    """Write farmland.onnx and farmland_qgis.onnx and check them against PyTorch; return the figures.

    Raises:
        DataError: the checkpoint cannot be exported, or the exported model disagrees with PyTorch (the
            files are then removed).
    """
    unet = checked_network(state, checkpoint)
    resolution = resolution_cm(cfg, state)
    if resolution is None:
        LOG.warning(
            "the training tiles' pixel size is unknown, so the model carries no 'resolution' for QGIS: set it in "
            "Deepness by hand, or export with --pixel_size_m=METRES (docs/qgis.md)"
        )
    means = training_means(unet, state)
    warn_few_bit_training(means, training_pixel_type(cfg))
    metadata = onnx_build.model_metadata(state, checkpoint, cfg.window, cfg.overlap, resolution)
    if means is not None:  # predict.py --backend=onnx warns of images of another value scale, as with checkpoints
        metadata["farmland_training_means"] = [round(float(v), 6) for v in means]
    if state.get("tile_bands"):  # and of products of another band count than the training tiles'
        metadata["farmland_tile_bands"] = int(state["tile_bands"])
    LOG.info(
        "exporting %s (%s, %d bands, width %d) ...",
        checkpoint,
        encoder_of(state["config"]),
        unet.in_channels,
        int(state["config"]["base_width"]),
    )
    model = onnx_build.with_metadata(onnx_build.export_graph(unet), metadata)
    path, qgis = folder / "farmland.onnx", folder / "farmland_qgis.onnx"
    # Both are written under hidden names and renamed once both pass their checks: a run killed part way (kill -9,
    # a power cut) leaves no unchecked file under these names, nor a new farmland.onnx beside an earlier export's
    # farmland_qgis.onnx.
    written = {path: files.temporary_beside(path), qgis: files.temporary_beside(qgis)}
    with files.written_or_disk_error(path):  # a full disk names farmland.onnx, not its temporary name
        onnx_build.write_model(model, written[path])
    try:
        # Random images drawn like the training inputs, not uniform noise: see onnx_build.noise_like_training.
        statistics = onnx_build.input_statistics(state)
        real = onnx_build.sample_tiles(Path(cfg.run_dir), state)
        tiles = onnx_build.comparison_tiles(unet.in_channels, real, statistics=statistics)
        segmenter, exported = exported_model.load_segmenter(written[path])
        segmenter.path = path  # its messages name the file it becomes
        figures = onnx_build.compare_with_torch(segmenter, state, tiles, exported)
        export_qgis(cfg, state, model, metadata, qgis, written[qgis])
        for final, temporary in written.items():
            os.replace(temporary, final)
    except BaseException:
        for file in (path, qgis, *written.values()):
            files.remove_quietly(file)  # a file still open elsewhere (Windows) must not hide the error raised
        raise
    LOG.info(
        "%s: onnxruntime matches PyTorch's fp32 prediction (largest probability difference %.1e, %d of %d mask "
        "pixels differ, each within 1e-4 of the cut)",
        path,
        figures["max_probability_difference"],
        figures["mask_pixels_differing"],
        figures["pixels"],
    )
    return {"file": str(path), "qgis_file": str(qgis), "resolution_cm": resolution, **figures}


def calibration_tiles(cfg: Config, state: dict[str, Any]) -> list[np.ndarray]:
    """Up to ``calibration_tiles`` of the run's training tiles, read as the network takes them, to calibrate the
    8-bit ranges on; unreadable ones are left out with a warning.

    Raises:
        DataError: the run has no training split, or none of its tiles can be read (the data moved or deleted).
    """
    config = state["config"]
    listed = Path(cfg.run_dir) / "splits" / "train.txt"
    tiles = []
    for image, _ in onnx_build.spread(read_pair_list(listed), cfg.calibration_tiles):
        try:
            tiles.append(onnx_build.read_tile(image, config["in_channels"], str(config.get("bands", ""))))
        except DataError as err:
            LOG.warning("%s (left out of the calibration)", err)
    if not tiles:
        raise DataError(
            f"{listed}: none of its training tiles could be read to calibrate the 8-bit copy (see the warnings "
            "above); put the run's data back where the split lists it, or export without --quantize"
        )
    return tiles


def export_int8(
    cfg: Config, state: dict[str, Any], folder: Path, tiles: Sequence[np.ndarray]
) -> tuple[dict[str, Any], int]:
    """Write farmland_int8.onnx, calibrated on ``tiles`` (calibration_tiles), and check it on the test split;
    return its figures and the exit status."""
    source, target = folder / "farmland.onnx", folder / "farmland_int8.onnx"
    LOG.info("quantising to 8 bits, calibrated on %d training tile(s) ...", len(tiles))
    onnx_quantize.quantize_int8(source, target, tiles)
    test = Path(cfg.run_dir) / "splits" / "test.txt"
    if not test.is_file():
        LOG.warning("%s: written unchecked, the run has no test split (%s); check it before use", target, test)
        return {"file": str(target), "checked": False}, 0
    fp32, int8 = exported_model.load_segmenter(source)[0], exported_model.load_segmenter(target)[0]
    scores = onnx_quantize.test_split_scores(
        fp32, int8, read_pair_list(test), state, cfg.mask_threshold, cfg.ignore_index
    )
    summary = (
        f"pooled test farmland IoU {scores['int8_farmland_iou']:.4f} against fp32's {scores['fp32_farmland_iou']:.4f}, "
        f"masks agreeing on {scores['mask_agreement']:.2%} of the pixels of {scores['tiles']} tile(s)"
    )
    if not onnx_quantize.meets_bar(scores):
        target.unlink(missing_ok=True)
        LOG.error(
            "%s: not offered, the 8-bit copy costs too much accuracy (%s; the bar: IoU within %g, agreement at least "
            "%.0f%%); use farmland.onnx",
            target,
            summary,
            onnx_quantize.IOU_MARGIN,
            100 * onnx_quantize.MIN_AGREEMENT,
        )
        return {"file": None, "checked": True, "offered": False, **scores}, 1
    LOG.info("%s: %s", target, summary)
    return {"file": str(target), "checked": True, "offered": True, **scores}, 0


def drop_earlier_export(folder: Path) -> None:
    """Remove the 8-bit copy and the report an earlier export left in ``folder``: they describe that export's
    checkpoint, and would otherwise lie beside this one's files (an 8-bit copy is written again only with
    ``--quantize=int8`` and only where it passes its check)."""
    for name in ("farmland_int8.onnx", "export_report.json"):
        earlier = folder / name
        if earlier.is_file():
            if name.endswith(".onnx"):  # the report is always written again
                LOG.info("%s: removed, it belongs to an earlier export", earlier)
            earlier.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    """Export the checkpoint, check it, and write the report; exit status 1 when the 8-bit copy is refused."""
    cfg, given = cli.parse_command(argv, __doc__ or "")
    if cfg.quantize not in ("off", "int8"):
        raise ValueError(f"--quantize={cfg.quantize!r}: expected off or int8")
    if cfg.quantize == "int8" and cfg.calibration_tiles < 1:  # else "no training tiles could be read", after the export
        raise ValueError(
            f"--calibration_tiles={cfg.calibration_tiles}: expected 1 or more training tiles to calibrate the 8-bit "
            "ranges; use --calibration_tiles=32"
        )
    cli.check_paths(cfg)
    cli.setup_logging(cfg, "export_onnx")
    cli.save_config(cfg, "export_onnx")
    run_dir = Path(cfg.run_dir)
    checkpoint = checkpoint_file(cfg)
    state = with_threshold(load_checkpoint(checkpoint), cfg.threshold)  # the cut the model carries
    warn_network_keys(cfg, given, state["config"], checkpoint)
    config = state["config"]
    # window and overlap become Deepness's tile size and overlap: checked on the network's own grid (32 with a
    # ResNet encoder or downscale=2), not the U-Net's 16 first, so that one message gives the rule that holds
    scene.SceneSettings.from_config(cfg, *input_padding(config), config["in_channels"])
    folder = run_dir / "export"
    train = run_dir / "splits" / "train.txt"
    if cfg.quantize == "int8" and not train.is_file():  # at once, not after the fp32 export
        raise DataError(
            f"{train}: not found; --quantize=int8 calibrates the 8-bit copy on the run's training tiles: run "
            "split_dataset.py with this --run_dir first, or export without --quantize"
        )
    check_writable(folder)  # at once, not after the network is traced and checked
    # Read at once too: training tiles that moved since the split would otherwise stop the script after the fp32
    # export, leaving its files without their report.
    tiles = calibration_tiles(cfg, state) if cfg.quantize == "int8" else []
    drop_earlier_export(folder)
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "float32": export_fp32(cfg, state, checkpoint, folder)}
    status = 0
    if cfg.quantize == "int8":
        report["int8"], status = export_int8(cfg, state, folder, tiles)
    atomic_write_text(folder / "export_report.json", json.dumps(report, indent=2) + "\n")
    command = f"python predict.py --run_dir={files.shell_quoted(run_dir)} --backend=onnx"
    LOG.info("wrote %s; predict with %s", folder, command)
    return status


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
