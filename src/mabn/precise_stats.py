"""Re-estimate a trained network's inference statistics with its final weights (PreciseBN; Wu & Johnson,
"Rethinking 'Batch' in BatchNorm", 2021), to tell error due to the inference statistics from error due to
training.

The running statistics a run evaluates with are exponential moving averages over iterations whose
weights kept changing, and at a small normalization batch they average noisy per-group estimates. Here
the network, in training mode (each layer normalizes its groups as it did in training), forwards
training batches without gradients, and each norm's statistics are estimated again with its own
estimator (BN's group mean and unbiased group variance, BRN's mean and standard deviation, MABN's moving
average of the second moment), in one of two ways:

- `equal`: each statistic becomes the *equal-weight* average of what the layer would move it towards on
  each batch (its update code computes that value, its momentum set so that the new value replaces the
  old); the statistics are put back after every batch, so every forward normalizes as the trained network
  did and the result does not depend on the order of the batches. Exact for BN: its training forward
  normalizes by batch statistics alone, so no layer's estimate depends on another's running statistics.
- `ema`: the layers update their statistics as in training, with their own momentum from the trained
  values on, the weights frozen (after k batches the trained values weigh (1 - momentum)^k: with BRN's
  0.01, 1,000 batches leave 4e-5). BRN's and MABN's training forwards normalize by their running
  statistics (through r and d; MABN's r), so each layer's estimate depends on the statistics of every
  layer before it: an equal-weight pass holding those at the trained values measures each layer against
  statistics the pass itself then replaces, and in a ResNet that error grows with depth (on the
  Imagenette BRN runs it cost 2.8 points; docs/results/imagenette.md). The replay moves all of them
  together, damped by the momentum, to where they agree with each other, as training's own average did.

Either way BRN's and MABN's forward counts are held, so every forward of the pass normalizes in the phase
training ended in (BRN's t0 and r/d ramps, MABN's warmup and r). `auto` (the default) takes `ema` when a
BRN or MABN layer is present, else `equal`. The pass also counts how often BRN's r and d are clipped
(`mabn.renorm_clips`). GN, LN and IN keep no statistics and are left as they are.
"""
import copy
from dataclasses import dataclass

import torch
from torch import nn

from .norms import BatchRenorm2d, MABN2d
from .progress import progress_bar
from .renorm_clips import RenormClipCounter

RUNNING = ("running_mean", "running_var", "running_std")
AVERAGES = ("auto", "equal", "ema")


def keeps_statistics(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.modules.batchnorm._BatchNorm, BatchRenorm2d, MABN2d))


def replace_on_update(layer: nn.Module) -> None:
    """Set `layer`'s momentum so that its running update replaces the statistics."""
    # MABN: running += (1 - momentum) (new - running); BN, BRN: running += momentum (new - running).
    layer.momentum = 0.0 if isinstance(layer, MABN2d) else 1.0


def kept_weight(layer: nn.Module, updates: int) -> float:
    """The weight the values before `updates` moving-average updates still carry in `layer`'s statistics."""
    if isinstance(layer, MABN2d):
        return layer.momentum ** updates
    if layer.momentum is None:  # torch BN's cumulative average, over every update it has counted
        total = int(layer.num_batches_tracked)
        return (total - updates) / total if total else 0.0
    return (1 - layer.momentum) ** updates


def coupled(layer: nn.Module) -> bool:
    """Whether `layer`'s training forward normalizes by its running statistics (BRN's r and d, MABN's r)."""
    return isinstance(layer, (BatchRenorm2d, MABN2d))


@dataclass
class Reestimated:
    net: nn.Module  # a copy in eval mode
    layers: int  # how many keep statistics
    average: str  # equal or ema (auto resolved)
    trained_weight: float  # ema: the largest weight the trained statistics still carry in a layer; equal: 0
    renorm_clips: dict | None  # RenormClipCounter.rates() over the pass; None without BRN layers


@torch.no_grad()
def recompute_running_stats(net: nn.Module, batches, device: str, progress: bool = True,
                            average: str = "auto", total: int | None = None) -> Reestimated:
    """A copy of `net` whose running statistics are re-estimated over `batches` (an iterable of
    (images, labels, skipped) training batches) with equal weights or the layers' own moving averages;
    `total`: how many batches that is, for the progress bar (default: len(batches) where it has one)."""
    if average not in AVERAGES:
        raise ValueError(f"average={average!r} is not valid; valid: {', '.join(AVERAGES)}")
    fresh = copy.deepcopy(net).to(device).train()
    keeping = [m for m in fresh.modules() if keeps_statistics(m)]
    if average == "auto":
        average = "ema" if any(coupled(m) for m in keeping) else "equal"
    held = {}
    if average == "equal":  # each forward's update replaces the statistics; they are put back after it
        held = {m: {name: getattr(m, name).clone() for name in RUNNING if hasattr(m, name)} for m in keeping}
        for m in keeping:
            replace_on_update(m)
    sums = {m: {name: torch.zeros_like(value, dtype=torch.float64) for name, value in stats.items()}
            for m, stats in held.items()}
    # BRN's and MABN's forwards change with their forward count (BRN: t0 and the r/d ramps; MABN: warmup, then
    # r): held, every forward of the pass normalizes in the phase training ended in. Counted on, a short run's
    # pass crossed into phases it never trained in (a 4-step MABN run's 12,500-batch pass switched r on
    # against 4-step running statistics: loss 2.3 -> 16,724).
    counts = {m: m.num_batches_tracked.clone() for m in keeping if coupled(m)}
    seen = 0
    with RenormClipCounter(fresh) as clips:
        for images, _, _ in progress_bar(batches, total=total, desc="re-estimating statistics", unit="batch", disable=not progress):
            if len(images) == 0:
                continue
            seen += 1
            fresh(images.to(device, non_blocking=True))
            for m, count in counts.items():
                m.num_batches_tracked.copy_(count)
            for m, stats in held.items():
                for name, trained in stats.items():
                    sums[m][name] += getattr(m, name)
                    getattr(m, name).copy_(trained)
    if keeping and seen == 0:
        raise ValueError("no training batch to re-estimate the statistics with")
    for m, stats in sums.items():
        for name, total in stats.items():
            getattr(m, name).copy_(total / seen)
    left = max((kept_weight(m, seen) for m in keeping), default=0.0) if average == "ema" else 0.0
    return Reestimated(fresh.eval(), len(keeping), average, left, clips.rates() if clips.layers else None)
