"""Accuracy of the predicted masks against the labels: per-image and pooled, counts first.

For every test image the 2x2 confusion counts (rows = label, columns = prediction) are accumulated in
one vectorised pass; every figure is then a formula over counts:

- per-image IoU of farmland and of background, as in the reference: a class absent from both the label
  and the prediction of an image (0/0) is skipped for that image; the means are over the images that
  count (``per_image.*``);
- pooled figures from one confusion matrix summed over all test pixels (``pooled.*``): IoU per class,
  mIoU, precision, recall and F1 of farmland, overall accuracy and Cohen's kappa. A 0/0 pooled figure is
  reported as null;
- boundary IoU of farmland (``boundary_iou``): the IoU of the label's and the prediction's inner edge
  bands, ``boundary_width`` pixels deep, which scores the parcel outlines that field mapping cares about
  and that a pixel IoU dominated by parcel interiors hardly sees. Edges of the image are not parcel edges.
Unlabelled pixels (``ignore_index``) count in no figure.

Only masks of one model and one set of settings are scored together: each mask predict.py writes records the
model file and the settings it was made with; masks made otherwise than the newest test mask (left by a run
stopped part-way with a new threshold, say), masks whose model file has changed since (trained again?), and,
where ``checkpoint`` (or ``onnx_model``) names a model, masks made with another, are named and left unscored,
and the exit status is 1. metrics.json says which model and threshold made the masks it scores, and which test
images it left out (not_scored).

Inputs: the test split (run_dir/splits/test.txt) and run_dir/predictions/<stem>_seg.png.
Outputs: run_dir/metrics.json, run_dir/per_image_metrics.csv, and run_dir/figures/: iou_per_image.png,
gallery_worst.png, gallery_best.png.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import numpy as np

import cli
import files
from config import Config
from data_preprocess import (
    IGNORE,
    TILED_NAMES,
    load_mask,
    parse_bands,
    read_image,
    read_test_split,
    scene_groups,
    shown_channels,
)
from figures import photo_to_show, save_figure, subplots
from files import DataError, file_stamp, prediction_path, read_record, shown_path, shown_stamp
from metrics import (
    FEW_UNITS,
    INTERVAL_DRAWS,
    INTERVAL_LEVEL,
    evaluate_pairs,
    farmland_units,
    resampled_interval,
    summarise,
)
from png_text import read_texts
from tile_prediction import DIGEST_KEY, MADE_WITH_COMPARED, SOURCE_KEY, STAMP_KEY, made_with_of, source_texts

LOG = logging.getLogger("miou")


def plot_iou_curves(rows: list[dict], path: Path) -> None:
    """Save the per-image farmland and background IoU, with their means, as a PNG."""
    fig, ax = subplots(figsize=(9, 4))
    index = np.arange(len(rows))
    for key, colour in (("farmland_iou", "tab:green"), ("background_iou", "tab:brown")):
        values = np.array([r[key] for r in rows], dtype=np.float64)
        mean = np.nanmean(values) if np.isfinite(values).any() else math.nan
        ax.plot(index, values, ".-", color=colour, lw=0.8, label=f"{key.replace('_', ' ')} (mean {mean:.3f})")
        if not math.isnan(mean):
            ax.axhline(mean, color=colour, ls="--", lw=1)
    ax.set(
        xlabel="test image",
        ylabel="IoU",
        ylim=(0, 1.02),
        title="Per-image IoU (gaps: class absent in label and prediction)",
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    save_figure(fig, path)


def label_to_show(classes: np.ndarray) -> np.ndarray:
    """A decoded label (load_mask) as grey levels in [0, 1]: farmland white, background black and unlabelled
    pixels (IGNORE) mid-grey, not white: they are scored as neither class, so they must not look like farmland."""
    shown = classes.astype(np.float32)
    shown[classes == IGNORE] = 0.5
    return shown


GALLERY_NAME_CHARS = 26  # characters of a tile name per line beside a gallery row: one row's height at 8 points


def gallery(
    rows: list[dict],
    lookup: dict[str, tuple[Path, Path, Path]],
    cfg: Config,
    shown: Sequence[int],
    path: Path,
    title: str,
) -> None:
    """Save a photo | label | prediction grid of the given rows as one PNG, the photo's bands at ``shown``
    (shown_channels) as colour. A test image that cannot be read (not copied with the labels and masks) is
    warned of and its photo left blank: the scores need only the label and the prediction."""
    fig, axes = subplots(len(rows), 3, figsize=(7.5, 2.4 * len(rows)), squeeze=False)
    bands = parse_bands(cfg.bands)
    for ax_row, row in zip(axes, rows):
        image_path, label_path, pred_path = lookup[row["name"]]
        label = label_to_show(load_mask(label_path, cfg.mask_threshold, cfg.ignore_index))
        photo_title = "photo"
        try:
            photo = photo_to_show(read_image(image_path, nodata_as_zero=True), image_path, bands, shown)
        except DataError as err:
            LOG.warning("%s; %s shows no photo of it (its scores need only its label and prediction)", err, path)
            photo, photo_title = np.zeros(label.shape, np.float32), "photo (unreadable)"
        ax_row[0].imshow(photo, cmap="gray")
        ax_row[1].imshow(label, cmap="gray", vmin=0, vmax=1)
        ax_row[2].imshow(load_mask(pred_path), cmap="gray", vmin=0, vmax=1)
        # A long tile name (a Gaofen-2 scene's, some 60 characters) in one line would run over the rows beside.
        name = "\n".join(textwrap.wrap(row["name"], GALLERY_NAME_CHARS, break_on_hyphens=False))
        ax_row[0].set_ylabel(f"{name}\nIoU {row['farmland_iou']:.3f}", fontsize=8)
        titles = (photo_title, "label" if cfg.ignore_index < 0 else "label (grey: unlabelled)", "prediction")
        for ax, label in zip(ax_row, titles):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(label, fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def write_csv(rows: list[dict], path: Path) -> None:
    """Write the per-image counts and IoUs as CSV (empty IoU cell = class absent in label and prediction)."""
    buffer = io.StringIO()
    fields = [
        "name",
        "farmland_iou",
        "background_iou",
        "boundary_iou",
        "tp",
        "fp",
        "fn",
        "tn",
        "boundary_intersection",
        "boundary_union",
    ]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(row[k], float) and math.isnan(row[k]) else row[k]) for k in fields})
    files.atomic_write_csv(path, buffer.getvalue())


def made_elsewhere(mask: Path, image: Path, texts: dict[str, str]) -> str | None:
    """The error for a test image whose mask predict.py made from another file of that name (``--predict_input``
    into this run); None where the mask records this image, or records nothing (masks made otherwise are scored
    as they are). A mask made before the image's last change (or a mere touch) is scored, with a warning.
    ``texts``: the mask's PNG texts (png_text.read_texts)."""
    made = {k: v for k, v in texts.items() if k in (SOURCE_KEY, STAMP_KEY, DIGEST_KEY)}
    try:
        source = source_texts(image)
    except OSError:
        return None  # a missing image is the split's problem, reported where the label is read
    if not made or made == {k: v for k, v in source.items() if k in made}:  # masks of older versions lack a digest
        return None
    if made.get(SOURCE_KEY) == source[SOURCE_KEY]:
        LOG.warning(
            "%s: made before the test image %s last changed (or was touched); predict the test split again if its "
            "pixels changed",
            mask,
            source[SOURCE_KEY],
        )
        return None
    return (
        f"{mask}: was made from {made.get(SOURCE_KEY)}, not from the test image {source[SOURCE_KEY]}; not scored: "
        "predict the test split again (predict.py, this --run_dir, no --predict_input)"
    )


