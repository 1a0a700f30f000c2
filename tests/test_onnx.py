"""ONNX export (export_onnx.py) and prediction with onnxruntime (predict.py --backend=onnx): the graph against
PyTorch's fp32 path, the metadata QGIS reads, the 8-bit copy's check, every output of predict.py, bad inputs."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import rasterio
import torch
from conftest import spread_probabilities_, square_tile, write_pair
from torch import nn

import cli
import demo_data
import export_onnx
import exported_model
import onnx_build
import onnx_quantize
import predict
from config import Config
from data_preprocess import read_image, write_image, write_pair_list
from files import DataError, shell_quoted
from inference import inference_model, predict_probabilities
from net_structure import build_model, set_normalisation
from runtime import save_checkpoint

CPU = torch.device("cpu")
THRESHOLD = 0.45  # a tuned threshold, as train.py stores it


def tiny_state(seed: int = 0, sample: np.ndarray | None = None) -> dict:
    """A width-4 network in this project's checkpoint format, with what the export must carry into the graph:
    BatchNorm statistics to fold, a per-band normalisation, a tuned threshold, a history; its output layer is
    rescaled so that its probabilities spread over (0, 1) on square tiles instead of sitting near 0.5.

    ``sample``: (N, C, H, W) images in [0, 1] to take the band count and the normalisation from (as train.py
    takes them from the training split) and to spread the probabilities on, instead of the square tiles.
    """
    if sample is None:
        tiles = np.stack([square_tile(np.random.default_rng(i), 64)[0] for i in range(4)]).transpose(0, 3, 1, 2)
        sample, mean, std = tiles.astype(np.float32) / 255, [0.45, 0.4, 0.35], [0.25, 0.2, 0.3]
    else:
        mean, std = sample.mean(axis=(0, 2, 3)).tolist(), sample.std(axis=(0, 2, 3)).tolist()
    torch.manual_seed(seed)
    model = build_model(sample.shape[1], 2, 4, 0.1)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.normal_(0, 0.1)
                layer.running_var.uniform_(0.5, 1.5)
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.normal_(0, 0.1)
        set_normalisation(model, mean, std)
        model.eval()
        spread_probabilities_(model, model(torch.from_numpy(sample)))
    history = [{"epoch": 3, "val_farmland_iou": 0.7, "val_threshold": THRESHOLD, "val_tuned_farmland_iou": 0.72}]
    config = {"in_channels": sample.shape[1], "n_classes": 2, "base_width": 4, "dropout": 0.1, "bands": ""}
    return {"model": model.state_dict(), "config": config, "epoch": 3, "threshold": THRESHOLD, "history": history}


def gaofen_tile(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A 4-band tile (blue, green, red, near-infrared) of 10-bit values stored as uint16, as Gaofen-2 scenes hold
    them, with one square of farmland; mask 0/255. Scaled by 1/65535 its bands have means near 0.005 and
    deviations near 0.0008: uniform noise in [0, 1] lies hundreds of deviations away from them."""
    mask = square_tile(rng, size)[1]
    levels = rng.normal([280, 260, 230, 380], 30, (size, size, 4))
    levels[mask > 0] += [20, 50, 10, 150]  # crops: greener and much brighter in the near-infrared
    return np.clip(levels, 0, 1023).astype(np.uint16), mask


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run with splits (8 tiles of 32x32) and a checkpoint, exported once with the 8-bit copy."""
    root = tmp_path_factory.mktemp("onnx")
    data, run_dir = root / "data", root / "run"
    rng = np.random.default_rng(5)
    pairs = [write_pair(data, f"t{i}", *square_tile(rng)) for i in range(8)]
    write_pair_list(run_dir / "splits" / "train.txt", pairs[:5])
    write_pair_list(run_dir / "splits" / "test.txt", pairs[5:])
    state = tiny_state()
    save_checkpoint(run_dir / "checkpoints" / "best.pth", state)
    status = export_onnx.main([f"--run_dir={run_dir}", "--quantize=int8", "--window=64", "--overlap=16"])
    report = json.loads((run_dir / "export" / "export_report.json").read_text(encoding="utf-8"))
    return {"run_dir": run_dir, "data": data, "state": state, "status": status, "report": report}


def test_onnxruntime_gives_pytorch_s_fp32_probabilities_on_tiles_of_two_sizes(exported: dict) -> None:
    segmenter, state = exported_model.load_segmenter(exported["run_dir"] / "export" / "farmland.onnx")
    reference = inference_model(exported["state"], CPU, channels_last=False, amp=None)
    rng = np.random.default_rng(1)
    for shape in ((3, 3, 32, 32), (1, 3, 48, 80)):
        images = torch.from_numpy(rng.random(shape, dtype=np.float32))
        expected = predict_probabilities(reference, images, CPU, channels_last=False)
        found = predict_probabilities(segmenter, images, CPU, channels_last=False)
        assert found.shape == expected.shape == (shape[0], 2, *shape[2:])
        assert (found - expected).abs().max() < 1e-5
        assert torch.allclose(found.sum(1), torch.ones(1))  # the softmax is in the graph, applied once
    assert state["threshold"] == THRESHOLD and state["config"]["in_channels"] == 3
    figures = exported["report"]["float32"]
    assert figures["max_probability_difference"] < onnx_build.TOLERANCE and figures["pixels"] > 0


class Drifting(nn.Module):
    """A stand-in for an exported model whose probabilities drift from PyTorch's by ``shift``."""

    returns_probabilities = True

    def __init__(self, state: dict, shift: float) -> None:
        super().__init__()
        self.reference = inference_model(state, CPU, channels_last=False, amp=None)
        self.shift, self.path = shift, Path("drifting.onnx")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = self.reference(x).float().softmax(1)
        return probabilities + torch.tensor([-self.shift, self.shift])[None, :, None, None]


