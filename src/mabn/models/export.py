"""A trained run's ResNet as a torchvision ResNet: `export_backbone` writes it (with the rank-averaged eval
statistics, optionally folded), `load_backbone` returns a `torchvision.models.ResNet` that torchvision's
detection backbones accept, e.g. `backbone_utils._resnet_fpn_extractor(load_backbone(path), 5)`.

Our ResNet has torchvision's layout (same module names), so the state dict carries over as it is;
only runs at torchvision's widths and stem (width 64, `stem: imagenet`) can be exported.
"""
import pathlib

import torch
import torchvision
from torch import nn

from .. import checkpoint as ckpt
from ..convert import center_convs
from ..fold import fold_norms
from ..norms import NORMS, name_norm_layers, norm_factory
from .trained import RunError, check_output, checkpoint_of, load_trained

FORMAT = "mabn-backbone/1"
TORCHVISION_ARCHS = ("resnet18", "resnet50")


class ExportError(RunError):
    """A run or file that cannot be exported or loaded; one line naming what and why."""


def export_backbone(run_dir: str | pathlib.Path, out: str | pathlib.Path, fold: bool = False,
                    checkpoint: str | pathlib.Path | None = None) -> dict:
    """Write the run's network (its best checkpoint unless `checkpoint` is given) to `out`; returns what was written."""
    try:
        out = check_output(out, "backbone.pt")
        path = pathlib.Path(checkpoint) if checkpoint else checkpoint_of(run_dir)
        trained = load_trained(path)
    except RunError as err:
        raise ExportError(str(err)) from None
    net, kwargs = trained.net, trained.kwargs
    if kwargs["arch"] not in TORCHVISION_ARCHS or kwargs["width"] != 64 or kwargs["stem"] != "imagenet":
        raise ExportError(
            f"{path}: model {kwargs['arch']} with width={kwargs['width']}, stem={kwargs['stem']} has no torchvision "
            f"counterpart; valid: arch in {', '.join(TORCHVISION_ARCHS)} with width=64 and stem=imagenet"
        )
    centered = kwargs["centered_conv"] if kwargs["centered_conv"] is not None else kwargs["norm"] == "mabn"
    layer_kwargs = {k: v for k, v in kwargs.items()
                    if k not in ("arch", "norm", "num_classes", "width", "stem", "centered_conv", "zero_init_last_gamma")}
    if fold:
        net = fold_norms(net)
        left = [name for name, m in net.named_modules() if isinstance(m, tuple(NORMS.values()))]
        if left:  # the file would not load: its norm layers have no place in a folded network
            raise ExportError(f"{path}: norm {kwargs['norm']} has no per-channel affine form at inference (it normalizes "
                              f"by each sample's own statistics), so its {len(left)} layers (first: {left[0]}) cannot be "
                              f"folded into the convs; export without --fold")
    state_dict = net.state_dict()
    entry = dict(format=FORMAT, arch=kwargs["arch"], num_classes=kwargs["num_classes"], norm=kwargs["norm"],
                 norm_kwargs=layer_kwargs, centered_conv=bool(centered), folded=fold, checkpoint=str(path),
                 state_dict=state_dict)
    load_backbone_from(entry)  # the file must load: fail here, not in the user's detector
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_save(entry, out)
    return {k: v for k, v in entry.items() if k != "state_dict"}


def load_backbone(path: str | pathlib.Path) -> torchvision.models.ResNet:
    """The `torchvision.models.ResNet` written by `export_backbone` / `scripts/export_backbone.py` (train mode,
    as torchvision builds it): our norm layers (and centered convs for MABN), or plain convs with bias
    and no norms when the file was folded."""
    try:
        entry = ckpt.read(path)
    except Exception as err:
        raise ExportError(f"{path} cannot be loaded: {ckpt.describe_error(err)}") from None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        raise ExportError(f"{path} is not a backbone file ({FORMAT}); write one with scripts/export_backbone.py")
    return load_backbone_from(entry)


def load_backbone_from(entry: dict) -> torchvision.models.ResNet:
    builder = getattr(torchvision.models, entry["arch"])
    state_dict = entry["state_dict"]
    if entry["folded"]:
        model = builder(weights=None, num_classes=entry["num_classes"], norm_layer=nn.Identity)
        for path, conv in list(model.named_modules()):
            if isinstance(conv, nn.Conv2d) and f"{path}.bias" in state_dict:
                model.set_submodule(path, nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                                    conv.padding, conv.dilation, conv.groups, bias=True))
    else:
        norm_layer = norm_factory(entry["norm"], **entry["norm_kwargs"])
        model = builder(weights=None, num_classes=entry["num_classes"], norm_layer=norm_layer)
        if entry["centered_conv"]:
            center_convs(model)
    model.load_state_dict(state_dict)
    name_norm_layers(model)
    return model


__all__ = ["ExportError", "export_backbone", "load_backbone"]
