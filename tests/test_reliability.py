"""Exact resume after SIGKILL, checkpoint fallback, preemption, NaN guard, and every bad input's one line."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mabn import run_lock
from mabn.checkpoint import CheckpointDir
from mabn.run_lock import RunDirInUse
from mabn.stop import StopSignal, shield_loader_worker, stop_signals

from .conftest import at_a_terminal, train_command

NORM_SETTINGS = {
    "bn": [],
    "brn": [],  # its r/d schedule is a fraction of the run: clipping is active within these 40 steps
    "mabn": ["norm.options.window=4", "norm.options.warmup=4", "norm.options.renorm_start=12"],
}


def _cmd(root, out, norm, *extra):
    return train_command(root, out, f"norm={norm}", "data.batch_per_gpu=4", "norm.norm_batch=2", "schedule.epochs=2",
                         "train.checkpoint_every_steps=1", "train.deterministic=true", *NORM_SETTINGS[norm], *extra)


def _final_state(out):
    files = sorted(out.rglob("checkpoints/step-*.pt"))
    return torch.load(files[-1], weights_only=True)


def _assert_states_equal(a, b):
    assert a["progress"]["step"] == b["progress"]["step"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])


def _wait_for_checkpoint(out, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(out.rglob(f"checkpoints/step-{step:08d}.pt")):
            return
        assert proc.poll() is None, "training ended before the kill"
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint of step {step}")


@pytest.mark.parametrize("norm", list(NORM_SETTINGS))
def test_sigkill_at_random_step_then_resume_is_bitwise_identical(tiny_shapes, tmp_path, norm):
    # The uninterrupted run trains while the other is killed and resumed: one thread each, so that two
    # processes share two cores without oversubscribing them.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.Popen(_cmd(tiny_shapes, tmp_path / "straight", norm), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)
    kill_after = random.Random().randint(2, 30)  # 40 steps in all
    proc = subprocess.Popen(_cmd(tiny_shapes, tmp_path / "killed", norm), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    _wait_for_checkpoint(tmp_path / "killed", kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(_cmd(tiny_shapes, tmp_path / "killed", norm), capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-2000:]

    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "killed")
    assert a["progress"]["step"] == 40
    _assert_states_equal(a, b)
    if norm == "mabn":
        assert int(a["model"]["bn1.num_batches_tracked"]) == 40 and int(a["model"]["bn1.chi_seen"]) == 80


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    checkpoints = CheckpointDir(tmp_path, keep=3)
    for step in (1, 2, 3):
        checkpoints.save({"model": {"w": torch.full((3,), float(step))}, "config": ""}, step)
    newest = checkpoints.step_files()[0]
    newest.write_bytes(newest.read_bytes()[:100])
    state, path = checkpoints.load_latest()
    assert path.name == "step-00000002.pt" and state["model"]["w"][0] == 2
    assert "step-00000003.pt cannot be loaded (ValueError: not a checkpoint: torch.save writes a zip archive, and this " \
        "file is not one (or is cut short))" in caplog.text
    # A zip archive holding an object weights_only refuses: torch's reason, without its advice (weights_only=False)
    torch.save({"model": np.zeros(3), "config": ""}, newest)
    caplog.clear()
    assert checkpoints.load_latest()[1].name == "step-00000002.pt"
    assert "(UnpicklingError: not a weights-only checkpoint (Unsupported global: GLOBAL numpy" in caplog.text
    assert "weights_only` set to `False`" not in caplog.text


def test_keeps_only_the_last_k_and_leaves_no_temp_files(tmp_path):
    checkpoints = CheckpointDir(tmp_path, keep=2)
    for step in range(1, 6):
        checkpoints.save({"model": {"w": torch.tensor(step)}, "config": ""}, step, is_best=step in (1, 3))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.pt", "step-00000004.pt", "step-00000005.pt"]
    # best.pt is a link to step 3's file, not a second write, and outlives that file's rotation
    assert torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["model"]["w"] == 3


def test_ctrl_c_checkpoints_exits_cleanly_and_resumes(tiny_shapes, tmp_path):
    # Ctrl-C reaches the whole foreground process group, loader workers included: it used to end the trainer
    # mid-step in a KeyboardInterrupt traceback, with the progress since the last checkpoint lost.
    cmd = _cmd(tiny_shapes, tmp_path, "bn", "data.workers=2")
    proc = subprocess.Popen(at_a_terminal(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    _wait_for_checkpoint(tmp_path, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stop signal 2: checkpoint" in output, output[-3000:]
    assert "Ctrl-C: finishing this step" in output and "Traceback" not in output and "killed by signal" not in output
    metrics = (next(tmp_path.rglob("metrics.jsonl"))).read_text() if list(tmp_path.rglob("metrics.jsonl")) else ""
    assert '"finished"' not in metrics
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resumed from" in again.stdout
    assert '"finished"' in next(tmp_path.rglob("metrics.jsonl")).read_text()


def _metrics(out):
    return [json.loads(line) for line in next(out.rglob("metrics.jsonl")).read_text().splitlines()]


def test_stop_after_epochs_pauses_a_run_that_then_trains_on_as_if_never_stopped(tiny_shapes, tmp_path):
    # The schedule still spans schedule.epochs: the paused run's lr and its final state are the straight run's.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.Popen(_cmd(tiny_shapes, tmp_path / "straight", "bn"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)
    paused_cmd = _cmd(tiny_shapes, tmp_path / "paused", "bn")
    first = subprocess.run(paused_cmd + ["train.stop_after_epochs=1"], capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0 and "stopped after epoch 1 of 2" in first.stdout, first.stderr[-2000:]
    records = _metrics(tmp_path / "paused")
    assert [r.get("epoch") for r in records] == [1] and records[0]["epochs"] == 2
    again = subprocess.run(paused_cmd + ["train.stop_after_epochs=1"], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-2000:]
    on = subprocess.run(paused_cmd, capture_output=True, text=True, timeout=300, env=env)
    assert on.returncode == 0 and "resumed from" in on.stdout, on.stderr[-2000:]
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-2000:]

    _assert_states_equal(_final_state(tmp_path / "straight"), _final_state(tmp_path / "paused"))
    lines = [_metrics(tmp_path / d) for d in ("straight", "paused")]
    assert [r.get("lr") for r in lines[0]] == [r.get("lr") for r in lines[1]] and lines[1][-1]["event"] == "finished"


class _WorkerPids(torch.utils.data.Dataset):
    """Each sample is the pid of the process that loaded it."""

    def __len__(self):
        return 1000

    def __getitem__(self, index):
        time.sleep(0.01)
        return os.getpid()


def _worker_pid_and_loader(shield):
    loader = torch.utils.data.DataLoader(_WorkerPids(), batch_size=1, num_workers=1, persistent_workers=True,
                                         worker_init_fn=shield_loader_worker if shield else None)
    batches = iter(loader)
    return int(next(batches)), batches


def _send_from_outside(pid, sig):
    """Signal `pid` from another process (as SLURM or `timeout` would): torch's worker exits quietly only on
    its parent's SIGTERM."""
    subprocess.run(["kill", f"-{sig.name[3:]}", str(pid)], check=True)


