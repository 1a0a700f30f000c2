"""Farmland change between two dates (耕地变化监测): where farmland was lost or gained, and how many hectares.

    python change.py --before=SCENE_2019.tif --after=SCENE_2024.tif --run_dir=RUN
    python change.py --before=scenes_2019 --after=scenes_2024 --run_dir=RUN    # folders, paired by file name

Both dates are predicted with the run's checkpoint (run_dir/checkpoints/best.pth, or ``--checkpoint``) window
by window, as predict.py predicts scenes (scene.py), into a mask and a farmland probability GeoTIFF; the after
date is resampled onto the before scene's grid where the two differ (CRS, pixel size, extent), and the two
dates become a change map: 0 stable background, 1 stable farmland, 2 farmland lost, 3 farmland gained,
255 nodata. A date's farmland is its mask; a pixel changes only where the masks differ and both dates are
confident (``change_margin``, on the probabilities), away from the other
date's field edges when ``change_edge_tolerance`` is set, in a patch of at least the minimum mapping unit
(``min_field_area_ha``, or ``min_field_pixels`` without a projected CRS). See docs/change.md.

Outputs under run_dir/change/, per pair (``<pair>`` is the common file stem, or ``<before>_to_<after>``):
``<pair>_change.tif`` (with a colour table, overviews and a QGIS style ``.qml``), the lost and gained patches
as ``<pair>_change.gpkg`` and ``.geojson`` (``change``, ``area_ha``, ``prob_before``, ``prob_after``), the
hectares in ``<pair>_change.json`` and, for the run, ``change_area.csv``, and a figure ``<pair>_change.png``;
each date's mask and probability in dates/. A pair whose outputs are newer than the checkpoint and were
made with the same settings is skipped. Bad pairs are reported and the others go on (exit status 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import rasterio
import torch

import change_detection
import cli
import files
import polygons
import scene
from config import Config
from data_preprocess import entry_problem, full_scale, image_entries, rgb_bands_for
from files import DataError
from inference import (
    checkpoint_file,
    decision_threshold,
    inference_model,
    other_band_count,
    warn_network_keys,
    with_threshold,
)
from net_structure import input_padding
from runtime import apply_reuse_memory, load_checkpoint, resolve_amp, select_device

LOG = logging.getLogger("change")

# The keys of scene.OUTPUT_KEYS that only shape a scene's field polygons, which no date of a pair has: a new unit
# or simplification redoes the comparison (ChangeJob.record), not the dates' prediction.
FIELD_KEYS = ("min_field_area_ha", "min_field_pixels", "simplify_tolerance")


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two dates of one place: the name its outputs take, and the two image files."""

    name: str
    before: Path
    after: Path


@dataclasses.dataclass
class ChangeJob:
    """What every pair of a run shares: the network, its checkpoint and the settings."""

    model: torch.nn.Module
    state: dict
    device: torch.device
    checkpoint: Path
    settings: scene.SceneSettings
    rule: change_detection.ChangeRule
    cfg: Config
    truth: Path | None = None
    bands_given: bool = False  # --bands on the command line: no date is warned of its band count

    @property
    def date_record(self) -> dict:
        """The settings one date's mask, probability and fields depend on, kept beside them: a re-run with
        others predicts the date again."""
        return {
            "checkpoint": str(self.checkpoint),
            "checkpoint_stamp": files.file_stamp(self.checkpoint),  # other weights copied over it, cp -p
            "threshold": self.rule.threshold,
            "bands": list(self.settings.bands),
            **{key: getattr(self.cfg, key) for key in scene.OUTPUT_KEYS if key not in FIELD_KEYS},
            # Dates predicted when nodata reached the network as zeros (false loss along collars and clouds)
            # lack this key and are predicted again.
            "nodata_fed_as": scene.NODATA_FED_AS,
        }

    def record(self, pair: Pair) -> dict:
        """The inputs and settings a pair's outputs depend on, kept in its JSON: a re-run with other files
        under the same names (paired folders of other dates) or other settings redoes the pair."""
        keys = (*FIELD_KEYS, "change_margin", "change_edge_tolerance")
        return {
            **self.date_record,
            **{key: getattr(self.cfg, key) for key in keys},
            "change_rule": change_detection.RULE_VERSION,  # a pair compared by an earlier rule is compared again
            "change_truth": str(self.truth or ""),
            "change_truth_stamp": files.file_stamp(self.truth) if self.truth else "",  # a truth edited in place
            "change_truth_sha256": files.file_digest(self.truth) if self.truth else "",  # its old time set back too
            "before": str(pair.before.resolve()),
            "after": str(pair.after.resolve()),
            "before_stamp": files.file_stamp(pair.before),
            "after_stamp": files.file_stamp(pair.after),
            # Files edited in place to the same size with their old times set back (touch -r) are told apart too.
            "before_sha256": files.file_digest(pair.before),
            "after_sha256": files.file_digest(pair.after),
        }


