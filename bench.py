"""Benchmark: the project's fast path against the plain reference recipe, side by side, in one run.

    python bench.py                      # widths 16, 32, 64, each encoder, 256x256 tiles (many minutes on a small CPU)
    python bench.py --widths=16 --encoders=unet --tile=128 --train_steps=4
    python bench.py --widths=16 --encoders=unet --downscales=1,2   # the U-Net at full and at half resolution

On the same generated tiles, for every network width (``--widths``), encoder (``--encoders``) and working
resolution (``--downscales``: 2 = the network sees tiles shrunk to half each side), it measures
- training throughput (tiles/s) and peak memory: reference = fp32, contiguous memory, batch 5, no loader
  workers, tiles decoded every time; fast = the config's defaults (mixed precision where the hardware runs
  it natively, channels-last, loader workers, decoded-tile cache, freed memory reused; on CUDA also fused
  Adam, cudnn autotune and a larger batch); on a CPU the fast path's precision and layout are those that
  fast_path.py times and chooses for that network, as train.py and predict.py do, and the table says which;
- prediction throughput (tiles/s, masks written to disk): reference = one image at a time in fp32;
  fast = predict.py's path (BatchNorm folded, padding and concatenation written into the buffers the
  convolutions read, reduced precision, channels-last, batches, reading workers, freed memory reused); its
  masks are written unsieved (``sieve_cells=0``), as the reference writes them, here and below;
and, once, for the U-Net at ``--width`` (the widest by default) at full resolution:
- prediction's backends side by side in predict.py's loop (tiles/s): the fast path in float32 as well as
  in its default precision (bf16 where the CPU runs it natively), and on a CPU the same network exported by
  export_onnx.py run by onnxruntime, in float32 and as the 8-bit copy (``--quantize=int8``); the table names
  the fastest (``--backend=onnx`` chooses onnxruntime);
- prediction's loop with a stand-in for the network that costs nothing (tiles/s): what reading, batching
  and writing alone allow on this machine, the ceiling for a device however fast;
- miou.py's time per image against a per-pixel Python loop over the same files;
- megapixels/s of predict.py on a synthetic GeoTIFF scene (bench_scene.py's measurement: windows blended,
  mask and probability GeoTIFFs written), at the same width;
- the reference once more with the project's allocator setting alone (``reuse_memory``: freed memory kept for
  reuse), so that the share of that one process-wide setting in each ratio is seen;
and prints each pair's ratio. Every measurement runs in a fresh process, so peak memory is its own. The
tables are printed and written as JSON with the machine (CPU model, cores, GPU), the torch version, and the
network's FLOPs per tile, from which the achieved FLOP/s follow; the table by network also as Markdown
beside the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

import files
import onnx_build
import onnx_quantize
from benchmarking import measure_scene, peak_rss, random_checkpoint
from config import Config
from data_preprocess import IGNORE, FarmlandDataset, load_image, load_mask, write_image
from demo_data import generate_dataset
from exported_model import load_segmenter
from fast_path import prediction_choice, training_choice
from inference import BATCH_MOST, inference_model, model_from_checkpoint
from metrics import class_iou, confusion_matrix, evaluate_pairs
from net_structure import ENCODERS, build_model
from resolution import FACTORS, check_factor
from runtime import (
    keep_freed_memory,
    machine,
    memory_format,
    resolve_amp,
    save_checkpoint,
    select_device,
    usable_cores,
)
from tile_prediction import predict_tiles
from training import make_loader, make_optimizer, train_epoch, training_batch

REFERENCE_BATCH = 5


class Network(NamedTuple):
    """One network of the table: its width, encoder and working resolution (1 = full, 2 = half, 4)."""

    width: int
    encoder: str = "unet"
    downscale: int = 1


def forward_flops(width: int, tile: int, encoder: str = "unet", downscale: int = 1) -> int:
    """FLOPs (multiply and add counted apart) of one forward pass of one tile, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(3, 2, width, 0.0, encoder, downscale).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, tile, tile))
    return int(counter.get_total_flops())