def test_an_unshielded_loader_worker_dies_of_a_stop_signal():
    # What a whole-group signal did before the loaders shielded their workers (the next tests' control).
    pid, batches = _worker_pid_and_loader(shield=False)
    with pytest.raises(RuntimeError, match=f"worker \\(pid {pid}\\) is killed by signal: Terminated"):
        _send_from_outside(pid, signal.SIGTERM)
        time.sleep(1)
        next(batches)


@pytest.mark.parametrize("first", stop_signals(), ids=lambda sig: sig.name)
def test_a_shielded_loader_worker_outlives_the_first_stop_signal_and_dies_of_the_next(first):
    pid, batches = _worker_pid_and_loader(shield=True)
    _send_from_outside(pid, first)
    time.sleep(0.5)
    assert [int(next(batches)) for _ in range(3)] == [pid] * 3
    with pytest.raises(RuntimeError, match=f"worker \\(pid {pid}\\) is killed by signal: Terminated"):
        _send_from_outside(pid, signal.SIGTERM)
        time.sleep(1)
        next(batches)


def test_the_trainers_own_sigterm_still_ends_a_shielded_worker_at_once():
    # The loader's shutdown and multiprocessing's exit (terminate, then join) must not wait on the shield.
    pid, batches = _worker_pid_and_loader(shield=True)
    _send_from_outside(pid, signal.SIGUSR1)
    os.kill(pid, signal.SIGTERM)
    time.sleep(1)
    with pytest.raises(RuntimeError, match=f"worker \\(pid\\(s\\) {pid}\\) exited unexpectedly"):
        next(batches)  # status 0, as torch's own handler exits on its parent's SIGTERM


