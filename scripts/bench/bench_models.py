"""ResNet-50: training step images/s per norm at batch 2 and 32, saved-activation memory, inference
images/s of BN vs MABN folded vs MABN unfolded vs GN, and the host time of train.compile's hooks."""
import torch
import torch.nn.functional as F

from mabn.compile import compile_model
from mabn.fold import fold_norms
from mabn.models import resnet50
from mabn.norms import MABN2d

from .common import STEADY, compare, kernel_calls, markdown_table

NORMS = ["bn", "brn", "gn", "mabn"]
# Training-step variants: each norm as configured (MABN in its steady state), MABN without its
# centered conv weights (the share of MABN's step that is weight centering, which does not shrink
# with the batch), and BN and MABN under torch.compile (train.compile=true).
STEP_VARIANTS = {**{norm: dict(norm=norm) for norm in NORMS}, "mabn": dict(norm="mabn", **STEADY),
                 "mabn, plain conv": dict(norm="mabn", centered_conv=False, **STEADY)}
COMPILED_VARIANTS = {"bn compiled": dict(norm="bn"), "mabn compiled": dict(norm="mabn", **STEADY)}


def saved_activation_bytes(model, x, y) -> int:
    """Bytes autograd keeps for backward in one training step (what differs between norms)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), y).backward()
    return total


def train_step_rows(device, resolution, batches, quick, compiled=False):
    rows, ratios = [], {}
    variants = {**STEP_VARIANTS, **(COMPILED_VARIANTS if compiled else {})}
    for batch in batches:
        x = torch.randn(batch, 3, resolution, resolution, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        models, fns = {}, {}
        for norm, kwargs in variants.items():
            torch.manual_seed(0)
            model = resnet50(**kwargs).to(device).train()
            opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
            models[norm] = model
            run = compile_model(model) if norm in COMPILED_VARIANTS else model  # compiled by compare's warm-up call

            def step(model=run, opt=opt, x=x, y=y):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()

            fns[norm] = step
        times = compare(fns, device, rounds=2 if quick else 3, min_run_time=0.5 if quick else 1.0)
        for norm in variants:
            eager = norm not in COMPILED_VARIANTS
            memory = f"{saved_activation_bytes(models[norm], x, y) / 2**20:.0f}" if eager else "-"
            ops = str(kernel_calls(fns[norm])) if eager else "-"  # what bounds a real batch of 2 on a GPU
            rows.append([str(batch), norm, f"{batch / times[norm]:.1f}", f"{times[norm] / times['bn']:.2f}", memory, ops])
            ratios[f"{norm.replace(', ', '_').replace(' ', '_')}_b{batch}"] = times[norm] / times["bn"]
    return rows, ratios


def inference_rows(device, resolution, batch, quick):
    x = torch.randn(batch, 3, resolution, resolution, device=device)
    nets = {}
    for norm in ("bn", "mabn", "gn"):
        torch.manual_seed(0)
        nets[norm] = resnet50(norm).to(device).eval()
    nets["mabn folded"] = fold_norms(nets["mabn"])
    nets["bn folded"] = fold_norms(nets["bn"])
    fns = {name: (lambda net=net: net(x)) for name, net in nets.items()}
    with torch.no_grad():
        times = compare(fns, device, rounds=2 if quick else 5, min_run_time=0.5)
    rows = [[name, f"{batch / t:.1f}", f"{t / times['bn']:.2f}"] for name, t in times.items()]
    return rows, {f"infer_{k}": v / times["bn"] for k, v in times.items()}


# What a compiled MABN forward rebinds (norms._groups.store_buffer, lerp_buffer in MABN2d.forward); the backward
# writes the Psi ring in place.
REBOUND = ("num_batches_tracked", "chi_seen", "chi_ring", "running_var")


def compile_hook_table(device, quick):
    """Host time per training step of `compile_model`'s hooks around a compiled ResNet-50 with MABN, with CUDA
    graphs' buffer handling (mode reduce-overhead): set each layer's phase, trust the advanced counters, copy
    the rebound buffers back into their own tensors. At a real batch of 2 under CUDA graphs the host runs
    little else, so this is the part of the step the GPU waits for. Timed against the one multi-tensor
    copy the hooks must make; the compiled forward is stood in for by swapping spare tensors in (no graph)."""
    model = resnet50(norm="mabn", **STEADY).to(device).train()
    compiled = compile_model(model, mode="reduce-overhead")  # torch.compile is lazy: nothing compiles here
    before, after = list(compiled._forward_pre_hooks.values()), list(compiled._forward_hooks.values())
    slots = [(m._buffers, name) for m in model.modules() if isinstance(m, MABN2d) for name in REBOUND]
    homes = [held[name] for held, name in slots]
    spares = [home.clone() for home in homes]

    def hooks():
        for (held, name), spare in zip(slots, spares):  # what the compiled forward leaves behind
            held[name] = spare
        for hook in after:
            hook(compiled, (), None)
        for hook in before:
            hook(compiled, ())

    def copy():
        torch._foreach_copy_(homes, spares)

    times = compare({"copy": copy, "hooks": hooks}, device, rounds=2 if quick else 5, min_run_time=0.1 if quick else 0.3)
    rows = [["one multi-tensor copy", f"{times['copy'] * 1e6:.0f}", "1.00"],
            ["compile_model's hooks (with that copy)", f"{times['hooks'] * 1e6:.0f}", f"{times['hooks'] / times['copy']:.2f}"]]
    text = (f"Host time per training step of `train.compile`'s hooks, ResNet-50 with MABN, CUDA graphs' buffer handling "
            f"(`train.compile_mode=reduce-overhead`; {len(slots)} buffers rebound a step):\n\n")
    return text + markdown_table(["work", "us / step", "time / copy"], rows), {
        "compile_hooks_us": times["hooks"] * 1e6, "compile_hooks_over_copy": times["hooks"] / times["copy"]}


def run(device: str, quick: bool = False, compiled: bool = True) -> tuple[str, dict]:
    gpu = device.startswith("cuda")
    resolution = 224 if gpu else (64 if quick else 96)
    train_rows, train_ratios = train_step_rows(device, resolution, [2, 32] if not quick else [2, 8], quick, compiled)
    infer_rows, infer_ratios = inference_rows(device, resolution, 32 if not quick else 8, quick)
    text = (f"Training step, ResNet-50 at {resolution} px (forward, backward, SGD step; MABN past its warmup; "
            f"targets MABN / BN <= 1.10 at batch 32, <= 1.25 at batch 2, compiled where that is faster):\n\n")
    text += markdown_table(["batch", "norm", "images/s", "time / BN", "saved activations (MiB)", "ops"], train_rows)
    text += f"\nInference, ResNet-50 at {resolution} px, eval mode:\n\n"
    text += markdown_table(["model", "images/s", "time / BN"], infer_rows)
    hook_text, hook_numbers = compile_hook_table(device, quick)
    return text + "\n" + hook_text, {**train_ratios, **infer_ratios, **hook_numbers}
