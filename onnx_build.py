"""Building the ONNX file: the exportable form of the network, the export, the metadata, the checks.

The graph holds everything between a [0, 1]-scaled image and the class probabilities: the per-band
normalisation stored in the checkpoint, the shrink and grow of ``downscale`` (resolution.py), the network with
each BatchNorm folded into its convolution (net_structure.fold_batchnorm_plain: plain modules, which
``torch.onnx.export(dynamo=True)`` traces) and the softmax. Batch, height and width are dynamic; height and width
are multiples of the network's grid (16 for the U-Net, 32 for a ResNet encoder, times downscale; the metadata's
``farmland_size_multiple``, and the U-Net takes at least two grid cells): exported_model.OnnxSegmenter pads
other sizes as the PyTorch network pads and crops the probabilities back. A scene's windows, and Deepness's
tiles, are multiples of it already.

Metadata values are strings holding JSON, as QGIS's Deepness plugin reads them (it calls ``json.loads`` on
each): ``model_type``, ``class_names``, ``resolution`` (cm per pixel, where known), ``tiles_size`` and
``tile_size`` (Deepness's documentation names the first, its code reads the second), ``tiles_overlap``
(percent), ``seg_thresh``, ``seg_small_segment``, ``standardization_mean``/``standardization_std`` (identity:
the normalisation is inside the graph, so Deepness must not apply its own), and this project's ``farmland_*``
keys, which exported_model reads back.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

import exported_model
import resolution
from data_preprocess import image_to_float, parse_bands, read_image, read_pair_list, select_bands, trained_bands
from demo_data import render_tile
from files import DataError, atomic_write_bytes, file_digest
from inference import classes_from_probabilities, decision_threshold, inference_model, predict_probabilities
from net_structure import downscale_of, encoder_of, fold_batchnorm_plain, input_padding
from training import iou_at

LOG = logging.getLogger("export_onnx")
TOLERANCE = 1e-4  # largest difference in probability allowed between onnxruntime and PyTorch's fp32 path
# Opset 18's IR version (ONNX 1.13). torch's exporter stamps the newest (10), which onnxruntime refuses before 1.18
# ("Unsupported model IR version"): QGIS plugins may ship an older onnxruntime than ours. The graph uses nothing of
# IR 9 or 10 (no float8 or 4-bit types, no function overloads).
IR_VERSION = 8


class ExportNet(nn.Module):
    """Image in [0, 1] -> class probabilities, all inside one traceable graph (see the module docstring)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = fold_batchnorm_plain(unet)
        self.grid = unet.size_multiple * unet.downscale  # 16 for the U-Net, 32 for a ResNet encoder, times downscale
        self.min_cells = max(1, unet.min_side // unet.size_multiple)  # the U-Net's least side: 2 grid cells

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Sides are multiples of the grid (the graph's input shape says so): exported_model.OnnxSegmenter pads
        # other sizes first, as the PyTorch networks pad, so the graph itself pads nothing.
        x = (x - self.unet.band_mean[:, None, None]) / self.unet.band_std[:, None, None]
        factor = self.unet.downscale
        return resolution.grow(self.unet.body(resolution.shrink(x, factor)), factor, x.shape[-2:]).softmax(1)


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Keep torch.onnx.export's progress lines and its notes on optional packages out of the user's log."""
    names = ("torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_graph(unet: nn.Module) -> onnx.ModelProto:
    """Trace the network with torch.onnx.export (dynamo) into a graph with dynamic batch, height and width."""
    net = ExportNet(unet.cpu().float()).eval()
    length = net.grid * (net.min_cells + 1)
    example = torch.rand(2, unet.in_channels, length, length)  # a batch of 1 would be traced as a constant
    rows, columns = (torch.export.Dim(name, min=net.min_cells) for name in ("rows", "columns"))
    dims = {"x": {0: torch.export.Dim("batch"), 2: net.grid * rows, 3: net.grid * columns}}
    with quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            input_names=[exported_model.INPUT_NAME],
            output_names=[exported_model.OUTPUT_NAME],
            dynamic_shapes=dims,
            optimize=True,
            opset_version=18,  # onnxruntime 1.14 and later, with IR_VERSION
            verbose=False,
        )
    model = program.model_proto
    model.ir_version = IR_VERSION
    for value in (model.graph.input[0], model.graph.output[0]):
        dims_proto = value.type.tensor_type.shape.dim
        for index, name in ((0, "batch"), (2, "height"), (3, "width")):
            dims_proto[index].dim_param = name  # the output's own names are sympy expressions of the input's
    return model


def validation_iou(state: dict[str, Any]) -> float | None:
    """The validation farmland IoU of the checkpoint's own epoch and weights (tuned-threshold IoU where tuned), if
    recorded: the moving average's figures where the checkpoint holds those (``weights`` "ema"), the trained
    weights' otherwise; at the user's cut (inference.with_threshold) it is computed from the best epoch's val
    histogram when the checkpoint holds those weights, and unknown (None) otherwise or for a checkpoint saved
    without one."""
    if state.get("threshold_source") == "user":
        histogram = state.get("best_histogram")
        best = (state.get("epoch"), state.get("weights")) == (state.get("best_epoch"), state.get("best_weights"))
        value = iou_at(np.asarray(histogram), state["threshold"]) if histogram is not None and best else math.nan
        return round(float(value), 4) if math.isfinite(value) else None
    for row in state.get("history", []):
        if row.get("epoch") == state.get("epoch"):
            prefix = "val_ema_" if state.get("weights") == "ema" else "val_"  # the figures of the weights it holds
            tuned, cut = row.get(f"{prefix}tuned_farmland_iou", math.nan), row.get(f"{prefix}threshold", math.nan)
            value = tuned if math.isfinite(cut) and math.isfinite(tuned) else row.get(f"{prefix}farmland_iou", math.nan)
            return round(float(value), 4) if math.isfinite(value) else None
    return None


def model_metadata(
    state: dict[str, Any], checkpoint: Path, window: int, overlap: int, resolution_cm: float | None
) -> dict[str, Any]:
    """The metadata of the exported model (values as Python objects; with_metadata encodes each as JSON)."""
    config, threshold = state["config"], decision_threshold(state)
    bands = int(config["in_channels"])
    weights = state["model"]
    metadata: dict[str, Any] = {
        "model_type": "Segmentor",
        "class_names": {str(k): v for k, v in exported_model.CLASS_NAMES.items()},
        "tiles_size": window,
        "tile_size": window,
        "tiles_overlap": round(100 * overlap / window),
        "seg_thresh": 0.5 if threshold is None else threshold,
        "seg_small_segment": 0,  # no smoothing: predict.py applies none either
        "standardization_mean": [0.0] * bands,  # identity: the checkpoint's normalisation is inside the graph
        "standardization_std": [1.0] * bands,
    }
    if resolution_cm:
        metadata["resolution"] = resolution_cm
    mean, std = weights.get("band_mean"), weights.get("band_std")
    metadata |= {
        exported_model.FORMAT_KEY: exported_model.FORMAT_VERSION,
        "farmland_input": "float32 N x C x H x W, each band scaled to 0..1 (8-bit / 255, 16-bit / 65535), H and W "
        "multiples of farmland_size_multiple; the per-band normalisation is inside the graph",
        "farmland_output": "float32 N x 2 x H x W class probabilities (softmax): 0 background, 1 farmland",
        "farmland_in_channels": bands,
        "farmland_n_classes": int(config["n_classes"]),
        "farmland_base_width": int(config["base_width"]),
        "farmland_encoder": encoder_of(config),
        "farmland_downscale": downscale_of(config),
        "farmland_size_multiple": input_padding(config)[0],
        "farmland_bands": str(config.get("bands", "")),
        "farmland_rgb_bands": str(config.get("rgb_bands", "")),  # the bands predict.py's overlays show
        "farmland_pixel_size_m": float(config.get("pixel_size_m") or 0.0) or None,  # scenes are resampled to it
        "farmland_band_mean": [0.0] * bands if mean is None else [round(float(v), 6) for v in mean],
        "farmland_band_std": [1.0] * bands if std is None else [round(float(v), 6) for v in std],
        "farmland_threshold": threshold,
        "farmland_checkpoint": Path(checkpoint).name,
        "farmland_checkpoint_sha256": file_digest(checkpoint),
        "farmland_epoch": state.get("epoch"),
        "farmland_val_farmland_iou": validation_iou(state),
        "farmland_precision": "float32",
    }
    return metadata


def with_metadata(model: onnx.ModelProto, metadata: dict[str, Any]) -> onnx.ModelProto:
    """Replace the model's metadata: each value JSON-encoded, as Deepness reads it."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    model.producer_name = "farmland-unet export_onnx.py"
    model.doc_string = (
        "Farmland U-Net. Input 'images': float32 N x C x H x W scaled to 0..1; output 'probabilities': "
        "N x 2 x H x W (background, farmland). Normalisation and softmax are inside the graph."
    )
    return model


def write_model(model: onnx.ModelProto, path: Path) -> None:
    """Write a model atomically (temporary file, then rename)."""
    atomic_write_bytes(path, model.SerializeToString())


def fixed_size_copy(model: onnx.ModelProto, side: int) -> onnx.ModelProto:
    """The same graph with height and width fixed to ``side`` (the batch stays dynamic): Deepness takes its
    tile size from the input's shape and cannot load a model whose height and width are names."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in (fixed.graph.input[0], fixed.graph.output[0]):
        for index in (2, 3):
            value.type.tensor_type.shape.dim[index].dim_value = side
    metadata = {p.key: json.loads(p.value) for p in fixed.metadata_props}
    return with_metadata(fixed, metadata | {"farmland_fixed_side": side})


def input_statistics(state: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-band mean and standard deviation of the training inputs (in the [0, 1] input scale) that the
    checkpoint's network normalises by, as float32 arrays; None where it holds none: a checkpoint trained without
    ``normalise`` (identity: mean 0, deviation 1) or saved before the statistics were kept."""
    weights = state["model"]
    if weights.get("band_mean") is None or weights.get("band_std") is None:
        return None
    mean = torch.as_tensor(weights["band_mean"]).detach().float().cpu().numpy()
    std = torch.as_tensor(weights["band_std"]).detach().float().cpu().numpy()
    if not (np.all(mean == 0.0) and np.all(std == 1.0)):
        return mean, std
    return None


def noise_like_training(
    rng: np.random.Generator, shape: tuple[int, ...], statistics: tuple[np.ndarray, np.ndarray] | None
) -> np.ndarray:
    """Random images (N, C, H, W) float32 for the export's check, drawn where the network's inputs lie: each band
    normal with the training inputs' mean and deviation (``statistics``), clipped to [0, 1]; uniform in [0, 1]
    without statistics.

    Uniform noise is no test of a network trained on 10- or 12-bit values stored as 16-bit (a band's deviation
    near 0.001 of the [0, 1] scale): normalised, it lies up to ~1000 deviations from the data, and float
    rounding alone then moves the probabilities by more than TOLERANCE. Normalised, these images are close to
    standard normal in every band, so a graph that reorders the bands or normalises otherwise still shows.
    """
    if statistics is None:
        return rng.random(shape, dtype=np.float32)
    mean, std = (np.asarray(v, dtype=np.float32)[:, None, None] for v in statistics)
    return np.clip(rng.standard_normal(shape, dtype=np.float32) * std + mean, 0.0, 1.0)


def comparison_tiles(
    in_channels: int,
    real: Sequence[np.ndarray],
    seed: int = 0,
    statistics: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Batches (N, C, H, W) float32 to compare onnxruntime with PyTorch on: random images at three sizes (one
    too small to reflect-pad, which exported_model pads itself), drawn like the training inputs
    (noise_like_training, with the checkpoint's ``statistics`` from input_statistics), and the real tiles given,
    one batch each."""
    rng = np.random.default_rng(seed)
    shapes = [(2, in_channels, 64, 64), (1, in_channels, 40, 72), (1, in_channels, 12, 30)]
    return [noise_like_training(rng, shape, statistics) for shape in shapes] + [tile[None] for tile in real]


def compare_with_torch(
    segmenter: exported_model.OnnxSegmenter,
    state: dict[str, Any],
    batches: Sequence[np.ndarray],
    exported: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """onnxruntime's probabilities and masks against PyTorch's fp32 prediction path (predict.py with
    ``--amp=off``) on the same batches.

    Masks must agree wherever the farmland probability lies more than TOLERANCE from the decision cut; a pixel
    within it may go either way on float rounding alone. ``exported``: the state exported_model.load_segmenter
    read from the file's metadata; onnxruntime's masks are cut at its threshold (the one predict.py
    --backend=onnx and Deepness use), so a file that carries another cut than the checkpoint fails too.

    Raises:
        DataError: a probability differs by TOLERANCE or more, or a mask differs away from the cut.
    """
    cpu = torch.device("cpu")
    reference = inference_model(state, cpu, channels_last=False, amp=None)
    threshold = decision_threshold(state)
    carried = threshold if exported is None else decision_threshold(exported)
    cut = 0.5 if threshold is None else threshold
    worst, differing, pixels = 0.0, 0, 0
    for batch in batches:
        images = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        expected = predict_probabilities(reference, images, cpu, channels_last=False)
        found = predict_probabilities(segmenter, images, cpu, channels_last=False)
        worst = max(worst, float((expected - found).abs().max()))
        differ = classes_from_probabilities(expected, threshold) != classes_from_probabilities(found, carried)
        away = int((differ & ((expected[:, 1] - cut).abs() > TOLERANCE)).sum())
        differing, pixels = differing + int(differ.sum()), pixels + differ.numel()
        if worst >= TOLERANCE or away:
            raise DataError(
                f"{segmenter.path}: onnxruntime disagrees with PyTorch's fp32 prediction on a {tuple(batch.shape)} "
                f"batch (largest probability difference {worst:.2g}, allowed {TOLERANCE:g}; {away} mask pixel(s) "
                f"differ away from the cut); the export is wrong and was removed. Report it with the versions: "
                f"torch {torch.__version__}, onnxruntime {exported_model.ort.__version__}"
            )
    return {"max_probability_difference": worst, "mask_pixels_differing": differing, "pixels": pixels}


def read_tile(path: Path, in_channels: int, bands: str) -> np.ndarray:
    """One image as the network takes it: (in_channels, H, W) float32 in [0, 1], bands selected.

    Raises:
        DataError: unreadable, or bands that do not fit.
    """
    image = trained_bands(
        select_bands(read_image(path, nodata_as_zero=True), parse_bands(bands), path), in_channels, path
    )
    return image_to_float(image, in_channels, path)


def spread(items: Sequence[Any], count: int) -> list[Any]:
    """Up to ``count`` items taken evenly across the sequence (all of them when there are fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / max(count - 1, 1))] for i in range(count)]


def sample_tiles(run_dir: Path, state: dict[str, Any], count: int = 4) -> list[np.ndarray]:
    """Up to ``count`` real tiles to check the export on: from the run's test split, else its validation or
    training split; generated demo tiles where the run has none (or none can be read), each band moved to the
    mean and deviation of the checkpoint's normalisation where it holds one (input_statistics)."""
    config = state["config"]
    for split in ("test", "val", "train"):
        listed = Path(run_dir) / "splits" / f"{split}.txt"
        if not listed.is_file():
            continue
        tiles = []
        for image, _ in spread(read_pair_list(listed), count):
            try:
                tiles.append(read_tile(image, config["in_channels"], str(config.get("bands", ""))))
            except DataError as err:
                LOG.warning("%s (left out of the export check)", err)
        if tiles:
            return tiles
    rng = np.random.default_rng(0)
    bands = np.arange(config["in_channels"]) % 3  # demo tiles are RGB: repeated for other band counts
    tiles = [render_tile(rng, 64)[0][:, :, bands].transpose(2, 0, 1).astype(np.float32) / 255 for _ in range(count)]
    statistics = input_statistics(state)
    if statistics is None:
        return tiles
    # 8-bit RGB is far from data such as 10-bit values stored as 16-bit: each band is moved to the training
    # inputs' mean and deviation, keeping the tile's fields and edges.
    mean, std = (np.asarray(v, dtype=np.float32)[:, None, None] for v in statistics)
    standard = [(t - t.mean((1, 2), keepdims=True)) / np.maximum(t.std((1, 2), keepdims=True), 1e-6) for t in tiles]
    return [np.clip(z * std + mean, 0.0, 1.0).astype(np.float32) for z in standard]
