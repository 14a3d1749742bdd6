"""--sampling: which random subnets a sandwich step trains (uniform, stratified, kernels, small-kernels, WorstUp/BestUp)."""
from __future__ import annotations

import json
import random

import pytest
import torch

from qnas_cli.cli import app
from qnas_cli.cost import arch_cost
from qnas_cli.data import load_dataset, to_input
from qnas_cli.layers import QConvBN
from qnas_cli.quant import QuantConfig
from qnas_cli.sampling import SIZE_TOLERANCE, candidates
from qnas_cli.space import PRESETS, sample
from qnas_cli.supernet import Supernet
from qnas_cli.train import TrainConfig, distill_loss, pick_by_loss, sandwich, train
from tests.helpers import assert_same_weights, supernet_weights

FAST = dict(space="tiny", batch_size=32, eval_images=200, calib_images=64, warmup_steps=2, log_every=1)


@pytest.fixture(scope="module")
def small():
    space = PRESETS["small"]
    return space, (lambda a: arch_cost(space, a, 1, 10).mflops)


def test_uniform_draws_what_the_sandwich_always_drew(small):
    """The default replays the runs made before --sampling existed: the same generator calls."""
    space, size = small
    for step in range(20):
        rng = random.Random(7 * 1_000_003 + step)
        before = [sample(space, "largest"), sample(space, "smallest")] + [sample(space, "random", rng) for _ in range(2)]
        assert [c[0] for c in sandwich(space, 7, step, 2, size=size)] == before


@pytest.mark.parametrize("k", [2, 4])
def test_worst_and_best_candidates_share_one_size(small, k):
    space, size = small
    rng = random.Random(1)
    for _ in range(30):
        archs = candidates(space, rng, "worst", k, size)
        target = size(archs[0])
        assert len(archs) == k and len({a.key for a in archs}) > 1
        assert all(abs(size(a) - target) <= SIZE_TOLERANCE * target + 1e-9 for a in archs[1:])


def test_stratified_spreads_the_random_subnets_over_sizes(small):
    """Uniform over MFLOPs, not over choices: far more of the larger subnets, one candidate each,
    and the same draws for the same seed and step (a resumed run replays them)."""
    space, size = small
    draws = {how: [candidates(space, random.Random(s), how, 3, size) for s in range(300)] for how in ("uniform", "stratified")}
    assert all(len(c) == 1 for c in draws["stratified"])
    large = {how: sum(size(c[0]) >= 8 for c in cs) / len(cs) for how, cs in draws.items()}
    assert large["uniform"] < 0.15 and large["stratified"] > 0.4, large
    lo, hi = size(sample(space, "smallest")), size(sample(space, "largest"))
    assert all(lo <= size(c[0]) <= hi for c in draws["stratified"])
    again = [candidates(space, random.Random(s), "stratified", 3, size) for s in range(300)]
    assert [c[0].key for c in again] == [c[0].key for c in draws["stratified"]]


def test_kernels_sampling_trains_the_largest_with_random_kernels_half_the_time(small):
    """--sampling kernels: about half the slots are the largest subnet but for its kernels, drawn
    per block over every choice; the rest are uniform draws; seeded."""
    space, _ = small
    largest = sample(space, "largest")
    shape = lambda a: (a.resolution, [(s.width, [b.expand for b in s.blocks]) for s in a.stages])  # noqa: E731
    draws = [candidates(space, random.Random(s), "kernels", 3, None) for s in range(400)]
    assert all(len(c) == 1 for c in draws)
    elastic = [c[0] for c in draws if shape(c[0]) == shape(largest)]
    assert 0.4 < len(elastic) / len(draws) < 0.6
    kernels = [b.kernel for a in elastic for s in a.stages for b in s.blocks]
    assert {k: round(kernels.count(k) / len(kernels), 1) for k in set(kernels)} == {3: 0.3, 5: 0.3, 7: 0.3}
    assert sum(a.key == largest.key for a in elastic) < 3  # the kernels vary, not the largest again
    again = [candidates(space, random.Random(s), "kernels", 3, None) for s in range(400)]
    assert [c[0].key for c in again] == [c[0].key for c in draws]


