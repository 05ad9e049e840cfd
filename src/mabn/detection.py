"""Detection at a real batch of 2, the paper's COCO setting in miniature: a small torchvision Faster R-CNN and
generated images with boxes, for the smoke test and the detector row of `make bench`.

    model = convert_model(small_fasterrcnn(), "mabn")   # the group of 2 images is the batch; SMA over iterations
    images, targets = synthetic_boxes(2, generator=torch.Generator().manual_seed(0))
    loss = sum(model(images, targets).values())
"""
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

# One color per class (RGB in [0, 1]); class 0 is the background.
CLASS_COLORS = ((0.9, 0.1, 0.1), (0.1, 0.8, 0.2), (0.2, 0.3, 0.9))


def small_fasterrcnn(num_classes: int = len(CLASS_COLORS) + 1, size: int = 64, backbone: str = "resnet18",
                     head_width: int = 128, rois: int = 64) -> FasterRCNN:
    """Faster R-CNN with a randomly initialized ResNet-FPN backbone (BatchNorm2d, every layer trainable) for
    `size`-pixel images, a `head_width` box head and `rois` sampled regions per image (torchvision's
    1024 and 512 would make the heads, not the norms, the cost of a step on a CPU); nothing is downloaded."""
    body = resnet_fpn_backbone(backbone_name=backbone, weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=5)
    resolution = 7  # torchvision's RoIAlign output size
    return FasterRCNN(
        body, min_size=size, max_size=size,
        rpn_pre_nms_top_n_train=rois * 4, rpn_post_nms_top_n_train=rois * 2, rpn_pre_nms_top_n_test=rois * 4,
        rpn_post_nms_top_n_test=rois * 2, box_batch_size_per_image=rois,
        box_head=TwoMLPHead(body.out_channels * resolution**2, head_width),
        box_predictor=FastRCNNPredictor(head_width, num_classes),
    )


def synthetic_boxes(n: int, size: int = 64, generator: torch.Generator | None = None):
    """`n` noisy images, each with one or two filled rectangles whose color gives the class; returns
    (images, targets) in torchvision's detection format."""
    images, targets = [], []
    for _ in range(n):
        image = torch.rand(3, size, size, generator=generator) * 0.3
        boxes, labels = [], []
        for _ in range(1 + int(torch.randint(0, 2, (1,), generator=generator))):
            w, h = (int(v) for v in torch.randint(size // 4, size // 2, (2,), generator=generator))
            x0, y0 = (int(v) for v in torch.randint(0, size - max(w, h), (2,), generator=generator))
            label = int(torch.randint(0, len(CLASS_COLORS), (1,), generator=generator))
            image[:, y0:y0 + h, x0:x0 + w] = torch.tensor(CLASS_COLORS[label])[:, None, None]
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(label + 1)
        images.append(image)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets


__all__ = ["CLASS_COLORS", "small_fasterrcnn", "synthetic_boxes"]
