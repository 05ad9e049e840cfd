"""Training entry point: `python -m mabn.train [overrides]` (Hydra), or through `make train` / torchrun.

Reads the composed config, checks it, builds data, model and optimizer, resumes from the run
dir's last good checkpoint, then trains and evaluates epoch by epoch, logging to TensorBoard,
`metrics.jsonl` and checkpoints in the run dir.
"""
import contextlib
import json
import logging
import math
import os
import pathlib
import random
import subprocess
import sys
import time

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from . import checkpoint as ckpt
from . import run_lock
from .batch_stats import BatchStatsRecorder, lag_layers, select_layers
from .compile import compile_model
from .config import CONFIG_DIR, ConfigError, check_overrides, model_kwargs, sgd_batch, validate
from .data import DatasetError, build_loaders
from .distributed import (
    DistInfo,
    closing_process_group,
    init_distributed,
    rank_averaged_running_stats,
    wrap_ddp,
)
from .engine import NonFiniteLoss, Progress, evaluate, train_one_epoch
from .host_memory import keep_freed_blocks
from .models import build_model
from .optim import LRSchedule, build_optimizer, scaled_lr, set_lr
from .resume import check_same_run, find_checkpoint
from .stop import StopSignal

log = logging.getLogger("mabn.train")
PROJECT_ROOT = pathlib.Path(CONFIG_DIR).parent


def source_version() -> str:
    """The commit this run's code comes from, "+dirty" when src/ or configs/ differ from it, "unknown"
    outside a git checkout. Recorded with every epoch: a resumed run may span several commits."""
    def git(*args) -> str:
        out = subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()

    try:
        sha = git("rev-parse", "--short=10", "HEAD")
        changes = git("status", "--porcelain", "--", "src", "configs")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if changes else "")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


