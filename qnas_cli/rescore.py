"""The search's last stage: each budget's best candidates by the proxy fitness, re-scored as
`qnas export` will calibrate them, on the whole search split, before a winner is chosen.

Why: the proxy (``fitness.py``: 250 calibration images, a 1,000-2,000-image subset of the
search split) is cheap enough to rank thousands of subnets, but each of its scores carries about
1 pp of image-sampling noise, and the maximum of thousands of noisy scores is the subnet the noise
favoured most: benchmarks/search_regret.py measured the proxy's winners up to 1 pp below the best
subnet under the same budget on the test split. Re-scoring a handful of candidates on more images
costs a few evaluations, not a search.

A budget's shortlist is its ``top`` distinct evaluated subnets that meet it, best proxy first;
its winner is the best re-scored subnet that meets it (its own shortlist and any other budget's
that meets it, already re-scored: a looser budget never gets a worse winner). Re-scores are cached
like the fitness (``Fitness`` with this stage's identity, in ``rescores.jsonl``): ``--resume``
re-scores nothing twice, and a cache made with other calibration inputs is refused, never reused.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import calibrate
from .errors import UserError
from .fitness import cache_identity
from .space import Arch

RESCORE_FILE = "rescores.jsonl"
# Measured by benchmarks/search_regret.py (BENCHMARKS.md "Search: the winners' test regret"): on an
# exhaustively scored `tiny` supernet at the demo's search size (64 x 5, 2,000 images), K=3 cut the
# winners' mean test regret from 0.50 to 0.34 pp (a perfect last stage: 0.13) for 16% of that small
# search's time; K=8 reached 0.31 pp for 42%. A default-sized search pays under 1% for the same re-scores.
DEFAULT_TOP = 3
RULE = ("the highest re-scored top-1 among every re-scored subnet that meets the budget (its shortlist, the top "
        "{top} by search fitness, and any other budget's that meets it); ties: search fitness, then lower predicted latency")


def check_top(top: object) -> None:
    """``--rescore-top``: a non-negative integer (0 turns the stage off)."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise UserError(f"--rescore-top must be a non-negative integer (0: no re-scoring), got {top!r}")


def rescore_identity(supernet_sha256: str, data_spec: str, arithmetic: str) -> dict[str, Any]:
    """The re-scores' cache header: the subnet calibrated as `qnas calibrate`/`qnas export` do
    (``calibrate.CALIB_IMAGES``, read at call time) and scored on the whole search split."""
    return cache_identity(supernet_sha256, data_spec, calibrate.CALIB_IMAGES, None, arithmetic)


def shortlist(evaluated: list[Arch], fits: Callable[[Arch], bool], proxy: dict[str, float],
              latency: Callable[[Arch], float], top: int) -> list[Arch]:
    """The ``top`` distinct subnets of ``evaluated`` that meet a budget (``fits``), best ``proxy``
    first (ties: the faster first), as the proxy alone would rank them for the winner."""
    unique = {a.key: a for a in evaluated if fits(a)}.values()
    return sorted(unique, key=lambda a: (-proxy[a.key], latency(a), a.key))[:top]


def best_rescored(rescored: list[Arch], fits: Callable[[Arch], bool], rescore: dict[str, float],
                  proxy: dict[str, float], latency: Callable[[Arch], float]) -> Arch:
    """``RULE``: the winner among the re-scored subnets that meet the budget."""
    return max((a for a in rescored if fits(a)), key=lambda a: (rescore[a.key], proxy[a.key], -latency(a)))