def matmul_peaks(device_name: str, dtype_names: Sequence[str]) -> dict[str, float]:
    """TFLOP/s of one large square matrix product in each dtype on the device: the practical peak that the
    network's achieved FLOP/s is set against (a convolution is a matrix product in disguise)."""
    device = select_device(device_name)
    side = 8192 if device.type == "cuda" else 2048
    repeats = 50 if device.type == "cuda" else 4
    peaks = {}
    for name in dtype_names:
        dtype = getattr(torch, name)
        a = torch.randn(side, side, device=device).to(dtype)
        b = torch.randn(side, side, device=device).to(dtype)
        a @ b  # warm-up: kernels chosen, threads started
        best = 0.0
        for _ in range(5):  # the best of five rounds: a peak, not an average over interruptions
            synchronize(device)
            started = time.perf_counter()
            for _ in range(repeats):
                a @ b
            synchronize(device)
            best = max(best, 2 * side**3 * repeats / (time.perf_counter() - started) / 1e12)
        peaks[name] = best
    return peaks


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> int:
    """Peak bytes: GPU memory allocated on CUDA, else this process's own peak resident memory (peak_rss: a
    spawned measurement's ru_maxrss would start at what bench.py's main process held when it was started)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss()


def bench_train(pairs: list[tuple[Path, Path]], settings: dict[str, Any], steps: int, fast: bool) -> dict[str, float]:
    """Tiles/s of train.py's training step with the given config overrides (one warm-up step first).

    ``fast`` adds what train.py does on CUDA beyond the config: cudnn autotuning and the fused optimizer.
    """
    cfg = dataclasses.replace(Config(), **settings)
    if cfg.reuse_memory:
        keep_freed_memory()
    device = select_device(cfg.device)
    torch.backends.cudnn.benchmark = fast and device.type == "cuda"
    cache = cfg.cache_tiles == "yes"
    dataset = FarmlandDataset(pairs, 3, True, 0, cache)
    loader = make_loader(dataset, cfg, device, shuffle=True)
    torch.manual_seed(0)
    model = build_model(3, 2, cfg.base_width, cfg.dropout, cfg.encoder, cfg.downscale).to(
        device, memory_format=memory_format(True)
    )
    # As train.py: under amp=auto on a CPU the precision and layout are timed and chosen (not counted below).
    criterion = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)
    choice = training_choice(
        cfg, model, criterion, tuple(dataset[0][0].shape), device, training_batch(cfg, len(dataset))
    )
    amp, layout = choice.candidate.amp, choice.candidate.layout
    if fast:
        optimizer = make_optimizer(model, cfg, device)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    train_epoch(model, loader, optimizer, scaler, device, layout, amp, max_steps=1)
    synchronize(device)
    started = time.perf_counter()
    _, taken = train_epoch(model, loader, optimizer, scaler, device, layout, amp, max_steps=steps)
    synchronize(device)
    seconds = time.perf_counter() - started
    return {
        "tiles_per_s": taken * cfg.batch_size / seconds,
        "peak_bytes": peak_memory(device),
        "batch": cfg.batch_size,
        **path_fields(choice.as_dict()),
    }


def path_fields(choice: dict[str, Any]) -> dict[str, Any]:
    """A measurement's precision and layout (chosen by fast_path.py under amp=auto, else as set) and the choice."""
    return {"precision": choice["precision"], "layout": choice["layout"], "choice": choice}


def bench_predict_reference(
    images: list[Path],
    width: int,
    device_name: str,
    out_dir: Path,
    reuse_memory: bool = False,
    encoder: str = "unet",
    downscale: int = 1,
) -> dict[str, float]:
    """Tiles/s of the reference prediction: fp32, contiguous, one image at a time, masks written
    (``reuse_memory``: with the project's allocator setting alone, to show what it gives on its own)."""
    if reuse_memory:
        keep_freed_memory()
    device = select_device(device_name)
    model = build_model(3, 2, width, 0.3, encoder, downscale).to(device).eval()

    def run(progress: Callable[[int], None]) -> None:
        with torch.no_grad():
            for handled, path in enumerate(images, 1):
                image = torch.from_numpy(load_image(path, 3))[None].to(device)
                mask = model(image).argmax(1)[0].to(torch.uint8).cpu().numpy()
                write_image(out_dir / f"{path.stem}_seg.png", mask * np.uint8(255))
                progress(handled)

    return {**steady_rate(run, device), "precision": "float32", "layout": "contiguous"}


