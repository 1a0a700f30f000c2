"""bench.py and the prediction fast path: bench.py's measurements against stand-ins of known cost, its ratios
worked by hand, a small real run's table, and the fast path agreeing with the reference (the project's own
speed is never asserted)."""

from __future__ import annotations

import json
import multiprocessing
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import bench
import bench_scene
from demo_data import generate_dataset
from inference import choose_batch_size, inference_model, predict_batch
from net_structure import build_model

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")

# Allocates, touches and frees 64 MiB sixteen times; prints the fewest page faults of the last eight (the heap
# settles within the first few, at a point that depends on what the thread pool allocated meanwhile).
FAULTS = """
import resource, sys, torch
import data_preprocess  # what every script imports first: the heap then starts as in a real run
from runtime import handing_back_freed_memory, keep_freed_memory
def passes():
    faults = []
    for _ in range(16):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(2**26, dtype=torch.uint8).fill_(1)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(faults[8:])
if sys.argv[1] in ("reuse", "hand_back"):
    assert keep_freed_memory()
if sys.argv[1] == "hand_back":
    def resident():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    block = torch.empty(2**28, dtype=torch.uint8).fill_(1)  # 256 MiB from the heap
    pin = torch.empty(2**20, dtype=torch.uint8).fill_(1)  # a later block: the first is not the heap's top
    del block
    kept = resident()
    with handing_back_freed_memory():
        handed = resident()
    print(kept - handed, passes())  # bytes handed back on entry; after the block memory is kept again
else:
    print(passes())
"""


def test_per_pixel_reference_counts_by_hand() -> None:
    label = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], np.uint8)
    pred = np.array([[1, 0, 0, 1], [1, 1, 0, 0]], np.uint8)
    assert bench.per_pixel_counts(label, pred) == (3, 1, 1, 3)


def test_inference_model_predicts_what_the_trained_model_predicts() -> None:
    torch.manual_seed(0)
    model = build_model(3, 2, 8, 0.3)
    model.train()
    model(torch.rand(4, 3, 32, 32))  # one training pass moves the BatchNorm statistics
    model.eval()
    state = {"model": model.state_dict(), "config": {"in_channels": 3, "n_classes": 2, "base_width": 8, "dropout": 0.3}}
    fast = inference_model(state, torch.device("cpu"), channels_last=True, amp=None)
    images = torch.rand(3, 3, 40, 40)
    with torch.no_grad():
        expected = model(images).argmax(1).numpy()
    assert np.array_equal(predict_batch(fast, images, torch.device("cpu")), expected)
    assert choose_batch_size(fast, (3, 256, 256), torch.device("cpu"), 7) == 7
    assert 1 <= choose_batch_size(fast, (3, 256, 256), torch.device("cpu"), 0) <= 4


class KnownCost(torch.nn.Module):
    """A stand-in network of known cost: it sleeps ``seconds`` per tile. Its class scores come from a 1x1
    convolution named like the U-Net's last layer, which predict.py's batch sizing reads."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.outc = torch.nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds * x.shape[0])
        return self.outc(x)


def known_cost_steps(seconds: float) -> Callable[..., tuple[float, int]]:
    """A stand-in for training's train_epoch whose every step takes ``seconds``."""

    def train_epoch(*_: object, max_steps: int = 0, **__: object) -> tuple[float, int]:
        for _ in range(max_steps):
            time.sleep(seconds)
        return 0.5, max_steps

    return train_epoch


def near(measured: float, expected: float) -> bool:
    """A rate measured on a stand-in of known cost: never above it (a sleep lasts at least as long as asked),
    and not far below (what the loop around the stand-in costs, on a busy machine)."""
    return 0.7 * expected <= measured <= 1.02 * expected


def table_row(printed: str, name: str) -> list[str]:
    """The cells after the first row of print_table's table that starts with ``name``."""
    line = next(line for line in printed.splitlines() if line.startswith(name))
    return line[len(name) :].split()


