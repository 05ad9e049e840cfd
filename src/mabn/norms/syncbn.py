"""Synchronized BN: statistics reduced over all processes of the job (torch.nn.SyncBatchNorm)."""
import torch
import torch.distributed as dist
from torch import nn

from ._groups import check_input, require_sizes


class SyncBatchNorm2d(nn.SyncBatchNorm):
    """`torch.nn.SyncBatchNorm` with the factory's signature.

    `norm_batch` is accepted and ignored: the normalization batch is the global batch. Outside a
    distributed job it is BatchNorm2d. torch's kernel syncs CUDA tensors only; on CPU (gloo, tests
    and CPU clusters) the global sums go through `_AllReduceSum`, which gives the same forward and
    backward.
    """

    def __init__(self, num_features: int, norm_batch: int | None = None, eps: float = 1e-5, momentum: float = 0.1):
        require_sizes("SyncBatchNorm2d", num_features, norm_batch)
        super().__init__(num_features, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        if self.training and x.device.type == "cpu" and dist.is_available() and dist.is_initialized():
            return self._cpu_sync_forward(x)
        return super().forward(x)

    def _cpu_sync_forward(self, x: torch.Tensor) -> torch.Tensor:
        local = torch.stack([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)),
                             torch.full_like(x[0, :, 0, 0], x.numel() / x.shape[1])])
        total = _AllReduceSum.apply(local)
        count = total[2]
        mean = total[0] / count
        var = total[1] / count - mean * mean  # biased, as BN normalizes with
        y = (x - mean[:, None, None]) * torch.rsqrt(var + self.eps)[:, None, None]
        y = y * self.weight[:, None, None] + self.bias[:, None, None]
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)
        return y


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum of the ranks' gradients.

    Blocking `dist.all_reduce` on both passes; torch's `torch.distributed.nn.functional.all_reduce` is
    deprecated. (The gloo aborts at exit once seen with it likely came from that module imported after init:
    mabn/distributed.py.)
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        total = local.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        # A fresh tensor, not the one written in place: under torch 2.11's compile the output written in
        # place here took wrong gradients (pytorch/pytorch#180642, fixed in 2.12; a (2C + 1)-value copy).
        return total.clone()

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor) -> torch.Tensor:
        grad_local = grad_total.contiguous().clone()
        dist.all_reduce(grad_local, op=dist.ReduceOp.SUM)
        return grad_local
