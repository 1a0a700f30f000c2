"""Files the pipeline writes and the error it raises for bad inputs.

Every output is written atomically (a temporary file beside it, then a rename), so a crash or a kill never
leaves half a file; output folders are checked for write access and room before long runs start.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator


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
        tmp = atomic_temporary(path)
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:  # a name already taken: draw another
            continue
        except OSError as err:  # the file could not be made: nothing to remove
            if err.errno in DISK_ERRORS:  # a full or read-only disk: the line names the output, not this name
                raise OSError(err.errno, err.strerror, str(path)) from err
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
    except OSError as err:
        remove_quietly(tmp)
        if err.filename is None:  # a write or close that failed (a full disk) names no file: name the output
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        remove_quietly(tmp)
        raise


# What a full or read-only disk raises (errno names): the run stops with one line rather than a traceback.
DISK_ERRORS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS) if code)


def disk_problem(err: OSError, key: str = "--run_dir") -> str | None:
    """The line that stops a script whose output could not be written for want of room (or on a read-only disk),
    naming the file and the fix (``key``: the option that chose the output folder); None for any other OSError,
    which is a fault to show in full."""
    if err.errno not in DISK_ERRORS:
        return None
    where = shown_path(Path(err.filename)) if err.filename else "an output"
    folder = shown_path(Path(err.filename).parent) if err.filename else "the output folder"
    return (
        f"{where}: could not be written ({err.strerror}); free some space on the disk of {folder} (or make it "
        f"writable), or choose another {key}, and run again: outputs written before are complete, the one being "
        "written was dropped"
    )


DISK_PROBE_BYTES = 2**16  # what disk_error_at writes to learn whether a folder's disk has room and takes writes


def disk_error_at(path: Path) -> OSError | None:
    """The OSError of a full (or read-only) disk under ``path``'s folder, naming ``path``; None where a small
    file can be written there. For writers that do not say why a write failed (GDAL, SQLite in a GeoPackage,
    libtiff's flush as a GeoTIFF is closed): their error is the disk's when a probe beside the output fails too."""
    try:
        with tempfile.TemporaryFile(dir=Path(path).parent, prefix=".space-probe.") as probe:
            probe.write(b"\0" * DISK_PROBE_BYTES)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        if err.errno in DISK_ERRORS:
            return OSError(err.errno, err.strerror, str(path))
    return None


@contextlib.contextmanager
def written_or_disk_error(path: Path, writer_errors: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Within this block ``path`` (an output) is written: an OSError of a full or read-only disk, or one of
    ``writer_errors`` (a library's own) raised while that disk is full, becomes the disk's OSError naming ``path``
    (not the temporary file being written, nor "an output"), which scripts report in one line (disk_problem)."""
    try:
        yield
    except (OSError, *writer_errors) as err:
        if isinstance(err, OSError) and err.errno in DISK_ERRORS:
            raise OSError(err.errno, err.strerror, str(path)) from err
        problem = disk_error_at(path)
        if problem is None:
            raise
        raise problem from err


# The SHA-256 of each file read within remembered_digests, by path and stat: a command checks an input, then
# records it with the outputs made from it, and a scene of gigabytes must not be read for that twice. The status
# change time is in the key as no one can set it back: an edit in place with its old time set back is read again.
REMEMBERED: list[dict[tuple, str]] = []


@contextlib.contextmanager
def remembered_digests() -> Iterator[None]:
    """Within this block (one command's run), file_digest reads each version of a file once."""
    REMEMBERED.append({})
    try:
        yield
    finally:
        REMEMBERED.pop()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks (or remembered: remembered_digests)."""
    info = os.stat(path)
    key = (str(Path(path).resolve()), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    if REMEMBERED and key in REMEMBERED[-1]:
        return REMEMBERED[-1][key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    if REMEMBERED:
        REMEMBERED[-1][key] = digest.hexdigest()
    return digest.hexdigest()


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
    """A path (or a CRS's WKT) as a command in a message shows it, quoted where it needs to be for the user's shell:
    double quotes on Windows (cmd.exe and the OSGeo4W shell keep single ones), POSIX quoting elsewhere."""
    text = str(path)
    if os.name == "nt":
        if '"' in text:  # a CRS's WKT (no path holds one): its quotes escaped as programs read their arguments
            return '"' + text.replace('"', '\\"') + '"'
        return f'"{text}"' if any(c in text for c in WINDOWS_SPECIAL) else text
    return shlex.quote(text)


def atomic_write_csv(path: Path, text: str) -> None:
    """Write a CSV table atomically as UTF-8 with a byte-order mark, by which Excel (on a Chinese Windows too) knows
    its encoding and shows Chinese names as they are; Python reads it with encoding="utf-8-sig", pandas as it is."""
    atomic_write_bytes(path, b"\xef\xbb\xbf" + text.encode("utf-8", "backslashreplace"))


def nearest_existing(folder: Path) -> Path:
    """The folder, or the nearest of its parents that exists (the current folder's, for a relative path): where a
    folder to make would go, and what is in the way where that is a file."""
    folder = Path(folder)
    return next(p for p in (folder, *folder.parents) if p.exists())  # "." or the root always does


def out_problem(out: Path, example: str) -> str:
    """Why a results file given as ``--out`` cannot be written there, with the fix ('' if it can), creating nothing;
    ``example`` is a file name that the fix for a folder suggests."""
    out = Path(out)
    if out.is_dir():
        return f"a folder; expected the JSON file to write, such as {out / example}"
    existing = nearest_existing(out.parent)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder; choose another --out"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} cannot be written; choose another --out or fix its permissions"
    return ""


def unwritable_inside(folder: Path) -> list[Path]:
    """The folders inside ``folder``, and its log files (appended to in place), that this user owns and cannot
    write: a run folder copied from a read-only one (``cp -r`` keeps the modes, and the copy is the user's) and
    then made writable at the top only. Links are not followed (a link to a read-only data folder is only read),
    and another owner's folder is no copy's (a volume's root-owned lost+found, a shared data folder): chmod could
    not change it, and nothing is written there."""
    user = os.geteuid() if hasattr(os, "geteuid") else None

    def locked(path: Path, mode: int) -> bool:
        if path.is_symlink() or os.access(path, mode):
            return False
        with contextlib.suppress(OSError):
            return user is None or path.stat().st_uid == user
        return False

    found = []
    for top, dirs, names in os.walk(folder):
        found += [p for p in sorted(Path(top, d) for d in dirs) if locked(p, os.W_OK | os.X_OK)]
        found += [p for p in sorted(Path(top, n) for n in names if n.endswith(".log")) if locked(p, os.W_OK)]
    return found


def check_writable(folder: Path, need_bytes: int = 0, key: str = "--run_dir") -> None:
    """Fail at once, not hours later, when an output folder cannot be written or its disk is nearly full;
    ``key`` is the option that chose it, named in the fix.

    Raises:
        ValueError: naming the folder, the problem and the fix.
    """
    folder = Path(folder)
    blocking = nearest_existing(folder)
    if not blocking.is_dir():
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
    locked = unwritable_inside(folder)
    if locked:
        named = ", ".join(str(p.relative_to(folder)) for p in locked[:3])
        more = f" and {len(locked) - 3} more" if len(locked) > 3 else ""
        raise ValueError(
            f"{folder}: {named}{more} inside it cannot be written (a copy keeps a read-only folder's modes); "
            f"make them writable (chmod -R u+w {folder}) or choose another {key}"
        )
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


def process_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (one of another user's counts as running)."""
    if pid >= 2**32:  # no process has such an id (a stray file's digits): os.kill would raise OverflowError
        return False
    if os.name == "nt":  # os.kill(pid, 0) there sends Ctrl-C (signal 0 is CTRL_C_EVENT): ask the kernel instead
        return windows_process_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def windows_process_alive(pid: int) -> bool:
    """process_alive on Windows: a process handle that can be opened and has not yet exited."""
    import ctypes  # Windows only; imported here so that other systems never load it

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: it exists, under another user
    try:
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def temporary_beside(path: Path) -> Path:
    """A hidden temporary name beside ``path`` (``.<stem>.<pid>.tmp<suffix>``), renamed to ``path`` once the file is
    whole; the real extension stays last, as GDAL picks formats and checks names by it.

    A process killed while writing (kill -9, a power cut) cannot remove its temporary file, which may be as large
    as the scene: those of ``path`` left by a process that has ended on this machine (or by a process of this one's
    id, a pid that came back) are removed here, so that an interrupted run's next try does not leave them for good.
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.stem)}\.(\d+)\.tmp{re.escape(path.suffix)}")
    with contextlib.suppress(OSError):  # a folder not made yet holds none
        for left in path.parent.glob(f".{glob_escaped(path.stem)}.*.tmp{glob_escaped(path.suffix)}"):
            match = pattern.fullmatch(left.name)
            if match and (int(match[1]) == os.getpid() or not process_alive(int(match[1]))):
                remove_quietly(left)
    return path.parent / f".{path.stem}.{os.getpid()}.tmp{path.suffix}"


ATOMIC_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")  # the names atomic_temporary gives


def atomic_temporary(path: Path) -> Path:
    """A fresh hidden name beside ``path`` for atomic_write_bytes to write first (``.<name>.<12 hex digits>.tmp``,
    ATOMIC_TEMPORARY), by which remove_left_temporaries knows those a killed process left."""
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"


def remove_left_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files of atomic_write_bytes (ATOMIC_TEMPORARY) in ``folder``, which a process killed
    while writing (kill -9, a power cut) left, each as large as its output (a checkpoint); return them. Only for a
    folder this process alone writes to (one whose run_lock it holds)."""
    left = [p for p in Path(folder).glob(".*.tmp") if ATOMIC_TEMPORARY.fullmatch(p.name) and p.is_file()]
    for path in left:
        remove_quietly(path)
    return left


def glob_escaped(text: str) -> str:
    """``text`` with the characters glob reads as patterns (``*?[``) matching themselves."""
    return re.sub(r"([*?[])", r"[\1]", text)


LOCK_WRITING_S = 10.0  # an unreadable lock file younger than this is being written, not left by a dead run


def lock_holder(lock: Path) -> dict[str, Any] | None:
    """The process named in a lock file (pid, host, started), or None where the lock is stale: its process has
    ended on this machine, or is this very process (which has not taken it yet: a run killed with -9 whose pid
    came back, as pid 1 does in a restarted container), or the file cannot be read (a run killed while writing it)."""
    holder = read_record(lock)
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        # run_lock creates the file, then writes it: one this young is being written, held by the run writing it.
        with contextlib.suppress(OSError):
            if time.time() - lock.stat().st_mtime < LOCK_WRITING_S:
                return {"pid": "?", "host": "?", "started": "a moment ago"}
        return None
    here = holder.get("host") == socket.gethostname()
    if here and (holder["pid"] == os.getpid() or not process_alive(holder["pid"])):
        return None
    return holder


@contextlib.contextmanager
def run_lock(lock: Path, what: str) -> Iterator[None]:
    """Hold ``lock`` (a file naming this process) while ``what`` runs, so that a second run of it into the same
    folder is refused rather than overwriting the first one's outputs. A lock left by a process that has ended
    (killed with -9, a crash) is taken over.

    Raises:
        ValueError: another live process holds the lock, naming it, the lock file and the fixes; or the folder
            cannot be written (check_writable).
    """
    lock = Path(lock)
    check_writable(lock.parent)  # a folder that cannot be written is named as such, not as a failed lock
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    text = json.dumps(mine).encode("utf-8")
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = lock_holder(lock)
            if holder is not None:
                process = f"process {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
                raise ValueError(
                    f"{shown_path(lock.parent.parent)}: {what} ({process}) is already running into this run folder, "
                    "and two would overwrite each other's checkpoints and logs; wait for it to finish (predict.py may "
                    f"run meanwhile), or use another --run_dir. If it is not running (its machine stopped), delete "
                    f"{shown_path(lock)}"
                ) from None
            remove_quietly(lock)  # stale: its process has ended
            continue
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(text)
        except BaseException:  # a full disk or Ctrl-C: an empty lock left would refuse the next run as "running"
            remove_quietly(lock)
            raise
        break
    try:
        yield
    finally:
        if read_record(lock) == mine:
            remove_quietly(lock)
