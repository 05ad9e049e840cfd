"""Re-estimated inference statistics (mabn.precise_stats): equal-weight averages of each layer's own per-batch
estimate, computed with the final weights in training mode, on a copy of the network."""
import copy

import pytest
import torch
from torch import nn

from mabn.evaluation import EvalSettings, evaluate_checkpoint
from mabn.norms import build_norm
from mabn.precise_stats import recompute_running_stats

STATS = ("running_mean", "running_var", "running_std")


def _net(norm: str, **kwargs) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), build_norm(norm, 6, **kwargs), nn.ReLU(), nn.Conv2d(6, 4, 3),
                         build_norm(norm, 4, **kwargs)).double()


def _batches(k: int = 5, n: int = 4):
    torch.manual_seed(1)
    return [(torch.randn(n, 3, 8, 8, dtype=torch.float64) * 2 + 1, torch.zeros(n), 0) for _ in range(k)]


def _stats(net: nn.Module) -> dict:
    return {f"{i}.{name}": getattr(m, name).clone() for i, m in enumerate(net) for name in STATS if hasattr(m, name)}


@pytest.mark.parametrize("norm, kwargs", [
    ("bn", dict(norm_batch=2)), ("bn", {}), ("brn", dict(norm_batch=2, t0=0, r_ramp=1, d_ramp=1)),
    ("mabn", dict(norm_batch=2, window=2, warmup=1)),
])
def test_each_statistic_is_the_equal_weight_average_of_the_layers_own_per_batch_estimates(norm, kwargs):
    net = _net(norm, **kwargs)
    before = copy.deepcopy(net.state_dict())
    precise, layers = recompute_running_stats(net, _batches(), "cpu", progress=False)
    assert layers == 2 and not precise.training

    # Reference: each batch's own estimate, read off a copy whose update replaces its statistics, which are put
    # back to the trained ones after every batch (what the next batch normalizes with); averaged by hand.
    replacing = copy.deepcopy(net).train()
    for m in replacing:
        if hasattr(m, "momentum"):
            m.momentum = 0.0 if norm == "mabn" else 1.0
    trained = _stats(replacing)
    per_batch = []
    with torch.no_grad():
        for images, _, _ in _batches():
            replacing(images)
            per_batch.append(_stats(replacing))
            for name, value in trained.items():
                index, stat = name.split(".")
                getattr(replacing[int(index)], stat).copy_(value)
    for name, value in _stats(precise).items():
        expected = torch.stack([stats[name] for stats in per_batch]).mean(0)
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
        assert not torch.equal(value, before[name])
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the original is untouched


def test_bn_statistics_match_a_float64_hand_computation_over_groups_and_batches():
    net = _net("bn", norm_batch=2)
    precise, _ = recompute_running_stats(net, _batches(k=3, n=4), "cpu", progress=False)
    conv = net[0]
    means, variances = [], []
    with torch.no_grad():
        for images, _, _ in _batches(k=3, n=4):
            for group in conv(images).split(2):
                means.append(group.mean(dim=(0, 2, 3)))
                variances.append(group.var(dim=(0, 2, 3), unbiased=True))
    torch.testing.assert_close(precise[1].running_mean, torch.stack(means).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(precise[1].running_var, torch.stack(variances).mean(0), rtol=1e-12, atol=1e-12)


def test_norms_without_statistics_are_left_as_they_are():
    net = _net("gn", num_groups=2)
    precise, layers = recompute_running_stats(net, _batches(k=2), "cpu", progress=False)
    assert layers == 0
    x = _batches(k=1)[0][0]
    torch.testing.assert_close(precise(x), net.eval()(x), rtol=0, atol=0)


def test_evaluate_scores_the_reestimated_network_beside_the_trained_one(mabn_run):
    settings = EvalSettings(workers=0, progress=False, device="cpu", precise_images=20)
    record = evaluate_checkpoint(mabn_run, settings)
    assert (record["precise_layers"], record["precise_batch"], record["precise_images"]) == (20, 8, 24)
    assert record["precise"]["loss"] != record["trained"]["loss"]
    assert evaluate_checkpoint(mabn_run, settings)["precise"] == record["precise"]  # seeded: the same images
    with pytest.raises(ValueError, match="--precise-stats -1 is not valid"):
        evaluate_checkpoint(mabn_run, EvalSettings(workers=0, progress=False, precise_images=-1))
