"""The SLURM path on one machine: a Hydra multirun of two runs through submitit's local executor; one
run gets submitit's preemption signal mid-run, checkpoints, is requeued by submitit, resumes, and
ends with the same weights as the same run left alone."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from .conftest import train_command

EPOCHS = 6
NORMS = ("bn", "mabn")


def _settings(root, out):
    return [f"data.root={root}", "data.generate=null", f"output_root={out}", "data.crop_size=24", "data.val_resize=28",
            "data.batch_per_gpu=4", "data.workers=0", "model.width=8", "norm.norm_batch=2", f"schedule.epochs={EPOCHS}",
            "train.progress=false", "train.deterministic=true", "train.checkpoint_minutes=0"]


def _run_name(norm):
    return f"shapes10-resnet18_cpu-{norm}-b2-n4-s0"


def _epochs_done(run_dir):
    path = run_dir / "metrics.jsonl"
    return sum('"epoch"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def _final_weights(run_dir):
    newest = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
    return torch.load(newest, weights_only=True)["model"]


@pytest.mark.slow
def test_local_submitit_multirun_requeues_a_preempted_run_to_the_same_weights(tiny_shapes, tmp_path):
    for norm in NORMS:  # the reference: each run in one piece
        out = subprocess.run([sys.executable, "-m", "mabn.train", *_settings(tiny_shapes, tmp_path / "ref"), f"norm={norm}"],
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
    sweep = subprocess.Popen([sys.executable, "-m", "mabn.train", "-m", "hydra/launcher=local", "hydra.launcher.timeout_min=60",
                              *_settings(tiny_shapes, tmp_path / "sweep"), f"norm={','.join(NORMS)}"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    preempted = tmp_path / "sweep" / "train" / _run_name("mabn")
    deadline = time.monotonic() + 900
    while _epochs_done(preempted) < 2 and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _epochs_done(preempted) < EPOCHS, "the run ended before it could be signalled"
    pid = int(re.search(r"\| pid (\d+)", (preempted / "train.log").read_text()).group(1))
    os.kill(pid, signal.SIGUSR2)  # what SLURM sends through submitit before a time limit or on preemption
    output, _ = sweep.communicate(timeout=1800)
    assert sweep.returncode == 0, output[-3000:]

    for norm in NORMS:
        run_dir = tmp_path / "sweep" / "train" / _run_name(norm)
        log = (run_dir / "train.log").read_text()
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["event"] == "finished", log[-2000:]
        assert [r["epoch"] for r in records if "epoch" in r] == list(range(1, EPOCHS + 1))
        cut = "stop signal 12" in log and "resumed from" in log
        assert cut == (norm == "mabn"), log[-2000:]  # only the signalled run was requeued
        reference = _final_weights(tmp_path / "ref" / "train" / _run_name(norm))
        for key, value in _final_weights(run_dir).items():
            assert torch.equal(value, reference[key]), f"{norm}: {key} differs from the uninterrupted run"


def test_a_slurm_sweep_is_checked_for_slurm_and_for_its_jobs_process_count(tiny_shapes, tmp_path):
    """Off a SLURM cluster, submitit's 'Could not detect srun' traceback ended the sweep at its first launch; on one,
    the sweep's check counted one process a run."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))  # no srun on it, whatever this machine has
    command = train_command(tiny_shapes, tmp_path / "out", "norm=bn,mabn", "hydra/launcher=slurm")
    command.insert(3, "-m")  # python -m mabn.train -m ...
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.startswith("error: hydra/launcher=slurm but srun and sbatch are not on PATH here (no SLURM); "
                                 "valid: "), out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()
    # SLURM's tools, stand-ins: sbatch records that it was asked and refuses, so the sweep ends there
    (tmp_path / "bin").mkdir()
    for tool, script in (("srun", "exit 1"), ("sbatch", f"echo \"$@\" >> {tmp_path / 'submitted'}; exit 1")):
        (tmp_path / "bin" / tool).write_text(f"#!/bin/sh\n{script}\n")
        (tmp_path / "bin" / tool).chmod(0o755)
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    # more tasks than GPUs on a node: each extra rank failed when the job started, after its wait in the queue
    out = subprocess.run([*command, "hydra.launcher.tasks_per_node=8", "hydra.launcher.gpus_per_node=4"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2 and out.stderr == ("error: hydra.launcher.tasks_per_node=8 but gpus_per_node=4: each task "
                                                  "trains on one GPU of its node; valid: tasks_per_node <= gpus_per_node "
                                                  "(equal uses every GPU)\n"), out.stderr[-3000:]
    assert not (tmp_path / "out").exists()
    # the paper's 8 x 32 (train.total_batch=256) was refused at the sweep's start, counted as 1 process a run
    paper = [*command, "train.total_batch=16", "data.batch_per_gpu=2", "hydra.launcher.tasks_per_node=8"]
    out = subprocess.run(paper, capture_output=True, text=True, timeout=300, env=env)
    assert "error: " not in out.stderr and (tmp_path / "submitted").is_file(), out.stderr[-3000:]
    out = subprocess.run([*paper, "hydra.launcher.nodes=2"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2 and "train.total_batch=16 but data.batch_per_gpu=2 x 16 processes" in out.stderr


def test_a_local_job_of_two_tasks_is_one_ddp_run(tiny_shapes, tmp_path):
    """hydra/launcher=local with tasks_per_node=2 ran two one-process trainings of the same run dir, until the run
    lock refused the second and failed the sweep; its tasks now join one process group, as SLURM's do."""
    command = [sys.executable, "-m", "mabn.train", "-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2",
               *(s for s in _settings(tiny_shapes, tmp_path) if not s.startswith("schedule.epochs=")),
               "schedule.epochs=1", "norm=mabn"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = tmp_path / "train" / _run_name("mabn")
    assert "| cpu x2 | SGD batch 8," in (run_dir / "train.log").read_text()
    newest = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
    assert torch.load(newest, weights_only=True)["world_size"] == 2
    # both ranks log into the run's one train.log: what every rank does (resume, find the run done) is said once
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert log.count("resumed from") == 1 and log.count("run already finished") == 1, log
