"""predict.py's tile loop: batches read by workers, 8-bit tiles scaled on the device, outputs written by
background threads. The results must be those of the plain float path, bit for bit."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import close_log_files, write_pair

import figures
import files
import predict
import runtime
import tile_prediction
from config import Config
from data_preprocess import image_to_float, read_image, shown_channels, write_image
from files import DataError
from inference import inference_model, network_logits, overlay_image, predict_batch
from net_structure import build_model
from tile_prediction import BackgroundWriter, ImageBatches, ImageFiles


def small_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = build_model(3, 2, 4, 0.0).eval()
    return {"model": model.state_dict(), "config": {"in_channels": 3, "n_classes": 2, "base_width": 4, "dropout": 0.0}}


def test_eight_bit_tiles_travel_as_uint8_and_give_the_float_path_s_logits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    path, _ = write_pair(tmp_path, "a", image, np.zeros((32, 40), np.uint8))
    sixteen = tmp_path / "b.tif"
    write_image(sixteen, (image.astype(np.uint16) * 257))
    files = ImageFiles([path, sixteen], 3)
    (_, eight_bit), (_, sixteen_bit) = files[0], files[1]
    assert eight_bit.dtype == torch.uint8 and eight_bit.shape == (3, 32, 40)
    assert sixteen_bit.dtype == torch.float32  # other depths are scaled in the reading worker, as before
    as_float = torch.from_numpy(image_to_float(read_image(path), 3, path))
    model = inference_model(small_state(), torch.device("cpu"), channels_last=True, amp=None)
    cpu = torch.device("cpu")
    # x / 255 in float32 on either side: the same inputs, so the same logits to the last bit.
    assert torch.equal(network_logits(model, eight_bit[None], cpu), network_logits(model, as_float[None], cpu))
    assert torch.equal(network_logits(model, sixteen_bit[None], cpu), network_logits(model, as_float[None], cpu))


def test_overlay_is_the_same_from_uint8_and_from_float() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    mask = (rng.random((8, 8)) > 0.5).astype(np.uint8)
    assert np.array_equal(overlay_image(image, mask), overlay_image(image.astype(np.float32) / 255.0, mask))


def test_rgb_bands_name_the_bands_that_figures_and_overlays_show() -> None:
    gf2 = np.dstack([np.full((4, 5), v, np.uint8) for v in (10, 20, 30, 40)])  # B, G, R, NIR; constant bands
    path = Path("gf2.tif")
    assert shown_channels("3,2,1", (), 4) == (2, 1, 0) and shown_channels("", (), 4) == ()
    assert figures.photo_to_show(gf2, path)[0, 0].tolist() == pytest.approx([10 / 255, 20 / 255, 30 / 255])
    true_colour = figures.photo_to_show(gf2, path, (), shown_channels("3,2,1", (), 4))
    assert true_colour[0, 0].tolist() == pytest.approx([30 / 255, 20 / 255, 10 / 255])
    # Of the bands the network reads (4, 3, 2: NIR, R, G), band 3 as red, 2 as green and 4 as blue.
    picked = figures.photo_to_show(gf2, path, (4, 3, 2), shown_channels("3,2,4", (4, 3, 2), 3))
    assert picked[0, 0].tolist() == pytest.approx([30 / 255, 20 / 255, 40 / 255])
    assert np.allclose(figures.photo_to_show(gf2, path, (), (3,)), np.full((4, 5), 40 / 255))  # one band: grey
    blank = np.zeros((4, 5), np.uint8)
    assert overlay_image(gf2.transpose(2, 0, 1), blank, (2, 1, 0))[0, 0].tolist() == [30, 20, 10]
    assert overlay_image(gf2.transpose(2, 0, 1), blank, (3,))[0, 0].tolist() == [40, 40, 40]
    with pytest.raises(ValueError, match="--rgb_bands=3,2: expected three bands"):
        shown_channels("3,2", (), 4)
    with pytest.raises(ValueError, match=r"it reads 1,2,3,4 of the file; .*--rgb_bands=3,2,1 \(red, green, blue"):
        shown_channels("5,2,1", (), 4)
    with pytest.raises(
        ValueError, match=r"it reads 4,3,2 of the file \(--bands=4,3,2\).* for example --rgb_bands=4,3,2$"
    ):
        shown_channels("1,2,3", (4, 3, 2), 3)


def test_image_batches_stack_runs_of_one_size_and_type_and_pass_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    paths = []
    for stem, size in (("a", 32), ("b", 32), ("c", 48), ("d", 48), ("e", 48)):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        paths.append(write_pair(tmp_path, stem, image, np.zeros((size, size), np.uint8))[0])
    broken = tmp_path / "images" / "f.png"
    broken.write_bytes(b"not a png")
    paths.insert(3, broken)  # a, b, c, f (unreadable), d, e
    batches = ImageBatches(ImageFiles(paths, 3), batch_size=4)
    assert len(batches) == 2
    first, second = batches[0], batches[1]
    assert [(indices, None if images is None else tuple(images.shape)) for indices, images, _ in first] == [
        ([0, 1], (2, 3, 32, 32)),
        ([3], None),  # an error is passed on as soon as it is met
        ([2], (1, 3, 48, 48)),
    ]
    assert "f.png" in first[1][2]
    assert [(indices, tuple(images.shape)) for indices, images, _ in second] == [([4, 5], (2, 3, 48, 48))]
    assert torch.equal(first[0][1][1], ImageFiles(paths, 3)[1][1])


def test_batches_are_sized_by_the_first_readable_image(tmp_path: Path) -> None:
    broken = []
    for stem in "ab":
        broken.append(tmp_path / f"{stem}.png")
        broken[-1].write_bytes(b"not a png")
    image = np.random.default_rng(3).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    good = write_pair(tmp_path, "c", image, np.zeros((40, 24), np.uint8))[0]
    first = tile_prediction.first_readable(ImageFiles([*broken, good], 3))
    assert first is not None and tuple(first.shape) == (3, 40, 24)
    assert tile_prediction.first_readable(ImageFiles(broken, 3)) is None
    holed = tmp_path / "holed.tif"  # a float tile with NaN pixels: refused by name, as split_dataset.py does
    write_image(holed, np.where(np.arange(40)[:, None, None] < 4, np.nan, 0.5) * np.ones((40, 24, 3), np.float32))
    _, error = ImageFiles([holed], 3)[0]
    assert isinstance(error, str) and error.startswith(f"{holed}: floating-point image with NaN pixels")
    assert tile_prediction.first_readable(ImageFiles([], 3)) is None


def test_background_writer_runs_every_job_and_raises_the_first_failure(tmp_path: Path) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def job(value: int) -> None:
        with lock:
            seen.append(value)

    with BackgroundWriter(threads=3, pending=2) as writer:
        for value in range(50):
            writer.submit(job, value)
    assert sorted(seen) == list(range(50))

    def fail(value: int) -> None:
        raise DataError(f"cannot write {value}")

    with pytest.raises(DataError, match="cannot write 7"):
        with BackgroundWriter(threads=2) as writer:
            writer.submit(job, 100)
            writer.submit(fail, 7)
    # When the loop itself fails, its error is the one raised, not a writer's.
    release = threading.Event()

    def fail_later(value: int) -> None:
        release.wait(10)
        fail(value)

    with pytest.raises(RuntimeError, match="out of memory"):
        with BackgroundWriter(threads=2) as writer:
            writer.submit(fail_later, 9)
            release.set()
            raise RuntimeError("out of memory")
    inline = BackgroundWriter(threads=0)
    with pytest.raises(DataError, match="cannot write 8"):
        inline.submit(fail, 8)  # no threads: the job runs, and fails, at once
    inline.close()


def test_files_written_from_threads_get_the_process_permissions(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        with BackgroundWriter(threads=4) as writer:
            for i in range(40):
                writer.submit(files.atomic_write_text, tmp_path / f"{i}.txt", "x")
        assert os.umask(0o027) == 0o027  # the mask is as it was
        assert {(tmp_path / f"{i}.txt").stat().st_mode & 0o777 for i in range(40)} == {0o640}
    finally:
        os.umask(previous)


def test_predict_batch_on_uint8_tiles_equals_the_float_tiles(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    model = inference_model(small_state(4), torch.device("cpu"), channels_last=True, amp=torch.bfloat16)
    cpu = torch.device("cpu")
    as_float = torch.from_numpy(images.astype(np.float32) / 255.0)
    for threshold in (None, 0.4):
        expected = predict_batch(model, as_float, cpu, threshold=threshold)
        assert np.array_equal(predict_batch(model, torch.from_numpy(images), cpu, threshold=threshold), expected)


def speckled_mask() -> np.ndarray:
    """32 x 32: a 12 x 12 field of 144 pixels with a 2 x 2 hole, a 3 x 3 speck, and a 5 x 4 piece at the edge."""
    mask = np.zeros((32, 32), np.uint8)
    mask[4:16, 4:16] = 1
    mask[9:11, 9:11] = 0  # the hole: 4 pixels
    mask[24:27, 6:9] = 1  # the speck: 9 pixels
    mask[27:32, 28:32] = 1  # the piece at the corner: 20 pixels
    return mask


def test_tile_masks_lose_pieces_and_holes_under_sieve_cells_of_the_working_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert tile_prediction.sieve_pixels(16, {"downscale": 4}) == 256  # 16 cells of 4 x 4 tile pixels
    assert tile_prediction.sieve_pixels(16, {"downscale": 2}) == 64
    assert tile_prediction.sieve_pixels(16, {}) == 16  # checkpoints before downscale: full resolution
    assert tile_prediction.sieve_pixels(0, {"downscale": 2}) == 0
    with pytest.raises(ValueError, match=r"--sieve_cells=-1: expected a number of working pixels, or 0"):
        tile_prediction.sieve_pixels(-1, {})
    rng = np.random.default_rng(5)
    paths = [write_pair(tmp_path, "a", rng.integers(0, 256, (32, 32, 3), np.uint8), speckled_mask())[0]]
    drawn = speckled_mask()
    monkeypatch.setattr(tile_prediction, "predict_batch", lambda *_, **__: drawn[None])
    state = small_state()
    cpu = torch.device("cpu")
    model = inference_model(state, cpu, channels_last=False, amp=None)
    written = {}
    for cells in (0, 16, 21):
        output = tmp_path / str(cells) / "a_seg.png"
        cfg = dataclasses.replace(Config(), num_workers=0, overlay=False, sieve_cells=cells)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=tile_prediction.LOG.name):
            assert tile_prediction.predict_tiles(model, paths, [output], cfg, state, Path("w"), cpu, None) == (1, 0)
        written[cells] = read_image(output)[..., 0]
        said = f"pieces and holes under {cells} pixels sieved (--sieve_cells={cells})"
        assert (said in caplog.text) == (cells > 0)
    assert np.array_equal(written[0], drawn * 255)  # off: the mask as drawn
    sieved = drawn.copy()
    sieved[9:11, 9:11] = 1  # the hole filled
    sieved[24:27, 6:9] = 0  # the speck gone; the 20-pixel piece stays, at the tile's edge as anywhere
    assert np.array_equal(written[16], sieved * 255)
    sieved[27:32, 28:32] = 0  # under 21 pixels it goes too
    assert np.array_equal(written[21], sieved * 255)
    # A network at half resolution: 4 cells of 2 x 2 tile pixels sieve as 16 pixels do; the overlay shows the
    # sieved mask.
    halved = {**state, "config": {**state["config"], "downscale": 2}}
    output = tmp_path / "half" / "a_seg.png"
    cfg = dataclasses.replace(Config(), num_workers=0, overlay=True, sieve_cells=4)
    assert tile_prediction.predict_tiles(model, paths, [output], cfg, halved, Path("w"), cpu, None) == (1, 0)
    assert np.array_equal(read_image(output)[..., 0], written[16])
    photo = read_image(paths[0]).transpose(2, 0, 1)
    overlay = read_image(tile_prediction.overlay_path(output))
    assert np.array_equal(overlay, overlay_image(photo, written[16] // 255))


def test_a_tile_smaller_than_the_sieve_keeps_its_one_class_and_its_large_pieces() -> None:
    # 12 x 12 pixels at a quarter resolution: 16 cells are 256 pixels, more than the tile.
    empty, full = np.zeros((12, 12), np.uint8), np.ones((12, 12), np.uint8)
    minimum = tile_prediction.sieve_pixels(16, {"downscale": 4})
    assert np.array_equal(tile_prediction.sieve_tile(empty, minimum), empty)
    assert np.array_equal(tile_prediction.sieve_tile(full, minimum), full)
    halves = np.zeros((12, 12), np.uint8)
    halves[:, :6] = 1
    halves[2, 9] = 1  # a speck of 1 pixel; the cap is 144 // 16 = 9 pixels
    kept = halves.copy()
    kept[2, 9] = 0
    assert np.array_equal(tile_prediction.sieve_tile(halves, minimum), kept)


def edit_in_place_keeping_time(path: Path, data: bytes) -> None:
    """Overwrite a file with ``data`` of its own size, then set its old times back (touch -r)."""
    was = path.stat()
    assert len(data) == was.st_size and data != path.read_bytes()
    with open(path, "r+b") as handle:
        handle.write(data)
    os.utime(path, ns=(was.st_atime_ns, was.st_mtime_ns))


def test_a_tile_edited_in_place_with_its_old_time_set_back_is_predicted_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import predict

    image, _ = write_pair(tmp_path / "data", "a", np.full((16, 16, 3), 90, np.uint8), np.zeros((16, 16), np.uint8))
    checkpoint = tmp_path / "best.pth"
    checkpoint.write_bytes(b"weights")
    os.utime(checkpoint, (1, 1))
    mask = tmp_path / "predictions" / "a_seg.png"
    write_image(mask, np.zeros((16, 16), np.uint8), tile_prediction.source_texts(image))
    assert tile_prediction.is_complete(mask, image, checkpoint, overlay=False)
    edit_in_place_keeping_time(image, bytes(255 - b for b in image.read_bytes()))  # same size, same time
    assert files.file_stamp(image) == tile_prediction.source_texts(image)[tile_prediction.STAMP_KEY]
    assert not tile_prediction.is_complete(mask, image, checkpoint, overlay=False)
    cfg = dataclasses.replace(Config(), overlay=False)
    caplog.set_level(logging.INFO, logger="predict")
    assert predict.unfinished([predict.Job(image, mask, False)], cfg, checkpoint) == [predict.Job(image, mask, False)]
    assert "1 image(s) have masks made before the model, the settings or the image file last changed" in caplog.text
    assert "and are predicted again: a_seg.png" in caplog.text


def test_a_tile_of_fewer_bands_than_the_network_is_not_told_to_choose_among_them(tmp_path: Path) -> None:
    # --bands=1,2,3 on a 2-band tile said "choose band numbers from 1 to 2", which no choice of 3 bands can follow.
    two = tmp_path / "two.tif"
    write_image(two, np.full((32, 32, 2), 90, np.uint8))
    _, error = ImageFiles([two], 3, (1, 2, 3))[0]
    assert isinstance(error, str) and error.startswith(f"{two}: --bands=1,2,3 asks for band 3, but the image has 2")
    assert "no choice of them makes the 3 the model was trained on" in error and "from 1 to 2" not in error
    _, error = ImageFiles([two], 2, (1, 3))[0]  # a choice that fits the network stays the fix
    assert isinstance(error, str) and error.endswith("choose band numbers from 1 to 2")


def mapped_afresh(size: int) -> bool:
    """Whether glibc gives a block of ``size`` bytes, asked for twice (freed between), a fresh mapping the second
    time (the IS_MMAPPED bit of its chunk header), as it does for every block above a threshold fixed by mallopt."""
    libc = runtime.glibc()
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = (
        ctypes.c_void_p,
        [ctypes.c_size_t],
        [ctypes.c_void_p],
    )
    for _ in range(2):
        block = libc.malloc(size)
        mapped = bool(ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value & 2)
        libc.free(block)
    return mapped


@pytest.mark.skipif(runtime.glibc() is None, reason="the allocator setting is glibc's")
@pytest.mark.parametrize("way", ["reuse_memory true, then false", "fields of a scene with reuse_memory false"])
def test_glibc_reuses_freed_blocks_after_freed_memory_was_handed_back(way: str) -> None:
    # mallopt turns glibc's rising mmap threshold off: its starting 128 KiB set by hand mapped every larger block
    # afresh on each pass for the rest of the process (1 MiB blocks took 30 times as long).
    if way.startswith("reuse_memory"):
        runtime.apply_reuse_memory(True)
        runtime.apply_reuse_memory(False)
    else:
        runtime.apply_reuse_memory(False)
        with runtime.handing_back_freed_memory():
            pass
    assert not runtime.MEMORY_SETTING["kept"]
    assert not mapped_afresh(2**20)


@pytest.mark.skipif(runtime.glibc() is None, reason="the allocator setting is glibc's")
def test_reuse_memory_false_after_a_run_that_kept_freed_memory_hands_it_back(
    shared_square_data: Path, run_copy: Path
) -> None:
    # Two predictions in one process (a notebook): the second's --reuse_memory=false is applied, not the first's true.
    settings = [f"--data_dir={shared_square_data}", f"--run_dir={run_copy}", "--num_workers=0", "--skip_existing=false"]
    try:
        assert predict.main(settings) == 0
        assert runtime.MEMORY_SETTING["kept"]
        assert predict.main([*settings, "--reuse_memory=false"]) == 0
        assert not runtime.MEMORY_SETTING["kept"]
    finally:
        close_log_files()
