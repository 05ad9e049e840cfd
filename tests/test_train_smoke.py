"""End to end: a tiny training run writes events, metrics and checkpoints; bad input fails early in one line."""
import json
import re
import subprocess

import pytest
import torch

from .conftest import ROOT, train_command


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize("norm", ["bn", "mabn"])
def test_tiny_run_writes_events_metrics_and_checkpoints(tiny_shapes, tmp_path, norm):
    out = _run(train_command(tiny_shapes, tmp_path, f"norm={norm}", "data.batch_per_gpu=4", "norm.norm_batch=2",
                             "schedule.epochs=2", "train.log_every=1", "train.progress=true"))
    assert out.returncode == 0, out.stderr[-3000:]
    # stderr is a pipe here, as a log file is under SLURM: the bar is drawn at its start and end (redraws once a
    # minute), not every 0.1 s nor at every loss shown; its last draw shows the loss
    for epoch in (1, 2):
        draws = [d for d in out.stderr.replace("\r", "\n").splitlines() if d.startswith(f"epoch {epoch}/2:")]
        assert len(draws) == 2 and "20/20" in draws[-1] and "loss=" in draws[-1], draws
    started = re.findall(r"first training step done ([0-9.]+) s after the process started", out.stdout)
    assert len(started) == 1 and 0 < float(started[0]) < 300, out.stdout[-2000:]
    run_dir = tmp_path / "train" / f"shapes10-resnet18_cpu-{norm}-b2-n4-s0"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert records[-1]["event"] == "finished"
    assert all(r["val_images"] == 30 for r in epochs)  # the whole val set, once
    assert all(0 <= r["val_top1_err"] <= 100 for r in epochs)
    head = _run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT).stdout.strip() or "unknown"
    assert all(r["source"].removesuffix("+dirty") == head for r in epochs)  # the commit that produced the numbers
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    ckpts = sorted((run_dir / "checkpoints").glob("step-*.pt"))
    assert ckpts and (run_dir / "checkpoints" / "best.pt").is_file()
    state = torch.load(ckpts[-1], weights_only=True)
    assert state["progress"]["epoch"] == 2 and state["progress"]["step"] == epochs[-1]["step"]
    if norm == "mabn":
        assert any(k.endswith("psi_ring") for k in state["model"])

    # running again resumes the finished run: nothing left to train
    again = _run(train_command(tiny_shapes, tmp_path, f"norm={norm}", "data.batch_per_gpu=4", "norm.norm_batch=2",
                               "schedule.epochs=2"))
    assert again.returncode == 0 and "resumed from" in again.stdout and "run already finished" in again.stdout
    assert (run_dir / "metrics.jsonl").read_text().count('"finished"') == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.batch_per_gpu=0"], "data.batch_per_gpu=0 must be a positive integer"),
        (["data.batch_per_gpu=8", "norm.norm_batch=3"], "norm.norm_batch=3 does not divide data.batch_per_gpu=8; valid: [1, 2, 4, 8]"),
        (["norm=gn", "norm.norm_batch=2"], "norm 'gn' has no normalization batch"),
        (["data.root=/nonexistent/imagenet"], "data.root='/nonexistent/imagenet' does not exist"),
        (["train.grad_accum=0"], "train.grad_accum=0 must be a positive integer"),
        (["train.resume=/nonexistent.pt"], "train.resume='/nonexistent.pt' is not a checkpoint file"),
        (["train.total_batch=64"], "train.total_batch=64 but data.batch_per_gpu=8 x 1 processes"),
    ],
)
def test_bad_config_fails_before_any_work_with_one_line(tiny_shapes, tmp_path, overrides, message):
    out = _run(train_command(tiny_shapes, tmp_path, *overrides))
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]
    assert not list(tmp_path.rglob("*.pt"))


def test_data_root_without_val_split(tmp_path):
    (tmp_path / "data" / "train" / "n01").mkdir(parents=True)
    out = _run(train_command(tmp_path / "data", tmp_path / "out"))
    assert out.returncode == 2 and "has no val/ folder" in out.stderr


def test_accumulation_epoch_ends_with_its_last_whole_window(tiny_shapes, tmp_path):
    """80 images in batches of 4 are 20 micro-batches, 6 whole windows of 3: each epoch trains 18 and stops.
    Training the 2 left over would add their gradients into the next epoch's first step (and feed the norms
    forwards the schedule does not count)."""
    out = _run(train_command(tiny_shapes, tmp_path, "norm=bn", "data.batch_per_gpu=4", "train.grad_accum=3",
                             "schedule.epochs=2"))
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = tmp_path / "train" / "shapes10-resnet18_cpu-bn-b4-n4-s0"
    state = torch.load(sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1], weights_only=True)
    assert state["progress"]["step"] == 12
    tracked = {v.item() for k, v in state["model"].items() if k.endswith("num_batches_tracked")}
    assert tracked == {2 * 6 * 3}, tracked  # training forwards: 2 epochs x 6 windows x 3 micro-batches