def bench_predict_fast(
    images: list[Path],
    width: int,
    device_name: str,
    out_dir: Path,
    workers: int,
    amp_name: str = "auto",
    encoder: str = "unet",
    downscale: int = 1,
) -> dict[str, float]:
    """Tiles/s of predict.py's own tile loop (predict_tiles): folded network, reduced precision (``amp_name``
    as the ``amp`` key: off for float32; under auto on a CPU the precision and layout that fast_path.py times
    and chooses, as predict_tiles does, the choice not counted), batches read by workers, masks written by a
    background thread."""
    keep_freed_memory()  # as predict.py does with the default reuse_memory=true
    device = select_device(device_name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    config = {"in_channels": 3, "n_classes": 2, "base_width": width, "dropout": 0.3}
    config |= {"encoder": encoder, "downscale": downscale}
    state = {"model": build_model(3, 2, width, 0.3, encoder, downscale).state_dict(), "config": config}
    model = inference_model(state, device, True, resolve_amp(amp_name, device))
    model, choice = prediction_choice(model, state, amp_name, True, device, load_image(images[0], 3).shape)
    amp = choice.candidate.amp
    # The choice made, predict_tiles is told it, so that it does not time the candidates again.
    chosen = {"amp": choice.candidate.amp_key, "channels_last": choice.candidate.channels_last}
    cfg = dataclasses.replace(Config(), num_workers=workers, overlay=False, sieve_cells=0, **chosen)
    outputs = [out_dir / f"{i}_seg.png" for i in range(len(images))]  # a tile may come more than once

    def run(progress: Callable[[int], None]) -> None:
        done, failed = predict_tiles(
            model, images, outputs, cfg, state, Path("random weights"), device, amp, (), progress
        )
        if done != len(images) or failed:
            raise RuntimeError(f"bench: predicted {done} of {len(images)} tiles")

    return {**steady_rate(run, device), **path_fields(choice.as_dict())}


def export_bench_models(width: int, folder: Path, calibration: list[Path]) -> dict[str, str]:
    """A random network of this width exported as export_onnx.py exports a checkpoint, and its 8-bit copy
    calibrated on bench tiles (without the accuracy check, the weights being random); the two files' paths."""
    torch.manual_seed(0)
    state = {
        "model": build_model(3, 2, width, 0.3).state_dict(),
        "config": {"in_channels": 3, "n_classes": 2, "base_width": width, "dropout": 0.3},
    }
    checkpoint, fp32, int8 = folder / "random.pth", folder / "bench.onnx", folder / "bench_int8.onnx"
    save_checkpoint(checkpoint, state)
    unet = model_from_checkpoint(state, torch.device("cpu"), channels_last=False).eval()
    metadata = onnx_build.model_metadata(state, checkpoint, Config.window, Config.overlap, None)
    onnx_build.write_model(onnx_build.with_metadata(onnx_build.export_graph(unet), metadata), fp32)
    onnx_quantize.quantize_int8(fp32, int8, [load_image(p, 3) for p in calibration])
    return {"float32": str(fp32), "int8": str(int8)}


def bench_predict_onnx(images: list[Path], model: str, out_dir: Path, workers: int) -> dict[str, float]:
    """Tiles/s of predict.py's tile loop with ``--backend=onnx``: the exported model in onnxruntime on the CPU,
    batches read by workers, masks written by a background thread."""
    keep_freed_memory()
    segmenter, state = load_segmenter(Path(model))
    cpu = torch.device("cpu")
    cfg = dataclasses.replace(Config(), num_workers=workers, overlay=False, sieve_cells=0)
    outputs = [out_dir / f"{i}_seg.png" for i in range(len(images))]

    def run(progress: Callable[[int], None]) -> None:
        done, failed = predict_tiles(segmenter, images, outputs, cfg, state, Path(model), cpu, None, (), progress)
        if done != len(images) or failed:
            raise RuntimeError(f"bench: predicted {done} of {len(images)} tiles")

    return steady_rate(run, cpu)


LOOP_BATCH = 32  # tiles per batch of the loop without the network; --loop_tiles needs two batches or more


class NoNetwork(torch.nn.Module):
    """Stands in for the U-Net to time prediction's reading, batching and writing alone: its class scores are
    the first two bands of the input, free to compute."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # predict.py casts the inputs to the weights' dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2]


def bench_predict_loop(paths: list[Path], device_name: str, out_dir: Path, workers: int) -> dict[str, float]:
    """Tiles/s of predict.py's tile loop with no network: the most that reading, batching and writing allow
    here, whatever the device's speed."""
    keep_freed_memory()
    device = select_device(device_name)
    cfg = dataclasses.replace(
        Config(), num_workers=workers, overlay=False, predict_batch_size=LOOP_BATCH, sieve_cells=0
    )
    outputs = [out_dir / f"{i}_seg.png" for i in range(len(paths))]  # a tile may come more than once
    state = {"config": {"in_channels": 3}}

    def run(progress: Callable[[int], None]) -> None:
        predict_tiles(
            NoNetwork().to(device), paths, outputs, cfg, state, Path("no network"), device, None, (), progress
        )

    result = steady_rate(run, device)
    result["workers"] = workers
    return result


def steady_rate(run: Callable[[Callable[[int], None]], None], device: torch.device) -> dict[str, float]:
    """Tiles/s over the second half of one run: ``run`` reports the tiles handled after each batch, and the
    first half (start-up, kernel selection, the first touch of memory) counts as warm-up.

    One run, not a warm-up run and a timed one: loader workers forked from a process whose memory has grown
    share its pages, and the parent's first write to each of them then copies it, a cost that a real run,
    whose workers start before the network's memory is allocated, does not pay (it took a quarter off a
    timed second pass on two cores).
    """
    marks: list[tuple[int, float]] = []

    def progress(handled: int) -> None:
        synchronize(device)
        marks.append((handled, time.perf_counter()))

    run(progress)
    progress(marks[-1][0])  # the end of the run: outputs still being written when the last batch was done
    total = marks[-1][0]
    handled, started = next((n, t) for n, t in marks if n >= total / 2)
    if handled == total:
        raise ValueError(
            f"bench: {total} tiles make too few batches to time (the first half of a run is warm-up); give more "
            "tiles: --predict_tiles, or --loop_tiles for the loop without the network"
        )
    return {"tiles_per_s": (total - handled) / (marks[-1][1] - started), "peak_bytes": peak_memory(device)}


def per_pixel_counts(label: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    """The reference: count tp, fp, fn, tn pixel by pixel in Python."""
    tp = fp = fn = tn = 0
    for y in range(label.shape[0]):
        for x in range(label.shape[1]):
            t, p = label[y, x], pred[y, x]
            if t and p:
                tp += 1
            elif p:
                fp += 1
            elif t:
                fn += 1
            else:
                tn += 1
    return tp, fp, fn, tn


def bench_metrics(items: list[tuple[str, Path, Path]]) -> dict[str, float]:
    """Seconds per image: miou.py's vectorised counts and IoUs against the per-pixel loop, on masks in memory
    (the scoring itself); and miou.py's whole per-image work, reading and checking both files included."""
    started = time.perf_counter()
    rows, _, _ = evaluate_pairs(items)
    with_io = (time.perf_counter() - started) / len(items)
    masks = [(load_mask(label), load_mask(pred)) for _, label, pred in items]
    rounds = 20  # the vectorised pass takes a fraction of a millisecond: averaged over rounds, not timed once
    started = time.perf_counter()
    for _ in range(rounds):
        fast_counts = []
        for label, pred in masks:
            cm = confusion_matrix(pred, label)
            class_iou(cm)
            fast_counts.append((int(cm[1, 1]), int(cm[0, 1]), int(cm[1, 0]), int(cm[0, 0])))
    fast = (time.perf_counter() - started) / rounds / len(items)
    started = time.perf_counter()
    counts = [per_pixel_counts(label, pred) for label, pred in masks]
    reference = (time.perf_counter() - started) / len(items)
    if counts != fast_counts or counts != [(r["tp"], r["fp"], r["fn"], r["tn"]) for r in rows]:
        raise RuntimeError("the vectorised and per-pixel counts differ")
    return {"fast_s_per_image": fast, "reference_s_per_image": reference, "miou_with_file_io_s_per_image": with_io}


def repeated(images: list[Path], count: int) -> list[Path]:
    """``count`` paths taken from the images in turn, over again when there are fewer."""
    return [images[i % len(images)] for i in range(count)]


def platform_start_method() -> None:
    """In a spawned process, start later processes (loader workers) as the platform does by default, as in a
    script run from a terminal: a spawned process otherwise spawns its own children too, and each loader's
    workers would import torch afresh (seconds each time) where a Linux run forks them."""
    multiprocessing.set_start_method(None, force=True)


def in_subprocess(function: Callable[..., dict], *args: Any) -> dict:
    """Run one measurement in a fresh process, so that its peak memory and warm-up are its own."""
    # An executor, not a Pool: its worker may start loader workers of its own (a Pool's may not).
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=platform_start_method) as executor:
        return executor.submit(function, *args).result()


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, with sizes that depend on the device filled in (CPU or CUDA)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_network_arguments(parser)
    _add_size_arguments(parser)
    parser.add_argument(
        "--cases_only",
        action="store_true",
        help="only the table by network (no one-off rows: backends, loop, scoring, scene); minutes on a GPU",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench.json"), help="where the JSON goes")
    args = parser.parse_args(argv)
    try:  # refused before any measurement starts
        select_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    _fill_sizes(args, cuda)
    _fill_networks(args, parser)
    most = BATCH_MOST["cuda" if cuda else "cpu"]
    if args.predict_tiles < 2 * most:  # else it fails minutes in, after the training rows
        parser.error(
            f"--predict_tiles={args.predict_tiles}: expected {2 * most} or more tiles (prediction runs batches of up "
            f"to {most} tiles on this device and times the second half of the run); use --predict_tiles={2 * most}, "
            "or leave it out for the default"
        )
    if not args.cases_only and args.loop_tiles < 2 * LOOP_BATCH:  # else it fails minutes in, after other rows
        parser.error(
            f"--loop_tiles={args.loop_tiles}: expected {2 * LOOP_BATCH} or more tiles (the loop runs batches of "
            f"{LOOP_BATCH} and times the second half of the run); use --loop_tiles={2 * LOOP_BATCH} or the default 512"
        )
    problem = files.out_problem(args.out, "bench.json")
    if not problem and args.out.suffix.lower() == ".md":  # the table by network goes to out.with_suffix(".md")
        problem = f"the table by network goes beside the JSON as .md, over it; use {args.out.with_suffix('.json')}"
    if problem:  # else the first row's minutes are lost when its results cannot be written
        parser.error(f"--out={args.out}: {problem}")
    return args


def _add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """The keys that say which networks are measured: widths, encoders, working resolutions, tile side."""
    parser.add_argument(
        "--widths", default="", help="base widths measured, comma-separated; empty = 16,32,64 (or --width alone)"
    )
    parser.add_argument(
        "--encoders", default="", help=f"networks measured at each width, of {','.join(ENCODERS)}; empty = all"
    )
    parser.add_argument(
        "--downscales",
        default="1",
        help="working resolutions measured for each network, comma-separated, of 1, 2, 4 (2: half each side)",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=0,
        help="width of the one-off rows (memory reuse alone, backends, the loop, the scene), on the U-Net at "
        "full resolution; 0 = the widest of --widths",
    )
    parser.add_argument("--tile", type=int, default=256, help="tile side in pixels")


def _add_size_arguments(parser: argparse.ArgumentParser) -> None:
    """The keys that size each measurement; 0 leaves the size to the device (``_fill_sizes``)."""
    parser.add_argument(
        "--train_steps",
        type=int,
        default=0,
        help="timed training steps; 0 = 3 on CPU (30 on CUDA) for the full-width U-Net, up to 4x more for lighter ones",
    )
    parser.add_argument(
        "--predict_tiles",
        type=int,
        default=0,
        help="tiles predicted; 0 = 32 on CPU (4096 on CUDA) for the full-width U-Net, up to 4x more for lighter ones",
    )
    parser.add_argument("--loop_tiles", type=int, default=512, help="tiles through the prediction loop without network")
    parser.add_argument(
        "--scene_size",
        type=int,
        default=0,
        help="side of the scene predicted by predict.py; 0 = 2048 on CPU, 16384 on CUDA",
    )
    parser.add_argument("--metric_images", type=int, default=10, help="masks scored per metric variant")
    parser.add_argument("--fast_batch", type=int, default=0, help="fast training batch; 0 = 5 on CPU, 32 on CUDA")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="prediction's reading workers; 0 = the config's 2 on CPU, cores - 2 (2 to 12) on CUDA",
    )


def _fill_sizes(args: argparse.Namespace, cuda: bool) -> None:
    """Replace the sizes left at 0 with the device's defaults (a GPU gets more work, so that timings span seconds)."""
    args.fast_batch = args.fast_batch or (32 if cuda else REFERENCE_BATCH)
    args.scaled = (args.train_steps == 0, args.predict_tiles == 0)  # defaults grow for lighter networks (case_sizes)
    args.train_steps = args.train_steps or (30 if cuda else 3)
    args.predict_tiles = args.predict_tiles or (4096 if cuda else 32)
    args.scene_size = args.scene_size or (16384 if cuda else 2048)
    args.workers = args.workers or (max(2, min(12, usable_cores() - 2)) if cuda else Config().num_workers)


def _fill_networks(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Turn the comma-separated widths, encoders and downscales into lists, refusing what cannot be built."""
    refusal = f"--widths={args.widths}: expected comma-separated positive widths, such as 16,32,64"
    try:  # a width or encoder named twice is measured once
        widths = list(dict.fromkeys(int(w) for w in args.widths.split(",") if w.strip()))
    except ValueError:
        parser.error(refusal)
    if min(widths, default=1) < 1:
        parser.error(refusal)
    args.widths = widths or ([args.width] if args.width else [16, 32, 64])
    args.width = args.width or max(args.widths)
    args.encoders = list(dict.fromkeys(e.strip() for e in args.encoders.split(",") if e.strip())) or list(ENCODERS)
    unknown = sorted(set(args.encoders) - set(ENCODERS))
    if unknown:
        parser.error(f"--encoders: {', '.join(unknown)} unknown; expected some of {', '.join(ENCODERS)}")
    args.downscales = parse_downscales(args.downscales, parser)


def parse_downscales(text: str, parser: argparse.ArgumentParser) -> list[int]:
    """``--downscales=1,2`` as a list of factors; anything else is refused with the factors the networks take."""
    try:
        factors = list(dict.fromkeys(check_factor(int(f)) for f in text.split(",") if f.strip()))
    except ValueError:
        parser.error(
            f"--downscales={text}: expected comma-separated factors of {', '.join(map(str, FACTORS))}, e.g. 1,2"
        )
    return factors or [1]


def reference_settings(network: Network, device: str) -> dict[str, Any]:
    """The config overrides of the reference training recipe: fp32, contiguous, batch 5, tiles decoded every
    time in the main process, memory handed back."""
    return {
        "base_width": network.width,
        "encoder": network.encoder,
        "downscale": network.downscale,
        "device": device,
        "amp": "off",
        "channels_last": False,
        "batch_size": REFERENCE_BATCH,
        "num_workers": 0,
        "cache_tiles": "no",
        "reuse_memory": False,
    }


FULL_WIDTH = 64  # the reference U-Net's width, whose default sizes (3 steps, 32 tiles on a CPU) the others scale


def case_sizes(args: argparse.Namespace, flops: float, full_flops: float) -> tuple[int, int]:
    """Timed training steps and predicted tiles of one network: as given, else the defaults of the full-width
    U-Net times how much lighter this network is (at most 4x), so that each timing spans seconds, not a few
    hundred milliseconds of a busy machine."""
    scale = min(4.0, max(1.0, full_flops / flops))
    steps = round(args.train_steps * scale) if args.scaled[0] else args.train_steps
    tiles = round(args.predict_tiles * scale) if args.scaled[1] else args.predict_tiles
    return steps, tiles


def measure_case(
    args: argparse.Namespace, pairs: list[tuple[Path, Path]], tmp: Path, network: Network, sizes: tuple
) -> dict[str, Any]:
    """One network: training and prediction tiles/s of the reference and of the fast path (with the precision
    and layout it chose), side by side."""
    steps, count = sizes
    tiles = repeated([image for image, _ in pairs], count)
    width, encoder, downscale = network
    reference = reference_settings(network, args.device)
    # The config's defaults otherwise (amp=auto, channels-last, loader workers, memory reuse): the fast path.
    fast = {"base_width": width, "encoder": encoder, "downscale": downscale, "device": args.device}
    fast |= {"batch_size": args.fast_batch, "cache_tiles": "yes"}
    name = case_folder(network)
    return {
        "width": width,
        "encoder": encoder,
        "downscale": downscale,
        "train_steps": steps,
        "predict_tiles": count,
        "train": {
            "reference": in_subprocess(bench_train, pairs, reference, steps, False),
            "fast": in_subprocess(bench_train, pairs, fast, steps, True),
        },
        "predict": {
            "reference": in_subprocess(
                bench_predict_reference, tiles, width, args.device, tmp / f"ref_{name}", False, encoder, downscale
            ),
            "fast": in_subprocess(
                bench_predict_fast,
                tiles,
                width,
                args.device,
                tmp / f"fast_{name}",
                args.workers,
                "auto",
                encoder,
                downscale,
            ),
        },
    }


def measure_training(args: argparse.Namespace, pairs: list[tuple[Path, Path]], case: dict[str, Any]) -> dict[str, Any]:
    """Training tiles/s: the reference loop and the fast path (the U-Net's case at --width), and the reference
    with reuse_memory alone."""
    reference = reference_settings(Network(args.width), args.device)
    steps = case["train_steps"]
    return {
        **case["train"],
        "reference_reuse_memory": in_subprocess(bench_train, pairs, {**reference, "reuse_memory": True}, steps, False),
    }


def measure_backends(args: argparse.Namespace, images: list[Path], tmp: Path, count: int) -> dict[str, Any]:
    """Prediction tiles/s of predict.py's loop by backend and precision: PyTorch in float32 (the fast path with
    ``--amp=off``) and, on a CPU, onnxruntime in float32 and 8 bits (predict.py ``--backend=onnx``)."""
    tiles = repeated(images, count)
    found = {
        "torch_float32": in_subprocess(
            bench_predict_fast, tiles, args.width, args.device, tmp / "f32", args.workers, "off"
        )
    }
    if select_device(args.device).type == "cpu":  # the onnxruntime package in requirements.txt runs on CPUs
        models = in_subprocess(export_bench_models, args.width, tmp, images[:8])
        for name, path in models.items():
            found[f"onnx_{name}"] = in_subprocess(bench_predict_onnx, tiles, path, tmp / f"onnx_{name}", args.workers)
    return found


def measure_prediction(args: argparse.Namespace, images: list[Path], tmp: Path, case: dict[str, Any]) -> dict[str, Any]:
    """Prediction tiles/s: the reference loop and predict.py's loop (the U-Net's case at --width), the reference
    with reuse_memory alone, predict.py's loop with a network that costs nothing (the reading and writing
    ceiling), and predict.py's loop by backend and precision (measure_backends)."""
    tiles = repeated(images, case["predict_tiles"])
    return {
        "backends": measure_backends(args, images, tmp, case["predict_tiles"]),
        **case["predict"],
        "reference_reuse_memory": in_subprocess(
            bench_predict_reference, tiles, args.width, args.device, tmp / "ref_memory", True
        ),
        "loop_without_network": in_subprocess(
            bench_predict_loop, repeated(images, args.loop_tiles), args.device, tmp / "loop", args.workers
        ),
    }