def examples(
    names: Sequence[str], masks: dict[str, Path], shown: Callable[[str], str] | None = None, count: int = 3
) -> str:
    """A few of the ``names``, by their mask's file name (each followed by ``shown(name)`` in brackets where
    given), and how many more."""
    parts = [masks[n].name + (f" ({shown(n)})" if shown else "") for n in names[:count]]
    return ", ".join(parts) + (f" and {len(names) - count} more" if len(names) > count else "")


def setting(made: dict[str, Any], key: str) -> str:
    """One key of a made_with record, as a message shows it."""
    if key == "model_stamp":
        return f"model {made.get('model')} ({shown_stamp(made.get('model_stamp'))})"
    if key == "threshold" and made.get(key) == -1:
        return "threshold -1.0, the model's own"
    return f"{key} {made.get(key)!r}"


def newest_made_with(made: dict[str, dict | None], masks: dict[str, Path]) -> tuple[dict | None, str]:
    """What the test masks must all have been made with: the model and settings the newest of them records, and
    that mask, for messages. A run stopped part-way with new settings leaves the newest masks made with those;
    a later predict.py run on other images leaves the test masks as they are. (None, "") where no mask records
    any: masks of an older version, or made otherwise, are scored as they are."""
    recorded = [n for n, m in made.items() if m is not None]
    if not recorded:
        return None, ""
    newest = max(recorded, key=lambda n: masks[n].stat().st_mtime_ns)
    return made[newest], f"the newest test mask, {masks[newest].name}"


