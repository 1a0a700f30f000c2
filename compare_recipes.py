"""Compare training recipes on your own labelled data, side by side, on the same tiles and budget.

    python compare_recipes.py --data_dir=path/to/data --group_pattern='^(.+)_r\\d+c\\d+$' --base_width=16 --epochs=8

1. Split the data by scene (``group_pattern``; all tiles of a scene in one split, so neighbouring tiles
   cannot leak from training into the test figures), once per seed of ``--split_seeds`` (the seed also
   seeds the weights and the augmentation of that split's runs).
2. For the whole data set, and for a minority subset (the tiles with the least farmland, the share set by
   ``--minority_quantile``, kept within the same scene split), train every variant on the same number of
   tile passes, predict the test split and score it with miou.py.
3. Print a table and write run_dir/comparison.json (every figure of every run) and comparison.md (the
   table, with the mean over split seeds when there are several).

Variants (``--variants``, comma separated): a recipe name (``reference``, ``recommended``), optionally with
settings changed after a ``+``: ``recommended+dropout=0+colour_jitter=0``. ``--ablate`` adds, for every
setting of the recommended recipe, the recommended recipe with that one setting back at the reference's
value: which settings earn their place. The default compares the two recipes.
Any other ``--key=value`` is a config key passed to every run (for example ``--num_workers=4``); with
``--time_budget=MINUTES`` every run trains for the same time instead of the same tile passes.
``--tta`` also scores every run with predict.py's ``--tta`` (the same weights, probabilities averaged over the
8 flips and turns of each test tile), in the run's tta/ folder: the ``_tta`` columns. ``--last`` also scores
every run's last epoch (last.pth, at its own tuned threshold) in its last/ folder: the ``_last`` columns, to
see what choosing the best epoch on the validation split gained or cost.
A run whose result.json matches its settings (the recipe's values among them) is not trained again: an
interrupted comparison continues (and gains its ``--tta`` and ``--last`` figures without training when they are
missing); one whose masks were sieved otherwise (``sieve_cells``, or made before the sieve), or whose test images
or masks have changed since (size or time), is predicted and scored again from its weights; one whose training or
validation images or masks have changed since is trained afresh (for a run of an older version, which recorded
none of them: written after its training began). The log says why a finished run is trained or scored again.
A run stopped part-way through its epochs goes on from its last.pth with ``--resume=true`` (runs done are taken
as they are, runs not begun start afresh); its minutes then count the epochs before the stop too.
Offline flips (augment.py) are left out of every variant, so all see exactly the same tiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

import cli
import files
import miou
import predict
import split_dataset
import train
from config import RECOMMENDED, Config
from data_preprocess import SPLIT_NAMES, farmland_share, load_mask, read_pair_list, scene_groups, write_pair_list
from inference import NETWORK_KEYS
from runtime import load_checkpoint
from training import ARCHITECTURE_KEYS, CHOSEN_BY_TRAINING, TRAINING_KEYS

LOG = logging.getLogger("compare_recipes")
RECIPES = ("reference", "recommended")
SCORES = ("test_farmland_iou_pooled", "test_farmland_iou_per_image", "test_boundary_iou_pooled")
# Extra scorings of a finished run: its folder, the checkpoint and predict.py's extra arguments.
EXTRA_SCORINGS = {"tta": ("best.pth", ("--tta=true",)), "last": ("last.pth", ())}


def extra_columns(kind: str) -> tuple[str, str]:
    """The pooled and per-image columns of an extra scoring (``tta``, ``last``)."""
    return f"test_farmland_iou_pooled_{kind}", f"test_farmland_iou_per_image_{kind}"


# Keys that act at prediction alone: a variant's changes reach only train.py, where these do nothing.
PREDICTION_KEYS = ("threshold", "tta", "sieve_cells")


@dataclasses.dataclass(frozen=True)
class Variant:
    """A recipe with some of its settings changed: what one row of the comparison trains."""

    recipe: str
    changes: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        """The variant as written on the command line, e.g. recommended+dropout=0."""
        return "+".join([self.recipe, *(f"{k}={v}" for k, v in self.changes)])

    @property
    def folder(self) -> str:
        """The name of its run folder: the variant's name, a path in it (init_weights=runs/a/best.pth) made one
        folder name."""
        return self.name.replace("/", "_").replace("\\", "_")

    def arguments(self) -> list[str]:
        """The train.py arguments that select it."""
        return [f"--recipe={self.recipe}", *(f"--{k}={v}" for k, v in self.changes)]


def parse_variant(text: str) -> Variant:
    """``recipe[+key=value...]`` as a Variant.

    Raises:
        ValueError: an unknown recipe or config key, or a change without ``=``.
    """
    recipe, *changes = text.strip().split("+")
    if recipe not in RECIPES:
        raise ValueError(f"variant {text!r}: starts with {recipe!r}; expected one of {', '.join(RECIPES)}")
    known = {f.name for f in dataclasses.fields(Config)}
    pairs = []
    for change in changes:
        key, sep, value = change.partition("=")
        if not sep or key not in known:
            raise ValueError(
                f"variant {text!r}: {change!r} is not a config key=value; write e.g. recommended+dropout=0"
            )
        if key == "resume":
            raise ValueError(f"variant {text!r}: resume is no recipe setting; pass --resume=true to go on with runs")
        if key in PREDICTION_KEYS:
            raise ValueError(
                f"variant {text!r}: {key} is a setting of prediction, not of training; give --{key}={value} to the "
                "whole comparison"
            )
        pairs.append((key, value))
    return Variant(recipe, tuple(pairs))


def ablation_variants() -> list[Variant]:
    """The recommended recipe with each of its settings, one at a time, back at the reference's value."""
    reference = Config()
    return [Variant("recommended", ((key, str(getattr(reference, key)).lower()),)) for key in RECOMMENDED]


