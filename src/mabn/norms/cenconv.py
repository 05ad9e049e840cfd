"""Convolution with weights centered per output channel (used with MABN, SPEC §2)."""
import torch
from torch import nn


class CenConv2d(nn.Conv2d):
    """`nn.Conv2d` that convolves with W - mean(W over in_ch, kh, kw) per output channel.

    Centering keeps the activations' mean near zero, which is what makes MABN's uncentered
    normalization safe. Same constructor as `nn.Conv2d`, with `bias=False` by default.
    """

    def __init__(self, *args, bias: bool = False, **kwargs):
        super().__init__(*args, bias=bias, **kwargs)

    def effective_weight(self) -> torch.Tensor:
        return self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


def effective_conv_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The weight a conv actually applies (centered for `CenConv2d`)."""
    return conv.effective_weight() if isinstance(conv, CenConv2d) else conv.weight
