"""Evolutionary search under constraints (QuantNAS §5.1; OFA's evolution finder as the scheme).

The search is model-agnostic: it sees architectures, a feasibility test (every constraint met
*by prediction*: latency from a table, FLOPs/params/size from the architecture) and a batch
fitness function (the calibrated int8 subnet's accuracy on the held-out search split, computed
elsewhere and cached by architecture). Every operator returns architectures of the space, and
every population is seeded and bounded: a budget no subnet can meet is an error, never a loop.

One generation: the best ``parent_ratio`` of the population survive as parents; half of the
children are mutations of a random parent (each gene resampled with ``mutate_prob``), half are
crossovers of two random parents (each gene taken from the second parent with
``crossover_prob``); children that break a constraint are redrawn (bounded).
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .accuracy_predictor import AccuracyPredictor
from .errors import UserError, check_count
from .ranking import kendall_tau
from .space import Arch, Block, SearchSpace, Stage, sample

PAPER = {"population": 512, "generations": 20, "mutate_prob": 0.2, "crossover_prob": 0.25}
PARENT_RATIO = 0.25  # OFA's evolution finder: the top quarter of each generation breeds
MIN_POPULATION = 4  # one parent, one mutant, two crossovers
MAX_TRIES = 200  # draws per child before a constraint is declared (nearly) unmeetable


def mutate(space: SearchSpace, arch: Arch, prob: float, rng: random.Random) -> Arch:
    """Resample each gene (resolution, stage width and depth, block kernel and expand) with ``prob``."""
    res = rng.choice(space.resolutions) if rng.random() < prob else arch.resolution
    stages = []
    for spec, stage in zip(space.stages, arch.stages):
        width = rng.choice(spec.widths) if rng.random() < prob else stage.width
        depth = rng.choice(spec.depths) if rng.random() < prob else len(stage.blocks)
        blocks = []
        for j in range(depth):
            old = stage.blocks[j] if j < len(stage.blocks) else Block(rng.choice(spec.kernels), rng.choice(spec.expands))
            kernel = rng.choice(spec.kernels) if rng.random() < prob else old.kernel
            expand = rng.choice(spec.expands) if rng.random() < prob else old.expand
            blocks.append(Block(kernel, expand))
        stages.append(Stage(width, tuple(blocks)))
    return Arch(res, tuple(stages))


def crossover(space: SearchSpace, a: Arch, b: Arch, prob: float, rng: random.Random) -> Arch:
    """Each gene from ``b`` with ``prob``, else from ``a``; a block missing in one parent comes from the other."""
    pick = lambda x, y: y if rng.random() < prob else x  # noqa: E731
    stages = []
    for sa, sb in zip(a.stages, b.stages):
        depth = pick(len(sa.blocks), len(sb.blocks))
        blocks = []
        for j in range(depth):
            ba = sa.blocks[j] if j < len(sa.blocks) else sb.blocks[j]
            bb = sb.blocks[j] if j < len(sb.blocks) else ba
            blocks.append(Block(pick(ba.kernel, bb.kernel), pick(ba.expand, bb.expand)))
        stages.append(Stage(pick(sa.width, sb.width), tuple(blocks)))
    return Arch(pick(a.resolution, b.resolution), tuple(stages))


@dataclass
class Generation:
    """What one generation of one budget's evolution left behind."""

    index: int
    best: tuple[Arch, float]
    evaluated: int  # new evaluations this generation
    cache_hits: int
    predictor_tau: float | None = None  # screening: Kendall tau of predicted vs measured, evaluated children


@dataclass
class EvolutionResult:
    best: Arch
    fitness: float
    history: list[Generation] = field(default_factory=list)


def check_settings(population: int, generations: int, mutate_prob: float, crossover_prob: float, screen: float,
                   parent_ratio: float = PARENT_RATIO) -> None:
    """The evolution's settings, checked: by ``SearchConfig`` before a search writes anything, and by ``evolve``."""
    check_count("--population", population)
    if population < MIN_POPULATION:
        raise UserError(f"--population must be at least {MIN_POPULATION} (the best quarter breeds: fewer leave "
                        f"no mutants and crossovers), got {population}")
    check_count("--generations", generations)
    for name, v in (("mutate-prob", mutate_prob), ("crossover-prob", crossover_prob), ("parent ratio", parent_ratio)):
        if not 0.0 <= v <= 1.0:  # also refuses NaN
            raise UserError(f"--{name} must be in [0, 1], got {v}")
    if not 0.0 < screen <= 1.0:
        raise UserError(f"--screen must be in (0, 1], got {screen}")


