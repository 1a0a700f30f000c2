"""ResNet-18 and ResNet-34 encoders under a U-Net decoder, the ImageNet weights that start them, and their
BatchNorm folding for prediction.

The encoder is written here (torchvision cannot be installed everywhere this project runs), layer for layer as
torchvision's ``resnet18`` / ``resnet34``: conv1 (7x7, stride 2), bn1, relu, maxpool, then layer1..layer4 of
BasicBlocks, the first block of layer2..layer4 striding by 2 with a 1x1 ``downsample``. Its state dict has
exactly torchvision's keys and shapes without ``fc.*``, so torchvision's ImageNet files load as they are
(docs/encoders.md). Its channel widths are always ResNet's (64, 64, 128, 256, 512): ``base_width`` sizes the
decoder only, which keeps every pretrained file loadable whatever the width.

Shapes: x1 is the stem's relu output (64 channels, 1/2), x2 layer1 (64, 1/4), x3 layer2 (128, 1/8), x4 layer3
(256, 1/16), x5 layer4 (512, 1/32). The decoder climbs back as the U-Net's does: each step doubles the size
(nearest neighbour), concatenates the skip of that size and applies two (3x3 conv, BatchNorm, Dropout2d, ReLU);
a last step without a skip reaches full size, and a 1x1 convolution gives one logit per class. Decoder widths
are 4w, 2w, w, w/2, w/4 for base width w: w = 64 gives segmentation_models.pytorch's default decoder
(256, 128, 64, 32, 16), w = 16 a light one (64, 32, 16, 8, 4). Convolutions pad with zeros, as ResNet's do.

Any height and width are accepted: the input is reflect-padded up to a multiple of 32 (the encoder's stride;
times ``downscale``, before the shrink, see resolution.py) and the logits are cropped back, as the U-Net does
with 16. Scenes, whose windows must all see the scene on one pooling grid, need windows and overlaps that are
multiples of that (scene.SceneSettings checks it).
"""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import resolution
from files import DataError

