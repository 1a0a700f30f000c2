"""Faults survived and untrusted files refused: kill -9 and resume, interrupted saves, NaN losses, full or
unwritable disks, interrupted predictions, crafted checkpoints, broken splits, palette masks."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import ROOT, args, close_log_files, folder_digest, square_tile, weights
from PIL import Image

import cli
import files
import predict
import split_dataset
import tile_prediction
import train
from data_preprocess import load_mask, read_image, read_pair_list, write_image
from files import DataError
from metrics import confusion_matrix
from png_text import read_texts
from runtime import load_checkpoint, save_checkpoint
from tile_prediction import SOURCE_KEY


def epochs_logged(run_dir: Path) -> int:
    try:
        with open(run_dir / "train_log.csv", encoding="utf-8-sig") as handle:
            return len(list(csv.DictReader(handle)))
    except (OSError, csv.Error):
        return 0


def test_kill_9_then_resume_gives_the_weights_of_an_uninterrupted_run(square_data: Path, tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    settings = ["--epochs=25", "--deterministic=true"]
    for run_dir in (straight, killed):
        split_dataset.main(args(square_data, run_dir))
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args(square_data, killed, *settings)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while epochs_logged(killed) < 3 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL  # it really was killed, not finished
    interrupted_at = torch.load(killed / "checkpoints" / "last.pth", weights_only=True)["epoch"]
    assert 3 <= interrupted_at < 25
    assert train.main(args(square_data, killed, *settings, "--resume=true")) == 0
    assert train.main(args(square_data, straight, *settings)) == 0
    a, b = weights(straight / "checkpoints" / "last.pth"), weights(killed / "checkpoints" / "last.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


SIGNALLED_WRITE = """
import os, signal, sys
from pathlib import Path
import cli, files

real_replace = os.replace


def replace_after_sigterm(source, target):  # SIGTERM lands between writing the file and renaming it
    os.kill(os.getpid(), signal.SIGTERM)
    real_replace(source, target)


def main():
    out = Path(sys.argv[1])
    files.atomic_write_bytes(out, b"first")
    os.replace = replace_after_sigterm
    files.atomic_write_bytes(out, b"second")
    return 0


sys.exit(cli.run_main(main))
"""

GROUP_STOPPED_LOADER = """
import sys
import time
from multiprocessing import synchronize
from pathlib import Path
from torch.utils.data import DataLoader
import cli, files


def slow_is_set(event):
    with event._cond:  # each worker checks the shared stop event before each batch, holding its lock a while
        time.sleep(0.02)
        return event._flag.acquire(False) and (event._flag.release() or True)


def main():
    synchronize.Event.is_set = slow_is_set
    out = Path(sys.argv[1])
    loader = DataLoader(range(1_000_000), batch_size=1, num_workers=2, persistent_workers=True)
    while True:
        for _ in loader:
            files.atomic_write_bytes(out, bytes(4_000_000))
            print("written", flush=True)


sys.exit(cli.run_main(main))
"""


FAILING_LOADER = """
import sys
from torch.utils.data import DataLoader
import cli


def main():
    for batch in DataLoader(range(1_000_000), batch_size=1, num_workers=2, persistent_workers=True):
        if batch.item() == 10:
            raise RuntimeError("a fault in the middle of a loader loop")


sys.exit(cli.run_main(main))
"""


class UnreadableTiles(torch.utils.data.Dataset):
    """Tiles that fail in the loader's worker, as a tile changed after the split would."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> torch.Tensor:
        raise DataError(f"t{index}.tif: floating-point image with values outside [0, 1]; rescale it")


def test_an_input_error_in_a_loader_worker_is_one_line(capsys: pytest.CaptureFixture) -> None:
    def main() -> int:
        for _ in torch.utils.data.DataLoader(UnreadableTiles(), num_workers=1):
            pass
        return 0

    assert cli.run_main(main) == 2
    assert capsys.readouterr().err == "error: t0.tif: floating-point image with values outside [0, 1]; rescale it\n"