@pytest.fixture
def python_ctrl_c():
    """Python's own SIGINT handler in this process, as at a terminal (a CI runner may start pytest with it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def ignored_ctrl_c():
    """SIGINT ignored in this process, as a shell script's background job gets it (Ctrl-C at the terminal leaves it
    alone); forked loader workers inherit it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, previous)


def test_the_first_ctrl_c_asks_for_a_stop_and_the_second_aborts(capfd, python_ctrl_c):
    stop = StopSignal(announce="Ctrl-C: finishing this step").install()
    try:
        signal.raise_signal(signal.SIGINT)
        assert stop.received == signal.SIGINT
        assert "Ctrl-C: finishing this step; Ctrl-C again aborts at once" in capfd.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    stop.forward_to_previous_handler()  # no KeyboardInterrupt after the checkpoint: Python's handler is not a requeue


def test_a_torchrun_rank_takes_the_agents_copy_of_a_ctrl_c_as_the_same_stop(capfd, python_ctrl_c):
    stop = StopSignal(announce="Ctrl-C: finishing this step", second_interrupt_aborts=False).install()
    try:
        signal.raise_signal(signal.SIGINT)  # the terminal's
        signal.raise_signal(signal.SIGINT)  # the agent's, passed on: no KeyboardInterrupt
        assert stop.received == signal.SIGINT
        assert capfd.readouterr().err.count("\nCtrl-C: finishing this step\n") == 1  # once, and no "again aborts"
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_ctrl_c_stays_ignored(ignored_ctrl_c):
    stop = StopSignal().install()
    signal.raise_signal(signal.SIGINT)
    assert stop.received is None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    stop.uninstall()


def test_a_loader_worker_of_a_trainer_that_ignores_ctrl_c_ignores_it_too(ignored_ctrl_c):
    # The shield took the inherited ignored SIGINT anyway, and the second Ctrl-C at the terminal killed the worker:
    # the trainer failed mid-step ("worker ... exited unexpectedly").
    pid, batches = _worker_pid_and_loader(shield=True)
    for _ in range(3):
        _send_from_outside(pid, signal.SIGINT)
        time.sleep(0.3)
    assert [int(next(batches)) for _ in range(3)] == [pid] * 3


