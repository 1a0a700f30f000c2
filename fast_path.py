"""The fast path's precision and memory layout on a CPU, chosen by timing the network rather than by a rule.

With ``amp=auto`` a CPU that computes bf16 natively (AVX512-BF16, AMX) used to get bf16 and channels-last
always. Neither is always the faster: at 16 channels the convolutions are small, and what wins depends on
the CPU, the width and the tile size. So where the choice is open (``amp=auto`` on a CPU), the candidates are
timed on the actual network at the actual tile size for a moment before training or prediction starts, and
the fastest is taken:

1. the candidates, in order of preference: the old rule's first (bf16 channels-last where the CPU computes
   bf16 natively), then bf16 contiguous, fp32 channels-last, fp32 contiguous; no bf16 on a CPU without
   native bf16 (emulated, it is many times slower), no channels-last under ``channels_last=false``;
2. two forward passes in each, in turn, of one tile for prediction and, for training, of its batch (up to
   TIMED_TILES_MAX tiles, so that a step's costs that do not grow with its tiles weigh on each tile as in
   training): the first warms it up (kernels chosen and compiled, memory first touched: several times a
   steady pass for bf16 on AMX), the second screens it: a candidate whose pass took more than PRUNE times
   the fastest's is left out (a forward pass's ratios foretell a step's), and one whose warm-up alone took
   over UNTIMED_DROP times the fastest so far is left out at once;
3. rounds of one step in each candidate left (training: forward and backward under autocast, two rounds at
   least, the first also warming the backward pass up; prediction: the folded network's forward pass, its
   screening pass counting as a round), interleaved so that a disturbance from other work falls on all of
   them alike, until BUDGET_S is spent (at most MAX_ROUNDS); each scores its fastest step, per tile. Where
   two rounds of training steps would already overrun BUDGET_S (a wide network, large tiles or a large
   batch: a full-width U-Net's fp32 step takes seconds on a small CPU), the screening passes decide;
4. a candidate displaces one before it in that order only when faster by more than TIE, so that a near tie
   keeps the old rule;
5. a choice other than the old rule's is confirmed: the two are timed again, CONFIRM_ROUNDS times each in
   turn, and the switch stands only if it holds on their fastest passes (one pass each could have met a burst
   of other work on the machine).

Nothing is timed where the choice is not open: a forced ``amp`` (bf16, fp16 or off: tests force it where
they compare runs), CUDA (bf16, or fp16 on older GPUs, as before), or a network whose forward pass of one tile
is under MEASURE_FROM_GFLOP, where the old rule stands: per-step overheads dominate such steps and their
timings are noise (which keeps tiny runs, the tests', deterministic). Under torchrun rank 0 times and every
rank takes its choice; a resumed training run keeps the choice recorded in its checkpoint's config.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import pickle
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from config import Config
from inference import inference_model, network_logits
from net_structure import downscale_of, model_from_config, smallest_batch
from runtime import cpu_has_fast_bf16, handing_back_freed_memory, memory_format, resolve_amp

LOG = logging.getLogger("fast_path")


BUDGET_S = 2.0  # seconds of rounds of steps after the screening passes (the minimum of rounds always runs)
MAX_ROUNDS = 5  # timing rounds at most, however cheap a step
PRUNE = 1.5  # a candidate whose screening pass took over this times the fastest's is not timed further
UNTIMED_DROP = 2.0  # ... nor screened at all when its warm-up pass alone took over this times the fastest's
TIE = 0.03  # a later candidate must be this much faster (3 %) to displace an earlier one
MEASURE_FROM_GFLOP = 0.25  # smaller networks (per tile forward) keep the old rule: a width-8 U-Net on 64 px is 0.1
CONFIRM_ROUNDS = 2  # passes of the old rule's candidate and a faster one, in turn, before leaving the old rule
STEP_PER_SCREEN = 3  # a training step (forward and backward) costs about three forward passes
COUNT_SIDE = 32  # side of the input on which a network's FLOPs are counted, then scaled to the tile
# Training's candidates are timed on the training batch, up to this many tiles: a step's costs that do not
# grow with its tiles (autocast's bf16 copy of the weights at every forward pass) then weigh on each tile as
# in training. Timed on one tile, they made resnet18 at half resolution look faster in fp32, which then
# trained at 24.8 tiles/s against 36.6 in bf16 (bench.py, 2-core Xeon).
TIMED_TILES_MAX = 8


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to run the network: the autocast dtype (None = fp32) and the memory layout."""

    amp: torch.dtype | None
    channels_last: bool

    @property
    def layout(self) -> torch.memory_format:
        return memory_format(self.channels_last)

    @property
    def amp_key(self) -> str:
        """The ``amp`` key's value that forces this precision."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp, "off")

    def __str__(self) -> str:
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp, "fp32")
        return f"{precision} {'channels-last' if self.channels_last else 'contiguous'}"


@dataclasses.dataclass
class Choice:
    """The candidate taken, why, and what the timing found (empty where nothing was timed)."""

    candidate: Candidate
    why: str  # measured, or why nothing was: "amp=bf16 given", "CUDA", "network too small to time", ...
    screen_s: dict[Candidate, float] = dataclasses.field(default_factory=dict)  # each one's screening pass
    step_s: dict[Candidate, float] = dataclasses.field(default_factory=dict)  # the fastest step of those timed
    cost_s: float = 0.0  # wall time of the whole choice (building the copies, passes, rounds)
    step_tiles: int = 1  # tiles of each timed step (step_s is per tile of such a step)

    @property
    def measured(self) -> bool:
        return bool(self.screen_s)

    def summary(self, step: str) -> str:
        """One log line: 'fast path: bf16 channels-last, 0.21 s/step against fp32 channels-last 0.35, ...'."""
        if not self.measured:
            return f"fast path: {self.candidate} ({self.why})"
        if self.candidate in self.step_s:
            others = [f"{c} {s:.3g}" for c, s in self.step_s.items() if c != self.candidate]
            line = f"fast path: {self.candidate}, {self.step_s[self.candidate]:.3g} s/{step}"
            line += f" against {', '.join(others)}" if others else ""
        else:  # the screening passes decided: one candidate left, or the old rule's confirmed on its passes
            others = [f"{c} {s:.3g}" for c, s in self.screen_s.items() if c != self.candidate]
            line = f"fast path: {self.candidate}, forward pass {self.screen_s[self.candidate]:.3g} s"
            line += f" against {', '.join(others)}" if others else ""
        fastest = min(self.screen_s.values())
        dropped = [
            f"{c} ({s / fastest:.1f}x)"
            for c, s in self.screen_s.items()
            if c not in self.step_s and c != self.candidate
        ]
        if dropped and self.step_s:
            line += f"; left out after a forward pass over {PRUNE:g}x the fastest's: {', '.join(dropped)}"
        return f"{line} (timed in {self.cost_s:.1f} s; --amp=bf16 or off forces a precision)"

    def as_dict(self) -> dict[str, Any]:
        """For bench.py's JSON: the precision and layout taken, why, and the seconds per pass of each candidate."""
        return {
            "precision": str(self.candidate.amp or torch.float32).removeprefix("torch."),
            "layout": "channels_last" if self.candidate.channels_last else "contiguous",
            "why": self.why,
            "screen_s": {str(c): s for c, s in self.screen_s.items()},
            "step_s": {str(c): s for c, s in self.step_s.items()},
            "step_tiles": self.step_tiles,
            "cost_s": self.cost_s,
        }