def test_the_export_check_fails_loudly_when_onnxruntime_drifts() -> None:
    state = tiny_state()
    batches = onnx_build.comparison_tiles(3, [])
    assert onnx_build.compare_with_torch(Drifting(state, 0.0), state, batches)["max_probability_difference"] == 0
    with pytest.raises(DataError, match=r"drifting.onnx: onnxruntime disagrees .*largest probability difference 0.001"):
        onnx_build.compare_with_torch(Drifting(state, 1e-3), state, batches)


def gaofen_run(root: Path) -> tuple[Path, dict]:
    """A run of 4-band 10-bit GeoTIFF tiles (4 to train on, 2 to test) with a checkpoint of a network normalised
    on its training tiles, as --recipe=recommended (normalise) trains one; the checkpoint is saved."""
    rng = np.random.default_rng(7)
    pairs = [write_pair(root / "data", f"gf{i}", *gaofen_tile(rng), ext=".tif") for i in range(6)]
    run_dir = root / "run"
    write_pair_list(run_dir / "splits" / "train.txt", pairs[:4])
    write_pair_list(run_dir / "splits" / "test.txt", pairs[4:])
    state = tiny_state(sample=np.stack([onnx_build.read_tile(image, 4, "") for image, _ in pairs[:4]]))
    save_checkpoint(run_dir / "checkpoints" / "best.pth", state)
    return run_dir, state


def test_a_model_of_16_bit_tiles_is_checked_on_data_like_its_training_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Uniform noise in [0, 1] lies up to ~1000 deviations from these bands: float rounding alone then moved the
    # probabilities by more than the tolerance, and a correct export was refused and removed.
    run_dir, state = gaofen_run(tmp_path)
    assert state["model"]["band_mean"].max() < 0.01 and state["model"]["band_std"].max() < 0.002
    argv = [f"--run_dir={run_dir}", "--window=64", "--overlap=16"]
    assert export_onnx.main(argv) == 0
    figures = json.loads((run_dir / "export" / "export_report.json").read_text(encoding="utf-8"))["float32"]
    assert figures["max_probability_difference"] < onnx_build.TOLERANCE / 10
    # The same check still refuses a graph that leaves out the normalisation, and removes its files.
    monkeypatch.setattr(onnx_build.ExportNet, "forward", lambda net, x: net.unet.body(x).softmax(1))
    with pytest.raises(DataError, match="onnxruntime disagrees"):
        export_onnx.main(argv)
    assert not (run_dir / "export" / "farmland.onnx").exists()
    assert not (run_dir / "export" / "farmland_qgis.onnx").exists()


class Miswired(nn.Module):
    """A stand-in for an exported model whose graph feeds ``rewire(x)`` to the network instead of ``x``."""

    returns_probabilities = True

    def __init__(self, state: dict, rewire) -> None:
        super().__init__()
        self.reference = inference_model(state, CPU, channels_last=False, amp=None)
        self.rewire, self.path = rewire, Path("miswired.onnx")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reference(self.rewire(x)).float().softmax(1)


def test_noise_like_the_training_data_still_exposes_a_wrong_export(tmp_path: Path) -> None:
    state = gaofen_run(tmp_path)[1]
    statistics = onnx_build.input_statistics(state)
    batches = onnx_build.comparison_tiles(4, [], statistics=statistics)  # noise alone, no real tiles
    values = np.concatenate([batch.transpose(1, 0, 2, 3).reshape(4, -1) for batch in batches], axis=1)
    assert np.allclose(values.mean(1), statistics[0], rtol=0.01) and np.allclose(values.std(1), statistics[1], 0.05)
    assert values.min() >= 0 and values.max() <= 1
    demo = np.stack(onnx_build.sample_tiles(tmp_path / "no splits", state))  # generated RGB, moved to the data
    assert np.allclose(demo.mean((0, 2, 3)), statistics[0], rtol=1e-3)
    assert np.allclose(demo.std((0, 2, 3)), statistics[1], rtol=1e-3)
    mean, std = (torch.from_numpy(v)[:, None, None] for v in statistics)
    right = Miswired(state, lambda x: x)
    assert onnx_build.compare_with_torch(right, state, batches)["max_probability_difference"] == 0
    wrong = {
        "band order reversed": lambda x: x.flip(1),
        "normalisation left out": lambda x: x * std + mean,
        "normalised twice": lambda x: (x - mean) / std,
    }
    for name, rewire in wrong.items():
        with pytest.raises(DataError, match="miswired.onnx: onnxruntime disagrees"):
            onnx_build.compare_with_torch(Miswired(state, rewire), state, batches)
            pytest.fail(name)
    # A file whose metadata carries another cut than the checkpoint's gives other masks.
    with pytest.raises(DataError, match=r"[1-9]\d* mask pixel\(s\) differ away from the cut"):
        onnx_build.compare_with_torch(right, state, batches, {**state, "threshold": 0.6})
    # Without statistics (normalise off: identity), the noise stays uniform in [0, 1].
    identity = {**state, "model": {**state["model"], "band_mean": torch.zeros(4), "band_std": torch.ones(4)}}
    assert onnx_build.input_statistics(identity) is None
    uniform = np.concatenate([b.ravel() for b in onnx_build.comparison_tiles(4, [], statistics=None)])
    assert 0.45 < uniform.mean() < 0.55 and uniform.min() >= 0 and uniform.max() < 1


