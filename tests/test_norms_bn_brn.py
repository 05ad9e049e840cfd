"""Ghost BN and BRN against torch.nn.BatchNorm2d in float64."""
import pytest
import torch
from torch import nn

from mabn.norms import BatchRenorm2d, GhostBatchNorm2d
from mabn.norms.batchnorm import GroupBatchNormFunction

TOL = dict(rtol=0, atol=1e-10)


def _run(layer, x, dy):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


def _randomize_affine(*layers):
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(layers[0].num_features, generator=gen, dtype=torch.float64), torch.randn(
        layers[0].num_features, generator=gen, dtype=torch.float64
    )
    for layer in layers:
        with torch.no_grad():
            layer.weight.copy_(w.to(layer.weight.device))
            layer.bias.copy_(b.to(layer.bias.device))


def test_ghost_bn_full_batch_equals_batchnorm2d(device):
    torch.manual_seed(0)
    ours = GhostBatchNorm2d(5, norm_batch=8).double().to(device)
    ref = nn.BatchNorm2d(5).double().to(device)
    _randomize_affine(ours, ref)
    for _ in range(3):
        x = torch.randn(8, 5, 4, 3, dtype=torch.float64, device=device) * 3 + 1
        dy = torch.randn_like(x)
        for a, b in zip(_run(ours, x, dy), _run(ref, x, dy)):
            torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, ref.running_var, **TOL)


def test_ghost_bn_groups_equal_batchnorm2d_group_by_group(device):
    torch.manual_seed(0)
    n, b, c = 8, 2, 3
    ours = GhostBatchNorm2d(c, norm_batch=b).double().to(device)
    _randomize_affine(ours)
    x = torch.randn(n, c, 5, 5, dtype=torch.float64, device=device) * 2 - 1
    dy = torch.randn_like(x)
    y, dx, dw, db = _run(ours, x, dy)

    ref_y, ref_dx, ref_dw, ref_db = [], [], 0, 0
    means, vars_unbiased = [], []
    for k in range(n // b):
        ref = nn.BatchNorm2d(c).double().to(device)
        _randomize_affine(ref)
        xs, dys = x[k * b : (k + 1) * b], dy[k * b : (k + 1) * b]
        yk, dxk, dwk, dbk = _run(ref, xs, dys)
        ref_y.append(yk), ref_dx.append(dxk)
        ref_dw, ref_db = ref_dw + dwk, ref_db + dbk
        means.append(xs.mean(dim=(0, 2, 3)))
        vars_unbiased.append(xs.var(dim=(0, 2, 3), unbiased=True))
    torch.testing.assert_close(y, torch.cat(ref_y), **TOL)
    torch.testing.assert_close(dx, torch.cat(ref_dx), **TOL)
    torch.testing.assert_close(dw, ref_dw, **TOL)
    torch.testing.assert_close(db, ref_db, **TOL)
    # running statistics: one momentum step towards the mean of the groups' statistics (SPEC §2)
    torch.testing.assert_close(ours.running_mean, 0.1 * torch.stack(means).mean(0), **TOL)
    torch.testing.assert_close(ours.running_var, 0.9 + 0.1 * torch.stack(vars_unbiased).mean(0), **TOL)


def test_ghost_bn_eval_is_batchnorm_eval(device):
    ours = GhostBatchNorm2d(4, norm_batch=2).double().to(device)
    ref = nn.BatchNorm2d(4).double().to(device)
    with torch.no_grad():
        for layer in (ours, ref):
            layer.running_mean.copy_(torch.arange(4.0))
            layer.running_var.copy_(torch.arange(1.0, 5.0))
    x = torch.randn(4, 4, 3, 3, dtype=torch.float64, device=device)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x), **TOL)


@pytest.mark.parametrize("norm_batch", [None, 2])
def test_brn_before_schedule_equals_bn(device, norm_batch):
    torch.manual_seed(0)
    brn = BatchRenorm2d(6, norm_batch=norm_batch, t0=100).double().to(device)
    bn = GhostBatchNorm2d(6, norm_batch=norm_batch).double().to(device)
    _randomize_affine(brn, bn)
    for _ in range(4):
        x = torch.randn(4, 6, 3, 3, dtype=torch.float64, device=device) * 4 + 2
        dy = torch.randn_like(x)
        for a, b in zip(_run(brn, x, dy), _run(bn, x, dy)):
            torch.testing.assert_close(a, b, **TOL)