# --- pairs and where their outputs go ----------------------------------------------------------------


def pair_name(before: Path, after: Path) -> str:
    """The common file stem, or ``<before stem>_to_<after stem>``."""
    return before.stem if before.stem == after.stem else f"{before.stem}_to_{after.stem}"


def images_by_stem(folder: Path, problems: list[str], reported: set[str]) -> dict[str, list[Path]]:
    """The images of a folder (not its sub-folders), by file stem: tiles and scenes, with the ``.vrt``, ``.img``
    and ``.jp2`` scenes that predict.py takes too; an image whose name is not UTF-8, a link to nothing or a folder
    named as an image is left out, its error added to ``problems`` and its stem to ``reported`` (its partner is
    not called lonely as well)."""
    found: dict[str, list[Path]] = {}
    scenes = [
        p for p in folder.iterdir() if p.suffix.lower() in scene.SCENE_ONLY_SUFFIXES and not p.name.startswith(".")
    ]
    for path in sorted(image_entries(folder) + scenes):
        if problem := files.name_problem(path) or entry_problem(path):
            problems.append(problem)
            reported.add(path.stem)
        else:
            found.setdefault(path.stem, []).append(path)
    return found


def list_pairs(cfg: Config) -> tuple[list[Pair], list[str]]:
    """The pairs to compare, and a problem line for every file that has no partner or a namesake.

    Raises:
        ValueError: --before or --after missing, or a file given with a folder.
        DataError: an input that does not exist, or two folders without a single pair.
    """
    if not cfg.before or not cfg.after:
        raise ValueError("change.py needs --before and --after: two scenes, or two folders of scenes or tiles")
    before, after = Path(cfg.before), Path(cfg.after)
    for key, path in (("before", before), ("after", after)):
        if not path.exists():
            raise DataError(f"--{key}={path}: no such file or folder")
    if before.resolve() == after.resolve():  # a typo would report every pair unchanged
        kind = "folder" if before.is_dir() else "file"
        raise ValueError(
            f"--before={before} and --after={after}: the same {kind} twice; expected the two dates to compare, the "
            "earlier with --before and the later with --after"
        )
    if before.is_file() and after.is_file():
        return [Pair(pair_name(before, after), before, after)], []
    if not (before.is_dir() and after.is_dir()):
        raise ValueError(f"--before={before} and --after={after}: expected two files or two folders, not one of each")
    problems: list[str] = []
    reported: set[str] = set()
    first, second = images_by_stem(before, problems, reported), images_by_stem(after, problems, reported)
    pairs = []
    for stem in sorted(set(first) | set(second)):
        found = {before: first.get(stem, []), after: second.get(stem, [])}
        for folder, paths in found.items():
            if len(paths) > 1:
                problems.append(f"{', '.join(map(str, paths))}: one name twice in {folder}; rename one of them")
        lonely = [folder for folder, paths in found.items() if not paths]
        if lonely and stem not in reported:
            other = after if lonely[0] == before else before
            problems.append(
                f"{found[other][0]}: no image named {stem}.* in {lonely[0]}; the dates are paired by file name"
            )
        elif all(len(paths) == 1 for paths in found.values()):
            pairs.append(Pair(stem, found[before][0], found[after][0]))
    if not pairs:
        shown = [
            ", ".join(sorted(side)[:3]) + (", ..." if len(side) > 3 else "") or "no image" for side in (first, second)
        ]
        raise DataError(
            f"--before={before} and --after={after}: no image has a namesake in the other folder (the before folder "
            f"holds {shown[0]}; the after folder {shown[1]}); the dates are paired by file name: give each place's "
            "scenes the same name in both folders (or links of that name), or compare one pair by giving the two "
            "files as --before and --after"
        )
    return pairs, problems


