"""Synchronized BN: statistics reduced over all processes of the job (torch.nn.SyncBatchNorm)."""
from torch import nn


class SyncBatchNorm2d(nn.SyncBatchNorm):
    """`torch.nn.SyncBatchNorm` with the factory's signature.

    `norm_batch` is accepted and ignored: the normalization batch is the global batch. Outside a
    distributed job it behaves as BatchNorm2d.
    """

    def __init__(self, num_features: int, norm_batch: int | None = None, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum)
