"""Which subnets a sandwich step trains besides the largest and the smallest (``--sampling``).

- ``uniform`` (the default): every choice of the space drawn uniformly at random (BigNAS, OFA).
- ``stratified``: uniform over *sizes* instead of over choices. A target MFLOPs is drawn uniformly
  between the smallest and the largest subnet's, then uniform draws until one lies within
  ``SIZE_TOLERANCE`` of it (sizes no draw reaches get the nearest of ``MAX_DRAWS``). On ``small``
  uniform choices put 87% of the random subnets between 3 and 8 MFLOPs (of 1.3-16.6) and 6%
  between 8 and 11, where the larger latency budgets' competitors lie; stratified sampling puts
  34% and 41% there (measured over 3,000 draws), for about 5 ms of drawing per step: issue 31's
  size-mix lever.
- ``kernels``: half the random subnets (a fair coin per slot) are OFA's elastic-kernel stage: the
  largest subnet's resolution, widths, depths and expands with a uniformly random depthwise kernel
  per block; the other half uniform. Issue 31's schedule lever: the sandwich's fixed ends train
  the 3x3 kernels only in the narrow, expand-3 smallest subnet, and a 3x3 kernel in a wide,
  expand-6 block only when a uniform draw happens to pick both (1 in 9 per block); the supernet
  underrates exactly those subnets. Here a block is 3x3-expand-6 in 2 of 9 random slots. The
  elastic-kernel subnets are the largest's size, so a run takes 10-20% longer. Measured on the
  float phase (two seeds, BENCHMARKS.md §1): the kernel bias shrinks a little, the ranking does
  not improve.
- ``small-kernels``: half the random subnets (a fair coin per slot) are the largest's widths,
  depths and expands with the smallest kernel in every block, at a uniformly random resolution;
  the other half uniform. Issue 31's expand lever: inherited scores pay nothing for expand, which
  training alone pays for (BENCHMARKS.md §1, "What each choice is worth"), and the hypothesis is
  that a mid channel beyond the smallest expand is trained mostly by the largest subnet, with its
  largest kernel. This slot trains those channels with the small kernel every other step, at any
  resolution (``kernels`` paid for expand but, all at the largest resolution, overpaid resolution).
  Measured on the float phase (two seeds): expand paid on one seed of two, kernels overpaid less,
  resolution, depth and width overpaid more; the ranking does not improve.
- ``worst`` / ``best``: AttentiveNAS's WorstUp-k / BestUp-k. ``k`` candidates of one size (a
  uniformly random anchor, then draws within ``SIZE_TOLERANCE`` of its MFLOPs); the step trains the
  one whose loss on its own images is the highest / the lowest (``train.pick_by_loss`` scores them).
  The size is still uniform sampling's: only which architecture of a size is trained changes,
  which is what ranking subnets of one size depends on. WorstUp trains the subnets the shared
  weights serve worst, to even them out; BestUp the most promising ones (AttentiveNAS's choice
  for the Pareto front). Scoring the candidates costs ``k`` extra forward passes per random slot.

Every draw comes from the step's own ``random.Random`` (train.sandwich), so a resumed run replays
the same subnets.
"""
from __future__ import annotations

import random
from collections.abc import Callable

from .errors import UserError, choice_error
from .space import Arch, Block, SearchSpace, Stage, StageSpec, sample

SAMPLINGS = ("uniform", "stratified", "kernels", "small-kernels", "worst", "best")
SIZE_TOLERANCE = 0.1  # ``worst``/``best``: candidates lie within 10% of the anchor's MFLOPs
MAX_DRAWS = 256  # per candidate set; then the nearest draws stand in (sizes near the ends are rare)

Size = Callable[[Arch], float]  # an architecture's MFLOPs


def check_sampling(sampling: str, k: int) -> None:
    if sampling not in SAMPLINGS:
        raise choice_error("--sampling", sampling, SAMPLINGS)
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise UserError(f"--sampling-k must be an integer >= 2 (the candidates of worst/best), got {k}")


def candidates(space: SearchSpace, rng: random.Random, sampling: str, k: int, size: Size) -> list[Arch]:
    """One random slot's candidates: a single subnet (uniform, stratified, kernels, small-kernels), or ``k`` of one
    size (worst, best) for the step to choose from."""
    if sampling == "uniform":
        return [sample(space, "random", rng)]
    if sampling in HALF_AND_HALF:  # a fair coin between the sampling's own subnet and a uniform draw
        return [HALF_AND_HALF[sampling](space, rng) if rng.random() < 0.5 else sample(space, "random", rng)]
    if sampling == "stratified":
        target = rng.uniform(size(sample(space, "smallest")), size(sample(space, "largest")))
        return _draw_near(space, rng, 1, size, _outside(target))
    anchor = sample(space, "random", rng)
    return [anchor] + _draw_near(space, rng, k - 1, size, _outside(size(anchor)))


def elastic_kernel(space: SearchSpace, rng: random.Random) -> Arch:
    """The largest subnet with a uniformly random depthwise kernel in every block."""
    return _largest_with_kernels(space, lambda spec: rng.choice(spec.kernels), sample(space, "largest").resolution)


def wide_small_kernels(space: SearchSpace, rng: random.Random) -> Arch:
    """The largest subnet's widths, depths and expands with the smallest kernel in every block, at a
    uniformly random resolution."""
    return _largest_with_kernels(space, lambda spec: min(spec.kernels), rng.choice(space.resolutions))


def _largest_with_kernels(space: SearchSpace, kernel: Callable[[StageSpec], int], resolution: int) -> Arch:
    """The largest subnet's widths, depths and expands, each block's kernel ``kernel(its stage's spec)``."""
    stages = tuple(Stage(stage.width, tuple(Block(kernel(spec), b.expand) for b in stage.blocks))
                   for stage, spec in zip(sample(space, "largest").stages, space.stages))
    return Arch(resolution, stages)


# The samplings whose random slot is, by a fair coin, their own kind of subnet or a uniform draw.
HALF_AND_HALF = {"kernels": elastic_kernel, "small-kernels": wide_small_kernels}


def _outside(target: float) -> Callable[[float], float]:
    """How far a size lies outside ``SIZE_TOLERANCE`` of ``target`` MFLOPs (0: inside)."""
    return lambda m: max(abs(m - target) - SIZE_TOLERANCE * target, 0.0)


def _draw_near(space: SearchSpace, rng: random.Random, n: int, size: Size, distance: Callable[[float], float]) -> list[Arch]:
    """``n`` uniform draws at ``distance`` 0 (inside the wanted sizes); where ``MAX_DRAWS`` draws
    hold fewer, the nearest of them fill the rest."""
    drawn: list[tuple[float, int, Arch]] = []
    inside = 0
    for i in range(MAX_DRAWS):
        arch = sample(space, "random", rng)
        drawn.append((distance(size(arch)), i, arch))
        inside += drawn[-1][0] == 0.0
        if inside >= n:
            break
    return [arch for _, _, arch in sorted(drawn)[:n]]