def test_sigterm_to_the_whole_process_group_checkpoints_and_ends_the_multirun(tiny_shapes, tmp_path):
    # SLURM, `timeout` and `kill -- -PGID` signal the loader workers too: they used to die first, the trainer
    # failed mid-step without a checkpoint, and Hydra's multirun went on to its next job.
    cmd = _cmd(tiny_shapes, tmp_path, "bn", "data.workers=2", "seed=0,1")
    cmd.insert(3, "--multirun")  # after `-m mabn.train`
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _wait_for_checkpoint(tmp_path, 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stop signal 15: checkpoint" in output, output[-3000:]
    assert "killed by signal" not in output
    assert [p.name[-2:] for p in tmp_path.rglob("*-s*") if p.is_dir()] == ["s0"]  # seed 1 never started


def test_a_held_run_dir_is_refused_and_freed_when_its_holder_dies(tmp_path):
    with run_lock.hold(tmp_path):
        with pytest.raises(RunDirInUse, match=f"run dir {tmp_path} is in use by pid {os.getpid()} on "):
            run_lock.check_free(tmp_path)
    run_lock.check_free(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", f"from mabn import run_lock; import time\n"
                               f"with run_lock.hold(__import__('pathlib').Path({str(tmp_path)!r})):\n"
                               f"    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(RunDirInUse, match=f"pid {holder.pid} "):
        run_lock.check_free(tmp_path)
    holder.send_signal(signal.SIGKILL)  # the kernel drops the lock with its process: no stale lock
    holder.wait()
    run_lock.check_free(tmp_path)


def test_a_file_system_without_locks_trains_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    def no_locks(handle, operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    run_lock.check_free(tmp_path)
    with run_lock.hold(tmp_path):
        pass
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text


def test_a_second_trainer_of_a_running_run_dir_is_refused_before_it_writes(tiny_shapes, tmp_path):
    cmd = _cmd(tiny_shapes, tmp_path, "bn")
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(tmp_path, 2, first)
    first.send_signal(signal.SIGSTOP)  # paused, it still holds the run dir
    try:
        run_dir = next(tmp_path.rglob("checkpoints")).parent
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        for extra in ([], ["--multirun"]):  # refused in the preflight / in the job, its `.hydra/` records put back
            second = subprocess.run(cmd[:3] + extra + cmd[3:], capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr[-2000:]
            assert f"error: run dir {run_dir} is in use by pid {first.pid} on " in second.stderr.splitlines()[-1]
            after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
            assert after.keys() - {run_dir / "train.log"} == before.keys() - {run_dir / "train.log"}
            assert all(after[p] == before[p] for p in before if p.name != "train.log")  # Hydra's log line may be added
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]


def _corrupt_copy(src, dst):
    shutil.copytree(src, dst)
    victim = sorted((dst / "train").rglob("*.JPEG"))[5]
    victim.write_bytes(b"not a jpeg at all")
    return dst


def _bad_inputs(tmp_path, shapes):
    """(overrides, what to prepare, expected substring of the one error line) for each bad input."""
    def empty_class(root):
        shutil.copytree(shapes, root)
        for f in (root / "val" / "n90000003").iterdir():
            f.unlink()

    def class_mismatch(root):
        shutil.copytree(shapes, root)
        (root / "val" / "n90000003").rename(root / "val" / "n99999999")

    def no_val(root):
        shutil.copytree(shapes, root)
        shutil.rmtree(root / "val")

    def garbage_checkpoint(root):
        (tmp_path / "garbage.pt").write_bytes(b"\x00" * 64)
        return shapes

    def a_file(root):
        (tmp_path / "a_file").write_text("")
        return shapes

    def below_a_file(root):
        (tmp_path / "a_file").write_text("")
        return tmp_path / "a_file" / "shapes"

    return {
        "missing_data_root": (["data.root=/nonexistent/imagenet"], None, "data.root='/nonexistent/imagenet' does not exist"),
        "no_val_folder": ([], no_val, "has no val/ folder"),
        "empty_class_folder": ([], empty_class, "n90000003 holds no images"),
        "train_val_class_mismatch": ([], class_mismatch, "train/ and val/ of"),
        "missing_resume_file": (["train.resume=/nonexistent.pt"], None, "train.resume='/nonexistent.pt' is not a checkpoint file"),
        "garbage_resume_file": ([f"train.resume={tmp_path / 'garbage.pt'}"], garbage_checkpoint,
                                "garbage.pt' cannot be loaded: ValueError: not a checkpoint: torch.save writes a zip archive, and "
                                "this file is not one (or is cut short)"),
        "unwritable_output_dir": ([f"output_root={tmp_path / 'a_file' / 'out'}"], a_file, "a_file is not a directory"),
        "generated_root_below_a_file": (["data.generate=shapes"], below_a_file,  # mkdir's traceback, in the run dir
                                        "shapes' cannot be generated (" f"{tmp_path / 'a_file'} is not a directory)"),
        "nan_loss": (["schedule.base_lr=1e12"], None, "loss is nan at step"),
        "nan_loss_skip_limit": (["schedule.base_lr=1e12", "train.nan_policy=skip", "train.max_nonfinite_skips=2"], None,
                                "train.max_nonfinite_skips=2"),
        "too_many_unreadable_images": (["data.max_unreadable=0"], "corrupt", "1 unreadable images this epoch exceed data.max_unreadable=0"),
    }


BAD_INPUTS = list(_bad_inputs(__import__("pathlib").Path("/unused"), None))


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_error_line(tiny_shapes, tmp_path, case):
    overrides, prepare, message = _bad_inputs(tmp_path, tiny_shapes)[case]
    root = tiny_shapes
    if prepare == "corrupt":
        root = _corrupt_copy(tiny_shapes, tmp_path / "data")
    elif prepare is not None:
        root = prepare(tmp_path / "data") or tmp_path / "data"
    out = subprocess.run(train_command(root, tmp_path / "out", *overrides), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr


def test_an_unknown_group_option_is_one_error_line_listing_the_options(tiny_shapes, tmp_path):
    """Hydra's own report was a dozen lines, exit 1; in a sweep twice (once as the preflight callback's warning), with
    the sweep's multirun.yaml already written."""
    valid = "valid: bn, brn, gn, in, ln, mabn, syncbn"
    for extra in (["norm=batchnorm"], ["-m", "norm=bn,batchnorm"]):
        out = subprocess.run(train_command(tiny_shapes, tmp_path, *extra), capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and out.stderr.splitlines() == [f"error: norm='batchnorm' is not valid; {valid}"], \
            out.stderr[-2000:]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_unreadable_image_is_skipped_and_counted(tiny_shapes, tmp_path):
    root = _corrupt_copy(tiny_shapes, tmp_path / "data")
    out = subprocess.run(train_command(root, tmp_path / "out"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(next((tmp_path / "out").rglob("metrics.jsonl")).read_text().splitlines()[0])
    assert record["skipped_images"] == 1
    assert "skipped 1 unreadable images" in out.stdout


def test_resuming_with_another_norm_names_both(tiny_shapes, tmp_path):
    first = subprocess.run(train_command(tiny_shapes, tmp_path, "run_name=fixed"), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0
    out = subprocess.run(train_command(tiny_shapes, tmp_path, "run_name=fixed", "norm=mabn"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "was trained with norm.name=bn, this run asks for norm.name=mabn" in out.stderr
    # Allowed to differ, the norm still changes the model's tensors: one line, not load_state_dict's traceback.
    records = _records(tmp_path / "train" / "fixed")
    out = subprocess.run(train_command(tiny_shapes, tmp_path, "run_name=fixed", "norm=mabn",
                                       "train.resume_changes=[norm]"),
                         capture_output=True, text=True, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(errors) == 1 and "does not fit the model this run builds (" in errors[0] and "tensors" in errors[0]
    assert _records(tmp_path / "train" / "fixed") == records


def _records(run_dir):
    return {p.name: p.read_bytes() for p in sorted((run_dir / ".hydra").iterdir())}


def test_a_finished_run_asked_for_another_schedule_is_refused_and_its_records_kept(tiny_shapes, tmp_path):
    """A run dir holds one run: asking it for other settings (not only another norm) is an error in one line, in a
    single run before anything is written; in a sweep before its first job (that job, a new run, trained first), or
    where the run dir is Hydra's to name as the job starts, at that job with the dir's .hydra records put back;
    listing the key in train.resume_changes continues the run with the change."""
    first = subprocess.run(train_command(tiny_shapes, tmp_path, "run_name=0"), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = tmp_path / "train" / "0"
    records, metrics = _records(run_dir), (run_dir / "metrics.jsonl").read_bytes()
    for extra, job in ((["run_name=0"], ""), (["run_name=new,0", "--multirun"], "the sweep's job run_name=0: "),
                       (["hydra.sweep.subdir=${hydra.job.num}", "--multirun"], "")):
        out = subprocess.run(train_command(tiny_shapes, tmp_path, "schedule.epochs=2", "optim.momentum=0.8") + extra,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr[-2000:]
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {job}checkpoint ") and "was trained with " \
            "optim.momentum=0.9, this run asks for optim.momentum=0.8 (and schedule.epochs)" in errors[0] \
            and "train.resume_changes=[optim.momentum,schedule.epochs]" in errors[0], out.stderr[-2000:]
        assert _records(run_dir) == records and (run_dir / "metrics.jsonl").read_bytes() == metrics
        assert not (tmp_path / "train" / "new").exists()
    # settings of how a run executes may change; the ones named in train.resume_changes too
    more = subprocess.run(train_command(tiny_shapes, tmp_path, "run_name=0", "schedule.epochs=2", "data.workers=1",
                                        "train.log_every=5", "train.resume_changes=[schedule.epochs]", "--multirun"),
                          capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-2000:]
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line]
    assert epochs == [1, 2]


def test_resume_compares_every_setting_but_how_a_run_executes():
    from omegaconf import OmegaConf

    from mabn.resume import differences

    saved = OmegaConf.create({"norm": {"name": "bn", "options": {"momentum": 0.1}}, "schedule": {"epochs": 10},
                              "train": {"progress": True, "resume": "auto"}, "data": {"root": "/a", "loader": "dali"},
                              "stats": {"enabled": False}, "old_key": 1})
    now = OmegaConf.create({"norm": {"name": "mabn", "options": {"momentum": 0.98}}, "schedule": {"epochs": "${x}"}, "x": 1,
                            "train": {"progress": False, "resume": "never"}, "data": {"root": "/b", "loader": "dali"},
                            "stats": {"enabled": True}, "hydra": {"anything": 1}})
    assert differences(saved, now) == [("norm.name", "bn", "mabn"), ("norm.options.momentum", 0.1, 0.98),
                                       ("schedule.epochs", 10, 1)]
    assert differences(saved, now, allowed=["norm", "schedule.epochs"]) == []


@pytest.mark.parametrize("overrides, message", [
    (["norm=mabn", "norm.options.window=0"], "window=0 is not valid; valid: an integer >= 1"),
    (["norm=mabn", "norm.options.warmup=-5"], "norm.options.warmup=-5 is not valid"),
    (["norm=gn", "norm.options.num_groups=7"], "8 channels cannot be split into 7 groups"),
    (["data.crop_size=0"], "data.crop_size=0 is not valid"),
    pytest.param(["train.device=cuda"], "train.device='cuda' but no CUDA device is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
])
def test_bad_layer_and_data_values_fail_before_the_run_dir_exists(tiny_shapes, tmp_path, overrides, message):
    out = subprocess.run(train_command(tiny_shapes, tmp_path / "out", *overrides), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_a_dataset_given_as_data_root_with_the_shapes_generator_on_is_refused_and_left_alone(tiny_shapes, tmp_path):
    """`make train ARGS="data.root=/data/imagenet"` without data=imagenet: the default data=shapes generates into
    data.root, and used to delete the dataset there to do so."""
    mine = tmp_path / "imagenet"
    shutil.copytree(tiny_shapes, mine)
    (mine / "VERSION").unlink()
    before = sorted(p.relative_to(mine) for p in mine.rglob("*"))
    out = subprocess.run(train_command(mine, tmp_path / "out", "data.generate=shapes"), capture_output=True, text=True,
                         timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-3000:]
    assert errors[0] == (f"error: {mine} is not empty and was not written by the shapes generator (it has no VERSION file), "
                         "which would replace it; to train on it set data.generate=null (e.g. data=imagenet), else write to a new folder")
    assert sorted(p.relative_to(mine) for p in mine.rglob("*")) == before and not (tmp_path / "out").exists()


def test_resume_rewinds_records_written_after_the_checkpoint(tiny_shapes, tmp_path):
    # A process killed at step 40 after its last checkpoint at 25 has logged 15 steps that the resumed run
    # trains again: made here by deleting the later checkpoints of a finished run and running it again.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cmd = _cmd(tiny_shapes, tmp_path, "mabn", "train.checkpoint_every_steps=5", "train.checkpoint_keep=20",
               "stats.enabled=true", "stats.every=1", "train.log_every=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = next(tmp_path.rglob("metrics.jsonl")).parent

    def records():
        timing = ("images_per_sec", "epoch_seconds", "data_time_frac")
        metrics = [{k: v for k, v in json.loads(line).items() if k not in timing}
                   for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        scalars = EventAccumulator(str(run_dir / "tb")).Reload()
        curves = {tag: [(e.step, e.value) for e in scalars.Scalars(tag)] for tag in ("train/loss", "val/top1_err")}
        return metrics, (run_dir / "batch_stats.jsonl").read_text().splitlines(), curves

    straight = records()
    assert [r.get("epoch", r.get("event")) for r in straight[0]] == [1, 2, "finished"]
    assert [json.loads(line)["step"] for line in straight[1]] == list(range(40))
    for path in (run_dir / "checkpoints").glob("step-*.pt"):
        if int(path.stem.split("-")[1]) > 25:
            path.unlink()
    with open(run_dir / "batch_stats.jsonl", "a") as f:
        f.write('{"step": 40, "chan')  # a line cut short by the kill
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "step-00000025.pt" in again.stdout, again.stderr[-2000:]
    # Resume is bitwise, so the records are the uninterrupted run's: each step once, same values.
    assert records() == straight
