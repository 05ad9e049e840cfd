"""Side-by-side timing for the benchmarks: every candidate of a comparison is measured in the same process,
interleaved over several rounds, and reported as a ratio to the baseline with the absolute times beside."""
import logging
import statistics
import time
from typing import Callable

import torch

# torch.utils.benchmark's import logs "No CUDA runtime is found" on CPU machines: noise above every report
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils.benchmark import Timer  # noqa: E402

STEADY = dict(warmup=0, renorm_start=0)  # MABN past its warmup from the first step: averages and r on


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compare(candidates: dict[str, Callable[[], None]], device: str, rounds: int = 5, min_run_time: float = 0.3,
            failures: dict | None = None, warmups: dict | None = None) -> dict:
    """Median seconds per call of each candidate, measured round-robin so that machine noise hits all alike.

    With a `failures` dict, a candidate whose warm-up call raises is left out of the timing and its error
    ("Type: first line") recorded there, so that one broken variant does not cost the others' rows. A
    `warmups` dict gets each candidate's warm-up call in seconds (what compiling costs)."""
    for name, fn in list(candidates.items()):  # warm-up (allocator, lazy init, compilation)
        try:
            seconds = wall(fn, device)
            if warmups is not None:
                warmups[name] = seconds
        except Exception as err:  # noqa: BLE001 - reported by the caller
            if failures is None:
                raise
            failures[name] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
            candidates = {k: v for k, v in candidates.items() if k != name}
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            timer = Timer("fn(); sync()", globals={"fn": fn, "sync": lambda: synchronize(device)})
            samples[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    return {name: statistics.median(values) for name, values in samples.items()}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def wall(fn: Callable[[], None], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def kernel_calls(fn: Callable[[], None]) -> int:
    """How many compute ops one call of `fn` dispatches to the backend (views and allocations left out).

    Each is one kernel launch on a GPU, or more: the cost that dominates when tensors are small (a real
    batch of 2), and a count that machine noise cannot blur.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    free = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "detach", "lift_fresh",
            "promote_types"}  # allocations, and dtype arithmetic on the host

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket.__name__ not in free:
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls
