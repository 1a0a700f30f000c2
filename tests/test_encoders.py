"""encoders.py: torchvision's ResNet layout, ImageNet weight files loaded and checked, bands, folding, and the
pipeline (train, resume, predict, export) with a ResNet encoder."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import args, close_log_files, spread_probabilities_, square_tile, write_pair
from torch import nn

import export_onnx
import fast_path
import predict
import scene
import split_dataset
import train
from config import Config
from encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ResNetEncoder,
    ResNetUNet,
    decoder_widths,
    first_conv_for_bands,
    imagenet_normalisation,
    load_encoder_weights,
)
from fast_path import Candidate, training_timers
from files import DataError
from inference import (
    classes_from_probabilities,
    inference_model,
    input_dtype,
    model_from_checkpoint,
    predict_probabilities,
)
from net_structure import UNet, build_model, fold_batchnorm, fold_batchnorm_plain, padding_of, smallest_batch
from runtime import Distributed, load_checkpoint
from training import check_resumable

CPU = torch.device("cpu")


def torchvision_file(path: Path, name: str = "resnet18", seed: int = 0, wrapper: str = "") -> Path:
    """A stand-in for torchvision's ImageNet file of ``name``: its keys and shapes (our encoder's, plus fc as
    torchvision has), random values, saved as a plain state dict (or wrapped under ``wrapper``)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key, value in ResNetEncoder(name).state_dict().items():
        if key.endswith("num_batches_tracked"):
            weights[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            weights[key] = torch.rand(value.shape, generator=generator) + 0.5
        else:
            weights[key] = torch.randn(value.shape, generator=generator) * 0.1
    weights["fc.weight"] = torch.randn(1000, 512, generator=generator) * 0.01
    weights["fc.bias"] = torch.zeros(1000)
    torch.save({wrapper: weights} if wrapper else weights, path)
    return path


def test_the_state_dict_is_torchvision_s() -> None:
    resnet18, resnet34 = ResNetEncoder("resnet18").state_dict(), ResNetEncoder("resnet34").state_dict()
    # torchvision's resnet18: 122 keys with fc.weight and fc.bias; resnet34: 218.
    assert (len(resnet18) + 2, len(resnet34) + 2) == (122, 218)
    assert list(resnet18)[:7] == [
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "layer1.0.conv1.weight",
    ]
    shapes = {k: tuple(v.shape) for k, v in resnet34.items()}
    assert shapes["conv1.weight"] == (64, 3, 7, 7)
    assert shapes["layer1.0.conv1.weight"] == (64, 64, 3, 3)
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert shapes["layer2.0.downsample.1.running_var"] == (128,)
    assert shapes["layer3.5.bn2.weight"] == (256,)
    assert shapes["layer4.2.conv2.weight"] == (512, 512, 3, 3)
    assert not any(k.startswith("layer1.0.downsample") or k.startswith("layer3.6") for k in shapes)
    assert sum(k.endswith("downsample.0.weight") for k in shapes) == 3


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 3, 37, 50), (1, 3, 64, 64), (1, 3, 32, 96)])
def test_any_height_and_width_come_back_at_input_size(shape: tuple[int, ...]) -> None:
    model = ResNetUNet("resnet18", 3, 2, 4).eval()
    assert model(torch.rand(shape)).shape == (shape[0], 2, *shape[2:])


def test_build_model_takes_the_encoder_and_refuses_others() -> None:
    assert isinstance(build_model(3, 2, 4, 0.1), UNet)
    model = build_model(4, 3, 16, 0.1, "resnet34")
    assert isinstance(model, ResNetUNet) and model.encoder.conv1.weight.shape == (64, 4, 7, 7)
    assert model.outc.out_channels == 3 and decoder_widths(16) == (64, 32, 16, 8, 4)
    assert decoder_widths(64) == (256, 128, 64, 32, 16)
    assert (padding_of("unet")[0], padding_of("resnet18")[0]) == (16, 32)
    with pytest.raises(ValueError, match="--encoder='resnet50': expected one of unet, resnet18, resnet34"):
        build_model(3, 2, 4, 0.1, "resnet50")


