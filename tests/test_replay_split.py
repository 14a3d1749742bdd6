"""benchmarks.replay_split: each arm replays exactly one half of the float phase's draws."""
from __future__ import annotations

import pytest

import qnas_cli.train as train_module
from benchmarks.replay_split import split_run
from qnas_cli.data import epoch_batches
from qnas_cli.quant import QuantConfig
from qnas_cli.train import TrainConfig, train

FAST = dict(space="tiny", batch_size=32, eval_images=100, calib_images=64, warmup_steps=2, log_every=1, tensorboard=False)


@pytest.mark.parametrize("replay, subnet_draws, data_draws", [("data", [3, 4, 5], [0, 1, 2]), ("subnets", [0, 1, 2], [3, 4, 5])])
def test_each_arm_replays_one_half(tmp_path, monkeypatch, replay, subnet_draws, data_draws):
    log = lambda *a, **k: None  # noqa: E731
    train(TrainConfig(out=str(tmp_path / "float"), steps=3, quant=QuantConfig(mode="none"), **FAST), log=log)
    seen: dict[str, list] = {"subnets": [], "data": [], "augment": []}
    sandwich, step_fn = train_module.sandwich, train_module.train_step

    def record_sandwich(space, seed, step, *a, **k):
        seen["subnets"].append(step)
        return sandwich(space, seed, step, *a, **k)

    def record_step(model, opt, data, space, idx, step, *a, **k):
        seen["data"].append(idx.tolist())
        seen["augment"].append(step)  # train_step seeds the augmentation with its step argument
        return step_fn(model, opt, data, space, idx, step, *a, **k)

    monkeypatch.setattr(train_module, "sandwich", record_sandwich)
    monkeypatch.setattr(train_module, "train_step", record_step)
    split_run(TrainConfig(out=str(tmp_path / replay), init=str(tmp_path / "float" / "supernet.pt"), steps=3, **FAST),
              replay, float_steps=3)
    batches = epoch_batches(55000, 32, 0, 0)  # Fashion-MNIST's 55,000 training images: 1,718 steps, all six draws in epoch 0
    assert seen["subnets"] == subnet_draws
    assert seen["data"] == [batches[k].tolist() for k in data_draws]
    assert seen["augment"] == data_draws