def resident_bytes() -> int:
    """This process's resident memory now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def test_steady_rate_leaves_out_the_first_half_of_a_run() -> None:
    def run(progress: Callable[[int], None]) -> None:
        time.sleep(0.3)  # a slow first batch: start-up
        progress(4)
        for batch in range(2, 9):  # then 4 tiles every 0.05 s
            time.sleep(0.05)
            progress(4 * batch)

    # The second half, tiles 17 to 32, took 4 batches of 0.05 s: 80 tiles/s (the whole run would give 49).
    assert near(bench.steady_rate(run, CPU)["tiles_per_s"], 80)
    with pytest.raises(ValueError, match="too few batches"):
        bench.steady_rate(lambda progress: progress(8), CPU)  # one batch: nothing left after the warm-up half


# Seconds per reference tile, per fast tile, per training step: long enough that reading and writing the tiles
# around them stays small beside them on a busy 2-core machine.
REFERENCE_S, FAST_S, STEP_S = 0.16, 0.04, 0.1


def test_measurements_find_the_known_cost_of_stand_ins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    images = generate_dataset(tmp_path / "data", 4, 32, seed=0)
    pairs = [(p, tmp_path / "data" / "labels" / f"{p.stem}_mask.png") for p in images]
    reused: list[str] = []
    # pytest's allocator untouched
    monkeypatch.setattr(bench, "keep_freed_memory", lambda: reused.append("asked") or True)
    monkeypatch.setattr(bench, "train_epoch", known_cost_steps(STEP_S))
    monkeypatch.setattr(bench, "build_model", lambda *_: KnownCost(REFERENCE_S))  # the network the reference builds
    monkeypatch.setattr(bench, "inference_model", lambda *_: KnownCost(FAST_S))  # the fast path's network

    settings = {"base_width": 4, "device": "cpu", "amp": "off", "num_workers": 0, "cache_tiles": "no"}
    reference = {**settings, "batch_size": 5, "reuse_memory": False, "channels_last": False}  # as bench.py
    train = {"reference": bench.bench_train(pairs, reference, 4, False)}
    assert reused == []
    train["reference_reuse_memory"] = bench.bench_train(pairs, {**reference, "reuse_memory": True}, 4, False)
    train["fast"] = bench.bench_train(pairs, {**settings, "batch_size": 10}, 4, True)
    assert reused == ["asked"] * 2
    tiles = images * 2
    predict = {"reference": bench.bench_predict_reference(tiles, 4, "cpu", tmp_path / "ref")}
    predict["reference_reuse_memory"] = bench.bench_predict_reference(tiles, 4, "cpu", tmp_path / "ref2", True)
    predict["fast"] = bench.bench_predict_fast(tiles, 4, "cpu", tmp_path / "fast", 0)
    assert reused == ["asked"] * 4
    assert len(list((tmp_path / "fast").glob("*_seg.png"))) == 8  # every tile predicted and written

    # Steps of 5 and 10 tiles at 0.1 s each; one tile at a time at 0.16 s, batches at 0.04 s a tile.
    assert near(train["reference"]["tiles_per_s"], 50) and near(train["fast"]["tiles_per_s"], 100)
    assert near(train["reference_reuse_memory"]["tiles_per_s"], 50)
    assert (train["reference"]["batch"], train["fast"]["batch"]) == (5, 10)
    # amp=off forces float32: nothing timed, the layout as set (contiguous unless channels_last is left on).
    assert (train["reference"]["precision"], train["reference"]["layout"]) == ("float32", "contiguous")
    assert (train["fast"]["precision"], train["fast"]["layout"]) == ("float32", "channels_last")
    assert train["fast"]["choice"]["why"] == "amp=off given" and train["fast"]["choice"]["step_s"] == {}
    # amp=auto: a width-4 network on 32-pixel tiles is too small to time, so the old rule holds.
    assert predict["fast"]["choice"]["why"].startswith("the old rule")
    assert near(predict["reference"]["tiles_per_s"], 6.25) and near(predict["fast"]["tiles_per_s"], 25)
    assert near(predict["reference_reuse_memory"]["tiles_per_s"], 6.25)
    if platform.system() == "Linux":  # peak memory in bytes, not the KiB that getrusage reports
        assert train["fast"]["peak_bytes"] >= resident_bytes() * 0.9

    predict["loop_without_network"] = {"tiles_per_s": 700.0, "workers": 0}
    predict["backends"] = {"torch_float32": {"tiles_per_s": 5.0}}  # far below the fast path's 50
    results: dict[str, Any] = {
        "train": train,
        "predict": predict,
        "metrics": {"reference_s_per_image": 0.01, "fast_s_per_image": 0.001},
        "matmul_peak_tflop_per_s": {"float32": 1.0, "bfloat16": 2.0},
        "fast_dtype": "bfloat16",
        "scene": {"size": 96, "megapixels_per_s": 0.5},
    }
    bench.add_ratios(results, 1e9)
    assert train["speedup"] == pytest.approx(2, rel=0.3) and predict["speedup"] == pytest.approx(4, rel=0.3)
    assert train["speedup_reuse_memory_alone"] == pytest.approx(1, rel=0.3)
    assert predict["speedup"] == pytest.approx(predict["fast"]["tiles_per_s"] / predict["reference"]["tiles_per_s"])
    assert predict["fastest_backend"] == "torch_bfloat16"
    bench.print_table(results)
    printed = capsys.readouterr().out
    for key, label in (("train", "training"), ("predict", "prediction")):
        pair = results[key]
        rates = [f"{pair[v]['tiles_per_s']:.2f}" for v in ("reference", "fast")]
        assert table_row(printed, f"{label} tiles/s") == [*rates, f"{pair['speedup']:.2f}x"]


def test_ratios_and_shares_of_the_peak_worked_by_hand(capsys: pytest.CaptureFixture) -> None:
    def rate(tiles_per_s: float) -> dict[str, float]:
        return {"tiles_per_s": tiles_per_s, "peak_bytes": 3 * 2**30}

    results: dict[str, Any] = {
        "fast_dtype": "bfloat16",
        "matmul_peak_tflop_per_s": {"float32": 0.1, "bfloat16": 0.4},
        "train": {"reference": rate(2.0), "fast": rate(6.0), "reference_reuse_memory": rate(3.0)},
        "predict": {
            "reference": rate(10.0),
            "fast": rate(25.0),
            "reference_reuse_memory": rate(11.0),
            "loop_without_network": {"tiles_per_s": 700.0, "workers": 2},
            "backends": {"torch_float32": rate(12.5), "onnx_int8": rate(30.0)},
        },
        "metrics": {"reference_s_per_image": 0.0132, "fast_s_per_image": 0.00018},
        "scene": {"size": 2048, "megapixels_per_s": 0.17},
    }
    bench.add_ratios(results, 1e10)  # 10 GFLOP per tile forward
    train, predict = results["train"], results["predict"]
    assert (train["speedup"], train["speedup_reuse_memory_alone"]) == pytest.approx((3.0, 1.5))
    # A training step counts as 3 forward passes: 2 tiles/s x 30 GFLOP = 0.06 TFLOP/s, 60 % of the float32 peak;
    # the fast path is set against the bfloat16 peak: 0.18 of 0.4.
    assert (train["reference"]["tflop_per_s"], train["reference"]["fraction_of_matmul_peak"]) == pytest.approx(
        (0.06, 0.6)
    )
    assert (train["fast"]["tflop_per_s"], train["fast"]["fraction_of_matmul_peak"]) == pytest.approx((0.18, 0.45))
    assert train["reference_reuse_memory"]["fraction_of_matmul_peak"] == pytest.approx(0.9)
    assert (predict["speedup"], predict["speedup_reuse_memory_alone"]) == pytest.approx((2.5, 1.1))
    assert (predict["reference"]["tflop_per_s"], predict["reference"]["fraction_of_matmul_peak"]) == pytest.approx(
        (0.1, 1.0)
    )
    assert (predict["fast"]["tflop_per_s"], predict["fast"]["fraction_of_matmul_peak"]) == pytest.approx((0.25, 0.625))
    assert results["metrics"]["speedup"] == pytest.approx(0.0132 / 0.00018)
    vs_fast = {name: found["vs_fast"] for name, found in predict["backends"].items()}
    assert vs_fast == pytest.approx({"torch_float32": 0.5, "onnx_int8": 1.2, "torch_bfloat16": 1.0})
    assert predict["fastest_backend"] == "onnx_int8"

    bench.print_table(results)
    printed = capsys.readouterr().out
    assert table_row(printed, "training tiles/s") == ["2.00", "6.00", "3.00x"]
    assert table_row(printed, "  reference + reuse_memory") == ["3.00", "1.50x"]  # training's, the first
    assert table_row(printed, "training TFLOP/s") == ["0.060", "0.180"]
    assert table_row(printed, "  of the matmul peak") == ["60%", "45%"]
    assert table_row(printed, "training peak memory MiB") == ["3072", "3072"]
    assert table_row(printed, "prediction tiles/s") == ["10.00", "25.00", "2.50x"]
    assert table_row(printed, "  loop without the network") == ["700"]
    assert table_row(printed, "  PyTorch float32") == ["12.50", "0.50x"]
    assert table_row(printed, "  onnxruntime int8") == ["30.00", "1.20x"]
    assert table_row(printed, "IoU scoring ms per image") == ["13.20", "0.18", "73x"]
    assert table_row(printed, "scene 2048x2048, MP/s") == ["0.17"]
    assert "fastest prediction here: onnx_int8" in printed


def test_forward_flops_grow_with_the_tile_area() -> None:
    # Every layer works per pixel of its level: four times the pixels, four times the FLOPs.
    assert bench.forward_flops(4, 64) == 4 * bench.forward_flops(4, 32) > 0
    # At half resolution a 64-pixel tile is a 32-pixel one to the network (shrinking and growing cost no FLOPs).
    for encoder in ("unet", "resnet18"):
        assert bench.forward_flops(4, 64, encoder, 2) == bench.forward_flops(4, 32, encoder)


@pytest.fixture
def one_spawned_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """bench.py's measurements in one spawned process for the whole run instead of one each: the same code,
    pickling and start-up, without a dozen torch imports (a smoke run; peak memory is then the run's)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=bench.platform_start_method) as executor:
        monkeypatch.setattr(bench, "in_subprocess", lambda function, *a: executor.submit(function, *a).result())
        yield


def test_bench_runs_and_writes_its_table(tmp_path: Path, capsys: pytest.CaptureFixture, one_spawned_process) -> None:
    out = tmp_path / "bench.json"
    argv = [
        "--width=4",
        "--encoders=unet,resnet18",
        "--tile=32",
        "--train_steps=1",
        "--predict_tiles=8",
        "--metric_images=2",
        "--loop_tiles=64",
        "--scene_size=96",
        f"--out={out}",
    ]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    settings = bench.parse_arguments(argv)
    # Every figure that the tables of README.md and docs/performance.md read, and how they hang together.
    assert results["machine"]["torch"] == torch.__version__ and results["machine"]["cpu_cores"] >= 1
    assert {"cpu", "gpu"} <= results["machine"].keys()
    assert (results["width"], results["tile"]) == (4, 32)
    assert results["forward_gflop_per_tile"] * 1e9 == pytest.approx(bench.forward_flops(4, 32))
    peaks = results["matmul_peak_tflop_per_s"]
    assert peaks.keys() == {"float32", results["fast_dtype"]} and min(peaks.values()) > 0
    for key, label, passes in (("train", "training", 3), ("predict", "prediction", 1)):
        pair = results[key]
        for variant in ("reference", "fast", "reference_reuse_memory"):
            found = pair[variant]
            assert found["tiles_per_s"] > 0 and found["peak_bytes"] > 0
            flop_rate = found["tiles_per_s"] * results["forward_gflop_per_tile"] * passes / 1e3
            assert found["tflop_per_s"] == pytest.approx(flop_rate)
            peak = peaks[found["precision"] if variant == "fast" else "float32"]
            assert found["fraction_of_matmul_peak"] == pytest.approx(found["tflop_per_s"] / peak)
        ratio = pair["fast"]["tiles_per_s"] / pair["reference"]["tiles_per_s"]
        assert pair["speedup"] == pytest.approx(ratio)
        alone = pair["reference_reuse_memory"]["tiles_per_s"] / pair["reference"]["tiles_per_s"]
        assert pair["speedup_reuse_memory_alone"] == pytest.approx(alone)
        rates = [f"{pair[v]['tiles_per_s']:.2f}" for v in ("reference", "fast")]
        assert table_row(printed, f"{label} tiles/s") == [*rates, f"{pair['speedup']:.2f}x"]
    assert results["train"]["reference"]["batch"] == bench.REFERENCE_BATCH
    assert results["train"]["fast"]["batch"] == settings.fast_batch
    predict = results["predict"]
    assert predict["loop_without_network"]["tiles_per_s"] > 0
    assert predict["loop_without_network"]["workers"] == settings.workers
    backends = predict["backends"]
    assert {"torch_float32", f"torch_{results['fast_dtype']}"} <= backends.keys()
    for found in backends.values():
        assert found["vs_fast"] == pytest.approx(found["tiles_per_s"] / predict["fast"]["tiles_per_s"])
    assert predict["fastest_backend"] == max(backends, key=lambda name: backends[name]["tiles_per_s"])
    metrics = results["metrics"]
    assert min(metrics["reference_s_per_image"], metrics["fast_s_per_image"]) > 0
    assert metrics["miou_with_file_io_s_per_image"] > 0
    assert metrics["speedup"] == pytest.approx(metrics["reference_s_per_image"] / metrics["fast_s_per_image"])
    assert table_row(printed, "IoU scoring ms per image")[-1] == f"{metrics['speedup']:.0f}x"
    scene = results["scene"]
    assert (scene["size"], scene["megapixels"]) == (96, pytest.approx(96 * 96 / 1e6))
    assert scene["megapixels_per_s"] == pytest.approx(scene["megapixels"] / scene["predict_s"])
    assert scene["peak_rss_bytes"] > 0
    assert f"written to {out}" in printed

    # The table by network: every width (--width alone: that one) with every encoder, reference and fast side by
    # side, and the precision and layout the fast path ran in; the U-Net at --width has the one-off rows above.
    assert (results["widths"], results["encoders"], results["downscales"]) == ([4], ["unet", "resnet18"], [1])
    cases = {(c["width"], c["encoder"]): c for c in results["cases"]}
    assert list(cases) == [(4, "unet"), (4, "resnet18")] and {c["downscale"] for c in results["cases"]} == {1}
    markdown = out.with_suffix(".md").read_text().splitlines()
    assert markdown[2] == "| " + " | ".join(bench.CASE_COLUMNS) + " |"
    for (width, encoder), case in cases.items():
        assert case["forward_gflop_per_tile"] * 1e9 == pytest.approx(bench.forward_flops(width, 32, encoder))
        assert (case["train_steps"], case["predict_tiles"]) == (1, 8)  # as given: not scaled
        cells = [str(width), encoder, "1", f"{case['forward_gflop_per_tile']:.1f}"]
        for key in ("train", "predict"):
            pair = case[key]
            assert pair["speedup"] == pytest.approx(pair["fast"]["tiles_per_s"] / pair["reference"]["tiles_per_s"])
            assert (pair["reference"]["precision"], pair["reference"]["layout"]) == ("float32", "contiguous")
            assert pair["fast"]["choice"]["precision"] == pair["fast"]["precision"]
            assert pair["fast"]["choice"]["why"].startswith("the old rule")  # too small to time
            rates = [f"{pair[v]['tiles_per_s']:.2f}" for v in ("reference", "fast")]
            cells += [*rates, f"{pair['speedup']:.2f}x", bench.path_label(pair["fast"])]
        row = "| " + " | ".join(cells) + " |"
        assert row in markdown and row in printed.splitlines()
    for key in ("train", "predict"):
        assert results[key]["fast"] == cases[4, "unet"][key]["fast"]


def test_cases_only_writes_the_table_by_network_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture, one_spawned_process
) -> None:
    out = tmp_path / "cases.json"
    argv = ["--widths=4", "--encoders=resnet18", "--tile=32", "--train_steps=1", "--predict_tiles=8", "--cases_only"]
    assert bench.main([*argv, "--downscales=1,2", f"--out={out}"]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert not {"train", "predict", "metrics", "scene"} & results.keys()  # no one-off rows measured
    # The networks asked for alone (no U-Net for the one-off rows), each at full and at half resolution.
    assert [bench.case_network(c) for c in results["cases"]] == [(4, "resnet18", 1), (4, "resnet18", 2)]
    assert results["device"] == "cpu"
    full, half = results["cases"]
    assert half["forward_gflop_per_tile"] * 1e9 == pytest.approx(bench.forward_flops(4, 32, "resnet18", 2))
    # 32 pixels shrink to 16, which the ResNet pads back to its 32-pixel grid: the same work as at full size.
    assert half["forward_gflop_per_tile"] == full["forward_gflop_per_tile"]
    for case in results["cases"]:
        for key in ("train", "predict"):
            pair = case[key]
            assert pair["speedup"] == pytest.approx(pair["fast"]["tiles_per_s"] / pair["reference"]["tiles_per_s"])
    assert out.with_suffix(".md").read_text() == bench.cases_markdown(results)
    rows = bench.cases_markdown(results).splitlines()
    assert rows[-1].startswith("| 4 | resnet18 | 2 |") and rows[-2].startswith("| 4 | resnet18 | 1 |")
    assert rows[-1] in printed.splitlines() and "resnet18 width 4, half resolution: training" in printed


def test_lighter_networks_get_more_steps_and_tiles_by_default() -> None:
    args = bench.parse_arguments(["--device=cpu"])
    assert (args.widths, args.width, args.encoders) == ([16, 32, 64], 64, ["unet", "resnet18", "resnet34"])
    assert bench.case_sizes(args, 96e9, 96e9) == (3, 32)  # the full-width U-Net: as before
    assert bench.case_sizes(args, 24e9, 96e9) == (12, 128)  # a quarter of the work: four times the steps
    assert bench.case_sizes(args, 6e9, 96e9) == (12, 128)  # at most four times
    given = bench.parse_arguments(["--device=cpu", "--width=16", "--train_steps=2", "--predict_tiles=8"])
    assert (given.widths, given.width) == ([16], 16)
    assert bench.parse_arguments(["--widths=32,16", "--encoders=resnet34"]).width == 32  # the widest
    assert bench.case_sizes(given, 6e9, 96e9) == (2, 8)
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--encoders=unet,vgg16"])
    assert (args.downscales, bench.parse_arguments(["--downscales=2, 4,2"]).downscales) == ([1], [2, 4])


@pytest.mark.parametrize("given", ["a", "16,0", "-8"])
def test_a_width_that_is_not_a_positive_number_is_refused(given: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        bench.parse_arguments([f"--widths={given}"])
    assert f"--widths={given}: expected comma-separated positive widths, such as 16,32,64" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda_is_refused_before_measuring(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--device=cuda"])
    captured = capsys.readouterr()
    assert "--device=cuda: CUDA is not available on this machine; use --device=cpu or auto" in captured.err
    assert captured.out == ""  # nothing measured or printed first


def test_too_few_loop_tiles_are_refused_before_measuring(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--device=cpu", "--loop_tiles=16"])
    assert "--loop_tiles=16: expected 64 or more tiles (the loop runs batches of 32" in capsys.readouterr().err
    assert bench.parse_arguments(["--device=cpu", "--loop_tiles=64"]).loop_tiles == 64
    assert bench.parse_arguments(["--device=cpu", "--loop_tiles=16", "--cases_only"]).loop_tiles == 16  # not run


def test_too_few_prediction_tiles_are_refused_before_measuring(capsys: pytest.CaptureFixture) -> None:
    """Prediction times the second half of its batches (up to 4 tiles each on a CPU): fewer than two batches
    are refused at once rather than minutes in, after the training rows."""
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--device=cpu", "--predict_tiles=4", "--cases_only"])
    assert "--predict_tiles=4: expected 8 or more tiles (prediction runs batches of up to 4" in capsys.readouterr().err
    assert bench.parse_arguments(["--device=cpu", "--predict_tiles=8", "--cases_only"]).predict_tiles == 8


def test_a_width_or_encoder_named_twice_is_measured_once() -> None:
    args = bench.parse_arguments(["--device=cpu", "--widths=16,8,16", "--encoders=unet,resnet18,unet"])
    assert (args.widths, args.encoders) == ([16, 8], ["unet", "resnet18"])


@pytest.mark.parametrize("given", ["3", "1,half", "0"])
def test_a_factor_the_networks_do_not_take_is_refused_with_the_ones_they_do(
    given: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        bench.parse_arguments([f"--downscales={given}"])
    assert f"--downscales={given}: expected comma-separated factors of 1, 2, 4, e.g. 1,2" in capsys.readouterr().err


def test_cases_from_before_downscale_read_as_full_resolution() -> None:
    assert bench.case_network({"width": 64, "encoder": "unet"}) == bench.Network(64, "unet", 1)
    assert bench.network_label(bench.Network(16, "unet", 2)) == "unet width 16, half resolution"


def late_pass_faults(mode: str) -> int:
    """Page faults of a late 64 MiB allocation in a fresh process, with or without keep_freed_memory."""
    return pass_faults(mode)[-1]


def pass_faults(mode: str) -> list[int]:
    """The fewest page faults of late 64 MiB allocations in a fresh process, as the FAULTS script prints them."""
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    return [int(v) for v in done.stdout.split()]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_freed_memory_is_handed_back_for_the_polygons_and_kept_again_after() -> None:
    pages = 2**26 // 4096
    handed_back, after = pass_faults("hand_back")
    assert handed_back > 200 * 2**20  # most of the 256 MiB freed inside the heap left the process
    assert after < pages // 10


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_freed_memory_is_reused_rather_than_faulted_in_again() -> None:
    pages = 2**26 // 4096
    assert late_pass_faults("reuse") < pages // 10
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.is_file() and "[always]" not in thp.read_text():  # with huge pages always on, few faults either way
        assert late_pass_faults("default") > pages // 2  # the control: glibc maps the block afresh each time


def test_an_out_that_cannot_be_written_is_refused_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "notes.txt").write_text("a file")
    for out, said in (
        (tmp_path / "notes.txt" / "b" / "bench.json", f"{tmp_path / 'notes.txt'} is a file, not a folder"),
        (tmp_path, f"a folder; expected the JSON file to write, such as {tmp_path / 'bench.json'}"),
    ):
        with pytest.raises(SystemExit):
            bench.parse_arguments(["--device=cpu", f"--out={out}"])
        assert said in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and (tmp_path / "notes.txt").read_text() == "a file"


@pytest.mark.skipif(platform.system() != "Linux", reason="VmHWM and ru_maxrss as Linux keeps them")
def test_a_measurement_reports_its_own_peak_memory_not_that_of_the_process_that_started_it() -> None:
    held = torch.ones(2**28)  # 1 GiB resident here when the measurement's process is started
    measured = bench.in_subprocess(bench.peak_memory, CPU)
    assert 0 < measured < held.numel() * held.element_size()


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("--sizes=abc", "--sizes=abc: expected comma-separated scene sides in pixels"),
        ("--sizes=0", "--sizes=0: expected comma-separated scene sides in pixels"),
        ("--amp=fp8", "--amp='fp8': expected auto, bf16, fp16 or off"),
        ("--device=gpu", "--device=gpu: expected auto, cpu, cuda or cuda:N"),
        ("--out={tmp}/notes.txt/bench_scene.json", "notes.txt is a file, not a folder; choose another --out"),
        # predict.py refused these only after the realistic case's network had trained (downscale 2: a 32-px grid)
        ("--overlap=512", "--overlap=512: expected a multiple of 32 from 0 to window-32 (480)"),
        ("--overlap=48", "--overlap=48: expected a multiple of 32"),
        ("--window=500", "--window=500: expected a multiple of 32, at least 64"),
    ],
)
def test_bench_scene_refuses_bad_arguments_before_training_or_writing_a_scene(
    given: str, said: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "notes.txt").write_text("a file")
    monkeypatch.setattr(bench_scene, "case_inputs", lambda *_: pytest.fail("a case was started"))
    with pytest.raises(SystemExit) as stopped:
        bench_scene.main(["--cases=realistic", f"--out={tmp_path / 'b.json'}", given.format(tmp=tmp_path)])
    assert stopped.value.code == 2 and said in capsys.readouterr().err


def test_an_out_named_as_the_markdown_table_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # The JSON would go to bench.md and the table by network over it, leaving no JSON.
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--device=cpu", f"--out={tmp_path / 'bench.md'}"])
    assert f"use {tmp_path / 'bench.json'}" in capsys.readouterr().err
