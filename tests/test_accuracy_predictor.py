"""The accuracy predictor that pre-screens search children: encoding, fit, determinism."""
from __future__ import annotations

import random

from qnas_cli.accuracy_predictor import AccuracyPredictor, encode
from qnas_cli.ranking import kendall_tau
from qnas_cli.space import PRESETS, sample

SPACE = PRESETS["small"]


def _archs(n, seed):
    rng = random.Random(seed)
    return [sample(SPACE, "random", rng) for _ in range(n)]


def _truth(arch):
    """An accuracy-like target: more capacity helps, with diminishing returns, plus a resolution term."""
    cap = sum(b.expand * b.kernel * s.width for s in arch.stages for b in s.blocks)
    return 0.7 + 0.02 * cap ** 0.5 / 10 + 0.002 * arch.resolution


def test_the_encoding_has_one_length_and_one_hot_groups():
    lengths = {len(encode(SPACE, a)) for a in _archs(50, 0) + [sample(SPACE, "largest"), sample(SPACE, "smallest")]}
    assert len(lengths) == 1
    f = encode(SPACE, sample(SPACE, "smallest"))
    assert sum(f[: len(SPACE.resolutions)]) == 1.0 and set(f) <= {0.0, 1.0}


def test_it_ranks_unseen_subnets_and_the_fit_ignores_the_order_given():
    train, held_out = _archs(300, 1), _archs(100, 2)
    p = AccuracyPredictor(SPACE).fit(train, [_truth(a) for a in train])
    assert kendall_tau(p.predict(held_out), [_truth(a) for a in held_out]) > 0.7
    q = AccuracyPredictor(SPACE).fit(train[::-1], [_truth(a) for a in train[::-1]])
    assert p.predict(held_out) == q.predict(held_out)  # every torchrun rank fits the same predictor
