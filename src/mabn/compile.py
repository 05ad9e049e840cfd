"""torch.compile for training with every norm (`train.compile=true`), with one graph per MABN phase.

MABN branches on its forward counter (moving averages on? r on?). Read inside a compiled graph, the
counter would specialize the graph on each of its values: a recompile every step, until dynamo gives
up and runs eagerly. So the branch is taken on the host: hooks around the compiled module set each
MABN layer's `compiled_phase` before every training forward from the host copy of its counter
(`read_counter`, no device sync in steady state); the graph guards on that pair of booleans and keeps
the ring positions as tensors. A run compiles at most three training graphs (warmup, averaging,
averaging with r) and an eval graph. The other norms hold no host state and compile as they are.
With CUDA graphs (mode reduce-overhead) the buffers a compiled forward rebinds are copied back into their
own tensors before the next call (`keep_buffers_in_place`).

  compiled = compile_model(model)             # train with `compiled`, save `model`: same parameters
"""
import torch
from torch import nn

from .norms import MABN2d
from .norms.mabn import read_counter, trust_counter

MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile modes; reduce-overhead adds CUDA graphs


def compile_model(model: nn.Module, mode: str = "default", backend: str = "inductor", fullgraph: bool = False,
                  static_buffers: bool | None = None) -> nn.Module:
    """`torch.compile(model)` with MABN's phases set on the host before each training forward.

    The result shares `model`'s parameters and buffers; checkpoint `model` (the compiled wrapper
    prefixes its state-dict keys). Forwards of `model` itself (eager) may be mixed in: both keep the
    same host counters. `static_buffers` (default: with CUDA graphs, mode reduce-overhead): see
    `keep_buffers_in_place`.
    """
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r} is not valid; valid: {', '.join(MODES)}")
    compiled = torch.compile(model, mode=None if backend != "inductor" else mode, backend=backend, fullgraph=fullgraph)
    if mode == "reduce-overhead" if static_buffers is None else static_buffers:
        keep_buffers_in_place(model, compiled)
    layers = [m for m in model.modules() if isinstance(m, MABN2d)]
    if layers:
        coming: list[int] = []

        def set_phases(module, args):
            if not model.training:
                return
            coming.clear()
            for layer in layers:
                t = read_counter(layer, "num_batches_tracked") + 1
                phase = layer.phase_at(t)
                if layer.compiled_phase != phase:  # it changes twice a run; nn.Module's setattr is slow
                    layer.compiled_phase = phase
                coming.append(t)

        def record_counters(module, args, output):
            # The graph advanced each counter by one; trust the host copy at the buffer's new version.
            for layer, t in zip(layers, coming):
                trust_counter(layer, "num_batches_tracked", t)
            coming.clear()

        compiled.register_forward_pre_hook(set_phases)
        compiled.register_forward_hook(record_counters)
    return compiled


def keep_buffers_in_place(model: nn.Module, compiled: nn.Module) -> None:
    """Before each call of `compiled`, copy every buffer a compiled forward rebound (MABN's and BRN's
    statistics and counters, see `norms._groups.store_buffer`) back into the tensor it started as, with
    one multi-tensor copy, and mark those tensors static.

    With CUDA graphs a rebound buffer would be an output in the graph's memory pool, fed back as the
    next step's input: the next replay overwrites that memory (cudagraph trees then refuse the tensor,
    "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run"), and an input
    at a new address each step is copied in or re-recorded. Kept in place, every step reads the same
    addresses. The copy waits for the next call, not the end of this forward: the backward may still
    read the buffers' old values (the reason they are rebound, not written in place).
    """
    # Reading and writing `module._buffers` directly is what getattr/setattr do for a buffer, less their
    # generic lookups (and setattr's global registration hooks: a buffer moving back is not a new one),
    # about 1 us each on a slow host; for a ResNet-50 with MABN (371 buffers, 212 rebound a step) that was
    # 1.1 ms of host time per step.
    homes = [(module, name, buffer) for module in model.modules() for name, buffer in module._buffers.items()
             if buffer is not None]
    for _, _, buffer in homes:
        torch._dynamo.mark_static_address(buffer, guard=False)

    def restore(module, args):
        moved = [(m, name, home, now) for m, name, home in homes if (now := m._buffers[name]) is not home]
        if not moved:
            return
        torch._foreach_copy_([home for _, _, home, _ in moved], [now for _, _, _, now in moved])
        for m, name, home, now in moved:
            m._buffers[name] = home
            cached = m.__dict__.get("_host_counters", {}).get(name)
            if cached is not None and cached[0] is now and cached[1] == now._version:
                trust_counter(m, name, cached[2])  # the host copy of a counter holds for its home too

    compiled.register_forward_pre_hook(restore)
