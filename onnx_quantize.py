"""An 8-bit copy of the exported model for CPUs, and the check that decides whether it is offered.

The copy is quantised statically with onnxruntime.quantization: weights to int8 per output channel,
activations to uint8 with ranges calibrated on training tiles (min-max), convolutions and transposed
convolutions only (normalisation, the shrink and grow of ``downscale`` and softmax stay in float; calibration
tiles are padded to the sides the graph takes, as prediction pads them), except the first convolution, which
reads the image, and the last, which gives the class scores: on a demo network (width 16) quantising those
two as well lowered the masks' agreement with fp32 from 99.4 % to 98.1 % of the test pixels, for little
speed (they hold a small share of the arithmetic). The copy is offered only where, on the
run's test split, its pooled farmland IoU lies within IOU_MARGIN of the fp32 model's and its masks agree with
the fp32 model's on at least MIN_AGREEMENT of the pixels.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

import exported_model
import onnx_build
from data_preprocess import load_mask
from files import DataError
from inference import classes_from_probabilities
from metrics import FARMLAND, class_iou, confusion_matrix

LOG = logging.getLogger("export_onnx")
IOU_MARGIN = 0.01  # largest drop in pooled test farmland IoU the 8-bit copy may cost
MIN_AGREEMENT = 0.99  # smallest share of test pixels on which its masks must equal the fp32 model's


class TileReader(CalibrationDataReader):
    """Feeds calibration tiles to onnxruntime's calibrator, one tile per batch (tiles may differ in size)."""

    def __init__(self, tiles: Sequence[np.ndarray], input_name: str) -> None:
        self.items = iter([{input_name: tile[None]} for tile in tiles])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def quantize_int8(source: Path, target: Path, tiles: Sequence[np.ndarray]) -> None:
    """Write the 8-bit copy of ``source`` to ``target``, calibrated on ``tiles``, with source's metadata
    (``farmland_precision`` "int8").

    Raises:
        DataError: no calibration tiles.
    """
    if not tiles:
        raise DataError(f"{target}: no training tiles could be read to calibrate the 8-bit ranges")
    segmenter = exported_model.load_segmenter(source)[0]
    tiles = [segmenter.padded(tile[None])[0] for tile in tiles]  # the sides the graph takes, as predict pads
    with tempfile.TemporaryDirectory() as folder, onnx_build.quiet_exporter():
        prepared, quantized = Path(folder) / "prepared.onnx", Path(folder) / "int8.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        convolutions = [node.name for node in onnx.load(str(prepared)).graph.node if node.op_type == "Conv"]
        quantize_static(
            str(prepared),
            str(quantized),
            TileReader(tiles, exported_model.INPUT_NAME),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv", "ConvTranspose"],
            nodes_to_exclude=[convolutions[0], convolutions[-1]],
        )
        model = onnx.load(str(quantized))
        model.ir_version = onnx_build.IR_VERSION  # the fp32 file's: onnxruntime 1.14 and later load it
        # The quantiser's optimiser imports every domain it knows, ai.onnx.ml at its newest (5, ONNX 1.16): an
        # onnxruntime older than 1.18 refuses the file for that import alone, unused as it is. Keep the used ones.
        used = {node.domain for node in model.graph.node} | {""}
        kept = [opset for opset in model.opset_import if opset.domain in used]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    metadata = {p.key: json.loads(p.value) for p in onnx.load(str(source), load_external_data=False).metadata_props}
    onnx_build.write_model(onnx_build.with_metadata(model, metadata | {"farmland_precision": "int8"}), target)


def test_split_scores(
    fp32: exported_model.OnnxSegmenter,
    int8: exported_model.OnnxSegmenter,
    pairs: Sequence[tuple[Path, Path]],
    state: dict[str, Any],
    mask_threshold: int = 0,
    ignore_index: int = -1,
) -> dict[str, Any]:
    """Pooled farmland IoU of both models against the labels, and the share of pixels where their masks agree.

    Unreadable tiles are skipped with a warning; labels are read as miou.py reads them.
    """
    config, threshold = state["config"], state.get("threshold")
    matrices = {"fp32": np.zeros((2, 2), np.int64), "int8": np.zeros((2, 2), np.int64)}
    agree = pixels = tiles = 0
    for image_path, label_path in pairs:
        try:
            tile = onnx_build.read_tile(image_path, config["in_channels"], config.get("bands", ""))
            label = load_mask(label_path, mask_threshold, ignore_index)
        except DataError as err:
            LOG.warning("%s (left out of the 8-bit check)", err)
            continue
        masks = {}
        for name, segmenter in (("fp32", fp32), ("int8", int8)):
            probabilities = segmenter(torch.from_numpy(tile[None]))
            masks[name] = classes_from_probabilities(probabilities, threshold)[0].numpy()
            matrices[name] += confusion_matrix(masks[name], label)
        agree += int((masks["fp32"] == masks["int8"]).sum())
        pixels, tiles = pixels + label.size, tiles + 1
    iou = {name: float(class_iou(cm)[FARMLAND]) for name, cm in matrices.items()}
    return {
        "tiles": tiles,
        "fp32_farmland_iou": iou["fp32"],
        "int8_farmland_iou": iou["int8"],
        "mask_agreement": agree / pixels if pixels else float("nan"),
    }


def meets_bar(scores: dict[str, Any]) -> bool:
    """Whether the 8-bit copy keeps the pooled farmland IoU within IOU_MARGIN and agrees on MIN_AGREEMENT."""
    fp32, int8 = scores["fp32_farmland_iou"], scores["int8_farmland_iou"]
    both_nan = np.isnan(fp32) and np.isnan(int8)  # no farmland anywhere, predicted or labelled: nothing lost
    close = both_nan or (not np.isnan(fp32) and not np.isnan(int8) and fp32 - int8 <= IOU_MARGIN)
    return bool(scores["tiles"] and close and scores["mask_agreement"] >= MIN_AGREEMENT)
