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

`average="ema"` replays training's own estimate instead: the layers update their statistics with their
own momentum from the trained values on, the weights frozen. Set against the equal-weight average, it
tells an estimator's effect from the particular moving averages the weights were trained beside
(after k batches the trained values weigh (1 - momentum)^k: with BRN's 0.01, 1,000 batches leave 4e-5).
Both passes also count how often BRN's r and d are clipped (`mabn.renorm_clips`).
"""
import copy

import torch
from torch import nn
from tqdm import tqdm

from .norms import BatchRenorm2d, MABN2d
from .renorm_clips import RenormClipCounter

RUNNING = ("running_mean", "running_var", "running_std")
AVERAGES = ("equal", "ema")


def keeps_statistics(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.modules.batchnorm._BatchNorm, BatchRenorm2d, MABN2d))


def replace_on_update(layer: nn.Module) -> None:
    """Set `layer`'s momentum so that its running update replaces the statistics."""
    # MABN: running += (1 - momentum) (new - running); BN, BRN: running += momentum (new - running).
    layer.momentum = 0.0 if isinstance(layer, MABN2d) else 1.0


@torch.no_grad()
def recompute_running_stats(net: nn.Module, batches, device: str, progress: bool = True,
                            average: str = "equal") -> tuple[nn.Module, int, dict | None]:
    """A copy of `net` (eval mode) whose running statistics are re-estimated over `batches` (an iterable of
    (images, labels, skipped) training batches): equal-weight averages, or (`average="ema"`) the layers'
    own moving averages replayed; returns it, how many layers keep statistics, and BRN's clip rates in
    those forwards (`RenormClipCounter.rates()`; None without BRN layers)."""
    if average not in AVERAGES:
        raise ValueError(f"average={average!r} is not valid; valid: {', '.join(AVERAGES)}")
    fresh = copy.deepcopy(net).to(device).train()
    keeping = [m for m in fresh.modules() if keeps_statistics(m)]
    held = {}
    if average == "equal":  # each forward's update replaces the statistics; they are put back after it
        held = {m: {name: getattr(m, name).clone() for name in RUNNING if hasattr(m, name)} for m in keeping}
        for m in keeping:
            replace_on_update(m)
    sums = {m: {name: torch.zeros_like(value, dtype=torch.float64) for name, value in stats.items()}
            for m, stats in held.items()}
    seen = 0
    with RenormClipCounter(fresh) as clips:
        for images, _, _ in tqdm(batches, desc="re-estimating statistics", unit="batch", disable=not progress):
            if len(images) == 0:
                continue
            seen += 1
            fresh(images.to(device, non_blocking=True))
            for m, stats in held.items():
                for name, trained in stats.items():
                    sums[m][name] += getattr(m, name)
                    getattr(m, name).copy_(trained)
    if keeping and seen == 0:
        raise ValueError("no training batch to re-estimate the statistics with")
    for m, stats in sums.items():
        for name, total in stats.items():
            getattr(m, name).copy_(total / seen)
    return fresh.eval(), len(keeping), clips.rates() if clips.layers else None