def add_case_ratios(results: dict[str, Any]) -> None:
    """The fast path's speed-up over the reference in training and prediction, for every network measured."""
    for case in results.get("cases", []):
        for key in ("train", "predict"):
            case[key]["speedup"] = case[key]["fast"]["tiles_per_s"] / case[key]["reference"]["tiles_per_s"]


def add_ratios(results: dict[str, Any], flops: float) -> None:
    """Speed-ups against the reference, TFLOP/s and the share of the matrix-product peak of each variant."""
    for key in ("train", "predict"):
        pair = results[key]
        pair["speedup"] = pair["fast"]["tiles_per_s"] / pair["reference"]["tiles_per_s"]
        pair["speedup_reuse_memory_alone"] = (
            pair["reference_reuse_memory"]["tiles_per_s"] / pair["reference"]["tiles_per_s"]
        )
        passes = 3 if key == "train" else 1  # a training step is about a forward and a twice-as-costly backward
        for variant in ("reference", "fast", "reference_reuse_memory"):
            pair[variant]["tflop_per_s"] = pair[variant]["tiles_per_s"] * flops * passes / 1e12
            # The fast path against the peak of the precision it ran in (chosen where timed, the old rule's before).
            dtype = pair[variant].get("precision", results["fast_dtype"]) if variant == "fast" else "float32"
            pair[variant]["fraction_of_matmul_peak"] = (
                pair[variant]["tflop_per_s"] / results["matmul_peak_tflop_per_s"][dtype]
            )
    add_case_ratios(results)
    metrics = results["metrics"]
    metrics["speedup"] = metrics["reference_s_per_image"] / metrics["fast_s_per_image"]
    backends = results["predict"]["backends"]
    backends[f"torch_{results['fast_dtype']}"] = results["predict"]["fast"]
    for found in backends.values():
        found["vs_fast"] = found["tiles_per_s"] / results["predict"]["fast"]["tiles_per_s"]
    results["predict"]["fastest_backend"] = max(backends, key=lambda name: backends[name]["tiles_per_s"])


