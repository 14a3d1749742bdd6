"""The evolutionary search core: operators stay in the space, constraints hold, runs are seeded."""
from __future__ import annotations

import random

import pytest

from qnas_cli.errors import UserError
from qnas_cli.search import crossover, evolve, mutate, pareto_front
from qnas_cli.space import PRESETS, Arch, sample


def _valid(space, arch):
    return Arch.from_dict(arch.to_dict(space), space) == arch  # validation names any gene outside the space


@pytest.mark.parametrize("name", ["tiny", "small", "mbv3"])
def test_mutation_and_crossover_keep_subnets_in_the_space(name):
    space = PRESETS[name]
    rng = random.Random(0)
    for seed in range(300):
        a, b = sample(space, "random", random.Random(seed)), sample(space, "random", random.Random(seed + 1000))
        for child in (mutate(space, a, 0.5, rng), crossover(space, a, b, 0.5, rng), mutate(space, a, 1.0, rng)):
            assert _valid(space, child)
    a = sample(space, "largest")
    assert mutate(space, a, 0.0, rng) == a and crossover(space, a, sample(space, "smallest"), 0.0, rng) == a


def _toy_fitness(arch):
    """Bigger is better, as accuracy roughly is: total expand ratio and width."""
    return sum(b.expand * s.width for s in arch.stages for b in s.blocks) + arch.resolution


def _budget(arch):
    return sum(b.kernel * b.expand * s.width for s in arch.stages for b in s.blocks)


def test_evolution_improves_and_every_candidate_meets_the_constraint():
    space = PRESETS["small"]
    limit = 0.5 * _budget(sample(space, "largest"))
    seen = []

    def fitness(archs):
        seen.extend(archs)
        return [_toy_fitness(a) for a in archs]

    res = evolve(space, fitness, lambda a: _budget(a) <= limit, population=40, generations=8, seed=0)
    assert all(_budget(a) <= limit for a in seen)
    first = res.history[0].best[1]
    assert res.fitness >= first and res.fitness == _toy_fitness(res.best)
    assert res.fitness > max(_toy_fitness(sample(space, "random", random.Random(s))) for s in range(40)
                             if _budget(sample(space, "random", random.Random(s))) <= limit)
    assert sum(g.cache_hits for g in res.history) > 0  # survivors are never re-evaluated


def test_evolution_is_seeded():
    space = PRESETS["tiny"]
    run = lambda seed: evolve(space, lambda archs: [_toy_fitness(a) for a in archs], lambda a: True,  # noqa: E731
                              population=16, generations=3, seed=seed)
    assert [g.best[0].key for g in run(3).history] == [g.best[0].key for g in run(3).history]


def test_an_unmeetable_budget_is_an_error_not_a_loop():
    space = PRESETS["tiny"]
    with pytest.raises(UserError, match="relax the budget"):
        evolve(space, lambda archs: [0.0] * len(archs), lambda a: False, population=4, generations=1)
    with pytest.raises(UserError, match="--mutate-prob"):
        evolve(space, lambda archs: [0.0] * len(archs), lambda a: True, mutate_prob=1.5)


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.7), (1.5, 0.4), (3.0, 0.7), (0.5, 0.1), (2.5, 0.9)]
    assert pareto_front(pts) == [4, 0, 1, 5]


@pytest.mark.parametrize("how", ["largest", "smallest", "random"])
def test_cost_counts_what_the_integer_graph_holds(how):
    """Parameters and MACs from shapes alone equal those of the exported integer graph."""
    import numpy as np

    from qnas_cli.export.blocks import arch_graph
    from qnas_cli.export.graph import Conv, Linear
    from qnas_cli.export.onnx_export import tensor_shapes
    from qnas_cli.cost import arch_cost

    space = PRESETS["small"]
    arch = sample(space, how, random.Random(5))
    g = arch_graph(space, arch, 3, 10)
    shapes = tensor_shapes(g)
    params = sum(op.weight.size + op.bias.size for op in g.ops if isinstance(op, (Conv, Linear)))
    macs = sum(op.weight.size * (int(np.prod(shapes[op.output][2:])) if isinstance(op, Conv) else 1)
               for op in g.ops if isinstance(op, (Conv, Linear)))
    cost = arch_cost(space, arch, 3, 10)
    assert (cost.params, cost.macs, cost.ops) == (params, macs, len(g.ops))


def test_a_tight_but_feasible_budget_starts_from_the_seeds():
    """Few random subnets meet a tight budget: the first population grows from the feasible seeds."""
    space = PRESETS["small"]
    smallest = sample(space, "smallest")
    limit = _budget(smallest) * 1.05
    res = evolve(space, lambda archs: [_toy_fitness(a) for a in archs], lambda a: _budget(a) <= limit,
                 population=12, generations=2, seeds=(smallest,))
    assert _budget(res.best) <= limit
    with pytest.raises(UserError, match="relax the budget"):  # without a seed it cannot start
        evolve(space, lambda archs: [_toy_fitness(a) for a in archs], lambda a: _budget(a) <= limit,
               population=12, generations=2)


