"""`make repro`'s plan (scripts/repro.py): what it runs, in which order, what counts as done, and third seeds."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import ROOT, at_a_terminal, load_script

repro = load_script("repro")


def test_plan_is_the_papers_figure_for_every_seed_then_real_batch_then_ablations_then_the_proposal():
    ranked = repro.ranked_runs(list(repro.PARTS), [0, 1])
    runs = [run for _, run in ranked]
    assert [rank for rank, _ in ranked] == sorted(rank for rank, _ in ranked)  # listed in run order
    assert len(runs) == 2 * (15 + 2 + 7 + 5) + 1  # figure 3 norms x 5 b, real b=2, ablations, proposal; GN once
    figure = [r for r in runs if r[0] in ("norm=bn", "norm=brn", "norm=mabn") and r[1].startswith("norm.norm_batch")
              and len(r) == 3]
    assert {(r[0], r[1]) for r in figure} == {(f"norm={n}", f"norm.norm_batch={b}") for n in ("bn", "brn", "mabn")
                                             for b in (32, 16, 8, 4, 2)}
    assert runs.index(["norm=gn", "seed=0"]) < runs.index(["norm=mabn", "norm.norm_batch=32", "seed=1"])
    assert runs[:len(figure) + 1] == [r for r in runs if r in figure or r[0] == "norm=gn"]  # the figure first
    assert all(r[-1] == "seed=0" for r in runs[:16]) and all(r[-1] == "seed=1" for r in runs[16:31])
    assert runs[31:35] == [["norm=mabn", "data.batch_per_gpu=2", "train.grad_accum=16", "seed=0"],
                           ["norm=bn", "data.batch_per_gpu=2", "train.grad_accum=16", "seed=0"],
                           ["norm=mabn", "data.batch_per_gpu=2", "train.grad_accum=16", "seed=1"],
                           ["norm=bn", "data.batch_per_gpu=2", "train.grad_accum=16", "seed=1"]]
    assert ["norm=mabn", "norm.norm_batch=2", "ablation=warmup100", "seed=1"] in runs
    assert runs[-10:] == [["norm=mabn", f"norm.norm_batch={b}", "norm.options.warmup=500", "tag=-warmup500", f"seed={s}"]
                          for s in (0, 1) for b in (32, 2, 4, 16, 8)]  # tagged: out of the main table and plot


def test_norms_and_batches_pick_points_of_the_plan():
    runs = [run for _, run in repro.ranked_runs(list(repro.PARTS), [2, 3], norms=["bn", "mabn"], batches=[32])]
    assert runs == [["norm=mabn", "norm.norm_batch=32", "seed=2"], ["norm=bn", "norm.norm_batch=32", "seed=2"],
                    ["norm=mabn", "norm.norm_batch=32", "seed=3"], ["norm=bn", "norm.norm_batch=32", "seed=3"],
                    ["norm=mabn", "norm.norm_batch=32", "ablation=warmup100", "seed=2"],
                    ["norm=mabn", "norm.norm_batch=32", "ablation=warmup100", "seed=3"],
                    ["norm=mabn", "norm.norm_batch=32", "norm.options.warmup=500", "tag=-warmup500", "seed=2"],
                    ["norm=mabn", "norm.norm_batch=32", "norm.options.warmup=500", "tag=-warmup500", "seed=3"]]
    # b = 2 takes the real batch of 2 as well; GN, with no b, only when no batches are named
    real = [run for _, run in repro.ranked_runs(["real_b2", "figure"], [0], norms=["bn"], batches=[2])]
    assert real == [["norm=bn", "norm.norm_batch=2", "seed=0"],
                    ["norm=bn", "data.batch_per_gpu=2", "train.grad_accum=16", "seed=0"]]
    assert [run for _, run in repro.ranked_runs(["figure"], [0], norms=["gn"])] == [["norm=gn", "seed=0"]]
    assert repro.ranked_runs(["figure"], [0], norms=["gn"], batches=[32]) == []


def _finished(run_dir, err):
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 8, "val_top1_err": err}) + "\n"
                                            + json.dumps({"event": "finished"}) + "\n")


def test_archived_runs_count_as_done_and_a_spread_over_2_points_plans_a_third_seed(tmp_path):
    plan = repro.Plan("imagenette_cpu", str(tmp_path / "out"), [], tmp_path / "archive")
    bn32 = ["norm=bn", "norm.norm_batch=32"]
    for seed, err in ((0, 27.0), (1, 30.5)):
        run_dir = plan.run_dir([*bn32, f"seed={seed}"])
        assert run_dir.name == f"imagenette64-resnet18_cpu-bn-b32-n32-s{seed}"
        _finished(plan.archived(run_dir), err)
    assert plan.finished([*bn32, "seed=0"]) and not plan.finished(["norm=mabn", "norm.norm_batch=32", "seed=0"])
    mabn2 = ["norm=mabn", "norm.norm_batch=2"]
    for seed, err in ((0, 29.0), (1, 30.5)):  # 1.5 apart: no third seed
        _finished(plan.run_dir([*mabn2, f"seed={seed}"]), err)
    due = repro.third_seeds(plan, repro.ranked_runs(["figure"], [0, 1]), repro.third_seed_follow_up(plan, [0, 1], 2.0))
    assert due == [((0, 1, 1), [*bn32, "seed=2"])]  # ranked after the figure's planned runs


def test_list_prints_the_plan_and_bad_arguments_are_one_line(tmp_path, monkeypatch):
    out = subprocess.run([sys.executable, "scripts/repro.py", "--list", "--only", "real_b2", "--seeds", "3",
                          "--output-root", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "2 planned runs, 0 finished" in out.stdout and "todo  imagenette64-resnet18_cpu-mabn-b2-n2-s3" in out.stdout
    # The bad ones in process (Python prints a SystemExit's message as the one line on stderr, exit status 1).
    for args, message in ((["--only", "figures"], "--only='figures' is not valid"), (["--seeds", "a"], "--seeds='a' is not valid"),
                          (["--experiment", "nope"], "--experiment='nope' is not valid"),
                          (["--norms", "bn,xn"], "--norms='bn,xn' is not valid"), (["--batches", "3"], "--batches='3' is not valid"),
                          (["--batches", "b2"], "--batches='b2' is not valid"),
                          (["--lanes", "0"], "--lanes=0 is not valid"), (["--threads", "0"], "--threads=0 is not valid"),
                          (["--only", "ablations", "--norms", "bn"], "--norms=bn --batches=None select no run"),
                          (["--seeds", "-1"], "--seeds='-1' is not valid; valid: distinct integers >= 0"),
                          (["--spread", "-1"], "--spread=-1.0 is not valid"),  # every setting got a third seed
                          # a file: the archive failed as the first run finished, the output root as a traceback
                          (["--archive", str(ROOT / "README.md")], f"--archive='{ROOT / 'README.md'}' is not valid"),
                          (["--output-root", str(ROOT / "README.md" / "x")], "--output-root="),
                          # an override every run would refuse at its start, or one that does not compose (traceback)
                          (["--only", "real_b2", "train.amp=maybe"], "norm=mabn data.batch_per_gpu=2 train.grad_accum=16 "
                           "seed=0 train.amp=maybe: train.amp='maybe' is not valid; valid: true or false"),
                          # named as `python -m mabn.train` names them (was Hydra's "Could not override 'nope'"), for
                          # the run's own groups: warmup is a key of norm=mabn's options, not of norm=bn's
                          (["nope=1"], "norm=mabn norm.norm_batch=32 seed=0 nope=1: nope=1 is not valid: the config "
                           "with experiment=imagenette_cpu norm=mabn has no nope; valid: data, model, norm, optim, "),
                          (["--only", "figure", "--norms", "bn", "norm.options.warmup=100"], "norm=bn norm.norm_batch=32 "
                           "seed=0 norm.options.warmup=100: norm.options.warmup=100 is not valid: the config with "
                           "experiment=imagenette_cpu norm=bn has no norm.options.warmup; valid: norm.options.eps, "
                           "norm.options.momentum"),
                          (["ablation=nope"], "norm=mabn norm.norm_batch=32 seed=0 ablation=nope: ablation='nope' is not "
                           "valid; valid: ema, no_centered_conv, no_renorm, sma_backward_only, sma_forward_only, warmup100")):
        monkeypatch.setattr(sys, "argv", ["repro.py", "--list", "--output-root", str(tmp_path), *args])
        with pytest.raises(SystemExit) as stopped:
            repro.main()
        assert str(stopped.value).startswith(f"error: {message}") and "\n" not in str(stopped.value)
    assert not list(tmp_path.iterdir())  # nothing written
    monkeypatch.setattr(sys, "argv", ["repro.py", "--list", "--output-root", str(tmp_path), "--only", "figure",
                                      "--norms", "mabn", "--batches", "2", "norm.options.warmup=100"])
    assert repro.main() == 0  # a key of the runs' own norm group is checked against it


def _tiny_runs(tiny_shapes, *overrides):
    """The plan's runs on the tiny dataset: a narrow net at 24 px."""
    return [f"data.root={tiny_shapes}", "data.generate=null", "data.crop_size=24", "data.val_resize=28",
            "data.workers=0", "model.width=8", "data.val_batch_per_gpu=10", *overrides]


