"""Batch normalization with a normalization batch smaller than the forward batch (ghost batches)."""
import torch
from torch import nn

from ._groups import check_input, group_view, per_sample


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose statistics come from groups of `norm_batch` consecutive samples.

    With `norm_batch=None` (or equal to the batch) it is exactly `torch.nn.BatchNorm2d` and takes its
    fused path. With b < N each group is normalized with its own biased mean/variance, and the
    running statistics move once per forward towards the mean of the groups' statistics (unbiased
    variance, as torch does), so evaluation is the same affine op as BatchNorm2d.
    """

    def __init__(self, num_features: int, norm_batch: int | None = None, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.norm_batch = norm_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        if not self.training or self.norm_batch is None or self.norm_batch == x.shape[0]:
            if self.training:
                group_view(self, x, None)  # same zero-variance error as the ghost path
            return super().forward(x)
        groups = group_view(self, x, self.norm_batch)
        var, mean = torch.var_mean(groups, dim=(1, 3), unbiased=False)  # (G, C) each
        b = groups.shape[1]
        y = (x - per_sample(mean, b)) * per_sample(torch.rsqrt(var + self.eps), b)
        y = y * self.weight[:, None, None] + self.bias[:, None, None]
        with torch.no_grad():
            count = groups.shape[1] * groups.shape[3]
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.mean(0), self.momentum)
            self.running_var.lerp_((var * (count / (count - 1))).mean(0), self.momentum)
        return y

    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) per channel of the eval-mode op y = scale * x + shift."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, norm_batch={self.norm_batch}"


def batchnorm_eval_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of torch's own BatchNorm classes (SyncBatchNorm after conversion)."""
    return GhostBatchNorm2d.eval_affine(bn)