def made_otherwise(made: dict[str, dict | None], reference: dict) -> dict[str, list[str]]:
    """The masks, among those that record how they were made, made with another model or other settings than
    ``reference`` (newest_made_with): by name, the keys that differ."""
    differ = {}
    for name, record in made.items():
        if record is not None:
            keys = [k for k in MADE_WITH_COMPARED if k in reference and record.get(k) != reference[k]]
            if keys:
                differ[name] = keys
    return differ


def model_named(cfg: Config) -> tuple[Path, str, str] | None:
    """The model file given on the command line (``checkpoint``; with ``backend=onnx``, ``onnx_model``), the key
    that names it and its size and time (file_stamp); None where none is given: the masks are then compared with
    the model they record.

    Raises:
        ValueError: the model file named does not exist.
    """
    model, key = (cfg.onnx_model, "--onnx_model") if cfg.backend == "onnx" else (cfg.checkpoint, "--checkpoint")
    if not model:
        return None
    try:
        return Path(model), key, file_stamp(Path(model))
    except OSError:
        raise ValueError(
            f"{key}={model}: no such file; name the model the masks were made with, or leave {key} out to score "
            "them with the model they record"
        ) from None


def recorded_model(made: str, then: str, run_dir: Path) -> tuple[Path | None, str | None]:
    """Where the model file a mask records (``made``, its size and time ``then``) is now, and its size and time
    there: looked for where it was, then under that name in the run's checkpoints/ and export/ folders (a run folder
    moved or copied with its times, or a path whose odd bytes the record holds as escapes). The first found as it
    was; else the first found at all (changed since); (None, None) where it is nowhere."""
    name = Path(made).name
    found: list[tuple[Path, str]] = []
    for path in (Path(made), run_dir / "checkpoints" / name, run_dir / "export" / name):
        try:
            found.append((path, file_stamp(path)))
        except OSError:
            continue
    same = [f for f in found if f[1] == then]
    return (same or found or [(None, None)])[0]


def other_model(
    named: tuple[Path, str, str] | None, reference: dict, names: list[str], masks: dict[str, Path], run_dir: Path
) -> str | None:
    """The error for the masks ``names``, made as ``reference`` says (newest_made_with), when the model file they
    record has changed since (trained again?), or, where a model is ``named`` (model_named), when they
    were made with another; None where they were made with the model as it is now."""
    made, then = str(reference.get("model")), reference.get("model_stamp")
    if not names or then is None:
        return None
    shown = f"{len(names)} test mask(s) ({examples(names, masks)})"
    where, now = recorded_model(made, then, run_dir)
    if named is None:
        if where is None:
            LOG.info("%s, the model the test masks record, is not there (a run folder moved?): scored as made", made)
        if now in (None, then):
            return None
        return (
            f"{shown}: were made with {made} as it was then ({shown_stamp(then)}), and "
            f"{'it' if where == Path(made) else f'{shown_path(where)}, found in its place,'} has changed since "
            f"({shown_stamp(now)}: trained again?); not scored: predict the test split again (predict.py, this "
            "--run_dir), then run miou.py"
        )
    model, key, stamp = named
    if stamp == then:
        return None
    found = (
        f"{shown}: were made with {made} ({shown_stamp(then)}), not with {shown_path(model.resolve())} "
        f"({shown_stamp(stamp)}), named by {key}"
    )
    fix = f"not scored: predict the test split again with it (predict.py {key}={model}, this --run_dir)"
    if now is None:
        return f"{found}, and theirs is not there; {fix}, or, to score these masks as made, name no model"
    if now != then:
        return f"{found}, and theirs has changed since; {fix}"
    flag = f"--backend=onnx --onnx_model={where}" if made.endswith(".onnx") else f"--checkpoint={where}"
    return f"{found}; {fix}, or, to score these masks as made, name theirs ({flag}) or no model at all"