def choose_variants(text: str, ablate: bool) -> list[Variant]:
    """The variants to run: the listed ones (default: both recipes), then the ablation's, without repeats."""
    chosen = [parse_variant(t) for t in text.split(",") if t.strip()] or [Variant(r) for r in RECIPES]
    if ablate:
        chosen += [Variant("recommended"), *ablation_variants()]
    return list(dict.fromkeys(chosen))


def farmland_fraction(mask_path: Path, mask_threshold: int = 0, ignore_index: int = -1) -> float:
    """Share of a mask's labelled pixels that are farmland."""
    return farmland_share(load_mask(mask_path, mask_threshold, ignore_index))


def minority_splits(
    splits: dict[str, list[tuple[Path, Path]]], quantile: float, mask_threshold: int = 0, ignore_index: int = -1
) -> tuple[dict[str, list[tuple[Path, Path]]], float]:
    """Keep, in every split, the tiles whose farmland share is at or below the ``quantile`` of all tiles.

    Returns:
        the filtered splits and the farmland share of the kept tiles' pixels (unweighted mean of tiles).
    """
    fractions = {pair: farmland_fraction(pair[1], mask_threshold, ignore_index) for s in splits.values() for pair in s}
    cut = float(np.quantile(list(fractions.values()), quantile))
    kept = {name: [p for p in pairs if fractions[p] <= cut] for name, pairs in splits.items()}
    shares = [fractions[p] for pairs in kept.values() for p in pairs]
    return kept, float(np.mean(shares)) if shares else float("nan")


def write_scene_counts(run_dir: Path, splits: dict[str, list[tuple[Path, Path]]], group_pattern: str) -> None:
    """splits/summary.json with each split's scene count, as split_dataset.py writes it, so that a run's
    keep_epoch=auto sees the scenes of its own (perhaps filtered) splits; nothing when split by tile."""
    if not group_pattern:
        return
    groups = {name: len(set(scene_groups(splits[name], group_pattern)[0])) for name in SPLIT_NAMES}
    files.atomic_write_text(run_dir / "splits" / "summary.json", json.dumps({"groups": groups}, indent=2) + "\n")