class Job:
    """Everything one training run holds, and its logging/checkpoint side effects (rank 0 only)."""

    def __init__(self, cfg: DictConfig, info: DistInfo, run_dir: pathlib.Path):
        self.cfg, self.info, self.run_dir = cfg, info, run_dir
        self.loaders = build_loaders(cfg.data, info.rank, info.world_size, cfg.seed, info.device)
        self.steps_per_epoch = self.loaders.train_batches // cfg.train.grad_accum
        if cfg.train.max_batches_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.max_batches_per_epoch // cfg.train.grad_accum)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"train.grad_accum={cfg.train.grad_accum} exceeds the {self.loaders.train_batches} batches per epoch"
            )
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model_kwargs = model_kwargs(cfg, len(self.loaders.classes), self.steps_per_epoch)
        net = build_model(**self.model_kwargs).to(info.device)
        if cfg.train.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.model = net
        if info.enabled:
            self.model = wrap_ddp(net, info)  # per-process norm statistics, as in the paper
        self.model_eager = self.model  # batch-statistics recording runs it: its hooks need eager layers
        if cfg.train.compile:
            self.model = compile_model(self.model, mode=cfg.train.compile_mode)
        self.sgd_batch = sgd_batch(cfg, info.world_size)
        self.peak_lr = scaled_lr(cfg.schedule.base_lr, self.sgd_batch)
        self.optimizer = build_optimizer(net, cfg.optim, self.peak_lr)
        self.schedule = LRSchedule(self.peak_lr, self.steps_per_epoch, cfg.schedule)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp and info.device.startswith("cuda"))
        self.checkpoints = ckpt.CheckpointDir(run_dir, cfg.train.checkpoint_keep)
        self.writer = None  # opened by open_logs, once the run knows the step it resumes from
        self.metrics_path = run_dir / "metrics.jsonl"
        self.source = source_version()
        self.batch_stats = None
        self.first_step_done = False  # this process's first optimizer step is logged with its start-up time
        if cfg.stats.enabled and info.is_main:
            layers = select_layers(net, list(cfg.stats.layers) if cfg.stats.layers else None)
            # no writer yet: open_logs hands it the TensorBoard writer with the file it rewinds
            self.batch_stats = BatchStatsRecorder(layers, cfg.stats.channel, None, run_dir / "batch_stats.jsonl", net=net,
                                                  lag_layers=lag_layers(net) if cfg.stats.all_layers else None)

    # -- logging --------------------------------------------------------------------------------
    def open_logs(self, progress: Progress) -> None:
        """Open the logs where `progress` (fresh or resumed) stands: what a killed process logged after its
        last checkpoint is redone by this one, so it is dropped from metrics.jsonl (epochs not in the
        checkpoint) and batch_stats.jsonl (iterations from `progress.step` on) and purged from TensorBoard
        (its own mechanism: events of later steps than the checkpoint's are hidden)."""
        if not self.info.is_main:
            return
        ckpt.rewind_records(self.metrics_path, lambda r: r.get("epoch", math.inf) <= progress.epoch)
        if self.batch_stats is not None:
            ckpt.rewind_records(self.batch_stats.path, lambda r: r["step"] < progress.step)
        # train/* and val/* are logged at the step count after an iteration, so the checkpoint's own step stays
        # (a fresh start purges too: an attempt killed before its first checkpoint logged steps it will log again).
        self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=progress.step + 1)
        self._write_hparams()
        if self.batch_stats is not None:
            self.batch_stats.writer = self.writer

    def hparams(self) -> dict:
        """What distinguishes this run in a comparison (TensorBoard HParams, result tables)."""
        cfg = self.cfg
        return dict(norm=cfg.norm.name, norm_batch=cfg.norm.norm_batch, batch_per_gpu=cfg.data.batch_per_gpu,
                    world_size=self.info.world_size, sgd_batch=self.sgd_batch, lr=self.peak_lr, model=cfg.model.name,
                    data=cfg.data.name, seed=cfg.seed, tag=cfg.tag, epochs=cfg.schedule.epochs)

    def _write_hparams(self) -> None:
        # The HParams plugin joins these with the val/* scalars written to the same run.
        exp, ssi, sei = hparams(self.hparams(), {"val/top1_err": float("nan"), "val/top5_err": float("nan")})
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)

    def set_lr(self, step: int) -> None:
        set_lr(self.optimizer, self.schedule(step))

    def log_train_scalars(self, step: int, loss: float, images: int, seconds: float) -> None:
        """`loss`: the newest loss on the host (engine.LatestLoss: on a GPU possibly a step or two old, never a sync)."""
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], step)
        self.writer.add_scalar("train/images_per_sec", images * self.info.world_size / max(seconds, 1e-9), step)

    def log_epoch(self, record: dict) -> None:
        if not self.info.is_main:
            return
        for key in ("train_loss", "images_per_sec", "val_top1_err", "val_top5_err", "val_loss"):
            if key in record:
                group = "val" if key.startswith("val") else "train"
                self.writer.add_scalar(f"{group}/{key.removeprefix('val_')}", record[key], record["step"])
        self.writer.flush()
        self.append_metrics(record)

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, progress: Progress, is_best: bool = False) -> None:
        """Rank 0's training state plus the rank-averaged running statistics used for evaluation (SPEC §1).

        Every rank must call it (the averaging is a collective)."""
        eval_running_stats = rank_averaged_running_stats(self.net, self.info)
        if self.info.is_main:
            state = dict(
                model=self.net.state_dict(),
                optimizer=self.optimizer.state_dict(),
                scaler=self.scaler.state_dict(),
                progress=progress.state_dict(),
                rng=ckpt.rng_state(),
                config=OmegaConf.to_yaml(self.cfg, resolve=True),
                eval_running_stats=eval_running_stats,
                classes=list(self.loaders.classes),  # label order, which mabn.evaluation maps other folders onto
                world_size=self.info.world_size,
                model_kwargs=self.model_kwargs,  # the resolved schedules (warmup, BRN t0...), for export
            )
            path = self.checkpoints.save(state, progress.step, is_best=is_best)
            progress.last_checkpoint = str(path)

    def resume(self, progress: Progress) -> None:
        """Continue from train.resume: 'auto' (this run dir's newest good checkpoint), a path, or 'never'."""
        state, path = find_checkpoint(self.cfg, self.run_dir)
        if state is None:
            return
        check_same_run(state, self.cfg, path, self.info.world_size)
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        progress.load_state_dict(state["progress"])
        progress.last_checkpoint = str(path)
        ckpt.restore_rng_state(state["rng"])
        if self.info.is_main:  # every rank resumes; one says so (each wrote it into the run's one train.log)
            log.info("resumed from %s at epoch %d, batch %d, step %d", path, progress.epoch + 1, progress.batch,
                     progress.step)


def run(cfg: DictConfig) -> dict:
    """Train and evaluate; returns the final record (what metrics.jsonl ends with)."""
    info = init_distributed(cfg.train.device)
    validate(cfg, info.world_size)
    run_dir = pathlib.Path(HydraConfig.get().runtime.output_dir)
    # One trainer per run dir: rank 0 holds it for the whole job (the preflight checked it was free).
    with run_lock.hold(run_dir) if info.is_main else contextlib.nullcontext():
        return train_in(cfg, info, run_dir)