@pytest.mark.parametrize("sampling", ["worst", "best"])
def test_pick_by_loss_takes_the_extreme_loss_and_leaves_bn_statistics_alone(sampling):
    space = PRESETS["tiny"]
    data = load_dataset("fashion-mnist")
    torch.manual_seed(0)
    model = Supernet(space, data.in_channels, data.num_classes, QuantConfig(mode="none")).train()
    cfg = TrainConfig(space="tiny", sampling=sampling)
    x, y = data.train.get(torch.arange(32))
    largest = sample(space, "largest")
    soft = model(to_input(x, data, largest.resolution), largest).detach()
    archs = [sample(space, "random", random.Random(s)) for s in range(4)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    picked = pick_by_loss(model, archs, x, data, soft, y, cfg, "cpu")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        losses = [distill_loss(model(to_input(x, data, a.resolution), a), soft, y, cfg).item() for a in archs]
    want = archs[(max if sampling == "worst" else min)(range(4), key=losses.__getitem__)]
    assert picked == want
    # ... and a plain training forward does move them, which the restore undid
    assert any(not torch.equal(m.running_mean, before[name + ".running_mean"])
               for name, m in model.named_modules() if isinstance(m, QConvBN))


def test_a_worst_up_run_resumes_bit_for_bit_and_differs_from_uniform(tmp_path):
    """The candidates and the pick are pure functions of (seed, step, weights): exact resume holds."""
    class Stop(Exception):
        pass

    cfg = lambda out, s="worst": TrainConfig(out=str(out), steps=4, ckpt_every=2, sampling=s, sampling_k=2, **FAST)  # noqa: E731
    train(cfg(tmp_path / "a"), log=lambda *a, **k: None)

    def crash(step, total, metrics):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        train(cfg(tmp_path / "b"), on_step=crash, log=lambda *a, **k: None)
    train(cfg(tmp_path / "b"), resume=True, log=lambda *a, **k: None)
    a = supernet_weights(tmp_path / "a")
    assert_same_weights(a, supernet_weights(tmp_path / "b"))
    train(cfg(tmp_path / "u", "uniform"), log=lambda *a, **k: None)
    u = supernet_weights(tmp_path / "u")
    assert any(not torch.equal(a[k], u[k]) for k in a)
    with pytest.raises(Exception, match="option 'sampling' differs"):
        train(cfg(tmp_path / "b", "best"), resume=True, log=lambda *a, **k: None)


def test_small_kernels_sampling_trains_the_largests_channels_with_the_smallest_kernel(small):
    """--sampling small-kernels: about half the slots are the largest's widths, depths and expands
    with every kernel the smallest choice, at resolutions spread over the choices; the rest uniform."""
    space, _ = small
    largest = sample(space, "largest")
    channels = lambda a: [(s.width, [b.expand for b in s.blocks]) for s in a.stages]  # noqa: E731
    draws = [candidates(space, random.Random(s), "small-kernels", 3, None)[0] for s in range(400)]
    wide = [a for a in draws if channels(a) == channels(largest) and {b.kernel for s in a.stages for b in s.blocks} == {3}]
    assert 0.4 < len(wide) / len(draws) < 0.6
    resolutions = [a.resolution for a in wide]
    assert set(resolutions) == set(space.resolutions)
    assert all(abs(resolutions.count(r) / len(wide) - 1 / len(space.resolutions)) < 0.1 for r in space.resolutions)
    again = [candidates(space, random.Random(s), "small-kernels", 3, None)[0] for s in range(400)]
    assert [a.key for a in again] == [a.key for a in draws]


def test_a_kernels_run_trains_and_records_its_sampling(runner, tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--space", "tiny", "--steps", "3", "--batch-size", "32", "--eval-images", "200",
                            "--calib-images", "64", "--sampling", "kernels", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "supernet.json").read_text())["config"]["sampling"] == "kernels"


@pytest.mark.parametrize("args, words", [
    (["--sampling", "greedy"], "--sampling: 'greedy' is not allowed"),
    (["--sampling", "worst", "--sampling-k", "1"], "--sampling-k must be an integer >= 2"),
])
def test_bad_sampling_exits_2_with_one_line_before_any_write(runner, tmp_path, args, words):
    r = runner.invoke(app, ["train", "--space", "tiny", "--out", str(tmp_path / "run"), *args])
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_checkpoint_from_before_the_option_resumes_as_uniform():
    from qnas_cli.train import with_added_defaults

    old = {"config": {"num_random": 1, "quant": {"mode": "int8"}}}
    config = with_added_defaults(old)["config"]
    assert (config["sampling"], config["sampling_k"]) == ("uniform", 3) and config["num_random"] == 1
    newer = {"config": {"sampling": "worst", "sampling_k": 5}}
    assert with_added_defaults(newer)["config"]["sampling"] == "worst"