def data_stamps(splits: dict[str, list[tuple[Path, Path]]]) -> dict[str, str]:
    """Digests of the size and time (files.file_stamp) of every image and mask a run trains and validates on
    (``train``) and of those it is tested on (``test``): a mask corrected since a run was done makes its figures
    stale, though the splits list the same files."""
    digests = {}
    for part, names in (("train", ("train", "val")), ("test", ("test",))):
        digest = hashlib.sha256()
        for path in (path for name in names for pair in splits[name] for path in pair):
            try:
                stamp = files.file_stamp(path)
            except OSError:
                stamp = "missing"
            digest.update(f"{path}\t{stamp}\n".encode("utf-8", "surrogateescape"))
        digests[part] = digest.hexdigest()
    return digests


def trained_on_other_data(run_dir: Path, settings: dict, splits: dict[str, list[tuple[Path, Path]]]) -> bool:
    """Whether the run done in ``run_dir`` (its result.json) trained or validated on images or masks that have
    changed since (data_stamps); False where it is not done. A run done by an older version records no digests:
    there, an image or mask of ``splits``' train and val written after its training began (configs/train.json,
    else its last.pth) is one it did not train on."""
    try:
        earlier = json.loads((run_dir / "result.json").read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError):
        return False
    data = earlier.get("data") if isinstance(earlier, dict) else None
    if isinstance(data, dict):
        return data.get("train") != settings["data"]["train"]
    began = [run_dir / "configs" / "train.json", run_dir / "checkpoints" / "last.pth"]
    began = [path.stat().st_mtime_ns for path in began if path.is_file()]
    if not began:
        return False
    paths = [path for name in ("train", "val") for pair in splits[name] for path in pair]
    return any(not path.is_file() or path.stat().st_mtime_ns > began[0] for path in paths)


def resumed_seconds(last: Path) -> float | None:
    """Seconds of the epochs that a run's ``last`` (its last.pth) holds (their ``seconds`` in the history), so
    that the minutes of a run continued with ``--resume=true`` count them too; None where there is no last.pth
    (nothing to resume: the run starts afresh)."""
    if not last.is_file():
        return None
    return sum(float(epoch.get("seconds", 0.0)) for epoch in load_checkpoint(last).get("history", []))


def trained_otherwise(last: Path, arguments: Sequence[str]) -> list[str]:
    """The keys of the network and the training (training.ARCHITECTURE_KEYS, TRAINING_KEYS) in which the run saved
    at ``last`` differs from what ``arguments`` (train.py's) now resolve to: a recipe changed since the run began.
    Keys the run settled itself (an auto value given) are not compared."""
    saved = load_checkpoint(last, mmap=True).get("config", {})
    cfg = cli.parse_args(arguments)
    keys = [*ARCHITECTURE_KEYS, *TRAINING_KEYS]
    return [
        k
        for k in keys
        if k in saved and getattr(cfg, k) != CHOSEN_BY_TRAINING.get(k, object()) and saved[k] != getattr(cfg, k)
    ]


