"""Batch Renormalization (Ioffe, 2017) with ghost batches and an iteration-driven r/d schedule."""
import torch
from torch import nn

from ._groups import check_input, is_int, is_number, lerp_buffer, require, require_sizes, store_buffer
from .batchnorm import GroupBatchNormFunction


class BatchRenorm2d(nn.Module):
    """y = gamma ((x - mu_B) / sigma_B * r + d) + beta with r, d clipped and gradient-stopped.

    r = clip(sigma_B / sigma, 1/r_max, r_max), d = clip((mu_B - mu) / sigma, -d_max, d_max), where
    mu and sigma are the running statistics (momentum 0.01). r_max and d_max stay at 1 and 0 for the
    first `t0` iterations (plain BN), then grow linearly to `r_max_final` over `r_ramp` iterations
    and to `d_max_final` over `d_ramp` iterations. Each normalization group of `norm_batch` samples
    uses the running statistics as they were before this forward; they then move once towards the
    mean of the groups' statistics.
    """

    def __init__(
        self,
        num_features: int,
        norm_batch: int | None = None,
        eps: float = 1e-5,
        momentum: float = 0.01,
        t0: int = 5000,
        r_ramp: int = 40000,
        d_ramp: int = 25000,
        r_max_final: float = 3.0,
        d_max_final: float = 5.0,
        min_t0: int = 0,
    ):
        super().__init__()
        require_sizes("BatchRenorm2d", num_features, norm_batch)
        require("BatchRenorm2d", "momentum", momentum, is_number(momentum) and 0 < momentum <= 1, "a number in (0, 1]")
        require("BatchRenorm2d", "eps", eps, is_number(eps) and eps > 0, "a number > 0")
        require("BatchRenorm2d", "r_max_final", r_max_final, is_number(r_max_final) and r_max_final >= 1, "a number >= 1")
        require("BatchRenorm2d", "d_max_final", d_max_final, is_number(d_max_final) and d_max_final >= 0, "a number >= 0")
        for name, value in (("t0", t0), ("r_ramp", r_ramp), ("d_ramp", d_ramp), ("min_t0", min_t0)):
            require("BatchRenorm2d", name, value, is_int(value) and value >= 0, "an integer >= 0 (iterations)")
        self.num_features, self.norm_batch, self.eps, self.momentum = num_features, norm_batch, eps, momentum
        # A schedule scaled down to a short run must still leave the running statistics time to settle
        # before r and d use them: `min_t0` (e.g. 5 time constants, 5 / momentum) is a floor on t0.
        self.t0, self.r_ramp, self.d_ramp = max(t0, min_t0), max(r_ramp, 1), max(d_ramp, 1)
        self.r_max_final, self.d_max_final = r_max_final, d_max_final
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def clip_limits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_max, d_max) at the current iteration counter (a tensor: no host sync on GPU)."""
        since = (self.num_batches_tracked - self.t0).to(self.running_std.dtype)
        r_max = 1 + (self.r_max_final - 1) * (since / self.r_ramp).clamp(0, 1)
        d_max = self.d_max_final * (since / self.d_ramp).clamp(0, 1)
        return r_max, d_max

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        if not self.training:
            scale, shift = self.eval_affine()
            return x * scale[:, None, None] + shift[:, None, None]
        store_buffer(self, "num_batches_tracked", self.num_batches_tracked + 1)  # r_max and d_max follow it
        y, mean, var = GroupBatchNormFunction.apply(x, self.weight, self.bias, self, self.renorm_factors)
        lerp_buffer(self, "running_mean", mean.mean(0), self.momentum)
        lerp_buffer(self, "running_std", torch.sqrt(var + self.eps).mean(0), self.momentum)
        return y

    def renorm_factors(self, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, d) per (group, channel), clipped to the schedule's limits (held constant in the backward)."""
        r_max, d_max = self.clip_limits()
        r, d = self.unclipped_factors(mean, std)
        return torch.minimum(torch.maximum(r, 1 / r_max), r_max), torch.minimum(torch.maximum(d, -d_max), d_max)

    def unclipped_factors(self, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, d) before clipping: the groups' statistics measured against the running ones. While both are
        inside their limits, the training output is the eval-mode op on the running statistics."""
        return std / self.running_std, (mean - self.running_mean) / self.running_std

    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) per channel of the eval-mode op y = scale * x + shift."""
        scale = self.weight / self.running_std
        return scale, self.bias - self.running_mean * scale

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, norm_batch={self.norm_batch}, eps={self.eps}, momentum={self.momentum}, "
            f"t0={self.t0}, r_ramp={self.r_ramp}, d_ramp={self.d_ramp}"
        )
