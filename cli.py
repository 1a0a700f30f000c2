"""The command line every script shares: ``--key=value`` overrides of config.py, ``--help``, recipes,
logging, the resolved config saved beside the outputs, and one clear line (exit status 2) for a bad input.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence, TypeVar

from tqdm import tqdm

import config
from config import RECOMMENDED, Config
from files import DISK_ERRORS, atomic_write_text, check_writable, disk_problem, shown_path
from runtime import RankStopped

TRUE_WORDS = {"1", "true", "yes", "y", "on"}
FALSE_WORDS = {"0", "false", "no", "n", "off"}


def key_comments() -> dict[str, str]:
    """Return each key's trailing comment in config.py, used by ``--help``."""
    comments: dict[str, str] = {}
    pattern = re.compile(r"^\s+(\w+):\s*[\w\[\], |]+\s*=.*?#\s*(.+)$")
    for line in Path(config.__file__).read_text(encoding="utf-8").splitlines():
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
        words = " (true or false; also 1/0, yes/no, y/n, on/off)" if kind is bool else ""
        raise ValueError(
            f"--{key}={text!r}: expected a value of type {kind.__name__}{words} "
            f"(the default is {shown!r}); fix the value on the command line"
        ) from None


def help_text(description: str = "") -> str:
    """Return the usage text listing every key, its default and its comment."""
    comments = key_comments()
    lines = [description.strip(), "", "Every key can be set as --key=value:", ""] if description else []
    settings = []
    for field in dataclasses.fields(Config):
        default = field.default
        shown = ",".join(str(v) for v in default) if isinstance(default, tuple) else default
        settings.append((f"--{field.name}={shown!s}", comments.get(field.name, "")))
    column = max(len(setting) for setting, _ in settings)  # every comment starts in one column
    lines += [f"  {setting:<{column}}  {comment}" for setting, comment in settings]
    return "\n".join(lines)


