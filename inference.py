"""A checkpoint made ready to predict, and the steps from images to classes.

The network is rebuilt from the architecture a checkpoint declares, BatchNorm folded into the convolutions,
cast to the prediction dtype; logits become float32 probabilities, and probabilities become classes by the
checkpoint's tuned threshold or the argmax. Used by predict.py for tiles and by scene.py for scenes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np
import torch
from torch import nn

from config import Config
from data_preprocess import parse_bands, picked_for_colour
from files import DataError
from net_structure import encoder_of, fold_batchnorm, model_from_config
from runtime import available_memory, memory_format
from training import ARCHITECTURE_KEYS

LOG = logging.getLogger("inference")
NETWORK_KEYS = (*ARCHITECTURE_KEYS, "normalise")  # keys a model file decides at prediction, whatever is given


def warn_network_keys(
    cfg: Config, given: Collection[str], saved: dict[str, Any], model_file: object, exported: bool = False
) -> None:
    """Warn of network keys (NETWORK_KEYS) given on the command line with another value
    than the model file's: the network is always the one the file records, so ``--encoder=resnet18`` or
    ``--base_width=32`` given to predict.py would otherwise be ignored without a word. A key a checkpoint lacks
    (one saved before the key) has its default; one an ``exported`` model's metadata lacks (normalise, which is
    inside its graph) is unknown, and not warned of."""
    defaults = Config()
    ignored = [
        key
        for key in NETWORK_KEYS
        if key in given
        and not (exported and key not in saved)
        and getattr(cfg, key) != saved.get(key, getattr(defaults, key))
        and not (key == "downscale" and cfg.downscale == 0)  # auto stands for the run's own choice
    ]
    if ignored:
        LOG.warning(
            "%s ignored: the network is %s's own (%s); train again to change it",
            ", ".join(f"--{key}={getattr(cfg, key)}" for key in ignored),
            model_file,
            ", ".join(f"{key}={saved.get(key, getattr(defaults, key))}" for key in ignored),
        )


def checkpoint_file(cfg: Config) -> Path:
    """The checkpoint a command predicts or exports with: ``checkpoint`` where given, else the run's best weights
    (run_dir/checkpoints/best.pth)."""
    return Path(cfg.checkpoint) if cfg.checkpoint else Path(cfg.run_dir) / "checkpoints" / "best.pth"


def model_from_checkpoint(state: dict[str, Any], device: torch.device, channels_last: bool = True) -> nn.Module:
    """Rebuild the network with the architecture stored in a checkpoint (a U-Net where it names no encoder)
    and load its weights."""
    saved = state["config"]
    encoder = encoder_of(saved)
    model = model_from_config(saved)
    weights = dict(state["model"])
    # Checkpoints written before normalisation was stored in the network: identity normalisation, as trained.
    weights.setdefault("band_mean", model.band_mean)
    weights.setdefault("band_std", model.band_std)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # weights that do not fit the architecture the checkpoint itself declares
        network = "a U-Net" if encoder == "unet" else f"a {encoder} U-Net"
        plain, resnet = "inc.block.0.weight" in weights, "encoder.conv1.weight" in weights
        found = "a plain U-Net's" if plain else "a ResNet encoder's" if resnet else "another network's"
        detail = " ".join(str(err).split())[:300]  # torch's message spans lines and names every key
        raise DataError(
            f"checkpoint weights do not fit {network} of its own config (encoder={encoder}): the weights are "
            f"{found}; the file was altered or mixed up with another run's: use the checkpoint train.py wrote "
            f"({detail})"
        ) from None
    return model.to(device, memory_format=memory_format(channels_last))


VALUE_SCALE_LIMIT = 4.0  # input band means this many times above or below the training tiles' are another product


def training_means(model: torch.nn.Module, state: dict) -> np.ndarray | None:
    """The training tiles' band means (scaled to [0, 1] as tiles are: 8-bit / 255, 16-bit / 65535): the network's
    with normalise, else those the checkpoint keeps beside it (``band_means``); None where there are none (a
    checkpoint trained without normalise before they were kept, or an ONNX model exported before it carried them)."""
    trained = getattr(model, "band_mean", None)
    if state["config"].get("normalise") and isinstance(trained, torch.Tensor) and bool(trained.any()):
        return trained.detach().cpu().float().numpy()
    # Without normalise the network holds none (zeros, or ImageNet's with encoder_weights): the checkpoint's own.
    kept = state.get("band_means")
    return np.asarray(kept, dtype=np.float32) if kept else None


def other_band_count(count: int, path: Path, state: dict, bands_given: bool) -> str | None:
    """The warning for an input of ``count`` bands (data_preprocess.colour_band_count) fed the training's bands
    though the training tiles had another count (the checkpoint's ``tile_bands``): bands 3,2,1 of B,G,R,NIR tiles,
    taken from an R,G,B product, are its B,G,R. None where the counts agree or are unknown, where the training
    picked no bands, or where the user named this input's bands (``bands_given``: --bands, the fix it asks for)."""
    tile_bands, trained = state.get("tile_bands"), str(state["config"].get("bands", ""))
    if not tile_bands or count == tile_bands or not parse_bands(trained) or bands_given:
        return None
    return (
        f"{path}: has {count} band(s), the training tiles {tile_bands}, of which the network took bands {trained}; "
        f"it takes bands {trained} of this file too, right only where they hold the same colours here (bands 3,2,1 "
        "of a B,G,R,NIR sensor are 1,2,3 of its R,G,B product): give --bands with this file's numbers of them"
    )


def band_mean_ratio(model: torch.nn.Module, state: dict, means: np.ndarray) -> float | None:
    """The median over bands of ``means`` (an input's band means, scaled to [0, 1] as tiles are) over the training
    tiles' band means (training_means); None where the model keeps none, or keeps them for other bands."""
    trained = training_means(model, state)
    if trained is None or len(trained) != len(means):
        return None
    return float(np.median(means / trained))


def on_value_scale(ratio: float) -> bool:
    """Whether a ratio of band means to the training tiles' (band_mean_ratio) lies within VALUE_SCALE_LIMIT either
    way; beyond it, an 8-bit stretch predicted by a model trained on 16-bit DN, or the reverse, whose mask is not
    worth reading."""
    return 1 / VALUE_SCALE_LIMIT <= ratio <= VALUE_SCALE_LIMIT


OVERLAY_COLOUR = np.array([255, 220, 0], dtype=np.float32)  # farmland tint: yellow reads on green and brown


def overlay_image(image: np.ndarray, mask: np.ndarray, shown: Sequence[int] = ()) -> np.ndarray:
    """Blend the farmland tint over a (C, H, W) image, float in [0, 1] or uint8, its channels at ``shown`` as
    colour or grey (data_preprocess.shown_channels; by default the first three); return uint8 RGB."""
    photo = np.broadcast_to(image[picked_for_colour(image.shape[0], shown)].transpose(1, 2, 0), (*image.shape[1:], 3))
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


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a model takes its inputs in: that of its weights, float32 for a model without parameters
    (exported_model.OnnxSegmenter, whose graph holds its own weights)."""
    first = next(model.parameters(), None)
    return torch.float32 if first is None else first.dtype


@torch.inference_mode()
def network_logits(
    model: torch.nn.Module, images: torch.Tensor, device: torch.device, channels_last: bool = True
) -> torch.Tensor:
    """The network's class scores (N, n_classes, H, W), inputs moved to the device and cast to the weights'
    dtype and memory layout; uint8 inputs are scaled to [0, 1] there (in float32, as image_to_float does)."""
    dtype = input_dtype(model)
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
    augmentation) do not accumulate bf16 rounding. A model whose ``returns_probabilities`` is true (the
    exported network in onnxruntime, exported_model.OnnxSegmenter) has the softmax in its graph already.
    """
    scores = network_logits(model, images, device, channels_last).float()
    return scores if getattr(model, "returns_probabilities", False) else scores.softmax(1)


# The 8 symmetries of the square as (transpose, flip rows, flip columns); the first is the identity.
DIHEDRAL = [(t, v, h) for t in (False, True) for v in (False, True) for h in (False, True)]


def dihedral(x: torch.Tensor, transform: tuple[bool, bool, bool]) -> torch.Tensor:
    """Apply one symmetry of the square to the last two axes: flips, then the transpose."""
    transpose, flip_rows, flip_cols = transform
    dims = [d for d, on in ((-2, flip_rows), (-1, flip_cols)) if on]
    x = x.flip(dims) if dims else x
    return x.transpose(-1, -2) if transpose else x


def undo_dihedral(x: torch.Tensor, transform: tuple[bool, bool, bool]) -> torch.Tensor:
    """Invert ``dihedral``: the transpose, then the flips (each is its own inverse)."""
    transpose, flip_rows, flip_cols = transform
    x = x.transpose(-1, -2) if transpose else x
    dims = [d for d, on in ((-2, flip_rows), (-1, flip_cols)) if on]
    return x.flip(dims) if dims else x


def averaged_probabilities(
    model: torch.nn.Module, images: torch.Tensor, device: torch.device, channels_last: bool, tta: bool
) -> torch.Tensor:
    """Class probabilities (N, C, H, W) float32 on the CPU; with ``tta`` (test-time augmentation), the mean
    over the 8 symmetries of the square, each undone before averaging (probabilities, not classes, are
    averaged)."""
    if not tta:
        # Contiguous (N, C, H, W): a channels-last result would make every blending step a strided one.
        return predict_probabilities(model, images, device, channels_last).cpu().contiguous()
    total = torch.zeros(0)
    for transform in DIHEDRAL:
        turned = dihedral(images, transform).contiguous()
        probabilities = undo_dihedral(predict_probabilities(model, turned, device, channels_last).cpu(), transform)
        total = probabilities if not total.numel() else total + probabilities
    return (total / len(DIHEDRAL)).contiguous()


def decision_threshold(state: dict) -> float | None:
    """The farmland probability threshold a checkpoint carries (tuned on validation), or None for argmax."""
    value = state.get("threshold")
    return None if value is None else float(value)


def with_threshold(state: dict, threshold: float) -> dict:
    """The checkpoint state (or an exported model's, exported_model.state_from_metadata) with the ``threshold``
    key applied: a cut in (0, 1) replaces the tuned threshold or the argmax; -1 keeps the checkpoint's. Every
    prediction path (tiles, scenes, change, the ONNX backend) reads the threshold from the state, so this is the
    one place the user's cut enters, and it says so in the log.

    Raises:
        ValueError: a threshold neither -1 nor strictly between 0 and 1, or a model of more than two classes.
    """
    if threshold == -1:
        return state
    if not 0 < threshold < 1:
        raise ValueError(
            f"--threshold={threshold}: expected a farmland probability cut strictly between 0 and 1 (for example "
            "0.4), or -1 for the checkpoint's tuned threshold (the argmax where it has none)"
        )
    classes = state["config"]["n_classes"]
    if classes != 2:
        raise ValueError(f"--threshold cuts the farmland probability of a two-class model; this one has {classes}")
    tuned = decision_threshold(state)
    shown = "none: argmax" if tuned is None else f"{tuned:.3f}"
    LOG.info("farmland where its probability exceeds %.3f (--threshold; the model's own: %s)", threshold, shown)
    return {**state, "threshold": float(threshold), "threshold_source": "user"}


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
    tta: bool = False,
) -> np.ndarray:
    """Class indices (N, H, W) uint8 for a batch of images: argmax, or the farmland threshold when given; with
    ``tta``, of the probabilities averaged over the 8 flips and turns (averaged_probabilities)."""
    if tta:
        probabilities = averaged_probabilities(model, images, device, channels_last, True)
        return classes_from_probabilities(probabilities, threshold).numpy()
    if threshold is None:  # the argmax straight from the logits: no softmax pass needed
        scores = network_logits(model, images, device, channels_last)
    else:
        scores = predict_probabilities(model, images, device, channels_last)
    return classes_from_probabilities(scores, threshold).cpu().numpy()