def test_brn_clips_r_and_d_on_schedule(device):
    """Past t0 + ramps, r and d follow SPEC's formula with r_max=3, d_max=5, per group."""
    torch.manual_seed(0)
    c, b = 3, 2
    brn = BatchRenorm2d(c, norm_batch=b, t0=10, r_ramp=20, d_ramp=10).double().to(device)
    with torch.no_grad():
        brn.num_batches_tracked.fill_(19)  # the next forward is t=20: r_max = 1 + 2*10/20 = 2, d_max = 5
        brn.running_mean.copy_(torch.tensor([0.0, 1.0, -1.0]))
        brn.running_std.copy_(torch.tensor([1.0, 0.1, 10.0]))
    mu, sigma = brn.running_mean.clone(), brn.running_std.clone()
    x = torch.randn(4, c, 4, 4, dtype=torch.float64, device=device) * 2 + 0.5
    y = brn(x)
    r_max, d_max = 2.0, 5.0
    hits = 0
    for k in range(2):
        xs = x[k * b : (k + 1) * b]
        mu_b = xs.mean(dim=(0, 2, 3))
        sigma_b = (xs.var(dim=(0, 2, 3), unbiased=False) + 1e-5).sqrt()
        r_raw, d_raw = sigma_b / sigma, (mu_b - mu) / sigma
        r, d = r_raw.clamp(1 / r_max, r_max), d_raw.clamp(-d_max, d_max)
        hits += int((r != r_raw).sum() + (d != d_raw).sum())
        expect = ((xs - mu_b[:, None, None]) / sigma_b[:, None, None] * r[:, None, None] + d[:, None, None])
        torch.testing.assert_close(y[k * b : (k + 1) * b], expect, **TOL)
    assert hits >= 2, "the chosen running statistics must make the clipping bite"


def test_brn_gradient_stops_through_r_and_d():
    """d/dx with r, d held constant: equals autograd of the formula with detached r, d."""
    torch.manual_seed(0)
    brn = BatchRenorm2d(3, t0=0, r_ramp=1, d_ramp=1).double()
    with torch.no_grad():
        brn.running_std.fill_(0.5)
        brn.running_mean.fill_(0.3)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(x)
    _randomize_affine(brn)
    brn(x).backward(dy)
    x2 = x.detach().clone().requires_grad_(True)
    w, b = brn.weight.detach().clone().requires_grad_(True), brn.bias.detach().clone().requires_grad_(True)
    mu = x2.mean(dim=(0, 2, 3), keepdim=True)
    sigma = (x2.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    r = (sigma / 0.5).clamp(1 / 3, 3).detach()
    d = ((mu - 0.3) / 0.5).clamp(-5, 5).detach()
    (((x2 - mu) / sigma * r + d) * w[:, None, None] + b[:, None, None]).backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, **TOL)
    torch.testing.assert_close(brn.weight.grad, w.grad, **TOL)
    torch.testing.assert_close(brn.bias.grad, b.grad, **TOL)


def test_brn_eval_uses_running_statistics(device):
    brn = BatchRenorm2d(2).double().to(device)
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([1.0, -2.0]))
        brn.running_std.copy_(torch.tensor([2.0, 0.5]))
        brn.weight.copy_(torch.tensor([3.0, 1.0]))
        brn.bias.copy_(torch.tensor([0.0, 1.0]))
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, device=device)
    before = {k: v.clone() for k, v in brn.state_dict().items()}
    y = brn.eval()(x)
    expect = (x - brn.running_mean[:, None, None]) / brn.running_std[:, None, None] * brn.weight[:, None, None]
    torch.testing.assert_close(y, expect + brn.bias[:, None, None], **TOL)
    for k, v in brn.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("norm_batch", [None, 2])
def test_group_batchnorm_function_gradcheck(norm_batch):
    layer = GhostBatchNorm2d(3, norm_batch=norm_batch).double()
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: GroupBatchNormFunction.apply(x, w, b, layer, None)[0], (x, w, b))


def test_ghost_bn_float32_statistics_are_two_pass():
    """A large common offset must not cost the variance its precision (no E[x^2] - E[x]^2)."""
    torch.manual_seed(0)
    x64 = torch.randn(8, 4, 6, 6, dtype=torch.float64) + 1000
    layer = GhostBatchNorm2d(4, norm_batch=2)
    y = layer(x64.float())
    ref = GhostBatchNorm2d(4, norm_batch=2).double()(x64)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-3)
