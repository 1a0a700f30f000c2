"""Every path and hyperparameter of the pipeline, in one place.

Edit the defaults below once, or override any key on any script's command line as ``--key=value``
(for example ``python train.py --epochs=50 --run_dir=runs/exp2``). Values are converted to the type of
the default; a misspelled key fails at once with the list of valid keys; ``--help`` lists every key with
its default and comment. The defaults reproduce the reference recipe.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Collection, Sequence


@dataclasses.dataclass
class Config:
    # --- paths -----------------------------------------------------------------------------------------
    data_dir: str = "data"  # folder holding the image and label sub-folders (read only, never written)
    run_dir: str = "runs/exp"  # every output of a run goes here: splits, checkpoints, predictions, figures
    image_subdir: str = "images"  # sub-folder of data_dir with the image tiles (.png .jpg .tif)
    label_subdir: str = "labels"  # sub-folder of data_dir with the masks, named <stem><mask_suffix>.png
    mask_suffix: str = "_mask"  # a tile a.png has the mask a_mask.png
    # --- split_dataset.py ------------------------------------------------------------------------------
    split_ratios: tuple = (0.8, 0.1, 0.1)  # train, val, test fractions (comma separated on the command line)
    seed: int = 42  # seed for the split, augmentation, weight init and data order
    mask_threshold: int = 0  # 0: masks must hold only 0/255 or 0/1; N>0: values >= N are farmland (lossy masks)
    max_nodata_fraction: float = 0.5  # drop tiles whose share of all-zero (nodata) pixels exceeds this; 1 keeps all
    group_pattern: str = ""  # regex on file stems; tiles whose first group matches share a split ("" = split by tile)
    # --- augment.py ------------------------------------------------------------------------------------
    aug_prob: float = 0.6  # offline: chance that a training tile gets a vertical and a horizontal flipped copy
    preview_count: int = 4  # tiles shown in the augmentation preview figure
    # --- data_preprocess.py / train.py -----------------------------------------------------------------
    recipe: str = "reference"  # reference (these defaults) or recommended (RECOMMENDED below); explicit keys win
    online_aug: bool = True  # random flips and 90-degree rotations of training tiles at load time
    scale_jitter: float = 0.0  # online: random zoom by up to this fraction (0.1: 0.9x to 1.1x), mask alike; 0 = off
    colour_jitter: float = 0.0  # online: brightness, contrast and hue jitter of up to this amount (0.1); 0 = off
    normalise: bool = False  # standardise each band by its training-split mean and std (kept in the checkpoint)
    ignore_index: int = -1  # mask value of unlabelled pixels (e.g. 128), left out of losses and metrics; -1 = none
    bands: str = ""  # 1-based bands to use, e.g. 3,2,1 of a 4-band TIFF; empty = all; predict.py defaults to training's
    in_channels: int = 3  # bands of the input images (3 for RGB, 4 for RGB+NIR)
    n_classes: int = 2  # 0 = background, 1 = farmland
    base_width: int = 64  # channels of the first U-Net level; levels have w, 2w, 4w, 8w, 16w
    dropout: float = 0.3  # Dropout2d rate inside every double convolution
    epochs: int = 100  # training epochs
    batch_size: int = 5  # tiles per training step
    lr: float = 1e-4  # Adam learning rate
    loss: str = "ce"  # ce, weighted_ce (class weights from the training split), dice, ce_dice or focal
    focal_gamma: float = 2.0  # focusing exponent of the focal loss
    weight_decay: float = 1e-8  # Adam weight decay
    step_size: int = 20  # StepLR: epochs between learning-rate drops
    gamma: float = 0.5  # StepLR: factor applied to the learning rate at each drop
    schedule: str = "step"  # learning-rate schedule: step (step_size, gamma) or cosine (down to 0 at the last epoch)
    warmup_epochs: float = 0.0  # linear learning-rate warm-up over this many epochs, step by step; 0 = none
    early_stop: int = 0  # stop after this many epochs without a better val farmland IoU; 0 = never
    tune_threshold: bool = False  # pick the farmland probability cut with the best val IoU; predict.py uses it
    collapse_patience: int = 3  # warn when val predictions hold a single class for this many epochs in a row
    tensorboard: bool = True  # also log to run_dir/tensorboard when the tensorboard package is installed
    snapshot_every: int = 10  # also keep the weights of every N-th epoch (0 = never)
    resume: bool = False  # continue from run_dir/checkpoints/last.pth
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over all ranks' tiles (small batches per GPU)
    deterministic: bool = False  # deterministic kernels (slower on GPU): a resumed run then ends bit-identical
    device: str = "auto"  # auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...
    num_workers: int = 2  # DataLoader worker processes (0 = load in the main process)
    channels_last: bool = True  # NHWC memory layout for the network: same results, faster convolutions
    amp: str = "auto"  # mixed precision: auto (bf16 where the GPU/CPU runs it fast, else fp16 on CUDA), bf16, fp16, off
    cache_tiles: str = "auto"  # keep decoded training tiles in memory: auto (if they fit in 1/4 of free RAM), yes, no
    reuse_memory: bool = True  # keep freed memory for reuse (glibc) rather than fault it in anew: faster CPU passes
    # --- predict.py ------------------------------------------------------------------------------------
    predict_input: str = ""  # image file or folder to predict; empty = the test split
    checkpoint: str = ""  # weights to predict with; empty = run_dir/checkpoints/best.pth
    predict_batch_size: int = 0  # tiles per forward pass at prediction; 0 = chosen from free memory
    overlay: bool = True  # also save each mask drawn over its photo
    skip_existing: bool = True  # keep masks already written with this checkpoint, so an interrupted run resumes
    window: int = 512  # scenes (GeoTIFFs, images over one window): window side in pixels, a multiple of 16
    overlap: int = 128  # scenes: pixels shared by neighbouring windows and blended, a multiple of 16 below window
    tta: bool = False  # scenes: average probabilities over the 8 flips and 90-degree turns (8x slower)
    save_probability: bool = True  # scenes: also write the farmland probability GeoTIFF (percent, 255 = nodata)
    polygons: bool = True  # scenes: also write the fields as polygons (GeoJSON and GeoPackage) with their areas
    min_field_area_ha: float = 0.01  # scenes: leave out fields smaller than this (hectares; needs a projected CRS)
    simplify_tolerance: float = 0.0  # scenes: simplify field outlines by this distance in CRS units (0 = off)
    # --- miou.py ---------------------------------------------------------------------------------------
    gallery_size: int = 6  # tiles in each of the worst / best galleries
    boundary_width: int = 3  # pixels inside each parcel edge that the boundary IoU scores


# The recommended recipe (--recipe=recommended): what measured best on real aerial tiles at a modest budget
# (README, "Real data"). Keys given on the command line still win.
RECOMMENDED: dict[str, Any] = {
    "normalise": True,  # per-band standardisation: 16-bit and NIR bands on one scale
    "loss": "ce_dice",  # Dice keeps the minority class from being ignored; cross-entropy keeps it calibrated
    "lr": 1e-3,  # with warm-up, Adam tolerates 10x the reference rate and converges in far fewer epochs
    "schedule": "cosine",
    "warmup_epochs": 1.0,
    "dropout": 0.1,  # 0.3 slows learning on small data without a measured gain
    "scale_jitter": 0.1,
    "colour_jitter": 0.1,
    "tune_threshold": True,
}


TRUE_WORDS = {"1", "true", "yes", "y", "on"}
FALSE_WORDS = {"0", "false", "no", "n", "off"}


def key_comments() -> dict[str, str]:
    """Return each key's trailing comment in this file, used by ``--help``."""
    comments: dict[str, str] = {}
    pattern = re.compile(r"^\s+(\w+):\s*[\w\[\], |]+\s*=.*?#\s*(.+)$")
    for line in Path(__file__).read_text(encoding="utf-8").splitlines():
        match = pattern.match(line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def convert_value(key: str, text: str, default: Any) -> Any:
    """Convert a command-line string to the type of ``default``.

    Raises:
        ValueError: the text cannot be read as that type; the message names the key and the fix.
    """
    kind = type(default)
    try:
        if kind is bool:
            word = text.strip().lower()
            if word in TRUE_WORDS:
                return True
            if word in FALSE_WORDS:
                return False
            raise ValueError(text)
        if kind is tuple:
            parts = [p for p in text.replace(" ", "").split(",") if p]
            return tuple(type(default[0])(p) for p in parts) if default else tuple(parts)
        return kind(text)
    except ValueError:
        shown = ",".join(str(v) for v in default) if kind is tuple else default
        raise ValueError(
            f"--{key}={text!r}: expected a value of type {kind.__name__} "
            f"(the default is {shown!r}); fix the value on the command line"
        ) from None


def help_text(description: str = "") -> str:
    """Return the usage text listing every key, its default and its comment."""
    comments = key_comments()
    lines = [description.strip(), "", "Every key can be set as --key=value:", ""] if description else []
    for field in dataclasses.fields(Config):
        default = field.default
        shown = ",".join(str(v) for v in default) if isinstance(default, tuple) else default
        lines.append(f"  --{field.name}={shown!s:<14} {comments.get(field.name, '')}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None, description: str = "") -> Config:
    """Build the config from the defaults and ``--key=value`` overrides.

    Raises:
        SystemExit: on ``--help`` (after printing the key list).
        ValueError: an unknown key, a malformed argument or a value of the wrong type.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = Config()
    valid = [f.name for f in dataclasses.fields(Config)]
    given: set[str] = set()
    for arg in argv:
        if arg in ("-h", "--help"):
            print(help_text(description))
            raise SystemExit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"argument {arg!r}: expected --key=value, for example --epochs=50")
        key, text = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in valid:
            raise ValueError(f"unknown config key {key!r}; valid keys are: {', '.join(valid)}")
        setattr(cfg, key, convert_value(key, text, getattr(Config, key)))
        given.add(key)
    return apply_recipe(cfg, given)


def apply_recipe(cfg: Config, given: Collection[str] = ()) -> Config:
    """Fill in the chosen recipe's values for every key not in ``given`` (the keys set explicitly).

    Raises:
        ValueError: an unknown recipe name.
    """
    if cfg.recipe == "reference":
        return cfg
    if cfg.recipe != "recommended":
        raise ValueError(f"--recipe={cfg.recipe!r}: expected reference or recommended")
    for key, value in RECOMMENDED.items():
        if key not in given:
            setattr(cfg, key, value)
    return cfg


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes to a temporary file beside ``path`` and rename it, so a crash never leaves half a file.

    The temporary file is created with mode 0666 less the process's umask, as a plain open() would (rather
    than mkstemp's private 0600 and a chmod, which would need the umask read by setting it, unsafe while
    other threads write outputs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:  # a name already taken: draw another
            continue
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically (see atomic_write_bytes)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_config(cfg: Config, script: str) -> Path:
    """Write the resolved config of one script's run to ``run_dir/configs/<script>.json``."""
    path = Path(cfg.run_dir) / "configs" / f"{script}.json"
    atomic_write_text(path, json.dumps(dataclasses.asdict(cfg), indent=2, ensure_ascii=False) + "\n")
    return path


def check_writable(folder: Path, need_bytes: int = 0) -> None:
    """Fail at once, not hours later, when an output folder cannot be written or its disk is nearly full.

    Raises:
        ValueError: naming the folder, the problem and the fix.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(
            f"{folder}: cannot write there ({err.strerror}); choose another --run_dir or fix its permissions"
        ) from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise ValueError(
            f"{folder}: only {free / 2**20:.0f} MiB free on its disk, about {need_bytes / 2**20:.0f} MiB are needed; "
            "free some space or choose another --run_dir"
        )


def check_paths(cfg: Config) -> None:
    """Refuse a run folder that is, or lies inside, the data folder (nothing is ever written into data_dir),
    and one that cannot be written.

    Raises:
        ValueError: run_dir and data_dir overlap, or run_dir is not writable.
    """
    data = Path(cfg.data_dir).resolve()
    run = Path(cfg.run_dir).resolve()
    if run == data or data in run.parents:
        raise ValueError(
            f"run_dir {cfg.run_dir!r} lies inside data_dir {cfg.data_dir!r}; outputs must never be written "
            "into the data folder. Choose a run_dir outside it, for example --run_dir=runs/exp"
        )
    check_writable(run)


def setup_logging(cfg: Config, script: str, rank: int = 0) -> None:
    """Log to the terminal and to run_dir/logs/<script>.log; safe to call again for another script.

    Under torchrun only rank 0 logs its progress; the other ranks report warnings and errors alone.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "farmland_pipeline", False)]:
        root.removeHandler(handler)
        handler.close()
    log_dir = Path(cfg.run_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(
        "%(asctime)s %(name)s %(levelname)s %(message)s"
        if rank == 0
        else f"%(asctime)s rank {rank} %(levelname)s %(message)s",
        "%H:%M:%S",
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0:  # one log file, written by one process
        handlers.append(logging.FileHandler(log_dir / f"{script}.log", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.farmland_pipeline = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def run_main(main: Callable[[], int]) -> int:
    """Run a script's main; turn an input error into one clear line and exit status 2, not a traceback."""
    try:
        return main()
    except (ValueError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