def evolve(space: SearchSpace, fitness: Callable[[list[Arch]], list[float]], feasible: Callable[[Arch], bool],
           population: int = PAPER["population"], generations: int = PAPER["generations"],
           mutate_prob: float = PAPER["mutate_prob"], crossover_prob: float = PAPER["crossover_prob"],
           parent_ratio: float = PARENT_RATIO, seed: int = 0,
           on_generation: Callable[[Generation], None] | None = None,
           seeds: tuple[Arch, ...] = (), screen: float = 1.0) -> EvolutionResult:
    """Maximise ``fitness`` over the feasible subnets of ``space``.

    ``fitness`` scores a list of architectures at once (batched, cached by the caller); it may
    be called with architectures it has seen, and must return the same score for them.
    ``seeds``: feasible subnets known in advance, put first in the first population (once each);
    give them only where the budget needs them (``search_job.budget_seeds``): they take the place
    of random subnets. Under a tight budget few random subnets are feasible; the first population
    is then filled with mutants of the feasible ones found so far instead of failing.
    ``screen`` < 1: of each generation's new children only this share is evaluated, the ones an
    accuracy predictor fitted on every subnet evaluated so far ranks highest (the others are
    dropped, unscored); the first population is always evaluated in full.
    """
    check_settings(population, generations, mutate_prob, crossover_prob, screen, parent_ratio)
    rng = random.Random(seed)

    def draw(make: Callable[[], Arch]) -> Arch:
        for _ in range(MAX_TRIES):
            a = make()
            if feasible(a):
                return a
        raise UserError("the constraints leave (almost) no subnet of the space: none of "
                        f"{MAX_TRIES} candidates met them; relax the budget")

    pop = list({a.key: a for a in seeds if feasible(a)}.values())  # a seed given twice is one subnet, evaluated once
    while len(pop) < population:
        try:
            pop.append(draw(lambda: sample(space, "random", rng)))
        except UserError:
            if not pop:
                raise
            pop.append(draw(lambda: mutate(space, rng.choice(pop), max(mutate_prob, 0.2), rng)))
    scores = dict(zip((a.key for a in pop), fitness(pop)))
    seen = {a.key: a for a in pop}  # every evaluated subnet: what the accuracy predictor learns from
    history: list[Generation] = []
    n_parents = max(1, int(round(parent_ratio * population)))
    for g in range(generations):
        ranked = sorted({a.key: a for a in pop}.values(), key=lambda a: scores[a.key], reverse=True)
        parents = ranked[:n_parents]
        n_mut = (population - n_parents) // 2
        children = [draw(lambda: mutate(space, rng.choice(parents), mutate_prob, rng)) for _ in range(n_mut)]
        children += [draw(lambda: crossover(space, rng.choice(parents), rng.choice(parents), crossover_prob, rng))
                     for _ in range(population - n_parents - n_mut)]
        new = [c for c in dict((c.key, c) for c in children).values() if c.key not in scores]
        tau = None
        if screen < 1.0 and new:  # evaluate only the children the predictor ranks highest
            predictor = AccuracyPredictor(space).fit(list(seen.values()), [scores[k] for k in seen])
            guess = dict(zip((a.key for a in new), predictor.predict(new)))
            new = sorted(new, key=lambda a: guess[a.key], reverse=True)[: max(1, math.ceil(screen * len(new)))]
            kept = {a.key for a in new}
            children = [c for c in children if c.key in scores or c.key in kept]
        measured = fitness(new)
        if screen < 1.0 and len(new) > 1:
            tau = kendall_tau([guess[a.key] for a in new], measured)
        scores.update(zip((a.key for a in new), measured))
        seen.update((a.key, a) for a in new)
        pop = parents + children
        best = max(pop, key=lambda a: scores[a.key])
        gen = Generation(g + 1, (best, scores[best.key]), len(new), len(children) - len(new), tau)
        history.append(gen)
        if on_generation:
            on_generation(gen)
    best = max(pop, key=lambda a: scores[a.key])
    return EvolutionResult(best, scores[best.key], history)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and accuracy (higher)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best_acc = [], float("-inf")
    for i in order:
        if points[i][1] > best_acc:
            front.append(i)
            best_acc = points[i][1]
    return front