def print_help(text: str) -> None:
    """Print the help; a reader that stops early (``--help | head``) ends it quietly, not with a traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # The interpreter flushes stdout again at exit and would fail the same way: point it at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def parse_args(argv: Sequence[str] | None = None, description: str = "") -> Config:
    """Build the config from the defaults, the recipe and ``--key=value`` overrides (parse_command's config).

    Raises:
        SystemExit: on ``--help`` (after printing the key list).
        ValueError: an unknown key, a malformed argument or a value of the wrong type.
    """
    return parse_command(argv, description)[0]


# Whole-number keys with no meaning below 0, which their users would otherwise take as 0 or fail on with another
# library's message: what each expects.
COUNTS = {
    # numpy's generators (the split, augment.py) take no negative seed and say so without naming it.
    "seed": "a seed of 0 or more; use --seed=42 as the reference",
    "num_workers": "0 or more loader worker processes (0 loads in the main process)",
    "predict_batch_size": "0 or more tiles per forward pass (0 chooses from the free memory)",
}


def parse_command(argv: Sequence[str] | None = None, description: str = "") -> tuple[Config, frozenset[str]]:
    """Build the config from the defaults, the recipe and ``--key=value`` overrides; return it with the keys
    given on the command line (train.py's resume takes every other key from the checkpoint).

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
            print_help(help_text(description))
            raise SystemExit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"argument {arg!r}: expected --key=value, for example --epochs=50")
        key, text = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in valid:
            raise ValueError(f"unknown config key {key!r}; valid keys are: {', '.join(valid)}")
        setattr(cfg, key, convert_value(key, text, getattr(Config, key)))
        if key in COUNTS and getattr(cfg, key) < 0:
            raise ValueError(f"--{key}={getattr(cfg, key)}: expected {COUNTS[key]}")
        given.add(key)
    return apply_recipe(cfg, given), frozenset(given)


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


def save_config(cfg: Config, script: str) -> Path:
    """Write the resolved config of one script's run to ``run_dir/configs/<script>.json``."""
    path = Path(cfg.run_dir) / "configs" / f"{script}.json"
    atomic_write_text(path, json.dumps(dataclasses.asdict(cfg), indent=2, ensure_ascii=False) + "\n")
    return path


# Keys that are a share or a probability: outside [0, 1] they act as 0 or 1 without a word (every tile left out).
FRACTIONS = {
    "max_nodata_fraction": "a share of the pixels from 0 to 1 (0.5 as the reference; 1 keeps every tile)",
    "aug_prob": "a probability from 0 to 1 (0.6 as the reference)",
}


def check_fraction(cfg: Config, key: str) -> None:
    """Refuse a FRACTIONS key outside [0, 1].

    Raises:
        ValueError: naming the key, its value and the range.
    """
    value = getattr(cfg, key)
    if not 0 <= value <= 1:
        raise ValueError(f"--{key}={value}: expected {FRACTIONS[key]}")


def check_paths(cfg: Config) -> None:
    """Refuse a run folder that is, or lies inside, the data folder (nothing is ever written into data_dir),
    and one that cannot be written.

    Raises:
        ValueError: run_dir or data_dir is empty, they overlap, or run_dir is not writable.
    """
    for key, example in (("run_dir", "runs/exp"), ("data_dir", "data")):
        if not str(getattr(cfg, key)).strip():  # Path("") is the current folder: outputs strewn there, or inputs sought
            raise ValueError(
                f"--{key} is empty, which would be the current folder ({Path.cwd()}); name the folder, for example "
                f"--{key}={example}"
            )
    data = Path(cfg.data_dir).resolve()
    run = Path(cfg.run_dir).resolve()
    if run == data or data in run.parents:
        raise ValueError(
            f"run_dir {cfg.run_dir!r} lies inside data_dir {cfg.data_dir!r}; outputs must never be written "
            "into the data folder. Choose a run_dir outside it, for example --run_dir=runs/exp"
        )
    check_writable(run)


class RunLogHandler(logging.FileHandler):
    """run_dir/logs/<script>.log. Where its disk fills (or turns read-only) it says so in one line on the terminal
    and writes no more, rather than have logging print a traceback for every line that follows (the line that
    says why the script stopped among them)."""

    given_up = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.given_up:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if not (isinstance(err, OSError) and err.errno in DISK_ERRORS):
            super().handleError(record)
            return
        self.given_up = True
        print(
            f"{shown_path(Path(self.baseFilename))}: the log could not be written ({err.strerror}); from here its "
            "lines are on the terminal alone",
            file=sys.stderr,
        )

    def close(self) -> None:
        try:
            super().close()
        except OSError as err:  # the last lines buffered for a full disk
            if err.errno not in DISK_ERRORS:
                raise


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
        handlers.append(RunLogHandler(log_dir / f"{script}.log", encoding="utf-8", errors="backslashreplace"))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.farmland_pipeline = script  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a batch scheduler's stop, ``timeout``, ``kill``): unwound like Ctrl-C."""


def ignore_signal(signum: int, frame: Any) -> None:
    """A handler that does nothing."""


def leave_loader_workers_to_the_exit() -> None:
    """Skip PyTorch's orderly stop of DataLoader workers from now on, as it does once Python is exiting; the
    workers are ended with the process (multiprocessing terminates them at exit).

    A worker killed by a SIGTERM to the whole group may die holding the lock of its loader's shared stop event,
    and the orderly stop would wait for that lock for ever. Only a process that is ending may call this.
    """
    loader_utils = sys.modules.get("torch.utils.data._utils")  # not imported: this process made no loader
    if loader_utils is not None and hasattr(loader_utils, "python_exit_status"):
        loader_utils.python_exit_status = True


def loader_worker_terminated(err: RuntimeError) -> bool:
    """Whether ``err`` is PyTorch's report of a DataLoader worker killed by SIGTERM: when a scheduler stops the
    whole process group, its SIGCHLD handler can run before this process's own SIGTERM handler."""
    return "is killed by signal: Terminated" in str(err)


def terminate_handler(owner: int) -> Callable[[int, Any], None]:
    """A SIGTERM handler that raises Terminated in the process ``owner`` alone; a process forked from it that
    kept the handler dies at once, as without one."""

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        # A scheduler stops the whole process group: the loader workers die of the signal too, and PyTorch's
        # SIGCHLD handler would raise about each of them in the middle of the unwinding (even inside the removal
        # of a temporary file). Their deaths are expected now.
        if hasattr(signal, "SIGCHLD"):
            signal.signal(signal.SIGCHLD, ignore_signal)
        leave_loader_workers_to_the_exit()
        raise Terminated

    return handler


def as_raised(message: str) -> str:
    """An error's message as raised, where a DataLoader worker raised it: PyTorch puts the worker's traceback
    before it and the exception's module and name (``files.DataError: ``) at the start of its last line."""
    if not (message.startswith("Caught ") and "Original Traceback" in message):
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def log_to_file(message: str, level: int = logging.ERROR) -> None:
    """Write ``message`` to the log file setup_logging opened (run_dir/logs/<script>.log), and to nothing else;
    nothing when none is open (a script stopped before it opened its log, or a rank other than 0)."""
    for handler in logging.getLogger().handlers:
        script = getattr(handler, "farmland_pipeline", "")
        if script and isinstance(handler, logging.FileHandler):
            record = logging.makeLogRecord(
                {"name": script, "levelno": level, "levelname": logging.getLevelName(level), "msg": message}
            )
            handler.handle(record)


def say_fatal(message: str, level: int = logging.ERROR) -> None:
    """Say why the script stops: once on the terminal (stderr, the line as it is) and in its log file."""
    print(message, file=sys.stderr)
    log_to_file(message, level)


def run_main(main: Callable[[], int], output_key: str = "--run_dir") -> int:
    """Run a script's main; turn an input error into one clear line and exit status 2, not a traceback;
    ``output_key``: the option that chooses the script's output folder, named where its disk is full.

    SIGTERM unwinds the run like Ctrl-C (exit status 143), so that temporary files of outputs being written are
    removed and nothing half-written is left behind; without it the process would vanish mid-write. The line
    that says why a script stopped goes to the terminal and to its log file; so does the traceback of an
    unexpected error, which Python prints to the terminal as it leaves.
    """
    installed = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = signal.signal(signal.SIGTERM, terminate_handler(os.getpid())) if installed else None
    try:
        return main()
    except (ValueError, FloatingPointError) as err:
        say_fatal(f"error: {as_raised(str(err))}")
        # A slip in the code raises ValueError too ("too many values to unpack"): the log keeps where it came from.
        log_to_file(f"where the error above was raised:\n{traceback.format_exc().rstrip()}", logging.DEBUG)
        return 2
    except RankStopped as err:  # the rank that stopped first said why; this one says that it followed
        say_fatal(f"error: {err}")
        return 1
    except (Terminated, RuntimeError) as err:
        if not isinstance(err, Terminated) and not loader_worker_terminated(err):
            log_to_file(f"stopped by an unexpected error:\n{traceback.format_exc().rstrip()}")
            raise
        if installed:  # this process's own SIGTERM may still be on its way: the run is ending anyway
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        leave_loader_workers_to_the_exit()
        say_fatal(
            "terminated (SIGTERM); outputs written so far are complete, the one being written was dropped",
            logging.WARNING,
        )
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        say_fatal("interrupted", logging.WARNING)
        return 130
    except OSError as err:
        problem = disk_problem(err, output_key)
        if problem is None:
            log_to_file(f"stopped by an unexpected error:\n{traceback.format_exc().rstrip()}")
            raise
        say_fatal(f"error: {problem}")
        return 1
    except Exception:
        log_to_file(f"stopped by an unexpected error:\n{traceback.format_exc().rstrip()}")
        raise
    finally:
        if installed:  # None: the handler before was not Python's; the default is the closest to it
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


PROGRESS_EVERY_S = 60.0  # seconds between progress lines in the log where no progress bar is shown
Item = TypeVar("Item")


class Progress:
    """A progress bar on a terminal; where output goes to a file (nohup, a batch job), where tqdm draws none, a
    log line on ``log`` at most every PROGRESS_EVERY_S seconds instead (``desc: 1200 of 40000 units (3%)``),
    so that a long loop is never silent for minutes."""

    def __init__(self, total: int, desc: str, unit: str, log: logging.Logger) -> None:
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=None)
        self.total, self.desc, self.unit, self.log = total, desc, unit, log
        self.done = 0
        self.last = time.monotonic()

    def update(self, count: int = 1) -> None:
        """Count ``count`` more items done."""
        self.bar.update(count)
        self.done += count
        now = time.monotonic()
        if self.bar.disable and now - self.last >= PROGRESS_EVERY_S and self.done < self.total:
            self.last = now
            share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            self.log.info("%s: %d of %d %s(s)%s", self.desc, self.done, self.total, self.unit, share)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(items: Sequence[Item], desc: str, unit: str, log: logging.Logger) -> Iterator[Item]:
    """The items, counted on a Progress as each is handed out."""
    with Progress(len(items), desc, unit, log) as bar:
        for item in items:
            yield item
            bar.update()
