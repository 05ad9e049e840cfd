"""BRN's clip counter (mabn.renorm_clips): counts against a float64 hand computation, leaves the forward as it
is, and the fact it reports on: with nothing clipped, BRN's training output is its eval-mode output."""
import copy

import pytest
import torch
from torch import nn

from mabn.norms import BatchRenorm2d
from mabn.renorm_clips import RenormClipCounter


def _layer(r_max: float = 1.5, d_max: float = 0.5, t0: int = 0) -> BatchRenorm2d:
    torch.manual_seed(0)
    layer = BatchRenorm2d(6, norm_batch=2, t0=t0, r_ramp=1, d_ramp=1, r_max_final=r_max, d_max_final=d_max).double()
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(6) * 0.5)
        layer.running_std.copy_(torch.rand(6) + 0.5)
        layer.weight.copy_(torch.rand(6) + 0.5)
        layer.bias.copy_(torch.randn(6))
        layer.num_batches_tracked.fill_(10)
    return layer


def _input(n: int = 8) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 6, 4, 4, dtype=torch.float64) * torch.linspace(0.3, 2.0, 6)[:, None, None] + 0.2


def _by_hand(layer: BatchRenorm2d, x: torch.Tensor) -> tuple[int, int, int]:
    """(r clipped, d clipped, pairs) from each group's mean and biased variance, computed here in float64."""
    r_max, d_max = layer.r_max_final, layer.d_max_final
    r_clipped = d_clipped = pairs = 0
    for group in x.split(layer.norm_batch):
        var, mean = torch.var_mean(group, dim=(0, 2, 3), unbiased=False)
        r = torch.sqrt(var + layer.eps) / layer.running_std
        d = (mean - layer.running_mean) / layer.running_std
        r_clipped += int(((r > r_max) | (r < 1 / r_max)).sum())
        d_clipped += int((d.abs() > d_max).sum())
        pairs += r.numel()
    return r_clipped, d_clipped, pairs


def test_counts_match_a_hand_computation_and_the_forward_is_untouched(device):
    layer, x = _layer().to(device), _input().to(device)
    plain = copy.deepcopy(layer).train()
    expected = _by_hand(layer, x)
    assert 0 < expected[0] < expected[2] and 0 < expected[1] < expected[2]  # some clipped, some not: the test can tell
    net = nn.Sequential(layer).train()
    with RenormClipCounter(net) as clips:
        y = net(x)
        net.eval()(x)  # eval-mode forwards are not counted
    rates = clips.rates()
    assert (rates["r"] * rates["pairs"], rates["d"] * rates["pairs"], rates["pairs"]) == pytest.approx(expected)
    assert rates["layers"] == {"0": {k: rates[k] for k in ("r", "d", "pairs")}}
    assert torch.equal(y, plain(x))
    assert all(torch.equal(a, b) for a, b in zip(layer.buffers(), plain.buffers()))
    assert not layer._forward_hooks and not layer._forward_pre_hooks  # removed on exit


def test_with_nothing_clipped_the_training_output_is_the_eval_mode_output(device):
    x = _input().to(device)
    for r_max, d_max, clipped in ((100.0, 100.0, False), (1.5, 0.5, True)):
        layer = _layer(r_max, d_max).to(device)
        eval_output = copy.deepcopy(layer).eval()(x)
        with RenormClipCounter(layer) as clips:
            train_output = layer.train()(x)
        rates = clips.rates()
        assert (rates["r"] + rates["d"] > 0) == clipped
        assert torch.allclose(train_output, eval_output, rtol=0, atol=1e-12) == (not clipped)


def test_before_t0_r_and_d_are_clipped_to_1_and_0_everywhere(device):
    layer = _layer(t0=100).to(device)  # iteration 11 of a plain-BN phase of 100: r_max = 1, d_max = 0
    with RenormClipCounter(layer) as clips:
        layer.train()(_input().to(device))
    assert (clips.rates()["r"], clips.rates()["d"]) == (1.0, 1.0)
