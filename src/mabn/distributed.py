"""The process group: detected from torchrun's (or SLURM's) environment, single process otherwise."""
import atexit
import contextlib
import datetime
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Imported here, before any process group exists, for one side effect: its functions take `group.WORLD` as a
# default argument, evaluated at import. Imported after init (torch._dynamo pulls it in), they hold the default
# group past destroy_process_group, so its gloo threads live into interpreter shutdown, where one that frees a
# tensor aborts the process (SIGABRT, "terminate called without an active exception") after the run's work is done.
import torch.distributed.nn.functional  # noqa: F401

from .config import ConfigError
from .norms import SyncBatchNorm2d


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str, local_rank: int) -> str:
    """The device of this process: GPU `local_rank` for auto (when CUDA is there) and cuda. ConfigError when it
    is not there: a SLURM job with more tasks than GPUs per node (tasks_per_node > gpus_per_node) ended each
    extra rank in CUDA's 'invalid device ordinal' traceback."""
    if requested == "auto" and not torch.cuda.is_available():
        return "cpu"
    if requested == "cpu":
        return requested
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device={requested!r} but no CUDA device is visible; valid here: auto or cpu")
    device = f"cuda:{local_rank}" if requested in ("auto", "cuda") else requested
    count = torch.cuda.device_count()
    if int(device.partition(":")[2]) >= count:
        if requested in ("auto", "cuda"):
            raise ConfigError(f"this process has LOCAL_RANK={local_rank} but {count} GPUs are visible: one process per "
                              "GPU; valid: GPUS= at most the node's GPUs, or SLURM's tasks_per_node = gpus_per_node")
        raise ConfigError(f"train.device={requested!r} but {count} GPUs are visible; valid here: cuda:0 to "
                          f"cuda:{count - 1}, cuda, auto or cpu")
    return device


def export_slurm_environment() -> None:
    """Under SLURM or submitit's local executor without torchrun (one task per GPU: hydra/launcher=slurm, or
    local with tasks_per_node > 1, whose tasks trained apart until the run lock stopped the second), set the
    variables torchrun would have set, with submitit's helper. The node's GPUs stay visible, as under torchrun,
    and each task takes GPU LOCAL_RANK: the helper's default narrowed CUDA_VISIBLE_DEVICES to that one GPU, so
    cuda:LOCAL_RANK did not exist for any task but each node's first."""
    tasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SUBMITIT_LOCAL_NTASKS")  # hydra/launcher=slurm, local
    if "WORLD_SIZE" in os.environ or int(tasks or 1) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def launched_world_size() -> int:
    """How many processes torchrun or SLURM launched for this run (1 outside them); no process group needed."""
    export_slurm_environment()
    return int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(requested_device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun or SLURM (NCCL on GPU, gloo on CPU)."""
    world_size = launched_world_size()
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world_size, local_rank, device)


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class _CpuDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP on CPU processes (gloo) that takes `norm=syncbn`: torch refuses every nn.SyncBatchNorm on CPU
    ("SyncBatchNorm layers only work with GPU modules": `PROCS=2 NORM=syncbn` failed at start-up), but
    SyncBatchNorm2d reduces its CPU statistics itself. torch's own SyncBatchNorm is still refused."""

    def _passing_sync_batchnorm_handle(self, module):
        if any(isinstance(m, torch.nn.SyncBatchNorm) and not isinstance(m, SyncBatchNorm2d) for m in module.modules()):
            super()._passing_sync_batchnorm_handle(module)


def wrap_ddp(net: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel with per-process norm statistics, as in the paper: buffers are not synced
    during training (SPEC §1). At start-up every rank holds the same buffers anyway: fresh, or rank 0's
    from the checkpoint.

    The switch is `forward_sync_buffers=False` from torch 2.13 (`broadcast_buffers`, deprecated there, still
    works); torch before 2.13 has only `broadcast_buffers=False`, which the GPU machines' 2.11 needs."""
    device_ids = [info.local_rank] if info.device.startswith("cuda") else None
    ddp = torch.nn.parallel.DistributedDataParallel if device_ids else _CpuDDP
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return ddp(net, device_ids=device_ids, forward_sync_buffers=False)
    return ddp(net, device_ids=device_ids, broadcast_buffers=False)


def running_stat_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point running statistics of every norm (what evaluation reads)."""
    return {name: buf for name, buf in model.named_buffers() if name.rpartition(".")[2].startswith("running_")}


def rank_averaged_running_stats(model: torch.nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """Copies of the running statistics averaged over ranks (a collective: every rank must call it)."""
    averaged = {}
    for name, buf in running_stat_buffers(model).items():
        averaged[name] = all_reduce_sum(buf.detach().clone(), info).div_(info.world_size)
    return averaged


class RankAveragedRunningStats:
    """Context: running statistics replaced by their mean over ranks, restored on exit (SPEC §1)."""

    def __init__(self, model: torch.nn.Module, info: DistInfo):
        self.model, self.info, self.saved = model, info, {}

    def __enter__(self):
        if self.info.enabled:
            buffers = running_stat_buffers(self.model)
            for name, value in rank_averaged_running_stats(self.model, self.info).items():
                self.saved[name] = buffers[name].clone()
                buffers[name].copy_(value)
        return self

    def __exit__(self, *exc):
        buffers = running_stat_buffers(self.model)
        for name, value in self.saved.items():
            buffers[name].copy_(value)
        return False


@contextlib.contextmanager
def closing_process_group(keep_open: bool = False):
    """Destroy the process group (if any) when the block exits. On a normal exit every rank first
    waits for the others, so no rank closes its gloo connections while another still uses them; not
    after an error or sys.exit, where the other ranks may never arrive.

    `keep_open`: more jobs follow in these processes (a Hydra multirun under torchrun), and a second group
    cannot be made from torchrun's store (the second job's gloo connections were refused): the next job
    joins this one, which closes when the process exits."""
    try:
        yield
    except BaseException:
        _destroy_process_group(synchronize=False)
        raise
    if keep_open and dist.is_initialized():
        dist.barrier()
        atexit.register(_destroy_process_group, synchronize=False)  # per job; after the first, a no-op
    else:
        _destroy_process_group(synchronize=True)


def _destroy_process_group(synchronize: bool) -> None:
    if dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
