"""The augmentation both loaders implement: one description, read by torchvision and by DALI."""
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

# ImageNet RGB statistics (torchvision's convention) and the PCA of ImageNet pixel colours
# (AlexNet's lighting noise), in RGB order for pixels scaled to [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
INPUT_FORMATS = ("torchvision", "bgr255")


@dataclass(frozen=True)
class Augmentation:
    """What a training or validation sample goes through (SPEC §4), independent of the loader."""

    crop_size: int = 224
    val_resize: int = 256
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    lighting_std: float = 0.0  # 0.1 in the paper's recipe; 0 turns it off
    input_format: str = "torchvision"  # torchvision: RGB, mean/std normalized; bgr255: BGR in 0..255

    @classmethod
    def from_config(cls, data_cfg) -> "Augmentation":
        if data_cfg.input_format not in INPUT_FORMATS:
            raise ValueError(
                f"data.input_format={data_cfg.input_format!r} is not valid; valid: {', '.join(INPUT_FORMATS)}"
            )
        return cls(
            crop_size=data_cfg.crop_size,
            val_resize=data_cfg.val_resize,
            crop_scale=tuple(data_cfg.crop_scale),
            flip=data_cfg.flip,
            lighting_std=data_cfg.lighting_std,
            input_format=data_cfg.input_format,
        )


class Lighting(torch.nn.Module):
    """AlexNet-style PCA lighting noise on a float RGB image in [0, 1]: x + V (alpha * lambda), alpha ~ N(0, std)."""

    def __init__(self, std: float):
        super().__init__()
        self.std = std
        self.register_buffer("eigval", torch.tensor(IMAGENET_EIGVAL))
        self.register_buffer("eigvec", torch.tensor(IMAGENET_EIGVEC))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.std
        return img + (self.eigvec @ (alpha * self.eigval))[:, None, None]


class ToInputFormat(torch.nn.Module):
    """Float RGB in [0, 1] to the network's input convention."""

    def __init__(self, input_format: str):
        super().__init__()
        self.input_format = input_format
        self.normalize = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.input_format == "bgr255":
            return img.flip(0) * 255.0
        return self.normalize(img)


def torchvision_transform(aug: Augmentation, train: bool) -> v2.Compose:
    """The torchvision pipeline of `aug`: PIL image in, float CHW tensor out."""
    if train:
        steps = [v2.RandomResizedCrop(aug.crop_size, scale=aug.crop_scale, ratio=aug.crop_ratio, antialias=True)]
        if aug.flip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps = [v2.Resize(aug.val_resize, antialias=True), v2.CenterCrop(aug.crop_size)]
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if train and aug.lighting_std > 0:
        steps.append(Lighting(aug.lighting_std))
    steps.append(ToInputFormat(aug.input_format))
    return v2.Compose(steps)