def candidates(amp_name: str, channels_last: bool, device: torch.device) -> list[Candidate]:
    """What may be chosen, the old rule's first; a single candidate where the choice is not open (a forced
    precision, or CUDA)."""
    if amp_name.strip().lower() != "auto" or device.type != "cpu":
        return [Candidate(resolve_amp(amp_name, device), channels_last)]
    precisions = [torch.bfloat16, None] if cpu_has_fast_bf16() else [None]  # the old rule's first
    layouts = [True, False] if channels_last else [False]
    return [Candidate(amp, layout) for amp in precisions for layout in layouts]


def choose(
    options: Sequence[Candidate],
    step: Callable[[Candidate], float],
    screen: Callable[[Candidate], float] | None = None,
    budget_s: float = BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
    release: Callable[[Candidate], None] | None = None,
    step_tiles: int = 1,
) -> Choice:
    """Time the candidates and return the fastest (steps 2 to 5 of the module's description).

    Args:
        options: the candidates, in order of preference (the first is the old rule's).
        step: runs one step of a candidate and returns its seconds.
        screen: runs the cheaper pass that warms a candidate up and screens it (a forward pass where a step
            is a forward and a backward pass), returning its seconds; ``step`` itself when None. Each
            candidate runs it twice in turn, once to warm up and once timed; a candidate whose warm-up alone
            took over UNTIMED_DROP times the fastest timed pass so far skips the second (a warm-up pass is
            no faster than a timed one), and candidates over PRUNE times the fastest are left out. Where it
            is not the step, the first round of steps warms the rest of the step up, so two rounds at least
            are timed.
        budget_s: seconds of rounds of steps, counted from the first; the minimum number of rounds always runs.
        clock: the clock that budget_s is counted by.
        release: called with each candidate but the first as soon as it is left out, to free its copy.
        step_tiles: the tiles of a step where ``step`` and ``screen`` return seconds per tile: a step then takes
            about STEP_PER_SCREEN x step_tiles screening seconds, which the budget is weighed against.
    """
    started = time.perf_counter()
    first = screen or step
    leave_out = _releaser(options[0], release)
    screened = _screened(options, first, leave_out)
    fastest = min(screened.values())
    kept = [c for c in options if screened[c] <= PRUNE * fastest]
    for candidate in options:
        if candidate not in kept:
            leave_out(candidate)
    best = _timed_steps(kept, step, screened, bool(screen), budget_s, clock, step_tiles)
    taken = fastest_of(kept, best or screened)
    if taken != options[0]:
        seconds, again = (best, step) if options[0] in best else (screened, first)
        taken = _confirmed(options[0], taken, seconds, again)
    return Choice(taken, "measured", screened, best, time.perf_counter() - started, step_tiles)