def test_every_parameter_gets_a_gradient() -> None:
    """DistributedDataParallel needs no find_unused_parameters: the forward pass reaches every parameter."""
    torch.manual_seed(0)
    model = ResNetUNet("resnet18", 3, 2, 8).train()
    # Not the plain sum: in training mode a BatchNorm's outputs sum to a constant, which would zero the gradients.
    nn.functional.cross_entropy(model(torch.rand(2, 3, 64, 64)), torch.randint(0, 2, (2, 64, 64))).backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert sum(bool(p.grad.abs().sum()) for p in model.parameters()) > 0.9 * len(list(model.parameters()))


def test_imagenet_weights_load_and_change_the_outputs(tmp_path: Path) -> None:
    path = torchvision_file(tmp_path / "resnet18-f37072fd.pth", "resnet18")
    torch.manual_seed(0)
    model = ResNetUNet("resnet18", 3, 2, 4).eval()
    x = torch.rand(1, 3, 64, 64)
    before = model(x)
    assert load_encoder_weights(model, path) == 120  # all but fc
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.encoder.state_dict().items())
    assert not torch.allclose(model(x), before)
    # Wrapped under "state_dict" or "model", as other tools save them: the same weights.
    for wrapper in ("state_dict", "model"):
        other = ResNetUNet("resnet18", 3, 2, 4)
        load_encoder_weights(other, torchvision_file(tmp_path / f"{wrapper}.pth", "resnet18", wrapper=wrapper))
        assert torch.equal(other.encoder.layer4[1].bn2.running_var, saved["layer4.1.bn2.running_var"])


