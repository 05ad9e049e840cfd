"""How often Batch Renormalization's r and d sit at their clip limits in training-mode forwards.

While a group's r and d are inside their limits, BRN's training output gamma ((x - mu_B) / sigma_B r + d)
+ beta is exactly gamma (x - mu) / sigma + beta, the eval-mode op on the running statistics; where
one is clipped, that group was normalized (partly) by its own statistics, so training and inference
differ there. At a normalization batch of 2, sigma_B is a two-sample deviation and falls below
sigma / r_max often. `RenormClipCounter` counts, per BRN layer, the (group, channel) pairs whose r
or d is clipped, from hooks that leave the forward untouched (the statistics are computed again from
the layer's input, as the layer computes them).
"""
from typing import Callable

import torch
from torch import nn

from .norms import BatchRenorm2d
from .norms.batchnorm import group_moments


class RenormClipCounter:
    """Counts clipped r and d in every BRN layer of `net` while entered:

        with RenormClipCounter(net) as clips:
            net(x)  # training mode
        clips.rates()  # {"r": share clipped, "d": ..., "pairs": (group, channel) pairs seen, "layers": {...}}
    """

    def __init__(self, net: nn.Module, when: Callable[[], bool] | None = None):
        """`when`: counts only forwards for which it returns True (None: all); the batch-statistics recorder
        keeps the hooks registered for a whole run and counts its recorded iterations alone."""
        self.layers = {name or type(m).__name__: m for name, m in net.named_modules() if isinstance(m, BatchRenorm2d)}
        self.when = when
        self.pending, self.handles = {}, []
        self.reset()

    def reset(self) -> None:
        """Forget what was counted so far."""
        self.counts = {name: torch.zeros(3, dtype=torch.long) for name in self.layers}  # r clipped, d clipped, pairs

    def __enter__(self) -> "RenormClipCounter":
        for name, layer in self.layers.items():
            self.handles.append(layer.register_forward_pre_hook(self._before(name)))
            self.handles.append(layer.register_forward_hook(self._after(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.pending = [], {}

    def _before(self, name: str):
        # The running statistics r and d are measured against are those before the forward moves them.
        @torch.no_grad()
        def hook(layer, inputs):
            if layer.training and (self.when is None or self.when()):
                _, mean, var = group_moments(layer, inputs[0])
                self.pending[name] = layer.unclipped_factors(mean, torch.sqrt(var + layer.eps))
        return hook

    def _after(self, name: str):
        # The limits are those after the forward advanced the iteration counter, as the forward used them.
        @torch.no_grad()
        def hook(layer, inputs, output):
            if name not in self.pending:
                return
            r, d = self.pending.pop(name)
            r_max, d_max = layer.clip_limits()
            r_clipped = ((r > r_max) | (r < 1 / r_max)).sum()
            d_clipped = (d.abs() > d_max).sum()
            counts = torch.stack([r_clipped, d_clipped, torch.tensor(r.numel(), device=r.device)])
            self.counts[name] = self.counts[name].to(counts.device) + counts  # read back once, in rates()
        return hook

    def rates(self) -> dict:
        """The shares of (group, channel) pairs with r and with d clipped, over all layers and per layer."""
        def shares(c: torch.Tensor) -> dict:
            pairs = int(c[2])
            return dict(r=int(c[0]) / pairs if pairs else 0.0, d=int(c[1]) / pairs if pairs else 0.0, pairs=pairs)

        counts = {name: c.cpu() for name, c in self.counts.items()}
        return dict(shares(sum(counts.values(), torch.zeros(3, dtype=torch.long))),
                    layers={name: shares(c) for name, c in counts.items()})
