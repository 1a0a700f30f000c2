"""The exported network run by onnxruntime, as a drop-in for the PyTorch one in predict.py and scene.py.

export_onnx.py writes ``run_dir/export/farmland.onnx``: the U-Net with its per-band normalisation, BatchNorm
folding and softmax inside the graph, float32 input N x C x H x W scaled to [0, 1] (8-bit images / 255,
16-bit / 65535), output N x 2 x H x W probabilities (background, farmland), and metadata in the file: the
keys QGIS's Deepness plugin reads (JSON-encoded strings) and this project's own ``farmland_*`` keys (bands,
width, threshold, checkpoint digest). This module opens such a file, checks that it is one, and wraps the
onnxruntime session in :class:`OnnxSegmenter`, which predict_tiles and scene.predict_scenes call as they call
the PyTorch network (inference.predict_probabilities knows it returns probabilities, not logits).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import resolution
from files import DataError, file_digest, shell_quoted
from net_structure import downscale_of, input_padding

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
FORMAT_KEY = "farmland_unet"  # present in every model export_onnx.py writes: the metadata format version
# 2: the graph takes sides on the network's grid (farmland_size_multiple) and pads nothing; 1 padded inside it.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # this reader pads every input itself, which suits both
CLASS_NAMES = {0: "background", 1: "farmland"}


def open_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session on an .onnx file (``threads`` 0: torch's thread count).

    Raises:
        DataError: the file is missing or is not a model onnxruntime can load.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: ONNX model not found; export it first (python export_onnx.py --run_dir=RUN) or set --onnx_model"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3  # errors only: onnxruntime otherwise warns about every unused initializer
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types for damaged or foreign files
        raise DataError(
            f"{path}: not a loadable ONNX model ({type(err).__name__}: {str(err)[:200]}); "
            "re-export it with python export_onnx.py"
        ) from None


def decoded_metadata(session: ort.InferenceSession) -> dict[str, Any]:
    """The model's metadata with each value decoded from JSON (values that are not JSON stay strings)."""
    decoded = {}
    for key, text in session.get_modelmeta().custom_metadata_map.items():
        try:
            decoded[key] = json.loads(text)
        except ValueError:
            decoded[key] = text
    return decoded