def train_in(cfg: DictConfig, info: DistInfo, run_dir: pathlib.Path) -> dict:
    """`run` once the run dir is this job's: resume, train the remaining epochs, evaluate each."""
    seed_everything(cfg.seed + info.rank, cfg.train.deterministic)
    if info.device == "cpu":
        keep_freed_blocks()
    job = Job(cfg, info, run_dir)
    progress = Progress()
    job.resume(progress)
    if info.is_main:
        log.info("run dir %s | %s x%d | SGD batch %d, peak lr %.4g | %d steps/epoch | source %s | pid %d", run_dir,
                 info.device, info.world_size, job.sgd_batch, job.peak_lr, job.steps_per_epoch, job.source, os.getpid())
    if progress.epoch >= cfg.schedule.epochs:
        if info.is_main:
            log.info("run already finished (%d epochs) in %s; nothing to do", progress.epoch, run_dir)
        return dict(event="finished", step=progress.step, best_val_top1_err=progress.best_top1_err)
    pause = cfg.train.stop_after_epochs
    if pause and progress.epoch >= pause:
        if info.is_main:
            log.info("run stopped after epoch %d of %d (train.stop_after_epochs=%d) in %s; nothing to do: "
                     "a larger value or null trains on", progress.epoch, cfg.schedule.epochs, pause, run_dir)
        return dict(event="paused", step=progress.step, best_val_top1_err=progress.best_top1_err)
    job.open_logs(progress)
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ  # its agent passes each Ctrl-C on: a second SIGINT
    announce = "Ctrl-C: finishing this step, then a checkpoint and a clean exit" if info.is_main else None
    stop = StopSignal(announce=announce, second_interrupt_aborts=not under_torchrun).install()
    try:
        while progress.epoch < cfg.schedule.epochs:
            started = time.time()
            train_stats = train_one_epoch(job, progress, stop)
            if train_stats["stopped"]:
                if info.is_main:  # the ranks stop together, at the step agreed on, whichever got the signal
                    received = "another rank's" if stop.received is None else stop.received
                    log.warning("stop signal %s: checkpoint %s written; run the same command to resume", received,
                                progress.last_checkpoint)
                return dict(event="preempted", step=progress.step)
            val_stats = evaluate(job.net, job.loaders.val, info,
                                 cfg.train.amp, cfg.train.channels_last)
            if info.is_main and val_stats["val_images"] != job.loaders.val_size:
                log.warning("evaluated %d images, the val set has %d", val_stats["val_images"], job.loaders.val_size)
            is_best = val_stats["val_top1_err"] < progress.best_top1_err
            progress.best_top1_err = min(progress.best_top1_err, val_stats["val_top1_err"])
            record = dict(epoch=progress.epoch + 1, epochs=cfg.schedule.epochs, step=progress.step,
                          lr=job.optimizer.param_groups[0]["lr"],
                          **{k: v for k, v in train_stats.items() if k != "stopped"}, **val_stats,
                          epoch_seconds=time.time() - started, source=job.source)
            progress.next_epoch()
            job.log_epoch(record)
            job.save_checkpoint(progress, is_best=is_best)
            if info.is_main:
                log.info("epoch %d/%d: loss %.4f, val top-1 err %.2f%%, top-5 err %.2f%%, %.0f img/s",
                         record["epoch"], cfg.schedule.epochs, record["train_loss"], record["val_top1_err"],
                         record["val_top5_err"], record["images_per_sec"])
            if pause and progress.epoch >= pause and progress.epoch < cfg.schedule.epochs:
                if info.is_main:
                    log.info("stopped after epoch %d of %d (train.stop_after_epochs=%d); the same command with "
                             "a larger value or null trains on", progress.epoch, cfg.schedule.epochs, pause)
                return dict(event="paused", step=progress.step, best_val_top1_err=progress.best_top1_err)
        final = dict(event="finished", step=progress.step, best_val_top1_err=progress.best_top1_err, **job.hparams())
        if info.is_main:
            job.append_metrics(final)
        return final
    finally:
        stop.uninstall()
        if job.writer is not None:
            job.writer.close()
        stop.forward_to_previous_handler()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    with closing_process_group(keep_open=HydraConfig.get().mode == RunMode.MULTIRUN):
        try:
            result = run(cfg)
        except (ConfigError, DatasetError, NonFiniteLoss) as err:
            log.error("%s", err)
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    if result.get("event") == "preempted":
        # Leave the process, not just this job: a signalled multirun must not start its next run.
        sys.exit(0)
    return result.get("best_val_top1_err")  # what a Hydra sweeper would minimize


if __name__ == "__main__":
    try:  # a mistyped group option or key (norm=batchnorm, schedule.epoch=2): one line, before Hydra composes
        check_overrides(sys.argv[1:], CONFIG_DIR)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    # Run the importable `mabn.train.main`, not this `__main__` copy: submitit (hydra/launcher=slurm,
    # local) pickles the task function, by reference only when it lives in an importable module.
    from mabn.train import main as importable_main

    importable_main()
