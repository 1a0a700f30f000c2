"""net_structure.py: shapes, the reference size, BatchNorm folding, memory layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inference import model_from_checkpoint
from net_structure import (
    FoldedDoubleConv,
    FoldedUp,
    UNet,
    build_model,
    count_parameters,
    fold_batchnorm,
    fold_double_conv,
    padded_buffer,
    reflect_border_,
    set_normalisation,
)


def test_reference_width_has_the_reference_parameter_count() -> None:
    assert count_parameters(UNet(3, 2, 64)) == 31_037_698


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 3, 37, 50), (1, 3, 64, 64), (1, 3, 17, 16)])
def test_any_height_and_width_come_back_at_input_size(shape: tuple[int, ...]) -> None:
    model = UNet(3, 2, 4).eval()
    assert model(torch.rand(shape)).shape == (shape[0], 2, *shape[2:])


def test_band_count_is_configurable_and_checked() -> None:
    assert UNet(4, 3, 4).eval()(torch.rand(1, 4, 32, 32)).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"expected input \(N, 3, H, W\), got \(1, 4, 32, 32\)"):
        UNet(3, 2, 4)(torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match="n_classes >= 2"):
        UNet(3, 1, 4)


def randomise_batchnorm(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics, as after training."""
    generator = torch.Generator().manual_seed(0)
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            n = layer.num_features
            layer.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            layer.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            layer.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            layer.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)


def test_folded_network_computes_the_same_function() -> None:
    torch.manual_seed(0)
    model = UNet(3, 2, 8, dropout=0.3).eval()
    randomise_batchnorm(model)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout2d)) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is left as it was
    assert sum(isinstance(m, FoldedDoubleConv) for m in folded.modules()) == 9
    assert sum(isinstance(m, FoldedUp) for m in folded.modules()) == 4
    # The folded convolutions read buffers padded beforehand: they must not pad again.
    assert all(m.padding == (0, 0) for m in folded.modules() if isinstance(m, nn.Conv2d))
    for shape in [(2, 3, 40, 48), (1, 3, 32, 32), (1, 3, 5, 7)]:
        x = torch.rand(shape)
        with torch.no_grad():
            expected = model(x)
            assert torch.allclose(folded(x), expected, atol=1e-5)
            channels_last = folded.to(memory_format=torch.channels_last)
            assert torch.allclose(channels_last(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)
            folded = folded.to(memory_format=torch.contiguous_format)
            without_grad = folded(x)
        # With gradients on, the activation is copied into the padded buffer (autograd cannot follow out=).
        assert torch.equal(folded(x).detach(), without_grad)


@pytest.mark.parametrize("shape", [(2, 5, 2, 3), (1, 3, 7, 9), (1, 16, 4, 4)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_reflect_border_fills_the_ring_as_reflect_padding_does(shape: tuple[int, ...], layout) -> None:
    x = torch.rand(shape).contiguous(memory_format=layout)
    buffer = padded_buffer(x, shape[1])
    assert buffer.shape == (shape[0], shape[1], shape[2] + 2, shape[3] + 2)
    assert buffer.is_contiguous(memory_format=layout)
    buffer[..., 1:-1, 1:-1] = x
    assert torch.equal(reflect_border_(buffer), F.pad(x, (1, 1, 1, 1), mode="reflect"))


def test_channels_last_gives_the_same_output() -> None:
    torch.manual_seed(0)
    model = UNet(3, 2, 8).eval()
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)


def test_normalisation_lives_in_the_network_and_survives_folding_and_old_checkpoints() -> None:
    torch.manual_seed(0)
    model = build_model(3, 2, 4, 0.0).eval()
    x = torch.rand(1, 3, 32, 32)
    mean, std = [0.2, 0.3, 0.4], [0.1, 0.2, 0.5]
    plain = model(((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]))
    set_normalisation(model, mean, std)
    assert torch.allclose(model(x), plain, atol=1e-6)
    assert torch.allclose(fold_batchnorm(model)(x), plain, atol=1e-4)
    state = {
        "model": {k: v for k, v in model.state_dict().items() if not k.startswith("band_")},
        "config": {"in_channels": 3, "n_classes": 2, "base_width": 4, "dropout": 0.0},
    }
    old = model_from_checkpoint(state, torch.device("cpu"), False)  # written before normalisation existed
    assert old.band_mean.tolist() == [0, 0, 0] and old.band_std.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="positive deviations"):
        set_normalisation(model, mean, [0.1, 0.0, 0.5])


def test_folding_refuses_a_block_it_does_not_know() -> None:
    block = build_model(3, 2, 4, 0.0).inc
    block.block[0].bias = nn.Parameter(torch.zeros(block.block[0].out_channels))
    with pytest.raises(TypeError, match="bias-free convolutions"):
        fold_double_conv(block)
