"""train.compile: every norm compiles without graph breaks; MABN compiles one training graph per phase
(warmup, averaging, averaging with r) however far its counters advance, and trains as eager does.

Compiled and eager training are compared in float64: at a normalization batch of 2 the float32
rounding differences of a reordered reduction grow by ~100x per SGD step, so float32 losses part
after a few steps even when the math is the same; in float64 they agree to ~1e-13 through every phase.
"""
import copy
import json
import math
import subprocess

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import mabn.compile
from mabn.compile import compile_model
from mabn.models import build_model
from mabn.norms import MABN2d, build_norm

from .conftest import train_command

WARMUP, RENORM_START, WINDOW = 3, 6, 2  # phases: t < 3 warmup, 3..6 averaging, t > 6 r on
# AOTAutograd with inductor's decompositions and min-cut partitioner (what decides which forward
# values the backward recomputes), without the C++ code generation: inductor's semantics, fast.
BACKEND = "aot_eager_decomp_partition"


def tiny_net(norm: str, **options) -> nn.Module:
    def norm_layer(c):
        return build_norm(norm, c, **options)

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm_layer(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                         norm_layer(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).double()


def train_side_by_side(eager: nn.Module, compiled: nn.Module, net_compiled: nn.Module, steps: int, batch: int = 8,
                       size: int = 8, seed: int = 1):
    """SGD steps on the same float64 batches (drawn from `seed`); returns the per-step (eager, compiled) losses."""
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    opt_c = torch.optim.SGD(net_compiled.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(batch, 3, size, size, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 5, (batch,), generator=gen)
        pair = []
        for model, opt in ((eager, opt_e), (compiled, opt_c)):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pair.append(loss.item())
        losses.append(pair)
    return losses


@pytest.mark.parametrize("options", [dict(norm_batch=2), dict(norm_batch=2, average="ema"), dict(norm_batch=None)],
                         ids=["sma-b2", "ema-b2", "sma-whole-batch"])
def test_mabn_compiles_one_graph_per_phase_and_trains_as_eager(options):
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    net = tiny_net("mabn", warmup=WARMUP, renorm_start=RENORM_START, window=WINDOW, **options)
    eager = copy.deepcopy(net)
    compiled = compile_model(net, backend=BACKEND, fullgraph=True)
    losses = train_side_by_side(eager, compiled, net, steps=RENORM_START + 4)
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])  # warmup, averaging, r on
    losses += train_side_by_side(eager, compiled, net, steps=5)  # counters advance further: no new graph
    assert counters["stats"]["unique_graphs"] == 3
    assert not counters["graph_break"]
    for step, (e, c) in enumerate(losses):
        assert c == pytest.approx(e, rel=1e-10, abs=1e-12), f"step {step + 1}: eager {e}, compiled {c}"
    for (name, a), b in zip(eager.state_dict().items(), net.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
    layer = net[1]
    assert int(layer.num_batches_tracked) == RENORM_START + 9 and layer.compiled_phase == (True, True)
    eager.eval(), compiled.eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-10, atol=1e-12)
    assert counters["stats"]["unique_graphs"] == 4  # and one for eval