def test_a_loader_worker_killed_by_sigterm_ends_the_run_as_terminated(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PyTorch's SIGCHLD handler may report the group's SIGTERM from a worker before this process's own arrives.
    monkeypatch.setattr(torch.utils.data._utils, "python_exit_status", False)  # restored after the test

    def stopped() -> int:
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")

    def broken() -> int:
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Segmentation fault. ")

    assert cli.run_main(stopped) == 143
    assert capsys.readouterr().err.startswith("terminated (SIGTERM); outputs written so far are complete")
    assert torch.utils.data._utils.python_exit_status is True  # its workers are left to the exit
    with pytest.raises(RuntimeError, match="Segmentation fault"):
        cli.run_main(broken)


def run_signalled(script: str, out: Path, group: bool = False) -> subprocess.CompletedProcess:
    """Run a script that writes ``out``; with ``group``, SIGTERM its whole process group (a scheduler's stop:
    the loader workers get it too) once it has written once."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=group,
    )
    if group:
        assert process.stdout is not None and process.stdout.readline().strip() == "written"
        os.killpg(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_sigterm_during_a_write_drops_it_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    out = tmp_path / "outputs" / "result.bin"
    done = run_signalled(SIGNALLED_WRITE, out)
    assert done.returncode == 143, done.stderr
    assert "terminated (SIGTERM)" in done.stderr and "Traceback" not in done.stderr
    assert [p.name for p in out.parent.iterdir()] == ["result.bin"]  # no .result.bin.*.tmp left behind
    assert out.read_bytes() == b"first"  # the last complete write, never the interrupted one


def test_a_signal_just_as_the_temporary_file_is_made_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "outputs" / "result.bin"
    files.atomic_write_bytes(out, b"first")
    real_open, opened = os.open, []

    def open_then_signalled(*given: object) -> int:
        opened.append(real_open(*given))  # the file exists; the signal is handled before its descriptor is bound
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "open", open_then_signalled)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write_bytes(out, b"second")
    monkeypatch.undo()
    os.close(opened[0])
    assert [p.name for p in out.parent.iterdir()] == ["result.bin"] and out.read_bytes() == b"first"


def test_a_disk_turned_read_only_is_named_by_the_output_not_its_temporary_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A drive that turned read-only refuses the temporary file itself: the line said ".last.pth.3f9a0c21e4b7.tmp
    # could not be written", a file the user never sees, instead of checkpoints/last.pth.
    out = tmp_path / "checkpoints" / "last.pth"
    files.atomic_write_bytes(out, b"first")

    def read_only(*_: object) -> int:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out.parent / ".last.pth.3f9a0c21e4b7.tmp"))

    monkeypatch.setattr(files.os, "open", read_only)
    with pytest.raises(OSError) as raised:
        files.atomic_write_bytes(out, b"second")
    monkeypatch.undo()
    assert raised.value.errno == errno.EROFS and raised.value.filename == str(out)
    assert files.disk_problem(raised.value).startswith(f"{out}: could not be written (Read-only file system)")
    assert [p.name for p in out.parent.iterdir()] == ["last.pth"] and out.read_bytes() == b"first"


def test_the_temporary_file_of_a_write_killed_with_9_is_removed_by_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "checkpoints" / "last.pth"
    files.atomic_write_bytes(out, b"first")

    def killed_before_rename(*_: object) -> None:
        raise KeyboardInterrupt

    # kill -9 between writing and renaming: nothing runs after it, so the temporary file stays.
    monkeypatch.setattr(files, "remove_quietly", lambda _: None)
    monkeypatch.setattr(files.os, "replace", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write_bytes(out, b"second")
    monkeypatch.undo()
    (left,) = [p for p in out.parent.iterdir() if p != out]
    (out.parent / ".notes.txt.tmp").write_text("the user's own")  # not a name atomic_write_bytes gives
    assert files.remove_left_temporaries(out.parent) == [left]
    assert sorted(p.name for p in out.parent.iterdir()) == [".notes.txt.tmp", "last.pth"]
    assert out.read_bytes() == b"first"


def test_a_file_is_hashed_once_per_version_within_a_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "scene.tif"
    image.write_bytes(b"before")
    reads, real_open = [], open

    def counted_open(path: Path, *rest: object) -> object:
        reads.append(Path(path).name)
        return real_open(path, *rest)

    monkeypatch.setattr(files, "open", counted_open, raising=False)
    first = hashlib.sha256(b"before").hexdigest()
    assert files.file_digest(image) == files.file_digest(image) == first and reads == ["scene.tif"] * 2
    with files.remembered_digests():
        assert files.file_digest(image) == files.file_digest(image) == first and len(reads) == 3
        # Edited in place to the same size with its old time set back: its change time tells, and it is read again.
        was = image.stat()
        time.sleep(0.05)  # past the file system's clock tick
        image.write_bytes(b"after!")
        os.utime(image, ns=(was.st_atime_ns, was.st_mtime_ns))
        assert files.file_digest(image) == hashlib.sha256(b"after!").hexdigest() and len(reads) == 4
    assert files.REMEMBERED == []


def test_sigterm_to_the_process_group_with_loader_workers_unwinds_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "outputs" / "big.bin"
    done = run_signalled(GROUP_STOPPED_LOADER, out, group=True)
    assert done.returncode == 143, done.stderr
    assert "terminated (SIGTERM)" in done.stderr and "Traceback" not in done.stderr
    assert [p.name for p in out.parent.iterdir()] == ["big.bin"] and out.stat().st_size == 4_000_000


def test_an_error_with_loader_workers_running_ends_the_process(tmp_path: Path) -> None:
    # Raised past run_main, the error keeps the loader alive until the exit, which must still end its workers.
    done = run_signalled(FAILING_LOADER, tmp_path / "unused")
    assert done.returncode == 1 and "a fault in the middle of a loader loop" in done.stderr


def test_an_interrupted_checkpoint_save_leaves_the_previous_one(
    shared_square_data: Path, run_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = run_copy  # trained for one epoch

    def killed_before_rename(*_: object) -> None:
        raise KeyboardInterrupt  # stands for the process dying between writing and renaming

    monkeypatch.setattr(files.os, "replace", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(shared_square_data, run_dir, "--epochs=2", "--resume=true"))
    monkeypatch.undo()
    assert torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)["epoch"] == 1
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(
    square_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    split_dataset.main(args(square_data, run_dir))
    real_epoch = train.train_epoch
    calls = []

    def diverging_epoch(*a: object, **k: object) -> tuple[float, int]:
        calls.append(1)
        loss, steps = real_epoch(*a, **k)
        return (float("nan"), steps) if len(calls) == 2 else (loss, steps)

    monkeypatch.setattr(train, "train_epoch", diverging_epoch)
    with pytest.raises(
        FloatingPointError, match=r"epoch 2: the training loss became nan.*last good checkpoint.*Lower --lr"
    ):
        train.main(args(square_data, run_dir, "--epochs=3"))
    assert torch.load(run_dir / "checkpoints" / "last.pth", weights_only=True)["epoch"] == 1


def test_unwritable_run_folder_and_full_disk_fail_before_training(
    square_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=f"{blocker} is a file, not a folder; choose another --run_dir"):
        train.main(args(square_data, blocker / "run"))
    run_dir = tmp_path / "run"
    split_dataset.main(args(square_data, run_dir))
    monkeypatch.setattr(files.shutil, "disk_usage", lambda _: type("Usage", (), {"free": 1024})())
    with pytest.raises(ValueError, match=r"checkpoints: only 0 MiB free on its disk, about \d+ MiB are needed"):
        train.main(args(square_data, run_dir, "--epochs=1"))
    assert not (run_dir / "checkpoints" / "last.pth").exists()


def test_the_room_of_checkpoints_already_there_counts_as_held(
    run_copy: Path, shared_square_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A training stopped by a full disk says to free space and resume; the check before the first epoch asked for
    # room for four checkpoints as if best.pth and last.pth were not there, and refused a resume that fitted.
    last = run_copy / "checkpoints" / "last.pth"
    free = int(2.2 * last.stat().st_size)  # a temporary copy and a snapshot; not four checkpoints
    monkeypatch.setattr(files.shutil, "disk_usage", lambda _: type("Usage", (), {"free": free})())
    assert train.main(args(shared_square_data, run_copy, "--resume=true", "--epochs=2")) == 0
    assert torch.load(last, weights_only=True)["epoch"] == 2


def set_modes(folder: Path, write: bool) -> None:
    """chmod -R u+w (``write``) or a-w on a folder, itself included."""
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | 0o200 if write else mode & ~0o222)


def test_a_run_copied_from_a_read_only_folder_is_refused_in_one_line_before_any_work(
    shared_square_data: Path, run_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A class's shared run, read-only, copied with cp -r (the modes kept) and made writable at the top only:
    # every script died in a traceback opening logs/<script>.log, or later inside a folder it could not write.
    if os.geteuid() == 0:  # root writes anywhere: answer as the folder's owner would be answered
        monkeypatch.setattr(files.os, "access", lambda p, mode: not mode & os.W_OK or bool(os.stat(p).st_mode & 0o200))
    set_modes(run_copy, write=False)
    run_copy.chmod(0o755)
    try:
        before = folder_digest(run_copy)
        for script in (predict, train, split_dataset):
            with pytest.raises(ValueError) as raised:
                script.main(args(shared_square_data, run_copy, "--epochs=1"))
            assert str(raised.value) == (
                f"{run_copy}: checkpoints, configs, figures and 5 more inside it cannot be written (a copy keeps a "
                f"read-only folder's modes); make them writable (chmod -R u+w {run_copy}) or choose another --run_dir"
            )
        assert folder_digest(run_copy) == before
    finally:
        set_modes(run_copy, write=True)
    assert predict.main(args(shared_square_data, run_copy)) == 0


def test_another_owners_folder_inside_a_run_folder_is_not_taken_for_a_read_only_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run folder at the root of a volume given to its user holds root's lost+found (0700): every script refused
    # the run folder, advising a chmod that could not change lost+found, which nothing writes into.
    if os.geteuid() != 0:
        pytest.skip("another owner's folder needs chown, which only root may do")
    user = os.geteuid()  # root: answered as a user who writes only their own folders with a write bit

    def access(path: str | Path, mode: int) -> bool:
        info = os.stat(path)
        return not mode & os.W_OK or (info.st_uid == user and bool(info.st_mode & 0o200))

    monkeypatch.setattr(files.os, "access", access)
    run = tmp_path / "volume"
    (run / "lost+found").mkdir(parents=True, mode=0o700)
    os.chown(run / "lost+found", 65534, 65534)
    (run / "logs").mkdir()
    files.check_writable(run)
    (run / "logs").chmod(0o555)  # the user's own read-only folder: a copy's, refused as before
    with pytest.raises(ValueError, match=r"volume: logs inside it cannot be written"):
        files.check_writable(run)


def test_training_refuses_a_split_with_missing_files(square_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    split_dataset.main(args(square_data, run_dir))
    listed = read_pair_list(run_dir / "splits" / "train.txt")
    moved = tmp_path / "elsewhere.png"
    listed[0][0].rename(moved)  # a file removed after the split was made
    try:
        with pytest.raises(DataError, match=rf"no longer exist.*\n  {listed[0][0]}"):
            train.main(args(square_data, run_dir, "--epochs=1"))
    finally:
        moved.rename(listed[0][0])


def test_crafted_checkpoint_is_refused_without_running_its_code(square_data: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    crafted = tmp_path / "crafted.pth"
    torch.save({"model": Payload(), "config": {}}, crafted)
    run_dir = tmp_path / "run"
    split_dataset.main(args(square_data, run_dir))
    with pytest.raises(DataError, match="crafted.pth: not a loadable checkpoint"):
        predict.main(args(square_data, run_dir, f"--checkpoint={crafted}"))
    assert not marker.exists()


def test_a_checkpoint_cut_short_empty_or_a_folder_is_named_as_such(tmp_path: Path) -> None:
    # torch's words were shown: a miniz error cut off mid-sentence, an EOFError with no text, or (mapped) advice
    # to save with _use_new_zipfile_serialization; a folder was "not found".
    whole = tmp_path / "whole.pth"
    save_checkpoint(whole, {"model": {"w": torch.zeros(1000)}, "config": {}})
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "folder.pth").mkdir()
    for mmap in (False, True):
        with pytest.raises(DataError, match=r"cut\.pth: the start of a checkpoint without its end .*copy it again"):
            load_checkpoint(cut, mmap=mmap)
        with pytest.raises(DataError, match=r"empty\.pth: an empty file \(0 bytes\), .*copy it again"):
            load_checkpoint(tmp_path / "empty.pth", mmap=mmap)
    with pytest.raises(DataError, match=r"folder\.pth: a folder, not a checkpoint; name the \.pth file in it"):
        load_checkpoint(tmp_path / "folder.pth")
    assert load_checkpoint(whole)["model"]["w"].shape == (1000,)


def test_checkpoint_whose_weights_do_not_fit_its_config(
    shared_square_data: Path, run_copy: Path, tmp_path: Path
) -> None:
    state = torch.load(run_copy / "checkpoints" / "best.pth", weights_only=True)
    state["config"]["base_width"] = 8  # the weights are of width 4
    torch.save(state, tmp_path / "mismatch.pth")
    with pytest.raises(DataError, match="checkpoint weights do not fit a U-Net of its own config"):
        predict.main(args(shared_square_data, run_copy, f"--checkpoint={tmp_path / 'mismatch.pth'}"))


def test_interrupted_prediction_is_resumed_not_redone(
    shared_square_data: Path, trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    split_dataset.main(args(shared_square_data, run_dir, "--split_ratios=0.5,0.1,0.4"))  # 8 test tiles
    shutil.copytree(trained_run / "checkpoints", run_dir / "checkpoints")  # the trained network, file times kept
    assert predict.main(args(shared_square_data, run_dir)) == 0
    masks = sorted((run_dir / "predictions").glob("*_seg.png"))
    assert len(masks) == 8
    stamps = {m: m.stat().st_mtime_ns for m in masks}
    masks[0].unlink()  # as if the first run had stopped before this one
    assert predict.main(args(shared_square_data, run_dir)) == 0
    assert "7 of 8 image(s) already have masks from this checkpoint and are skipped" in caplog.text
    assert masks[0].is_file()
    assert all(m.stat().st_mtime_ns == stamps[m] for m in masks[1:])
    # Masks older than the checkpoint came from other weights: they are redone.
    checkpoint = run_dir / "checkpoints" / "best.pth"
    os.utime(checkpoint, (time.time() + 60, time.time() + 60))
    assert predict.main(args(shared_square_data, run_dir)) == 0
    assert all(m.stat().st_mtime_ns != stamps[m] for m in masks[1:])
    # Another checkpoint, though older than every mask (a snapshot): all redone.
    other = run_dir / "checkpoints" / "last.pth"
    os.utime(other, (time.time() - 600, time.time() - 600))
    stamps = {m: m.stat().st_mtime_ns for m in masks}
    assert predict.main(args(shared_square_data, run_dir, f"--checkpoint={other}")) == 0
    assert all(m.stat().st_mtime_ns != stamps[m] for m in masks)
    # A new cut whose redo stopped after five masks: the next run with it redoes the other three.
    assert predict.main(args(shared_square_data, run_dir, f"--checkpoint={other}", "--threshold=0.3")) == 0
    since = json.loads((run_dir / "configs" / "predict_outputs.json").read_text(encoding="utf-8"))["tiles_since"]
    for mask in masks[:3]:
        os.utime(mask, (since - 60, since - 60))  # as if made before the cut changed
    caplog.clear()
    assert predict.main(args(shared_square_data, run_dir, f"--checkpoint={other}", "--threshold=0.3")) == 0
    assert "5 of 8 image(s) already have masks from this checkpoint and are skipped" in caplog.text
    assert all(m.stat().st_mtime > since for m in masks)


def test_tiles_of_another_folder_under_the_same_names_are_predicted_again(
    shared_square_data: Path, run_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = sorted((shared_square_data / "images").iterdir())[:3]
    dates = {}
    for date, turn in (("2019", 0), ("2022", 2)):  # the same names, other pixels: a later date's tiles
        dates[date] = tmp_path / date
        dates[date].mkdir()
        for image in images:
            write_image(dates[date] / image.name, np.rot90(read_image(image), turn).copy())
    fresh = tmp_path / "fresh"
    shutil.copytree(run_copy / "checkpoints", fresh / "checkpoints")
    assert predict.main(args(shared_square_data, fresh, f"--predict_input={dates['2022']}")) == 0
    expected = {m.name: read_image(m) for m in (fresh / "predictions").glob("*_seg.png")}
    assert predict.main(args(shared_square_data, run_copy, f"--predict_input={dates['2019']}")) == 0
    earlier = {image.stem: read_image(run_copy / "predictions" / f"{image.stem}_seg.png") for image in images}
    caplog.clear()
    assert predict.main(args(shared_square_data, run_copy, f"--predict_input={dates['2022']}")) == 0
    assert "already have masks" not in caplog.text
    assert len(expected) == 3
    for image in images:
        mask = run_copy / "predictions" / f"{image.stem}_seg.png"
        assert np.array_equal(read_image(mask), expected[mask.name])
        assert read_texts(mask).get(SOURCE_KEY) == str((dates["2022"] / image.name).resolve())
    # An image exported again after its mask was written, and one replaced by a copy that keeps its older time
    # (cp -p), are predicted again; the third is kept.
    later = time.time() + 60
    os.utime(dates["2022"] / images[0].name, (later, later))
    shutil.copy2(dates["2019"] / images[1].name, dates["2022"] / images[1].name)
    caplog.clear()
    assert predict.main(args(shared_square_data, run_copy, f"--predict_input={dates['2022']}")) == 0
    assert "1 of 3 image(s) already have masks from this checkpoint and are skipped" in caplog.text
    assert np.array_equal(read_image(run_copy / "predictions" / f"{images[1].stem}_seg.png"), earlier[images[1].stem])


def test_miou_scores_no_mask_made_from_another_image(
    shared_square_data: Path, run_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import miou

    assert predict.main(args(shared_square_data, run_copy)) == 0
    assert miou.main(args(shared_square_data, run_copy)) == 0
    scored = json.loads((run_copy / "metrics.json").read_text(encoding="utf-8"))["n_images"]
    test_image = read_pair_list(run_copy / "splits" / "test.txt")[0][0]
    other = tmp_path / "other date" / test_image.name  # the same name in another folder, predicted into this run
    write_image(other, np.rot90(read_image(test_image)).copy())
    assert predict.main(args(shared_square_data, run_copy, f"--predict_input={other.parent}")) == 0
    caplog.clear()
    assert miou.main(args(shared_square_data, run_copy)) == 1
    assert f"was made from {other.resolve()}, not from the test image {test_image.resolve()}" in caplog.text
    assert json.loads((run_copy / "metrics.json").read_text(encoding="utf-8"))["n_images"] == scored - 1
    assert predict.main(args(shared_square_data, run_copy)) == 0  # the test split predicted again: all scored
    assert miou.main(args(shared_square_data, run_copy)) == 0
    # A test image touched after its mask was made: scored, with a warning to predict again if it changed.
    mask = run_copy / "predictions" / f"{test_image.stem}_seg.png"
    was = test_image.stat()
    later = mask.stat().st_mtime + 60
    os.utime(test_image, (later, later))
    caplog.clear()
    try:
        assert miou.main(args(shared_square_data, run_copy)) == 0
    finally:
        os.utime(test_image, ns=(was.st_atime_ns, was.st_mtime_ns))  # shared data: as it was for later tests
    assert f"{mask}: made before the test image {test_image.resolve()} last changed" in caplog.text
    assert json.loads((run_copy / "metrics.json").read_text(encoding="utf-8"))["n_images"] == scored
    # No gallery asked for: the earlier run's galleries go rather than stand beside these scores.
    galleries = [run_copy / "figures" / f"gallery_{name}.png" for name in ("worst", "best")]
    assert all(path.is_file() for path in galleries)
    assert miou.main(args(shared_square_data, run_copy, "--gallery_size=0")) == 0
    assert not any(path.exists() for path in galleries)
    # A negative count made a gallery of every tile but one, titled "-1 lowest farmland IoU".
    with pytest.raises(ValueError, match=r"--gallery_size=-1: expected tiles per gallery, 0 \(none\) or more"):
        miou.main(args(shared_square_data, run_copy, "--gallery_size=-1"))


def scored_names(run_dir: Path) -> list[str]:
    with open(run_dir / "per_image_metrics.csv", encoding="utf-8-sig") as handle:
        return [row["name"] for row in csv.DictReader(handle)]


def test_miou_scores_no_mask_an_interrupted_run_with_a_new_threshold_did_not_reach(
    shared_square_data: Path,
    trained_run: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import miou

    run_dir = tmp_path / "run"
    split_dataset.main(args(shared_square_data, run_dir, "--split_ratios=0.5,0.1,0.4"))  # 8 test tiles
    shutil.copytree(trained_run / "checkpoints", run_dir / "checkpoints")  # the trained network, file times kept
    pairs = read_pair_list(run_dir / "splits" / "test.txt")
    assert predict.main(args(shared_square_data, run_dir)) == 0  # the model's own cut (here the argmax)
    # predict.py --threshold=0.3 stopped after three masks: the other five are the earlier run's.
    write, redone = tile_prediction._write_tile_outputs, []

    def stopped_after_three(mask_path: Path, *rest: object) -> None:
        if len(redone) == 3:
            raise RuntimeError("stopped")
        write(mask_path, *rest)
        redone.append(mask_path.name.removesuffix("_seg.png"))

    monkeypatch.setattr(tile_prediction, "_write_tile_outputs", stopped_after_three)
    with pytest.raises(RuntimeError, match="stopped"):
        predict.main(args(shared_square_data, run_dir, "--threshold=0.3"))
    monkeypatch.undo()
    assert redone == [image.stem for image, _ in pairs[:3]]
    caplog.clear()
    assert miou.main(args(shared_square_data, run_dir)) == 1
    newest = max((run_dir / "predictions" / f"{image.stem}_seg.png" for image, _ in pairs[:3]), key=os.path.getmtime)
    assert (
        f"5 test mask(s) in {run_dir / 'predictions'}: expected the model and settings of the newest test mask, "
        f"{newest.name} (threshold 0.3), found others: {pairs[3][0].stem}_seg.png (threshold -1.0, the model's own)"
        in caplog.text
    )
    assert "and 2 more; not scored" in caplog.text and "predict the test split again" in caplog.text
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert scored_names(run_dir) == redone and metrics["n_images"] == 3
    made = metrics["made_with"]
    assert made["threshold"] == made["cut"] == 0.3 and made["n_images"] == 3
    assert made["model"] == str((run_dir / "checkpoints" / "best.pth").resolve())
    # The figures are those of the three masks made at 0.3 alone, recounted from the files.
    cm = sum(
        confusion_matrix(load_mask(run_dir / "predictions" / f"{image.stem}_seg.png"), load_mask(label))
        for image, label in pairs[:3]
    )
    assert metrics["pooled_confusion"] == {"tp": cm[1, 1], "fp": cm[0, 1], "fn": cm[1, 0], "tn": cm[0, 0]}
    assert metrics["pooled"]["farmland_iou"] == pytest.approx(cm[1, 1] / (cm[1, 1] + cm[0, 1] + cm[1, 0]))
    # The run finished: every mask scored.
    assert predict.main(args(shared_square_data, run_dir, "--threshold=0.3")) == 0
    assert miou.main(args(shared_square_data, run_dir)) == 0
    assert scored_names(run_dir) == [image.stem for image, _ in pairs]
    # Other images predicted into the run with other settings leave the test masks as one set: still scored.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(pairs[0][0], other / "elsewhere.png")
    assert predict.main(args(shared_square_data, run_dir, f"--predict_input={other}", "--tta=true")) == 0
    assert miou.main(args(shared_square_data, run_dir)) == 0
    assert scored_names(run_dir) == [image.stem for image, _ in pairs]


def test_miou_scores_no_mask_of_an_older_version_beside_those_an_interrupted_run_made(
    shared_square_data: Path, tmp_path: Path, trained_run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import miou

    run_dir = tmp_path / "run"
    split_dataset.main(args(shared_square_data, run_dir, "--split_ratios=0.5,0.1,0.4"))  # 8 test tiles
    shutil.copytree(trained_run / "checkpoints", run_dir / "checkpoints")
    pairs = read_pair_list(run_dir / "splits" / "test.txt")
    assert predict.main(args(shared_square_data, run_dir)) == 0
    # An older version wrote the same masks without a record of how; its run predated the update, whose
    # predict.py was stopped after the first three masks.
    older = [run_dir / "predictions" / f"{image.stem}_seg.png" for image, _ in pairs[3:]]
    for mask in older:
        write_image(mask, load_mask(mask) * 255)
        os.utime(mask, ns=(mask.stat().st_mtime_ns - 10**9,) * 2)
        assert not read_texts(mask)
    caplog.clear()
    assert miou.main(args(shared_square_data, run_dir)) == 1
    assert f"5 test mask(s) in {run_dir / 'predictions'}: expected the model and settings of the newest" in caplog.text
    assert "found none recorded (masks of an older version" in caplog.text and older[0].name in caplog.text
    assert scored_names(run_dir) == [image.stem for image, _ in pairs[:3]]
    assert json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["n_images"] == 3
    # A mask not there is named as not found, not as one of an older version.
    kept, times = older[0].read_bytes(), older[0].stat().st_mtime_ns
    older[0].unlink()
    caplog.clear()
    assert miou.main(args(shared_square_data, run_dir)) == 1
    assert f"{older[0]}: prediction not found" in caplog.text
    said = [line for line in caplog.text.splitlines() if "found none recorded" in line]
    assert len(said) == 1 and "4 test mask(s) in" in said[0] and f" {older[0].name}" not in said[0]
    older[0].write_bytes(kept)
    os.utime(older[0], ns=(times, times))
    # Masks that all record nothing (an older version's whole run) are scored as they are.
    for image, _ in pairs[:3]:
        mask = run_dir / "predictions" / f"{image.stem}_seg.png"
        write_image(mask, load_mask(mask) * 255)
    caplog.clear()
    assert miou.main(args(shared_square_data, run_dir)) == 0
    assert scored_names(run_dir) == [image.stem for image, _ in pairs]
    assert json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["made_with"] is None
    assert "record no model" not in caplog.text
    # Trained again since (here: best.pth newer than every mask), they are still scored, with a warning.
    best = run_dir / "checkpoints" / "best.pth"
    later = time.time() + 10
    os.utime(best, (later, later))
    caplog.clear()
    assert miou.main(args(shared_square_data, run_dir)) == 0
    assert f"8 test mask(s) in {run_dir / 'predictions'} record no model (an older version's) and are older " in (
        caplog.text
    )
    assert f"than {best} (" in caplog.text and "predict the test split again" in caplog.text


def test_miou_scores_no_mask_of_a_model_trained_again_since(
    shared_square_data: Path, run_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import miou

    best = run_copy / "checkpoints" / "best.pth"
    assert predict.main(args(shared_square_data, run_copy)) == 0
    assert miou.main(args(shared_square_data, run_copy)) == 0
    first = json.loads((run_copy / "metrics.json").read_text(encoding="utf-8"))
    stamp = files.file_stamp(best)
    assert first["made_with"]["model"] == str(best.resolve()) and first["made_with"]["model_stamp"] == stamp
    assert first["made_with"]["threshold"] == -1 and first["made_with"]["cut"] is None  # the argmax: not tuned
    kept = Path(shutil.copy2(best, tmp_path / "old best.pth"))  # the weights the masks were made with, time kept
    assert train.main(args(shared_square_data, run_copy, "--epochs=1")) == 0  # a fresh run: a new best.pth
    caplog.clear()
    assert miou.main(args(shared_square_data, run_copy)) == 1
    shown = files.shown_stamp(stamp)  # the size and the time, not the stamp's nanoseconds
    assert shown.endswith(" UTC") and " ns" not in shown
    assert f"were made with {best.resolve()} as it was then ({shown}), and it has changed since" in caplog.text
    assert "no test image could be scored" in caplog.text
    assert json.loads((run_copy / "metrics.json").read_text(encoding="utf-8")) == first  # not rewritten
    # Named as made with another file than the one named now, with how to score them as they are.
    caplog.clear()
    assert miou.main(args(shared_square_data, run_copy, f"--checkpoint={run_copy / 'checkpoints' / 'last.pth'}")) == 1
    assert f"not with {(run_copy / 'checkpoints' / 'last.pth').resolve()}" in caplog.text
    assert "named by --checkpoint, and theirs has changed since;" in caplog.text
    # Scoring the older model's masks on purpose: name the weights they were made with.
    with pytest.raises(ValueError, match="no such file; name the model the masks were made with"):
        miou.main(args(shared_square_data, run_copy, f"--checkpoint={tmp_path / 'missing.pth'}"))
    assert miou.main(args(shared_square_data, run_copy, f"--checkpoint={kept}")) == 0
    assert json.loads((run_copy / "metrics.json").read_text(encoding="utf-8"))["made_with"]["model_stamp"] == stamp
    # Masks predicted with another model (a copy, an ONNX export) that is still as it was are scored without
    # naming it; naming another model refuses them, and the message offers theirs.
    assert predict.main(args(shared_square_data, run_copy, f"--checkpoint={kept}")) == 0
    assert miou.main(args(shared_square_data, run_copy)) == 0
    assert json.loads((run_copy / "metrics.json").read_text(encoding="utf-8"))["made_with"]["model"] == str(kept)
    caplog.clear()
    assert miou.main(args(shared_square_data, run_copy, f"--checkpoint={best}")) == 1
    assert f"name theirs (--checkpoint={kept}) or no model at all" in caplog.text
    # Masks of an older version, which record no model, are scored as before.
    for mask in (run_copy / "predictions").glob("*_seg.png"):
        texts = {k: v for k, v in read_texts(mask).items() if k != tile_prediction.MADE_WITH_KEY}
        write_image(mask, load_mask(mask) * np.uint8(255), texts)
    assert miou.main(args(shared_square_data, run_copy)) == 0
    assert json.loads((run_copy / "metrics.json").read_text(encoding="utf-8"))["made_with"] is None
    # Predicted again with the new best.pth: scored, and metrics.json names it.
    assert predict.main(args(shared_square_data, run_copy)) == 0
    assert miou.main(args(shared_square_data, run_copy)) == 0
    made = json.loads((run_copy / "metrics.json").read_text(encoding="utf-8"))["made_with"]
    assert made["model_stamp"] == files.file_stamp(best) != stamp and made["n_images"] == 2
    # The run folder moved with its times (mv, cp -a, rsync -a): its model is found under its name there.
    moved = Path(shutil.copytree(run_copy, tmp_path / "moved", copy_function=shutil.copy2))
    os.utime(best, ns=(1, 1))  # where the masks record it, it has changed since (trained again), but not the copy
    assert miou.main(args(shared_square_data, moved)) == 0
    os.utime(moved / "checkpoints" / "best.pth", ns=(1, 1))  # no file is as it was: refused
    assert miou.main(args(shared_square_data, moved)) == 1
    best.unlink()
    (moved / "checkpoints" / "best.pth").unlink()  # nowhere at all: the masks are scored as made
    caplog.clear()
    assert miou.main(args(shared_square_data, moved)) == 0
    assert "the model the test masks record, is not there (a run folder moved?): scored as made" in caplog.text


def test_names_that_are_not_utf8_are_reported_and_the_rest_go_on(
    square_data: Path, run_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = sorted((square_data / "images").iterdir())
    odd = Path(os.fsdecode(os.fsencode(images[0].parent) + b"/\xb8\xfb\xb5\xd8.png"))  # GBK bytes of 耕地
    shutil.copy(images[0], odd)
    run_dir = tmp_path / "split run"
    assert split_dataset.main(args(square_data, run_dir)) == 1  # an unusable file: reported, the split made
    listed = sum(len(read_pair_list(run_dir / "splits" / f"{name}.txt")) for name in ("train", "val", "test"))
    assert listed == len(images)
    assert r"\xb8\xfb\xb5\xd8.png: the file name is not UTF-8" in caplog.text
    assert r"\xb8\xfb\xb5\xd8.png" in (run_dir / "splits" / "rejected.csv").read_text(encoding="utf-8-sig")
    caplog.clear()
    assert predict.main(args(square_data, run_copy, f"--predict_input={square_data / 'images'}")) == 1
    assert r"\xb8\xfb\xb5\xd8.png: the file name is not UTF-8" in caplog.text
    assert sorted(m.name for m in (run_copy / "predictions").glob("*_seg.png")) == sorted(
        f"{image.stem}_seg.png" for image in images
    )


def test_output_folder_is_never_an_input_folder(shared_square_data: Path, run_copy: Path) -> None:
    predict.main(args(shared_square_data, run_copy))
    with pytest.raises(DataError, match="lies in the output folder"):
        predict.main(args(shared_square_data, run_copy, f"--predict_input={run_copy / 'predictions'}"))


def test_palette_masks_are_read_as_their_indices(tmp_path: Path) -> None:
    # labelme and VOC write masks as palette PNGs whose indices are the classes (1 = farmland, drawn red here);
    # they were refused as colour masks, with a conversion to run on every file first.
    palette_mask = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    palette_mask.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette_mask.save(tmp_path / "p_mask.png")
    assert load_mask(tmp_path / "p_mask.png").tolist() == [[0, 1], [1, 0]]
    # A one-band TIFF with a colour table (ArcGIS's Classified Tiles labels): its class values, not its colours.
    profile = {"driver": "GTiff", "width": 2, "height": 2, "count": 1, "dtype": "uint8", "photometric": "palette"}
    profile["transform"] = rasterio.Affine(1, 0, 0, 0, -1, 2)
    with rasterio.open(tmp_path / "t.tif", "w", **profile) as dst:
        dst.write(np.array([[[0, 1], [1, 0]]], np.uint8))
        dst.write_colormap(1, {0: (0, 0, 0, 255), 1: (0, 255, 0, 255)})
    assert load_mask(tmp_path / "t.tif").tolist() == [[0, 1], [1, 0]]
    grey = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    grey.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    grey.save(tmp_path / "g_mask.png")
    assert load_mask(tmp_path / "g_mask.png").tolist() == [[0, 1]]
    # Indices of several classes are class numbers: refused with the recoding, as a grey mask of them is.
    classes = Image.fromarray(np.kron(np.array([[0, 1], [2, 0]], np.uint8), np.ones((3, 3), np.uint8)), mode="P")
    classes.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    classes.save(tmp_path / "c_mask.png")
    with pytest.raises(DataError, match=r"c_mask\.png: .*class"):
        load_mask(tmp_path / "c_mask.png")


def test_a_folder_of_palette_masks_is_split_and_flipped(tmp_path: Path) -> None:
    import augment

    data, run_dir = tmp_path / "data", tmp_path / "run"
    rng = np.random.default_rng(0)
    for i in range(10):
        image, mask = square_tile(rng)
        write_image(data / "images" / f"t{i}.png", image)
        palette = Image.fromarray((mask > 0).astype(np.uint8), mode="P")
        palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
        (data / "labels").mkdir(parents=True, exist_ok=True)
        palette.save(data / "labels" / f"t{i}_mask.png")
    assert split_dataset.main(args(data, run_dir)) == 0
    assert augment.main(args(data, run_dir, "--aug_prob=1")) == 0
    close_log_files()
    flipped = sorted((run_dir / "augmented" / "labels").glob("*.png"))
    assert flipped and all(set(np.unique(load_mask(m))) <= {0, 1} for m in flipped)
    assert all(load_mask(m).any() for m in flipped)


def test_augment_reports_a_broken_tile_and_flips_the_rest(
    square_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import augment

    run_dir = tmp_path / "run"
    split_dataset.main(args(square_data, run_dir))
    listed = read_pair_list(run_dir / "splits" / "train.txt")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    lines = [f"{broken}\t{listed[0][1]}"] + [f"{i}\t{m}" for i, m in listed[1:]]
    (run_dir / "splits" / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert augment.main(args(square_data, run_dir, "--aug_prob=1")) == 1
    assert "broken.png: not a readable image" in caplog.text
    assert len(list((run_dir / "augmented" / "images").iterdir())) == 2 * (len(listed) - 1)


def replace_best_pth_after(monkeypatch: pytest.MonkeyPatch, name: str, best: Path, new: Path) -> None:
    """Make train.py's atomic save of a new best.pth (the weights of ``new``) land right after predict.py's
    ``name`` (load_checkpoint or inference_model) first returns, as when training goes on in the same run."""
    original = getattr(predict, name)
    done: list[bool] = []

    def then_replace(*a: object, **k: object) -> object:
        result = original(*a, **k)
        if not done:
            done.append(True)
            files.atomic_write_bytes(best, new.read_bytes())
        return result

    monkeypatch.setattr(predict, name, then_replace)


def test_masks_record_the_weights_they_were_made_with_while_training_replaces_best_pth(
    shared_square_data: Path,
    run_copy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import miou

    best = run_copy / "checkpoints" / "best.pth"
    # Other weights, as the next epoch of a training still running would save them.
    state = torch.load(best, weights_only=True)
    state["model"] = {k: v + 0.5 if v.is_floating_point() else v for k, v in state["model"].items()}
    state["epoch"] = 2
    newer = tmp_path / "newer.pth"
    torch.save(state, newer)
    # Replaced as predict.py starts, after it read best.pth: the old code recorded the new file's stamp on masks of
    # the old weights, so miou.py scored them as the new model's and a second predict.py skipped them.
    replace_best_pth_after(monkeypatch, "inference_model", best, newer)
    with caplog.at_level(logging.WARNING, logger="predict"):
        assert predict.main(args(shared_square_data, run_copy)) == 0
    assert "was replaced while predicting (is train.py still training in this run?)" in caplog.text
    assert "weights loaded at the start (epoch 1)" in caplog.text
    monkeypatch.undo()
    caplog.clear()
    assert miou.main(args(shared_square_data, run_copy)) == 1
    assert "and it has changed since" in caplog.text
    made_before = {p.name: read_texts(p) for p in (run_copy / "predictions").glob("*_seg.png")}
    assert predict.main(args(shared_square_data, run_copy)) == 0  # redone with the new weights, not skipped
    made_after = {p.name: read_texts(p) for p in (run_copy / "predictions").glob("*_seg.png")}
    assert made_after and all(made_after[n] != made_before[n] for n in made_after)
    assert miou.main(args(shared_square_data, run_copy)) == 0
    scored = json.loads((run_copy / "metrics.json").read_text(encoding="utf-8"))["made_with"]
    assert scored["model_stamp"] == files.file_stamp(best)
    # Replaced while predict.py read it: read again, so the masks are the new weights' and say so.
    torch.save(torch.load(newer, weights_only=True) | {"epoch": 3}, newer)
    replace_best_pth_after(monkeypatch, "load_checkpoint", best, newer)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="predict"):
        assert predict.main(args(shared_square_data, run_copy)) == 0
    assert "(epoch 3)" in caplog.text and "was replaced while predicting" not in caplog.text
    monkeypatch.undo()
    assert miou.main(args(shared_square_data, run_copy)) == 0
