"""config.py: typed overrides, the unknown-key error, --help, saved configs, path guards."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import close_log_files

import cli
import config
import files
import runtime

REQUIRED_KEYS = (
    "data_dir run_dir image_subdir label_subdir mask_suffix epochs batch_size lr weight_decay step_size gamma "
    "base_width in_channels n_classes dropout seed device num_workers"
).split()


def test_required_keys_exist_with_reference_defaults() -> None:
    cfg = config.Config()
    names = {f.name for f in dataclasses.fields(config.Config)}
    assert set(REQUIRED_KEYS) <= names
    assert (cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.step_size, cfg.gamma, cfg.epochs) == (
        5,
        1e-4,
        1e-8,
        20,
        0.5,
        100,
    )
    assert (cfg.base_width, cfg.dropout, cfg.n_classes, cfg.aug_prob, cfg.snapshot_every) == (64, 0.3, 2, 0.6, 10)
    assert cfg.split_ratios == (0.8, 0.1, 0.1)


def test_every_key_has_a_comment() -> None:
    comments = cli.key_comments()
    missing = [f.name for f in dataclasses.fields(config.Config) if not comments.get(f.name)]
    assert missing == []


def test_overrides_are_converted_to_the_defaults_type() -> None:
    cfg = cli.parse_args(
        [
            "--epochs=7",
            "--lr=0.003",
            "--resume=TRUE",
            "--online_aug=no",
            "--split_ratios=0.7,0.2,0.1",
            "--data_dir=a b/数据",
        ]
    )
    assert cfg.epochs == 7 and isinstance(cfg.epochs, int)
    assert cfg.lr == pytest.approx(0.003)
    assert cfg.resume is True and cfg.online_aug is False
    assert cfg.split_ratios == (0.7, 0.2, 0.1)
    assert cfg.data_dir == "a b/数据"


def test_the_command_says_which_keys_it_gave() -> None:
    cfg, given = cli.parse_command(["--recipe=recommended", "--lr=0.01", "--epochs=5", "--epochs=6"])
    assert given == {"recipe", "lr", "epochs"}  # the recipe's keys are filled in, not given
    assert (cfg.loss, cfg.lr, cfg.epochs) == ("ce_dice", 0.01, 6)


def test_unknown_key_lists_the_valid_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown config key 'epoch'.*valid keys are: .*epochs"):
        cli.parse_args(["--epoch=3"])


def test_wrong_type_names_key_and_expected_type() -> None:
    with pytest.raises(ValueError, match=r"--epochs='ten': expected a value of type int"):
        cli.parse_args(["--epochs=ten"])
    with pytest.raises(ValueError, match=r"--resume='maybe': expected a value of type bool \(true or false; "):
        cli.parse_args(["--resume=maybe"])


def test_a_negative_seed_worker_count_or_batch_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"--seed=-1: expected a seed of 0 or more; use --seed=42"):
        cli.parse_args(["--seed=-1"])
    # Taken as 0 (chosen from free memory) without a word; torch's own message, naming no key.
    with pytest.raises(ValueError, match=r"--predict_batch_size=-1: expected 0 or more tiles per forward pass"):
        cli.parse_args(["--predict_batch_size=-1"])
    with pytest.raises(ValueError, match=r"--num_workers=-2: expected 0 or more loader worker processes"):
        cli.parse_args(["--num_workers=-2"])
    assert cli.parse_args(["--num_workers=0", "--predict_batch_size=0", "--seed=0"]).num_workers == 0


def test_malformed_argument_is_refused() -> None:
    with pytest.raises(ValueError, match="expected --key=value"):
        cli.parse_args(["--epochs", "3"])


def test_values_are_never_evaluated() -> None:
    cfg = cli.parse_args(["--run_dir=__import__('os').getcwd()"])
    assert cfg.run_dir == "__import__('os').getcwd()"


def test_help_lists_keys_defaults_and_comments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--help"], "Train the U-Net.")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "Train the U-Net." in out
    assert "--batch_size=5" in out and "tiles per training step" in out
    assert "--split_ratios=0.8,0.1,0.1" in out
    # Every comment starts in one column, however long the key and its default.
    rows = [line for line in out.splitlines() if line.startswith("  --")]
    columns = {re.match(r"  \S+ +", line).end() for line in rows}
    assert len(rows) == len(dataclasses.fields(config.Config)) and len(columns) == 1, columns


def test_help_into_a_closed_pipe_ends_quietly() -> None:
    reader, writer = os.pipe()
    os.close(reader)  # as `train.py --help | head -1` once head has its line
    try:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).parents[1] / "train.py"), "--help"],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(writer)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("name", ["gpu", "cuda0", "CPU:x"])
def test_a_device_torch_does_not_know_is_refused_with_the_names_it_takes(name: str) -> None:
    with pytest.raises(ValueError, match=f"--device={re.escape(name)}: expected auto, cpu, cuda or cuda:N"):
        runtime.select_device(name)
    assert runtime.select_device("cpu").type == "cpu"


def test_save_config_writes_the_resolved_values(tmp_path: Path) -> None:
    cfg = cli.parse_args([f"--run_dir={tmp_path / 'run'}", "--epochs=3"])
    path = cli.save_config(cfg, "train")
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert path == tmp_path / "run" / "configs" / "train.json"
    assert saved["epochs"] == 3 and saved["batch_size"] == 5


def test_why_a_script_stopped_goes_to_its_log_file_and_once_to_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.utils.data._utils, "python_exit_status", False)  # a stop sets it: restored after
    stops = [
        (ValueError("--lr='x': expected a value of type float"), 2, "error: --lr='x': expected a value of type float"),
        (
            FloatingPointError("epoch 2: the training loss became nan"),
            2,
            "error: epoch 2: the training loss became nan",
        ),
        (cli.Terminated(), 143, "terminated (SIGTERM); outputs written so far are complete"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ]
    cli.setup_logging(config.Config(run_dir=str(tmp_path)), "split_dataset")
    try:
        for error, status, line in stops:

            def stopped(error: BaseException = error) -> int:
                raise error

            assert cli.run_main(stopped) == status
            assert capsys.readouterr().err.count(line) == 1

        def buggy() -> int:
            raise TypeError("a bug")

        with pytest.raises(TypeError, match="a bug"):  # raised as before; its traceback also goes to the log
            cli.run_main(buggy)
    finally:
        close_log_files()
    log = (tmp_path / "logs" / "split_dataset.log").read_text(encoding="utf-8")
    for _, _, line in stops:
        assert line in log
    assert "split_dataset ERROR error: epoch 2: the training loss became nan" in log
    assert "split_dataset WARNING interrupted" in log
    assert "stopped by an unexpected error:\nTraceback" in log


def test_a_log_file_on_a_full_disk_is_one_line_not_a_traceback_per_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run folder whose disk fills: logging printed "--- Logging error ---" and a traceback for every line the log
    file could not take, the line that says why the script stopped among them."""

    class FullDisk(io.StringIO):
        def flush(self) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full() -> int:
        logging.getLogger("split_dataset").info("a line the log file cannot take")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "splits" / "train.txt"))

    cli.setup_logging(config.Config(run_dir=str(tmp_path)), "split_dataset")
    try:
        (log,) = [
            h
            for h in logging.getLogger().handlers
            if isinstance(h, logging.FileHandler) and getattr(h, "farmland_pipeline", "")
        ]
        log.stream.close()
        log.stream = FullDisk()
        assert cli.run_main(full) == 1
    finally:
        close_log_files()
    err = capsys.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err
    assert err.count("split_dataset.log: the log could not be written (No space left on device)") == 1
    assert err.count(f"error: {tmp_path / 'splits' / 'train.txt'}: could not be written (No space left") == 1