def bands_of_the_run(cfg: Config) -> Config:
    """``cfg`` with, where it names neither ``bands`` nor ``rgb_bands``, those of the training
    (run_dir/configs/train.json), with which predict.py reads the test split, and its band count: the galleries
    then show the test tiles as the overlays do, without the training's keys given again here."""
    if cfg.bands or cfg.rgb_bands:
        return cfg
    trained = files.read_record(Path(cfg.run_dir) / "configs" / "train.json")
    if not isinstance(trained, dict):
        return cfg
    keys: dict[str, Any] = {key: str(trained.get(key) or "") for key in ("bands", "rgb_bands")}
    if isinstance(trained.get("in_channels"), int):
        keys["in_channels"] = trained["in_channels"]
    return dataclasses.replace(cfg, **keys)


MASK_KEYS = ("ignore_index", "mask_threshold")  # how masks are read: the test split's as the training read its own


def masks_read_as_trained(cfg: Config, given: Collection[str]) -> Config:
    """``cfg`` with the training's ``ignore_index`` and ``mask_threshold`` (run_dir/configs/train.json) for those
    not ``given`` on the command line: the test masks are read as the training read the train and val ones, so
    unlabelled pixels left out there are left out here too, without the keys given again."""
    trained = files.read_record(Path(cfg.run_dir) / "configs" / "train.json")
    if not isinstance(trained, dict):
        return cfg
    keys = {k: trained[k] for k in MASK_KEYS if k not in given and isinstance(trained.get(k), int)}
    keys = {k: v for k, v in keys.items() if v != getattr(cfg, k)}
    if keys:
        LOG.info(
            "reading the test masks as the training did: %s (from %s)",
            " ".join(f"--{k}={v}" for k, v in keys.items()),
            Path(cfg.run_dir) / "configs" / "train.json",
        )
    return dataclasses.replace(cfg, **keys)


def warn_older_than_model(cfg: Config, named: tuple[Path, str, str] | None, unrecorded: list[Path]) -> None:
    """Warn when test masks that record no model (an older version's, or another tool's) are all older than the
    model that predict.py would use now (the one ``named`` by model_named, else the run's checkpoints/best.pth):
    they may be an earlier model's, trained over since, and their figures not the model's now."""
    model = named[0] if named else Path(cfg.run_dir) / "checkpoints" / "best.pth"
    times = [mask.stat().st_mtime_ns for mask in unrecorded if mask.is_file()]
    if not times or not model.is_file() or max(times) >= model.stat().st_mtime_ns:
        return
    LOG.warning(
        "%d test mask(s) in %s record no model (an older version's) and are older than %s (%s): they may be an "
        "earlier model's, and these figures not this one's; predict the test split again (predict.py, this "
        "--run_dir), then run miou.py",
        len(times),
        Path(cfg.run_dir) / "predictions",
        model,
        shown_stamp(file_stamp(model)),
    )