@pytest.mark.parametrize("static_buffers", [False, True])
def test_eager_forwards_mixed_in_keep_the_phase_right(static_buffers):
    """The trainer runs batch-statistics micro-batches eagerly between compiled ones: same counters."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    net = tiny_net("mabn", norm_batch=2, warmup=WARMUP, renorm_start=RENORM_START, window=WINDOW)
    reference = copy.deepcopy(net)
    compiled = compile_model(net, backend=BACKEND, static_buffers=static_buffers)
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    for t in range(1, 12):
        model = net if t % 3 == 0 else compiled  # every third forward eager
        model(x).sum().backward()
        reference(x).sum().backward()
        assert int(net[1].num_batches_tracked) == t
    for (name, a), b in zip(reference.state_dict().items(), net.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("norm", ["mabn", "brn"])
def test_static_buffers_keep_every_buffer_in_its_tensor_and_train_as_eager(norm, monkeypatch):
    """compile_model(mode="reduce-overhead") (CUDA graphs on a GPU) copies what a compiled forward rebound back
    into the buffers' own tensors before the next call: each forward reads the same tensors, the math is
    eager's through every phase, no graph is added, and MABN's host counters stay trusted (no device read)."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    options = dict(norm_batch=2, warmup=WARMUP, renorm_start=RENORM_START, window=WINDOW) if norm == "mabn" \
        else dict(norm_batch=2, t0=2, r_ramp=3, d_ramp=3)
    net = tiny_net(norm, **options)
    eager = copy.deepcopy(net)
    homes = dict(net.named_buffers())
    hits, read_counter = [], mabn.compile.read_counter

    def spy(layer, name):  # does the phase hook find the counter's host copy valid (no device read)?
        cached, buffer = layer._host_counters.get(name), getattr(layer, name)
        hits.append(cached is not None and cached[0] is buffer and cached[1] == buffer._version)
        return read_counter(layer, name)

    monkeypatch.setattr(mabn.compile, "read_counter", spy)
    compiled = compile_model(net, mode="reduce-overhead", backend=BACKEND, fullgraph=True)
    seen = []
    compiled.register_forward_pre_hook(lambda module, args: seen.append(all(b is homes[n] for n, b in net.named_buffers())))
    losses = train_side_by_side(eager, compiled, net, steps=RENORM_START + 4)
    assert all(seen) and len(seen) == RENORM_START + 4
    assert counters["stats"]["unique_graphs"] == (3 if norm == "mabn" else 1) and not counters["graph_break"]
    for step, (e, c) in enumerate(losses):
        assert c == pytest.approx(e, rel=1e-10, abs=1e-12), f"step {step + 1}: eager {e}, compiled {c}"
    for (name, a), b in zip(eager.state_dict().items(), net.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
    if norm == "mabn":  # two layers: one miss each on the first step, then the host copies hold
        assert len(hits) == 2 * (RENORM_START + 4) and hits[2:] == [True] * (len(hits) - 2)


def test_compiled_mabn_without_compile_model_says_how():
    layer = MABN2d(4, norm_batch=2).train()
    with pytest.raises(Exception, match="compile with mabn.compile.compile_model"):
        torch.compile(layer, backend="eager", fullgraph=True)(torch.randn(4, 4, 3, 3))


@pytest.mark.parametrize("norm", ["bn", "gn", "ln", "in", "brn", "mabn"])
def test_every_norm_compiles_in_one_graph_and_matches_eager(norm):
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    options = dict(norm_batch=2) if norm in ("bn", "brn", "mabn") else {}
    if norm == "brn":
        options.update(t0=2, r_ramp=3, d_ramp=3)
    if norm == "mabn":
        options.update(warmup=0, renorm_start=0)  # steady state from the start: one graph
    net = tiny_net(norm, **options)
    eager = copy.deepcopy(net)
    compiled = compile_model(net, backend=BACKEND, fullgraph=True)
    for e, c in train_side_by_side(eager, compiled, net, steps=6):
        assert c == pytest.approx(e, rel=1e-10, abs=1e-12)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


@pytest.mark.slow
def test_inductor_resnet_with_mabn_trains_as_eager():
    """The real backend (C++ kernels on CPU): a narrow ResNet-18 through all three MABN phases."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    net = build_model("resnet18", norm="mabn", num_classes=5, width=8, stem="small", norm_batch=2,
                      warmup=WARMUP, renorm_start=RENORM_START, window=WINDOW).double()
    eager = copy.deepcopy(net)
    compiled = compile_model(net)
    losses = train_side_by_side(eager, compiled, net, steps=RENORM_START + 2, size=16)
    for step, (e, c) in enumerate(losses):
        assert c == pytest.approx(e, rel=1e-10), f"step {step + 1}: eager {e}, compiled {c}"
    assert counters["stats"]["unique_graphs"] == 3 and not counters["graph_break"]


def test_compile_mode_is_checked():
    with pytest.raises(ValueError, match="compile mode 'fast' is not valid; valid: default, reduce-overhead"):
        compile_model(nn.Linear(2, 2), mode="fast")


def _logged_losses(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


@pytest.mark.slow
def test_train_compile_true_end_to_end(tiny_shapes, tmp_path):
    """`python -m mabn.train train.compile=true` with MABN crossing its phases, batch statistics recorded
    (eager micro-batches between compiled ones), a checkpoint and an eval each epoch: it trains, and its
    float32 losses equal the eager run's while MABN is warming up (afterwards float32 trajectories of the
    two part, see the module docstring; the float64 tests above pin the math through every phase)."""
    common = ["norm=mabn", "data.batch_per_gpu=8", "norm.norm_batch=4", "model.width=16", "norm.options.warmup=4",
              "norm.options.renorm_start=8", "schedule.epochs=2", "stats.enabled=true", "stats.every=3",
              "train.deterministic=true", "train.log_every=1"]
    runs = {}
    for flag in ("false", "true"):
        out = subprocess.run(train_command(tiny_shapes, tmp_path / flag, *common, f"train.compile={flag}"),
                             capture_output=True, text=True, timeout=1200)
        assert out.returncode == 0, out.stderr[-3000:]
        run_dir = tmp_path / flag / "train" / "shapes10-resnet18_cpu-mabn-b4-n8-s0"
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["event"] == "finished"
        runs[flag] = _logged_losses(run_dir)
    eager, compiled = runs["false"], runs["true"]
    assert len(compiled) == len(eager) == 20 and all(math.isfinite(v) for v in compiled)
    assert compiled[:3] == pytest.approx(eager[:3], rel=1e-5)  # forwards 1-3: warmup, before any averaging