def altered(path: Path, change: str) -> Path:
    """The file at ``path`` with one key of another shape, removed, or added."""
    weights = torch.load(path, weights_only=True)
    if change == "shape":
        weights["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    elif change == "missing":
        del weights["layer4.1.conv2.weight"]
    else:
        weights["layer5.0.conv1.weight"] = torch.zeros(1)
    target = path.with_name(f"{change}.pth")
    torch.save(weights, target)
    return target


@pytest.mark.parametrize(
    ("change", "found"),
    [
        ("shape", r"1 of another shape \(layer1.0.conv1.weight: expected \(64, 64, 3, 3\), found \(64, 64, 5, 5\)\)"),
        ("missing", r"1 key\(s\) missing \(layer4.1.conv2.weight\)"),
        ("unexpected", r"1 unexpected \(layer5.0.conv1.weight\)"),
    ],
)
def test_a_mismatched_file_is_refused_naming_it_and_the_fix(tmp_path: Path, change: str, found: str) -> None:
    path = altered(torchvision_file(tmp_path / "weights.pth", "resnet18"), change)
    with pytest.raises(
        DataError,
        match=rf"{change}.pth: not the weights of a resnet18 encoder: {found}.*"
        r"expected a torchvision resnet18 state dict, e.g. resnet18-f37072fd.pth",
    ):
        load_encoder_weights(ResNetUNet("resnet18", 3, 2, 4), path)


def test_files_that_are_not_the_encoder_s_weights_are_refused(tmp_path: Path) -> None:
    model = ResNetUNet("resnet34", 3, 2, 4)
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(DataError, match=r"notes.pth: not a loadable weights file .*e.g. resnet34-b627a593.pth"):
        load_encoder_weights(model, tmp_path / "notes.pth")
    with pytest.raises(DataError, match=r"absent.pth: encoder weights not found; expected a torchvision resnet34"):
        load_encoder_weights(model, tmp_path / "absent.pth")
    torch.save({"model": ResNetUNet("resnet34", 3, 2, 4).state_dict(), "epoch": 3}, tmp_path / "best.pth")
    with pytest.raises(DataError, match=r"best.pth: not the weights .*\(it holds a whole network.*--resume=true"):
        load_encoder_weights(model, tmp_path / "best.pth")
    whole = torchvision_file(tmp_path / "whole.pth", "resnet34")
    (tmp_path / "cut.pth").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # a download cut short
    with pytest.raises(
        DataError,
        match=r"cut.pth: not a loadable weights file \(RuntimeError: [^;]*central directory\); a file cut short "
        r".* download it again \([0-9,]+ bytes here\)\. Expected a torchvision resnet34",
    ):
        load_encoder_weights(model, tmp_path / "cut.pth")
    (tmp_path / "empty.pth").write_bytes(b"")  # a download that wrote nothing read "(EOFError: )"
    with pytest.raises(DataError, match=r"empty.pth: an empty file \(0 bytes\), as a download cut short leaves"):
        load_encoder_weights(model, tmp_path / "empty.pth")
    torch.save(nn.Conv2d(3, 4, 3), tmp_path / "pickled.pth")  # a whole network, not a download cut short
    with pytest.raises(DataError, match=r"pickled.pth: holds Python objects besides tensors.*model.state_dict\(\)"):
        load_encoder_weights(model, tmp_path / "pickled.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(DataError, match=r"list.pth: holds list, not a dict of tensors"):
        load_encoder_weights(model, tmp_path / "list.pth")
    resnet18 = torchvision_file(tmp_path / "resnet18-f37072fd.pth", "resnet18")
    with pytest.raises(
        DataError,
        match=r"resnet18-f37072fd.pth: not the weights of a resnet34 encoder: 80 key\(s\) "
        r"missing .*\(it fits resnet18: pass --encoder=resnet18\)",
    ):
        load_encoder_weights(model, resnet18)
    with pytest.raises(ValueError, match="ImageNet weights are for the resnet18 and resnet34 encoders"):
        load_encoder_weights(UNet(3, 2, 4), resnet18)


def test_files_without_batch_counts_load(tmp_path: Path) -> None:
    """Files saved by older torch lack num_batches_tracked: they load, with fresh counts."""
    path = torchvision_file(tmp_path / "old.pth", "resnet18")
    weights = {k: v for k, v in torch.load(path, weights_only=True).items() if "num_batches_tracked" not in k}
    torch.save(weights, path)
    model = ResNetUNet("resnet18", 3, 2, 4)
    load_encoder_weights(model, path)
    assert int(model.encoder.bn1.num_batches_tracked) == 0


def test_other_band_counts_get_filters_from_the_rgb_ones(tmp_path: Path) -> None:
    path = torchvision_file(tmp_path / "resnet18.pth", "resnet18")
    rgb = torch.load(path, weights_only=True)["conv1.weight"]
    four = ResNetUNet("resnet18", 4, 2, 4)
    load_encoder_weights(four, path)
    conv = four.encoder.conv1.weight.detach()
    assert torch.equal(conv[:, :3], rgb) and torch.allclose(conv[:, 3], rgb.mean(1))
    one = ResNetUNet("resnet18", 1, 2, 4)
    load_encoder_weights(one, path)
    assert torch.allclose(one.encoder.conv1.weight.detach()[:, 0], rgb.sum(1))
    two = first_conv_for_bands(rgb, 2)
    assert two.shape == (64, 2, 7, 7) and torch.allclose(two.sum(1), rgb.sum(1))
    mean, std = imagenet_normalisation(4)
    assert mean[:3] == list(IMAGENET_MEAN) and mean[3] == pytest.approx(0.449)
    assert std[:3] == list(IMAGENET_STD) and std[3] == pytest.approx(0.226)
    assert imagenet_normalisation(1) == ([pytest.approx(0.449)], [pytest.approx(0.226)])


def test_normalisation_is_the_split_s_with_normalise_else_imagenet_s(tmp_path: Path) -> None:
    weights = str(torchvision_file(tmp_path / "resnet18.pth", "resnet18"))
    job, layout = Distributed(device=CPU), torch.contiguous_format
    statistics = ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [1, 1])
    resnet = {"encoder": "resnet18", "base_width": 4}
    split = train.build_network(Config(**resnet, normalise=True, encoder_weights=weights), statistics, job, layout)
    assert torch.allclose(split.band_mean, torch.tensor(statistics[0]))
    assert torch.allclose(split.band_std, torch.tensor(statistics[1]))
    imagenet = train.build_network(Config(**resnet, encoder_weights=weights), None, job, layout)
    assert torch.allclose(imagenet.band_mean, torch.tensor(IMAGENET_MEAN))
    random = train.build_network(Config(**resnet), None, job, layout)  # no weights: no normalisation, as the U-Net
    assert torch.equal(random.band_mean, torch.zeros(3)) and torch.equal(random.band_std, torch.ones(3))


def randomise_batchnorm(model: nn.Module) -> None:
    """Give every BatchNorm a random scale and shift and the running statistics of random images, as after
    training. (Random running statistics alone switch off most ReLUs of a small decoder: a constant output.)"""
    generator = torch.Generator().manual_seed(0)
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            n = layer.num_features
            layer.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            layer.bias.data.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
            layer.reset_running_stats()
            layer.momentum = None  # a plain average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(4, model.in_channels, 64, 64, generator=generator))
    model.eval()


@pytest.mark.parametrize("encoder", ["resnet18", "resnet34"])
def test_the_folded_network_computes_the_same_function(encoder: str) -> None:
    torch.manual_seed(0)
    model = ResNetUNet(encoder, 3, 2, 8, dropout=0.3).eval()
    randomise_batchnorm(model)
    for fold in (fold_batchnorm, fold_batchnorm_plain):
        folded = fold(model)
        assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout2d)) for m in folded.modules())
        assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is left as it was
        with torch.no_grad():
            for shape in [(2, 3, 64, 64), (1, 3, 37, 50), (1, 3, 5, 7)]:
                x = torch.rand(shape)
                expected = model(x)
                assert expected.std() > 0.05  # a network whose output varies, or the comparison proves nothing
                assert torch.allclose(folded(x), expected, atol=1e-4)  # measured: within 1e-5
                layout = torch.channels_last
                found = folded.to(memory_format=layout)(x.contiguous(memory_format=layout))
                assert torch.allclose(found, expected, atol=1e-4)


