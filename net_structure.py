"""The reference U-Net: four max-pool downs, four transposed-convolution ups, skip concatenations.

Shapes follow the U-Net figure. With base width w, the encoder produces x1 (w channels, full size),
x2 (2w, 1/2), x3 (4w, 1/4), x4 (8w, 1/8) and x5 (16w, 1/16); the decoder climbs back, concatenating each
skip, and a 1x1 convolution gives one logit per class. Every convolution pads by reflection.

Any height and width are accepted: the input is reflect-padded up to a multiple of 16 (and at least 32,
so the 1/16 level is at least 2 pixels wide, as the reflect padding of its convolutions needs), and the
logits are cropped back to the input size. With ``downscale`` (resolution.py) the input is padded so in full
resolution, to those sizes times the factor, then shrunk; the logits are grown back before the crop.

build_model builds this U-Net (the ``encoder`` key's ``unet``) or the U-Net decoder over a ResNet-18/34 encoder
of encoders.py; the two BatchNorm foldings below hand the latter to encoders.fold_resnet_unet.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import resolution
from encoders import RESNET_LAYERS, ResNetUNet, fold_resnet_unet

LEAKY_SLOPE = 0.01  # of every LeakyReLU (torch's default)


class ReflectConv2d(nn.Conv2d):
    """nn.Conv2d padding by reflection, the padding done in the input's own dtype.

    CPU autocast runs reflection padding in fp32: under bf16 every activation was cast up, padded and cast
    back down for the convolution, and the same again for its gradient, a fifth of a width-16 training step.
    Reflecting only copies values, so the padded input, and the output, are the same.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(input.device.type, enabled=False):
            padded = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        return F.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)


class DoubleConv(nn.Module):
    """(3x3 conv with reflect padding, BatchNorm, Dropout2d, LeakyReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for channels_in in (in_channels, out_channels):
            layers += [
                ReflectConv2d(channels_in, out_channels, 3, padding=1, padding_mode="reflect", bias=False),
                nn.BatchNorm2d(out_channels),
                nn.Dropout2d(dropout),
                nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Down(nn.Module):
    """2x2 max-pool, then a double convolution."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(in_channels, out_channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    """2x2 transposed convolution (stride 2), concatenation with the skip, then a double convolution."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net for per-pixel classification of (N, in_channels, H, W) images into n_classes logits."""

    size_multiple = 16  # inputs are padded to a multiple of it (four 2x2 max-pools)
    min_side = 32  # and to at least this, so that the 1/16 level is 2 wide, as its reflect padding needs

    def __init__(
        self, in_channels: int = 3, n_classes: int = 2, base_width: int = 64, dropout: float = 0.3, downscale: int = 1
    ) -> None:
        super().__init__()
        if in_channels < 1 or n_classes < 2 or base_width < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(
                f"UNet: expected in_channels >= 1, n_classes >= 2, base_width >= 1 and 0 <= dropout < 1; "
                f"got {in_channels}, {n_classes}, {base_width}, {dropout}"
            )
        w = base_width
        self.in_channels = in_channels
        self.downscale = resolution.check_factor(downscale)  # the network works on tiles shrunk by this factor
        # Per-band input normalisation, computed on the training split by train.py and saved with the weights,
        # so prediction always standardises exactly as training did. Identity until set.
        self.register_buffer("band_mean", torch.zeros(in_channels))
        self.register_buffer("band_std", torch.ones(in_channels))
        self.inc = DoubleConv(in_channels, w, dropout)
        self.down1 = Down(w, 2 * w, dropout)
        self.down2 = Down(2 * w, 4 * w, dropout)
        self.down3 = Down(4 * w, 8 * w, dropout)
        self.down4 = Down(8 * w, 16 * w, dropout)
        self.up1 = Up(16 * w, 8 * w, dropout)
        self.up2 = Up(8 * w, 4 * w, dropout)
        self.up3 = Up(4 * w, 2 * w, dropout)
        self.up4 = Up(2 * w, w, dropout)
        self.outc = nn.Conv2d(w, n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet: expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}; "
                "check in_channels against the images' band count"
            )
        x = (x - self.band_mean[:, None, None]) / self.band_std[:, None, None]
        return resolution.run_at_scale(self.body, x, self.downscale, self.size_multiple, self.min_side)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """The layers of the U-Net figure on an input already normalised and padded to a multiple of 16."""
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)


