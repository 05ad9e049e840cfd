"""One training epoch and one evaluation pass, each readable top to bottom."""
import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import DatasetError
from .distributed import (
    DistInfo,
    RankAveragedRunningStats,
    all_reduce_sum,
)
from .progress import progress_bar
from .stop import StopSignal

log = logging.getLogger(__name__)
FIRST_STEP = "first training step done"  # the log line that times start-up (scripts/bench/bench_scale.py waits for it)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


@dataclass
class Progress:
    """Where a run stands; everything a checkpoint needs to continue the same run."""

    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # micro-batches of this epoch already trained on
    step: int = 0  # optimizer steps taken in the whole run
    best_top1_err: float = math.inf
    skipped_nonfinite: int = 0
    last_checkpoint: str | None = None
    # This epoch's summed loss and loss count (over ranks) before `batch`: a resumed epoch's mean covers all of it.
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0

    def next_epoch(self) -> None:
        self.epoch, self.batch, self.epoch_loss_sum, self.epoch_loss_count = self.epoch + 1, 0, 0.0, 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


class LatestLoss:
    """The newest loss value on the host without a device sync: each loss is copied non-blocking into pinned
    memory once the previous copy has landed, and read from there (for the progress bar and TensorBoard,
    which can show a value a step or two old on a GPU). On CPU the value is read directly: no sync exists."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.host = torch.zeros((), pin_memory=self.cuda)
        self.event, self.value = None, math.nan

    def push(self, loss: torch.Tensor) -> None:
        if not self.cuda:
            self.value = loss.item()
            return
        if self.event is not None and not self.event.query():
            return  # the previous copy is still in flight: skip this one rather than wait
        self.read()
        self.host.copy_(loss.detach(), non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def read(self) -> float:
        if self.cuda and self.event is not None and self.event.query():
            self.value = self.host.item()  # a pinned host tensor: no device sync
        return self.value


def process_age() -> float:
    """Seconds since this process started (Linux: /proc), imports included; NaN where /proc is missing."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def agree(finite: torch.Tensor, stop: bool, due: bool, info: DistInfo) -> tuple[int, bool, bool]:
    """(ranks whose loss is finite, stop, checkpoint due) agreed by every rank, in one collective and one host sync.

    A non-finite loss must be known before backward (MABN's backward would write NaN into its Psi ring), so each
    micro-batch pays this one sync; the stop/checkpoint flags ride along instead of costing a second one."""
    if not info.enabled:
        return int(bool(finite)), stop, due
    values = all_reduce_sum(torch.stack([finite.float(), finite.new_tensor(float(stop)), finite.new_tensor(float(due))]), info)
    n_finite, n_stop, n_due = values.tolist()
    return int(n_finite), n_stop > 0, n_due > 0


