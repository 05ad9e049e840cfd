"""torch.compile for training with every norm (`train.compile=true`), with one graph per MABN phase.

MABN branches on its forward counter (moving averages on? r on?). Read inside a compiled graph, the
counter would specialize the graph on each of its values: a recompile every step, until dynamo gives
up and runs eagerly. So the branch is taken on the host: hooks around the compiled module set each
MABN layer's `compiled_phase` before every training forward from the host copy of its counter
(`read_counter`, no device sync in steady state); the graph guards on that pair of booleans and keeps
the ring positions as tensors. A run compiles at most three training graphs (warmup, averaging,
averaging with r) and an eval graph. The other norms hold no host state and compile as they are.

  compiled = compile_model(model)             # train with `compiled`, save `model`: same parameters
"""
import torch
from torch import nn

from .norms import MABN2d
from .norms.mabn import read_counter, trust_counter

MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile modes; reduce-overhead adds CUDA graphs


def compile_model(model: nn.Module, mode: str = "default", backend: str = "inductor", fullgraph: bool = False) -> nn.Module:
    """`torch.compile(model)` with MABN's phases set on the host before each training forward.

    The result shares `model`'s parameters and buffers; checkpoint `model` (the compiled wrapper
    prefixes its state-dict keys). Forwards of `model` itself (eager) may be mixed in: both keep the
    same host counters.
    """
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r} is not valid; valid: {', '.join(MODES)}")
    compiled = torch.compile(model, mode=None if backend != "inductor" else mode, backend=backend, fullgraph=fullgraph)
    layers = [m for m in model.modules() if isinstance(m, MABN2d)]
    if layers:
        coming: list[int] = []

        def set_phases(module, args):
            if not model.training:
                return
            coming.clear()
            for layer in layers:
                t = read_counter(layer, "num_batches_tracked") + 1
                layer.compiled_phase = layer.phase_at(t)
                coming.append(t)

        def record_counters(module, args, output):
            # The graph advanced each counter by one; trust the host copy at the buffer's new version.
            for layer, t in zip(layers, coming):
                trust_counter(layer, "num_batches_tracked", t)
            coming.clear()

        compiled.register_forward_pre_hook(set_phases)
        compiled.register_forward_hook(record_counters)
    return compiled
