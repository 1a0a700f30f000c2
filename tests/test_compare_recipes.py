"""compare_recipes.py: variants, the ablation list, means over split seeds, and a tiny comparison end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import args, close_log_files, write_pair

import compare_recipes
from config import RECOMMENDED, Config
from data_preprocess import read_pair_list, split_scenes
from runtime import load_checkpoint


def test_variant_names_round_trip_to_train_arguments() -> None:
    variant = compare_recipes.parse_variant("recommended+dropout=0+colour_jitter=0")
    assert variant.name == "recommended+dropout=0+colour_jitter=0"
    assert variant.arguments() == ["--recipe=recommended", "--dropout=0", "--colour_jitter=0"]
    assert compare_recipes.parse_variant(" reference ").arguments() == ["--recipe=reference"]
    # A path in a variant (the weights to start from) stays one folder of the comparison.
    tuned = compare_recipes.parse_variant("recommended+init_weights=runs/a/checkpoints/best.pth")
    assert tuned.arguments()[1] == "--init_weights=runs/a/checkpoints/best.pth"
    assert tuned.folder == "recommended+init_weights=runs_a_checkpoints_best.pth"


@pytest.mark.parametrize(
    "text, named",
    [
        ("fancy", "'fancy'"),
        ("recommended+dropout", "'dropout'"),
        ("recommended+no_such_key=1", "'no_such_key=1'"),
        ("recommended+sieve_cells=0", "sieve_cells is a setting of prediction, not of training; give --sieve_cells=0"),
        ("reference+tta=true", "tta is a setting of prediction"),
    ],
)
def test_bad_variants_are_refused_with_the_part_at_fault(text: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        compare_recipes.parse_variant(text)


def test_ablation_turns_back_each_recommended_setting_alone() -> None:
    variants = compare_recipes.choose_variants("reference", ablate=True)
    names = [v.name for v in variants]
    assert names[:2] == ["reference", "recommended"]
    ablated = variants[2:]
    assert [v.changes[0][0] for v in ablated] == list(RECOMMENDED)
    assert all(len(v.changes) == 1 for v in ablated)
    # The reference's values, as train.py's command line reads them.
    assert "recommended+loss=ce" in names and "recommended+normalise=false" in names
    assert len(names) == len(set(names))


def test_means_over_split_seeds_are_computed_per_data_and_recipe() -> None:
    def row(seed: int, recipe: str, pooled: float | None, per_image: float | None) -> dict:
        return {
            "data": "all",
            "seed": seed,
            "recipe": recipe,
            "test_farmland_iou_pooled": pooled,
            "test_farmland_iou_per_image": per_image,
            "test_boundary_iou_pooled": 0.1,
            "test_predicted_farmland": 0.2,
            "train_minutes": 1.0,
        }

    rows = [row(1, "a", 0.5, 0.2), row(2, "a", 0.7, 0.4), row(3, "a", 0.6, 0.3), row(1, "b", 0.9, 0.9)]
    (mean,) = compare_recipes.mean_rows(rows)  # "b" ran on one seed only: no mean row
    assert mean["recipe"] == "a" and mean["seed"] == "mean"
    assert mean["test_farmland_iou_pooled"] == pytest.approx(0.6)
    assert mean["test_farmland_iou_per_image"] == pytest.approx(0.3)
    assert mean["worst_pooled"] == 0.5
    assert "**0.600** (worst 0.500)" in compare_recipes.table([mean])
    # A test split without farmland that none was predicted in: pooled IoU 0/0 (null), left out of the mean.
    rows = [row(1, "c", None, None), row(2, "c", 0.4, 0.2), row(1, "d", None, None), row(2, "d", None, None)]
    c, d = compare_recipes.mean_rows(rows)
    assert c["test_farmland_iou_pooled"] == pytest.approx(0.4) and c["worst_pooled"] == pytest.approx(0.4)
    assert d["test_farmland_iou_pooled"] is None and d["worst_pooled"] is None
    assert "**n/a** (worst n/a)" in compare_recipes.table([d])


def test_a_tiny_comparison_runs_scores_and_reuses_finished_runs(
    square_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "cmp"
    argv = [
        *args(square_data, run_dir, "--epochs=1", "--tensorboard=false"),
        "--variants=reference,recommended+dropout=0",
        "--split_seeds=3,4",
        "--skip_minority",
    ]
    assert compare_recipes.main(argv) == 0
    close_log_files()
    rows = json.loads((run_dir / "comparison.json").read_text(encoding="utf-8"))
    assert [(r["seed"], r["recipe"]) for r in rows] == [
        (3, "reference"),
        (3, "recommended+dropout=0"),
        (4, "reference"),
        (4, "recommended+dropout=0"),
    ]
    for r in rows:
        assert 0.0 <= r["test_farmland_iou_pooled"] <= 1.0
        assert r["tile_passes"] == r["train_tiles"] * r["epochs"] and r["epochs"] == 1
    # Each seed made its own scene split.
    split_3 = (run_dir / "seed_3" / "splits" / "test.txt").read_text(encoding="utf-8")
    split_4 = (run_dir / "seed_4" / "splits" / "test.txt").read_text(encoding="utf-8")
    assert split_3 != split_4
    saved = json.loads((run_dir / "seed_3" / "all" / "recommended+dropout=0" / "configs" / "train.json").read_text())
    assert saved["dropout"] == 0 and saved["recipe"] == "recommended" and saved["seed"] == 3
    table = (run_dir / "comparison.md").read_text(encoding="utf-8")
    assert "| all | mean | reference |" in table and "| all | mean | recommended+dropout=0 |" in table
    # A second call finds every run done and trains nothing again.
    checkpoint = run_dir / "seed_4" / "all" / "reference" / "checkpoints" / "best.pth"
    stamp = checkpoint.stat().st_mtime_ns
    assert compare_recipes.main(argv) == 0
    close_log_files()
    assert checkpoint.stat().st_mtime_ns == stamp
    assert json.loads((run_dir / "comparison.json").read_text(encoding="utf-8")) == rows
    # With --tta, finished runs gain their test-time-augmented figures, still without training again; the run's
    # own masks and metrics stay the plain ones.
    plain = (checkpoint.parents[1] / "metrics.json").read_text(encoding="utf-8")
    assert compare_recipes.main([*argv, "--tta"]) == 0
    close_log_files()
    assert checkpoint.stat().st_mtime_ns == stamp
    assert (checkpoint.parents[1] / "metrics.json").read_text(encoding="utf-8") == plain
    with_tta = json.loads((run_dir / "comparison.json").read_text(encoding="utf-8"))
    for before, after in zip(rows, with_tta):
        run = run_dir / f"seed_{after['seed']}" / "all" / after["recipe"]
        scored = json.loads((run / "tta" / "metrics.json").read_text(encoding="utf-8"))
        assert after["test_farmland_iou_pooled_tta"] == scored["pooled"]["farmland_iou"]
        assert after == {**before, **{k: after[k] for k in compare_recipes.extra_columns("tta")}}
    assert "with --tta |" in (run_dir / "comparison.md").read_text(encoding="utf-8")
    # --last scores each run's last epoch in its last/ folder; where the best epoch is the last, the same figures.
    assert compare_recipes.main([*argv, "--tta", "--last"]) == 0
    close_log_files()
    assert checkpoint.stat().st_mtime_ns == stamp
    with_last = json.loads((run_dir / "comparison.json").read_text(encoding="utf-8"))
    for before, after in zip(with_tta, with_last):
        run = run_dir / f"seed_{after['seed']}" / "all" / after["recipe"]
        scored = json.loads((run / "last" / "metrics.json").read_text(encoding="utf-8"))
        assert after["test_farmland_iou_per_image_last"] == scored["per_image"]["farmland_iou"]
        assert after == {**before, **{k: after[k] for k in compare_recipes.extra_columns("last")}}
        if after["best_epoch"] == after["epochs"]:
            assert after["test_farmland_iou_pooled_last"] == after["test_farmland_iou_pooled"]
    assert any(r["best_epoch"] == r["epochs"] for r in with_last)  # the comparison above was made
    assert "with --tta | last epoch |" in (run_dir / "comparison.md").read_text(encoding="utf-8")
    # A recommended recipe changed since is trained again under its old name; the reference is not.
    recommended = run_dir / "seed_4" / "all" / "recommended+dropout=0" / "checkpoints" / "best.pth"
    old_stamp = recommended.stat().st_mtime_ns
    monkeypatch.setitem(compare_recipes.RECOMMENDED, "lr", 2e-3)
    assert compare_recipes.main(argv) == 0
    close_log_files()
    assert checkpoint.stat().st_mtime_ns == stamp and recommended.stat().st_mtime_ns != old_stamp
    # A run made before the sieve (its settings without sieve_cells) is predicted and scored again, its extra
    # columns too, and not trained; so is one asked for another sieve.
    result = checkpoint.parents[1] / "result.json"
    saved = json.loads(result.read_text(encoding="utf-8"))
    assert saved["settings"]["sieve_cells"] == Config().sieve_cells == 16
    del saved["settings"]["sieve_cells"]
    result.write_text(json.dumps(saved), encoding="utf-8")
    scored = (checkpoint.parents[1] / "metrics.json").stat().st_mtime_ns
    for cells in (16, 0):
        assert compare_recipes.main([*argv, "--variants=reference", f"--sieve_cells={cells}"]) == 0
        close_log_files()
        assert checkpoint.stat().st_mtime_ns == stamp  # not trained
        again = json.loads(result.read_text(encoding="utf-8"))
        assert again["settings"] == {**saved["settings"], "sieve_cells": cells}
        assert (checkpoint.parents[1] / "metrics.json").stat().st_mtime_ns > scored
        scored = (checkpoint.parents[1] / "metrics.json").stat().st_mtime_ns
        metrics = json.loads((checkpoint.parents[1] / "metrics.json").read_text(encoding="utf-8"))
        assert again["row"]["test_farmland_iou_pooled"] == metrics["pooled"]["farmland_iou"]
        assert {"test_farmland_iou_pooled_tta", "test_farmland_iou_pooled_last"} <= set(again["row"])
        assert again["row"]["train_minutes"] == saved["row"]["train_minutes"]
    predicted = json.loads((checkpoint.parents[1] / "configs" / "predict.json").read_text(encoding="utf-8"))
    tta = json.loads((checkpoint.parents[1] / "tta" / "configs" / "predict.json").read_text(encoding="utf-8"))
    assert predicted["sieve_cells"] == tta["sieve_cells"] == 0


def test_a_variant_that_changes_a_network_key_given_to_every_run_is_predicted_without_a_warning(
    square_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # --base_width=4 reaches every run; reference+base_width=8 trains at 8 as asked, and predict.py (its plain and its
    # --last scoring) said "--base_width=4 ignored ... train again to change it" of the comparison's own choice.
    argv = [*args(square_data, tmp_path / "cmp", "--epochs=1", "--tensorboard=false"), "--skip_minority", "--last"]
    assert compare_recipes.main([*argv, "--variants=reference+base_width=8", "--split_seeds=3"]) == 0
    close_log_files()
    assert "ignored: the network is" not in caplog.text
    saved = tmp_path / "cmp" / "all" / "reference+base_width=8" / "configs" / "train.json"
    assert json.loads(saved.read_text(encoding="utf-8"))["base_width"] == 8


def test_a_resumed_run_counts_the_minutes_of_the_epochs_it_continues(
    square_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "cmp"
    base = [*args(square_data, run_dir, "--tensorboard=false"), "--skip_minority"]
    assert compare_recipes.main([*base, "--epochs=1", "--variants=reference"]) == 0
    close_log_files()
    run = run_dir / "all" / "reference"
    first = load_checkpoint(run / "checkpoints" / "last.pth")["history"]
    earlier = sum(epoch["seconds"] for epoch in first)
    assert earlier > 0
    assert compare_recipes.resumed_seconds(run / "checkpoints" / "last.pth") == pytest.approx(earlier)
    assert compare_recipes.resumed_seconds(tmp_path / "none" / "last.pth") is None
    # Asked for two epochs with --resume=true, the run goes on from its first instead of starting again, and its
    # minutes add what the first epoch took (made ten minutes longer here, so that the sum shows in the row); a
    # run not begun yet starts afresh.
    real = compare_recipes.resumed_seconds

    def ten_minutes_longer(last: Path) -> float | None:
        """resumed_seconds, ten minutes more where there is a last.pth."""
        seconds = real(last)
        return None if seconds is None else seconds + 600

    monkeypatch.setattr(compare_recipes, "resumed_seconds", ten_minutes_longer)
    both_variants = [*base, "--epochs=2", "--variants=reference,recommended+dropout=0"]
    assert compare_recipes.main([*both_variants, "--resume=true"]) == 0
    close_log_files()
    both = load_checkpoint(run / "checkpoints" / "last.pth")["history"]
    assert len(both) == 2 and both[0]["seconds"] == first[0]["seconds"]
    rows = json.loads((run_dir / "comparison.json").read_text(encoding="utf-8"))
    assert [r["epochs"] for r in rows] == [2, 2]
    assert rows[0]["train_minutes"] >= 10 + earlier / 60 - 0.01 and rows[1]["train_minutes"] < 10
    # Called again without --resume, both runs are done: nothing is trained again.
    lasts = [run_dir / "all" / r["recipe"] / "checkpoints" / "last.pth" for r in rows]
    stamps = [last.stat().st_mtime_ns for last in lasts]
    assert compare_recipes.main(both_variants) == 0
    close_log_files()
    assert [last.stat().st_mtime_ns for last in lasts] == stamps
    with pytest.raises(ValueError, match="resume is no recipe setting"):
        compare_recipes.parse_variant("reference+resume=true")


def test_recipe_key_is_refused(square_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--variants"):
        compare_recipes.main([*args(square_data, tmp_path / "cmp"), "--recipe=recommended"])


def test_skipping_both_data_sets_is_refused_before_any_split(square_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "cmp"
    with pytest.raises(ValueError, match="--skip_minority and --only_minority together"):
        compare_recipes.main([*args(square_data, run_dir), "--skip_minority", "--only_minority"])
    assert not (run_dir / "splits").exists()


def test_a_stopped_comparison_says_to_repeat_it_with_resume(
    square_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def stopped(*_: object) -> dict:
        raise KeyboardInterrupt  # Ctrl-C while a variant trains

    monkeypatch.setattr(compare_recipes, "run_variant", stopped)
    run_dir = tmp_path / "cmp"
    with pytest.raises(KeyboardInterrupt):
        compare_recipes.main([*args(square_data, run_dir, "--epochs=1"), "--skip_minority"])
    close_log_files()
    assert (
        f"the comparison stopped during {run_dir / 'all' / 'reference'}: repeat this compare_recipes.py" in caplog.text
    )
    assert "with --resume=true to go on" in caplog.text


def test_a_minority_subset_without_test_tiles_is_left_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Tile i holds i + 1 rows of farmland: at quantile 0 the subset is tile 0 alone, so train or test is empty.
    data_dir, rng = tmp_path / "data", np.random.default_rng(0)
    for i in range(20):
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[: i + 1] = 255
        write_pair(data_dir, f"tile {i:02d}", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), mask)
    run_dir = tmp_path / "cmp"
    base = [*args(data_dir, run_dir, "--epochs=1", "--tensorboard=false"), "--minority_quantile=0"]
    assert compare_recipes.main([*base, "--variants=reference"]) == 0
    close_log_files()
    rows = json.loads((run_dir / "comparison.json").read_text(encoding="utf-8"))
    assert [r["data"] for r in rows] == ["all"]
    assert "the minority subset (the 0% of tiles with the least farmland) holds no" in caplog.text
    assert not (run_dir / "minority").exists()
    assert compare_recipes.main([*base, "--variants=reference", "--only_minority"]) == 1
    close_log_files()
    assert "no data set was left to compare" in caplog.text


def test_each_run_records_its_splits_scene_counts_for_keep_epoch_auto(tmp_path: Path) -> None:
    def tiles(*scenes: str) -> list[tuple[Path, Path]]:
        return [(Path(f"images/{s}_r{i}c0.png"), Path(f"labels/{s}_r{i}c0_mask.png")) for s in scenes for i in (0, 1)]

    splits = {"train": tiles("a", "b", "c", "d"), "val": tiles("e", "f"), "test": tiles("g", "h", "i")}
    compare_recipes.write_scene_counts(tmp_path / "grouped", splits, r"^(.+)_r\d+c\d+$")
    summary = json.loads((tmp_path / "grouped" / "splits" / "summary.json").read_text(encoding="utf-8"))
    assert summary == {"groups": {"train": 4, "val": 2, "test": 3}}
    assert split_scenes(tmp_path / "grouped", "val") == 2
    compare_recipes.write_scene_counts(tmp_path / "by_tile", splits, "")  # split by tile: no scenes to count
    assert not (tmp_path / "by_tile").exists() and split_scenes(tmp_path / "by_tile", "val") is None


def test_a_run_begun_under_another_recipe_is_not_resumed_as_this_one(tmp_path: Path) -> None:
    import torch

    import cli

    arguments = ["--recipe=recommended", f"--run_dir={tmp_path}", "--epochs=3", "--downscale=0"]
    now = cli.parse_args(arguments)
    last = tmp_path / "last.pth"
    saved = {**vars(now), "downscale": 2, "pixel_size_m": 1.0}  # the auto keys as the run settled them
    torch.save({"model": {}, "config": saved}, last)
    assert compare_recipes.trained_otherwise(last, arguments) == []
    torch.save({"model": {}, "config": {**saved, "dropout": 0.2, "lr": 3e-4}}, last)  # the recipe of an older version
    assert compare_recipes.trained_otherwise(last, arguments) == ["dropout", "lr"]


def finished_comparison(data: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """A tiny comparison of the reference recipe, done: its command and its run folder. Unstratified, so that the
    split stays as it is when a mask changes."""
    extra = ("--epochs=1", "--tensorboard=false", "--stratify=false")
    argv = [*args(data, tmp_path / "cmp", *extra), "--skip_minority", "--variants=reference"]
    assert compare_recipes.main(argv) == 0
    close_log_files()
    return argv, tmp_path / "cmp" / "all" / "reference"


def clear_first_mask(run: Path, split: str) -> Path:
    """Correct the first mask of a run's split: no farmland in it after all."""
    mask = read_pair_list(run / "splits" / f"{split}.txt")[0][1]
    cv2.imwrite(str(mask), cv2.imread(str(mask), cv2.IMREAD_UNCHANGED) * 0)
    return mask


