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

from ._groups import (as_output, check_input, grad_sums, group_view, is_int, is_number, layer_label, lerp_buffer,
                      per_sample, require, require_sizes, scale_shift, second_moment, store_buffer)

AVERAGES = ("sma", "ema")


def read_counter(layer: nn.Module, name: str) -> int:
    """The integer buffer `name` of `layer` as a Python int, without a device sync in steady state.

    MABN branches on its counters (warming up? window full? r on?); reading a CUDA buffer at every
    layer call would stall the stream, and branching in tensors costs a dozen small ops per call.
    The host copy is trusted while the buffer is the same tensor at the same in-place version:
    whatever else writes it (load_state_dict, .to(), a DDP buffer broadcast) replaces it or bumps
    its version, and the next read syncs once.
    """
    buffer = layer._buffers[name]  # getattr's generic lookup costs more than the rest of this function
    cached = layer._host_counters.get(name)
    if cached is not None and cached[0] is buffer and cached[1] == buffer._version:
        return cached[2]
    return trust_counter(layer, name, int(buffer))


def trust_counter(layer: nn.Module, name: str, value: int) -> int:
    """Record `value` as the host copy of the integer buffer `name` as it is now (see `read_counter`)."""
    buffer = layer._buffers[name]
    layer._host_counters[name] = (buffer, buffer._version, value)
    return value


def advance_counter(layer: nn.Module, name: str, by: int) -> int:
    """Add `by` to the integer buffer `name` and return the new value (host copy kept in step)."""
    value = read_counter(layer, name) + by
    getattr(layer, name).add_(by)
    return trust_counter(layer, name, value)


def ring_position(layer: nn.Module, name: str, by: int, backward: bool = False):
    """How many rows entered the ring counted by `name` before this call, then advance it by `by`.

    Eager: a host int (`read_counter`), so the ring is addressed without device work. Under
    torch.compile: the buffer itself (a 0-d tensor), so one graph serves every position instead of
    specializing on the int (see `mabn.compile`), stored with `store_buffer`.
    """
    if torch.compiler.is_compiling():
        seen = getattr(layer, name).clone()  # the backward writes the buffer in place
        store_buffer(layer, name, seen + by, backward)
        return seen
    seen = read_counter(layer, name)
    advance_counter(layer, name, by)
    return seen


def push_and_average(layer: nn.Module, name: str, seen, stats: torch.Tensor, want_average: bool = True,
                     backward: bool = False):
    """Feed the rows of `stats` (G, C) in order into the moving average `layer.average` over the ring
    buffer `name` of `layer` (`window` entries), `seen` rows having entered before; updates the ring
    (the caller advances `seen`): in place, or under torch.compile through `store_buffer`.

    Returns `averaged` (G, C), `averaged[k]` being the moving average right after row k entered, or
    None when `want_average` is False (warming up: the state advances, nothing is read).

    sma: `ring` holds the last m rows; slot `seen % m` is the oldest.
    ema: `ring[0]` holds the running value; alpha = 2 / (m + 1), the EMA with the SMA's centre of
    mass, started from the first row ever seen.

    `seen` is a host int (eager: slots are Python ints) or a 0-d tensor (under torch.compile: the
    same slots as index tensors, so the graph does not depend on its value).
    """
    ring, average = getattr(layer, name), layer.average
    window, groups = ring.shape[0], stats.shape[0]
    traced = isinstance(seen, torch.Tensor)
    if average == "sma" and groups == 1 and not traced:
        # The window ending at the one new row is the whole ring once the row is written.
        ring[seen % window].copy_(stats[0])
        return ring.mean(0, keepdim=True) if want_average else None
    if average == "sma":
        averaged = None
        if want_average:
            if traced:
                oldest_first = ring.index_select(0, (seen + torch.arange(window, device=ring.device)) % window)
            else:
                oldest_first = ring.roll(-(seen % window), 0)
            history = torch.cat([oldest_first, stats], dim=0)  # (m + G, C)
            averaged = history.unfold(0, window, 1)[1:].mean(-1)  # window ending at each new row
        kept = min(groups, window)
        # slots made on the device, eager too: a Python list index is a host-to-device copy (a sync on a GPU)
        slots = (seen + torch.arange(groups - kept, groups, device=ring.device)) % window
        if traced:
            store_buffer(layer, name, ring.index_copy(0, slots, stats[-kept:]), backward)
        else:
            ring.index_copy_(0, slots, stats[-kept:])
        return averaged
    if average == "ema":
        alpha = 2.0 / (window + 1)
        previous = torch.where(seen == 0, stats[0], ring[0]) if traced else (stats[0] if seen == 0 else ring[0])
        steps = torch.arange(groups, device=stats.device, dtype=stats.dtype)
        lag = steps[:, None] - steps[None, :]  # k - j
        weights = torch.where(lag >= 0, alpha * (1 - alpha) ** lag.clamp(min=0), torch.zeros_like(lag))
        decay = ((1 - alpha) ** (steps + 1))[:, None]
        averaged = decay * previous + weights @ stats
        if traced:
            store_buffer(layer, name, torch.cat([averaged[-1:], ring[1:]]), backward)
        else:
            ring[0] = averaged[-1]
        return averaged if want_average else None
    raise ValueError(f"unknown moving average '{average}'; valid: {', '.join(AVERAGES)}")