def test_metadata_round_trip_is_json_strings_that_deepness_reads(exported: dict) -> None:
    model = onnx.load(str(exported["run_dir"] / "export" / "farmland.onnx"))
    raw = {p.key: p.value for p in model.metadata_props}
    assert all(isinstance(value, str) for value in raw.values())
    meta = {key: json.loads(value) for key, value in raw.items()}
    assert meta["model_type"] == "Segmentor"
    assert meta["class_names"] == {"0": "background", "1": "farmland"}
    assert meta["tiles_size"] == meta["tile_size"] == 64 and meta["tiles_overlap"] == 25
    assert meta["seg_thresh"] == THRESHOLD and meta["seg_small_segment"] == 0
    assert meta["standardization_mean"] == [0.0] * 3 and meta["standardization_std"] == [1.0] * 3
    assert "resolution" not in meta  # PNG tiles: the pixel size is unknown, and left to the mapper
    assert meta["farmland_band_mean"] == pytest.approx([0.45, 0.4, 0.35])
    assert meta["farmland_base_width"] == 4 and meta["farmland_val_farmland_iou"] == 0.72
    assert len(meta["farmland_checkpoint_sha256"]) == 64 and meta["farmland_precision"] == "float32"
    dims = [
        [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*model.graph.input, *model.graph.output)
    ]
    assert dims == [["batch", 3, "height", "width"], ["batch", 2, "height", "width"]]
    fixed = onnx.load(str(exported["run_dir"] / "export" / "farmland_qgis.onnx"))
    assert [d.dim_param or d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, 64, 64]
    for written in (model, fixed):  # IR 8, which onnxruntime 1.14 loads (torch stamps 10: 1.18 and later only)
        assert written.ir_version == 8
        onnx.checker.check_model(written, full_check=True)


def test_the_int8_copy_is_offered_only_with_its_test_scores(exported: dict) -> None:
    int8, path = exported["report"]["int8"], exported["run_dir"] / "export" / "farmland_int8.onnx"
    assert int8["checked"] and int8["tiles"] == 3
    assert int8["offered"] == onnx_quantize.meets_bar(int8) == path.is_file() == (exported["status"] == 0)
    bar = {"tiles": 3, "fp32_farmland_iou": 0.80, "int8_farmland_iou": 0.795, "mask_agreement": 0.995}
    assert onnx_quantize.meets_bar(bar)
    assert not onnx_quantize.meets_bar(bar | {"int8_farmland_iou": 0.785})
    assert not onnx_quantize.meets_bar(bar | {"mask_agreement": 0.98})
    assert onnx_quantize.meets_bar(bar | {"fp32_farmland_iou": float("nan"), "int8_farmland_iou": float("nan")})


def test_an_int8_copy_is_kept_when_it_meets_the_bar_and_removed_when_not(
    exported: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "farmland.onnx").write_bytes((exported["run_dir"] / "export" / "farmland.onnx").read_bytes())
    cfg = Config(run_dir=str(exported["run_dir"]), calibration_tiles=2)
    target = folder / "farmland_int8.onnx"
    monkeypatch.setattr(onnx_quantize, "MIN_AGREEMENT", 0.5)
    monkeypatch.setattr(onnx_quantize, "IOU_MARGIN", 1.0)
    tiles = export_onnx.calibration_tiles(cfg, exported["state"])
    figures, status = export_onnx.export_int8(cfg, exported["state"], folder, tiles)
    assert status == 0 and figures["offered"] and target.is_file()
    int8, state = exported_model.load_segmenter(target)
    fp32, _ = exported_model.load_segmenter(folder / "farmland.onnx")
    images = torch.from_numpy(np.random.default_rng(2).random((1, 3, 32, 32), dtype=np.float32))
    assert (int8(images) - fp32(images)).abs().mean() < 0.05 and state["threshold"] == THRESHOLD
    assert json.loads({p.key: p.value for p in onnx.load(str(target)).metadata_props}["farmland_precision"]) == "int8"
    written = onnx.load(str(target))
    assert written.ir_version == 8
    # IR 8's opsets (ONNX 1.13: ai.onnx 18), which onnxruntime 1.14 takes: no newer import, used or not.
    assert {opset.domain: opset.version for opset in written.opset_import} == {"": 18}
    onnx.checker.check_model(written, full_check=True)
    monkeypatch.setattr(onnx_quantize, "MIN_AGREEMENT", 1.01)  # a bar no copy can meet
    figures, status = export_onnx.export_int8(cfg, exported["state"], folder, tiles)
    assert status == 1 and not figures["offered"] and not target.exists()


def run_predict(run_dir: Path, source: Path, *extra: str) -> int:
    return predict.main(
        [f"--run_dir={run_dir}", f"--predict_input={source}", "--amp=off", "--num_workers=0", "--window=64"]
        + ["--overlap=16", "--min_field_area_ha=0", *extra]
    )