def left_out_masks(cfg: Config, lookup: dict[str, tuple[Path, Path, Path]]) -> tuple[list[str], dict]:
    """The test images whose masks are not scored, each problem logged: masks made from another image
    (made_elsewhere), with another model or other settings than the newest test mask (made_otherwise), or with a
    model that has changed since or is not the one named (other_model); and each mask's made_with record (None
    where it holds none)."""
    named = model_named(cfg)  # a missing --checkpoint refused before anything is read
    masks = {name: mask for name, (_, _, mask) in lookup.items()}
    texts = {name: read_texts(mask) for name, mask in masks.items()}
    elsewhere = {name: made_elsewhere(mask, image, texts[name]) for name, (image, _, mask) in lookup.items()}
    for problem in filter(None, elsewhere.values()):
        LOG.error("%s", problem)
    left_out = [name for name, problem in elsewhere.items() if problem]
    made = {name: made_with_of(texts[name]) for name in masks if not elsewhere[name]}
    reference, origin = newest_made_with(made, masks)
    if reference is None:
        warn_older_than_model(cfg, named, [masks[name] for name in made])
        return left_out, made
    differ = made_otherwise(made, reference)
    if differ:
        names = list(differ)
        LOG.error(
            "%d test mask(s) in %s: expected the model and settings of %s (%s), found others: %s; not scored (masks "
            "an interrupted or earlier run left): predict the test split again (predict.py, this --run_dir, the "
            "settings you want), then run miou.py",
            len(names),
            Path(cfg.run_dir) / "predictions",
            origin,
            ", ".join(setting(reference, k) for k in dict.fromkeys(k for keys in differ.values() for k in keys)),
            examples(names, masks, lambda n: ", ".join(setting(made[n] or {}, k) for k in differ[n])),
        )
        left_out += names
    # A mask not there is no older version's: evaluate_pairs names it as not found.
    if unrecorded := [name for name, record in made.items() if record is None and masks[name].is_file()]:
        LOG.error(
            "%d test mask(s) in %s: expected the model and settings of %s, found none recorded (masks of an older "
            "version, or of another tool, that an interrupted run left): %s; not scored: predict the test split "
            "again (predict.py, this --run_dir), then run miou.py",
            len(unrecorded),
            Path(cfg.run_dir) / "predictions",
            origin,
            examples(unrecorded, masks),
        )
        left_out += unrecorded
    same = [name for name, record in made.items() if record is not None and name not in differ]
    if problem := other_model(named, reference, same, masks, Path(cfg.run_dir)):
        LOG.error("%s", problem)
        left_out += same
    return left_out, made


def scored_made_with(rows: list[dict], made: dict[str, dict | None]) -> dict | None:
    """What metrics.json says made the scored masks: the made_with record they share (tile_prediction: model
    file and stamp, the --threshold given and the cut applied, bands, sieve_cells, tta) and ``n_images``, how
    many of them record it (the others, of an older version, record nothing); None where none does."""
    recorded = [made[r["name"]] for r in rows if made.get(r["name"])]
    if not recorded:
        return None
    cut = recorded[0].get("cut")
    LOG.info(
        "the masks scored were made with %s (%s), farmland %s",
        recorded[0].get("model"),
        shown_stamp(recorded[0].get("model_stamp")),
        "by the argmax" if cut is None else f"where its probability exceeds {cut}",
    )
    return {**recorded[0], "n_images": len(recorded)}


def warn_other_cut(threshold: float, made_with: dict | None) -> None:
    """Warn when --threshold is not the cut the scored masks were made at: miou.py scores masks, it does not cut
    probabilities, so the threshold given here changes nothing."""
    cut = (made_with or {}).get("cut")
    if threshold == -1 or cut is not None and math.isclose(threshold, cut):
        return
    LOG.warning(
        "--threshold=%g is predict.py's: miou.py scores the masks as they were made (farmland %s); to score that "
        "cut, run predict.py --threshold=%g first",
        threshold,
        "by the argmax" if made_with and cut is None else f"above {cut}" if cut is not None else "at an unknown cut",
        threshold,
    )


def check_report_options(cfg: Config) -> None:
    """Refuse report settings that would draw nonsense: an edge band under a pixel, a negative gallery."""
    if cfg.boundary_width < 1:
        raise ValueError(f"--boundary_width={cfg.boundary_width}: expected the edge band's depth in pixels, 1 or more")
    if cfg.gallery_size < 0:  # a negative count sliced all tiles but the last into a gallery titled "-1 lowest"
        raise ValueError(f"--gallery_size={cfg.gallery_size}: expected tiles per gallery, 0 (none) or more; use 6")