def state_from_metadata(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """The parts of a checkpoint that prediction reads (config, threshold, epoch), from an exported model's
    metadata, so that the tile and scene code take an ONNX model as they take a checkpoint.

    Raises:
        DataError: the file lacks this project's metadata (an ONNX model of another kind).
    """
    if meta.get(FORMAT_KEY) not in READABLE_VERSIONS:
        found = "no" if FORMAT_KEY not in meta else f"version {meta[FORMAT_KEY]!r} of the"
        raise DataError(
            f"{path}: {found} farmland metadata ('{FORMAT_KEY}' = {FORMAT_VERSION} expected): not a model written "
            "by export_onnx.py; export the checkpoint with python export_onnx.py --run_dir=RUN, or predict with "
            "--backend=torch"
        )
    try:
        config = {
            "in_channels": int(meta["farmland_in_channels"]),
            "n_classes": int(meta["farmland_n_classes"]),
            "base_width": int(meta["farmland_base_width"]),
            "encoder": str(meta.get("farmland_encoder") or "unet"),  # models exported before the key: a U-Net
            "downscale": int(meta.get("farmland_downscale") or 1),  # before the key: full resolution
            "bands": str(meta["farmland_bands"]),
            "rgb_bands": str(meta.get("farmland_rgb_bands") or ""),  # models exported before the key: the first 3
            "pixel_size_m": float(meta.get("farmland_pixel_size_m") or 0.0),
        }
        threshold = meta["farmland_threshold"]
        return {
            "config": config,
            "threshold": None if threshold is None else float(threshold),
            "epoch": meta.get("farmland_epoch"),
            # The training tiles' band means (models exported before the key: none, so no value-scale check).
            "band_means": [float(v) for v in meta.get("farmland_training_means") or []] or None,
            "tile_bands": meta.get("farmland_tile_bands"),  # the training tiles' band count (before the key: none)
            "exported_from": (
                str(meta.get("farmland_checkpoint") or ""),
                str(meta.get("farmland_checkpoint_sha256") or ""),
            ),
        }
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(
            f"{path}: farmland metadata incomplete or malformed ({err!r}); re-export it with export_onnx.py"
        ) from None


def stale_export(path: Path, state: dict[str, Any], run_dir: Path) -> str | None:
    """Why a model in ``run_dir/export`` is not the run's checkpoint of the same name any more (train.py wrote it
    again after the export), with the fix; None where it still is, or where the model or checkpoint lies elsewhere."""
    name, digest = state.get("exported_from", ("", ""))
    checkpoint = Path(run_dir) / "checkpoints" / name
    if not (name and digest) or Path(path).resolve().parent != (Path(run_dir) / "export").resolve():
        return None
    if not checkpoint.is_file() or file_digest(checkpoint) == digest:
        return None
    return (
        f"{path}: exported from another {name} (epoch {state.get('epoch')}) than the one now in {checkpoint}: "
        "these outputs are the exported network's; export again "
        f"(python export_onnx.py --run_dir={shell_quoted(run_dir)}) to predict with the current one"
    )


def check_shapes(session: ort.InferenceSession, state: dict[str, Any], path: Path) -> None:
    """Raises DataError unless the graph takes (N, in_channels, H, W) images and gives (N, n_classes, H, W)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    config = state["config"]
    if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 4 or len(outputs[0].shape) != 4:
        raise DataError(f"{path}: expected one 4-d input and one 4-d output; re-export it with export_onnx.py")
    found = (inputs[0].shape[1], outputs[0].shape[1])
    if found != (config["in_channels"], config["n_classes"]):
        raise DataError(
            f"{path}: the graph takes {found[0]} band(s) and gives {found[1]} class(es), but its metadata says "
            f"{config['in_channels']} and {config['n_classes']}; re-export it with export_onnx.py"
        )


class OnnxSegmenter(nn.Module):
    """An exported model in onnxruntime behind the interface of the PyTorch network: called with a float
    (N, C, H, W) tensor in [0, 1], it returns class probabilities (N, n_classes, H, W) as a float32 CPU tensor.

    ``returns_probabilities`` tells inference.predict_probabilities not to apply a softmax again; it has no
    parameters, so inputs are fed in float32. Runs on the CPU only.
    """

    returns_probabilities = True

    def __init__(self, session: ort.InferenceSession, state: dict[str, Any], path: Path) -> None:
        super().__init__()
        self.session = session
        self.path = Path(path)
        self.in_channels = state["config"]["in_channels"]
        self.n_classes = state["config"]["n_classes"]
        self.base_width = state["config"]["base_width"]  # sizes CPU batches as the PyTorch network's width does
        self.grid, self.min_side = input_padding(state["config"])  # how the network pads its inputs
        self.downscale = downscale_of(state["config"])  # the graph shrinks its input by this factor
        self.input_name = session.get_inputs()[0].name
        sides = session.get_inputs()[0].shape[2:]
        # farmland_qgis.onnx: height and width fixed for Deepness; None where they are free (farmland.onnx)
        self.fixed_side = tuple(sides) if all(isinstance(side, int) for side in sides) else None

    def padded(self, array: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 images padded at the bottom and right exactly as the PyTorch network pads them
        (resolution.pad_to_grid): the sides the graph takes."""
        return resolution.pad_to_grid(torch.from_numpy(array), self.grid, self.min_side).numpy()

    def size_problem(self, height: int, width: int) -> str | None:
        """Why an image of this size cannot go through a model of fixed sides (farmland_qgis.onnx), with the fix;
        None where it can."""
        padded = tuple(resolution.padded_side(side, self.grid, self.min_side) for side in (height, width))
        if self.fixed_side is None or padded == self.fixed_side:
            return None
        side = " x ".join(map(str, self.fixed_side))
        return (
            f"{self.path}: takes only {side} images (height and width fixed for QGIS's Deepness), not "
            f"{height} x {width}; predict with farmland.onnx beside it, whose sides are free (--onnx_model="
            f"{self.path.with_name('farmland.onnx')}), or give scenes --window={self.fixed_side[0]}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        height, width = array.shape[-2:]
        if problem := self.size_problem(height, width):
            raise DataError(problem)
        padded = self.padded(array)
        probabilities = self.session.run(None, {self.input_name: padded})[0]
        return torch.from_numpy(probabilities[..., :height, :width])


def load_segmenter(path: Path, threads: int = 0) -> tuple[OnnxSegmenter, dict[str, Any]]:
    """Open an exported model: the segmenter and the checkpoint-like state its metadata describes.

    Raises:
        DataError: missing, unloadable, or not a model written by export_onnx.py.
    """
    session = open_session(path, threads)
    state = state_from_metadata(decoded_metadata(session), Path(path))
    check_shapes(session, state, Path(path))
    return OnnxSegmenter(session, state, Path(path)), state