def main(argv: Sequence[str] | None = None) -> int:
    """Run every measurement, print the table and write the JSON."""
    args = parse_arguments(argv)
    info = machine()
    flops = forward_flops(args.width, args.tile)
    results = _start_results(args, info, flops)
    networks = _networks_measured(args)
    full_flops = forward_flops(FULL_WIDTH, args.tile)
    network_flops = {n: forward_flops(n.width, args.tile, n.encoder, n.downscale) for n in networks}
    sizes = {network: case_sizes(args, network_flops[network], full_flops) for network in networks}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        images, pairs = _generate_tiles(args, tmp, sizes)
        _measure_matmul_peaks(args, results)
        results["cases"] = []
        for network in networks:
            print(f"{network_label(network)}: training and prediction, reference and fast ...", flush=True)
            case = measure_case(args, pairs, tmp, network, sizes[network])
            results["cases"].append({**case, "forward_gflop_per_tile": network_flops[network] / 1e9})
            add_case_ratios(results)
            write_results(args.out, results)  # row by row: a run stopped part-way keeps the rows it finished
        if args.cases_only:
            print(cases_markdown(results))
            print(f"written to {args.out} and {args.out.with_suffix('.md')}")
            return 0
        _measure_one_off_rows(args, results, images, pairs, tmp)
    add_ratios(results, flops)
    print_table(results)
    write_results(args.out, results)
    print(f"written to {args.out} (the table by network also to {args.out.with_suffix('.md')})")
    return 0