def write_galleries(
    rows: list[dict], lookup: dict[str, tuple[Path, Path, Path]], cfg: Config, shown: Sequence[int], figures: Path
) -> None:
    """The galleries of the tiles of lowest and highest farmland IoU (gallery_size each); none where it is 0."""
    ranked = sorted((r for r in rows if not math.isnan(r["farmland_iou"])), key=lambda r: r["farmland_iou"])
    count = min(cfg.gallery_size, len(ranked))
    for name, title, order in (("worst", "lowest", ranked), ("best", "highest", ranked[::-1])):
        path = figures / f"gallery_{name}.png"
        if count:
            gallery(order[:count], lookup, cfg, shown, path, f"{count} {title} farmland IoU")
        else:  # an earlier run's gallery would stand beside these scores as if it showed them
            path.unlink(missing_ok=True)


def scene_pattern(cfg: Config, given: Collection[str]) -> str:
    """The pattern naming each test image's scene, for the interval: ``--group_pattern`` where given, else the one
    split_dataset.py split by ("" for none), checked before any image is scored.

    Raises:
        ValueError: a pattern given that is not a regular expression.
    """
    pattern = cfg.group_pattern
    if "group_pattern" not in given:
        recorded = read_record(Path(cfg.run_dir) / "configs" / "split_dataset.json")
        pattern = recorded.get("group_pattern", "") if isinstance(recorded, dict) else ""
        pattern = pattern if isinstance(pattern, str) else ""
    scene_groups([], pattern)
    return pattern


def test_scenes(pattern: str, images: Sequence[Path]) -> tuple[list[str], str]:
    """Each scored image's scene by ``pattern`` (scene_pattern), else by make_tiles.py's <scene>_r<row>c<col>
    names where every image has one, and what the units are ("scenes"); with neither, or a pattern that names no
    image's scene (warned of), each image is a unit of its own ("images")."""
    if not pattern and images and all(re.search(TILED_NAMES, image.stem) for image in images):
        pattern = TILED_NAMES
    if not pattern:
        return [image.stem for image in images], "images"
    scenes, unmatched = scene_groups([(image, image) for image in images], pattern)
    if unmatched:
        LOG.warning(
            "%d of the %d test images' names do not match --group_pattern=%s (e.g. %s): %s, for the interval",
            unmatched,
            len(images),
            files.shell_quoted(pattern),
            next(image.name for image in images if not re.search(pattern, image.stem)),
            "each is resampled as a scene of its own"
            if unmatched < len(images)
            else "the tiles are resampled one by one, not by scene",
        )
    return scenes, "scenes" if unmatched < len(images) else "images"


def interval_of(rows: list[dict], units: list[str], kind: str) -> dict[str, Any]:
    """metrics.json's ``interval``: the resampled intervals (metrics.resampled_interval) and what was resampled."""
    return {
        "level": INTERVAL_LEVEL,
        "resampled": kind,
        "units": len(set(units)),
        "units_with_farmland": farmland_units(rows, units),
        "draws": INTERVAL_DRAWS,
        **resampled_interval(rows, units),
    }


def log_interval(interval: dict[str, Any]) -> None:
    """The interval in one line, or why there is none; resampled by image, a word on what that misses."""
    units, kind = interval["units"], interval["resampled"]
    pooled, per_image = interval["pooled_farmland_iou"], interval["per_image_farmland_iou"]
    if pooled is None and per_image is None:
        held = (
            f"{interval['units_with_farmland']} of the {units} test {kind} hold farmland in a label or prediction "
            "(the others change no farmland IoU)"
            if units >= FEW_UNITS
            else f"the test split holds {units} {kind}"
        )
        LOG.warning(
            "%s: too few (under %d) to say how far its figures would move on other %s of the same place, so take "
            "them as one draw, not a measure of the model (docs/metrics.md)",
            held,
            FEW_UNITS,
            kind,
        )
        return
    LOG.info(
        "%d%% interval over %d resamplings of the %d test %s: pooled farmland IoU %s to %s, per image %s to %s%s",
        round(100 * interval["level"]),
        interval["draws"],
        units,
        kind,
        *(fmt(v) for v in pooled or (None, None)),
        *(fmt(v) for v in per_image or (None, None)),
        ""
        if kind == "scenes"
        else " (tiles of one scene err together: where they come from few scenes this is too narrow; give "
        f"--group_pattern={files.shell_quoted(TILED_NAMES)} or your own to resample scenes)",
    )


