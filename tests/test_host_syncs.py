"""A training step reads nothing back to the host and makes no tensor from host data, for every norm.

On a GPU each `.item()`/`bool(tensor)` (`_local_scalar_dense`) waits for the device, and each tensor made
from Python data (`lift_fresh`, e.g. indexing with a list) is a host-to-device copy: the eager MABN ring
write once did the latter in every layer (106 syncs a ResNet-50 step on the H100, docs/results/gpu.md).
Both are visible on CPU as dispatched ops, so this test guards what `make gpu-check` measures there.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mabn.models import build_model

HOST_OPS = {"_local_scalar_dense", "lift_fresh", "lift_fresh_copy"}

CASES = {
    "bn": dict(norm="bn"),
    "bn b=2": dict(norm="bn", norm_batch=2),
    "brn b=2": dict(norm="brn", norm_batch=2),
    "gn": dict(norm="gn"),
    "ln": dict(norm="ln"),
    "in": dict(norm="in"),
    "mabn b=N, warmup": dict(norm="mabn", warmup=100),
    "mabn b=2, warmup": dict(norm="mabn", norm_batch=2, warmup=100),
    "mabn b=N, averages": dict(norm="mabn", warmup=2, renorm_start=100),
    "mabn b=N, averages and r": dict(norm="mabn", warmup=2, renorm_start=3),
    "mabn b=2, averages and r": dict(norm="mabn", norm_batch=2, warmup=2, renorm_start=3),
    "mabn ema b=2": dict(norm="mabn", norm_batch=2, warmup=2, renorm_start=3, average="ema"),
}


class HostOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_OPS:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_has_no_host_reads_or_host_made_tensors(case):
    torch.manual_seed(0)
    net = build_model("resnet18", num_classes=10, width=4, stem="small", **CASES[case]).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    for _ in range(5):  # past the phase changes the case asks for
        step()
    with HostOps() as mode:
        step()
    assert mode.seen == [], f"{case}: {mode.seen}"


def test_the_check_sees_a_list_index_and_an_item():
    """The guard itself: the two patterns it exists for are caught on CPU."""
    ring, rows = torch.zeros(4, 3), torch.ones(2, 3)
    with HostOps() as mode:
        ring[[0, 1]] = rows
        ring.sum().item()
    assert mode.seen == ["lift_fresh", "_local_scalar_dense"]
