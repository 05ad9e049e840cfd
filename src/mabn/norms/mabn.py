"""Moving Average Batch Normalization (Yan et al., ICLR 2020), SPEC §2.

Training forward, per normalization group of b samples at iteration t (t counts training forwards,
from 1): chi_B = mean(x^2) per channel (nothing is centered); var = chi_B while warming up, else
the moving average of the last `window` chi_B values; z = x / sqrt(var + eps); y = gamma r z + beta
with the gradient-stopped renormalization r = sqrt(var + eps) / sqrt(running_var + eps), clipped,
held at 1 until t > max(renorm_start, warmup).

Backward, with g = dL/dy gamma r: Psi_B = mean(g z); mean_gz = Psi_B while warming up, else its
moving average; dL/dx = (g - z mean_gz) / sqrt(var + eps). Both moving averages treat the groups of
one forward as consecutive entries, so a window of m groups spans this and earlier iterations.
"""
import torch
from torch import nn

from ._groups import check_input, group_view, per_sample

AVERAGES = ("sma", "ema")


def push_and_average(ring: torch.Tensor, seen: torch.Tensor, stats: torch.Tensor, average: str):
    """Feed the rows of `stats` (G, C) in order into a moving average over `len(ring)` entries.

    Returns (averaged, ready): `averaged[k]` is the moving average right after row k entered it, and
    `ready[k]` is True once more than `len(ring)` rows had been seen (SPEC: t > m). Updates `ring`
    and `seen` in place, without any host synchronization.

    sma: `ring` holds the last m rows; slot `seen % m` is the oldest.
    ema: `ring[0]` holds the running value; alpha = 2 / (m + 1), the EMA with the SMA's centre of
    mass, started from the first row ever seen.
    """
    window, groups = ring.shape[0], stats.shape[0]
    steps = torch.arange(groups, device=stats.device)
    ready = seen + 1 + steps > window  # before the ring is full, `averaged` is not a window mean yet
    if average == "sma" and groups == 1:
        # The window ending at the one new row is the whole ring once the row is written: 3 ops, not 8.
        ring.index_copy_(0, (seen % window).reshape(1), stats)
        averaged = ring.mean(0, keepdim=True)
    elif average == "sma":
        oldest_first = ring[(seen + torch.arange(window, device=stats.device)) % window]
        history = torch.cat([oldest_first, stats], dim=0)  # (m + G, C)
        averaged = history.unfold(0, window, 1)[1:].mean(-1)  # window ending at each new row
        kept = min(groups, window)
        ring.index_copy_(0, ((seen + steps) % window)[-kept:], stats[-kept:])
    elif average == "ema":
        alpha = 2.0 / (window + 1)
        previous = torch.where(seen == 0, stats[0], ring[0])
        lag = (steps[:, None] - steps[None, :]).to(stats.dtype)  # k - j
        weights = torch.where(lag >= 0, alpha * (1 - alpha) ** lag.clamp(min=0), torch.zeros_like(lag))
        decay = ((1 - alpha) ** (steps + 1).to(stats.dtype))[:, None]
        averaged = decay * previous + weights @ stats
        ring[0] = averaged[-1]
    else:
        raise ValueError(f"unknown moving average '{average}'; valid: {', '.join(AVERAGES)}")
    seen.add_(groups)
    return averaged, ready


def second_moment(groups: torch.Tensor) -> torch.Tensor:
    """chi_B per (group, channel) of the (G, b, C, H*W) view: one pass, no temporary of x's size."""
    count = groups.shape[1] * groups.shape[3]
    return torch.linalg.vector_norm(groups, 2, dim=(1, 3)).square() / count


def scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * scale + shift with (N, C, 1, 1) scale and (C, 1, 1) shift, in one pass."""
    return torch.addcmul(shift, x, scale)


def grad_sums(dy: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum dy, sum dy x) per (group, channel) of (G, b, C, H*W) views."""
    return dy.sum(dim=(1, 3)), (dy * x).sum(dim=(1, 3))


