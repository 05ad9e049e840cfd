"""Re-estimate a trained network's inference statistics with its final weights (PreciseBN; Wu & Johnson,
"Rethinking 'Batch' in BatchNorm", 2021), to tell error due to the inference statistics from error due to
training.

The running statistics a run evaluates with are exponential moving averages over iterations whose
weights kept changing, and at a small normalization batch they average noisy per-group estimates. Here
the network, in training mode (each layer normalizes its groups as it did in training), forwards
training batches without gradients, and each norm's running statistic becomes the *equal-weight*
average of what the layer itself would move its running estimate towards on each batch: its own
estimator is kept (BN's group mean and unbiased group variance, BRN's mean and standard deviation,
MABN's moving average of the second moment). The layer's own update code computes that value (its
momentum set so that the new value replaces the old); the statistics are then put back, so that every
forward normalizes as the trained network did (BRN's r and d and MABN's r read them) and the result
does not depend on the order of the batches. GN, LN and IN keep no statistics and are left as they are.
"""
import copy

import torch
from torch import nn
from tqdm import tqdm

from .norms import BatchRenorm2d, MABN2d

RUNNING = ("running_mean", "running_var", "running_std")


def replace_on_update(layer: nn.Module) -> bool:
    """Set `layer`'s momentum so that its running update replaces the statistics; False: it keeps none."""
    if isinstance(layer, (nn.modules.batchnorm._BatchNorm, BatchRenorm2d)):  # running += momentum (new - running)
        layer.momentum = 1.0
        return True
    if isinstance(layer, MABN2d):  # running += (1 - momentum) (new - running)
        layer.momentum = 0.0
        return True
    return False


@torch.no_grad()
def recompute_running_stats(net: nn.Module, batches, device: str, progress: bool = True) -> tuple[nn.Module, int]:
    """A copy of `net` (eval mode) whose running statistics are equal-weight averages over `batches`
    (an iterable of (images, labels, skipped) training batches); returns it and how many layers changed."""
    fresh = copy.deepcopy(net).to(device).train()
    held = {m: {name: getattr(m, name).clone() for name in RUNNING if hasattr(m, name)}
            for m in fresh.modules() if replace_on_update(m)}
    sums = {m: {name: torch.zeros_like(value, dtype=torch.float64) for name, value in stats.items()}
            for m, stats in held.items()}
    seen = 0
    for images, _, _ in tqdm(batches, desc="re-estimating statistics", unit="batch", disable=not progress):
        if len(images) == 0:
            continue
        seen += 1
        fresh(images.to(device, non_blocking=True))
        for m, stats in held.items():
            for name, trained in stats.items():
                sums[m][name] += getattr(m, name)
                getattr(m, name).copy_(trained)
    if held and seen == 0:
        raise ValueError("no training batch to re-estimate the statistics with")
    for m, stats in sums.items():
        for name, total in stats.items():
            getattr(m, name).copy_(total / seen)
    return fresh.eval(), len(held)
