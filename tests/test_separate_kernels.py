"""--separate-kernels: each smaller depthwise kernel choice has weights of its own instead of the
centre of the larger kernel (issue 31's test of whether the shared taps make the kernel bias).
Only the subnets that choose a kernel train it; saved, loaded, extracted and --init-checked with
the supernet."""
from __future__ import annotations

import torch

from qnas_cli.cli import app
from qnas_cli.quant import QuantConfig
from qnas_cli.space import PRESETS, sample
from qnas_cli.supernet import Supernet, load_supernet
from qnas_cli.train import TrainConfig, train

FAST = dict(space="tiny", batch_size=32, eval_images=100, calib_images=64, warmup_steps=2, log_every=1, tensorboard=False)
QUIET = dict(log=lambda *a, **k: None)


def _own(net: Supernet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters() if ".own_kernels." in n}


def _grads(net: Supernet, arch) -> tuple[bool, bool]:
    """Whether the depthwise layers' shared (largest) kernels and their own smaller kernels got a gradient."""
    net.zero_grad(set_to_none=True)
    net(torch.randn(4, 1, arch.resolution, arch.resolution), arch).square().mean().backward()
    dws = [m for stage in net.stages for block in stage for m in [block.depthwise]]
    shared = any(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in dws)
    own = any(p.grad is not None and p.grad.abs().sum() > 0 for m in dws for p in m.own_kernels.values())
    return shared, own


def test_each_kernel_choice_trains_only_its_own_weights():
    space = PRESETS["tiny"]  # depthwise kernels 3 or 5
    torch.manual_seed(0)
    net = Supernet(space, 1, 10, QuantConfig(mode="none"), separate_kernels=True).train()
    names = _own(net)
    assert names and all(n.endswith(".3") for n in names)  # the largest kernel keeps the layer's weight
    assert all(v.shape[-2:] == (3, 3) for v in names.values())
    assert _grads(net, sample(space, "largest")) == (True, False)  # every kernel 5
    assert _grads(net, sample(space, "smallest")) == (False, True)  # every kernel 3
    sub = net.extract(sample(space, "smallest"))
    first = net.stages[0][0].depthwise
    mid = sub.stages[0][0].depthwise.weight.shape[0]
    assert torch.equal(sub.stages[0][0].depthwise.weight, first.own_kernels["3"][:mid].detach())


def test_a_run_trains_saves_and_reloads_them_and_init_must_match(tmp_path, runner):
    """Float then int8 with the option: both files hold the own kernels and the config records
    it; --init across the option is refused with one line, nothing written; so are both options."""
    train(TrainConfig(out=str(tmp_path / "sk"), steps=6, float_steps=3, separate_kernels=True, seed=1, **FAST), **QUIET)
    net, meta = load_supernet(tmp_path / "sk" / "supernet.pt")
    float_net, _ = load_supernet(tmp_path / "sk" / "float_supernet.pt")
    assert net.separate_kernels and float_net.separate_kernels and meta["config"]["separate_kernels"] is True
    assert _own(net).keys() == _own(float_net).keys() and _own(net)
    torch.manual_seed(1)
    fresh = _own(Supernet(PRESETS["tiny"], 1, 10, QuantConfig(mode="none"), separate_kernels=True))
    assert any(not torch.equal(fresh[n], v) for n, v in _own(float_net).items())  # trained in the float phase
    for args, says in ((["--init", str(tmp_path / "sk" / "float_supernet.pt")], "trained with --separate-kernels"),
                       (["--separate-kernels", "--kernel-transform"], "choose one")):
        out = tmp_path / "refused"
        r = runner.invoke(app, ["train", "--space", "tiny", "--steps", "2", "--out", str(out), *args])
        assert r.exit_code == 2 and says in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and not out.exists()
    train(TrainConfig(out=str(tmp_path / "plain"), steps=2, quant=QuantConfig(mode="none"), **FAST), **QUIET)
    out = tmp_path / "refused"  # the reverse: a plain float supernet into a separate-kernels run
    r = runner.invoke(app, ["train", "--space", "tiny", "--steps", "2", "--out", str(out), "--separate-kernels",
                            "--init", str(tmp_path / "plain" / "supernet.pt")])
    assert r.exit_code == 2 and "without --separate-kernels and this run is with" in r.output, r.output
    assert not out.exists()