def test_two_lanes_run_the_plan_archive_each_run_and_say_what_is_left(tiny_shapes, tmp_path):
    # The real-batch-2 part on the tiny dataset: 2 runs (MABN, BN), 40 micro-batches of 2 = 2 SGD steps an epoch.
    tiny = _tiny_runs(tiny_shapes, "schedule.epochs=2")
    cmd = [sys.executable, "scripts/repro.py", "--only", "real_b2", "--seeds", "0", "--lanes", "2",
           "--output-root", str(tmp_path / "out"), "--archive", str(tmp_path / "archive"), *tiny]
    # First the first epoch of each: paused, not failed, nothing archived.
    out = subprocess.run(cmd + ["train.stop_after_epochs=1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert len([line for line in out.stdout.splitlines() if line.startswith("[lane") and " paused " in line]) == 2, out.stdout
    assert "runs paused after epoch 1" in out.stdout and not (tmp_path / "archive").exists()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    done = [line for line in out.stdout.splitlines() if " done " in line]
    assert len(done) == 2 and "1 left, about" in done[0] and "0 left, about 0.0 h" in done[1], out.stdout
    archived = sorted(p.name for p in (tmp_path / "archive" / "imagenette_cpu").iterdir())
    assert archived == ["imagenette64-resnet18_cpu-bn-b2-n2-s0", "imagenette64-resnet18_cpu-mabn-b2-n2-s0"]
    for name in archived:
        assert repro.is_finished(tmp_path / "archive" / "imagenette_cpu" / name)
        assert not list((tmp_path / "archive" / "imagenette_cpu" / name).rglob("*.pt"))  # records, no checkpoints
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "2 planned runs, 2 finished, 0 to run" in again.stdout


@pytest.mark.parametrize("how", ["sigterm to the driver", "ctrl-c at its terminal"])
def test_a_stop_signal_to_the_driver_checkpoints_the_run_in_progress_and_starts_no_other(tiny_shapes, tmp_path, how):
    # `kill <pid of make repro's driver>`: the lanes' trainers used to train on, orphaned, and a rerun of the plan
    # then trained the same run dirs beside them. Ctrl-C reaches the runs as well as the driver: it used to end
    # them mid-step while the driver's lanes went on to the next runs.
    tiny = _tiny_runs(tiny_shapes, "schedule.epochs=50", "train.checkpoint_every_steps=1")
    cmd = [sys.executable, "scripts/repro.py", "--only", "real_b2", "--seeds", "0", "--lanes", "1",
           "--output-root", str(tmp_path / "out"), *tiny]
    sig = signal.SIGINT if how.startswith("ctrl-c") else signal.SIGTERM
    driver = subprocess.Popen(at_a_terminal(cmd) if sig == signal.SIGINT else cmd, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list((tmp_path / "out").rglob("checkpoints/step-*.pt")):
        assert driver.poll() is None and time.time() < deadline, "no checkpoint before the stop"
        time.sleep(0.05)
    if sig == signal.SIGINT:
        os.killpg(driver.pid, sig)
    else:
        driver.send_signal(sig)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 128 + sig, out + err
    assert f"stopped by signal {int(sig)}: the runs in progress checkpointed" in err and "Traceback" not in err
    [first] = [line for line in out.splitlines() if " stopped " in line]
    name = first.split(" stopped ")[1].split()[0]
    log = (tmp_path / "out" / "lanes" / f"{name}.log").read_text()
    assert "stop signal" in log and ": checkpoint" in log and "Traceback" not in log, log[-3000:]
    assert [p.name for p in (tmp_path / "out" / "imagenette_cpu").iterdir()] == [name]  # the other never started


def test_a_second_driver_on_the_same_output_root_is_refused(tmp_path):
    from mabn import run_lock

    (tmp_path / "out" / "lanes").mkdir(parents=True)
    with run_lock.hold(tmp_path / "out" / "lanes"):  # the first driver, running
        out = subprocess.run([sys.executable, "scripts/repro.py", "--only", "real_b2", "--seeds", "0",
                              "--output-root", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.splitlines()[-1].startswith(f"error: {tmp_path / 'out'} is in use by another make repro (pid ")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lanes"]  # no run started


def test_a_third_seed_is_queued_once_two_seeds_differ_and_runs_before_the_next_part(tmp_path, monkeypatch):
    # Training faked: each "run" writes a finished metrics.jsonl whose error depends on the norm and seed.
    plan = repro.Plan("imagenette_cpu", str(tmp_path / "out"), [], None)
    errors = {("bn", 0): 27.0, ("bn", 1): 30.5, ("mabn", 0): 25.0, ("mabn", 1): 25.5, ("bn", 2): 28.0}
    order = []

    class FakeTrain:
        def __init__(self, cmd, **kwargs):
            run = [a for a in cmd if "=" in a and not a.startswith(("experiment=", "output_root=", "train.progress="))]
            order.append(plan.run_dir(run).name)
            norm, seed = run[0].removeprefix("norm="), int(run[-1].removeprefix("seed="))
            _finished(plan.run_dir(run), errors.get((norm, seed), 40.0))

        def wait(self):
            return 0

    monkeypatch.setattr(repro.subprocess, "Popen", FakeTrain)
    figure = [((0, 0, i), [f"norm={n}", "norm.norm_batch=32", f"seed={s}"]) for i, (s, n) in
              enumerate([(0, "mabn"), (0, "bn"), (1, "mabn"), (1, "bn")])]
    real_b2 = [((1, 0, 0), ["norm=bn", "data.batch_per_gpu=2", "train.grad_accum=16", "seed=0"])]
    follow_up = repro.third_seed_follow_up(plan, [0, 1], 2.0)
    assert repro.run_lanes(plan, figure + real_b2, 1, 1, tmp_path / "logs", follow_up) == (0, None)
    assert order == [f"imagenette64-resnet18_cpu-{n}-b32-n32-s{s}" for s, n in [(0, "mabn"), (0, "bn"), (1, "mabn"), (1, "bn")]] \
        + ["imagenette64-resnet18_cpu-bn-b32-n32-s2", "imagenette64-resnet18_cpu-bn-b2-n2-s0"]  # BN's third seed, not MABN's
    assert follow_up((0, 0, 1), ["norm=bn", "norm.norm_batch=32", "seed=1"]) == []  # finished: not queued again


def test_a_run_that_cannot_be_archived_is_a_failure_and_the_lane_goes_on(tmp_path, monkeypatch, capsys):
    # Its lane's thread died on the copy before: the plan's other runs were left out and the exit said success.
    (tmp_path / "archive").write_text("a file where the archive should be\n")
    plan = repro.Plan("imagenette_cpu", str(tmp_path / "out"), [], tmp_path / "archive")
    trained = []

    class FakeTrain:
        def __init__(self, cmd, **kwargs):
            run = [a for a in cmd if "=" in a and not a.startswith(("experiment=", "output_root=", "train.progress="))]
            trained.append(plan.run_dir(run).name)
            _finished(plan.run_dir(run), 30.0)

        def wait(self):
            return 0

    monkeypatch.setattr(repro.subprocess, "Popen", FakeTrain)
    runs = [((0, 0, i), [f"norm={n}", "norm.norm_batch=32", "seed=0"]) for i, n in enumerate(["bn", "mabn"])]
    assert repro.run_lanes(plan, runs, 1, 1, tmp_path / "logs") == (2, None)
    assert len(trained) == 2 and capsys.readouterr().out.count("FAILED to archive") == 2


def test_the_estimate_counts_epochs_trained_so_a_resumed_runs_rest_is_not_taken_for_a_whole_run(tmp_path):
    run_dir = tmp_path / "run"
    assert repro.epochs_done(run_dir) == 0
    _finished(run_dir, 25.0)
    assert repro.epochs_done(run_dir) == 1
    # one run resumed at epoch 4 of 8 (20 min for its last 4), one whole (40 min): 5 min an epoch
    assert repro.eta_hours([(20.0, 4, 8), (40.0, 8, 8)], left=3, lanes=1) == pytest.approx(3 * 40 / 60)
    assert repro.eta_hours([(20.0, 4, 8)], left=4, lanes=2) == pytest.approx(2 * 40 / 60)
