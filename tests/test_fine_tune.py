"""init_weights: a run started from another run's checkpoint (fine-tuning), its checks and its normalisation."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import args, close_log_files, weights

import split_dataset
import train
from config import Config
from files import DataError
from net_structure import build_model
from runtime import Distributed, load_checkpoint
from training import load_farmland_weights

BUFFERS = ("band_mean", "band_std")


def source_config(trained_run: Path) -> Config:
    """The trained run's own config, pointed at its best.pth as the weights to start from."""
    saved = load_checkpoint(trained_run / "checkpoints" / "best.pth")["config"]
    known = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in saved.items() if k in known})
    return dataclasses.replace(cfg, init_weights=str(trained_run / "checkpoints" / "best.pth"))


def fresh_model(cfg: Config) -> torch.nn.Module:
    """A network of ``cfg``'s architecture, seeded otherwise than the trained one."""
    torch.manual_seed(123)
    return build_model(cfg.in_channels, cfg.n_classes, cfg.base_width, cfg.dropout, cfg.encoder, cfg.downscale)


def test_every_weight_is_the_checkpoint_s_and_normalise_keeps_this_run_s_bands(trained_run: Path) -> None:
    cfg = source_config(trained_run)
    saved = weights(trained_run / "checkpoints" / "best.pth")
    saved["band_mean"] = torch.tensor([0.1, 0.2, 0.3])  # as a normalised run would have kept
    saved["band_std"] = torch.tensor([0.5, 0.5, 0.5])
    source = trained_run.parent / "normalised.pth"
    state = load_checkpoint(trained_run / "checkpoints" / "best.pth")
    torch.save(state | {"model": saved}, source)
    try:
        for normalise in (False, True):
            model = fresh_model(cfg)
            own = {key: model.state_dict()[key].clone() for key in BUFFERS}
            run_cfg = dataclasses.replace(cfg, init_weights=str(source), normalise=normalise)
            assert load_farmland_weights(model, run_cfg) == len(saved)
            loaded = model.state_dict()
            for key, value in saved.items():
                expected = own[key] if normalise and key in BUFFERS else value
                assert torch.equal(loaded[key], expected), key
    finally:
        source.unlink()


def test_another_architecture_is_refused_naming_the_file_and_the_fix(trained_run: Path) -> None:
    cfg = source_config(trained_run)
    wider = dataclasses.replace(cfg, base_width=cfg.base_width * 2, encoder="unet")
    with pytest.raises(
        DataError,
        match=r"best\.pth: a network of base_width=4, but this run builds base_width=8; "
        r"give --base_width=4 to fine-tune it",
    ):
        load_farmland_weights(fresh_model(wider), wider)


@pytest.mark.parametrize("encoder", ["unet", "resnet18"])
def test_a_run_of_more_bands_widens_the_first_filters_with_normalise_only(
    trained_run: Path, tmp_path: Path, encoder: str
) -> None:
    three = dataclasses.replace(source_config(trained_run), encoder=encoder, base_width=8)
    source = tmp_path / "rgb.pth"
    torch.save({"model": fresh_model(three).state_dict(), "config": dataclasses.asdict(three)}, source)
    four = dataclasses.replace(three, in_channels=4, init_weights=str(source))
    with pytest.raises(
        DataError,
        match=r"give --in_channels=3 to fine-tune it on 3 of your bands \(--bands\), or "
        r"--normalise=true to add bands",
    ):
        load_farmland_weights(fresh_model(four), four)
    four = dataclasses.replace(four, normalise=True)
    model = fresh_model(four)
    load_farmland_weights(model, four)
    first = "inc.block.0.weight" if encoder == "unet" else "encoder.conv1.weight"
    rgb, widened = weights(source)[first], model.state_dict()[first]
    assert widened.shape[1] == 4 and torch.equal(widened[:, :3], rgb)
    assert torch.allclose(widened[:, 3], rgb.mean(dim=1))


