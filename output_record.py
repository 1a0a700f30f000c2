"""What a run's predictions were made with: run_dir/configs/predict_outputs.json.

predict.py keeps the outputs an earlier run finished (``skip_existing``), so that an interrupted run resumes.
An output counts as made by this run's model with this run's settings when it is newer than the model file
and than the moment those took effect. The record holds the model file and the keys of MASK_KEYS, and the
time from which tile outputs and scene outputs were made with them. When the model or a key changes, that
time moves to now: every older output is redone, by this run or, if it is stopped, by the next with the same
settings (a record written before the outputs it describes would otherwise vouch for them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from config import Config
from files import atomic_write_text, file_stamp, shown_stamp
from runtime import Distributed, all_reduce_sum
from scene import NODATA_FED_AS, OUTPUT_KEYS

LOG = logging.getLogger("predict")

RECORD = Path("configs") / "predict_outputs.json"
# The keys besides the model that change a finished output: masks, probabilities, fields.
MASK_KEYS = ("threshold", "bands", "sieve_cells", *OUTPUT_KEYS)
TILE_KEYS = ("sieve_cells",)  # those of MASK_KEYS that tile masks alone depend on: scenes keep their outputs
# Those that scene outputs alone depend on (how a scene is cut into windows, resampled, drawn as fields): tile masks,
# predicted whole, keep theirs.
SCENE_KEYS = tuple(key for key in OUTPUT_KEYS if key != "tta")
# What outputs made before a key of MASK_KEYS existed were made with, where that is not the key's default.
BEFORE_KEY = {"sieve_cells": 0}


@dataclasses.dataclass(frozen=True)
class Since:
    """Times (seconds since the epoch) from which tile and scene outputs were made with this model and
    settings: an older output is redone."""

    tiles: float = 0.0
    scenes: float = 0.0


def settings_now(cfg: Config, model: Path, stamp: str = "") -> dict[str, Any]:
    """The model file, its size and time (a model copied over it with an older time, cp -p, is other weights
    that its outputs' times would not tell; ``stamp``: as it was when loaded, where given), and the keys of
    MASK_KEYS (``bands`` as resolved) of this run."""
    model_keys = {"model": str(Path(model).resolve()), "model_stamp": stamp or file_stamp(model)}
    model_keys["nodata_fed_as"] = NODATA_FED_AS
    return model_keys | {key: getattr(cfg, key) for key in MASK_KEYS}


def read_earlier(run_dir: Path, now: dict[str, Any]) -> tuple[dict[str, Any] | None, Since]:
    """The last run's model and keys, and its Since; None for the keys where its record cannot be read.

    A run folder of an older version has configs/predict.json alone: its keys, with this run's model file
    (told apart by file times only, as then). A folder without either has nothing to redo.
    """
    record, older = Path(run_dir) / RECORD, Path(run_dir) / "configs" / "predict.json"
    try:
        saved = json.loads((record if record.is_file() else older).read_text(encoding="utf-8"))
        keys = {key: saved.get(key, BEFORE_KEY.get(key, getattr(Config, key))) for key in MASK_KEYS}
        since = Since(float(saved.get("tiles_since", 0.0)), float(saved.get("scenes_since", 0.0)))
        model = {key: saved.get(key, now[key]) for key in ("model", "model_stamp")}  # older records lack the stamp
        return model | {"nodata_fed_as": saved.get("nodata_fed_as", "zeros")} | keys, since
    except FileNotFoundError:
        return now, Since()
    except (OSError, ValueError, TypeError, AttributeError):
        return None, Since()  # unreadable: redo rather than keep outputs made in an unknown way


def outputs_since(cfg: Config, model: Path, job: Distributed, stamp: str = "") -> Since:
    """This run's Since, after recording it (rank 0): unchanged where the model and keys are the last run's, else
    now for tiles unless only keys of SCENE_KEYS differ, and for scenes unless only keys of TILE_KEYS differ; now
    for both where ``skip_existing`` is off (every output is redone)."""
    now = settings_now(cfg, model, stamp)
    earlier, since = read_earlier(Path(cfg.run_dir), now)
    differ = list(now) if earlier is None else [key for key in now if earlier[key] != now[key]]
    redo = [not cfg.skip_existing or any(key not in keys for key in differ) for keys in (SCENE_KEYS, TILE_KEYS)]
    if job.world > 1:  # also a barrier: every rank has read the last run's record before rank 0 writes this one
        redo = [bool(v) for v in all_reduce_sum(torch.tensor([int(f) for f in redo], device=job.device))]
    start = file_system_now(Path(cfg.run_dir) / RECORD.parent)
    since = Since(start if redo[0] else since.tiles, start if redo[1] else since.scenes)
    if differ and cfg.skip_existing:
        shown = "its record unreadable"
        if earlier is not None:
            shown = ", ".join(
                f"{k} {shown_stamp(earlier[k])!r}, now {shown_stamp(now[k])!r}"
                if k == "model_stamp"
                else f"{k} {earlier[k]!r}, now {now[k]!r}"
                for k in differ
            )
        LOG.info(
            "the last predict.py run here made its outputs otherwise (%s): %s",
            shown,
            "any of its outputs this run meets is redone"
            if all(redo)
            else "any of its tile masks this run meets is redone (scenes keep theirs)"
            if redo[0]
            else "any of its scene outputs this run meets is redone (tile masks keep theirs)",
        )
    if job.main:
        record = now | {"tiles_since": since.tiles, "scenes_since": since.scenes}
        atomic_write_text(Path(cfg.run_dir) / RECORD, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return since


def file_system_now(folder: Path) -> float:
    """The time of a file written now in ``folder``, by the file system's clock and in its steps (two seconds
    on FAT): an output written after it is never older, whatever the machine's own clock says."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder) as probe:
        return os.fstat(probe.fileno()).st_mtime
