"""Fold eval-mode norms into the conv before them, so inference runs convs only (SPEC §2)."""
import copy

import torch
import torch.fx
from torch import nn

from .norms import effective_conv_weight
from .norms.batchnorm import batchnorm_eval_affine


def eval_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) of a norm whose eval mode is a per-channel affine op, else None (e.g. GN)."""
    if hasattr(norm, "eval_affine"):
        return norm.eval_affine()
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.track_running_stats:
        return batchnorm_eval_affine(norm)
    return None


class _ConvNormTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.Conv2d) or eval_affine_defined(m) or super().is_leaf_module(m, qualname)


def eval_affine_defined(m: nn.Module) -> bool:
    return hasattr(m, "eval_affine") or isinstance(m, nn.modules.batchnorm._BatchNorm)


def conv_norm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv path, norm path) for every norm applied directly, and only, to a conv's output."""
    graph = _ConvNormTracer().trace(model)
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not eval_affine_defined(modules[node.target]):
            continue
        source = node.args[0]
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and isinstance(modules[source.target], nn.Conv2d)
            and len(source.users) == 1
        ):
            pairs.append((source.target, node.target))
    return pairs


@torch.no_grad()
def fold_norms(model: nn.Module) -> nn.Module:
    """An eval-only copy of `model` with each foldable norm merged into its conv (a plain Conv2d with bias).

    Parts that torch.fx cannot trace (a detector's data-dependent control flow) are folded child by
    child, so a detector's backbone is folded while its heads stay as they are."""
    folded = copy.deepcopy(model).eval()
    _fold_in_place(folded)
    return folded


def _fold_in_place(module: nn.Module) -> None:
    try:
        pairs = conv_norm_pairs(module)
    except Exception:  # noqa: BLE001 - tracing runs arbitrary model code; whatever stops it, fold the children
        for child in module.children():
            _fold_in_place(child)
        return
    for conv_path, norm_path in pairs:
        conv, norm = module.get_submodule(conv_path), module.get_submodule(norm_path)
        affine = eval_affine(norm)
        if affine is None:
            continue
        scale, shift = affine
        merged = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
        ).to(conv.weight)
        merged.weight.copy_(effective_conv_weight(conv) * scale[:, None, None, None])
        bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
        merged.bias.copy_(bias * scale + shift)
        module.set_submodule(conv_path, merged)
        module.set_submodule(norm_path, nn.Identity())


__all__ = ["conv_norm_pairs", "eval_affine", "fold_norms"]
