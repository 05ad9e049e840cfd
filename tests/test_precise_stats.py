"""Re-estimated inference statistics (mabn.precise_stats): equal-weight averages of each layer's own per-batch
estimate, computed with the final weights in training mode, on a copy of the network."""
import copy
import dataclasses

import pytest
import torch
from torch import nn

from mabn.evaluation import EvalSettings, evaluate_checkpoint
from mabn.norms import build_norm
from mabn.precise_stats import recompute_running_stats

from .conftest import finished_run

STATS = ("running_mean", "running_var", "running_std")


@pytest.fixture(scope="module")
def brn_run(tiny_shapes, tmp_path_factory):
    """A finished BRN run in groups of 2 whose r and d are at their final limits from the first step."""
    return finished_run(tiny_shapes, tmp_path_factory.mktemp("brn"), "norm=brn", "norm.norm_batch=2",
                        "norm.options.momentum=0.5", "norm.options.min_t0=0", "norm.options.t0_frac=0",
                        "norm.options.r_ramp_frac=0", "norm.options.d_ramp_frac=0")


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
    done = recompute_running_stats(net, _batches(), "cpu", progress=False, average="equal")
    precise = done.net
    assert done.layers == 2 and not precise.training and done.average == "equal" and done.trained_weight == 0
    assert (done.renorm_clips is None) == (norm != "brn")

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
    precise = recompute_running_stats(net, _batches(k=3, n=4), "cpu", progress=False).net
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
    done = recompute_running_stats(net, _batches(k=2), "cpu", progress=False)
    precise = done.net
    assert done.layers == 0
    x = _batches(k=1)[0][0]
    torch.testing.assert_close(precise(x), net.eval()(x), rtol=0, atol=0)


def test_evaluate_scores_the_reestimated_network_beside_the_trained_one(mabn_run, capsys):
    settings = EvalSettings(workers=0, progress=False, device="cpu", precise_images=20)
    record = evaluate_checkpoint(mabn_run, dataclasses.replace(settings, progress=True))
    assert (record["precise_layers"], record["precise_batch"], record["precise_images"]) == (20, 8, 24)
    # the re-estimation's bar knows its length (3 batches of 8), so it shows a percentage and an ETA
    bar = [d for d in capsys.readouterr().err.replace("\r", "\n").splitlines() if d.startswith("re-estimating")]
    assert "100%" in bar[-1] and "3/3" in bar[-1], bar
    assert record["precise"]["loss"] != record["trained"]["loss"]
    assert evaluate_checkpoint(mabn_run, settings)["precise"] == record["precise"]  # seeded: the same images
    with pytest.raises(ValueError, match="--precise-stats -1 is not valid"):
        evaluate_checkpoint(mabn_run, EvalSettings(workers=0, progress=False, precise_images=-1))


def test_ema_replays_the_layers_own_moving_average_from_the_trained_values():
    net = _net("bn", norm_batch=2)
    net[1].momentum = 0.3
    with torch.no_grad():
        net[1].running_mean.fill_(5.0)  # a trained value far from the data's: the replay must start from it
    done = recompute_running_stats(net, _batches(k=3, n=4), "cpu", progress=False, average="ema")
    precise = done.net
    assert done.trained_weight == pytest.approx(0.9 ** 3)  # the largest: the second layer keeps BN's momentum 0.1
    expected = net[1].running_mean.clone()
    with torch.no_grad():
        for images, _, _ in _batches(k=3, n=4):
            groups = net[0](images).split(2)
            expected = 0.7 * expected + 0.3 * torch.stack([g.mean(dim=(0, 2, 3)) for g in groups]).mean(0)
    torch.testing.assert_close(precise[1].running_mean, expected, rtol=1e-12, atol=1e-12)
    equal = recompute_running_stats(net, _batches(k=3, n=4), "cpu", progress=False).net  # auto: BN's is equal
    assert (equal[1].running_mean - expected).abs().min() > 0.1  # the trained 5.0 still weighs 0.7^3 in the replay
    with pytest.raises(ValueError, match="average='mean' is not valid; valid: auto, equal, ema"):
        recompute_running_stats(net, _batches(k=1), "cpu", progress=False, average="mean")


@pytest.mark.parametrize("norm, kwargs, average", [
    ("bn", dict(norm_batch=2), "equal"), ("brn", dict(norm_batch=2), "ema"), ("mabn", dict(norm_batch=2), "ema"),
])
def test_auto_replays_the_moving_averages_where_the_training_forward_reads_them(norm, kwargs, average):
    # BRN's r, d and MABN's r normalize by the running statistics: a layer's estimate depends on the layers before
    assert recompute_running_stats(_net(norm, **kwargs), _batches(k=2), "cpu", progress=False).average == average