def test_predict_with_onnx_writes_the_masks_of_the_pytorch_path(exported: dict, tmp_path: Path) -> None:
    run_dir, images = exported["run_dir"], exported["data"] / "images"
    model = run_dir / "export" / "farmland.onnx"
    checkpoint = run_dir / "checkpoints" / "best.pth"
    assert run_predict(tmp_path / "torch", images, f"--checkpoint={checkpoint}") == 0
    assert run_predict(tmp_path / "onnx", images, "--backend=onnx", f"--onnx_model={model}") == 0
    written = sorted(p.relative_to(tmp_path / "torch") for p in (tmp_path / "torch" / "predictions").rglob("*.png"))
    assert len(written) == 16  # 8 masks and 8 overlays
    for name in written:
        assert np.array_equal(read_image(tmp_path / "torch" / name), read_image(tmp_path / "onnx" / name)), name


def test_predict_with_onnx_warns_of_images_of_another_value_scale_as_with_the_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An exported model carried no training means, so a 16-bit product given to a model of 8-bit tiles went
    # through --backend=onnx without the word the checkpoint gives.
    rng = np.random.default_rng(5)
    pairs = [write_pair(tmp_path / "data", f"t{i}", *square_tile(rng)) for i in range(4)]
    run_dir = tmp_path / "run"
    write_pair_list(run_dir / "splits" / "test.txt", pairs[2:])
    save_checkpoint(run_dir / "checkpoints" / "best.pth", tiny_state() | {"band_means": [0.45, 0.4, 0.35]})
    assert export_onnx.main([f"--run_dir={run_dir}", "--window=64", "--overlap=16"]) == 0
    meta = exported_model.decoded_metadata(exported_model.open_session(run_dir / "export" / "farmland.onnx"))
    assert meta["farmland_training_means"] == [0.45, 0.4, 0.35]
    ten_bit = (read_image(pairs[0][0]).astype(np.uint16) * 4)[:, :, :3]  # 16-bit / 65535: near 0.005
    write_image(tmp_path / "in" / "dn16.png", ten_bit)
    write_image(tmp_path / "in" / "dn16_b.png", ten_bit[::-1])
    for backend in ("torch", "onnx"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert run_predict(run_dir, tmp_path / "in", f"--backend={backend}", "--skip_existing=false") == 0
        warned = [r.getMessage() for r in caplog.records if "training tiles'" in r.getMessage()]
        assert len(warned) == 1 and warned[0].startswith("2 of 2 tile(s) average several times"), backend


def test_normalise_given_to_predict_with_onnx_is_not_said_to_be_ignored(
    exported: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An exported model's metadata records no normalise (the normalisation is inside its graph): --normalise=true,
    # as the model was trained, was said to be ignored for "the network's own normalise=False".
    images, model = exported["data"] / "images", exported["run_dir"] / "export" / "farmland.onnx"
    given = ["--backend=onnx", f"--onnx_model={model}", "--normalise=true", "--base_width=8"]
    assert run_predict(tmp_path / "run", images, *given) == 0
    assert f"--base_width=8 ignored: the network is {model}'s own (base_width=4)" in caplog.text
    assert "--normalise" not in caplog.text


def test_predict_with_onnx_maps_a_geotiff_scene_as_the_pytorch_path(exported: dict, tmp_path: Path) -> None:
    source = tmp_path / "in" / "scene.tif"
    demo_data.write_demo_scene(source, tiles=3, size=64)
    model = exported["run_dir"] / "export" / "farmland.onnx"
    checkpoint = exported["run_dir"] / "checkpoints" / "best.pth"
    assert run_predict(tmp_path / "torch", source, f"--checkpoint={checkpoint}") == 0
    assert run_predict(tmp_path / "onnx", source, "--backend=onnx", f"--onnx_model={model}") == 0
    outputs = {}
    for name in ("torch", "onnx"):
        folder = tmp_path / name / "predictions"
        with rasterio.open(folder / "scene_seg.tif") as mask, rasterio.open(folder / "scene_prob.tif") as prob:
            outputs[name] = (mask.read(1), prob.read(1).astype(int), mask.crs, mask.transform)
        with open(folder / "farmland_area.csv", encoding="utf-8-sig") as handle:
            outputs[name] += (list(csv.DictReader(handle)),)
        assert (folder / "scene_fields.gpkg").is_file() and (folder / "overlays" / "scene_overlay.png").is_file()
    (mask, prob, crs, transform, table), onnx_out = outputs["torch"], outputs["onnx"]
    assert 0 < (mask == 1).mean() < 1 and np.array_equal(mask, onnx_out[0])
    assert np.abs(prob - onnx_out[1]).max() <= 1 and (crs, transform) == onnx_out[2:4]
    assert [{k: v for k, v in row.items() if k not in ("image", "model")} for row in table] == [
        {k: v for k, v in row.items() if k not in ("image", "model")} for row in onnx_out[4]
    ]


def test_the_users_threshold_is_the_exported_models_cut(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    trained = tiny_state()
    trained["config"]["rgb_bands"] = "3,2,1"
    save_checkpoint(run_dir / "checkpoints" / "best.pth", trained)
    with pytest.raises(ValueError, match="--threshold=1.5: expected a farmland probability cut"):
        export_onnx.main([f"--run_dir={run_dir}", "--threshold=1.5", "--window=64", "--overlap=16"])
    assert export_onnx.main([f"--run_dir={run_dir}", "--threshold=0.3", "--window=64", "--overlap=16"]) == 0
    model = onnx.load(str(run_dir / "export" / "farmland.onnx"))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["seg_thresh"] == meta["farmland_threshold"] == 0.3  # not the tuned THRESHOLD
    segmenter, state = exported_model.load_segmenter(run_dir / "export" / "farmland.onnx")
    assert state["threshold"] == 0.3  # predict.py --backend=onnx cuts there too
    assert state["config"]["rgb_bands"] == "3,2,1"  # and its overlays show the bands the training's did
    assert meta["farmland_val_farmland_iou"] is None  # the checkpoint holds no val histogram to score 0.3 on


def deepness_masks(path: Path, images: np.ndarray) -> np.ndarray:
    """Masks as Deepness draws them: each class's probability zeroed below seg_thresh, then the most probable."""
    model = onnx.load(str(path))
    cut = json.loads({p.key: p.value for p in model.metadata_props}["seg_thresh"])
    session = exported_model.ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities = session.run(None, {session.get_inputs()[0].name: images})[0]
    return np.where(probabilities < cut, 0, probabilities).argmax(axis=1)


@pytest.mark.parametrize("cut", [0.1, 0.8])
def test_the_qgis_file_draws_in_deepness_the_farmland_predict_py_draws_at_the_cut(tmp_path: Path, cut: float) -> None:
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir / "checkpoints" / "best.pth", tiny_state())
    assert export_onnx.main([f"--run_dir={run_dir}", f"--threshold={cut}", "--window=64", "--overlap=16"]) == 0
    qgis = run_dir / "export" / "farmland_qgis.onnx"
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(qgis)).metadata_props}
    assert (meta["seg_thresh"], meta["farmland_threshold"], meta["farmland_cut_moved_from"]) == (0.5, 0.5, cut)
    tiles = [square_tile(np.random.default_rng(i), 64)[0] for i in range(10, 14)]  # not the ones tiny_state spread on
    images = np.stack(tiles).transpose(0, 3, 1, 2).astype(np.float32) / 255
    segmenter, state = exported_model.load_segmenter(run_dir / "export" / "farmland.onnx")
    with torch.no_grad():
        farmland = segmenter(torch.from_numpy(images))[:, 1].numpy()
    expected = farmland >= cut
    sure = np.abs(farmland - cut) > 1e-4
    assert 0.05 < expected.mean() < 0.95  # the cut splits these images, so the test can tell the rules apart
    assert np.array_equal(deepness_masks(qgis, images)[sure], expected[sure])
    # Unmoved, Deepness would have drawn farmland only where it is also the more probable class.
    unmoved = np.where(farmland >= cut, farmland, 0) > np.where(1 - farmland >= cut, 1 - farmland, 0)
    assert cut > 0.5 or not np.array_equal(unmoved[sure], expected[sure])