def test_a_value_error_keeps_its_traceback_in_the_log_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A ValueError of a slip in the code reads on the terminal like a refused input: the log says where it was."""

    def slip() -> int:
        first, second = (1, 2, 3)
        return first + second

    cli.setup_logging(config.Config(run_dir=str(tmp_path)), "split_dataset")
    try:
        assert cli.run_main(slip) == 2
    finally:
        close_log_files()
    said = capsys.readouterr().err
    assert said.startswith("error: too many values to unpack") and said.count("\n") == 1  # one line, as before
    log = (tmp_path / "logs" / "split_dataset.log").read_text(encoding="utf-8")
    assert "where the error above was raised:\nTraceback" in log and "first, second = (1, 2, 3)" in log


def test_run_dir_inside_data_dir_is_refused(tmp_path: Path) -> None:
    cfg = cli.parse_args([f"--data_dir={tmp_path}", f"--run_dir={tmp_path / 'runs'}"])
    with pytest.raises(ValueError, match="lies inside data_dir"):
        cli.check_paths(cfg)


@pytest.mark.parametrize("key", ["run_dir", "data_dir"])
def test_an_empty_run_or_data_folder_is_refused(tmp_path: Path, key: str) -> None:
    # --run_dir= wrote splits/, logs/ and configs/ into the current folder; --data_dir= called every run_dir
    # below it "inside data_dir ''".
    cfg = cli.parse_args([f"--data_dir={tmp_path / 'data'}", f"--run_dir={tmp_path / 'run'}", f"--{key}="])
    with pytest.raises(ValueError, match=rf"--{key} is empty, which would be the current folder .* --{key}="):
        cli.check_paths(cfg)


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    files.atomic_write_text(tmp_path / "a.txt", "first")
    files.atomic_write_text(tmp_path / "a.txt", "second")
    assert (tmp_path / "a.txt").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_write_gives_ordinary_permissions_without_touching_the_umask(
    tmp_path: Path, umask: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    previous = os.umask(umask)
    try:
        # Setting the mask and putting it back would let a writer thread create a file with no mask meanwhile.
        with monkeypatch.context() as patch:
            patch.setattr(os, "umask", lambda *_: pytest.fail("os.umask changes the mask for every thread"))
            files.atomic_write_text(tmp_path / "b.txt", "x")
        assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    finally:
        os.umask(previous)


def test_configuration_doc_documents_every_key() -> None:
    """docs/configuration.md's key table lists every key of config.Config, and no key that it lacks."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text(encoding="utf-8")
    lines = doc.splitlines()
    header = [i for i, line in enumerate(lines) if line.replace(" ", "") == "|key|default|meaning|"]
    assert len(header) == 1, "docs/configuration.md needs exactly one '| key | default | meaning |' table"
    listed: list[str] = []
    for line in lines[header[0] + 2 :]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        match = re.match(r"\| `(\w+)` \|", line)
        assert match, f"docs/configuration.md: a key table row not formatted as | `key` | ...: {line!r}"
        listed.append(match.group(1))
    keys = [f.name for f in dataclasses.fields(config.Config)]
    undocumented = [key for key in keys if key not in listed]
    unknown = [key for key in listed if key not in keys]
    duplicated = sorted({key for key in listed if listed.count(key) > 1})
    assert (undocumented, unknown, duplicated) == ([], [], [])