BATCH_MOST = {"cpu": 4, "cuda": 128}  # choose_batch_size's largest batch on each device type


@torch.inference_mode()
def choose_batch_size(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device, requested: int) -> int:
    """The ``predict_batch_size`` key: as requested when > 0, else sized to half the device's free memory.

    On CUDA the memory of one tile is measured with a trial batch of two; on a CPU, where larger batches
    gain little (measured: batches of 4 beat 8 and 16), it is estimated from the widest activations, capped at 4.
    """
    if requested > 0:
        return requested
    dtype = input_dtype(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        model(torch.zeros((2, *shape), device=device, dtype=dtype))
        per_tile = max((torch.cuda.max_memory_allocated(device) - before) // 2, 1)
        free = torch.cuda.mem_get_info(device)[0]
        # Beyond about a hundred 256-pixel tiles a pass is long enough that per-batch costs vanish; larger
        # batches would only hold more memory in flight (loader workers' shared memory, pinned copies, writes).
        return int(max(1, min(BATCH_MOST["cuda"], free // 2 // per_tile)))
    width = model.outc.in_channels if hasattr(model, "outc") else model.base_width  # an OnnxSegmenter has no layers
    # The full-size level holds about 6 activations of `width` channels at once (convolutions, skip, concat).
    per_tile = 6 * width * shape[-2] * shape[-1] * torch.finfo(dtype).bits // 8
    free = available_memory() or 4 * 2**30
    return int(max(1, min(BATCH_MOST["cpu"], free // 2 // per_tile)))