def test_screening_evaluates_a_share_of_the_children_and_still_finds_the_toy_optimum_region():
    """``screen``: the accuracy predictor picks which children are evaluated; every score the
    result holds was measured, and with a quarter of the evaluations it does about as well."""
    space = PRESETS["small"]
    limit = 0.5 * _budget(sample(space, "largest"))
    counts = {}

    def run(screen):
        calls = []

        def fitness(archs):
            calls.extend(archs)
            return [_toy_fitness(a) for a in archs]

        res = evolve(space, fitness, lambda a: _budget(a) <= limit, population=40, generations=8, seed=0, screen=screen)
        counts[screen] = len({a.key for a in calls})
        assert all(_budget(a) <= limit for a in calls) and res.fitness == _toy_fitness(res.best)
        assert res.best.key in {a.key for a in calls}  # the winner was evaluated, not predicted
        return res

    full, screened = run(1.0), run(0.25)
    assert counts[0.25] < 0.5 * counts[1.0]
    assert screened.fitness >= 0.97 * full.fitness
    taus = [g.predictor_tau for g in screened.history]  # on the ~7 children it chose: a restricted, noisy range
    assert None not in taus and sum(taus) / len(taus) > 0.25
    with pytest.raises(UserError, match="--screen"):
        evolve(space, lambda archs: [0.0] * len(archs), lambda a: True, screen=0.0)


def test_seeds_only_where_the_budget_needs_them_and_each_once():
    """The fastest subnets are the weakest: a loose budget starts from random subnets; a tight one
    from the distinct feasible ones random sampling rarely finds."""
    from qnas_cli.search_job import MAX_SEEDS, budget_seeds, random_candidates

    space = PRESETS["small"]
    candidates = random_candidates(space)
    costs = sorted(_budget(a) for a in candidates)
    assert budget_seeds(candidates, lambda a: _budget(a) <= costs[len(costs) // 2]) == ()  # half of them fit
    tight = costs[20]
    seeds = budget_seeds(candidates + candidates[:50], lambda a: _budget(a) <= tight)  # duplicates among them
    assert 0 < len(seeds) <= MAX_SEEDS and len({a.key for a in seeds}) == len(seeds)
    assert all(_budget(a) <= tight for a in seeds)

    first = []
    smallest = sample(space, "smallest")
    evolve(space, lambda archs: first.append(archs) or [_toy_fitness(a) for a in archs], lambda a: True,
           population=6, generations=1, seeds=(smallest,) * 4)
    assert [a.key for a in first[0]].count(smallest.key) == 1  # a repeated seed is one member, not four


def test_search_settings_are_checked_before_any_work():
    """Every option, the evolution's and the runtimes included, is refused by SearchConfig itself."""
    from qnas_cli.fitness import fitness_arithmetic
    from qnas_cli.search_job import SearchConfig

    for bad, says in (({"mutate_prob": 1.5}, "--mutate-prob"), ({"crossover_prob": float("nan")}, "--crossover-prob"),
                      ({"runtime": "typo"}, "--runtime"), ({"table_runtime": "micro"}, "--table-runtime"),
                      ({"generations": 0}, "--generations")):
        with pytest.raises(UserError, match=says):
            SearchConfig(budgets_ms=[1.0], **bad)
    # the arithmetic that scores (accuracy) and the runtime that is timed (latency) are two things
    assert [fitness_arithmetic(r) for r in ("xnnpack", "reference", "micro", "builtin")] == \
        ["xnnpack", "reference", "micro", "xnnpack"]  # builtin has no exact forward: XNNPACK's scores it
    assert [SearchConfig(budgets_ms=[1.0], runtime=r).timed_runtime for r in ("xnnpack", "reference", "micro", "builtin")] == \
        ["xnnpack", "xnnpack", "xnnpack", "builtin"]
    assert SearchConfig(budgets_ms=[1.0], runtime="micro", table_runtime="builtin").timed_runtime == "builtin"


def test_a_budget_or_limit_must_be_finite_and_resume_needs_an_earlier_search(tmp_path):
    """Found by benchmarks/fault_injection.py: --latency-ms inf started a search; --resume with no
    earlier search in --out started a new one (qnas train --resume refuses that)."""
    from qnas_cli.errors import UserError
    from qnas_cli.search_job import SearchConfig

    for kwargs, words in ((dict(budgets_ms=[float("inf")]), "--latency-ms"), (dict(budgets_ms=[1.0], flops_m=float("inf")), "--flops-m"),
                          (dict(budgets_ms=[1.0], resume=True), "holds no earlier search")):
        with pytest.raises(UserError, match=words):
            SearchConfig(out=str(tmp_path / "s"), **kwargs)
    assert not (tmp_path / "s").exists()
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "evaluations.jsonl").write_text("{}\n")
    SearchConfig(out=str(tmp_path / "s"), budgets_ms=[1.0], resume=True)  # an earlier search: accepted here, its identity checked later