def grad_input(dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dy * a - x * b with (N, C, 1, 1) coefficients."""
    return torch.addcmul(dy * a, x, b, value=-1)


KERNELS = ("eager", "compiled")
_compiled: dict = {}


def kernels(kind: str):
    """The elementwise/reduction kernels: eager torch ops, or the same functions fused by torch.compile
    (one pass each instead of two or three; compiled on first use per shape family)."""
    if kind == "eager":
        return second_moment, scale_shift, grad_sums, grad_input
    if kind not in KERNELS:
        raise ValueError(f"unknown MABN kernel '{kind}'; valid: {', '.join(KERNELS)}")
    if not _compiled:
        for fn in (second_moment, scale_shift, grad_sums, grad_input):
            _compiled[fn.__name__] = torch.compile(fn, dynamic=True)
    return _compiled["second_moment"], _compiled["scale_shift"], _compiled["grad_sums"], _compiled["grad_input"]


class MABNFunction(torch.autograd.Function):
    """MABN training forward/backward with explicit backward; `layer` holds the state it advances."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        groups = group_view(layer, x, layer.norm_batch)
        second_moment, scale_shift, _, _ = kernels(layer.kernel)
        groups = groups.to(torch.promote_types(x.dtype, torch.float32))  # x^2 overflows in half precision
        chi = second_moment(groups)  # (G, C)
        averaged, ready = push_and_average(layer.chi_ring, layer.chi_seen, chi, layer.average)
        t = layer.num_batches_tracked
        warm = t >= layer.warmup
        use_average = (ready & warm & layer.average_forward)[:, None]
        var = torch.where(use_average, averaged, chi)
        inv_std = torch.rsqrt(var + layer.eps)
        if layer.renorm:
            ratio = torch.sqrt(var + layer.eps) * torch.rsqrt(layer.running_var + layer.eps)
            clipped = ratio.clamp(1 / layer.renorm_clip, layer.renorm_clip)
            r = torch.where(t > max(layer.renorm_start, layer.warmup), clipped, torch.ones_like(clipped))
        else:
            r = torch.ones_like(var)
        y = scale_shift(x.to(groups.dtype), per_sample(weight * r * inv_std, groups.shape[1]), bias[:, None, None])
        layer.running_var.lerp_(var.mean(0), 1 - layer.momentum)
        ctx.save_for_backward(x, weight, inv_std, r, warm.clone())
        ctx.layer = layer
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, inv_std, r, warm = ctx.saved_tensors
        layer = ctx.layer
        _, _, grad_sums, grad_input = kernels(layer.kernel)
        dtype = inv_std.dtype
        groups = group_view(layer, x, layer.norm_batch).to(dtype)
        dy = grad_out.reshape(groups.shape).to(dtype)
        count = groups.shape[1] * groups.shape[3]
        sum_dy, sum_dy_x = grad_sums(dy, groups)  # (G, C) each
        psi = weight * r * inv_std * sum_dy_x / count  # mean over the group of g z
        averaged, ready = push_and_average(layer.psi_ring, layer.psi_seen, psi, layer.average)
        mean_gz = torch.where((ready & warm & layer.average_backward)[:, None], averaged, psi)
        b = groups.shape[1]
        grad_x = grad_input(grad_out.to(dtype), x.to(dtype), per_sample(weight * r * inv_std, b),
                            per_sample(inv_std * inv_std * mean_gz, b))
        grad_weight = (r * inv_std * sum_dy_x).sum(0)
        grad_bias = sum_dy.sum(0)
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None


class MABN2d(nn.Module):
    """Moving Average Batch Normalization for (N, C, H, W) inputs; see the module docstring.

    `norm_batch=None`: the whole forward batch is one normalization group. `momentum` is the weight
    of the old running_var (0.98). Ablation switches: `average_forward` / `average_backward` turn
    the moving average off on one side (current statistics only), `average='ema'` swaps the SMA for
    an EMA with the same centre of mass, `renorm=False` keeps r = 1. `kernel='compiled'` fuses the
    elementwise passes with torch.compile (same math; worth it on long runs, costs compile time).
    """

    def __init__(
        self,
        num_features: int,
        norm_batch: int | None = None,
        window: int = 16,
        warmup: int = 100,
        eps: float = 1e-5,
        momentum: float = 0.98,
        renorm: bool = True,
        renorm_start: int = 1000,
        renorm_clip: float = 5.0,
        average: str = "sma",
        average_forward: bool = True,
        average_backward: bool = True,
        kernel: str = "eager",
    ):
        super().__init__()
        if average not in AVERAGES:
            raise ValueError(f"MABN2d: average='{average}' is not one of {', '.join(AVERAGES)}")
        if kernel not in KERNELS:
            raise ValueError(f"MABN2d: kernel='{kernel}' is not one of {', '.join(KERNELS)}")
        if window < 1:
            raise ValueError(f"MABN2d: window={window} must be >= 1")
        self.num_features, self.norm_batch, self.window, self.warmup = num_features, norm_batch, window, warmup
        self.eps, self.momentum = eps, momentum
        self.renorm, self.renorm_start, self.renorm_clip = renorm, renorm_start, renorm_clip
        self.average, self.average_forward, self.average_backward = average, average_forward, average_backward
        self.kernel = kernel
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("chi_ring", torch.zeros(window, num_features))
        self.register_buffer("psi_ring", torch.zeros(window, num_features))
        self.register_buffer("chi_seen", torch.tensor(0, dtype=torch.long))
        self.register_buffer("psi_seen", torch.tensor(0, dtype=torch.long))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        if not self.training:
            scale, shift = self.eval_affine()
            return x * scale[:, None, None].to(x.dtype) + shift[:, None, None].to(x.dtype)
        self.num_batches_tracked.add_(1)
        return MABNFunction.apply(x, self.weight, self.bias, self)

    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) per channel of the eval-mode op y = gamma x / sqrt(running_var + eps) + beta."""
        return self.weight * torch.rsqrt(self.running_var + self.eps), self.bias

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, norm_batch={self.norm_batch}, window={self.window}, warmup={self.warmup}, "
            f"average={self.average}, renorm={self.renorm}"
        )