def tiny_state(encoder: str = "resnet18") -> dict:
    """A checkpoint state of a random, BatchNorm-randomised network of width 16 whose farmland probabilities
    spread over (0, 1). Not narrower: at width 4 the decoder's last stage has one channel and most pixels share
    one output, and at widths 4 and 8 spreading the rest multiplied the margin (and its rounding) by 100 to 1,000."""
    torch.manual_seed(0)
    model = build_model(3, 2, 16, 0.3, encoder)
    randomise_batchnorm(model)
    with torch.no_grad():
        spread_probabilities_(model, model(torch.rand(2, 3, 64, 64)))
    saved = {"in_channels": 3, "n_classes": 2, "base_width": 16, "dropout": 0.3, "encoder": encoder}
    return {"model": model.state_dict(), "config": saved}


def test_prediction_in_bf16_is_close_to_fp32() -> None:
    state = tiny_state()
    images = torch.rand(2, 3, 64, 64)
    fp32 = predict_probabilities(inference_model(state, CPU, True, None), images, CPU)
    reduced = inference_model(state, CPU, True, torch.bfloat16)
    assert input_dtype(reduced) is torch.bfloat16
    bf16 = predict_probabilities(reduced, images, CPU)
    assert not torch.equal(bf16, fp32)
    sure = (fp32[:, 1] - 0.5).abs() > 0.1  # pixels whose class bf16's rounding should not flip
    assert sure.float().mean() > 0.7  # probabilities spread over (0, 1), not all near 0.5
    # Measured with bf16 emulated on a CPU without it: mean difference 0.007 (max 0.10), every pixel of `sure`
    # (82 % of them) of the same class; the U-Net's alike.
    assert (bf16 - fp32).abs().mean() < 0.02 and (bf16 - fp32).abs().max() < 0.3
    agree = classes_from_probabilities(bf16) == classes_from_probabilities(fp32)
    assert agree[sure].float().mean() > 0.99


def test_checkpoints_without_an_encoder_are_u_nets() -> None:
    state = {
        "model": UNet(3, 2, 4).state_dict(),
        "config": {"in_channels": 3, "n_classes": 2, "base_width": 4, "dropout": 0.3},
    }
    assert isinstance(model_from_checkpoint(state, CPU), UNet)
    check_resumable(state, Config(base_width=4), Path("last.pth"))  # an old checkpoint resumes as a U-Net
    with pytest.raises(
        DataError,
        match=r"cannot resume, the network differs \(encoder: checkpoint unet vs config "
        "resnet18\\)",
    ):
        check_resumable(state, Config(base_width=4, encoder="resnet18"), Path("last.pth"))
    assert isinstance(model_from_checkpoint(tiny_state("resnet34"), CPU), ResNetUNet)


