"""Norm layers, training forward + backward at ResNet-50 shapes: MABN, BRN, GN and ghost BN (b=2) against BN."""
import torch

from mabn.norms import build_norm

from .common import STEADY, compare, kernel_calls, markdown_table

SHAPES = [(32, 256, 56, 56), (2, 64, 112, 112), (2, 2048, 7, 7)]
TARGETS = {"cpu": 1.5, "cuda": 1.25}  # MABN / BN, training forward + backward (issue targets)


def candidates(shape, device, compiled: bool):
    x = torch.randn(*shape, device=device, requires_grad=True)
    dy = torch.randn(*shape, device=device)
    layers = {
        "bn": build_norm("bn", shape[1]),
        "mabn": build_norm("mabn", shape[1], **STEADY),
        "brn": build_norm("brn", shape[1]),
        "gn": build_norm("gn", shape[1]),
        "bn b=2": build_norm("bn", shape[1], norm_batch=2),
    }
    if compiled:
        layers["mabn compiled"] = build_norm("mabn", shape[1], kernel="compiled", **STEADY)
    fns = {}
    for name, layer in layers.items():
        layer.to(device).train()

        def step(layer=layer):
            x.grad = None
            layer(x).backward(dy)

        fns[name] = step
    return fns


def run(device: str, quick: bool = False, compiled: bool = True) -> tuple[str, dict]:
    rows, worst = [], 0.0
    for shape in SHAPES[1:] if quick else SHAPES:
        fns = candidates(shape, device, compiled)
        times = compare(fns, device, rounds=1 if quick else 5, min_run_time=0.05 if quick else 0.3)
        base = times["bn"]
        for name, t in times.items():
            # ops counted in steady state (after compare's calls), eager only: a dispatch mode around a
            # compiled function would trace it again
            ops = "-" if "compiled" in name else str(kernel_calls(fns[name]))
            rows.append(["x".join(map(str, shape)), name, f"{t * 1e3:.2f}", f"{t / base:.2f}", ops])
        worst = max(worst, min(t for name, t in times.items() if name.startswith("mabn")) / base)
    target = TARGETS["cuda" if device.startswith("cuda") else "cpu"]
    text = markdown_table(["shape N x C x H x W", "norm", "ms (fwd+bwd)", "/ BN", "ops (fwd+bwd)"], rows)
    text += "\nops: compute ops dispatched per forward + backward (views, allocations left out), each a kernel launch or more on a GPU.\n"
    text += f"\nMABN / BN worst case (fastest MABN kernel): {worst:.2f} (target <= {target})\n"
    return text, {"mabn_over_bn_worst": worst, "target": target}
