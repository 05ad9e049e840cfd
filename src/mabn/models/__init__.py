"""Model builders: every architecture takes its norm by name from `mabn.norms`."""
from torch import nn

from ..norms import CenConv2d, name_norm_layers, norm_factory
from .resnet import STEMS, ResNet

ARCHS: dict[str, dict] = {
    "resnet18": dict(block="basic", layers=[2, 2, 2, 2]),
    "resnet50": dict(block="bottleneck", layers=[3, 4, 6, 3]),
}


def build_model(
    arch: str,
    norm: str = "bn",
    num_classes: int = 1000,
    width: int = 64,
    stem: str = "imagenet",
    centered_conv: bool | None = None,
    zero_init_last_gamma: bool = False,
    **norm_kwargs,
) -> ResNet:
    """Build `arch` with every norm built as `build_norm(norm, C, **norm_kwargs)`.

    `centered_conv=None` means: centered convs exactly when the norm is MABN (SPEC §2).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown model '{arch}'; valid: {', '.join(ARCHS)}")
    if centered_conv is None:
        centered_conv = norm == "mabn"
    model = ResNet(
        **ARCHS[arch],
        norm_layer=norm_factory(norm, **norm_kwargs),
        conv_layer=CenConv2d if centered_conv else nn.Conv2d,
        num_classes=num_classes,
        width=width,
        stem=stem,
        zero_init_last_gamma=zero_init_last_gamma,
    )
    name_norm_layers(model)
    return model


def resnet50(norm: str = "bn", num_classes: int = 1000, **norm_kwargs) -> ResNet:
    return build_model("resnet50", norm=norm, num_classes=num_classes, **norm_kwargs)


def resnet18(norm: str = "bn", num_classes: int = 1000, **norm_kwargs) -> ResNet:
    return build_model("resnet18", norm=norm, num_classes=num_classes, **norm_kwargs)


from .export import ExportError, export_backbone, load_backbone  # noqa: E402 - export builds models with build_model

__all__ = ["ARCHS", "STEMS", "ExportError", "ResNet", "build_model", "export_backbone", "load_backbone", "resnet18", "resnet50"]
