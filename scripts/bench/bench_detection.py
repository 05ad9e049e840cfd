"""Detection at a real batch of 2 (the paper's COCO setting in miniature): training step of a converted Faster R-CNN,
MABN vs BN, side by side."""
import copy

import torch

from mabn.convert import convert_model
from mabn.detection import small_fasterrcnn, synthetic_boxes

from .common import compare, markdown_table

# Each variant: convert_model's arguments. BN's group is the batch of 2; MABN's too, averaged over iterations.
VARIANTS = {"bn": dict(norm="bn"), "mabn": dict(norm="mabn"), "mabn, plain conv": dict(norm="mabn", centered_conv=False)}


def run(device: str, quick: bool = False) -> tuple[str, dict]:
    size, backbone = (64, "resnet18") if quick else ((512, "resnet50") if device.startswith("cuda") else (128, "resnet50"))
    torch.manual_seed(0)
    base = small_fasterrcnn(size=size, backbone=backbone)
    images, targets = synthetic_boxes(2, size=size, generator=torch.Generator().manual_seed(0))
    images = [i.to(device) for i in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    fns = {}
    for name, kwargs in VARIANTS.items():
        model = convert_model(copy.deepcopy(base), **kwargs).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            sum(model(images, targets).values()).backward()
            opt.step()

        fns[name] = step
    times = compare(fns, device, rounds=2 if quick else 3, min_run_time=0.5 if quick else 1.0)
    rows = [[name, f"{2 / t:.2f}", f"{t / times['bn']:.2f}"] for name, t in times.items()]
    text = (f"Faster R-CNN ({backbone}-FPN, torchvision, converted with `convert_model`), 2 images of {size} px per "
            f"step, forward + backward + SGD step:\n\n")
    text += markdown_table(["norm", "images/s", "time / BN"], rows)
    return text, {f"detector_{k.replace(', ', '_').replace(' ', '_')}_b2": v / times["bn"] for k, v in times.items()}
