"""Batch-statistics recording: equal to statistics computed directly from the same tensors; off means no hooks."""
import json

import pytest
import torch

from mabn.batch_stats import BatchStatsRecorder, select_layers
from mabn.models import build_model


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