def date_outputs(run_dir: Path, name: str, date: str) -> dict[str, Path]:
    """Where one date's mask, style, probability and area go (run_dir/change/dates)."""
    folder, stem = Path(run_dir) / "change" / "dates", f"{name}_{date}"
    return {
        "mask": folder / f"{stem}_seg.tif",
        "style": folder / f"{stem}_seg.qml",
        "probability": folder / f"{stem}_prob.tif",
        "area": folder / f"{stem}_area.json",
        "record": folder / f"{stem}_settings.json",  # written last: the settings the date was predicted with
    }


def pair_outputs(run_dir: Path, name: str) -> dict[str, Path]:
    """Where a pair's change outputs go (run_dir/change)."""
    base = Path(run_dir) / "change" / f"{name}_change"
    kinds = {"change": ".tif", "style": ".qml", "gpkg": ".gpkg", "geojson": ".geojson", "figure": ".png"}
    return {kind: base.with_name(base.name + suffix) for kind, suffix in kinds.items()} | {
        "json": base.with_name(base.name + ".json")  # written last: its presence marks a finished pair
    }


def is_done(pair: Pair, job: ChangeJob) -> bool:
    """Whether an earlier run wrote every output of the pair after the checkpoint, from these two files as they
    are now (the record holds their paths, sizes and times) and with the same settings."""
    outputs = pair_outputs(Path(job.cfg.run_dir), pair.name)
    if not files.written_after(outputs.values(), job.checkpoint):
        return False
    row = files.read_record(outputs["json"])
    return isinstance(row, dict) and row.get("settings") == job.record(pair)


def date_is_done(outputs: dict[str, Path], settings: scene.SceneSettings, image: Path, job: ChangeJob) -> bool:
    """Whether an earlier run predicted this date from this very image file, after the checkpoint was made
    and after the file last changed, with the same settings (the unit and simplification that records of earlier
    versions hold left out: they shape no date)."""
    finished = scene.is_finished(outputs, settings, job.checkpoint, image)
    record = files.read_record(outputs["record"])
    if isinstance(record, dict):
        record = {key: value for key, value in record.items() if key not in FIELD_KEYS}
    return finished and record == job.date_record


# --- one pair -------------------------------------------------------------------------------------------


def band_count(path: Path) -> int:
    """The bands in an image file (DataError when it cannot be read); the file's warnings come as the pair opens."""
    with scene.scene_reader(path, warn=False) as opened:
        return opened.count