def test_scene_windows_follow_the_resnet_grid() -> None:
    scene.SceneSettings(window=512, overlap=128, grid=32).check()
    with pytest.raises(ValueError, match="--window=496: expected a multiple of 32, at least 32 .*ResNet encoder"):
        scene.SceneSettings(window=496, overlap=0, grid=32).check()
    with pytest.raises(ValueError, match="--overlap=48: expected a multiple of 32"):
        scene.SceneSettings(window=512, overlap=48, grid=32).check()


def test_train_resume_predict_and_export_with_a_resnet18_encoder(shared_square_data: Path, tmp_path: Path) -> None:
    data, run_dir = shared_square_data, tmp_path / "run"
    weights = torchvision_file(tmp_path / "resnet18-f37072fd.pth", "resnet18", seed=3)
    resnet = ["--encoder=resnet18", "--snapshot_every=0", "--tensorboard=false"]
    assert split_dataset.main(args(data, run_dir)) == 0
    assert train.main(args(data, run_dir, *resnet, f"--encoder_weights={weights}", "--epochs=1")) == 0
    first = load_checkpoint(run_dir / "checkpoints" / "last.pth")
    assert first["config"]["encoder"] == "resnet18"
    # normalise off: the ImageNet statistics the weights expect travel in the network.
    assert torch.allclose(first["model"]["band_mean"], torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(first["model"]["band_std"], torch.tensor(IMAGENET_STD))
    weights.unlink()  # resuming reads last.pth, never the ImageNet file again
    assert train.main(args(data, run_dir, *resnet, f"--encoder_weights={weights}", "--epochs=2", "--resume=true")) == 0
    assert [h["epoch"] for h in load_checkpoint(run_dir / "checkpoints" / "last.pth")["history"]] == [1, 2]
    with pytest.raises(DataError, match=r"\(encoder: checkpoint resnet18 vs config unet\).*drop --encoder"):
        train.main(args(data, run_dir, "--encoder=unet", "--epochs=3", "--resume=true"))
    assert predict.main(args(data, run_dir)) == 0
    masks = sorted((run_dir / "predictions").glob("*_seg.png"))
    assert len(masks) == 2
    with pytest.raises(ValueError, match="--window=80: expected a multiple of 32"):
        predict.main(args(data, run_dir, f"--predict_input={data / 'images'}", "--window=80", "--overlap=0"))
    assert export_onnx.main(args(data, run_dir, "--window=64", "--overlap=0")) == 0
    report = json.loads((run_dir / "export" / "export_report.json").read_text(encoding="utf-8"))
    assert report["float32"]["max_probability_difference"] < 1e-4
    close_log_files()


def test_a_unet_checkpoint_refuses_imagenet_weights(shared_square_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    split_dataset.main(args(shared_square_data, run_dir))
    weights = torchvision_file(tmp_path / "resnet18.pth", "resnet18")
    with pytest.raises(ValueError, match="add --encoder=resnet34 \\(or resnet18\\), or drop --encoder_weights"):
        train.main(args(shared_square_data, run_dir, f"--encoder_weights={weights}", "--epochs=1"))
    close_log_files()


def test_the_smallest_batch_batchnorm_trains_on() -> None:
    assert smallest_batch("resnet18", 32, 32) == 2  # the deepest map is one pixel
    assert smallest_batch("resnet34", 20, 32) == 2
    assert smallest_batch("resnet18", 33, 32) == 1  # padded to 64 x 32: two pixels
    assert smallest_batch("unet", 16, 16) == 1  # padded to 32: 2 x 2 at the bottom


def test_a_resnet_on_32px_tiles_refuses_batches_of_one_and_times_two(shared_square_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert split_dataset.main(args(shared_square_data, run_dir)) == 0
    with pytest.raises(ValueError, match=r"32x32-pixel tiles with batches of 1 .* use --batch_size=2 or more"):
        train.main(args(shared_square_data, run_dir, "--encoder=resnet18", "--batch_size=1", "--epochs=1"))
    close_log_files()
    # The fast path times the training batch, and never fewer tiles than BatchNorm trains on.
    cfg = Config(encoder="resnet18")
    assert (fast_path.timed_tiles(cfg, (3, 32, 32), 1), fast_path.timed_tiles(cfg, (3, 64, 64), 1)) == (2, 1)
    assert fast_path.timed_tiles(Config(), (3, 64, 64), 32) == fast_path.TIMED_TILES_MAX
    assert fast_path.timed_tiles(Config(), (3, 64, 64), 3) == 3  # a split of 3 tiles
    model = build_model(3, 2, 8, 0.0, "resnet18")
    screen, step = training_timers(model, nn.CrossEntropyLoss(), (3, 32, 32), 2, CPU, 2)
    assert step(Candidate(None, False)) > 0 and screen(Candidate(None, True)) > 0
    assert model.encoder.bn1.num_batches_tracked.item() == 0  # timed on copies


def test_the_batch_check_counts_ranks_under_sync_bn_and_names_too_few_tiles() -> None:
    cfg = Config(encoder="resnet18", batch_size=1)
    with pytest.raises(ValueError, match="use --batch_size=2 or more"):
        train.check_batch(cfg, (3, 32, 32), 100, 2)
    train.check_batch(Config(encoder="resnet18", batch_size=1, sync_bn=True), (3, 32, 32), 100, 2)  # 2 ranks' tiles
    train.check_batch(cfg, (3, 64, 64), 100, 1)  # a 2 x 2 deepest map trains on one tile
    with pytest.raises(ValueError, match=r"the training split holds 1 tile\(s\), 1 per process: add training tiles"):
        train.check_batch(Config(encoder="resnet34", batch_size=5), (3, 32, 32), 1, 1)


def test_the_batch_check_offers_a_finer_resolution_only_where_it_trains_on_one_tile() -> None:
    cfg = Config(encoder="resnet18", batch_size=1, downscale=2)
    with pytest.raises(ValueError, match="use --batch_size=2 or more") as refused:
        train.check_batch(cfg, (3, 32, 32), 100, 1)  # at full resolution still one pixel deep down: no way out
    assert "--downscale" not in str(refused.value)
    with pytest.raises(ValueError, match=r"--encoder=unet, or --downscale=1$"):
        train.check_batch(cfg, (3, 48, 48), 100, 1)  # padded to 64 at full resolution: two pixels
    with pytest.raises(ValueError, match=r"--encoder=unet, or --downscale=1$"):
        train.check_batch(dataclasses.replace(cfg, downscale=4), (3, 48, 48), 100, 1)  # 2 is not enough, 1 is


def test_dim_16_bit_tiles_under_imagenet_scaling_are_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 10-bit values in 16-bit files (as Gaofen-2 delivers them) fill 1.6 % of 0..1: after ImageNet's mean and
    # deviation every pixel is about -2.1, a flat image to the pretrained filters.
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for i in range(20):
        image, mask = square_tile(rng)
        write_pair(data, f"tile {i:02d}", image.astype(np.uint16) * 4, mask, ext=".tif")
    weights = torchvision_file(tmp_path / "resnet18-f37072fd.pth", "resnet18")
    resnet = ["--encoder=resnet18", "--snapshot_every=0", "--tensorboard=false", "--epochs=1"]
    for run, extra, warned in (("imagenet", [], True), ("own", ["--normalise=true"], False)):
        assert split_dataset.main(args(data, tmp_path / run)) == 0
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="train"):
            assert train.main(args(data, tmp_path / run, *resnet, f"--encoder_weights={weights}", *extra)) == 0
        close_log_files()
        found = [r.getMessage() for r in caplog.records if "brightest value" in r.getMessage()]
        assert bool(found) == warned, found
        if warned:
            assert re.search(r"brightest value is 0\.01[0-9]{2} of their type's range", found[0]), found[0]
            assert "add --normalise=true" in found[0]
