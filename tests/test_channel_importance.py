"""OFA's channel sorting (benchmarks/channel_importance.py): a permutation the largest subnet cannot see."""
from __future__ import annotations

import pytest
import torch

from benchmarks.channel_importance import expanding_blocks, importance, largest_output, report, sort_mid_channels
from tests.conftest import make_supernet


@pytest.mark.parametrize("mode", ["none", "int8"])
def test_sorting_puts_the_most_important_mid_channels_first_and_keeps_the_largest_subnet(mode):
    net = make_supernet(mode, kernel_transform=mode == "none")
    before = largest_output(net)
    changed = [importance(b).clone() for _, b, _ in expanding_blocks(net)]
    sort_mid_channels(net)
    assert torch.allclose(largest_output(net), before, rtol=1e-4, atol=1e-5)
    for old, (_, block, _) in zip(changed, expanding_blocks(net)):
        new = importance(block)
        assert torch.allclose(new, old.sort(descending=True).values)  # the same channels, most important first
    assert all(r["top_in_prefix"] == 1.0 for r in report(net))
    assert any(r["top_in_prefix"] < 1.0 for r in report(make_supernet(mode)))  # a fresh supernet is not sorted