def test_a_finished_run_whose_masks_changed_is_scored_or_trained_again(
    square_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv, run = finished_comparison(square_data, tmp_path)
    run_dir = run.parent.parent
    best = run / "checkpoints" / "best.pth"
    trained = best.stat().st_mtime_ns

    # A test mask corrected since: the figures are scored again against it, without training again.
    clear_first_mask(run, "test")
    assert compare_recipes.main(argv) == 0
    close_log_files()
    assert best.stat().st_mtime_ns == trained
    row = json.loads((run_dir / "comparison.json").read_text(encoding="utf-8"))[0]
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert row["test_farmland_iou_pooled"] == metrics["pooled"]["farmland_iou"]
    assert metrics["pooled_confusion"]["fn"] + metrics["pooled_confusion"]["tp"] < 16 * 16 * len(
        read_pair_list(run / "splits" / "test.txt")
    )  # the cleared mask's square is scored as background now
    # A training mask corrected since: the run is trained again, afresh even with --resume=true. A retraining
    # stopped before its first epoch leaves nothing of the old run to take up again (its result.json would have it
    # retrained afresh every time, its last.pth resumed on the old data's weights).
    clear_first_mask(run, "train")

    def stopped(argv: list[str]) -> int:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(compare_recipes.train, "main", stopped)
        with pytest.raises(KeyboardInterrupt):
            compare_recipes.main([*argv, "--resume=true"])
    close_log_files()
    assert not any((run / name).exists() for name in ("result.json", "checkpoints/last.pth", "checkpoints/best.pth"))
    assert compare_recipes.main([*argv, "--resume=true"]) == 0
    close_log_files()
    assert best.stat().st_mtime_ns != trained
    assert len(load_checkpoint(run / "checkpoints" / "last.pth")["history"]) == 1


def test_a_run_done_by_an_older_version_is_trained_again_where_its_training_masks_changed_since(
    square_data: Path, tmp_path: Path
) -> None:
    argv, run = finished_comparison(square_data, tmp_path)
    best, saved = run / "checkpoints" / "best.pth", run / "result.json"

    def as_older_version() -> None:
        """result.json as an older version wrote it: no digests of the data."""
        result = json.loads(saved.read_text(encoding="utf-8"))
        del result["settings"]["data"]
        saved.write_text(json.dumps(result), encoding="utf-8")

    # Data untouched since: scored again, not trained.
    as_older_version()
    trained = best.stat().st_mtime_ns
    assert compare_recipes.main(argv) == 0
    close_log_files()
    assert best.stat().st_mtime_ns == trained
    # A training mask corrected after the older version trained: its weights are not of this data.
    as_older_version()
    mask = clear_first_mask(run, "train")
    later = (run / "configs" / "train.json").stat().st_mtime_ns + 10**9
    os.utime(mask, ns=(later, later))
    assert compare_recipes.main(argv) == 0
    close_log_files()
    assert best.stat().st_mtime_ns != trained


def test_a_finished_run_trained_again_under_other_settings_says_which(
    square_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "cmp"
    argv = [*args(square_data, run_dir, "--tensorboard=false"), "--skip_minority", "--variants=reference"]
    assert compare_recipes.main([*argv, "--epochs=1"]) == 0
    close_log_files()
    caplog.clear()
    assert compare_recipes.main([*argv, "--epochs=2"]) == 0
    close_log_files()
    run = run_dir / "all" / "reference"
    assert f"{run}: done before with other settings (epochs 1, now 2): its figures are not taken" in caplog.text
    assert compare_recipes.settings_changes(
        {"overrides": ["--base_width=4", "--seed=1"], "recipe": {"lr": "0.001"}, "splits": {"test": ["a"]}},
        {"overrides": ["--base_width=8", "--seed=1"], "recipe": {"lr": "0.002"}, "splits": {"test": ["b"]}},
    ) == ["--base_width=4 now --base_width=8", "recipe.lr 0.001, now 0.002", "the split's tiles"]
