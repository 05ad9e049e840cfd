"""MABN against an independent step-by-step float64 reference written from SPEC §2."""
import pytest
import torch

from mabn.norms import MABN2d

EPS = 1e-5
TOL = dict(rtol=0, atol=1e-10)


class ReferenceMABN:
    """SPEC §2, one normalization group at a time, with plain Python lists as the windows."""

    def __init__(self, c, norm_batch, window, warmup, renorm_start, average="sma", fwd=True, bwd=True, renorm=True):
        self.b, self.m, self.warmup, self.renorm_start = norm_batch, window, warmup, renorm_start
        self.average, self.fwd, self.bwd, self.renorm = average, fwd, bwd, renorm
        self.chi_history, self.psi_history = [], []
        self.chi_ema = self.psi_ema = None
        self.running_var = torch.ones(c, dtype=torch.float64)
        self.t = 0
        self.r_clipped = 0

    def _average(self, history, stat, which):
        history.append(stat)
        if self.average == "sma":
            return torch.stack(history[-self.m :]).mean(0)
        alpha = 2.0 / (self.m + 1)
        previous = getattr(self, which)
        value = stat if previous is None else (1 - alpha) * previous + alpha * stat
        setattr(self, which, value)
        return value

    def _use_average(self, history, enabled):
        return enabled and len(history) > self.m and self.t >= self.warmup

    def forward(self, x, gamma, beta):
        self.t += 1
        self.saved = []
        ys, group_vars = [], []
        for k in range(x.shape[0] // self.b):
            xs = x[k * self.b : (k + 1) * self.b]
            chi = (xs**2).mean(dim=(0, 2, 3))
            averaged = self._average(self.chi_history, chi, "chi_ema")
            var = averaged if self._use_average(self.chi_history, self.fwd) else chi
            r = torch.ones_like(var)
            if self.renorm and self.t > max(self.renorm_start, self.warmup):
                raw = (var + EPS).sqrt() / (self.running_var + EPS).sqrt()
                r = raw.clamp(1 / 5, 5)
                self.r_clipped += int((r != raw).sum())
            z = xs / (var + EPS).sqrt()[:, None, None]
            ys.append(gamma[:, None, None] * r[:, None, None] * z + beta[:, None, None])
            group_vars.append(var)
            self.saved.append((z, var, r))
        self.running_var = 0.98 * self.running_var + 0.02 * torch.stack(group_vars).mean(0)
        return torch.cat(ys)

    def backward(self, dy, gamma):
        dxs, dgamma, dbeta = [], 0, 0
        for k, (z, var, r) in enumerate(self.saved):
            dys = dy[k * self.b : (k + 1) * self.b]
            g = dys * (gamma * r)[:, None, None]
            psi = (g * z).mean(dim=(0, 2, 3))
            averaged = self._average(self.psi_history, psi, "psi_ema")
            mean_gz = averaged if self._use_average(self.psi_history, self.bwd) else psi
            dxs.append((g - z * mean_gz[:, None, None]) / (var + EPS).sqrt()[:, None, None])
            dgamma = dgamma + (dys * r[:, None, None] * z).sum(dim=(0, 2, 3))
            dbeta = dbeta + dys.sum(dim=(0, 2, 3))
        return torch.cat(dxs), dgamma, dbeta


def chronological(ring, seen):
    m = ring.shape[0]
    order = [(seen + i) % m for i in range(m)]
    return ring[order][-min(seen, m) :]


SETTINGS = {
    "one_group": dict(n=4, norm_batch=4),
    "ghost_groups": dict(n=6, norm_batch=2),
    "ema": dict(n=6, norm_batch=2, average="ema"),
    "forward_only": dict(n=4, norm_batch=2, average_backward=False),
    "backward_only": dict(n=4, norm_batch=2, average_forward=False),
    "no_renorm": dict(n=4, norm_batch=2, renorm=False),
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_mabn_matches_reference_through_every_phase(device, setting):
    opts = dict(SETTINGS[setting])
    n, b = opts.pop("n"), opts.pop("norm_batch")
    c, window, warmup, renorm_start, iters = 3, 4, 6, 15, 32
    torch.manual_seed(0)
    layer = MABN2d(c, norm_batch=b, window=window, warmup=warmup, renorm_start=renorm_start, **opts)
    layer = layer.double().to(device)
    ref = ReferenceMABN(
        c, b, window, warmup, renorm_start, average=opts.get("average", "sma"),
        fwd=opts.get("average_forward", True), bwd=opts.get("average_backward", True), renorm=opts.get("renorm", True),
    )
    gamma = torch.randn(c, dtype=torch.float64) + 1
    beta = torch.randn(c, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(gamma)
        layer.bias.copy_(beta)
    for it in range(iters):
        # swings in scale, with a jump every 5 iterations, make the r clip bite
        scale = 50.0 if it % 5 == 4 else 10 ** torch.empty(1).uniform_(-1, 1).item()
        x = (torch.randn(n, c, 3, 3, dtype=torch.float64) * scale + 0.2).to(device)
        dy = torch.randn(n, c, 3, 3, dtype=torch.float64).to(device)
        layer.weight.grad = layer.bias.grad = None
        xl = x.clone().requires_grad_(True)
        y = layer(xl)
        y.backward(dy)
        ref_y = ref.forward(x.cpu(), gamma, beta)
        ref_dx, ref_dgamma, ref_dbeta = ref.backward(dy.cpu(), gamma)
        msg = f"iteration {it + 1}"
        torch.testing.assert_close(y.cpu(), ref_y, **TOL, msg=msg)
        torch.testing.assert_close(xl.grad.cpu(), ref_dx, **TOL, msg=msg)
        torch.testing.assert_close(layer.weight.grad.cpu(), ref_dgamma, **TOL, msg=msg)
        torch.testing.assert_close(layer.bias.grad.cpu(), ref_dbeta, **TOL, msg=msg)
        torch.testing.assert_close(layer.running_var.cpu(), ref.running_var, **TOL, msg=msg)
        if layer.average == "sma":
            seen = len(ref.chi_history)
            torch.testing.assert_close(
                chronological(layer.chi_ring.cpu(), seen), torch.stack(ref.chi_history[-window:]), **TOL, msg=msg
            )
            torch.testing.assert_close(
                chronological(layer.psi_ring.cpu(), seen), torch.stack(ref.psi_history[-window:]), **TOL, msg=msg
            )
        else:
            torch.testing.assert_close(layer.chi_ring[0].cpu(), ref.chi_ema, **TOL, msg=msg)
            torch.testing.assert_close(layer.psi_ring[0].cpu(), ref.psi_ema, **TOL, msg=msg)
    assert int(layer.num_batches_tracked) == iters
    assert iters > renorm_start + 10 and iters * (n // b) > window + warmup
    if layer.renorm:
        assert ref.r_clipped > 0, "the run must reach the clipped-r phase"


@pytest.mark.parametrize("norm_batch", [None, 2])
def test_mabn_function_gradcheck_while_warming_up(norm_batch):
    torch.manual_seed(0)
    layer = MABN2d(3, norm_batch=norm_batch, warmup=1000).double()
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    # Through the layer: the forward statistics (computed outside MABNFunction) depend on x too.
    assert torch.autograd.gradcheck(lambda x, w, b: torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,)),
                                    (x, w, b))


def test_mabn_eval_is_affine_and_leaves_buffers(device):
    torch.manual_seed(0)
    layer = MABN2d(4, norm_batch=2, window=2, warmup=1).double().to(device)
    for _ in range(5):
        layer(torch.randn(4, 4, 3, 3, dtype=torch.float64, device=device)).sum().backward()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 4, 3, 3, dtype=torch.float64, device=device)
    y = layer.eval()(x)
    expect = layer.weight[:, None, None] * x / (layer.running_var[:, None, None] + EPS).sqrt() + layer.bias[:, None, None]
    torch.testing.assert_close(y, expect, **TOL)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mabn_state_dict_round_trip_continues_bitwise():
    torch.manual_seed(0)
    data = [(torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)) for _ in range(15)]

    def step(layer, x, dy):
        layer.weight.grad = None
        xl = x.clone().requires_grad_(True)
        y = layer(xl)
        y.backward(dy)
        return y.detach(), xl.grad, layer.weight.grad.clone()

    straight = MABN2d(3, norm_batch=2, window=4, warmup=3, renorm_start=6)
    for x, dy in data[:10]:
        step(straight, x, dy)
    resumed = MABN2d(3, norm_batch=2, window=4, warmup=3, renorm_start=6)
    resumed.load_state_dict(straight.state_dict())
    for x, dy in data[10:]:
        for a, b in zip(step(straight, x, dy), step(resumed, x, dy)):
            assert torch.equal(a, b)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_mabn_statistics_in_float32_under_half_input():
    layer = MABN2d(2)
    x = torch.full((2, 2, 4, 4), 300.0, dtype=torch.float16)  # x^2 = 90000 > float16 max
    y = layer(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert torch.isfinite(layer.running_var).all()


def test_compiled_kernels_match_the_eager_layer():
    """kernel='compiled' (torch.compile'd passes) runs the same math: the reference test's tolerance holds."""
    torch.manual_seed(0)
    eager = MABN2d(3, norm_batch=2, window=2, warmup=2, renorm_start=3).double()
    fused = MABN2d(3, norm_batch=2, window=2, warmup=2, renorm_start=3, kernel="compiled").double()
    for _ in range(6):
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3
        dy = torch.randn_like(x)
        outs = []
        for layer in (eager, fused):
            layer.weight.grad = None
            xl = x.clone().requires_grad_(True)
            y = layer(xl)
            y.backward(dy)
            outs.append((y.detach(), xl.grad, layer.weight.grad.clone(), layer.running_var.clone(), layer.psi_ring.clone()))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, **TOL)