def _releaser(first: Candidate, release: Callable[[Candidate], None] | None) -> Callable[[Candidate], None]:
    """``release`` called once at most per candidate left out, never for ``first`` (the network itself)."""
    released: list[Candidate] = []

    def leave_out(candidate: Candidate) -> None:
        if release is not None and candidate != first and candidate not in released:
            release(candidate)
            released.append(candidate)

    return leave_out


def _screened(
    options: Sequence[Candidate], first: Callable[[Candidate], float], leave_out: Callable[[Candidate], None]
) -> dict[Candidate, float]:
    """Each candidate's screening pass after its warm-up (step 2), those over PRUNE times the fastest left out."""
    screened: dict[Candidate, float] = {}
    for candidate in options:
        warm = first(candidate)  # the warm-up: never scored, except to leave a hopeless candidate out
        if screened and warm > UNTIMED_DROP * min(screened.values()):
            screened[candidate] = warm  # at least its screening pass: it is left out below, untimed
        else:
            screened[candidate] = first(candidate)
        if screened[candidate] > PRUNE * min(screened.values()):
            leave_out(candidate)  # the fastest only gets faster: it cannot come back
    return screened


def _timed_steps(
    kept: Sequence[Candidate],
    step: Callable[[Candidate], float],
    screened: dict[Candidate, float],
    screen_apart: bool,
    budget_s: float,
    clock: Callable[[], float],
    step_tiles: int,
) -> dict[Candidate, float]:
    """Each kept candidate's fastest step over interleaved rounds (step 3); empty where none are timed."""
    least = 2 if screen_apart else 1  # a screening pass apart from the step leaves the backward pass to warm up
    step_estimate = STEP_PER_SCREEN * step_tiles * sum(screened[c] for c in kept)
    # Where steps this long would overrun the budget, the screening passes decide: their ratios foretell a step's.
    if len(kept) <= 1 or (screen_apart and least * step_estimate > budget_s):
        return {}
    best = {c: math.inf if screen_apart else screened[c] for c in kept}
    rounds, begun = 0, clock()
    while rounds < MAX_ROUNDS and (rounds < least or clock() - begun < budget_s):
        for candidate in kept:
            best[candidate] = min(best[candidate], step(candidate))
        rounds += 1
    return best


def _confirmed(
    rule: Candidate, taken: Candidate, seconds: dict[Candidate, float], again: Callable[[Candidate], float]
) -> Candidate:
    """``taken`` if it still beats the old rule's ``rule`` after CONFIRM_ROUNDS more passes of ``again`` (step 5)."""
    # Leaving the old rule on one pass each is what a burst of other work on the machine could cause: the
    # two are timed again, in turn, and the switch stands only if it holds on their fastest passes. ``seconds``
    # are lowered in place, as the Choice reports the fastest pass of each.
    pair = [rule, taken]
    for _ in range(CONFIRM_ROUNDS):
        for candidate in pair:
            seconds[candidate] = min(seconds[candidate], again(candidate))
    return fastest_of(pair, seconds)


def fastest_of(kept: Sequence[Candidate], seconds: dict[Candidate, float]) -> Candidate:
    """The fastest candidate, a later one displacing an earlier only when faster by more than TIE."""
    taken = kept[0]
    for candidate in kept[1:]:
        if seconds[candidate] < seconds[taken] * (1 - TIE):
            taken = candidate
    return taken