def set_normalisation(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
    """Store per-band mean and standard deviation (of the [0, 1] scaled input) in the network.

    Raises:
        ValueError: the lengths differ from the network's bands, or a deviation is not positive.
    """
    if len(mean) != model.in_channels or len(std) != model.in_channels or min(std) <= 0:
        raise ValueError(
            f"normalisation: expected {model.in_channels} means and {model.in_channels} positive deviations, "
            f"got {list(mean)} and {list(std)}"
        )
    with torch.no_grad():
        model.band_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        model.band_std.copy_(torch.as_tensor(std, dtype=torch.float32))


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


ENCODERS = ("unet", *RESNET_LAYERS)  # the ``encoder`` key's values: the reference U-Net, or a ResNet encoder


def encoder_of(config: dict) -> str:
    """The encoder a checkpoint's config names; checkpoints written before the key existed hold a U-Net."""
    return str(config.get("encoder") or "unet")


def downscale_of(config: dict) -> int:
    """The working-resolution factor a checkpoint's config names; checkpoints written before the key existed
    worked at full resolution.

    Raises:
        ValueError: a value that is no factor (training stores the factor that auto chose, never 0).
    """
    return resolution.check_factor(config.get("downscale", 1))


def padding_of(encoder: str, downscale: int = 1) -> tuple[int, int]:
    """(grid, minimum) in input pixels: the network pads each input side to a multiple of grid (16 for the
    U-Net, 32 for a ResNet encoder, times ``downscale``) and to at least minimum (resolution.pad_to_grid)."""
    network = UNet if encoder == "unet" else ResNetUNet
    return network.size_multiple * downscale, network.min_side * downscale


def input_padding(config: dict) -> tuple[int, int]:
    """padding_of the network a config (a checkpoint's) describes."""
    return padding_of(encoder_of(config), downscale_of(config))


def smallest_batch(encoder: str, height: int, width: int, downscale: int = 1) -> int:
    """The fewest tiles of height x width a training batch may hold: BatchNorm needs two values per channel,
    and a ResNet encoder's deepest map of a tile of 32 px or less (times ``downscale``) is one cell (the
    U-Net's, padded to at least two grid cells, is 2 x 2 or more)."""
    grid, minimum = padding_of(encoder, downscale)
    cells = [resolution.padded_side(side, grid, minimum) // grid for side in (height, width)]
    return 2 if cells[0] * cells[1] == 1 else 1


def build_model(
    in_channels: int, n_classes: int, base_width: int, dropout: float, encoder: str = "unet", downscale: int = 1
) -> nn.Module:
    """Build the network from config values (one place, so train.py and predict.py agree): the reference U-Net,
    or a U-Net decoder over a ResNet-18/34 encoder (encoders.py), working at 1/``downscale`` resolution.

    Raises:
        ValueError: an unknown encoder or downscale factor, with the valid ones.
    """
    if encoder == "unet":
        return UNet(in_channels, n_classes, base_width, dropout, downscale)
    if encoder not in RESNET_LAYERS:
        raise ValueError(f"--encoder={encoder!r}: expected one of {', '.join(ENCODERS)}")
    return ResNetUNet(encoder, in_channels, n_classes, base_width, dropout, downscale)


def model_from_config(config: dict) -> nn.Module:
    """build_model with the values a run's config (a checkpoint's ``config``) holds."""
    shape = (config["in_channels"], config["n_classes"], config["base_width"], config.get("dropout", 0.0))
    return build_model(*shape, encoder_of(config), downscale_of(config))


def reflect_border_(padded: torch.Tensor) -> torch.Tensor:
    """Fill the one-pixel ring of an (N, C, H + 2, W + 2) buffer in place by reflecting its interior, as
    ``F.pad(interior, (1, 1, 1, 1), mode="reflect")`` would; return the buffer."""
    padded[..., 0, 1:-1] = padded[..., 2, 1:-1]
    padded[..., -1, 1:-1] = padded[..., -3, 1:-1]
    padded[..., 0] = padded[..., 2]  # columns last, so the corners reflect the reflected rows
    padded[..., -1] = padded[..., -3]
    return padded


def padded_buffer(like: torch.Tensor, channels: int) -> torch.Tensor:
    """An empty (N, channels, H + 2, W + 2) buffer with the dtype, device and memory layout of ``like``."""
    n, _, height, width = like.shape
    layout = torch.channels_last if like.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return torch.empty((n, channels, height + 2, width + 2), dtype=like.dtype, device=like.device, memory_format=layout)


class FoldedDoubleConv(nn.Module):
    """DoubleConv for inference: each BatchNorm folded into its convolution, Dropout dropped, and the first
    activation written straight into the reflect-padded buffer that the second convolution reads.

    The convolutions themselves do not pad: padding by reflection would otherwise copy every activation once
    more, which on a CPU cost about a tenth of the network's time.
    """

    def __init__(self, first: nn.Conv2d, second: nn.Conv2d) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_padded(F.pad(x, (1, 1, 1, 1), mode="reflect"))

    def forward_padded(self, padded: torch.Tensor) -> torch.Tensor:
        """The block on an input already reflect-padded by one pixel on each side."""
        hidden = F.conv2d(padded, self.first.weight, self.first.bias)
        buffer = padded_buffer(hidden, hidden.shape[1])
        interior = buffer[..., 1:-1, 1:-1]
        if torch.is_grad_enabled() and hidden.requires_grad:
            interior.copy_(F.leaky_relu(hidden, LEAKY_SLOPE))  # autograd cannot follow an out= argument
        else:
            torch.ops.aten.leaky_relu.out(hidden, LEAKY_SLOPE, out=interior)
        del hidden  # freed before the second convolution allocates its output
        out = F.conv2d(reflect_border_(buffer), self.second.weight, self.second.bias)
        return F.leaky_relu(out, LEAKY_SLOPE, inplace=True)


class FoldedUp(nn.Module):
    """Up for inference: the skip and the upsampled map are copied once, side by side, into the padded buffer
    of the folded double convolution (the concatenation and the padding in one pass)."""

    def __init__(self, up: nn.ConvTranspose2d, conv: FoldedDoubleConv) -> None:
        super().__init__()
        self.up = up
        self.conv = conv

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        upsampled = self.up(x)
        buffer = padded_buffer(upsampled, skip.shape[1] + upsampled.shape[1])
        buffer[:, : skip.shape[1], 1:-1, 1:-1] = skip
        buffer[:, skip.shape[1] :, 1:-1, 1:-1] = upsampled
        return self.conv.forward_padded(reflect_border_(buffer))


def fold_conv(conv: nn.Conv2d, norm: nn.BatchNorm2d, padded: bool = False) -> nn.Conv2d:
    """A biased convolution equal to ``norm(conv(x))`` in eval mode: without padding (for input padded
    beforehand) or, with ``padded``, with the convolution's own padding."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    shape = {"padding": conv.padding, "padding_mode": conv.padding_mode} if padded else {}
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, bias=True, **shape)
    fused = fused.to(conv.weight.device)
    fused.weight.copy_(conv.weight * scale[:, None, None, None])
    fused.bias.copy_(norm.bias - norm.running_mean * scale)
    return fused


def fold_double_conv(block: DoubleConv) -> FoldedDoubleConv:
    """The inference form of one DoubleConv (conv, BatchNorm, Dropout2d, LeakyReLU, twice)."""
    convs = [layer for layer in block.block if isinstance(layer, nn.Conv2d)]
    norms = [layer for layer in block.block if isinstance(layer, nn.BatchNorm2d)]
    slopes = {layer.negative_slope for layer in block.block if isinstance(layer, nn.LeakyReLU)}
    if not (len(convs) == len(norms) == 2 and slopes == {LEAKY_SLOPE} and all(c.bias is None for c in convs)):
        raise TypeError(
            f"cannot fold {type(block).__name__}: expected two bias-free convolutions, each followed by BatchNorm, "
            f"and LeakyReLU({LEAKY_SLOPE}); found {len(convs)} convolutions, {len(norms)} BatchNorms, slopes {slopes}. "
            "Predict with the unfolded network, or fold only networks built by build_model"
        )
    return FoldedDoubleConv(fold_conv(convs[0], norms[0]), fold_conv(convs[1], norms[1]))


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Return an inference copy of the network: each BatchNorm folded into the convolution before it,
    each Dropout2d dropped, padding and concatenation written into the buffers the convolutions read.

    In eval mode BatchNorm is a fixed per-channel affine map and Dropout2d the identity, so the copy computes
    the same function (to float rounding) with fewer passes over memory per convolution. For prediction
    only: the copy has no BatchNorm statistics left to train. A ResNet-encoder network is folded by
    encoders.fold_resnet_unet.
    """
    if isinstance(model, ResNetUNet):
        return fold_resnet_unet(model)
    folded = copy.deepcopy(model).eval()
    folded.inc = fold_double_conv(folded.inc)
    for down in (folded.down1, folded.down2, folded.down3, folded.down4):
        down.conv = fold_double_conv(down.conv)
    for name in ("up1", "up2", "up3", "up4"):
        up = getattr(folded, name)
        setattr(folded, name, FoldedUp(up.up, fold_double_conv(up.conv)))
    return folded


@torch.no_grad()
def fold_batchnorm_plain(model: nn.Module) -> nn.Module:
    """Return an inference copy of the network with each BatchNorm folded into the convolution before it and
    each Dropout2d replaced by the identity, built from plain modules only (convolutions keep their own
    reflect padding): the form that ``torch.onnx.export`` traces, where fold_batchnorm's buffer tricks
    (``out=`` arguments, in-place writes into padded buffers) do not. A ResNet-encoder network is folded by
    encoders.fold_resnet_unet, whose copy is of plain modules already.
    """
    if isinstance(model, ResNetUNet):
        return fold_resnet_unet(model)
    folded = copy.deepcopy(model).eval()
    for block in folded.modules():
        if not isinstance(block, DoubleConv):
            continue
        layers = list(block.block)
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Conv2d) and i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d):
                layers[i], layers[i + 1] = fold_conv(layer, layers[i + 1], padded=True), nn.Identity()
            elif isinstance(layer, nn.Dropout2d):
                layers[i] = nn.Identity()
        block.block = nn.Sequential(*layers)
    return folded