@contextlib.contextmanager
def open_pair(
    pair: Pair, bands: Sequence[int], in_channels: int, warn: bool = True
) -> Iterator[tuple[scene.Scene, scene.Scene, bool]]:
    """Both scenes of a pair, opened and checked, and whether the after one lies on the before one's grid;
    ``warn``: of a scene placed only by RPCs or off its Gauss-Kruger zone (off for the check before prediction,
    which opens the pair again).

    Raises:
        DataError: an unreadable file, band counts that differ between the dates (all their bands read, no
            ``bands`` given) or do not fit the network, scenes without a common grid (one without a CRS) or
            without overlap.
    """
    counts = band_count(pair.before), band_count(pair.after)
    if not bands and counts[0] != counts[1]:
        # With --bands both dates feed the network the same band numbers (an RGB date against an RGB-NIR one).
        fix = "export both with the same bands in the same order"
        if min(counts) >= in_channels:
            example = ",".join(str(b) for b in range(1, in_channels + 1))
            fix += (
                f", or, where the first {in_channels} bands are the same at both dates, read those of both with "
                f"--bands={example}"
            )
        raise DataError(
            f"{pair.before} (before) has {counts[0]} band(s), {pair.after} (after) has {counts[1]}; expected the "
            f"same bands at both dates: {fix}"
        )
    with (
        scene.open_scene(pair.before, bands, in_channels, warn=warn) as before,
        scene.open_scene(pair.after, bands, in_channels, warn=warn) as after,
    ):
        if full_scale(before.dtype) != full_scale(after.dtype):
            # Each date is scaled by its type's range (255, 65535): the same ground would look many times darker
            # at the 16-bit date, and every field would be "lost" or "gained". Float32 and float64 are both
            # reflectance, taken as they are.
            raise DataError(
                f"{pair.before} (before) holds {before.dtype} pixels, {pair.after} (after) {after.dtype}; expected "
                "the same pixel type at both dates (float32 and float64 count as one), since the network scales each "
                "by its type's range: export both as the same product, stretched alike (for example gdal_translate "
                "-ot Byte -scale MIN MAX 0 255 with the same MIN and MAX for both dates; -scale alone stretches each "
                "date by its own range)"
            )
        yield before, after, change_detection.check_grids(before, after)