def test_counters_follow_a_loaded_state_dict_and_outside_writes():
    """The layer branches on host copies of its counters; loading a state or writing a counter must
    be seen by the next call, exactly as if the layer had run those iterations itself."""
    torch.manual_seed(0)
    opts = dict(norm_batch=2, window=2, warmup=3, renorm_start=5)
    trained = MABN2d(3, **opts).double()
    for _ in range(8):
        trained(torch.randn(4, 3, 3, 3, dtype=torch.float64)).sum().backward()
    fresh = MABN2d(3, **opts).double()
    fresh(torch.randn(4, 3, 3, 3, dtype=torch.float64)).sum().backward()  # host copies now say t = 1
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)

    trained.num_batches_tracked.zero_()  # back into warmup: plain batch statistics again
    with torch.no_grad():
        y = trained(x)
    chi = x.reshape(2, 2, 3, 9).square().mean(dim=(1, 3))
    expect = x / (chi.repeat_interleave(2, 0)[:, :, None, None] + EPS).sqrt()
    expect = expect * trained.weight[:, None, None] + trained.bias[:, None, None]
    torch.testing.assert_close(y, expect, **TOL)


def test_one_group_runs_on_batch_norm_kernels_without_copies_of_x():
    """One normalization group, past warmup, half-precision input: every pass over x-sized data is one of
    torch's fused batch-norm kernels, the second-moment reduction, MABN's one in-place term, or autograd's
    gradient write; no float32 copy of x, dy or y (each a full extra pass on a GPU under AMP)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    layer = MABN2d(8, window=2, warmup=2, renorm_start=3)
    x = torch.randn(4, 8, 6, 6).bfloat16().requires_grad_(True)
    dy = torch.randn(4, 8, 6, 6).bfloat16()
    for _ in range(5):  # into the phase with averages and r on
        layer(x).backward(dy)

    class FullSize(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [t for t in (*args, *(kwargs or {}).values(), out) if isinstance(t, torch.Tensor)]
            if not func.is_view and any(t.numel() == x.numel() for t in tensors):
                FullSize.ops.append(func.overloadpacket.__name__)
            return out

    x.grad = None
    with FullSize():
        y = layer(x)
        y.backward(dy)
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert sorted(FullSize.ops) == sorted(["linalg_vector_norm", "native_batch_norm", "native_batch_norm_backward",
                                           "addcmul_"]), FullSize.ops
