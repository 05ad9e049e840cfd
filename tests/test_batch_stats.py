"""Batch-statistics recording: equal to statistics computed directly from the same tensors; off means no hooks;
BRN's clip rates of a recorded iteration equal the clip counter's, and a compiled net never counts."""
import copy
import json
import math

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from mabn.batch_stats import BatchStatsRecorder, lag_layers, select_layers
from mabn.models import build_model
from mabn.norms import MABN2d, BatchRenorm2d
from mabn.renorm_clips import RenormClipCounter


@pytest.mark.parametrize("norm", ["bn", "brn", "mabn"])
def test_recorded_statistics_match_direct_computation(tmp_path, norm):
    torch.manual_seed(0)
    model = build_model("resnet18", norm=norm, num_classes=10, width=8, stem="small", norm_batch=2)
    layer = model.layer2[0].bn1
    seen = {}
    layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach().clone(), y=o.detach().clone()))
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)

    def capture_grad(m, i, o):
        o.register_hook(lambda g: seen.update(dy=g.detach().clone()))

    layer.register_forward_hook(capture_grad)
    recorder = BatchStatsRecorder({"layer2.0.bn1": layer}, channel=3, path=tmp_path / "stats.jsonl")
    for step in range(3):
        recorder.arm(grad_scale=4.0)
        x = torch.randn(4, 3, 16, 16)
        model(x).logsumexp(1).sum().backward()
        recorder.flush(step)
    record = json.loads((tmp_path / "stats.jsonl").read_text().splitlines()[-1])["layers"]["layer2.0.bn1"]

    c, b = 3, 2
    xs = seen["x"][:b, c].double()
    gamma, beta = layer.weight[c].double(), layer.bias[c].double()
    y_hat = (seen["y"][:b, c].double() - beta) / gamma
    g = seen["dy"][:b, c].double() * gamma * 4.0
    expected = {"mu_B": xs.mean(), "sigma2_B": xs.var(unbiased=False), "g_B": g.mean(), "Psi_B": (g * y_hat).mean()}
    for key, value in expected.items():
        assert abs(record[key] - value.item()) < 1e-6, key
    if norm == "mabn":
        assert abs(record["Psi_avg"] - layer.psi_ring[: min(int(layer.psi_seen), 16), c].mean().item()) < 1e-6
        assert abs(record["chi_avg"] - layer.chi_ring[: min(int(layer.chi_seen), 16), c].mean().item()) < 1e-6
        # while warming up MABN normalizes each group by its own second moment: y_hat = x / sqrt(chi_B + eps)
        z = seen["x"][:b, c].double() / torch.sqrt((seen["x"][:b, c].double() ** 2).mean() + 1e-5)
        assert torch.allclose(y_hat, z, atol=1e-5)
    else:
        assert abs(record["running_mean"] - layer.running_mean[c].item()) < 1e-6


def test_recording_off_registers_no_hooks(tiny_shapes, tmp_path):
    from .test_distributed import _job

    job = _job(tiny_shapes, tmp_path, 0, 1, "mabn")
    assert job.batch_stats is None
    assert not any(m._forward_hooks or m._backward_hooks for m in job.net.modules())


def test_default_layers_are_the_first_and_last_norm():
    model = build_model("resnet18", norm="bn", num_classes=10, width=8, stem="small")
    assert list(select_layers(model, None)) == ["bn1", "layer4.1.bn2"]


def _brn_net() -> nn.Sequential:
    """Two BRN layers with limits already open (t0 = 0) and running statistics that some groups clip against."""
    torch.manual_seed(0)
    layers = [BatchRenorm2d(8, norm_batch=2, t0=0, r_ramp=1, d_ramp=1, r_max_final=1.5, d_max_final=0.5) for _ in range(2)]
    for layer in layers:
        with torch.no_grad():
            layer.running_mean.copy_(torch.randn(8) * 0.5)
            layer.running_std.copy_(torch.rand(8) + 0.5)
            layer.num_batches_tracked.fill_(10)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), layers[0], nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), layers[1],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def test_brn_clip_rates_of_a_recorded_iteration_equal_the_clip_counters_and_only_armed_forwards_count(tmp_path):
    net = _brn_net()
    recorder = BatchStatsRecorder(select_layers(net, None), path=tmp_path / "stats.jsonl", net=net)
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    net(x).sum().backward()  # not armed: nothing counted
    assert all(int(c.sum()) == 0 for c in recorder.clips.counts.values())
    reference = copy.deepcopy(net)
    recorder.arm()
    net(x).sum().backward()
    recorder.flush(7)
    with RenormClipCounter(reference) as clips:
        reference(x)
    expected = clips.rates()
    line = json.loads((tmp_path / "stats.jsonl").read_text())
    assert line["step"] == 7 and 0 < expected["r"] < 1 and 0 < expected["d"] < 1  # some clipped, not all
    assert line["brn_clips"]["r"] == expected["r"] and line["brn_clips"]["d"] == expected["d"]
    assert line["brn_clips"]["layers"] == {name: [v["r"], v["d"]] for name, v in expected["layers"].items()}
    recorder.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_no_brn_no_clip_record():
    model = build_model("resnet18", norm="mabn", num_classes=10, width=8, stem="small", norm_batch=2)
    assert BatchStatsRecorder(select_layers(model, None), net=model).clips is None