def forward_gflop(config: dict[str, Any], shape: Sequence[int]) -> float:
    """GFLOP (multiply and add counted apart) of the convolutions of one forward pass of one tile of ``shape``
    (C, H, W) through the network a config describes: counted by hooks on a COUNT_SIDE-pixel input (times downscale) and
    scaled by the area, as a fully convolutional network's work grows with its pixels. The network is built
    without initialising its weights (their values do not change the count)."""
    with torch.device("meta"):
        network = model_from_config(config)
    network = network.to_empty(device="cpu").eval()
    for tensor in network.state_dict().values():
        tensor.zero_()  # no uninitialised values (NaN, denormals) to slow the pass down
    flops = [0]

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        weight = module.weight
        if isinstance(module, nn.ConvTranspose2d):  # every input pixel spreads over out_channels x kernel
            flops[0] += 2 * inputs[0].numel() * weight[0].numel()
        else:  # every output value sums in_channels / groups x kernel products
            flops[0] += 2 * output.numel() * weight[0].numel()

    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            module.register_forward_hook(count)
    with torch.no_grad():
        # At 1/downscale resolution the network must still see COUNT_SIDE pixels, or its padding would count.
        side = COUNT_SIDE * downscale_of(config)
        network(torch.zeros(1, config["in_channels"], side, side))
    return flops[0] * shape[-2] * shape[-1] / side**2 / 1e9


def unmeasured(options: Sequence[Candidate], config: dict[str, Any], shape: Sequence[int], amp_name: str) -> str:
    """Why nothing is timed (a forced amp, CUDA, a single candidate, a tiny network), or '' when it is."""
    if amp_name.strip().lower() != "auto":
        return f"amp={amp_name} given"
    if len(options) == 1:
        return "the old rule: CUDA, or a single candidate on this CPU"
    gflop = forward_gflop(config, shape)
    return f"the old rule: network too small to time, {gflop:.2g} GFLOP per tile" if gflop < MEASURE_FROM_GFLOP else ""


def timed_tiles(cfg: Config, shape: Sequence[int], batch: int) -> int:
    """The tiles of the batch that training's candidates are timed on: the training batch of ``batch`` tiles
    (training.training_batch: what each process steps on, not ``batch_size`` alone), at most TIMED_TILES_MAX,
    and at least the smallest batch BatchNorm trains on (net_structure.smallest_batch)."""
    batch = min(batch, TIMED_TILES_MAX)
    return max(smallest_batch(cfg.encoder, *shape[-2:], cfg.downscale), batch)


def training_timers(
    model: nn.Module,
    criterion: nn.Module,
    shape: Sequence[int],
    n_classes: int,
    device: torch.device,
    tiles: int,
) -> tuple[Callable[[Candidate], float], Callable[[Candidate], float]]:
    """The screening pass (forward) and the step (forward and backward) of a batch of ``tiles`` tiles in a
    candidate, each in seconds per tile, on copies of the model in each layout (the model's BatchNorm
    statistics and gradients stay untouched)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((tiles, *shape), generator=generator).to(device)
    masks = torch.randint(0, n_classes, (tiles, *shape[-2:]), generator=generator).to(device)
    copies: dict[bool, nn.Module] = {}

    def run(candidate: Candidate, backward: bool) -> float:
        if candidate.channels_last not in copies:
            copies[candidate.channels_last] = copy.deepcopy(model).to(memory_format=candidate.layout).train()
        network = copies[candidate.channels_last]
        inputs = images.contiguous(memory_format=candidate.layout)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=candidate.amp or torch.float32, enabled=candidate.amp is not None):
            loss = criterion(network(inputs), masks)
        if backward:
            loss.backward()
        seconds = (time.perf_counter() - started) / tiles
        network.zero_grad(set_to_none=True)
        return seconds

    return (lambda c: run(c, False)), (lambda c: run(c, True))


def resumed_candidate(cfg: Config) -> Candidate | None:
    """With ``resume``, the precision and layout that last.pth's config records when its run chose them by
    timing (its ``amp`` is then bf16 or off, not auto); None otherwise. Only the config is read."""
    last = Path(cfg.run_dir) / "checkpoints" / "last.pth"
    if not cfg.resume or not last.is_file():
        return None
    try:
        saved = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["config"]
    except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError):
        return None  # train.py's restore reports an unreadable checkpoint
    if saved.get("amp") not in ("bf16", "off") or not isinstance(saved.get("channels_last"), bool):
        return None
    return Candidate(resolve_amp(saved["amp"], torch.device("cpu")), saved["channels_last"])


def agreed(candidate: Candidate, why: str) -> tuple[Candidate, str]:
    """Under torchrun, rank 0's candidate on every rank (gloo on CPUs); as it is otherwise."""
    if not torch.distributed.is_initialized():
        return candidate, why
    chosen = torch.tensor([candidate.amp is not None, candidate.channels_last], dtype=torch.int64)
    torch.distributed.broadcast(chosen, 0)
    taken = Candidate(torch.bfloat16 if chosen[0] else None, bool(chosen[1]))
    return taken, why if torch.distributed.get_rank() == 0 else "rank 0's choice"