def _start_results(args: argparse.Namespace, info: dict[str, Any], flops: int) -> dict[str, Any]:
    """Print the machine and the cost per tile of the U-Net the one-off rows measure (with ``--cases_only``, the
    cases instead); the results' first fields, which say what was measured."""
    print(f"{info['cpu']} ({info['cpu_cores']} cores), GPU: {info['gpu']}, torch {info['torch']}")
    if args.cases_only:
        print(
            f"widths {','.join(map(str, args.widths))}, encoders {','.join(args.encoders)}, downscales "
            f"{','.join(map(str, args.downscales))}, {args.tile}x{args.tile} tiles"
        )
    else:
        print(f"U-Net width {args.width}, {args.tile}x{args.tile} tiles: {flops / 1e9:.1f} GFLOP per tile forward")
    return {
        "machine": info,
        "width": args.width,
        "tile": args.tile,
        "forward_gflop_per_tile": flops / 1e9,
        "widths": args.widths,
        "encoders": args.encoders,
        "downscales": args.downscales,
        "device": select_device(args.device).type,
    }


def _networks_measured(args: argparse.Namespace) -> list[Network]:
    """Every network asked for, and the U-Net at --width and full resolution, whose case the one-off rows go with."""
    networks = [Network(w, e, d) for w in args.widths for e in args.encoders for d in args.downscales]
    if not args.cases_only:
        networks += [] if Network(args.width) in networks else [Network(args.width)]
    return networks