def run_variant(
    run_dir: Path,
    splits: dict[str, list[tuple[Path, Path]]],
    variant: Variant,
    epochs: int,
    overrides: Sequence[str],
    extras: Sequence[str] = (),
    group_pattern: str = "",
    resume: bool = False,
) -> dict:
    """Train, predict and score one variant in ``run_dir`` (and score it the ``extras`` ways: EXTRA_SCORINGS);
    return its figures (kept in run_dir/result.json, and taken from there instead of training again when the
    settings are the same: done_row). ``resume`` (``--resume=true``): a run stopped part-way continues from its
    last.pth, and its minutes add the seconds of the epochs it continues from (their start-up not counted); a
    run not begun starts afresh. Whether a run resumed is no part of its settings."""
    kept = [a for a in overrides if not a.startswith(("--resume=", "--sieve_cells="))]
    settings = {"variant": variant.name, "epochs": epochs, "overrides": kept}
    # Masks are sieved at prediction: figures made under another sieve, or before it, are not these.
    settings["sieve_cells"] = cli.parse_args(overrides).sieve_cells
    if variant.recipe == "recommended":  # the recipe's values change as it is measured again
        settings["recipe"] = {key: str(value) for key, value in RECOMMENDED.items()}
    settings["splits"] = {name: [str(p[0]) for p in splits[name]] for name in SPLIT_NAMES}
    settings["data"] = data_stamps(splits)
    done = done_row(run_dir, settings, splits, variant, overrides, extras)
    if done is not None:
        return done
    if trained_on_other_data(run_dir, settings, splits):
        LOG.info(
            "%s: its training or validation images or masks have changed since it was done: trained afresh", run_dir
        )
        resume = False  # its last.pth holds the weights of the old data
        # Nothing of the old run is left to be taken up again: a retraining stopped before its first epoch saved
        # would otherwise leave result.json to retrain afresh forever, or last.pth to resume the old data's weights.
        for stale in ("result.json", "checkpoints/last.pth", "checkpoints/best.pth"):
            files.remove_quietly(run_dir / stale)
    for name in SPLIT_NAMES:
        write_pair_list(run_dir / "splits" / f"{name}.txt", splits[name])
    write_scene_counts(run_dir, splits, group_pattern)
    common = [*overrides, f"--run_dir={run_dir}"]  # the last value of a key wins
    last = run_dir / "checkpoints" / "last.pth"
    earlier = resumed_seconds(last) if resume else None
    # Under a time budget the epochs are planned: a number given too would only be reported as ignored.
    budget = cli.parse_args([*common, *variant.arguments()]).time_budget > 0
    arguments = [*common, *variant.arguments(), *([] if budget else [f"--epochs={epochs}"])]
    if earlier is not None and (differ := trained_otherwise(last, arguments)):
        LOG.warning(
            "%s: began with other settings (%s) than %s has now: trained afresh",
            run_dir,
            ", ".join(differ),
            variant.name,
        )
        earlier = None
    resume = earlier is not None
    started = time.perf_counter()
    if train.main([*arguments, f"--resume={str(resume).lower()}"]) != 0:
        raise RuntimeError(f"{run_dir}: training failed; see {run_dir / 'logs' / 'train.log'}")
    seconds = (earlier or 0.0) + time.perf_counter() - started
    return scored_row(run_dir, settings, splits, variant, overrides, seconds, extras)


def settings_changes(earlier: dict, settings: dict) -> list[str]:
    """What differs between the settings a run was done with (its result.json) and ``settings``, as a log shows
    it: "epochs 1, now 2", "--base_width=4 now --base_width=8", "the split's tiles"; the data digests and the
    sieve are left out (done_row scores again for those)."""
    changes = []
    for key in settings.keys() - {"sieve_cells", "data"} | earlier.keys() - {"sieve_cells", "data"}:
        was, now = earlier.get(key), settings.get(key)
        if was == now:
            continue
        if key == "splits":
            changes.append("the split's tiles")
        elif isinstance(was, list) and isinstance(now, list):
            gone, new = [a for a in was if a not in now], [a for a in now if a not in was]
            changes.append(f"{' '.join(gone) or 'nothing'} now {' '.join(new) or 'nothing'}")
        elif isinstance(was, dict) and isinstance(now, dict):
            changes += [
                f"{key}.{k} {was.get(k)}, now {now.get(k)}"
                for k in sorted(was.keys() | now.keys())
                if was.get(k) != now.get(k)
            ]
        else:
            changes.append(f"{key} {was}, now {now}")
    return sorted(changes)