def test_evaluate_counts_brns_clipped_r_and_d_in_the_reestimation_pass(brn_run, caplog):
    record = evaluate_checkpoint(brn_run, EvalSettings(workers=0, progress=False, device="cpu", precise_images=16))
    assert record["precise_average"] == "ema" and 0 < record["precise_trained_weight"] < 1
    assert "not self-consistent" not in caplog.text
    clips = record["precise_renorm_clips"]
    assert clips["pairs"] == sum(layer["pairs"] for layer in clips["layers"].values()) > 0
    assert 0 < clips["r"] < 1
    other = evaluate_checkpoint(brn_run, EvalSettings(workers=0, progress=False, device="cpu", precise_images=16,
                                                      precise_epoch=1, precise_average="equal"))
    assert other["precise"] != record["precise"]
    assert "not self-consistent" in caplog.text  # equal asked for explicitly on BRN: said to be a poor estimate


def test_more_images_than_an_epoch_continue_into_the_next_epochs(mabn_run):
    quiet = dict(workers=0, progress=False, device="cpu", precise_average="equal")
    one = evaluate_checkpoint(mabn_run, EvalSettings(**quiet, precise_images=80))  # 10 batches of 8: one epoch
    two = evaluate_checkpoint(mabn_run, EvalSettings(**quiet, precise_images=81))
    assert (one["precise_images"], one["precise_epochs"], two["precise_images"], two["precise_epochs"]) == (80, 1, 88, 2)
    assert two["precise"] != one["precise"]
    later = evaluate_checkpoint(mabn_run, EvalSettings(**quiet, precise_images=8, precise_epoch=1))
    assert later["precise"] != evaluate_checkpoint(mabn_run, EvalSettings(**quiet, precise_images=8))["precise"]


def test_held_brn_statistics_are_not_self_consistent_and_the_replayed_ones_are():
    # With r and d never clipped BRN normalizes by its running statistics, so the second layer's estimate depends
    # on the first layer's statistics: an equal-weight pass holding them at the trained values returns statistics
    # that a second pass (holding those) changes again; the joint replay's statistics nearly reproduce themselves.
    net = _net("brn", norm_batch=2, t0=0, r_ramp=1, d_ramp=1, r_max_final=1e6, d_max_final=1e6, momentum=0.05)
    with torch.no_grad():
        net[1].running_std.mul_(2.0)  # trained statistics off where they agree
    batches = _batches(k=4)

    def second_layer_drift(stats_net):  # how far one more held pass moves the second layer's mean
        again = recompute_running_stats(stats_net, batches, "cpu", progress=False, average="equal").net
        return (again[4].running_mean - stats_net[4].running_mean).abs().max().item()

    held = recompute_running_stats(net, batches, "cpu", progress=False, average="equal").net
    replayed = recompute_running_stats(net, batches * 150, "cpu", progress=False, average="ema").net
    assert second_layer_drift(held) > 0.05
    assert second_layer_drift(replayed) < second_layer_drift(held) / 20
    bn = recompute_running_stats(_net("bn", norm_batch=2), batches, "cpu", progress=False).net
    assert second_layer_drift(bn) < 1e-12  # BN normalizes by batch statistics: one held pass is self-consistent


@pytest.mark.parametrize("average", ["equal", "ema"])
def test_the_pass_normalizes_in_the_phase_training_ended_in(average):
    # A MABN layer trained one forward (warming up: current statistics, r = 1) must not cross into its moving
    # averages (forward 3 on) and r (forward 5 on) during the pass: it did, and a short run's re-estimated
    # network blew up (r against statistics of a few steps).
    torch.manual_seed(0)
    layer = build_norm("mabn", 3, window=2, warmup=3, renorm_start=4, momentum=0.5).double()
    net = nn.Sequential(layer)
    with torch.no_grad():
        net(torch.randn(4, 3, 5, 5, dtype=torch.float64))
    batches = [(torch.randn(4, 3, 5, 5, dtype=torch.float64) * (1 + k), torch.zeros(4), 0) for k in range(8)]
    done = recompute_running_stats(net, batches, "cpu", progress=False, average=average)
    assert int(done.net[0].num_batches_tracked) == 1
    chi = [images.pow(2).mean(dim=(0, 2, 3)) for images, _, _ in batches]  # each batch's own: warming up
    if average == "equal":
        expected = torch.stack(chi).mean(0)
    else:
        expected = layer.running_var.clone()
        for c in chi:
            expected = 0.5 * expected + 0.5 * c
    torch.testing.assert_close(done.net[0].running_var, expected, rtol=1e-12, atol=1e-12)