def test_a_tuned_cut_of_0_is_exported_for_qgis_as_farmland_everywhere(tmp_path: Path) -> None:
    """Training's lowest bin, 0, can be the tuned cut (best_threshold): its logit is infinite."""
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir / "checkpoints" / "best.pth", {**tiny_state(), "threshold": 0.0})
    assert export_onnx.main([f"--run_dir={run_dir}", "--window=64", "--overlap=16"]) == 0
    qgis = run_dir / "export" / "farmland_qgis.onnx"
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(qgis)).metadata_props}
    assert (meta["seg_thresh"], meta["farmland_cut_moved_from"]) == (0.5, 0.0)
    images = np.stack([square_tile(np.random.default_rng(i), 64)[0] for i in range(10, 12)])
    assert deepness_masks(qgis, images.transpose(0, 3, 1, 2).astype(np.float32) / 255).all()


def test_the_val_iou_in_the_metadata_is_at_the_models_cut(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # 4 bins; a cut of 0.3 falls on bin 1: tp = 2 + 4 + 8, fp = 5 + 3 + 2, fn = 1, IoU = 14 / 25.
    state = {**tiny_state(), "best_epoch": 3, "best_histogram": [[10, 5, 3, 2], [1, 2, 4, 8]]}
    save_checkpoint(run_dir / "checkpoints" / "best.pth", state)
    for extra, expected in (([], 0.72), (["--threshold=0.3"], 0.56)):  # 0.72: the history's, at the tuned cut
        assert export_onnx.main([f"--run_dir={run_dir}", "--window=64", "--overlap=16", *extra]) == 0
        model = onnx.load(str(run_dir / "export" / "farmland_qgis.onnx"))
        meta = {p.key: json.loads(p.value) for p in model.metadata_props}
        assert meta["farmland_val_farmland_iou"] == expected
    # A checkpoint of another epoch than the histogram's (last.pth after a better epoch): unknown at 0.3.
    save_checkpoint(run_dir / "checkpoints" / "best.pth", {**state, "epoch": 4})
    assert export_onnx.main([f"--run_dir={run_dir}", "--window=64", "--overlap=16", "--threshold=0.3"]) == 0
    model = onnx.load(str(run_dir / "export" / "farmland_qgis.onnx"))
    assert json.loads({p.key: p.value for p in model.metadata_props}["farmland_val_farmland_iou"]) is None


def test_the_val_iou_in_the_metadata_is_that_of_the_weights_the_checkpoint_holds() -> None:
    # best.pth of a run with ema holds the moving average where it scored better: its figures, not the trained ones'.
    row = {
        "epoch": 2,
        "val_farmland_iou": 0.49,
        "val_threshold": 0.515,
        "val_tuned_farmland_iou": 0.5788,
        "val_ema_farmland_iou": 0.48,
        "val_ema_threshold": 0.52,
        "val_ema_tuned_farmland_iou": 0.5818,
        "weights": "ema",
    }
    state = {"epoch": 2, "history": [row], "weights": "ema"}
    assert onnx_build.validation_iou(state) == 0.5818
    assert onnx_build.validation_iou({**state, "weights": "raw"}) == 0.5788  # last.pth: the trained weights
    untuned = {**row, "val_threshold": float("nan"), "val_ema_threshold": float("nan")}
    assert onnx_build.validation_iou({**state, "history": [untuned]}) == 0.48


def test_a_network_trained_on_few_bit_values_stored_as_16_bit_is_warned_of_for_qgis(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 10-bit values (up to 1023) stored as 16-bit average near 0.005 of full scale: Deepness's / 255 cannot feed them.
    with caplog.at_level(logging.WARNING, logger="export_onnx"):
        export_onnx.warn_few_bit_training(np.array([0.0049, 0.0061, 0.0058, 0.0152]))
        export_onnx.warn_few_bit_training(np.array([0.31, 0.35, 0.28]))  # 8-bit tiles
        export_onnx.warn_few_bit_training(np.array([0.02, 0.07, 0.03]))  # one band beyond 12 bits: a 16-bit stretch
        export_onnx.warn_few_bit_training(None)  # nothing kept
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith("the training tiles' band means (0.0049, 0.0061, 0.0058,")
    assert "Deepness divides every layer by 255" in messages[0]


def test_dark_8_bit_training_tiles_are_not_called_few_bit_values_stored_as_16_bit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Band means near 0.04 of full scale: 10 of 255 for dark 8-bit tiles (Deepness's / 255 feeds them as trained),
    # 2700 of 65535 for 12-bit values stored as 16-bit (which it cannot feed).
    rng = np.random.default_rng(0)
    dark, mask = write_pair(
        tmp_path / "data", "dark", rng.integers(0, 20, (32, 32, 3), dtype=np.uint8), square_tile(rng, 32)[1]
    )
    deep, _ = write_pair(
        tmp_path / "data", "deep", rng.integers(0, 5400, (32, 32, 3), dtype=np.uint16), square_tile(rng, 32)[1], ".tif"
    )
    run_dir, means = tmp_path / "run", np.array([0.04, 0.041, 0.039])
    write_pair_list(run_dir / "splits" / "train.txt", [(dark, mask)])
    save_checkpoint(run_dir / "checkpoints" / "best.pth", {**tiny_state(), "band_means": means.tolist()})
    with caplog.at_level(logging.WARNING, logger="export_onnx"):
        assert export_onnx.main([f"--run_dir={run_dir}", "--window=64", "--overlap=16"]) == 0
        assert not [r for r in caplog.records if "stored as 16-bit" in r.getMessage()]
        write_pair_list(run_dir / "splits" / "train.txt", [(tmp_path / "gone.png", mask), (deep, mask)])
        assert export_onnx.training_pixel_type(Config(run_dir=str(run_dir))) == "uint16"
        export_onnx.warn_few_bit_training(means, "uint16")
    assert [r for r in caplog.records if "stored as 16-bit" in r.getMessage()]


def test_a_checkpoint_of_another_band_count_or_width_is_refused_naming_the_file(tmp_path: Path) -> None:
    state = tiny_state()
    for key, value in (("in_channels", 4), ("base_width", 8)):
        path = tmp_path / f"{key}.pth"
        save_checkpoint(path, {**state, "config": {**state["config"], key: value}})
        with pytest.raises(DataError, match=f"{path.name}: its weights are of a 3-band network of width 4"):
            export_onnx.main([f"--run_dir={tmp_path / 'run'}", f"--checkpoint={path}"])
    junk = tmp_path / "notes.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(DataError, match="notes.pth: not a loadable checkpoint"):
        export_onnx.main([f"--run_dir={tmp_path / 'run'}", f"--checkpoint={junk}"])


def test_bad_onnx_files_are_one_line_errors_naming_the_file(
    exported: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = (exported["run_dir"] / "export" / "farmland.onnx").read_bytes()
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(good[: len(good) // 2])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "other",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])],
    )
    other = tmp_path / "other.onnx"
    other.write_bytes(
        onnx.helper.make_model(
            graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=8
        ).SerializeToString()
    )
    cases = {corrupt: "not a loadable ONNX model", other: "no farmland metadata", tmp_path / "none.onnx": "not found"}
    for path, problem in cases.items():
        argv = [f"--run_dir={tmp_path / 'run'}", "--backend=onnx", f"--onnx_model={path}", "--num_workers=0"]
        assert cli.run_main(lambda: predict.main(argv)) == 2
        message = capsys.readouterr().err.strip()
        assert message.count("\n") == 0 and str(path) in message and problem in message, message
    with pytest.raises(ValueError, match="--backend='tf': expected torch or onnx"):
        predict.main([f"--run_dir={tmp_path / 'run'}", "--backend=tf"])
    with pytest.raises(ValueError, match="--quantize='int4': expected off or int8"):
        export_onnx.main([f"--run_dir={tmp_path / 'run'}", "--quantize=int4"])
    # Refused before anything is written, not blamed on unreadable tiles after the fp32 export.
    with pytest.raises(ValueError, match="--calibration_tiles=0: expected 1 or more training tiles"):
        export_onnx.main([f"--run_dir={tmp_path / 'run'}", "--quantize=int8", "--calibration_tiles=0"])
    assert not (tmp_path / "run" / "export").exists()


def test_the_fixed_size_qgis_file_is_refused_for_other_sizes_in_one_line(
    exported: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    qgis = exported["run_dir"] / "export" / "farmland_qgis.onnx"  # 64 x 64; the run's tiles are 32 x 32
    argv = [f"--run_dir={tmp_path / 'run'}", "--backend=onnx", f"--onnx_model={qgis}", "--num_workers=0"]
    argv += [f"--predict_input={exported['data'] / 'images'}"]
    assert cli.run_main(lambda: predict.main(argv)) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]  # after predict.py's log lines
    assert message.startswith(f"error: {qgis}: takes only 64 x 64 images"), message
    assert "not 32 x 32" in message and "--onnx_model=" + str(qgis.with_name("farmland.onnx")) in message
    # Refused before the outputs' record is written: it would have the next run redo every earlier output.
    assert not (tmp_path / "run" / "configs" / "predict_outputs.json").exists()


def test_a_new_export_removes_the_8_bit_copy_and_report_of_an_earlier_one(exported: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "export").mkdir(parents=True)
    save_checkpoint(run_dir / "checkpoints" / "best.pth", tiny_state())
    earlier = run_dir / "export" / "farmland_int8.onnx"
    earlier.write_bytes((exported["run_dir"] / "export" / "farmland.onnx").read_bytes())  # the earlier model
    (run_dir / "export" / "export_report.json").write_text('{"int8": {"file": "farmland_int8.onnx"}}')
    assert export_onnx.main([f"--run_dir={run_dir}", "--window=64", "--overlap=16"]) == 0
    assert not earlier.exists()
    assert "int8" not in json.loads((run_dir / "export" / "export_report.json").read_text(encoding="utf-8"))


def test_an_export_killed_while_checking_leaves_no_unchecked_file_under_the_final_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A kill -9 (a power cut) while the new files are checked left the new, unchecked farmland.onnx beside the
    # earlier export's farmland_qgis.onnx, of another checkpoint, with nothing to tell them apart.
    run_dir = tmp_path / "run"
    folder = run_dir / "export"
    folder.mkdir(parents=True)
    save_checkpoint(run_dir / "checkpoints" / "best.pth", tiny_state())
    earlier = {name: f"{name} of an earlier checkpoint".encode() for name in ONNX_NAMES}
    for name, data in earlier.items():
        (folder / name).write_bytes(data)
    seen = []
    check = onnx_build.compare_with_torch

    def checked_while_looking(*args: object, **kwargs: object) -> dict:
        seen.append({name: (folder / name).read_bytes() for name in ONNX_NAMES})  # what a kill now would leave
        return check(*args, **kwargs)

    monkeypatch.setattr(onnx_build, "compare_with_torch", checked_while_looking)
    assert export_onnx.main([f"--run_dir={run_dir}", "--window=64", "--overlap=16"]) == 0
    assert len(seen) == 2 and all(files == earlier for files in seen)
    assert all((folder / name).read_bytes() != data for name, data in earlier.items())  # the new ones, renamed
    assert sorted(p.name for p in folder.iterdir()) == ["export_report.json", *ONNX_NAMES]  # no temporary left


ONNX_NAMES = ("farmland.onnx", "farmland_qgis.onnx")


def test_an_onnx_model_given_as_the_checkpoint_is_named_as_such(exported: dict, tmp_path: Path) -> None:
    model = exported["run_dir"] / "export" / "farmland.onnx"
    with pytest.raises(DataError, match=r"farmland.onnx: an ONNX model, not a checkpoint .*--backend=onnx"):
        export_onnx.main([f"--run_dir={tmp_path / 'run'}", f"--checkpoint={model}"])
    renamed = tmp_path / "model.pth"
    renamed.write_bytes(model.read_bytes())
    with pytest.raises(DataError, match="model.pth: not a loadable checkpoint") as caught:
        predict.main([f"--run_dir={tmp_path / 'run'}", f"--checkpoint={renamed}"])
    assert "weights_only" not in str(caught.value)  # torch's advice to load untrusted code is not passed on


def test_tiles_of_another_band_count_than_the_models_name_the_fixes_of_prediction(
    exported: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_pair(tmp_path / "in", "four", np.zeros((32, 32, 4), np.uint8), np.zeros((32, 32), np.uint8), ".tif")
    tile = tmp_path / "in" / "images" / "four.tif"
    model = exported["run_dir"] / "export" / "farmland.onnx"
    for backend in ([f"--checkpoint={exported['run_dir'] / 'checkpoints' / 'best.pth'}"], ["--backend=onnx"]):
        argv = [f"--run_dir={tmp_path / 'run'}", f"--predict_input={tile}", "--num_workers=0", *backend]
        assert predict.main(argv + [f"--onnx_model={model}"]) == 1
        assert "four.tif: has 4 band(s), but the model was trained on 3" in caplog.text
        assert "--bands=1,2,3" in caplog.text and "--in_channels" not in caplog.text.replace("in_channels=3,", "")
        caplog.clear()


def test_the_window_is_checked_once_on_the_networks_own_grid(tmp_path: Path) -> None:
    state = tiny_state()
    state["config"]["downscale"] = 2  # the graph pools by 32: a window of 200 is off both grids
    save_checkpoint(tmp_path / "run" / "checkpoints" / "best.pth", state)
    with pytest.raises(ValueError, match="--window=200: expected a multiple of 32"):
        export_onnx.main([f"--run_dir={tmp_path / 'run'}", "--window=200"])


def test_an_export_that_qgis_would_read_otherwise_than_predict_py_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tiny_state()
    state["config"]["pixel_size_m"] = 2.0
    run_dir = tmp_path / "运行" / "实验 1"  # the command it ends with is quoted for a copy and paste
    save_checkpoint(run_dir / "checkpoints" / "best.pth", state)
    argv = [f"--run_dir={run_dir}", "--window=64", "--overlap=16", "--threshold=0.3", "--pixel_size_m=1"]
    assert export_onnx.main(argv) == 0
    assert "--pixel_size_m=1 differs from the 2 m pixels the checkpoint was trained on" in caplog.text
    assert "farmland_qgis.onnx: its farmland probability is moved so that the cut 0.3 falls at 0.5" in caplog.text
    assert f"predict with python predict.py --run_dir={shell_quoted(run_dir)} --backend=onnx" in caplog.text


def test_an_export_folder_that_cannot_be_written_is_refused_before_the_trace(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir / "checkpoints" / "best.pth", tiny_state())
    (run_dir / "export").write_text("a file where the export folder goes")
    with pytest.raises(ValueError, match=r"export: .*export is a file, not a folder"):
        export_onnx.main([f"--run_dir={run_dir}", "--window=64", "--overlap=16"])


@pytest.mark.parametrize("failing", ["farmland.onnx", "farmland_qgis.onnx"])
def test_a_full_disk_names_the_onnx_file_not_its_temporary_name(
    failing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The line said ".farmland_qgis.9602.tmp.onnx could not be written", a hidden name the user never sees.
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir / "checkpoints" / "best.pth", tiny_state())
    real_write = onnx_build.write_model

    def full_disk(model: onnx.ModelProto, path: Path) -> None:
        if f".{Path(failing).stem}." in path.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(model, path)

    monkeypatch.setattr(onnx_build, "write_model", full_disk)
    with pytest.raises(OSError) as raised:
        export_onnx.main([f"--run_dir={run_dir}", "--window=64", "--overlap=16"])
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(run_dir / "export" / failing)
    assert not [p.name for p in (run_dir / "export").iterdir() if p.name.startswith(".")]


def test_an_8_bit_copy_without_a_training_split_is_refused_before_the_export(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir / "checkpoints" / "best.pth", tiny_state())
    with pytest.raises(DataError, match=r"splits.train\.txt: not found; --quantize=int8 calibrates"):
        export_onnx.main([f"--run_dir={run_dir}", "--quantize=int8", "--window=64", "--overlap=16"])
    assert not (run_dir / "export" / "farmland.onnx").exists()


def test_an_8_bit_copy_whose_training_tiles_moved_is_refused_before_the_export(tmp_path: Path) -> None:
    # The run folder copied to another machine without its data: the split lists tiles that are not there.
    run_dir, data = tmp_path / "run", tmp_path / "data"
    pairs = [write_pair(data, f"t{i}", *square_tile(np.random.default_rng(i))) for i in range(2)]
    write_pair_list(run_dir / "splits" / "train.txt", pairs)
    (run_dir / "export").mkdir(parents=True)
    (run_dir / "export" / "export_report.json").write_text("{}", encoding="utf-8")  # an earlier export's
    for image, _ in pairs:
        image.unlink()
    save_checkpoint(run_dir / "checkpoints" / "best.pth", tiny_state())
    with pytest.raises(DataError, match=r"train\.txt: none of its training tiles could be read to calibrate"):
        export_onnx.main([f"--run_dir={run_dir}", "--quantize=int8", "--window=64", "--overlap=16"])
    assert not (run_dir / "export" / "farmland.onnx").exists()  # not written without the report that goes with it
    assert (run_dir / "export" / "export_report.json").is_file()  # the earlier export is left as it was


def test_predict_warns_when_the_runs_checkpoint_changed_after_its_export(
    exported: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir, tile = tmp_path / "运行" / "实验 1", next((exported["data"] / "images").iterdir())
    (run_dir / "export").mkdir(parents=True)
    model = run_dir / "export" / "farmland.onnx"
    model.write_bytes((exported["run_dir"] / "export" / "farmland.onnx").read_bytes())
    checkpoint = run_dir / "checkpoints" / "best.pth"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes((exported["run_dir"] / "checkpoints" / "best.pth").read_bytes())  # the exported one
    argv = [f"--run_dir={run_dir}", f"--predict_input={tile}", "--num_workers=0", "--backend=onnx"]
    assert predict.main(argv) == 0
    assert "exported from another" not in caplog.text
    save_checkpoint(checkpoint, tiny_state(seed=1))  # trained again, not exported again
    assert predict.main(argv + ["--skip_existing=false"]) == 0
    assert f"{model}: exported from another best.pth (epoch 3) than the one now in {checkpoint}" in caplog.text
    assert f"export again (python export_onnx.py --run_dir={shell_quoted(run_dir)})" in caplog.text


def test_a_checkpoint_whose_config_names_another_encoder_is_one_line_with_the_fix(tmp_path: Path) -> None:
    state = tiny_state()
    state["config"]["encoder"] = "resnet18"  # U-Net weights under a config that says ResNet-18
    save_checkpoint(tmp_path / "mixed.pth", state)
    with pytest.raises(DataError) as caught:
        export_onnx.main([f"--run_dir={tmp_path / 'run'}", f"--checkpoint={tmp_path / 'mixed.pth'}"])
    message = str(caught.value)
    assert "\n" not in message and "mixed.pth: checkpoint weights do not fit a resnet18 U-Net" in message
    assert "the weights are a plain U-Net's" in message and "use the checkpoint train.py wrote" in message