def _generate_tiles(
    args: argparse.Namespace, tmp: Path, sizes: dict[Network, tuple[int, int]]
) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """The generated tiles and their (image, mask) pairs: enough for the largest batch, case and scoring."""
    n_tiles = max(
        min(max(count for _, count in sizes.values()), 256),  # predicted over again when more are asked for
        args.metric_images,
        max(args.fast_batch, REFERENCE_BATCH) * (max(steps for steps, _ in sizes.values()) + 1),
    )
    images = generate_dataset(tmp / "data", n_tiles, args.tile, seed=0)
    pairs = [(p, tmp / "data" / "labels" / f"{p.stem}_mask.png") for p in images]
    return images, pairs


def _measure_matmul_peaks(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """The matrix-product peak in float32 and in the fast path's precision, which the FLOP/s are set against."""
    print("matrix-product peak ...", flush=True)
    fast_dtype = str(resolve_amp("auto", select_device(args.device)) or torch.float32).removeprefix("torch.")
    results["matmul_peak_tflop_per_s"] = in_subprocess(matmul_peaks, args.device, sorted({"float32", fast_dtype}))
    results["fast_dtype"] = fast_dtype


def _measure_one_off_rows(
    args: argparse.Namespace, results: dict[str, Any], images: list[Path], pairs: list[tuple[Path, Path]], tmp: Path
) -> None:
    """The rows measured once, on the U-Net at --width: training, prediction, scoring and the scene."""
    primary = next(c for c in results["cases"] if case_network(c) == Network(args.width))
    print("training, one-off rows ...", flush=True)
    results["train"] = measure_training(args, pairs, primary)
    print("prediction, one-off rows ...", flush=True)
    results["predict"] = measure_prediction(args, images, tmp, primary)
    print("metrics ...", flush=True)
    scored = pairs[: min(args.metric_images, primary["predict_tiles"])]
    masks = tmp / f"ref_{case_folder(Network(args.width))}"  # the reference's masks of the U-Net at --width
    results["metrics"] = bench_metrics([(p.stem, m, masks / f"{p.stem}_seg.png") for p, m in scored])
    print("scene ...", flush=True)
    checkpoint = random_checkpoint(args.width, tmp)
    settings = {"window": Config.window, "overlap": Config.overlap, "device": args.device}
    results["scene"] = measure_scene(args.scene_size, checkpoint, tmp, settings)


def write_results(out: Path, results: dict[str, Any]) -> None:
    """The JSON, and the table by network as Markdown beside it, each written atomically."""
    files.atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    files.atomic_write_text(out.with_suffix(".md"), cases_markdown(results))


def path_label(found: dict[str, Any]) -> str:
    """The precision and layout a fast measurement ran in, 'bf16 channels-last'; '(untimed)' where fast_path.py
    did not time the candidates (a forced amp, CUDA, a tiny network)."""
    choice = found["choice"]
    precision = {"bfloat16": "bf16", "float16": "fp16"}.get(choice["precision"], "fp32")
    label = f"{precision} {choice['layout'].replace('_', '-')}"
    return label if choice["why"] == "measured" else f"{label} (untimed)"


CASE_COLUMNS = ["width", "encoder", "downscale", "GFLOP/tile"]
CASE_COLUMNS += ["training tiles/s: reference", "fast", "ratio", "fast path"]
CASE_COLUMNS += ["prediction tiles/s: reference", "fast", "ratio", "fast path"]


def case_folder(network: Network) -> str:
    """The name of a network's folders of predicted masks: 'unet_16_1'."""
    return f"{network.encoder}_{network.width}_{network.downscale}"


def network_label(network: Network) -> str:
    """'unet width 16', with ', half resolution' (or quarter) where the network works on shrunk tiles."""
    shrunk = {1: "", 2: ", half resolution", 4: ", quarter resolution"}[network.downscale]
    return f"{network.encoder} width {network.width}{shrunk}"


def case_network(case: dict[str, Any]) -> Network:
    """The network a measured case is of (cases written before downscale was measured are at full resolution)."""
    return Network(case["width"], case["encoder"], case.get("downscale", 1))


def cases_markdown(results: dict[str, Any]) -> str:
    """The table by network (Markdown): width, encoder, downscale, forward GFLOP per tile, and for training and
    prediction the reference's and the fast path's tiles/s, their ratio and the precision and layout the fast path
    chose."""
    info = results["machine"]
    gpu = f", {info['gpu']}" if info.get("gpu") and results.get("device") == "cuda" else ""
    tile = results["tile"]
    lines = [
        f"{info['cpu']}, {info['cpu_cores']} cores{gpu}, torch {info['torch']}; {tile}x{tile} tiles",
        "",
        "| " + " | ".join(CASE_COLUMNS) + " |",
        "|" + "---|" * len(CASE_COLUMNS),
    ]
    for case in results["cases"]:
        cells = [*map(str, case_network(case)), f"{case['forward_gflop_per_tile']:.1f}"]
        for key in ("train", "predict"):
            pair = case[key]
            rates = [f"{pair[variant]['tiles_per_s']:.2f}" for variant in ("reference", "fast")]
            cells += [*rates, f"{pair['speedup']:.2f}x", path_label(pair["fast"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_table(results: dict[str, Any]) -> None:
    """Print the measurements as a table: reference, fast, ratio."""
    rows = []
    for key, label in (("train", "training"), ("predict", "prediction")):
        rows += _pair_rows(results, key, label)
    metrics = results["metrics"]
    rows.append(
        (
            "IoU scoring ms per image",
            f"{metrics['reference_s_per_image'] * 1e3:.2f}",
            f"{metrics['fast_s_per_image'] * 1e3:.2f}",
            f"{metrics['speedup']:.0f}x",
        )
    )
    peaks = ", ".join(f"{name} {value:.3f}" for name, value in results["matmul_peak_tflop_per_s"].items())
    print(f"\nmatrix-product peak, TFLOP/s: {peaks} (fast path in {results['fast_dtype']}, reference in float32)")
    scene = results["scene"]
    rows.append((f"scene {scene['size']}x{scene['size']}, MP/s", "", f"{scene['megapixels_per_s']:.2f}", ""))
    print(f"\n{'':28} {'reference':>12} {'fast':>12} {'ratio':>8}")
    for name, ref, fast, ratio in rows:
        print(f"{name:28} {ref:>12} {fast:>12} {ratio:>8}")
    _print_fastest_backend(results)
    if results.get("cases"):
        print(f"\nby network:\n\n{cases_markdown(results)}")


def _pair_rows(results: dict[str, Any], key: str, label: str) -> list[tuple[str, str, str, str]]:
    """Table rows of training's or prediction's measurements, from tiles/s down to peak memory."""
    pair = results[key]
    ref, fast = pair["reference"], pair["fast"]
    rows = [(f"{label} tiles/s", f"{ref['tiles_per_s']:.2f}", f"{fast['tiles_per_s']:.2f}", f"{pair['speedup']:.2f}x")]
    alone = pair["reference_reuse_memory"]
    rows.append(
        ("  reference + reuse_memory", f"{alone['tiles_per_s']:.2f}", "", f"{pair['speedup_reuse_memory_alone']:.2f}x")
    )
    if key == "predict":
        loop = pair["loop_without_network"]
        rows.append(("  loop without the network", "", f"{loop['tiles_per_s']:.0f}", ""))
        rows += backend_rows(results)
    rows.append((f"{label} TFLOP/s", f"{ref['tflop_per_s']:.3f}", f"{fast['tflop_per_s']:.3f}", ""))
    rows.append(
        (
            "  of the matmul peak",
            f"{ref['fraction_of_matmul_peak']:.0%}",
            f"{fast['fraction_of_matmul_peak']:.0%}",
            "",
        )
    )
    rows.append(
        (f"{label} peak memory MiB", f"{ref['peak_bytes'] / 2**20:.0f}", f"{fast['peak_bytes'] / 2**20:.0f}", "")
    )
    return rows


def _print_fastest_backend(results: dict[str, Any]) -> None:
    """Print the fastest way to predict here, and the predict.py options that select it."""
    fastest = results["predict"]["fastest_backend"]
    choice = "--backend=onnx" + (" --onnx_model=RUN/export/farmland_int8.onnx" if fastest == "onnx_int8" else "")
    advice = f"predict.py {choice} (export_onnx.py first)" if fastest.startswith("onnx") else "the default (torch)"
    print(f"\nfastest prediction here: {fastest}; to use it: {advice}")


def backend_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Table rows of prediction tiles/s by backend and precision, with each rate over the fast path's."""
    labels = {
        "torch_float32": "PyTorch float32",
        "onnx_float32": "onnxruntime float32",
        "onnx_int8": "onnxruntime int8",
    }
    rows = []
    for name, found in results["predict"]["backends"].items():
        if name in labels:  # the fast path's own precision is the row above
            rows.append((f"  {labels[name]}", "", f"{found['tiles_per_s']:.2f}", f"{found['vs_fast']:.2f}x"))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