def autocast(device: str, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    device_type = device.split(":")[0]
    return torch.autocast(device_type, dtype=torch.float16 if device_type == "cuda" else torch.bfloat16)


def train_one_epoch(job, progress: Progress, stop: StopSignal) -> dict:
    """Train from `progress.batch` to the end of `progress.epoch`; checkpoint on schedule and on a stop signal.

    Returns the epoch's mean loss, throughput and counters; `stopped=True` if a signal cut it short.

    Device-to-host syncs per micro-batch: one (`agree`: the loss must be known finite before backward;
    the stop/checkpoint flags share its collective). Per optimizer step with float16 AMP: GradScaler's
    inf check (it decides whether to step). Occasionally: batch-statistics recording (loss scale), a
    checkpoint. The progress bar and TensorBoard read the loss through `LatestLoss` (no sync); MABN
    reads its counters on the host (`read_counter`); the epoch's mean loss syncs once at the end.
    """
    cfg, info, model = job.cfg, job.info, job.model
    accum = cfg.train.grad_accum
    # The epoch ends with its last whole accumulation window (the schedule counts steps_per_epoch): a
    # trailing partial window would leave its gradients to be added into the next epoch's first step.
    epoch_batches = job.steps_per_epoch * accum
    model.train()
    job.loaders.set_epoch(progress.epoch, progress.batch)
    bar = progress_bar(
        total=epoch_batches, initial=progress.batch, disable=not (info.is_main and cfg.train.progress),
        desc=f"epoch {progress.epoch + 1}/{cfg.schedule.epochs}", unit="batch",
    )
    # float64: an epoch's sum of float32 losses is then exact, so a resumed epoch's mean is the uninterrupted one's.
    loss_sum, loss_count, images, skipped_images, data_time = torch.zeros((), device=info.device, dtype=torch.float64), 0, 0, 0, 0.0
    resumed_sum, resumed_count = progress.epoch_loss_sum, progress.epoch_loss_count

    def epoch_loss() -> tuple[float, int]:  # this epoch's loss sum and count over ranks (a collective, one sync)
        return resumed_sum + all_reduce_sum(loss_sum.clone(), info).item(), resumed_count + loss_count * info.world_size

    window_bad, started = False, time.perf_counter()
    last_ckpt_time, tick = time.monotonic(), time.perf_counter()
    latest = LatestLoss(info.device)
    for images_cpu, labels, skipped in job.loaders.train:
        if progress.batch >= epoch_batches:  # resumed at the epoch's end (the check at the bottom ends a running epoch)
            break
        data_time += time.perf_counter() - tick
        skipped_images += skipped
        if labels.numel() == 0:
            progress.batch += 1
            continue
        x = images_cpu.to(info.device, non_blocking=True)
        y = labels.to(info.device, non_blocking=True)
        if cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        micro = progress.batch % accum
        last_micro = micro == accum - 1
        recording = job.batch_stats is not None and micro == 0 and progress.step % cfg.stats.every == 0
        if recording:  # per-sample loss gradients: undo the mean over the batch, accumulation and loss scaling
            job.batch_stats.arm(x.shape[0] * accum / job.scaler.get_scale() if job.scaler.is_enabled()
                                else x.shape[0] * accum)
        # A recorded micro-batch runs eagerly (the recorder's hooks read values on the host); the
        # compiled model (train.compile) shares its parameters, buffers and MABN host counters.
        net = job.model_eager if recording else model
        sync_ctx = job.model_eager.no_sync() if (info.enabled and not last_micro) else contextlib.nullcontext()
        with sync_ctx:
            with autocast(info.device, cfg.train.amp):
                loss = F.cross_entropy(net(x), y, label_smoothing=cfg.train.label_smoothing)
            # Ranks agree on stopping and checkpointing (a signal or a clock may reach them at different steps).
            due = last_micro and bool(cfg.train.checkpoint_minutes) and \
                time.monotonic() - last_ckpt_time > 60 * cfg.train.checkpoint_minutes
            n_finite, stopping, due = agree(torch.isfinite(loss.detach()), last_micro and stop.received is not None, due, info)
            if n_finite != info.world_size:
                window_bad = _handle_nonfinite(job, progress, loss)
            else:
                job.scaler.scale(loss / accum).backward()
                loss_sum += loss.detach().double()
                loss_count += 1
                latest.push(loss)
        if recording:
            job.batch_stats.flush(progress.step)
        images += x.shape[0]
        progress.batch += 1
        if last_micro:
            job.set_lr(progress.step)
            if window_bad:
                job.optimizer.zero_grad(set_to_none=True)
            else:
                job.scaler.step(job.optimizer)
                job.scaler.update()
                job.optimizer.zero_grad(set_to_none=True)
            window_bad = False
            progress.step += 1
            if info.is_main and not job.first_step_done:
                # Start-up (file index, loader workers, model) is what grows with the dataset: say what it cost.
                log.info("%s %.1f s after the process started", FIRST_STEP, process_age())
            job.first_step_done = True
            if info.is_main and progress.step % cfg.train.log_every == 0:
                job.log_train_scalars(progress.step, latest.read(), images, time.perf_counter() - started)
            every = cfg.train.checkpoint_every_steps
            if stopping or due or (every and progress.step % every == 0):
                progress.epoch_loss_sum, progress.epoch_loss_count = epoch_loss()
                job.save_checkpoint(progress)
                last_ckpt_time = time.monotonic()
                if stopping:
                    bar.close()
                    return dict(stopped=True)
        bar.update(1)
        if not bar.disable and progress.batch % 10 == 0:
            # shown at the bar's next redraw: refreshing here would redraw every 10 batches whatever the interval
            bar.set_postfix(loss=f"{latest.read():.3f}", lr=f"{job.optimizer.param_groups[0]['lr']:.4f}", refresh=False)
        if progress.batch >= epoch_batches:
            break
        tick = time.perf_counter()
    bar.close()
    if info.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    limit = cfg.data.max_unreadable
    if limit is not None and skipped_images > limit:
        raise DatasetError(
            f"{skipped_images} unreadable images this epoch exceed data.max_unreadable={limit}; "
            f"list them with scripts/verify_dataset.py {cfg.data.root}"
        )
    if skipped_images:
        log.warning("epoch %d: skipped %d unreadable images", progress.epoch + 1, skipped_images)
    total, count = epoch_loss()
    mean_loss = total / max(1, count)
    return dict(
        stopped=False, train_loss=mean_loss, images_per_sec=images * info.world_size / max(elapsed, 1e-9),
        data_time_frac=data_time / max(elapsed, 1e-9), skipped_images=skipped_images,
    )


def _handle_nonfinite(job, progress: Progress, loss: torch.Tensor) -> bool:
    """Stop with a message, or count the batch as skipped (train.nan_policy=skip) up to a limit."""
    cfg = job.cfg.train
    where = f"step {progress.step} (epoch {progress.epoch + 1}, batch {progress.batch + 1})"
    last = progress.last_checkpoint or "none yet"
    if cfg.nan_policy == "skip" and progress.skipped_nonfinite < cfg.max_nonfinite_skips:
        progress.skipped_nonfinite += 1
        log.warning("non-finite loss %s at %s: batch skipped (%d of at most %d)",
                    loss.item(), where, progress.skipped_nonfinite, cfg.max_nonfinite_skips)
        return True
    raise NonFiniteLoss(
        f"loss is {loss.item()} at {where}; last good checkpoint: {last} "
        f"(train.nan_policy=skip skips up to train.max_nonfinite_skips={cfg.max_nonfinite_skips} such batches)"
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, info: DistInfo, amp: bool = False, channels_last: bool = False) -> dict:
    """Top-1/top-5 error over the whole val set: every rank scores its shard, the counts are summed."""
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=info.device)
    with RankAveragedRunningStats(model, info):
        for images, labels, _ in loader:
            if labels.numel() == 0:
                continue
            x = images.to(info.device, non_blocking=True)
            y = labels.to(info.device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(info.device, amp):
                logits = model(x)
            counts += score(logits, y)
    all_reduce_sum(counts, info)
    return error_rates(counts)


def score(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 (correct@1, correct@5, images, loss sum) of one batch, on the logits' device (no host sync)."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top5 == labels[:, None]
    return torch.stack([
        hits[:, 0].sum().double(), hits.any(1).sum().double(),
        torch.tensor(float(len(labels)), device=logits.device, dtype=torch.float64),
        F.cross_entropy(logits.float(), labels, reduction="sum").double(),
    ])


def error_rates(counts: torch.Tensor) -> dict:
    """The val_* record of summed `score` counts."""
    correct1, correct5, seen, loss_sum = counts.tolist()
    return dict(
        val_top1_err=100.0 * (1 - correct1 / max(seen, 1)), val_top5_err=100.0 * (1 - correct5 / max(seen, 1)),
        val_loss=loss_sum / max(seen, 1), val_images=int(seen),
    )