def log_summary(summary: dict, scored: int, listed: int) -> None:
    """The pooled and per-image figures of metrics.json, in two lines."""
    pooled, per_image = summary["pooled"], summary["per_image"]
    LOG.info(
        "%d of %d test image(s) | pooled: farmland IoU %s, background IoU %s, mIoU %s, F1 %s, accuracy %s, kappa %s, "
        "boundary IoU %s",
        scored,
        listed,
        *(
            fmt(pooled[k])
            for k in ("farmland_iou", "background_iou", "miou", "f1", "accuracy", "kappa", "boundary_iou")
        ),
    )
    LOG.info(
        "per-image means: farmland IoU %s (%d image(s)), background IoU %s (%d image(s))",
        fmt(per_image["farmland_iou"]),
        per_image["farmland_iou_images_counted"],
        fmt(per_image["background_iou"]),
        per_image["background_iou_images_counted"],
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Score run_dir/predictions against the test split's labels; write metrics, CSV and figures."""
    cfg, given = cli.parse_command(argv, __doc__ or "")
    cli.check_paths(cfg)
    cli.setup_logging(cfg, "miou")
    cfg = masks_read_as_trained(cfg, given)
    check_report_options(cfg)
    pattern = scene_pattern(cfg, given)
    cfg = bands_of_the_run(cfg)
    shown = shown_channels(cfg.rgb_bands, parse_bands(cfg.bands), cfg.in_channels)  # refused before the scoring
    run_dir = Path(cfg.run_dir)
    cli.save_config(cfg, "miou")
    given_dir = cfg.data_dir if "data_dir" in given else None
    pairs = read_test_split(run_dir, given_dir, (cfg.image_subdir, cfg.label_subdir))
    lookup = {p[0].stem: (p[0], p[1], prediction_path(run_dir, p[0])) for p in pairs}
    left_out, made = left_out_masks(cfg, lookup)
    skipped = set(left_out)
    rows, pooled, errors = evaluate_pairs(
        [(n, v[1], v[2]) for n, v in lookup.items() if n not in skipped],
        cfg.mask_threshold,
        cfg.n_classes,
        cfg.ignore_index,
        cfg.boundary_width,
    )
    errors += left_out
    if not rows:
        LOG.error("no test image could be scored (%d problem(s) above)", len(errors))
        return 1
    units, kind = test_scenes(pattern, [lookup[row["name"]][0] for row in rows])
    summary = summarise(rows, pooled, list(lookup)) | {"interval": interval_of(rows, units, kind)}
    summary["made_with"] = scored_made_with(rows, made)
    warn_other_cut(cfg.threshold, summary["made_with"])
    files.atomic_write_text(run_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
    write_csv(rows, run_dir / "per_image_metrics.csv")
    figures = run_dir / "figures"
    plot_iou_curves(rows, figures / "iou_per_image.png")
    write_galleries(rows, lookup, cfg, shown, figures)
    log_summary(summary, len(rows), len(lookup))
    log_interval(summary["interval"])
    LOG.info("wrote %s, %s and figures in %s", run_dir / "metrics.json", run_dir / "per_image_metrics.csv", figures)
    if errors:
        LOG.error(
            "%d test image(s) could not be scored (see the messages above; metrics.json names them in not_scored): "
            "the figures are of the other %d alone",
            len(errors),
            len(rows),
        )
        return 1
    return 0


def fmt(value: float | None) -> str:
    """Format a figure for the log, with 'n/a' for an undefined (0/0) one."""
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
