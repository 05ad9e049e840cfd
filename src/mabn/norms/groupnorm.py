"""Group normalization: statistics per sample, independent of the batch size."""
from torch import nn

from ._groups import is_int, is_number, require, require_sizes


class GroupNorm2d(nn.GroupNorm):
    """`torch.nn.GroupNorm` taking the channel count first, like every norm of the factory.

    `norm_batch` is accepted so that one config drives every norm, and ignored: GN has no batch
    statistics. Uses min(num_groups, C) groups so that narrow CPU models work.
    """

    def __init__(self, num_features: int, norm_batch: int | None = None, num_groups: int = 32, eps: float = 1e-5):
        require_sizes(type(self).__name__, num_features, norm_batch)  # LN and IN name themselves
        require("GroupNorm2d", "num_groups", num_groups, is_int(num_groups) and num_groups >= 1, "an integer >= 1")
        require("GroupNorm2d", "eps", eps, is_number(eps) and eps > 0, "a number > 0")
        groups = min(num_groups, num_features)
        if num_features % groups != 0:
            raise ValueError(
                f"GroupNorm2d: {num_features} channels cannot be split into {groups} groups; "
                f"use a num_groups that divides {num_features}"
            )
        super().__init__(groups, num_features, eps=eps)
        self.num_features = num_features


class LayerNorm2d(GroupNorm2d):
    """Layer normalization over (C, H, W) per sample: GN with one group (the paper's throughput table's LN)."""

    def __init__(self, num_features: int, norm_batch: int | None = None, eps: float = 1e-5):
        super().__init__(num_features, norm_batch, num_groups=1, eps=eps)


class InstanceNorm2d(GroupNorm2d):
    """Instance normalization over (H, W) per sample and channel, with affine parameters: GN with one channel per
    group (the paper's throughput table's IN)."""

    def __init__(self, num_features: int, norm_batch: int | None = None, eps: float = 1e-5):
        super().__init__(num_features, norm_batch, num_groups=num_features, eps=eps)
