"""miou.py's counts and formulas against hand-computed cases, including empty masks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import close_log_files

import miou
from data_preprocess import IGNORE, write_image
from files import shell_quoted
from metrics import (
    boundary_band,
    boundary_counts,
    class_iou,
    confusion_matrix,
    evaluate_pairs,
    resampled_interval,
    scores,
    summarise,
)

# A 2x4 label and prediction worked by hand:
#   label  1 1 0 0     prediction  1 0 0 1
#          1 1 0 0                 1 1 0 0
# farmland: tp = 3, fn = 1, fp = 1; background: tn = 3.
LABEL = np.array([[1, 1, 0, 0], [1, 1, 0, 0]])
PRED = np.array([[1, 0, 0, 1], [1, 1, 0, 0]])


def test_confusion_matrix_counts_by_hand() -> None:
    cm = confusion_matrix(PRED, LABEL)
    assert cm.tolist() == [[3, 1], [1, 3]]  # rows = label, columns = prediction
    assert confusion_matrix(torch.from_numpy(PRED), torch.from_numpy(LABEL)).tolist() == [[3, 1], [1, 3]]


def test_a_lopsided_case_keeps_labels_in_rows_on_numpy_and_torch() -> None:
    # label 6 farmland, 2 background; prediction all farmland: fp = 2, fn = 0. The case above has fp = fn, so a
    # matrix with rows and columns swapped (precision and recall exchanged) would pass it.
    label = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    pred = np.ones((2, 4), dtype=int)
    assert confusion_matrix(pred, label).tolist() == [[0, 2], [0, 6]]
    assert confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label)).tolist() == [[0, 2], [0, 6]]


def test_scores_by_hand() -> None:
    s = scores(confusion_matrix(PRED, LABEL))
    assert s["farmland_iou"] == pytest.approx(3 / 5)
    assert s["background_iou"] == pytest.approx(3 / 5)
    assert s["miou"] == pytest.approx(3 / 5)
    assert s["precision"] == pytest.approx(3 / 4)
    assert s["recall"] == pytest.approx(3 / 4)
    assert s["f1"] == pytest.approx(3 / 4)
    assert s["accuracy"] == pytest.approx(6 / 8)
    # kappa: po = 0.75, pe = (4*4 + 4*4) / 64 = 0.5, kappa = 0.25 / 0.5
    assert s["kappa"] == pytest.approx(0.5)


def test_unbalanced_case_by_hand() -> None:
    # label: 6 farmland, 2 background; prediction: all farmland.
    label = np.array([1, 1, 1, 1, 1, 1, 0, 0])
    pred = np.ones(8, dtype=int)
    s = scores(confusion_matrix(pred, label))
    assert s["farmland_iou"] == pytest.approx(6 / 8)
    assert s["background_iou"] == 0.0
    assert s["precision"] == pytest.approx(6 / 8) and s["recall"] == 1.0
    assert s["f1"] == pytest.approx(12 / 14)
    assert s["kappa"] == pytest.approx(0.0)  # po = pe = 0.75


def test_class_absent_from_label_and_prediction_is_nan_and_skipped() -> None:
    empty = np.zeros((4, 4), dtype=int)
    cm = confusion_matrix(empty, empty)
    ious = class_iou(cm)
    assert math.isnan(ious[1]) and ious[0] == 1.0
    s = scores(cm)
    assert math.isnan(s["farmland_iou"]) and math.isnan(s["precision"]) and math.isnan(s["recall"])
    assert s["miou"] == 1.0  # mean over the classes that occur
    assert s["accuracy"] == 1.0


def test_predicting_farmland_on_an_empty_label_scores_zero() -> None:
    cm = confusion_matrix(np.ones((2, 2), dtype=int), np.zeros((2, 2), dtype=int))
    s = scores(cm)
    assert s["farmland_iou"] == 0.0 and s["background_iou"] == 0.0 and s["precision"] == 0.0
    assert math.isnan(s["recall"])


def test_per_image_mean_and_pooled_differ_as_computed_by_hand() -> None:
    # Image A: 3 farmland pixels all found (IoU 1); image B: 1 farmland pixel missed, nothing predicted (IoU 0);
    # image C: no farmland anywhere (skipped for farmland).
    rows, pooled = [], np.zeros((2, 2), dtype=np.int64)
    for name, label, pred in (
        ("A", [1, 1, 1, 0], [1, 1, 1, 0]),
        ("B", [1, 0, 0, 0], [0, 0, 0, 0]),
        ("C", [0, 0, 0, 0], [0, 0, 0, 0]),
    ):
        cm = confusion_matrix(np.array(pred), np.array(label))
        pooled += cm
        ious = class_iou(cm)
        rows.append({"name": name, "farmland_iou": float(ious[1]), "background_iou": float(ious[0])})
    summary = summarise(rows, pooled)
    assert summary["per_image"]["farmland_iou"] == pytest.approx(0.5)  # (1 + 0) / 2, C skipped
    assert summary["per_image"]["farmland_iou_images_counted"] == 2
    assert summary["pooled"]["farmland_iou"] == pytest.approx(3 / 4)  # tp 3, fn 1
    assert summary["per_image"]["background_iou"] == pytest.approx((1 + 3 / 4 + 1) / 3)
    assert summary["n_images"] == 3


def test_all_empty_split_writes_null_not_nan() -> None:
    cm = confusion_matrix(np.zeros(4, dtype=int), np.zeros(4, dtype=int))
    summary = summarise([{"name": "a", "farmland_iou": math.nan, "background_iou": 1.0}], cm)
    assert summary["pooled"]["farmland_iou"] is None
    assert summary["per_image"]["farmland_iou"] is None
    assert summary["per_image"]["miou"] == 1.0  # the mean over the classes that occur: background alone


def test_vectorised_counts_match_a_per_pixel_loop() -> None:
    rng = np.random.default_rng(1)
    label, pred = rng.integers(0, 2, (37, 41)), rng.integers(0, 2, (37, 41))
    expected = np.zeros((2, 2), dtype=np.int64)
    for t, p in zip(label.ravel(), pred.ravel()):
        expected[t, p] += 1
    assert (confusion_matrix(pred, label) == expected).all()


def test_bad_inputs_to_confusion_matrix() -> None:
    with pytest.raises(ValueError, match="differs from label shape"):
        confusion_matrix(np.zeros((2, 2), dtype=int), np.zeros((2, 3), dtype=int))
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 2\)"):
        confusion_matrix(np.full((2, 2), 255), np.zeros((2, 2), dtype=int))
    for pred, label in ((np.full((2, 2), 2), np.zeros((2, 2))), (np.zeros((2, 2)), np.full((2, 2), 2))):
        with pytest.raises(ValueError, match=r"class indices must lie in \[0, 2\)"):  # 2 is one past the last class
            confusion_matrix(pred.astype(int), label.astype(int))


def test_unlabelled_pixels_count_nowhere() -> None:
    label = np.array([[0, 1, IGNORE], [1, IGNORE, 0]], np.uint8)
    pred = np.array([[0, 1, 1], [0, 0, 1]], np.uint8)
    expected = [[1, 1], [1, 1]]  # rows = label: (0,0) (0,1) | (1,0) (1,1); the two IGNORE pixels left out
    assert confusion_matrix(pred, label).tolist() == expected
    assert confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label)).tolist() == expected


def test_boundary_iou_by_hand() -> None:
    label = np.zeros((6, 6), np.uint8)
    label[1:5, 1:5] = 1  # a 4x4 parcel: its 1-pixel edge band is the 12-pixel ring
    pred = np.zeros((6, 6), np.uint8)
    pred[1:5, 2:6] = 1  # shifted right onto the image border, which is no edge: a 10-pixel band
    assert int(boundary_band(label, 1).sum()) == 12
    assert int(boundary_band(pred, 1).sum()) == 10
    # Shared: rows 1 and 4 at columns 2..4 (6 pixels); union 12 + 10 - 6.
    assert boundary_counts(pred, label, 1) == (6, 16)
    assert boundary_counts(label, label, 1) == (12, 12)
    # A 4x4 parcel is all edge at width 2.
    assert int(boundary_band(label, 2).sum()) == 16


def test_boundary_iou_of_empty_masks_is_undefined_and_ignored_pixels_are_skipped(tmp_path: Path) -> None:
    empty = np.zeros((6, 6), np.uint8)
    assert boundary_counts(empty, empty, 3) == (0, 0)
    pred = np.zeros((6, 6), np.uint8)
    pred[1:5, 1:5] = 1
    label = pred.copy()
    label[1, 1] = IGNORE  # the parcel's corner is unlabelled: inside, not a new edge making (2, 2) one
    # Both bands: the ring less the unlabelled (1,1). Shared: 11, union: 11.
    assert boundary_counts(pred, label, 1) == (11, 11)
    field = np.ones((6, 6), np.uint8)
    field[:, 4:] = IGNORE  # farmland whose right third is unlabelled: the unlabelled area's edge is no parcel edge
    assert boundary_counts(np.ones((6, 6), np.uint8), field, 1) == (0, 0)
    assert boundary_counts((field == 1).astype(np.uint8), field, 1) == (0, 0)
    field[:, :2] = 0  # a true edge between columns 1 and 2: both bands are column 2
    assert boundary_counts((field == 1).astype(np.uint8), field, 1) == (6, 6)
    write_image(tmp_path / "l.png", empty)
    write_image(tmp_path / "p.png", empty)
    rows, _, _ = evaluate_pairs([("e", tmp_path / "l.png", tmp_path / "p.png")])
    assert math.isnan(rows[0]["boundary_iou"])
    assert summarise(rows, np.array([[36, 0], [0, 0]]))["pooled"]["boundary_iou"] is None


def test_per_image_rows_count_false_positives_and_negatives_by_hand(tmp_path: Path) -> None:
    # label: 6 farmland, 2 background; prediction: farmland everywhere but one labelled farmland pixel.
    label = np.array([[255, 255, 255, 255], [255, 255, 0, 0]], np.uint8)
    pred = np.array([[255, 255, 255, 0], [255, 255, 255, 255]], np.uint8)
    write_image(tmp_path / "l.png", label)
    write_image(tmp_path / "p.png", pred)
    rows, pooled, errors = evaluate_pairs([("a", tmp_path / "l.png", tmp_path / "p.png")])
    assert not errors and pooled.tolist() == [[0, 2], [1, 5]]
    assert {k: rows[0][k] for k in ("tp", "fp", "fn", "tn")} == {"tp": 5, "fp": 2, "fn": 1, "tn": 0}
    assert summarise(rows, pooled)["pooled_confusion"] == {"tp": 5, "fp": 2, "fn": 1, "tn": 0}


def test_miou_shows_the_bands_the_test_split_was_predicted_with(tmp_path: Path) -> None:
    import json

    from config import Config

    run = Config(run_dir=str(tmp_path))
    assert miou.bands_of_the_run(run) == run  # no record: the keys as given
    (tmp_path / "configs").mkdir()
    trained = {"in_channels": 4, "bands": "", "rgb_bands": "3,2,1"}
    (tmp_path / "configs" / "train.json").write_text(json.dumps(trained), "utf-8")
    # The last predict.py run, of other files with other bands, does not change how the test tiles are read.
    (tmp_path / "configs" / "predict.json").write_text(json.dumps({"bands": "2,3,4", "rgb_bands": ""}), "utf-8")
    seen = miou.bands_of_the_run(run)
    assert (seen.in_channels, seen.bands, seen.rgb_bands) == (4, "", "3,2,1")
    given = Config(run_dir=str(tmp_path), rgb_bands="1,2,3")
    assert miou.bands_of_the_run(given) == given  # the user's keys win
    (tmp_path / "configs" / "train.json").write_text("{cut short", "utf-8")
    assert miou.bands_of_the_run(run) == run


@pytest.mark.parametrize(
    ("threshold", "made_with", "said"),
    [
        (-1.0, {"cut": 0.3}, ""),
        (0.3, {"cut": 0.3}, ""),
        (0.7, {"cut": 0.3}, "--threshold=0.7 is predict.py's: miou.py scores the masks as they were made (farmland "),
        (0.7, {"cut": 0.3}, "(farmland above 0.3); to score that cut, run predict.py --threshold=0.7 first"),
        (0.7, {"cut": None}, "(farmland by the argmax)"),
        (0.7, None, "(farmland at an unknown cut)"),
    ],
)  # fmt: skip
def test_a_threshold_given_to_miou_is_named_as_predicts(
    caplog: pytest.LogCaptureFixture, threshold: float, made_with: dict | None, said: str
) -> None:
    with caplog.at_level("WARNING", logger="miou"):
        miou.warn_other_cut(threshold, made_with)
    assert (said in caplog.text) if said else not caplog.text


def test_the_gallery_shows_unlabelled_pixels_grey_not_as_farmland(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.axes

    from config import Config

    label = np.zeros((8, 8), np.uint8)
    label[:, 4:] = 255
    label[:2] = 128  # unlabelled: scored as neither class
    write_image(tmp_path / "a.png", np.full((8, 8, 3), 90, np.uint8))
    write_image(tmp_path / "a_mask.png", label)
    write_image(tmp_path / "a_seg.png", np.full((8, 8), 255, np.uint8))
    shown = []
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", lambda ax, array, **kw: shown.append(np.asarray(array)))
    lookup = {"a": (tmp_path / "a.png", tmp_path / "a_mask.png", tmp_path / "a_seg.png")}
    cfg = Config(ignore_index=128)
    miou.gallery([{"name": "a", "farmland_iou": 0.5}], lookup, cfg, (0, 1, 2), tmp_path / "g.png", "gallery")
    drawn = shown[1]  # photo, label, prediction
    assert drawn[:2].tolist() == [[0.5] * 8] * 2  # mid-grey, where it was white (farmland) before
    assert drawn[2:, :4].max() == 0 and drawn[2:, 4:].min() == 1


def test_the_gallery_shows_a_tile_with_a_declared_nodata_value_as_training_reads_it(
    tmp_path: Path, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A float tile whose declared nodata is -9999 trains and predicts (nodata reads as 0), but the gallery read it
    # raw and called it unreadable, telling the user to rescale it to [0, 1].
    import matplotlib.axes
    import rasterio

    from config import Config

    reflectance = np.full((3, 8, 8), 0.3, np.float32)
    reflectance[:, :2] = -9999
    with rasterio.open(
        tmp_path / "a.tif", "w", driver="GTiff", width=8, height=8, count=3, dtype="float32", nodata=-9999
    ) as dst:
        dst.write(reflectance)
    write_image(tmp_path / "a_mask.png", np.zeros((8, 8), np.uint8))
    write_image(tmp_path / "a_seg.png", np.zeros((8, 8), np.uint8))
    shown = []
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", lambda ax, array, **kw: shown.append(np.asarray(array)))
    lookup = {"a": (tmp_path / "a.tif", tmp_path / "a_mask.png", tmp_path / "a_seg.png")}
    with caplog.at_level("WARNING", logger="miou"):
        miou.gallery([{"name": "a", "farmland_iou": 0.5}], lookup, Config(), (0, 1, 2), tmp_path / "g.png", "g")
    assert "unreadable" not in caplog.text and "outside [0, 1]" not in caplog.text
    assert shown[0][:2].max() == 0  # nodata drawn black, as the network sees it


def test_a_long_tile_name_beside_a_gallery_row_stays_within_its_row(tmp_path: Path, monkeypatch) -> None:
    from config import Config

    name = "GF2_PMS1_E113.5_N23.1_20200301_L1A0004651234-MSS1_0_3"
    write_image(tmp_path / "a.png", np.full((8, 8, 3), 90, np.uint8))
    write_image(tmp_path / "a_mask.png", np.zeros((8, 8), np.uint8))
    write_image(tmp_path / "a_seg.png", np.zeros((8, 8), np.uint8))
    saved = []
    monkeypatch.setattr(miou, "save_figure", lambda fig, path: saved.append(fig))
    lookup = {name: (tmp_path / "a.png", tmp_path / "a_mask.png", tmp_path / "a_seg.png")}
    rows = [{"name": name, "farmland_iou": 0.5}] * 3
    miou.gallery(rows, lookup, Config(), (0, 1, 2), tmp_path / "g.png", "gallery")
    fig = saved[0]
    fig.tight_layout()  # as save_figure lays it out
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes[::3]:  # the photo of each row carries the name
        label = ax.yaxis.label
        assert label.get_text().replace("\n", "").startswith(name)  # the whole name, only wrapped
        assert label.get_window_extent(renderer).height <= ax.get_window_extent(renderer).height


def test_miou_reads_the_test_masks_with_the_trainings_ignore_index(tmp_path: Path) -> None:
    import json

    run = tmp_path / "run"
    label = np.zeros((8, 8), np.uint8)
    label[:, 4:] = 255
    label[:4] = 128  # unlabelled top half: of the 32 labelled pixels, 16 are farmland
    write_image(tmp_path / "a.png", np.full((8, 8, 3), 90, np.uint8))
    write_image(tmp_path / "a_mask.png", label)
    write_image(run / "predictions" / "a_seg.png", np.full((8, 8), 255, np.uint8))
    (run / "splits").mkdir(parents=True)
    (run / "splits" / "test.txt").write_text(f"{tmp_path / 'a.png'}\t{tmp_path / 'a_mask.png'}\n", "utf-8")
    (run / "configs").mkdir()
    (run / "configs" / "train.json").write_text(json.dumps({"ignore_index": 128, "mask_threshold": 0}), "utf-8")
    # Trained with --ignore_index=128, scored without it given again: the unlabelled pixels count nowhere.
    assert miou.main([f"--run_dir={run}"]) == 0
    close_log_files()
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["pooled_confusion"] == {"tp": 16, "fp": 16, "fn": 0, "tn": 0}
    assert json.loads((run / "configs" / "miou.json").read_text(encoding="utf-8"))["ignore_index"] == 128
    # A key given on the command line wins: 128 is then no mask value, and the mask is refused.
    assert miou.main([f"--run_dir={run}", "--ignore_index=-1"]) == 1
    close_log_files()


def test_a_prediction_of_another_size_or_values_is_met_with_predicting_again(tmp_path: Path) -> None:
    # The advice was a label's (--ignore_index=7, re-export losslessly), and the sizes came as numpy shapes.
    write_image(tmp_path / "a_mask.png", np.zeros((4, 6), np.uint8))
    write_image(tmp_path / "a_seg.png", np.zeros((6, 4), np.uint8))
    write_image(tmp_path / "b_mask.png", np.zeros((4, 6), np.uint8))
    write_image(tmp_path / "b_seg.png", np.full((4, 6), 7, np.uint8))
    items = [(n, tmp_path / f"{n}_mask.png", tmp_path / f"{n}_seg.png") for n in ("a", "b")]
    rows, _, errors = evaluate_pairs(items)
    assert rows == [] and len(errors) == 2
    assert "a_seg.png: prediction is 4x6 pixels, but its label" in errors[0] and "a_mask.png is 6x4" in errors[0]
    assert "b_seg.png: holds values {7}; expected a mask as predict.py writes them" in errors[1]
    assert all("predict the test split again" in e for e in errors) and "ignore_index" not in errors[1]


def test_metrics_json_names_the_test_images_left_unscored(tmp_path: Path) -> None:
    import json

    # Three test tiles; b's prediction is missing and c's is of another size: only a is scored.
    run = tmp_path / "run"
    (run / "splits").mkdir(parents=True)
    lines = []
    for name, prediction in (("a", np.full((8, 8), 255, np.uint8)), ("b", None), ("c", np.zeros((4, 4), np.uint8))):
        write_image(tmp_path / f"{name}.png", np.full((8, 8, 3), 90, np.uint8))
        write_image(tmp_path / f"{name}_mask.png", np.full((8, 8), 255, np.uint8))
        if prediction is not None:
            write_image(run / "predictions" / f"{name}_seg.png", prediction)
        lines.append(f"{tmp_path / f'{name}.png'}\t{tmp_path / f'{name}_mask.png'}\n")
    (run / "splits" / "test.txt").write_text("".join(lines), "utf-8")
    assert miou.main([f"--run_dir={run}"]) == 1
    close_log_files()
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    # The perfect score is of one tile of three, and the report says so, not only the log.
    assert metrics["pooled"]["farmland_iou"] == 1.0 and metrics["n_images"] == 1
    assert metrics["n_test_images"] == 3 and metrics["not_scored"] == ["b", "c"]


def test_test_images_not_copied_with_the_masks_are_scored_and_shown_without_a_photo(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import json

    # Labels and predictions copied without the imagery: the scores need neither image, nor may the gallery stop.
    run = tmp_path / "run"
    (run / "splits").mkdir(parents=True)
    write_image(tmp_path / "a_mask.png", np.full((8, 8), 255, np.uint8))
    write_image(run / "predictions" / "a_seg.png", np.full((8, 8), 255, np.uint8))
    (run / "splits" / "test.txt").write_text(f"{tmp_path / 'a.png'}\t{tmp_path / 'a_mask.png'}\n", "utf-8")
    assert miou.main([f"--run_dir={run}"]) == 0
    close_log_files()
    assert json.loads((run / "metrics.json").read_text(encoding="utf-8"))["pooled"]["farmland_iou"] == 1.0
    assert (run / "figures" / "gallery_best.png").is_file()
    assert f"{tmp_path / 'a.png'}: cannot be read" in caplog.text and "shows no photo of it" in caplog.text


def test_a_data_dir_that_does_not_hold_the_test_split_is_refused_not_ignored(tmp_path: Path) -> None:
    import json

    import cli
    import predict

    # The split names data/; a corrected copy of the labels given as --data_dir was silently not read.
    data, corrected, run = tmp_path / "data", tmp_path / "校正 标签", tmp_path / "run"
    for folder, value in ((data, 255), (corrected, 0)):
        write_image(folder / "images" / "a.png", np.full((8, 8, 3), 90, np.uint8))
        write_image(folder / "labels" / "a_mask.png", np.full((8, 8), value, np.uint8))
    write_image(run / "predictions" / "a_seg.png", np.full((8, 8), 255, np.uint8))
    (run / "splits").mkdir(parents=True)
    test_list = run / "splits" / "test.txt"
    test_list.write_text(f"{data / 'images' / 'a.png'}\t{data / 'labels' / 'a_mask.png'}\n", "utf-8")
    refused = rf"--data_dir={corrected}: {test_list} names files outside it"
    with pytest.raises(ValueError, match=refused) as error:
        miou.main([f"--data_dir={corrected}", f"--run_dir={run}"])
    assert f"(python split_dataset.py --data_dir={shell_quoted(corrected)} --run_dir=NEW_RUN)" in str(error.value)
    close_log_files()
    with pytest.raises(ValueError, match=refused):  # predict.py's test split, as miou.py's
        predict.list_inputs(*cli.parse_command([f"--data_dir={corrected}", f"--run_dir={run}"]))
    assert predict.list_inputs(*cli.parse_command([f"--run_dir={run}"])) == [data / "images" / "a.png"]
    assert miou.main([f"--data_dir={data}", f"--run_dir={run}"]) == 0  # the folder the split was made from
    close_log_files()
    assert json.loads((run / "metrics.json").read_text(encoding="utf-8"))["pooled"]["farmland_iou"] == 1.0
    # A folder of links to the files, split as it is: split_dataset.py lists the files the links point to.
    linked = tmp_path / "linked"
    for sub, name in (("images", "a.png"), ("labels", "a_mask.png")):
        (linked / sub).mkdir(parents=True)
        try:
            (linked / sub / name).symlink_to(data / sub / name)
        except OSError:
            pytest.skip("no symbolic links here")
    assert predict.list_inputs(*cli.parse_command([f"--data_dir={linked}", f"--run_dir={run}"])) == [
        data / "images" / "a.png"
    ]
    assert miou.main([f"--data_dir={linked}", f"--run_dir={run}"]) == 0
    close_log_files()
    # Links to the images beside corrected labels: the list's labels are not those, and it is refused as before.
    (linked / "labels" / "a_mask.png").unlink()
    write_image(linked / "labels" / "a_mask.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match=rf"--data_dir={linked}: {test_list} names files outside it"):
        miou.main([f"--data_dir={linked}", f"--run_dir={run}"])
    close_log_files()


def hit_or_miss(hits: list[bool], tiles: int = 1) -> tuple[list[dict], list[str]]:
    """Rows of scenes whose every tile is one pixel, farmland, found (IoU 1) or missed (IoU 0), and their scenes."""
    rows = [
        {"tp": int(hit), "fp": 0, "fn": int(not hit), "farmland_iou": float(hit)} for hit in hits for _ in range(tiles)
    ]
    return rows, [f"s{i}" for i in range(len(hits)) for _ in range(tiles)]


def test_the_interval_by_hand_from_the_binomial() -> None:
    # 10 scenes, 5 found: a resampled split's IoU is Binomial(10, 0.5) / 10, whose 2.5 % and 97.5 % points are
    # 0.2 and 0.8 (P(X <= 1) = 11/1024 < 0.025 < P(X <= 2) = 56/1024), for the pooled and the per-image mean alike.
    rows, scenes = hit_or_miss([True, False] * 5)
    assert resampled_interval(rows, scenes) == {"pooled_farmland_iou": [0.2, 0.8], "per_image_farmland_iou": [0.2, 0.8]}
    # Three tiles a scene that err together: resampled by scene the interval is the same; taken for 30
    # independent images it is narrower (Binomial(30, 0.5) / 30), which is why scenes are resampled where known.
    rows, scenes = hit_or_miss([True, False] * 5, tiles=3)
    assert resampled_interval(rows, scenes)["pooled_farmland_iou"] == [0.2, 0.8]
    low, high = resampled_interval(rows, [str(i) for i in range(30)])["pooled_farmland_iou"]
    assert 0.2 < low < 0.5 < high < 0.8


def test_the_interval_of_equal_scenes_is_a_point_and_few_scenes_give_none() -> None:
    rows = [{"tp": 3, "fp": 1, "fn": 0, "farmland_iou": 0.75}] * 5
    assert resampled_interval(rows, ["a", "b", "c", "d", "e"]) == {
        "pooled_farmland_iou": [0.75, 0.75],
        "per_image_farmland_iou": [0.75, 0.75],
    }
    assert resampled_interval(rows[:4], ["a", "b", "c", "d"]) == {
        "pooled_farmland_iou": None,
        "per_image_farmland_iou": None,
    }
    # Images without farmland in label or prediction (IoU 0/0) count in no per-image mean; none anywhere: None.
    empty = [{"tp": 0, "fp": 0, "fn": 0, "farmland_iou": math.nan}] * 5
    assert resampled_interval(rows + empty, list("abcde") * 2)["per_image_farmland_iou"] == [0.75, 0.75]
    assert resampled_interval(empty, list("abcde")) == {"pooled_farmland_iou": None, "per_image_farmland_iou": None}


def test_miou_resamples_the_scenes_of_tiled_names_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging

    run = tmp_path / "run"
    (run / "splits").mkdir(parents=True)
    lines = []
    for scene in range(5):
        for col in range(2):
            name = f"scene{scene}_r0c{col}"
            write_image(tmp_path / f"{name}.png", np.full((4, 4, 3), 90, np.uint8))
            write_image(tmp_path / f"{name}_mask.png", np.full((4, 4), 255, np.uint8))
            write_image(run / "predictions" / f"{name}_seg.png", np.full((4, 4), 255 * (scene % 2), np.uint8))
            lines.append(f"{tmp_path / f'{name}.png'}\t{tmp_path / f'{name}_mask.png'}\n")
    (run / "splits" / "test.txt").write_text("".join(lines), "utf-8")
    with caplog.at_level(logging.INFO, logger="miou"):
        assert miou.main([f"--run_dir={run}"]) == 0
    interval = json.loads((run / "metrics.json").read_text(encoding="utf-8"))["interval"]
    assert interval["resampled"] == "scenes" and interval["units"] == 5 and interval["level"] == 0.95
    assert interval["pooled_farmland_iou"][0] < 0.4 < interval["pooled_farmland_iou"][1]
    assert "over 2000 resamplings of the 5 test scenes: pooled farmland IoU" in caplog.text
    # With a pattern that makes each tile its own scene, ten units: the log says nothing of scenes missed.
    assert miou.main([f"--run_dir={run}", "--group_pattern=^(.+)$"]) == 0
    close_log_files()
    assert json.loads((run / "metrics.json").read_text(encoding="utf-8"))["interval"]["units"] == 10
    with pytest.raises(ValueError, match=r"--group_pattern='\(': not a valid regular expression"):
        miou.main([f"--run_dir={run}", "--group_pattern=("])
    close_log_files()


def test_a_pattern_that_names_no_test_scene_resamples_images_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    tiles = [Path(f"tile_{i:04d}.png") for i in range(6)]
    with caplog.at_level(logging.WARNING, logger="miou"):
        assert miou.test_scenes(r"^(.+)_r\d+c\d+$", tiles) == ([t.stem for t in tiles], "images")
    assert "6 of the 6 test images' names do not match --group_pattern=" in caplog.text
    assert "(e.g. tile_0000.png): the tiles are resampled one by one, not by scene" in caplog.text
    caplog.clear()
    mixed = [Path("a_r0c0.png"), Path("a_r0c1.png"), Path("loose.png")]
    with caplog.at_level(logging.WARNING, logger="miou"):
        assert miou.test_scenes(r"^(.+)_r\d+c\d+$", mixed) == (["a", "a", "loose"], "scenes")
    assert "1 of the 3 test images' names do not match" in caplog.text
    assert "each is resampled as a scene of its own" in caplog.text


def test_scenes_without_farmland_anywhere_count_for_no_interval(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    # One scene of six holds farmland: every draw that defines the IoU is a repeat of it, which gave [0.6, 0.6], an
    # interval of no width from one scene.
    empty = [{"tp": 0, "fp": 0, "fn": 0, "farmland_iou": math.nan}] * 5
    one = [*empty, {"tp": 6, "fp": 2, "fn": 2, "farmland_iou": 0.6}]
    assert resampled_interval(one, list("abcdef")) == {"pooled_farmland_iou": None, "per_image_farmland_iou": None}
    hits, scenes = hit_or_miss([True, False] * 3)  # five with farmland (found or missed) and one without
    assert resampled_interval([*hits[:5], empty[0]], scenes)["pooled_farmland_iou"] is not None
    with caplog.at_level(logging.WARNING, logger="miou"):
        interval = miou.interval_of(one, list("abcdef"), "scenes")
        miou.log_interval(interval)
    assert interval["units"] == 6 and interval["units_with_farmland"] == 1
    assert "1 of the 6 test scenes hold farmland in a label or prediction" in caplog.text
    assert "the test split holds 6 scenes: too few" not in caplog.text


def test_the_interval_of_many_images_is_drawn_in_blocks_of_bounded_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import tracemalloc

    import metrics

    rng = np.random.default_rng(1)
    rows = [
        {"tp": int(a), "fp": int(b), "fn": 5, "farmland_iou": a / (a + b + 5)} for a, b in rng.integers(0, 9, (5000, 2))
    ]
    names = [f"tile{i}" for i in range(5000)]
    tracemalloc.start()
    try:
        blocks = resampled_interval(rows, names)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64e6, f"{peak / 1e6:.0f} MB"  # all 2000 draws of 5000 images at once: 160 MB
    monkeypatch.setattr(metrics, "DRAWN_AT_ONCE", 10**12)
    assert resampled_interval(rows, names) == blocks  # the same draws as in one block