def done_row(
    run_dir: Path,
    settings: dict,
    splits: dict[str, list[tuple[Path, Path]]],
    variant: Variant,
    overrides: Sequence[str],
    extras: Sequence[str],
) -> dict | None:
    """The figures of a run that run_dir/result.json says was done under ``settings``, with its missing
    ``extras`` scored; where only the sieve differs (``sieve_cells``), its weights predicted and scored again,
    extras included, without training. None where the run is to be trained."""
    saved = run_dir / "result.json"
    if not saved.is_file():
        return None
    result = json.loads(saved.read_text(encoding="utf-8"))
    earlier, row = result.get("settings", {}), result["row"]
    weights = [run_dir / "checkpoints" / name for name in ("best.pth", "last.pth")]
    changeable = {"sieve_cells": settings["sieve_cells"], "data": settings["data"]}
    if {**earlier, **changeable} != settings or not all(w.is_file() for w in weights):
        why = settings_changes(earlier, settings) or [f"{w.name} missing" for w in weights if not w.is_file()]
        LOG.info(
            "%s: done before with other settings (%s): its figures are not taken, it trains", run_dir, "; ".join(why)
        )
        return None
    if trained_on_other_data(run_dir, settings, splits):
        return None
    if earlier.get("sieve_cells") != settings["sieve_cells"] or earlier.get("data") != settings["data"]:
        why = (
            "with masks sieved otherwise"
            if earlier.get("sieve_cells") != settings["sieve_cells"]
            else "before its test images or masks last changed (or by an older version, which did not record them)"
        )
        LOG.info("%s: done %s; predicted and scored again, not trained", run_dir, why)
        kinds = [kind for kind in EXTRA_SCORINGS if kind in extras or extra_columns(kind)[0] in row]
        return scored_row(run_dir, settings, splits, variant, overrides, row["train_minutes"] * 60, kinds)
    LOG.info("%s: already done, figures taken from %s", run_dir, saved)
    missing = [kind for kind in extras if extra_columns(kind)[0] not in row]
    for kind in missing:
        row = {**row, **extra_scores(run_dir, splits, overrides, kind)}
    if missing:
        files.atomic_write_text(saved, json.dumps({"settings": settings, "row": row}, indent=2) + "\n")
    return row


def prediction_overrides(overrides: Sequence[str]) -> list[str]:
    """``overrides`` less the network keys (inference.NETWORK_KEYS): predict.py builds each run's network from its
    checkpoint, which a variant may have trained with other values (``reference+base_width=8`` beside a
    ``--base_width=4`` given to every run), and would warn them ignored with "train again to change it"."""
    return [a for a in overrides if a[2:].partition("=")[0].replace("-", "_") not in NETWORK_KEYS]


def scored_row(
    run_dir: Path,
    settings: dict,
    splits: dict[str, list[tuple[Path, Path]]],
    variant: Variant,
    overrides: Sequence[str],
    seconds: float,
    kinds: Sequence[str],
) -> dict:
    """Predict and score a trained run's test split (predict.py, then miou.py), and the ``kinds`` of
    EXTRA_SCORINGS; its figures, with ``seconds`` of training, kept in run_dir/result.json under ``settings``.

    Raises:
        RuntimeError: prediction or scoring failed (its log named).
    """
    common = [*overrides, f"--run_dir={run_dir}"]
    # A stale metrics.json from an earlier run must never pass for this one's.
    (run_dir / "metrics.json").unlink(missing_ok=True)
    if predict.main([*prediction_overrides(common), "--overlay=false"]) != 0:
        raise RuntimeError(f"{run_dir}: prediction failed; see {run_dir / 'logs' / 'predict.log'}")
    if miou.main(common) != 0:
        raise RuntimeError(f"{run_dir}: scoring failed; see {run_dir / 'logs' / 'miou.log'}")
    row = result_row(run_dir, splits, variant, seconds)
    for kind in kinds:
        row.update(extra_scores(run_dir, splits, overrides, kind))
    files.atomic_write_text(run_dir / "result.json", json.dumps({"settings": settings, "row": row}, indent=2) + "\n")
    return row


