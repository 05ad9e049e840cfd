"""Put the project's norms into any model: `convert_model` swaps every batch norm of torch and torchvision
(BatchNorm2d, SyncBatchNorm, FrozenBatchNorm2d) for `build_norm(norm, C, ...)`, carrying its state across.

    from mabn.convert import convert_model
    detector = convert_model(torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None,
                             weights_backbone=None), "mabn", norm_batch=2)

In eval mode, and without centered convs, the converted model computes the same function as the
original wherever the target norm can: BN (ghost batches), SyncBN, BRN and MABN take the running
statistics over (MABN has no mean: its bias absorbs -gamma mu / sqrt(var + eps)). GN has no running
statistics: it keeps only gamma and beta, and a warning says the function changed; so does one for a
BatchNorm2d(track_running_stats=False), which normalized each eval batch by its own statistics.
"""
import math
import warnings

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .norms import BATCH_STAT_NORMS, NORMS, CenConv2d, build_norm, name_norm_layers, norm_class

SOURCE_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)
_OURS = tuple(NORMS.values())


def is_source_norm(module: nn.Module) -> bool:
    """A torch/torchvision batch norm that `convert_model` replaces (the project's own norms are left alone)."""
    return isinstance(module, SOURCE_NORMS) and not isinstance(module, _OURS)


