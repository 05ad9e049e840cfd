"""Normalization layers, built by name through one factory (`build_norm`)."""
import functools
from typing import Callable

from torch import nn

from ._groups import layer_label
from .batchnorm import GhostBatchNorm2d
from .batchrenorm import BatchRenorm2d
from .cenconv import CenConv2d, effective_conv_weight
from .groupnorm import GroupNorm2d, InstanceNorm2d, LayerNorm2d
from .mabn import MABN2d, MABNFunction
from .syncbn import SyncBatchNorm2d

NORMS: dict[str, type[nn.Module]] = {
    "bn": GhostBatchNorm2d,
    "syncbn": SyncBatchNorm2d,
    "gn": GroupNorm2d,
    "ln": LayerNorm2d,
    "in": InstanceNorm2d,
    "brn": BatchRenorm2d,
    "mabn": MABN2d,
}

BATCH_STAT_NORMS = ("bn", "brn", "mabn")  # norms whose statistics come from a normalization batch


def is_per_sample(name: str) -> bool:
    """Whether norm `name` takes its statistics per sample (GN and its special cases LN, IN): no batch size
    enters it, so one run stands for every normalization batch (drawn flat in the paper's figure)."""
    return issubclass(norm_class(name), GroupNorm2d)


def register_norm(name: str, cls: type[nn.Module]) -> None:
    """Make `cls` (constructor `cls(num_features, **kwargs)`) buildable as `build_norm(name, ...)`."""
    NORMS[name] = cls


def norm_class(name: str) -> type[nn.Module]:
    if name not in NORMS:
        raise ValueError(f"unknown norm '{name}'; valid: {', '.join(sorted(NORMS))}")
    return NORMS[name]


def build_norm(name: str, num_features: int, **kwargs) -> nn.Module:
    """Build the norm registered as `name` over `num_features` channels."""
    return norm_class(name)(num_features, **kwargs)


def norm_factory(name: str, **kwargs) -> Callable[[int], nn.Module]:
    """`num_features -> layer`: what models take as their `norm_layer`."""
    norm_class(name)  # fail now, not deep inside model construction
    return functools.partial(build_norm, name, **kwargs)


def name_norm_layers(model: nn.Module) -> None:
    """Record each layer's path in the model so that its errors can name it."""
    for path, module in model.named_modules():
        if isinstance(module, tuple(NORMS.values())):
            module.layer_name = path


__all__ = [
    "BATCH_STAT_NORMS",
    "is_per_sample",
    "NORMS",
    "BatchRenorm2d",
    "CenConv2d",
    "GhostBatchNorm2d",
    "GroupNorm2d",
    "InstanceNorm2d",
    "LayerNorm2d",
    "MABN2d",
    "MABNFunction",
    "SyncBatchNorm2d",
    "build_norm",
    "effective_conv_weight",
    "layer_label",
    "name_norm_layers",
    "norm_factory",
    "register_norm",
]