def test_a_file_that_is_not_a_checkpoint_is_refused(trained_run: Path, tmp_path: Path) -> None:
    cfg = source_config(trained_run)
    missing = dataclasses.replace(cfg, init_weights=str(tmp_path / "typo.pth"))
    with pytest.raises(DataError, match=r"--init_weights=.*typo\.pth: no such file; give the checkpoint") as caught:
        load_farmland_weights(fresh_model(cfg), missing)
    assert "--checkpoint" not in str(caught.value)  # prediction's key, no use to train.py
    for content, found in ((b"", "an empty file"), (b"not torch", "not a loadable checkpoint")):
        (tmp_path / "start.pth").write_bytes(content)
        with pytest.raises(DataError, match=f"start.pth: {found}"):
            load_farmland_weights(fresh_model(cfg), dataclasses.replace(cfg, init_weights=str(tmp_path / "start.pth")))


def test_another_working_resolution_is_warned_of(trained_run: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = dataclasses.replace(source_config(trained_run), pixel_size_m=1.0, downscale=1)
    source = trained_run.parent / "metres.pth"
    state = load_checkpoint(trained_run / "checkpoints" / "best.pth")
    torch.save(state | {"config": state["config"] | {"pixel_size_m": 1.0, "downscale": 4}}, source)
    try:
        with caplog.at_level(logging.WARNING, logger="train"):
            load_farmland_weights(fresh_model(cfg), dataclasses.replace(cfg, init_weights=str(source)))
    finally:
        source.unlink()
    assert "learned at 4 m per working pixel and this run works at 1 m: fields look 4 times as large" in caplog.text


def test_under_torchrun_rank_0_alone_warns_of_another_working_resolution(
    trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "metres.pth"
    state = load_checkpoint(trained_run / "checkpoints" / "best.pth")
    torch.save(state | {"config": state["config"] | {"pixel_size_m": 1.0, "downscale": 4}}, source)
    cfg = dataclasses.replace(source_config(trained_run), pixel_size_m=1.0, downscale=1, init_weights=str(source))
    for rank, warned in ((1, False), (0, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            train.build_network(cfg, None, Distributed(rank=rank, world=2), torch.contiguous_format)
        assert ("learned at 4 m per working pixel" in caplog.text) == warned, rank


def test_a_run_fine_tunes_resumes_without_the_file_and_refuses_imagenet_weights_beside_it(
    trained_run: Path, shared_square_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    start = Path(shutil.copy(trained_run / "checkpoints" / "best.pth", tmp_path / "start.pth"))
    run_dir = tmp_path / "tuned"
    assert split_dataset.main(args(shared_square_data, run_dir)) == 0
    with pytest.raises(ValueError, match="a network starts from one or the other; drop --encoder_weights"):
        train.main(args(shared_square_data, run_dir, f"--init_weights={start}", "--encoder_weights=x.pth"))
    with caplog.at_level(logging.INFO, logger="train"):
        assert train.main(args(shared_square_data, run_dir, f"--init_weights={start}", "--epochs=1", "--lr=0")) == 0
    assert f"started from {start}: " in caplog.text
    first = load_checkpoint(run_dir / "checkpoints" / "last.pth")
    assert first["config"]["init_weights"] == str(start)
    # lr=0: the convolutions are still the checkpoint's (BatchNorm statistics move in training).
    assert torch.equal(first["model"]["inc.block.0.weight"], weights(start)["inc.block.0.weight"])
    start.unlink()  # resuming reads last.pth, never the starting file again
    resumed = args(shared_square_data, run_dir, f"--init_weights={start}", "--epochs=2", "--lr=0", "--resume=true")
    assert train.main(resumed) == 0
    assert [h["epoch"] for h in load_checkpoint(run_dir / "checkpoints" / "last.pth")["history"]] == [1, 2]
    close_log_files()


def test_a_missing_file_or_another_network_is_refused_before_any_tile_is_read(
    trained_run: Path, tmp_path: Path
) -> None:
    cfg = dataclasses.replace(source_config(trained_run), recipe="recommended", normalise=True, epochs=1)
    with pytest.raises(DataError, match=r"typo\.pth: no such file"):
        train.check_settings(dataclasses.replace(cfg, init_weights=str(tmp_path / "typo.pth")))
    with pytest.raises(DataError, match=r"a network of base_width=4, but this run builds base_width=8"):
        train.check_settings(dataclasses.replace(cfg, base_width=8))
    train.check_settings(cfg)
    train.check_settings(dataclasses.replace(cfg, base_width=8, resume=True))  # a resumed run reads last.pth alone
