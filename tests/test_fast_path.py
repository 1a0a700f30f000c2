"""fast_path.py: the candidates, the choice among stand-ins of known cost (timings injected, never the machine's),
forced settings that time nothing, and the choice carried into training, prediction, resume and torchrun."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from conftest import args
from torch import nn

import bench
import fast_path
import split_dataset
import train
from config import Config
from demo_data import generate_dataset
from fast_path import Candidate, choose
from inference import inference_model, predict_batch
from net_structure import build_model
from runtime import load_checkpoint, save_checkpoint
from tile_prediction import predict_tiles

CPU = torch.device("cpu")
BF16_CL, BF16, FP32_CL, FP32 = (
    Candidate(torch.bfloat16, True),
    Candidate(torch.bfloat16, False),
    Candidate(None, True),
    Candidate(None, False),
)
ALL = [BF16_CL, BF16, FP32_CL, FP32]


def stand_in(seconds: dict[Candidate, float], calls: list[Candidate] | None = None) -> Callable[[Candidate], float]:
    """A step of known cost: reports ``seconds[candidate]`` without running anything, and records the call."""

    def step(candidate: Candidate) -> float:
        if calls is not None:
            calls.append(candidate)
        return seconds[candidate]

    return step


def test_the_candidates_in_order_of_preference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_path, "cpu_has_fast_bf16", lambda: True)
    assert fast_path.candidates("auto", True, CPU) == ALL  # the old rule (bf16 channels-last) first
    assert fast_path.candidates("auto", False, CPU) == [BF16, FP32]  # channels_last=false: contiguous only
    monkeypatch.setattr(fast_path, "cpu_has_fast_bf16", lambda: False)
    assert fast_path.candidates("auto", True, CPU) == [FP32_CL, FP32]  # emulated bf16 is never a candidate
    # A forced precision is one candidate: nothing to time.
    assert fast_path.candidates("bf16", True, CPU) == [BF16_CL]
    assert fast_path.candidates("off", False, CPU) == [FP32]
    assert [str(c) for c in ALL] == ["bf16 channels-last", "bf16 contiguous", "fp32 channels-last", "fp32 contiguous"]
    assert [c.amp_key for c in ALL] == ["bf16", "bf16", "off", "off"]


def test_the_chooser_takes_the_fastest_stand_in() -> None:
    seconds = {BF16_CL: 0.30, BF16: 0.25, FP32_CL: 0.20, FP32: 0.26}
    choice = choose(ALL, stand_in(seconds))
    assert choice.candidate == FP32_CL and choice.measured and choice.why == "measured"
    assert choice.step_s == seconds and choice.screen_s == seconds
    # The log line names the choice and the others' seconds per step.
    assert choice.summary("step").startswith("fast path: fp32 channels-last, 0.2 s/step against bf16 channels-last 0.3")


def test_a_near_tie_keeps_the_earlier_candidate() -> None:
    # 2 % faster is within TIE (3 %): the old rule's candidate stays; 5 % faster displaces it.
    assert choose(ALL[:2], stand_in({BF16_CL: 0.100, BF16: 0.098})).candidate == BF16_CL
    assert choose(ALL[:2], stand_in({BF16_CL: 0.100, BF16: 0.095})).candidate == BF16


def test_slow_candidates_are_screened_out_and_steps_timed_within_the_budget() -> None:
    # The screening pass (a forward pass) runs twice per candidate: warm-up, then timed; but not the second time
    # where the warm-up alone took over twice the fastest so far. A candidate over PRUNE times the fastest is
    # then left out, and steps run in rounds over the others.
    screened: list[Candidate] = []
    stepped: list[Candidate] = []
    forward = {BF16_CL: 0.10, BF16: 0.12, FP32_CL: 0.14, FP32: 0.40}
    steps = {BF16_CL: 0.30, BF16: 0.28, FP32_CL: 0.50}
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0  # each look at the clock: a second later
        return now[0]

    released: list[Candidate] = []
    choice = choose(
        ALL, stand_in(steps, stepped), stand_in(forward, screened), budget_s=3.0, clock=clock, release=released.append
    )
    assert screened == [BF16_CL, BF16_CL, BF16, BF16, FP32_CL, FP32_CL, FP32]
    assert FP32 not in stepped and released == [FP32]  # 4x the fastest forward pass: never stepped, its copy freed
    # Two rounds at least (the first warms the backward pass up), then more while the clock reads within the
    # budget: 1 s after the first round began, then 2 s, then 3 s, no longer within it. Then bf16 contiguous,
    # the fastest, leaves the old rule: it and the old rule's candidate are stepped twice more, in turn.
    assert stepped == [BF16_CL, BF16, FP32_CL] * 4 + [BF16_CL, BF16] * 2
    assert choice.candidate == BF16 and set(choice.step_s) == {BF16_CL, BF16, FP32_CL}
    assert "left out after a forward pass over 1.5x the fastest's: fp32 contiguous (4.0x)" in choice.summary("s")


def test_a_switch_from_the_old_rule_must_hold_when_timed_again() -> None:
    # The old rule's candidate met a burst of other work on its timed pass (1.0 s instead of 0.1 s), which left it
    # out; timed again before the switch, it is the fastest after all.
    passes = {c: iter([0.3] * 9) for c in ALL[1:]}
    passes[BF16_CL] = iter([0.12, 1.0, 0.1, 0.1])  # warm-up, timed (the burst), then the two passes again
    choice = choose(ALL, lambda candidate: next(passes[candidate]))
    assert choice.candidate == BF16_CL
    # Left out before the steps, it has only its passes to show: the log line reports those.
    assert BF16_CL not in choice.step_s
    assert choice.summary("step").startswith("fast path: bf16 channels-last, forward pass 0.1 s against")


def test_steps_too_long_for_the_budget_leave_the_choice_to_the_screening_passes() -> None:
    # Two rounds of steps of three times 0.30 + 0.35 s would take 3.9 s, over the budget of 2 s: none is run.
    stepped: list[Candidate] = []
    forward = {BF16_CL: 0.35, BF16: 0.30, FP32_CL: 1.2, FP32: 1.5}
    choice = choose(ALL, stand_in({}, stepped), stand_in(forward))
    assert choice.candidate == BF16 and stepped == [] and choice.step_s == {}


def test_the_budget_weighs_steps_of_several_tiles_whole() -> None:
    # Per tile, two rounds of three times 0.05 + 0.06 s take 0.66 s, inside the 2 s; steps of 5 tiles take 3.3 s.
    forward = {BF16_CL: 0.05, BF16: 0.06, FP32_CL: 0.5, FP32: 0.5}
    steps = {BF16_CL: 0.15, BF16: 0.12}
    for tiles, timed in ((1, True), (5, False)):
        stepped: list[Candidate] = []
        choice = choose(ALL, stand_in(steps, stepped), stand_in(forward), step_tiles=tiles)
        assert bool(stepped) == timed and choice.step_tiles == tiles
        assert choice.candidate == (BF16 if timed else BF16_CL)  # on the screening passes a near tie keeps the rule


def test_rounds_stop_at_the_limit_however_cheap_a_step() -> None:
    stepped: list[Candidate] = []
    choose(ALL[:2], stand_in({BF16_CL: 0.001, BF16: 0.0012}, stepped), clock=lambda: 0.0)
    assert len(stepped) == 2 + 2 + 2 * fast_path.MAX_ROUNDS  # warm-up, screening, then the rounds


def test_one_candidate_left_after_screening_is_taken_without_steps() -> None:
    stepped: list[Candidate] = []
    forward = {BF16_CL: 0.05, BF16: 0.20, FP32_CL: 0.30, FP32: 0.40}
    choice = choose(ALL, stand_in({}, stepped), stand_in(forward))
    assert choice.candidate == BF16_CL and stepped == [] and choice.step_s == {}
    assert choice.summary("step").startswith("fast path: bf16 channels-last, forward pass 0.05 s against")


def test_the_counted_flops_are_torchs() -> None:
    cfg = dataclasses.asdict(Config(base_width=4))
    for encoder in ("unet", "resnet18"):
        # Counted on 32x32 and scaled: exact for sizes the network does not pad (multiples of 32).
        assert fast_path.forward_gflop({**cfg, "encoder": encoder}, (3, 96, 96)) * 1e9 == pytest.approx(
            bench.forward_flops(4, 96, encoder)
        )


def cannot_time(*_: object, **__: object) -> fast_path.Choice:
    raise AssertionError("timed where nothing should be")


def test_forced_settings_and_tiny_networks_time_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_path, "choose", cannot_time)
    model = build_model(3, 2, 4, 0.3)
    for amp, channels_last, expected in (("off", False, FP32), ("bf16", True, BF16_CL)):
        cfg = Config(base_width=4, amp=amp, channels_last=channels_last)
        choice = fast_path.training_choice(cfg, model, nn.CrossEntropyLoss(), (3, 256, 256), CPU, 5)
        assert choice.candidate == expected and choice.why == f"amp={amp} given" and not choice.measured
        assert (cfg.amp, cfg.channels_last) == (amp, channels_last)  # the config as it was
        assert model.inc.block[0].weight.is_contiguous(memory_format=expected.layout)
    # amp=auto on a width-4 network of 32-pixel tiles (the tests' size): the old rule, deterministic.
    cfg = Config(base_width=4)
    choice = fast_path.training_choice(cfg, model, nn.CrossEntropyLoss(), (3, 32, 32), CPU, 5)
    assert choice.candidate == fast_path.candidates("auto", True, CPU)[0] and "too small" in choice.why
    assert cfg.amp == "auto"
    state = {"model": model.state_dict(), "config": dataclasses.asdict(cfg)}
    assert fast_path.prediction_choice(model, state, "auto", True, CPU, (3, 32, 32))[0] is model


def stand_in_timers(seconds: dict[Candidate, float], asked: list | None = None) -> Callable[..., tuple]:
    """training_timers' stand-in: a forward pass a third of a step, the step as given; the tiles it was asked
    to time on are appended to ``asked``."""

    def timers(*given: object) -> tuple:
        if asked is not None:
            asked.append(given[-1])
        return stand_in({c: s / 3 for c, s in seconds.items()}), stand_in(seconds)

    return timers


def test_training_takes_and_records_the_timed_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fast_path, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(fast_path, "MEASURE_FROM_GFLOP", 0.0)  # time even a width-4 network
    asked: list = []
    timers = stand_in_timers({BF16_CL: 0.025, BF16: 0.04, FP32_CL: 0.035, FP32: 0.02}, asked)
    monkeypatch.setattr(fast_path, "training_timers", timers)
    model = build_model(3, 2, 4, 0.3)
    cfg = Config(base_width=4, run_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="fast_path"):
        choice = fast_path.training_choice(cfg, model, nn.CrossEntropyLoss(), (3, 32, 32), CPU, 5)
    assert choice.candidate == FP32 and choice.measured
    assert model.inc.block[0].weight.is_contiguous()  # the model in the chosen layout
    assert (cfg.amp, cfg.channels_last) == ("off", False)  # recorded, for the checkpoints' config
    # Timed on the training batch (5 tiles), so that a step's fixed costs weigh on each tile as in training.
    assert asked == [5] and choice.step_tiles == 5 and choice.as_dict()["step_tiles"] == 5
    assert "fast path: fp32 contiguous, 0.02 s/tile in training steps of 5 against bf16 channels-last 0.025" in (
        caplog.text
    )

    # A resumed run takes the choice from last.pth's config instead of timing again.
    monkeypatch.setattr(fast_path, "choose", cannot_time)
    save_checkpoint(tmp_path / "checkpoints" / "last.pth", {"model": {}, "config": dataclasses.asdict(cfg)})
    resumed = Config(base_width=4, run_dir=str(tmp_path), resume=True)
    choice = fast_path.training_choice(resumed, build_model(3, 2, 4, 0.3), nn.CrossEntropyLoss(), (3, 32, 32), CPU, 5)
    assert choice.candidate == FP32 and "last.pth" in choice.why
    assert (resumed.amp, resumed.channels_last) == ("off", False)


def test_train_py_trains_in_the_timed_choice_and_resumes_in_it(
    shared_square_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fast_path, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(fast_path, "MEASURE_FROM_GFLOP", 0.0)
    timers = stand_in_timers({BF16_CL: 0.025, BF16: 0.04, FP32_CL: 0.035, FP32: 0.02})
    monkeypatch.setattr(fast_path, "training_timers", timers)
    run_dir = tmp_path / "run"
    split_dataset.main(args(shared_square_data, run_dir))
    assert train.main(args(shared_square_data, run_dir, "--epochs=1")) == 0
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pth")["config"]
    assert (saved["amp"], saved["channels_last"]) == ("off", False)  # the checkpoint says how it was trained
    monkeypatch.setattr(fast_path, "choose", cannot_time)  # resumed: taken from last.pth, not timed again
    assert train.main(args(shared_square_data, run_dir, "--epochs=2", "--resume=true")) == 0
    assert load_checkpoint(run_dir / "checkpoints" / "last.pth")["config"]["amp"] == "off"


def test_prediction_takes_the_timed_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    trained = build_model(3, 2, 4, 0.3)
    config = {"in_channels": 3, "n_classes": 2, "base_width": 4, "dropout": 0.3}
    state = {"model": trained.state_dict(), "config": config}
    monkeypatch.setattr(fast_path, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(fast_path, "MEASURE_FROM_GFLOP", 0.0)
    timed: list[torch.dtype] = []

    def fp32_contiguous_wins(options: list[Candidate], step: Callable, **_: object) -> fast_path.Choice:
        for candidate in options:
            step(candidate)  # builds each candidate's network and runs it once
            timed.append(candidate)
        return fast_path.Choice(FP32, "measured", {c: 1.0 for c in options}, {c: 1.0 for c in options})

    monkeypatch.setattr(fast_path, "choose", fp32_contiguous_wins)
    given = inference_model(state, CPU, True, torch.bfloat16)
    model, choice = fast_path.prediction_choice(given, state, "auto", True, CPU, (3, 32, 32))
    assert timed == ALL and choice.candidate == FP32
    weight = next(model.parameters())
    assert weight.dtype == torch.float32 and model is not given
    images = torch.rand(2, 3, 32, 32)
    fp32 = inference_model(state, CPU, False, None)
    assert np.array_equal(predict_batch(model, images, CPU, False), predict_batch(fp32, images, CPU, False))

    # predict.py's tile loop makes the same choice and writes the same masks as --amp=off --channels_last=false.
    paths = generate_dataset(tmp_path / "data", 3, 32, seed=0)
    outputs = {name: [tmp_path / name / f"{p.stem}_seg.png" for p in paths] for name in ("auto", "off")}
    for name in outputs:
        cfg = dataclasses.replace(Config(), num_workers=0, overlay=False, amp=name, channels_last=name == "auto")
        amp = None if name == "off" else torch.bfloat16
        model = inference_model(state, CPU, cfg.channels_last, amp)
        assert predict_tiles(model, paths, outputs[name], cfg, state, Path("w"), CPU, amp) == (3, 0)
    for auto, off in zip(outputs["auto"], outputs["off"]):
        assert auto.read_bytes() == off.read_bytes()


def agree_on_rank(rank: int, store: str, found: multiprocessing.Queue) -> None:
    """One rank of a two-rank gloo job: each rank offers another candidate; rank 0's must come back to both."""
    try:
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
        offered = [BF16_CL, FP32][rank]
        found.put((rank, *fast_path.agreed(offered, "measured")))
        torch.distributed.destroy_process_group()
    except Exception as err:  # any failure is the test's to report, not a silent hang of the other rank
        found.put((rank, repr(err), ""))


def test_every_rank_takes_rank_0s_choice(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    found = context.Queue()
    ranks = [context.Process(target=agree_on_rank, args=(r, str(tmp_path / "store"), found)) for r in (0, 1)]
    for process in ranks:
        process.start()
    try:
        results = sorted(found.get(timeout=300) for _ in ranks)  # a loaded machine can take a minute to import torch
    finally:
        for process in ranks:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
    assert results == [(0, BF16_CL, "measured"), (1, BF16_CL, "rank 0's choice")]