def extra_scores(
    run_dir: Path, splits: dict[str, list[tuple[Path, Path]]], overrides: Sequence[str], kind: str
) -> dict:
    """The test figures of one of EXTRA_SCORINGS (``tta``: best.pth with ``--tta=true``; ``last``: last.pth),
    predicted and scored in run_dir/<kind> (its own masks and metrics.json; the run's plain ones stay)."""
    checkpoint, arguments = EXTRA_SCORINGS[kind]
    folder = run_dir / kind
    write_pair_list(folder / "splits" / "test.txt", splits["test"])
    common = [*overrides, f"--run_dir={folder}"]
    (folder / "metrics.json").unlink(missing_ok=True)
    weights = f"--checkpoint={run_dir / 'checkpoints' / checkpoint}"
    if predict.main([*prediction_overrides(common), weights, "--overlay=false", *arguments]) != 0:
        raise RuntimeError(
            f"{run_dir}: prediction for the {kind} columns failed; see {folder / 'logs' / 'predict.log'}"
        )
    if miou.main(common) != 0:
        raise RuntimeError(f"{run_dir}: scoring for the {kind} columns failed; see {folder / 'logs' / 'miou.log'}")
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    pooled, per_image = extra_columns(kind)
    return {pooled: metrics["pooled"]["farmland_iou"], per_image: metrics["per_image"]["farmland_iou"]}


def result_row(run_dir: Path, splits: dict[str, list[tuple[Path, Path]]], variant: Variant, seconds: float) -> dict:
    """One run's figures: test scores from metrics.json, the training from the best and last checkpoints."""
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    best = load_checkpoint(run_dir / "checkpoints" / "best.pth")
    history = load_checkpoint(run_dir / "checkpoints" / "last.pth")["history"]
    return {
        "recipe": variant.name,
        "train_tiles": len(splits["train"]),
        "test_tiles": len(splits["test"]),
        "epochs": len(history),
        "tile_passes": len(history) * len(splits["train"]),
        "best_epoch": best["epoch"],
        "threshold": best.get("threshold"),
        "train_minutes": round(seconds / 60, 2),
        "final_train_loss": round(float(history[-1]["train_loss"]), 4),
        "test_farmland_iou_pooled": metrics["pooled"]["farmland_iou"],
        "test_farmland_iou_per_image": metrics["per_image"]["farmland_iou"],
        "test_boundary_iou_pooled": metrics["pooled"]["boundary_iou"],
        "test_f1_pooled": metrics["pooled"]["f1"],
        "test_predicted_farmland": ratio_predicted(metrics["pooled_confusion"]),
    }


def ratio_predicted(counts: dict) -> float:
    """Share of test pixels predicted farmland (0 = the collapse the reference recipe can fall into)."""
    total = sum(counts.values())
    return (counts["tp"] + counts["fp"]) / total if total else float("nan")


def defined(values: Sequence[float | None]) -> list[float]:
    """The figures that are defined: not null (0/0, a test split without farmland that none is predicted in)
    and not NaN."""
    return [float(v) for v in values if v is not None and np.isfinite(v)]


def mean_of(values: Sequence[float | None]) -> float | None:
    """The mean of the defined figures (``defined``); None where none is."""
    kept = defined(values)
    return float(np.mean(kept)) if kept else None