def test_a_compiled_brn_net_with_the_recorder_counts_nothing_and_compiles_once_around_recorded_iterations():
    torch._dynamo.reset()
    counters.clear()
    net = _brn_net()
    recorder = BatchStatsRecorder(select_layers(net, None), net=net)
    compiled = torch.compile(net, backend="aot_eager_decomp_partition", fullgraph=True)
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        armed = step == 2  # a recorded iteration runs the eager net, as the trainer does
        if armed:
            recorder.arm()
        (net if armed else compiled)(torch.randn(8, 3, 6, 6, generator=gen)).sum().backward()
        pairs = sum(int(c[2]) for c in recorder.clips.counts.values())
        assert pairs == (2 * 4 * 8 if armed else 0), step  # 2 layers x 4 groups x 8 channels
        if armed:
            recorder.flush(step)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_mabn_lag_over_all_channels_is_the_closed_form_of_a_geometrically_growing_input(tmp_path):
    # x_t = base * s^t: chi_B grows by s^2 a step, so once the ring is full the SMA over the last m steps
    # sits at mean_j s^(-2j) of the current chi_B in every channel; the summary must say so, negative.
    m, s = 4, 1.1
    torch.manual_seed(0)
    layer = MABN2d(6, window=m, warmup=m, eps=1e-12)
    net = nn.Sequential(layer)
    recorder = BatchStatsRecorder({}, path=tmp_path / "stats.jsonl", lag_layers=lag_layers(net))
    assert list(recorder.lag_layers) == ["0"]
    base = torch.randn(4, 6, 5, 5, dtype=torch.float64).float()
    for t in range(8):
        recorder.arm()
        layer(base * s ** t).sum().backward()
        recorder.flush(t)
    median, abs_log = json.loads((tmp_path / "stats.jsonl").read_text().splitlines()[-1])["lag"]["0"]
    ratio = sum(s ** (-2 * j) for j in range(m)) / m
    assert median == pytest.approx(ratio - 1, rel=1e-4) and median < -0.1
    assert abs_log == pytest.approx(-math.log(ratio), rel=1e-4)


def test_brn_lag_is_its_running_variance_against_the_last_groups_own_and_only_with_all_layers(tmp_path):
    net = _brn_net()
    assert BatchStatsRecorder(select_layers(net, None), net=net).lag_layers == {}
    recorder = BatchStatsRecorder({}, path=tmp_path / "stats.jsonl", lag_layers=lag_layers(net))
    seen = {}
    net[1].register_forward_hook(lambda mod, i, o: seen.update(x=i[0].detach().double()))
    recorder.arm()
    net(torch.randn(8, 3, 6, 6)).sum().backward()
    recorder.flush(3)
    lag = json.loads((tmp_path / "stats.jsonl").read_text())["lag"]
    assert list(lag) == ["1", "4"]
    own = seen["x"][-2:].var((0, 2, 3), unbiased=False)  # BRN's groups are of norm_batch = 2
    ratio = (net[1].running_std.double() ** 2 + net[1].eps) / (own + net[1].eps)
    assert lag["1"] == pytest.approx([(ratio - 1).median().item(), ratio.log().abs().mean().item()], rel=1e-6)
    recorder.arm()
    net.eval()
    net(torch.randn(8, 3, 6, 6))  # an eval forward records nothing
    recorder.flush(4)
    assert "lag" not in json.loads((tmp_path / "stats.jsonl").read_text().splitlines()[-1])