def convert_model(model: nn.Module, norm: str, *, norm_batch: int | None = None, centered_conv: bool | None = None,
                  unfreeze: bool = False, **options) -> nn.Module:
    """Replace, in place, every batch norm of `model` by `build_norm(norm, C, norm_batch=..., **options)`; returns `model`.

    - Affine parameters and running statistics are carried over (see the module docstring); `eps`
      too, unless `options` sets it, and BN's momentum for `bn`/`syncbn`.
    - Frozen layers stay frozen: a parameter that did not require grad (and FrozenBatchNorm2d's
      buffers) gives a parameter that does not, unless `unfreeze=True`.
    - `centered_conv=None`: centered convs exactly when `norm` is MABN, as `build_model` does. Then
      every `nn.Conv2d` becomes a `CenConv2d` with the same weights (grouped and depthwise ones included,
      except convs with a single weight per output channel, which centering would zero). Centering
      changes the function: the conv applies W - mean(W) per output channel.
    - GN uses gcd(num_groups, C) groups in a layer of C channels (32 groups where they divide C).
    - Each new layer knows its path in the model (`layer_name`), so its errors name it.

    Errors (ValueError, one line): an unknown norm, a bad `norm_batch`, a norm_batch for a norm that
    has none, a model with no batch norm to convert.
    """
    cls = norm_class(norm)
    if norm_batch is not None and (isinstance(norm_batch, bool) or not isinstance(norm_batch, int) or norm_batch < 1):
        raise ValueError(f"norm_batch={norm_batch!r} is not valid; valid: None (the whole batch) or an integer >= 1")
    if norm_batch is not None and norm not in BATCH_STAT_NORMS:
        raise ValueError(f"norm_batch={norm_batch} given, but norm '{norm}' has no normalization batch; "
                         f"ghost batches apply to {', '.join(BATCH_STAT_NORMS)}")
    targets = [(path, m) for path, m in model.named_modules() if is_source_norm(m)]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no BatchNorm2d, SyncBatchNorm or FrozenBatchNorm2d to convert")
    lost, untracked = [], []
    for path, old in targets:
        kwargs = dict(options)
        kwargs.setdefault("eps", old.eps)
        if norm in ("bn", "syncbn") and getattr(old, "momentum", None) is not None:
            kwargs.setdefault("momentum", old.momentum)
        if norm in BATCH_STAT_NORMS:
            kwargs["norm_batch"] = norm_batch
        if norm == "gn":  # torchvision widths such as 40 or 104 are not multiples of 32 groups
            kwargs["num_groups"] = math.gcd(kwargs.get("num_groups", 32), channels(old))
        try:
            new = build_norm(norm, channels(old), **kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{cls.__name__} '{path}': {err}") from None
        if not carry_state(old, new):
            lost.append(path)
        elif getattr(old, "running_var", 0) is None:
            untracked.append(path)
        frozen = not unfreeze and not _trainable(old)
        for p in new.parameters(recurse=False):
            p.requires_grad_(not frozen)
        reference = next((t for t in (*old.parameters(), *old.buffers()) if t.is_floating_point()), None)
        if reference is not None:
            new.to(device=reference.device, dtype=reference.dtype)
        new.train(old.training)
        model.set_submodule(path, new)
    if lost:
        warnings.warn(f"{norm} has no running statistics: {len(lost)} converted layers (first: '{lost[0]}') keep "
                      f"gamma and beta only, so the model no longer computes its eval-mode function", stacklevel=2)
    if untracked:  # torch's BN then normalizes every eval batch by its own statistics; ours use running ones
        warnings.warn(f"{len(untracked)} converted layers (first: '{untracked[0]}') had track_running_stats=False, so "
                      f"their running statistics start at mean 0, variance 1 and the eval-mode function changed: "
                      f"train, or re-estimate them (mabn.precise_stats), before evaluating", stacklevel=2)
    if (norm == "mabn") if centered_conv is None else centered_conv:
        center_convs(model)
    name_norm_layers(model)
    return model


def channels(norm: nn.Module) -> int:
    """Channels of a source norm (FrozenBatchNorm2d has no num_features, an affine=False BatchNorm2d no weight)."""
    return getattr(norm, "num_features", None) or norm.weight.shape[0]


def _trainable(norm: nn.Module) -> bool:
    weight = getattr(norm, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.requires_grad


@torch.no_grad()
def carry_state(old: nn.Module, new: nn.Module) -> bool:
    """Copy `old`'s affine parameters and running statistics into `new` so that their eval outputs agree.

    Returns False when `new` has no running statistics to hold them (GN: gamma and beta only)."""
    c = new.num_features
    gamma = old.weight.detach() if old.weight is not None else torch.ones(c)
    beta = old.bias.detach() if old.bias is not None else torch.zeros(c)
    new.weight.copy_(gamma)
    new.bias.copy_(beta)
    mean, var = old.running_mean, old.running_var
    if mean is None or var is None:  # BatchNorm2d(track_running_stats=False): nothing more to carry
        return hasattr(new, "running_var") or hasattr(new, "running_std")
    if hasattr(new, "running_std"):  # BRN: inference is (x - mu) / sigma with sigma = sqrt(var + eps)
        new.running_mean.copy_(mean)
        new.running_std.copy_(torch.sqrt(var + old.eps))
    elif hasattr(new, "running_mean"):  # BN, SyncBN
        new.running_mean.copy_(mean)
        new.running_var.copy_(var)
        if getattr(old, "num_batches_tracked", None) is not None:
            new.num_batches_tracked.copy_(old.num_batches_tracked)
    elif hasattr(new, "running_var"):  # MABN: y = gamma x / sqrt(var + eps) + beta', no mean: beta' absorbs it
        new.running_var.copy_(var + old.eps - new.eps)
        new.bias.copy_(beta - gamma * mean / torch.sqrt(var + old.eps))
    else:
        return False
    return True


@torch.no_grad()
def center_convs(model: nn.Module) -> int:
    """Replace every plain `nn.Conv2d` with a `CenConv2d` holding the same weights; returns how many."""
    count = 0
    for path, conv in list(model.named_modules()):
        if type(conv) is not nn.Conv2d or conv.weight[0].numel() == 1:
            continue  # subclasses are someone else's design; a single weight per channel would be zeroed
        cen = CenConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode)
        cen.to(conv.weight)
        cen.weight.copy_(conv.weight)
        cen.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
            cen.bias.copy_(conv.bias)
            cen.bias.requires_grad_(conv.bias.requires_grad)
        cen.train(conv.training)
        model.set_submodule(path, cen)
        count += 1
    return count


__all__ = ["SOURCE_NORMS", "carry_state", "center_convs", "convert_model", "is_source_norm"]