def moving_or_current(current: torch.Tensor, averaged: torch.Tensor | None, seen, window: int) -> torch.Tensor:
    """Row k: the moving average once more than `window` rows had entered (SPEC: t > m), else `current`.
    `seen` as in `push_and_average`."""
    if averaged is not None and isinstance(seen, torch.Tensor):
        ready = seen + 1 + torch.arange(current.shape[0], device=current.device) > window
        return torch.where(ready[:, None], averaged, current)
    first_ready = max(0, window - seen)  # row k is ready when seen + 1 + k > window
    if averaged is None or first_ready >= current.shape[0]:
        return current
    if first_ready == 0:
        return averaged
    return torch.cat([current[:first_ready], averaged[first_ready:]])


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
    """y = gamma r x / sqrt(var + eps) + beta per (group, channel), with MABN's backward (module docstring).

    apply(x, weight, bias, var, r, layer, warm): the variance `var` and the clipped `r` (G, C; None:
    r = 1) come from `MABN2d.forward`, which owns the forward statistics; the backward advances the
    Psi ring of `layer`, averaging once `warm`.

    With one group and eager kernels, both passes run on torch's own eval-mode batch-norm kernels
    (mean 0, variance `var`, weight gamma r): the forward is one fused pass in x's dtype and memory
    format (no float32 copies under AMP), the backward one fused pass for grad_input, sum dy and
    sum dy z, plus one in-place pass for MABN's own term. That is cuDNN's count of passes; the
    generic path below (any G) takes about twice as many.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, var, r, layer, warm):
        gamma_r = weight if r is None else weight * r  # (C,) or (G, C)
        ctx.layer, ctx.warm, ctx.weight_dtype = layer, warm, weight.dtype
        ctx.fused = var.shape[0] == 1 and layer.kernel == "eager"
        if ctx.fused:
            gamma_r = gamma_r.reshape(-1)
            ctx.save_for_backward(x, var, gamma_r, r)
            return torch.batch_norm(x, gamma_r, bias, layer.zero_mean, var[0], False, 0.0, layer.eps,
                                    torch.backends.cudnn.enabled)
        _, scale_shift, _, _ = kernels(layer.kernel)
        inv_std = (var + layer.eps).rsqrt()
        b = x.shape[0] // inv_std.shape[0]
        scale = gamma_r * inv_std  # (G, C): gamma r / sqrt(var + eps)
        y = scale_shift(x.to(inv_std.dtype), per_sample(scale, b), bias[:, None, None])
        ctx.save_for_backward(x, var, inv_std, scale, r)
        return as_output(y, x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        layer = ctx.layer
        if ctx.fused:
            x, var, gamma_r, r = ctx.saved_tensors
            count = x.numel() // x.shape[1]
            # weight gamma r, mean 0: grad_input = dy gamma r / sqrt(var + eps) = g / sqrt(var + eps),
            # "grad_weight" = sum dy z, "grad_bias" = sum dy
            grad_x, sum_dy_z, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, gamma_r, layer.zero_mean, var[0], layer.zero_mean.new_empty(0),
                layer.zero_mean.new_empty(0), False, layer.eps, [True, True, True])
            psi = (gamma_r * sum_dy_z / count)[None]  # mean over the group of g z
            mean_gz = average_psi(layer, psi, ctx.warm)
            grad_x = grad_x.addcmul_(x, (mean_gz / (var + layer.eps))[:, :, None, None], value=-1)
            grad_weight = sum_dy_z if r is None else r[0] * sum_dy_z
            return grad_x, grad_weight.to(ctx.weight_dtype), sum_dy.to(ctx.weight_dtype), None, None, None, None
        x, var, inv_std, scale, r = ctx.saved_tensors
        _, _, grad_sums, grad_input = kernels(layer.kernel)
        dtype = inv_std.dtype
        groups = group_view(layer, x, layer.norm_batch).to(dtype)
        dy = grad_out.reshape(groups.shape).to(dtype)
        count = groups.shape[1] * groups.shape[3]
        sum_dy, sum_dy_x = grad_sums(dy, groups)  # (G, C) each
        psi = scale * sum_dy_x / count  # mean over the group of g z, g = dL/dy gamma r
        mean_gz = average_psi(layer, psi, ctx.warm)
        b = groups.shape[1]
        grad_x = grad_input(grad_out.to(dtype), x.to(dtype), per_sample(scale, b),
                            per_sample(inv_std * inv_std * mean_gz, b))
        grad_weight = sum_dy_x * inv_std if r is None else sum_dy_x * inv_std * r
        if grad_weight.shape[0] > 1:
            grad_weight, sum_dy = grad_weight.sum(0), sum_dy.sum(0)
        grad_weight, grad_bias = grad_weight.reshape(-1).to(ctx.weight_dtype), sum_dy.reshape(-1).to(ctx.weight_dtype)
        return grad_x.to(x.dtype), grad_weight, grad_bias, None, None, None, None


def average_psi(layer: nn.Module, psi: torch.Tensor, warm: bool) -> torch.Tensor:
    """Push this backward's Psi_B rows (G, C) into the ring; the per-group mean of g z to use."""
    seen = ring_position(layer, "psi_seen", psi.shape[0], backward=True)
    averaged = push_and_average(layer, "psi_ring", seen, psi, want_average=warm and layer.average_backward,
                                backward=True)
    return moving_or_current(psi, averaged, seen, layer.window)


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
        require_sizes("MABN2d", num_features, norm_batch)
        if average not in AVERAGES:
            raise ValueError(f"MABN2d: average='{average}' is not one of {', '.join(AVERAGES)}")
        if kernel not in KERNELS:
            raise ValueError(f"MABN2d: kernel='{kernel}' is not one of {', '.join(KERNELS)}")
        require("MABN2d", "window", window, is_int(window) and window >= 1, "an integer >= 1")
        require("MABN2d", "warmup", warmup, is_int(warmup) and warmup >= 0, "an integer >= 0 (forwards of current statistics)")
        require("MABN2d", "momentum", momentum, is_number(momentum) and 0 <= momentum <= 1,
                "a number in [0, 1] (the weight of the old running_var)")
        require("MABN2d", "eps", eps, is_number(eps) and eps > 0, "a number > 0")
        require("MABN2d", "renorm_clip", renorm_clip, is_number(renorm_clip) and renorm_clip >= 1, "a number >= 1 (r in [1/clip, clip])")
        require("MABN2d", "renorm_start", renorm_start, is_int(renorm_start) and renorm_start >= 0, "an integer >= 0")
        for name, value in (("renorm", renorm), ("average_forward", average_forward), ("average_backward", average_backward)):
            # a config's `no` arrives as a string, which Python reads as true: the ablation would silently stay on
            require("MABN2d", name, value, isinstance(value, bool), "True or False")
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
        self.register_buffer("zero_mean", torch.zeros(num_features), persistent=False)  # batch-norm kernels' mean, see MABNFunction
        self._host_counters: dict = {}  # see read_counter
        self.compiled_phase: tuple[bool, bool] | None = None  # set by mabn.compile.compile_model's hooks, see forward

    def phase_at(self, t: int) -> tuple[bool, bool]:
        """(moving averages on, r on) for the t-th training forward (t from 1)."""
        return t >= self.warmup, self.renorm and t > max(self.renorm_start, self.warmup)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        if not self.training:
            scale, shift = self.eval_affine()
            return x * scale[:, None, None].to(x.dtype) + shift[:, None, None].to(x.dtype)
        if torch.compiler.is_compiling():
            # Reading the counter here would specialize the graph on its value (a recompile per
            # step); the phase comes from the host instead and the counters stay tensors.
            if self.compiled_phase is None:
                raise RuntimeError(f"{layer_label(self)}: under torch.compile the MABN phase is set on the host before "
                                   "each training forward; compile with mabn.compile.compile_model")
            warm, r_on = self.compiled_phase
            store_buffer(self, "num_batches_tracked", self.num_batches_tracked + 1)
        else:
            warm, r_on = self.phase_at(advance_counter(self, "num_batches_tracked", 1))
        with torch.no_grad():
            second_moment = kernels(self.kernel)[0]
            # x^2 overflows in half: accumulate in float32, cast as read (no float32 copy of x)
            accumulate = torch.promote_types(x.dtype, torch.float32)
            chi = second_moment(group_view(self, x, self.norm_batch), accumulate)  # (G, C)
            seen = ring_position(self, "chi_seen", chi.shape[0])
            averaged = push_and_average(self, "chi_ring", seen, chi, want_average=warm and self.average_forward)
            var = moving_or_current(chi, averaged, seen, self.window)
            r = None  # r = 1
            if r_on:
                r = ((var + self.eps) / (self.running_var + self.eps)).sqrt_().clamp_(1 / self.renorm_clip, self.renorm_clip)
            batch_var = var[0] if var.shape[0] == 1 else var.mean(0)
            lerp_buffer(self, "running_var", batch_var, 1 - self.momentum)
        return MABNFunction.apply(x, self.weight, self.bias, var, r, self, warm)

    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) per channel of the eval-mode op y = gamma x / sqrt(running_var + eps) + beta."""
        return self.weight * torch.rsqrt(self.running_var + self.eps), self.bias

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, norm_batch={self.norm_batch}, window={self.window}, warmup={self.warmup}, "
            f"average={self.average}, renorm={self.renorm}"
        )