RESNET_LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}  # BasicBlocks in layer1..layer4
TORCHVISION_FILES = {"resnet18": "resnet18-f37072fd.pth", "resnet34": "resnet34-b627a593.pth"}  # IMAGENET1K_V1
ENCODER_WIDTHS = (64, 64, 128, 256, 512)  # channels of x1..x5: the stem, layer1..layer4
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the RGB statistics torchvision's ImageNet weights were trained with
IMAGENET_STD = (0.229, 0.224, 0.225)
SIZE_MULTIPLE = 32  # the encoder's total stride: inputs are padded to a multiple of it


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: (3x3 conv, BN, ReLU, 3x3 conv, BN) plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class ResNetEncoder(nn.Module):
    """ResNet-18/34 without its classifier; ``forward`` returns the five skips x1..x5 (1/2 to 1/32)."""

    def __init__(self, name: str = "resnet34", in_channels: int = 3) -> None:
        super().__init__()
        if name not in RESNET_LAYERS:
            raise ValueError(f"ResNetEncoder: expected one of {', '.join(RESNET_LAYERS)}, got {name!r}")
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths = ENCODER_WIDTHS[1:]
        for i, (blocks, width) in enumerate(zip(RESNET_LAYERS[name], widths)):
            previous = widths[i - 1] if i else 64
            stride = 1 if i == 0 else 2
            layer = [BasicBlock(previous, width, stride)] + [BasicBlock(width, width) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x1 = self.relu(self.bn1(self.conv1(x)))
        x2 = self.layer1(self.maxpool(x1))
        x3 = self.layer2(x2)
        x4 = self.layer3(x3)
        x5 = self.layer4(x4)
        return [x1, x2, x3, x4, x5]


class DecoderBlock(nn.Module):
    """Nearest-neighbour upsampling to the skip's size, concatenation with the skip (if any), then
    (3x3 conv, BatchNorm, Dropout2d, ReLU) twice."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for channels_in in (in_channels + skip_channels, out_channels):
            layers += [
                nn.Conv2d(channels_in, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.Dropout2d(dropout),
                nn.ReLU(inplace=True),
            ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: Sequence[int] = ()) -> torch.Tensor:
        # Upsampled to the skip's own size rather than by a factor: no shape arithmetic for the ONNX tracer to prove.
        x = F.interpolate(x, size=tuple(skip.shape[-2:]) if skip is not None else tuple(size), mode="nearest")
        return self.block(x if skip is None else torch.cat([skip, x], dim=1))


def decoder_widths(base_width: int) -> tuple[int, ...]:
    """Channels of the five decoder steps (1/16 to full size) for base width w: 4w, 2w, w, w/2, w/4 (at least 1)."""
    return tuple(max(1, base_width * 4 // 2**i) for i in range(5))


class ResNetUNet(nn.Module):
    """U-Net over a ResNet-18/34 encoder for (N, in_channels, H, W) images into n_classes logits."""

    size_multiple = SIZE_MULTIPLE
    min_side = 0  # its convolutions pad with zeros: a one-cell deepest map works

    def __init__(
        self,
        encoder: str = "resnet34",
        in_channels: int = 3,
        n_classes: int = 2,
        base_width: int = 64,
        dropout: float = 0.3,
        downscale: int = 1,
    ) -> None:
        super().__init__()
        if in_channels < 1 or n_classes < 2 or base_width < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(
                f"ResNetUNet: expected in_channels >= 1, n_classes >= 2, base_width >= 1 and 0 <= dropout < 1; "
                f"got {in_channels}, {n_classes}, {base_width}, {dropout}"
            )
        self.encoder_name = encoder
        self.in_channels = in_channels
        self.downscale = resolution.check_factor(downscale)  # the network works on tiles shrunk by this factor
        # Per-band input normalisation, saved with the weights (as in net_structure.UNet). Identity until set:
        # train.py sets the split's statistics (normalise) or ImageNet's (encoder_weights).
        self.register_buffer("band_mean", torch.zeros(in_channels))
        self.register_buffer("band_std", torch.ones(in_channels))
        self.encoder = ResNetEncoder(encoder, in_channels)
        d = decoder_widths(base_width)
        skips = ENCODER_WIDTHS
        self.up1 = DecoderBlock(skips[4], skips[3], d[0], dropout)  # 1/32 -> 1/16, with layer3
        self.up2 = DecoderBlock(d[0], skips[2], d[1], dropout)  # -> 1/8, with layer2
        self.up3 = DecoderBlock(d[1], skips[1], d[2], dropout)  # -> 1/4, with layer1
        self.up4 = DecoderBlock(d[2], skips[0], d[3], dropout)  # -> 1/2, with the stem
        self.up5 = DecoderBlock(d[3], 0, d[4], dropout)  # -> full size, no skip
        self.outc = nn.Conv2d(d[4], n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResNetUNet: expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}; "
                "check in_channels against the images' band count"
            )
        x = (x - self.band_mean[:, None, None]) / self.band_std[:, None, None]
        return resolution.run_at_scale(self.body, x, self.downscale, SIZE_MULTIPLE, self.min_side)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder and decoder on an input already normalised and padded to a multiple of 32."""
        x1, x2, x3, x4, x5 = self.encoder(x)
        y = self.up1(x5, x4)
        y = self.up2(y, x3)
        y = self.up3(y, x2)
        y = self.up4(y, x1)
        y = self.up5(y, None, x.shape[-2:])
        return self.outc(y)


def imagenet_normalisation(in_channels: int) -> tuple[list[float], list[float]]:
    """Per-band mean and deviation matching torchvision's ImageNet weights: ImageNet's for bands 1-3 (taken as
    R, G, B), the mean of the three for every other band (a fourth NIR band, or each band of a 1- or 2-band
    image)."""
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    if in_channels < 3:
        return [mean] * in_channels, [std] * in_channels
    extra = in_channels - 3
    return list(IMAGENET_MEAN) + [mean] * extra, list(IMAGENET_STD) + [std] * extra


def first_conv_for_bands(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A first convolution's filters (out, bands, k, k), ImageNet's conv1 (64, 3, 7, 7) or a farmland network's
    first layer, adapted to ``in_channels`` bands.

    As many bands keep them. More: the extra bands (NIR beside R, G, B) get the mean of the others' filters. Fewer:
    every band gets the sum of them divided by the band count, so a uniform input answers as the filters answered
    the same value on all bands (a grey band gets exactly the response to a grey RGB image).
    """
    bands = weight.shape[1]
    if in_channels == bands:
        return weight.clone()
    if in_channels > bands:
        extra = weight.mean(dim=1, keepdim=True).expand(-1, in_channels - bands, -1, -1)
        return torch.cat([weight, extra], dim=1)
    return (weight.sum(dim=1, keepdim=True) / in_channels).expand(-1, in_channels, -1, -1).clone()


def torchvision_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of torchvision's ``name`` state dict without fc: those of a 3-band ResNetEncoder."""
    return {key: tuple(value.shape) for key, value in ResNetEncoder(name, 3).state_dict().items()}


def weights_in_file(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file (``weights_only``), unwrapped from ``state_dict`` or ``model``.

    Raises:
        DataError: the file is missing, cannot be loaded, or holds no state dict.
    """
    expected = f"expected a torchvision {name} state dict, e.g. {TORCHVISION_FILES[name]} (docs/encoders.md)"
    if not path.is_file():
        raise DataError(f"{path}: encoder weights not found; {expected}, or --encoder_weights= for random weights")
    if path.stat().st_size == 0:
        raise DataError(
            f"{path}: an empty file (0 bytes), as a download cut short leaves: download it again; {expected}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign or damaged files
        # A whole torch.save archive that weights_only refuses holds more than tensors: nothing was cut short.
        if zipfile.is_zipfile(path) and str(err).startswith("Weights only load failed"):
            raise DataError(
                f"{path}: holds Python objects besides tensors, which are not loaded (weights_only); a whole "
                "network saved with torch.save(model) is such a file: save its weights alone, "
                f"torch.save(model.state_dict(), path). {expected[0].upper()}{expected[1:]}"
            ) from None
        # torch's own text runs on about checkpoints in general: its first sentence says what failed.
        reason = str(err).split(". ")[0][:200]
        raise DataError(
            f"{path}: not a loadable weights file ({type(err).__name__}: {reason}); a file cut short or damaged in "
            f"a download fails so: download it again ({path.stat().st_size:,} bytes here). {expected[0].upper()}"
            f"{expected[1:]}"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: holds {type(state).__name__}, not a dict of tensors; {expected}")
    return {str(key).removeprefix("module."): value for key, value in state.items()}


def mismatches(weights: dict[str, torch.Tensor], name: str) -> tuple[list[str], list[str], list[str]]:
    """Keys of torchvision's ``name`` (fc ignored) missing from ``weights``, keys it does not have, and keys of
    another shape (each as 'key: expected (..), found (..)'). A missing ``num_batches_tracked`` is not counted:
    files saved by older torch lack it."""
    shapes = torchvision_shapes(name)
    present = {k: v for k, v in weights.items() if not k.startswith("fc.")}
    missing = [k for k in shapes if k not in present and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in present if k not in shapes]
    wrong = [
        f"{k}: expected {shapes[k]}, found {tuple(v.shape)}"
        for k, v in present.items()
        if k in shapes and tuple(v.shape) != shapes[k]
    ]
    return missing, unexpected, wrong


def few(items: Sequence[str], what: str) -> str:
    """'N what (first, second, third, ...)', or '' for no items."""
    if not items:
        return ""
    return f"{len(items)} {what} ({'; '.join(items[:3])}{'; ...' if len(items) > 3 else ''})"


def load_encoder_weights(model: nn.Module, path: Path) -> int:
    """Load torchvision's ImageNet weights of the model's encoder from ``path`` (the ``encoder_weights`` key);
    conv1 is adapted to the band count (first_conv_for_bands). Every key and shape is checked; ``fc.*`` is
    ignored. Returns the number of tensors loaded.

    Raises:
        ValueError: the model has no ResNet encoder.
        DataError: naming the file: missing, not loadable, or not the encoder's torchvision state dict (what
            was expected, what was found, the file to use).
    """
    if not isinstance(model, ResNetUNet):
        raise ValueError(
            f"--encoder_weights={path}: ImageNet weights are for the {' and '.join(RESNET_LAYERS)} encoders; "
            "add --encoder=resnet34 (or resnet18), or drop --encoder_weights"
        )
    name, path = model.encoder_name, Path(path)
    weights = weights_in_file(path, name)
    missing, unexpected, wrong = mismatches(weights, name)
    if missing or unexpected or wrong:
        fits = [other for other in RESNET_LAYERS if other != name and not any(mismatches(weights, other))]
        summaries = (few(missing, "key(s) missing"), few(unexpected, "unexpected"), few(wrong, "of another shape"))
        found = "; ".join(summary for summary in summaries if summary)
        hint = f" (it fits {fits[0]}: pass --encoder={fits[0]})" if fits else ""
        if not fits and any(key.startswith("encoder.") for key in weights):
            hint = (
                " (it holds a whole network, an encoder.* under other layers, as train.py's best.pth and last.pth "
                "do: --resume=true with that run's --run_dir goes on training it)"
            )
        raise DataError(
            f"{path}: not the weights of a {name} encoder: {found}{hint}; expected a torchvision {name} state dict, "
            f"e.g. {TORCHVISION_FILES[name]} (docs/encoders.md)"
        )
    target = model.encoder.state_dict()
    loaded = {k: v for k, v in weights.items() if k in target}
    loaded["conv1.weight"] = first_conv_for_bands(loaded["conv1.weight"].float(), model.in_channels)
    for key, value in target.items():
        loaded.setdefault(key, torch.zeros_like(value))  # num_batches_tracked of older files: a fresh count
    model.encoder.load_state_dict(loaded)
    return len(weights) - sum(k.startswith("fc.") for k in weights)


def fold_conv_bn(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """A biased convolution equal to ``norm(conv(x))`` in eval mode, with the convolution's stride and padding."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    fused.weight.copy_(conv.weight * scale[:, None, None, None])
    fused.bias.copy_((bias - norm.running_mean) * scale + norm.bias)
    return fused


def fold_sequential(block: nn.Sequential) -> nn.Sequential:
    """A Sequential with each (Conv2d, BatchNorm2d) pair folded into one convolution and Dropout2d removed."""
    layers = list(block)
    folded: list[nn.Module] = []
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.BatchNorm2d) and i and isinstance(layers[i - 1], nn.Conv2d):
            continue  # folded into the convolution before it
        if isinstance(layer, nn.Conv2d) and i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d):
            folded.append(fold_conv_bn(layer, layers[i + 1]))
        elif not isinstance(layer, nn.Dropout2d):
            folded.append(layer)
    return nn.Sequential(*folded)


@torch.no_grad()
def fold_resnet_unet(model: ResNetUNet) -> ResNetUNet:
    """Return an inference copy of the network: every BatchNorm folded into the convolution before it (the
    stem, each BasicBlock and its downsample, the decoder) and every Dropout2d dropped, in plain modules that
    ``torch.onnx.export`` also traces. In eval mode it computes the same function, to float rounding."""
    folded = copy.deepcopy(model).eval()
    encoder = folded.encoder
    encoder.conv1, encoder.bn1 = fold_conv_bn(encoder.conv1, encoder.bn1), nn.Identity()
    for block in encoder.modules():
        if isinstance(block, BasicBlock):
            block.conv1, block.bn1 = fold_conv_bn(block.conv1, block.bn1), nn.Identity()
            block.conv2, block.bn2 = fold_conv_bn(block.conv2, block.bn2), nn.Identity()
            if block.downsample is not None:
                block.downsample = fold_sequential(block.downsample)
    for up in (folded.up1, folded.up2, folded.up3, folded.up4, folded.up5):
        up.block = fold_sequential(up.block)
    return folded
