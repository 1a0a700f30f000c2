"""Files the pipeline writes and the error it raises for bad inputs.

Every output is written atomically (a temporary file beside it, then a rename), so a crash or a kill never
leaves half a file; output folders are checked for write access and room before long runs start.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import secrets
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable


class DataError(ValueError):
    """An input file that cannot be used; the message names the file, the problem and the fix."""


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
        except FileExistsError:  # a name already taken: draw another
            continue
        except OSError:  # the file could not be made: nothing to remove
            raise
        except BaseException:
            # A signal handled as os.open returns (SIGTERM, Ctrl-C) raises here, after the file was made; its
            # descriptor was never bound, and is closed when the process ends.
            remove_quietly(tmp)
            raise
        break
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def remove_quietly(path: Path) -> None:
    """Remove a temporary file if it is there; a failure (Windows refuses to remove a file still open) must not
    hide the error being raised."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically (see atomic_write_bytes). A file name that is not UTF-8 (name_problem), in a
    saved config for one, is written with its odd bytes as \\udcNN escapes rather than stopping the run."""
    atomic_write_bytes(path, text.encode("utf-8", "backslashreplace"))


WINDOWS_SPECIAL = frozenset(" &()[]{}^=;!'+,`~%")  # characters cmd.exe needs a path quoted for


def shell_quoted(path: Path | str) -> str:
    """A path as a command in a message shows it, quoted where it needs to be for the user's shell: double
    quotes on Windows (cmd.exe and the OSGeo4W shell keep single ones), POSIX quoting elsewhere."""
    text = str(path)
    if os.name == "nt":
        return f'"{text}"' if any(c in text for c in WINDOWS_SPECIAL) else text
    return shlex.quote(text)


def atomic_write_csv(path: Path, text: str) -> None:
    """Write a CSV table atomically as UTF-8 with a byte-order mark, by which Excel (on a Chinese Windows too) knows
    its encoding and shows Chinese names as they are; Python reads it with encoding="utf-8-sig", pandas as it is."""
    atomic_write_bytes(path, b"\xef\xbb\xbf" + text.encode("utf-8", "backslashreplace"))


def check_writable(folder: Path, need_bytes: int = 0, key: str = "--run_dir") -> None:
    """Fail at once, not hours later, when an output folder cannot be written or its disk is nearly full;
    ``key`` is the option that chose it, named in the fix.

    Raises:
        ValueError: naming the folder, the problem and the fix.
    """
    folder = Path(folder)
    blocking = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ValueError(f"{folder}: {blocking} is a file, not a folder; choose another {key}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.")
        try:
            os.close(fd)
        finally:
            os.unlink(probe)
    except OSError as err:
        raise ValueError(
            f"{folder}: cannot write there ({err.strerror}); choose another {key} or fix its permissions"
        ) from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise ValueError(
            f"{folder}: only {free / 2**20:.0f} MiB free on its disk, about {need_bytes / 2**20:.0f} MiB are needed; "
            f"free some space or choose another {key}"
        )


def read_record(path: Path) -> Any:
    """A JSON file's content, or None where it is missing or unreadable (a run stopped while writing)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def shown_path(path: Path) -> str:
    """``path`` as text that any log, list or table can hold: a name whose bytes are not UTF-8 (GBK names
    unpacked on Linux, for example) with those bytes as \\xNN escapes; any other path as it is."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def name_problem(path: Path) -> str | None:
    """The error for a file whose name is not UTF-8, which the pipeline's lists, tables and logs cannot hold
    (and which another machine would show garbled); None for any other name."""
    shown = shown_path(path)
    if shown == str(path):
        return None
    if shown_path(Path(path).parent) != str(Path(path).parent):
        return (
            f"{shown}: a folder name in this path is not UTF-8 text (its bytes are in another encoding, such as "
            "GBK); rename the folder, for example with convmv -f gbk -t utf-8 --notest -r FOLDER, and run again"
        )
    return (
        f"{shown}: the file name is not UTF-8 text (its bytes are in another encoding, such as GBK); rename it, "
        "for example with convmv -f gbk -t utf-8 --notest FILE, and run again"
    )


def file_stamp(path: Path) -> str:
    """A file's size and modification time, as records keep them: a file copied over another with its own
    older time (cp -p, rsync -a) differs, where comparing times alone would take it for the one before.

    Raises:
        OSError: the file cannot be found.
    """
    info = Path(path).stat()
    return f"{info.st_size} bytes, {info.st_mtime_ns} ns"


def shown_stamp(stamp: object) -> str:
    """A file_stamp as a message shows it: the size and the time of day in UTC, to the millisecond
    ("1563407 bytes, modified 2026-11-27 22:58:25.783 UTC"); anything else as it is."""
    match = re.fullmatch(r"(\d+) bytes, (\d+) ns", str(stamp))
    if match is None:
        return str(stamp)
    when = datetime.datetime.fromtimestamp(int(match[2]) / 1e9, datetime.timezone.utc)
    return f"{match[1]} bytes, modified {when:%Y-%m-%d %H:%M:%S}.{when.microsecond // 1000:03d} UTC"


def written_after(paths: Iterable[Path], model: Path, since: float = 0.0) -> bool:
    """Whether every file exists and was written after the model file and after ``since`` (seconds since the
    epoch): outputs are written atomically, so an existing one is whole, and an older one came from other
    weights or settings."""
    made = max(Path(model).stat().st_mtime, since)
    return all(p.is_file() and p.stat().st_mtime >= made for p in paths)


def prediction_path(run_dir: Path, image_path: Path) -> Path:
    """Where predict.py writes the mask for an image: run_dir/predictions/<stem>_seg.png."""
    return Path(run_dir) / "predictions" / f"{Path(image_path).stem}_seg.png"
