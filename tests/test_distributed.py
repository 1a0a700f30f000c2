"""Training and prediction under torchrun: 2 CPU processes with gloo on loopback. One training launch is
shared by the module's tests; resuming needs launches of its own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, args, close_log_files, folder_digest, weights

import cli
import predict
import split_dataset
import tile_prediction
from data_preprocess import EpochSampler, FarmlandDataset, read_image, read_pair_list
from inference import model_from_checkpoint
from metrics import FARMLAND, class_iou
from png_text import read_texts
from runtime import load_checkpoint, memory_format
from training import evaluate, make_loader

DDP = ["--batch_size=1", "--num_workers=0", "--amp=off", "--predict_batch_size=1"]
TRAIN = [*DDP, "--precise_bn=4"]  # every rank recomputes BatchNorm statistics over the same four tiles


def torchrun(script: str, *arguments: str, succeeds: bool = True) -> subprocess.CompletedProcess:
    """Launch a script on 2 CPU processes; ``succeeds``: assert that it ended well, else that it failed (torchrun
    then looks at its processes every 2 s, so that a rank left by another is not stopped before it has said so)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [*([] if succeeds else ["--monitor-interval=2"]), str(ROOT / script)]
    result = subprocess.run([*command, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert (result.returncode == 0) == succeeds, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def ddp_run(shared_square_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 3-epoch training under torchrun on 2 processes, launched once for the module. Read-only: a test that
    writes into it works on a copy (checked at the end)."""
    run_dir = tmp_path_factory.mktemp("ddp") / "ddp"
    split_dataset.main(args(shared_square_data, run_dir))
    close_log_files()
    torchrun("train.py", *args(shared_square_data, run_dir, *TRAIN, "--epochs=3"))
    before = folder_digest(run_dir)
    yield run_dir
    assert folder_digest(run_dir) == before, "a test wrote into ddp_run; let it work on a copy"


def test_ddp_training_learns_and_ranks_agree(ddp_run: Path) -> None:
    log = (ddp_run / "logs" / "train.log").read_text(encoding="utf-8")
    assert "distributed training: 2 ranks" in log
    assert "weights identical on all 2 ranks" in log  # the digests of both ranks' weights were compared
    history = torch.load(ddp_run / "checkpoints" / "last.pth", weights_only=True)["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # The saved statistics were recomputed last, over the four tiles in batches of one (training: 24 batches).
    tracked = [v for k, v in weights(ddp_run / "checkpoints" / "last.pth").items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(v) == 4 for v in tracked)


def test_reduced_val_iou_equals_a_single_process_evaluation(ddp_run: Path, shared_square_data: Path) -> None:
    state = load_checkpoint(ddp_run / "checkpoints" / "last.pth")
    cfg = cli.parse_args(args(shared_square_data, ddp_run, *DDP))
    model = model_from_checkpoint(state, torch.device("cpu"), cfg.channels_last)
    val = FarmlandDataset(read_pair_list(ddp_run / "splits" / "val.txt"))
    _, cm, _ = evaluate(
        model, make_loader(val, cfg, torch.device("cpu"), False), torch.device("cpu"), 2, memory_format(True)
    )
    assert state["history"][-1]["val_farmland_iou"] == pytest.approx(float(class_iou(cm)[FARMLAND]), abs=1e-9)


def test_ddp_resume_continues_exactly(ddp_run: Path, shared_square_data: Path, tmp_path: Path) -> None:
    resumed = tmp_path / "resumed"
    split_dataset.main(args(shared_square_data, resumed))
    torchrun("train.py", *args(shared_square_data, resumed, *TRAIN, "--epochs=2"))
    torchrun("train.py", *args(shared_square_data, resumed, *TRAIN, "--epochs=3", "--resume=true"))
    a, b = weights(ddp_run / "checkpoints" / "last.pth"), weights(resumed / "checkpoints" / "last.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_rank_left_by_another_says_so_and_how_to_go_on(square_data: Path, tmp_path: Path) -> None:
    """A tile broken after epoch 1 stops the rank that reads it in epoch 2; rank 0, left waiting in a collective,
    says in one line that another rank stopped first, and how to go on from last.pth, not torch's traceback."""
    run_dir = tmp_path / "run"
    split_dataset.main(args(square_data, run_dir))
    close_log_files()
    torchrun("train.py", *args(square_data, run_dir, *DDP, "--epochs=1"))
    pairs = read_pair_list(run_dir / "splits" / "train.txt")
    sampler = EpochSampler(len(pairs), 42, rank=1, world=2)
    sampler.set_epoch(2)
    index = next(i for i, _ in sampler if i != 0)  # the first training tile is read by every rank at start-up
    broken = pairs[index][0]
    broken.write_bytes(broken.read_bytes()[:60])  # cut short: its header still reads, its pixels do not
    # Tiles read from disk as the epoch goes, with no pass over them at start-up.
    extra = ["--resume=true", "--epochs=2", "--cache_tiles=no", "--collapse_patience=0"]
    result = torchrun("train.py", *args(square_data, run_dir, *DDP, *extra), succeeds=False)
    assert broken.name in result.stderr  # rank 1's own reason
    assert "[rank0]: Traceback" not in result.stderr
    log = (run_dir / "logs" / "train.log").read_text(encoding="utf-8")
    assert "rank 0 of 2 stopped: another rank of this torchrun job stopped first" in log
    assert "torchrun --standalone --nproc_per_node=2 train.py" in log and "--resume=true goes on from there" in log
    assert "unexpected error" not in log


def test_distributed_prediction_writes_what_one_process_writes(
    ddp_run: Path, shared_square_data: Path, tmp_path: Path
) -> None:
    images = shared_square_data / "images"
    ddp = Path(shutil.copytree(ddp_run, tmp_path / "ddp"))
    single = tmp_path / "single"
    (single / "checkpoints").mkdir(parents=True)
    (single / "checkpoints" / "best.pth").write_bytes((ddp_run / "checkpoints" / "best.pth").read_bytes())
    # A network key given with another value than the checkpoint's is warned of once, not by every rank.
    ignored = "--base_width=8"
    result = torchrun("predict.py", *args(shared_square_data, ddp, *DDP, f"--predict_input={images}", ignored))
    assert (result.stdout + result.stderr).count("--base_width=8 ignored: the network is") == 1
    assert predict.main(args(shared_square_data, single, *DDP, f"--predict_input={images}", ignored)) == 0
    ddp_files = {p.relative_to(ddp / "predictions"): p for p in (ddp / "predictions").rglob("*.png")}
    one_files = {p.relative_to(single / "predictions"): p for p in (single / "predictions").rglob("*.png")}
    assert len(ddp_files) == 2 * 20  # a mask and an overlay for each of the 20 images
    assert ddp_files.keys() == one_files.keys()
    for name, path in ddp_files.items():
        assert np.array_equal(read_image(path), read_image(one_files[name]))
        # The same texts, but for the model file each run names: its own copy of best.pth.
        texts, other = read_texts(path), read_texts(one_files[name])
        made, made_one = (json.loads(t.pop(tile_prediction.MADE_WITH_KEY)) for t in (texts, other))
        assert texts == other and made["model"] != made_one["model"]
        assert {k: v for k, v in made.items() if not k.startswith("model")} == {
            k: v for k, v in made_one.items() if not k.startswith("model")
        }