def fit_window(settings: scene.SceneSettings, image: scene.Scene) -> scene.SceneSettings:
    """The scene settings for one image: a tile no larger than one window is predicted in a single window of
    its own size (rounded up to the network's grid: 16, or 32 for a ResNet encoder), not padded to a full window."""
    side = max(image.height, image.width)
    if side > settings.window:
        return settings
    return dataclasses.replace(settings, window=max(32, -(-side // settings.grid) * settings.grid), overlap=0)


def say_predicted_again(pair: Pair, date: str, record: Path, settings: dict) -> None:
    """Log why a date that an earlier run predicted (``record``, its settings file) is predicted again: the
    settings that differ from ``settings`` (ChangeJob.date_record); those an older version did not record show as
    None. Nothing where there is no earlier record, or where only its files are older than the checkpoint or the
    image."""
    earlier = files.read_record(record)
    if not isinstance(earlier, dict):
        return
    differ = [key for key, value in settings.items() if earlier.get(key) != value]
    if differ:
        LOG.info(
            "%s: the %s date is predicted again: its earlier outputs were made otherwise (%s)",
            pair.name,
            date,
            ", ".join(f"{key} {earlier.get(key)!r}, now {settings[key]!r}" for key in differ),
        )


def predict_dates(
    pair: Pair, before: scene.Scene, after: scene.Scene, job: ChangeJob
) -> dict[str, change_detection.Date]:
    """Predict both dates (unless this checkpoint already did); return their mask and probability GeoTIFFs by
    date."""
    dates = {}
    for date, image in (("before", before), ("after", after)):
        outputs = date_outputs(Path(job.cfg.run_dir), pair.name, date)
        settings = fit_window(job.settings, image)
        if job.cfg.skip_existing and date_is_done(outputs, settings, image.path, job):
            LOG.info("%s: the %s date's mask and probability are already there from this checkpoint", pair.name, date)
        else:
            say_predicted_again(pair, date, outputs["record"], job.date_record)
            outputs["record"].unlink(missing_ok=True)
            scene.run_scene(job.model, image, job.state, job.device, settings, outputs, job.checkpoint)
            files.atomic_write_text(outputs["record"], json.dumps(job.date_record, indent=2) + "\n")
        dates[date] = change_detection.Date(outputs["mask"], outputs["probability"])
    return dates


def no_common_data(pair: Pair, run_dir: Path) -> DataError:
    """The refusal of a pair without a pixel of data at both dates: a date that holds no data at all (an all-nodata
    tile or scene) is named as such; else their extents overlap and their data do not (collars of nodata around
    rotated footprints)."""
    empty = []
    for date, path in (("before", pair.before), ("after", pair.after)):
        row = files.read_record(date_outputs(run_dir, pair.name, date)["area"])
        if isinstance(row, dict) and row.get("valid_pixels") == 0:
            empty.append(f"{path} ({date})")
    if empty:
        return DataError(
            f"{' and '.join(empty)}: {'holds' if len(empty) == 1 else 'hold'} no data, every pixel nodata (all bands "
            "0 or the declared nodata), so the pair cannot be compared; expected an image with data, or leave this "
            "pair out"
        )
    return DataError(
        f"{pair.before} (before) and {pair.after} (after): no pixel holds data at both dates, so nothing can "
        "be compared: their extents overlap, but where one has data the other is nodata; expected two dates "
        "of the same place (check the scenes' footprints, not only their extents)"
    )


def detect_change(
    pair: Pair,
    before: scene.Scene,
    after: scene.Scene,
    aligned: bool,
    dates: dict[str, change_detection.Date],
    job: ChangeJob,
) -> dict:
    """The change map, its polygons, table row, score and figure of one predicted pair; return the row."""
    outputs = pair_outputs(Path(job.cfg.run_dir), pair.name)
    pixel_m2 = scene.pixel_area_m2(before.crs, before.transform)
    min_pixels = polygons.min_pixels_for(job.cfg.min_field_area_ha, pixel_m2, job.cfg.min_field_pixels)
    if pixel_m2 is None and job.cfg.min_field_area_ha > 0 and not job.cfg.min_field_pixels:
        LOG.warning(
            "%s: %s, so min_field_area_ha cannot apply; set --min_field_pixels",
            pair.before,
            scene.area_problem(before.crs),
        )
    overlap = polygons.simplification_overlap(job.cfg.simplify_tolerance, before.transform)
    if overlap:
        LOG.warning("%s: %s", pair.name, overlap)
    rule = dataclasses.replace(job.rule, min_pixels=min_pixels)
    with rasterio.Env(GDAL_CACHEMAX=scene.GDAL_CACHE_MB):
        counts = change_detection.write_change_map(dates["before"], dates["after"], aligned, rule, outputs["change"])
        if counts.valid == 0:
            raise no_common_data(pair, Path(job.cfg.run_dir))
        if change_detection.margin_hides_change(counts):
            LOG.warning("%s", change_detection.margin_warning(pair.name, counts, rule))
        patches = change_detection.write_change_polygons(
            outputs["change"],
            dates["before"].probability,
            dates["after"].probability,
            aligned,
            {k: outputs[k] for k in ("gpkg", "geojson")},
            min_pixels,
            job.cfg.simplify_tolerance,
        )
        grid = change_detection.grid_of(before)
        row = change_detection.change_row(
            pair.name, pair.before, pair.after, grid, aligned, counts, patches, outputs["change"]
        )
        # Which network and cut made the pair, in the table too: it may hold pairs of an earlier training.
        row |= {
            "model": str(job.checkpoint.resolve()),
            "epoch": job.state.get("epoch"),
            "threshold": rule.threshold,
            "change_margin": rule.margin,
        }
        if job.truth is not None:
            row["accuracy"] = change_detection.score_change(outputs["change"], job.truth)
            warn_truth_without_change(pair, job.truth, row["accuracy"])
        change_detection.write_change_figure(
            before, after, aligned, outputs["change"], outputs["figure"], job.settings.shown
        )
    row["settings"] = job.record(pair)
    files.atomic_write_text(outputs["json"], json.dumps(row, indent=2, ensure_ascii=False) + "\n")
    return row


def warn_replaced(pair: Pair, run_dir: Path) -> None:
    """Warn when the pair's outputs hold another pair of files under its name (2019 against 2022, now against
    2024): they are replaced, and with them that pair's row of the table."""
    row = files.read_record(pair_outputs(run_dir, pair.name)["json"])
    settings = row.get("settings") if isinstance(row, dict) else None
    if not isinstance(settings, dict):
        return
    earlier = (settings.get("before"), settings.get("after"))
    if None not in earlier and earlier != (str(pair.before.resolve()), str(pair.after.resolve())):
        LOG.warning(
            "%s: replaces the comparison of %s with %s made earlier under the same name in %s, and its row of "
            "change_area.csv; to keep both, compare the other dates into another --run_dir",
            pair.name,
            *earlier,
            run_dir,
        )


def warn_truth_without_change(pair: Pair, truth: Path, accuracy: dict) -> None:
    """Warn where a true change map holds no lost or gained pixel that both dates have data for (score_change's
    ``accuracy``): its IoU say nothing of the map, and a mask of changed pixels (0/1, 0/255) reads so."""
    if accuracy["lost_true_pixels"] or accuracy["gained_true_pixels"]:  # not the areas: rounded, 0 ha at 5 cm
        return
    LOG.warning(
        "%s: --change_truth=%s holds no lost (2) or gained (3) pixel where both dates hold data, so the lost and "
        "gained IoU are 0 wherever the map shows change (empty where it shows none); a mask of changed pixels reads "
        "as stable background (0), stable farmland (1) and unknown (255): recode such a mask to the change codes 0 "
        "stable background, 1 stable farmland, 2 farmland lost, 3 farmland gained, 255 unknown (a truth of a place "
        "without change is right as it is)",
        pair.name,
        truth,
    )


def run_pair(pair: Pair, job: ChangeJob) -> dict:
    """Predict both dates of a pair and write its change outputs; return its table row."""
    in_channels = job.state["config"]["in_channels"]
    warn_replaced(pair, Path(job.cfg.run_dir))
    # A pair that fails from here on must not keep the row of an earlier run beside a newer map.
    pair_outputs(Path(job.cfg.run_dir), pair.name)["json"].unlink(missing_ok=True)
    with open_pair(pair, job.settings.bands, in_channels) as (before, after, aligned):
        dates = predict_dates(pair, before, after, job)
        row = detect_change(pair, before, after, aligned, dates, job)
    unit = "ha" if row["lost_ha"] is not None else "pixels"
    amounts = [row[f"{k}_ha"] if unit == "ha" else row[f"{k}_pixels"] for k in ("lost", "gained")]
    LOG.info(
        "%s: farmland lost %s %s in %d patch(es), gained %s %s in %d patch(es)%s",
        pair.name,
        amounts[0],
        unit,
        row["lost_patches"],
        amounts[1],
        unit,
        row["gained_patches"],
        ""
        if "accuracy" not in row
        else f"; against the truth: lost IoU {row['accuracy']['lost_iou']}, gained IoU {row['accuracy']['gained_iou']}",
    )
    return row


# --- the run --------------------------------------------------------------------------------------------


def check_pairs(pairs: Sequence[Pair], job: ChangeJob) -> tuple[list[Pair], int]:
    """Open and check every pair before the first is predicted; return the good ones and the count of bad."""
    ready, failures, in_channels = [], 0, job.state["config"]["in_channels"]
    for pair in pairs:
        try:
            with open_pair(pair, job.settings.bands, in_channels, warn=False) as (before, after, _):
                if job.truth is not None:
                    change_detection.check_truth(job.truth, change_detection.grid_of(before), str(pair.before))
                for date in (before, after):  # counted as train.py counts its tiles: an alpha band left out
                    count = scene.band_count(date.path)
                    if count is not None and (
                        message := other_band_count(count, date.path, job.state, job.bands_given)
                    ):
                        LOG.warning("%s", message)
                ready.append(pair)
        except DataError as err:
            LOG.error("%s", err)
            failures += 1
    return ready, failures


def make_job(cfg: Config, given: Collection[str] = ()) -> ChangeJob:
    """Load the checkpoint, build the network and read the change settings (``given``: the keys on the command
    line, whose network keys the checkpoint overrules).

    Raises:
        ValueError: a setting that cannot work; DataError: the checkpoint or the truth cannot be used.
    """
    if cfg.backend != "torch":
        raise ValueError(f"--backend={cfg.backend}: change.py predicts with the checkpoint in PyTorch; drop --backend")
    device = select_device(cfg.device)
    checkpoint = checkpoint_file(cfg)
    state = with_threshold(load_checkpoint(checkpoint, device), cfg.threshold)  # the user's cut, if given
    warn_network_keys(cfg, given, state["config"], checkpoint)
    if not cfg.bands:
        cfg.bands = str(state["config"].get("bands", ""))  # the bands the network was trained on
    cfg.rgb_bands = rgb_bands_for(cfg.rgb_bands, cfg.bands, state["config"])
    threshold = decision_threshold(state)
    rule = change_detection.ChangeRule(
        0.5 if threshold is None else threshold, cfg.change_margin, cfg.change_edge_tolerance
    )
    rule.check()
    truth = Path(cfg.change_truth) if cfg.change_truth else None
    if truth is not None and not truth.is_file():
        raise DataError(f"--change_truth={truth}: no such file; give the true change map (codes 0-3) of the pair")
    apply_reuse_memory(cfg.reuse_memory)
    model = inference_model(state, device, cfg.channels_last, resolve_amp(cfg.amp, device))
    settings = dataclasses.replace(
        scene.SceneSettings.from_config(cfg, *input_padding(state["config"]), state["config"]["in_channels"]),
        save_probability=True,
        polygons=False,
        overlay=False,
        save_sieved_mask=False,
    )
    return ChangeJob(model, state, device, checkpoint, settings, rule, cfg, truth, "bands" in given)


def write_run_table(run_dir: Path) -> Path:
    """Collect the JSON rows of every pair compared in run_dir (by this command or an earlier one) into
    run_dir/change/change_area.csv."""
    folder = Path(run_dir) / "change"
    rows = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(folder.glob("*_change.json"))]
    older = [row["pair"] for row in rows if row.get("settings", {}).get("change_rule") != change_detection.RULE_VERSION]
    if older:
        LOG.warning(
            "%d pair(s) in %s were compared by an earlier version of the change rule (docs/change.md) and keep "
            "their rows until change.py compares them again: %s",
            len(older),
            folder / "change_area.csv",
            ", ".join(older),
        )
    table = folder / "change_area.csv"
    change_detection.write_change_table(rows, table)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Compare every pair of dates and write its change map, patches, table and figure under run_dir/change."""
    with files.remembered_digests():
        return compare_all(argv)


def compare_all(argv: Sequence[str] | None = None) -> int:
    """The body of main: parse the config, compare the pairs not yet compared, write the run's table."""
    cfg, given = cli.parse_command(argv, __doc__ or "")
    cli.check_paths(cfg)
    cli.setup_logging(cfg, "change")
    logging.getLogger("pyogrio").setLevel(logging.WARNING)  # it logs every file it writes at INFO
    run_dir = Path(cfg.run_dir)
    pairs, problems = list_pairs(cfg)
    job = make_job(cfg, given)
    cli.save_config(cfg, "change")
    if job.truth is not None and len(pairs) != 1:
        raise ValueError(
            f"--change_truth={job.truth} scores one pair; --before={cfg.before} and --after={cfg.after} give "
            f"{len(pairs)} pairs: give the two files of the pair it was drawn for (for example "
            f"--before={pairs[0].before} --after={pairs[0].after}), and compare the folders without it"
        )
    for problem in problems:
        LOG.error("%s", problem)
    todo = [p for p in pairs if not (cfg.skip_existing and is_done(p, job))]
    if len(todo) < len(pairs):
        LOG.info(
            "%d of %d pair(s) already have their change outputs from this checkpoint and settings and are skipped "
            "(--skip_existing=false redoes them)",
            len(pairs) - len(todo),
            len(pairs),
        )
    ready, failures = check_pairs(todo, job)
    for pair in ready:
        try:
            run_pair(pair, job)
        except DataError as err:
            LOG.error("%s", err)
            failures += 1
    table = write_run_table(run_dir)
    LOG.info("change of %d pair(s) in %s", len(pairs) - failures, table.parent)
    if failures or problems:
        # A problem is a file (or a name) that found no pair; a failure is a pair that could not be compared.
        told = [f"{failures} pair(s) could not be compared"] if failures else []
        told += [f"{len(problems)} problem(s) left files unpaired"] if problems else []
        LOG.error("%s; see the messages above", " and ".join(told))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
