"""ResNet v1.5 (stride on the bottleneck's 3x3 conv) in torchvision's layout, with pluggable norm and conv.

Every norm comes from `norm_layer(num_channels)` and every conv from `conv_layer(...)`, so one
argument swaps BN for MABN (with centered convs) throughout the network.
"""
from typing import Callable

from torch import nn

NormLayer = Callable[[int], nn.Module]
ConvLayer = Callable[..., nn.Conv2d]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, downsample: nn.Module | None, norm_layer, conv_layer):
        super().__init__()
        self.conv1 = conv_layer(in_ch, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = conv_layer(width, width, 3, padding=1, bias=False)
        self.bn2 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, downsample: nn.Module | None, norm_layer, conv_layer):
        super().__init__()
        self.conv1 = conv_layer(in_ch, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = conv_layer(width, width, 3, stride=stride, padding=1, bias=False)  # v1.5: stride here
        self.bn2 = norm_layer(width)
        self.conv3 = conv_layer(width, width * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
STEMS = ("imagenet", "small")  # imagenet: 7x7/2 conv + max-pool; small: 3x3/1 conv, no pool (32-64 px inputs)


class ResNet(nn.Module):
    """`stem="imagenet"`: 7x7/2 conv + 3x3/2 max-pool (224 px inputs); `stem="small"`: one 3x3/1 conv,
    no pool, for 32-64 px inputs on CPU."""

    def __init__(
        self,
        block: str,
        layers: list[int],
        norm_layer: NormLayer,
        conv_layer: ConvLayer = nn.Conv2d,
        num_classes: int = 1000,
        width: int = 64,
        stem: str = "imagenet",
        zero_init_last_gamma: bool = False,
    ):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"unknown block '{block}'; valid: {', '.join(BLOCKS)}")
        if stem not in STEMS:
            raise ValueError(f"unknown stem '{stem}'; valid: {', '.join(STEMS)}")
        block_cls = BLOCKS[block]
        self.norm_layer, self.conv_layer = norm_layer, conv_layer
        if stem == "imagenet":
            self.conv1 = conv_layer(3, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = conv_layer(3, width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.in_ch = width
        self.layer1 = self._make_layer(block_cls, width, layers[0], 1)
        self.layer2 = self._make_layer(block_cls, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block_cls, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block_cls, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.in_ch, num_classes)
        self._init_weights(zero_init_last_gamma)

    def _make_layer(self, block_cls, width: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        out_ch = width * block_cls.expansion
        if stride != 1 or self.in_ch != out_ch:
            downsample = nn.Sequential(
                self.conv_layer(self.in_ch, out_ch, 1, stride=stride, bias=False), self.norm_layer(out_ch)
            )
        layers = [block_cls(self.in_ch, width, stride, downsample, self.norm_layer, self.conv_layer)]
        self.in_ch = out_ch
        layers += [block_cls(out_ch, width, 1, None, self.norm_layer, self.conv_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_last_gamma: bool) -> None:
        # Norm layers initialize their own gamma = 1, beta = 0; only convs and the last gammas here.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_last_gamma:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_norm().weight)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))
