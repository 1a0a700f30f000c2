"""Where and how the network runs: device, mixed precision, torchrun set-up and teardown, the allocator
setting, checkpoint files, usable cores and free memory, and a description of the machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import datetime
import gc
import hashlib
import io
import os
import platform
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from files import DataError, atomic_write_bytes


def select_device(name: str) -> torch.device:
    """Resolve the ``device`` key: 'auto' picks CUDA when available, else the CPU.

    Raises:
        ValueError: not a device name, or CUDA was asked for but is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device={name}: expected auto, cpu, cuda or cuda:N (the N-th GPU)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={name}: CUDA is not available on this machine; use --device=cpu or auto")
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: stay in fp32 unless bf16 is asked for
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# mallopt parameters from glibc's malloc.h
M_TRIM_THRESHOLD = -1


M_MMAP_THRESHOLD = -3


GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # glibc's starting mmap and trim thresholds
GLIBC_MMAP_CEILING = 32 * 1024 * 1024  # the highest mmap threshold glibc's own rise reaches (64-bit)
MEMORY_SETTING = {"kept": False}  # whether keep_freed_memory is in force in this process


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt and malloc_trim are there); None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both must exist)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse rather than hand large blocks back to the system at once.

    By default glibc maps every block over 32 MiB afresh and unmaps it when freed, so each activation of a
    full-width U-Net is faulted in page by page again on every pass: on a 2-core CPU that was a fifth of the
    prediction time. With both thresholds raised, freed activations are reused from the heap. Returns
    whether the setting took (False off glibc, e.g. on macOS or Windows, where nothing changes).
    """
    libc = glibc()
    if libc is None:
        return False
    # Blocks up to 1 GiB come from the heap (larger ones are still mapped), and the heap is not trimmed.
    mapped = libc.mallopt(M_MMAP_THRESHOLD, 2**30)
    trimmed = libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # set even where the first one was refused
    MEMORY_SETTING["kept"] = bool(mapped) and bool(trimmed)
    return MEMORY_SETTING["kept"]


def settle_thresholds(libc: ctypes.CDLL) -> None:
    """glibc's thresholds as a process's own frees leave them: each freed mapped block raises the mmap threshold to
    its size, up to GLIBC_MMAP_CEILING, and the trim threshold to twice that. mallopt turns that rise off for good,
    so the starting 128 KiB set by hand would stay fixed and map every larger block afresh on each pass (1 MiB
    blocks took 30 times as long as in a fresh process)."""
    libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_CEILING)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * GLIBC_MMAP_CEILING)


def apply_reuse_memory(keep: bool) -> bool:
    """Apply the ``reuse_memory`` key: keep_freed_memory when ``keep``; otherwise, where an earlier run in this
    process (a notebook calling predict.py's main before) kept freed memory, the kept heap handed back and glibc's
    thresholds as a process that never kept it has them (settle_thresholds). Returns whether freed memory is kept
    now."""
    if keep:
        return keep_freed_memory()
    libc = glibc()
    if libc is not None and MEMORY_SETTING["kept"]:
        settle_thresholds(libc)
        libc.malloc_trim(0)
        MEMORY_SETTING["kept"] = False
    return False


@contextlib.contextmanager
def handing_back_freed_memory() -> Iterator[None]:
    """Within the block, glibc hands freed memory back as it does by default, starting with the heap the
    network's passes left (malloc_trim): work of many objects of all sizes after prediction (field polygons)
    then does not add its memory on top of the kept heap. keep_freed_memory is restored after, if it was on, else
    glibc's thresholds as a process's own frees leave them (settle_thresholds).
    """
    libc = glibc()
    kept = MEMORY_SETTING["kept"]
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
        libc.malloc_trim(0)
        MEMORY_SETTING["kept"] = False
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)
            if kept:
                keep_freed_memory()
            else:  # not the starting thresholds fixed: every later pass would map its blocks afresh
                settle_thresholds(libc)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """Resolve the ``amp`` key to the autocast dtype, or None for full fp32.

    auto: bf16 on GPUs and CPUs that run it natively, fp16 (with a gradient scaler) on older GPUs, else off.
    On a CPU this is only the first candidate: train.py and predict.py's tile loop time it against fp32 and the
    other layout on the actual network and take the faster (fast_path.py).

    Raises:
        ValueError: an unknown value, or fp16 asked for on a CPU.
    """
    word = name.strip().lower()
    if word not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"--amp={name!r}: expected auto, bf16, fp16 or off")
    if word == "off":
        return None
    if word == "bf16":
        return torch.bfloat16
    if word == "fp16":
        if device.type != "cuda":
            raise ValueError("--amp=fp16 needs a CUDA device; on a CPU use --amp=bf16 or --amp=off")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None


@dataclasses.dataclass
class Distributed:
    """Where this process stands in a torchrun job (rank 0 of 1 when started without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0 alone writes logs, figures, checkpoints and reports."""
        return self.rank == 0


def init_distributed(device_name: str) -> Distributed:
    """Join the torchrun job if there is one: NCCL on GPUs (one per local rank), gloo on CPUs.

    Without torchrun (no WORLD_SIZE, or 1) nothing changes: one process on ``select_device(device_name)``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(device=select_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=rank, world=world, device=device)


def close_distributed(barrier: bool = True) -> None:
    """Leave the torchrun job cleanly: without this, gloo can abort the process as it exits. ``barrier=False``
    on the way out of an error or a stop, when other ranks may be gone or stuck in a collective."""
    if torch.distributed.is_initialized():
        # DistributedDataParallel sits in reference cycles: free it while its process group still exists,
        # or its destructor runs at interpreter exit against a torn-down group and aborts the process.
        gc.collect()
        if barrier:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class RankStopped(RuntimeError):
    """Under torchrun, a collective failed because another rank of the job had stopped (an error, Ctrl-C, a stopped
    machine): that rank's own message says why."""


LOST_PEER = ("Connection closed by peer", "Connection reset by peer")  # gloo's words for a rank that is gone


def lost_rank(err: BaseException) -> bool:
    """Whether ``err`` is a collective's failure because another rank of this torchrun job is gone (False without
    torchrun)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return False
    return isinstance(err, torch.distributed.DistError) or (
        isinstance(err, RuntimeError) and any(words in str(err) for words in LOST_PEER)
    )


def rank_stopped(err: BaseException) -> RankStopped:
    """The one-line report of a collective that ``err`` says another rank left (lost_rank)."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    reason = reason.split("] ", 1)[-1].split(". ")[0]  # gloo's source location and advice left out
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return RankStopped(
        f"rank {rank} of {world} stopped: another rank of this torchrun job stopped first (an error, Ctrl-C or a "
        "stopped machine), and its own message says why: look above, or on the terminal of the machine it ran on "
        f"(ranks other than 0 keep no log file); torch reported: {reason}"
    )


@contextlib.contextmanager
def leaving_distributed() -> Iterator[None]:
    """Around a script's work under torchrun: leave the job cleanly when it ends (close_distributed), and
    without a barrier when it ends in an error or a stop.

    Raises:
        RankStopped: in place of torch's error, when a collective failed because another rank had stopped.
    """
    try:
        yield
    except BaseException as err:
        lost = rank_stopped(err) if lost_rank(err) else None
        close_distributed(barrier=False)
        if lost is not None:
            raise lost from None
        raise
    close_distributed()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (a no-op without torchrun)."""
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def weights_digest(model: nn.Module) -> str:
    """A SHA-256 of the weights and buffers, to check that every rank holds the same network."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def set_deterministic() -> None:
    """Ask torch for deterministic kernels, so that the same seed gives the same weights on the same machine."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for repeatable results
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def kernel_settings_restored() -> Iterator[None]:
    """Within the block, set_deterministic and cuDNN autotuning may change torch's process-wide kernel settings;
    after it they are as they were, so that a later run in the same process (train.py's main called again from a
    notebook, without --deterministic) gets the kernels it asks for, not the ones an earlier run left."""
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    algorithms = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(algorithms[0], warn_only=algorithms[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def describe_device(device: torch.device) -> str:
    """A short description of the device for the log."""
    if device.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    cuda = "" if torch.cuda.is_available() else ", no CUDA device found"
    return f"CPU ({threads} thread{'' if threads == 1 else 's'}){cuda}"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialise to memory, then write to a temporary file and rename: a kill never leaves half a file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, device: torch.device | str = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain values only, never code. ``mmap``: map
    the tensors instead of reading them (cheap when only the config or the counters are wanted).

    Raises:
        DataError: the file is missing or is not a checkpoint of this project.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(
            f"{path}: a folder, not a checkpoint; name the .pth file in it (for example {path / 'best.pth'})"
        )
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found; train first (python train.py) or set --checkpoint")
    if path.suffix.lower() == ".onnx":
        raise DataError(
            f"{path}: an ONNX model, not a checkpoint (a .pth file train.py wrote, such as RUN/checkpoints/best.pth); "
            "export from the checkpoint, or predict with the ONNX model: --backend=onnx --onnx_model=FILE"
        )
    size = path.stat().st_size
    # train.py writes checkpoints whole (a temporary file renamed), so a short or empty one was cut by a copy, a
    # transfer or a full disk; torch's own words for it ("use _use_new_zipfile_serialization", a miniz error) are
    # about saving, not about a file cut short.
    fix = "copy it again from where it came, or use another checkpoint of the run (best.pth, last.pth, epoch_NNN.pth)"
    if size == 0:
        raise DataError(
            f"{path}: an empty file (0 bytes), as a copy or transfer cut short (or a full disk) leaves; {fix}"
        )
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises several types for foreign or damaged files
        reason = str(err).split(". In PyTorch 2.6")[0]  # torch's advice (weights_only=False) does not apply here
        with open(path, "rb") as handle:
            cut_short = handle.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path)  # a zip without its end
        if cut_short:
            raise DataError(
                f"{path}: the start of a checkpoint without its end ({size:,} bytes; {reason.split('. ')[0]}), as a "
                f"copy or transfer cut short (or a full disk) leaves; {fix}"
            ) from None
        raise DataError(
            f"{path}: not a loadable checkpoint ({type(err).__name__}: {reason[:200]}); expected a .pth file "
            "train.py wrote (RUN/checkpoints/best.pth)"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise DataError(f"{path}: not a checkpoint written by train.py (expected a dict with 'model' and 'config')")
    return state


def memory_format(channels_last: bool) -> torch.memory_format:
    """The tensor layout for the network's inputs and weights (the ``channels_last`` key)."""
    return torch.channels_last if channels_last else torch.contiguous_format


def usable_cores() -> int:
    """CPU cores this process may run on (a container's or taskset's limit, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux /proc/meminfo), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine() -> dict[str, Any]:
    """CPU model, cores, GPU and library versions of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
