"""bench.py and the prediction fast path: they run, and fast agrees with reference (no timings asserted)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
from inference import choose_batch_size, inference_model, predict_batch
from net_structure import build_model

ROOT = Path(__file__).resolve().parent.parent

# Allocates, touches and frees 64 MiB sixteen times; prints the fewest page faults of the last eight (the heap
# settles within the first few, at a point that depends on what the thread pool allocated meanwhile).
FAULTS = """
import resource, sys, torch
import data_preprocess  # what every script imports first: the heap then starts as in a real run
from runtime import keep_freed_memory
if sys.argv[1] == "reuse":
    assert keep_freed_memory()
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(2**26, dtype=torch.uint8).fill_(1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[8:]))
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


def test_bench_runs_and_writes_its_table(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    args = [
        "--width=4",
        "--tile=32",
        "--train_steps=1",
        "--predict_tiles=8",
        "--metric_images=2",
        "--loop_tiles=64",
        "--scene_size=96",
        f"--out={out}",
    ]
    assert bench.main(args) == 0
    results = json.loads(out.read_text())
    assert results["machine"]["torch"] == torch.__version__
    assert results["forward_gflop_per_tile"] > 0
    for key in ("train", "predict"):
        for variant in ("reference", "fast", "reference_reuse_memory"):
            assert results[key][variant]["tiles_per_s"] > 0 and results[key][variant]["peak_bytes"] > 0
        assert results[key]["speedup"] > 0
        assert results[key]["fast"]["fraction_of_matmul_peak"] > 0
    assert results["matmul_peak_tflop_per_s"]["float32"] > 0
    assert results["predict"]["loop_without_network"]["tiles_per_s"] > 0
    assert results["scene"]["size"] == 96 and results["scene"]["megapixels_per_s"] > 0
    assert results["metrics"]["speedup"] > 0
    assert "IoU scoring ms per image" in capsys.readouterr().out


def late_pass_faults(mode: str) -> int:
    """Page faults of a late 64 MiB allocation in a fresh process, with or without keep_freed_memory."""
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_freed_memory_is_reused_rather_than_faulted_in_again() -> None:
    pages = 2**26 // 4096
    assert late_pass_faults("reuse") < pages // 10
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.is_file() and "[always]" not in thp.read_text():  # with huge pages always on, few faults either way
        assert late_pass_faults("default") > pages // 2  # the control: glibc maps the block afresh each time