def mean_rows(rows: list[dict]) -> list[dict]:
    """For each (data, recipe) run on several split seeds, a row with the mean of its scores over the seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["recipe"]), []).append(r)
    means = []
    extras = [k for kind in EXTRA_SCORINGS for k in extra_columns(kind)]
    for (data, recipe), members in groups.items():
        if len(members) < 2:
            continue
        keys = SCORES + tuple(k for k in extras if all(k in m for m in members))
        mean = {key: mean_of([m[key] for m in members]) for key in keys}
        predicted = float(np.mean([m["test_predicted_farmland"] for m in members]))
        minutes = float(np.mean([m["train_minutes"] for m in members]))
        means.append(
            {
                "data": data,
                "recipe": recipe,
                "seed": "mean",
                "test_predicted_farmland": predicted,
                "train_minutes": minutes,
                "worst_pooled": min(pooled) if (pooled := defined([m[SCORES[0]] for m in members])) else None,
                **mean,
            }
        )
    return means


def table(rows: list[dict]) -> str:
    """The comparison as a Markdown table (rows of seed 'mean' leave the per-run columns empty); a column per
    extra scoring (``--tta``, ``--last``; pooled / per image) that any run has."""
    kinds = [kind for kind in EXTRA_SCORINGS if any(extra_columns(kind)[0] in r for r in rows)]
    heads = {"tta": " with --tta |", "last": " last epoch |"}
    lines = [
        "| data | split seed | recipe | train tiles | tile passes | test IoU pooled | test IoU per image | "
        "boundary IoU | predicted farmland | final train loss | best epoch | threshold | minutes |"
        + "".join(heads[kind] for kind in kinds),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(kinds),
    ]
    for r in rows:
        extra = "".join(f" {fmt(r.get(extra_columns(k)[0]))} / {fmt(r.get(extra_columns(k)[1]))} |" for k in kinds)
        if r.get("seed") == "mean":
            lines.append(
                f"| {r['data']} | mean | {r['recipe']} | | | **{fmt(r[SCORES[0]])}** (worst {fmt(r['worst_pooled'])}) "
                f"| {fmt(r[SCORES[1]])} | {fmt(r[SCORES[2]])} | {r['test_predicted_farmland']:.3f} | | | | "
                f"{r['train_minutes']:.1f} |" + extra
            )
            continue
        threshold = "argmax" if r["threshold"] is None else f"{r['threshold']:.3f}"
        lines.append(
            f"| {r['data']} | {r.get('seed', '')} | {r['recipe']} | {r['train_tiles']} | {r['tile_passes']} | "
            f"{fmt(r[SCORES[0]])} | {fmt(r[SCORES[1]])} | {fmt(r[SCORES[2]])} | {r['test_predicted_farmland']:.3f} | "
            f"{r.get('final_train_loss', '')} | {r['best_epoch']} | {threshold} | {r['train_minutes']:.1f} |" + extra
        )
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    """Three decimals, or n/a for an undefined figure."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def parse_arguments(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str], Config]:
    """This script's own options, the config keys passed to every run, and the config they make.

    Raises:
        ValueError: --recipe given (the variants set it), --skip_minority with --only_minority, or bad
            --split_seeds.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="", help="comma separated recipe[+key=value...]; default: both recipes")
    parser.add_argument("--ablate", action="store_true", help="add the recommended recipe less each of its settings")
    parser.add_argument(
        "--split_seeds", default="", help="comma separated seeds, one scene split each; default: --seed"
    )
    parser.add_argument("--minority_quantile", type=float, default=0.25, help="share of tiles (least farmland) kept")
    parser.add_argument("--minority_epochs", type=int, default=0, help="0: as many tile passes as the whole set")
    parser.add_argument("--skip_minority", action="store_true", help="compare on the whole data set only")
    parser.add_argument("--only_minority", action="store_true", help="compare on the minority subset only")
    parser.add_argument("--tta", action="store_true", help="also score each run with test-time augmentation")
    parser.add_argument("--last", action="store_true", help="also score each run's last epoch (last.pth)")
    known, overrides = parser.parse_known_args(argv)
    cfg = cli.parse_args(overrides, __doc__ or "")
    if any(a.startswith("--recipe=") for a in overrides):
        raise ValueError("compare_recipes.py sets --recipe itself through --variants; leave --recipe out")
    if known.skip_minority and known.only_minority:
        raise ValueError(
            "--skip_minority and --only_minority together leave no data set to compare; give one of them, or "
            "neither to compare on both"
        )
    try:
        known.seeds = [int(s) for s in known.split_seeds.split(",") if s.strip()] or [cfg.seed]
    except ValueError:
        raise ValueError(
            f"--split_seeds={known.split_seeds!r}: expected comma separated integers, e.g. 1,2,3"
        ) from None
    known.variant_list = choose_variants(known.variants, known.ablate)
    known.extras = [kind for kind in EXTRA_SCORINGS if getattr(known, kind)]
    return known, [a for a in overrides if not a.startswith(("--epochs=", "--seed=", "--run_dir="))], cfg


def seed_datasets(
    known: argparse.Namespace, cfg: Config, overrides: list[str], seed: int, root: Path
) -> list[tuple[str, dict, int]]:
    """Split the data with this seed under root; return the (name, splits, epochs) of each data set to run."""
    if split_dataset.main([*overrides, f"--seed={seed}", f"--run_dir={root}"]) != 0:
        LOG.warning("some pairs were left out of the split; see %s", root / "splits" / "rejected.csv")
    splits = {name: read_pair_list(root / "splits" / f"{name}.txt") for name in SPLIT_NAMES}
    datasets = [] if known.only_minority else [("all", splits, cfg.epochs)]
    if not known.skip_minority:
        subset, share = minority_splits(splits, known.minority_quantile, cfg.mask_threshold, cfg.ignore_index)
        passes = cfg.epochs * len(splits["train"])
        epochs = known.minority_epochs or max(1, round(passes / max(len(subset["train"]), 1)))
        LOG.info(
            "minority subset: %s tiles, %.1f%% farmland per tile on average",
            {k: len(v) for k, v in subset.items()},
            100 * share,
        )
        # A subset with nothing to train on or to score would train first and then stop the whole comparison.
        if empty := [name for name in ("train", "test") if not subset[name]]:
            LOG.warning(
                "split seed %d: the minority subset (the %g%% of tiles with the least farmland) holds no %s tiles, so "
                "its runs are left out; raise --minority_quantile, give the test split more tiles or scenes "
                "(--split_ratios), or compare on the whole data set alone (--skip_minority)",
                seed,
                100 * known.minority_quantile,
                " and no ".join(empty),
            )
        else:
            datasets.append(("minority", subset, epochs))
    return datasets


def say_how_to_go_on(cfg: Config, run_dir: Path) -> None:
    """After a comparison stopped during ``run_dir``'s run: the whole comparison goes on with ``--resume=true``.
    train.py's own advice names that one run alone; resumed by hand, it would still be trained afresh by a
    comparison repeated without ``--resume=true``."""
    cli.setup_logging(cfg, "compare_recipes")  # the scripts of the run set up their own logs
    LOG.warning(
        "the comparison stopped during %s: repeat this compare_recipes.py command with --resume=true to go on "
        "(runs done are kept, a run stopped part-way goes on from its last.pth)",
        run_dir,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Split once per seed, run every variant on the whole data and on its minority subset, print and save."""
    known, overrides, cfg = parse_arguments(argv)
    base = Path(cfg.run_dir)
    cli.check_paths(cfg)
    rows: list[dict] = []
    for seed in known.seeds:
        root = base / f"seed_{seed}" if len(known.seeds) > 1 else base
        datasets = seed_datasets(known, cfg, overrides, seed, root)
        cli.setup_logging(cfg, "compare_recipes")
        for data_name, data_splits, epochs in datasets:
            for variant in known.variant_list:
                run_dir = root / data_name / variant.folder
                run_args = [*overrides, f"--seed={seed}"]
                try:
                    result = run_variant(
                        run_dir, data_splits, variant, epochs, run_args, known.extras, cfg.group_pattern, cfg.resume
                    )
                except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (cli.Terminated)
                    say_how_to_go_on(cfg, run_dir)
                    raise
                row = {"data": data_name, "seed": seed, **result}
                rows.append(row)
                cli.setup_logging(cfg, "compare_recipes")  # the scripts above set up their own logs
                LOG.info("%s", json.dumps(row))
                files.atomic_write_text(base / "comparison.json", json.dumps(rows, indent=2) + "\n")
    if not rows:
        LOG.error("no data set was left to compare (see the warnings above); nothing was trained")
        return 1
    text = table(rows + mean_rows(rows))
    files.atomic_write_text(base / "comparison.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