def training_choice(
    cfg: Config, model: nn.Module, criterion: nn.Module, shape: Sequence[int], device: torch.device, batch: int
) -> Choice:
    """train.py's precision and layout: timed on a copy of ``model`` with ``criterion`` on a batch of ``batch``
    tiles (training.training_batch; timed_tiles) of ``shape`` (C, H, W) where the choice is open, else the old rule.
    Puts ``model`` in the chosen layout, logs the choice, and records a timed one in ``cfg`` (``amp`` bf16 or off,
    ``channels_last``), whence every checkpoint's config: a resumed run takes it from there instead of timing
    again.

    Under torchrun every rank calls this; rank 0 times (the others wait) and all take its choice.
    """
    options = candidates(cfg.amp, cfg.channels_last, device)
    choice = Choice(options[0], unmeasured(options, dataclasses.asdict(cfg), shape, cfg.amp))
    tiles = timed_tiles(cfg, shape, batch)
    if not choice.why:
        earlier = resumed_candidate(cfg)
        if earlier in options:  # not where this CPU lacks native bf16, or channels_last is now off
            choice = Choice(earlier, "as chosen when the run began, from last.pth")
        elif not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            screen, step = training_timers(model, criterion, shape, cfg.n_classes, device, tiles)
            with torch.random.fork_rng(devices=[]):  # dropout's draws here leave training's untouched
                choice = choose(options, step, screen, step_tiles=tiles)
        choice.candidate, choice.why = agreed(choice.candidate, choice.why)
        cfg.amp, cfg.channels_last = choice.candidate.amp_key, choice.candidate.channels_last
    model.to(memory_format=choice.candidate.layout)
    LOG.info("%s", choice.summary("training step of one tile" if tiles == 1 else f"tile in training steps of {tiles}"))
    return choice


def prediction_choice(
    model: nn.Module, state: dict, amp_name: str, channels_last: bool, device: torch.device, shape: Sequence[int]
) -> tuple[nn.Module, Choice]:
    """The network to predict with and the choice behind it: where the choice is open, the checkpoint's
    network (``state``) is timed on one tile of ``shape`` (C, H, W) in each candidate, and the fastest copy
    is returned; otherwise ``model`` as it is (built by inference_model with ``amp_name`` resolved and
    ``channels_last``). Under torchrun the old rule stands (ranks predict different tiles, and none waits
    for another); so it does for models that are no checkpoint's (onnxruntime's, stand-ins).
    """
    options = candidates(amp_name, channels_last, device)
    if "model" not in state or torch.distributed.is_initialized():
        return model, Choice(options[0], "the old rule: not a checkpoint's network, or under torchrun")
    why = unmeasured(options, state["config"], shape, amp_name)
    if why:
        return model, Choice(options[0], why)
    with handing_back_freed_memory():  # the copies' memory goes back when they go, not kept beside the loop's
        return timed_prediction(model, state, options, device, shape)


def timed_prediction(
    model: nn.Module, state: dict, options: Sequence[Candidate], device: torch.device, shape: Sequence[int]
) -> tuple[nn.Module, Choice]:
    """prediction_choice's timing on one tile of ``shape``: ``model`` (the first candidate) and copies of it in the
    others' dtype and layout. A copy cast from another dtype holds that dtype's rounding of the weights, which
    changes no timing; the network taken in another dtype than ``model``'s is built from the checkpoint."""
    started = time.perf_counter()
    built = {options[0]: model}
    images = torch.rand((1, *shape), generator=torch.Generator().manual_seed(0))

    def step(candidate: Candidate) -> float:
        if candidate not in built:
            dtype = candidate.amp or torch.float32
            built[candidate] = copy.deepcopy(model).to(dtype=dtype, memory_format=candidate.layout)
        begun = time.perf_counter()
        network_logits(built[candidate], images, device, candidate.channels_last)
        return time.perf_counter() - begun

    choice = choose(options, step, release=built.pop)  # copies left out are freed at once
    taken = built.pop(choice.candidate)
    built.clear()
    if choice.candidate.amp != options[0].amp:
        del taken
        taken = inference_model(state, device, choice.candidate.channels_last, choice.candidate.amp)
    choice.cost_s = time.perf_counter() - started
    LOG.info("%s", choice.summary("forward pass of one tile"))
    return taken, choice
