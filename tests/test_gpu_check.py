"""`make gpu-check` cannot rot: its dry run executes every section on CPU at toy sizes."""
import json
import subprocess
import sys

import torch

from .conftest import ROOT


def test_gpu_check_dry_run_passes_every_section(tmp_path):
    # compiled rows at one N (the other's are the same code): two compiling children fewer on CI's two cores
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(tmp_path),
                           "--compile-steps", "2:reduce-overhead"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert len(report["summary"]) == 13 and all(row[1] == "ok" for row in report["summary"])
    assert report["training"]["bitwise_resume"] is True
    # the step table's compiled rows, compiled beforehand in children (bn and mabn, by one step each)
    assert set(report["warm_compile"]) == {"bn:2:reduce-overhead", "mabn:2:reduce-overhead"}
    assert all(row["seconds"] > 0 for row in report["warm_compile"].values())
    # the host time of train.compile's hooks under CUDA graphs, beside the one copy they make
    assert report["compile_hooks_us"] > 0 and report["compile_hooks_over_copy"] > 0
    assert "| compile_model's hooks (with that copy) |" in (tmp_path / "gpu_check.md").read_text()
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check")
    assert done.stdout.rstrip().endswith("|")  # the summary table comes last


def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    if torch.cuda.is_available():
        return
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: no CUDA device") and len(done.stderr.splitlines()) == 1


def refused(tmp_path, *args: str) -> str:
    """The dry run with bad `args`: exit 2, one line on stderr (returned), nothing written."""
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert not out.exists()
    return done.stderr


def test_bad_compile_steps_fail_in_one_line_before_anything_is_written(tmp_path):
    assert refused(tmp_path, "--compile-steps", "32:fast").startswith(
        "error: --compile-steps item '32:fast' is not valid; valid: N:MODE")


def test_compare_times_the_others_when_one_candidate_fails():
    from scripts.bench.common import compare

    def broken():
        raise RuntimeError("accessing tensor output of CUDAGraphs that has been overwritten\nsecond line")

    failures = {}
    times = compare({"ok": lambda: None, "broken": broken}, "cpu", rounds=1, min_run_time=0.01, failures=failures)
    assert set(times) == {"ok"} and times["ok"] > 0
    assert failures == {"broken": "RuntimeError: accessing tensor output of CUDAGraphs that has been overwritten"}


def test_a_compile_mode_that_failed_the_probe_is_timed_in_the_default_mode_and_a_crash_is_not_run():
    from scripts import gpu_check

    check = gpu_check.Check("cpu", dry=True, compile_steps=((2, "reduce-overhead"),))
    check.numbers["compile_probe"] = {"mabn:reduce-overhead": {"failed": "differs from eager (loss 3.0e-02, state 1.0e+00)"},
                                      "bn:reduce-overhead": {"crashed": True, "error": "signal 11", "failed": "signal 11"}}
    rows = {line.split("|")[2].strip(): line.split("|")[3:5] for line in gpu_check.step_speed(check).splitlines()
            if line.startswith("| 2 |")}
    assert rows["mabn train.compile reduce-overhead"][0].strip() == "FAILED"
    assert "failed the compile probe (differs from eager" in rows["mabn train.compile reduce-overhead"][1]
    assert float(rows["mabn train.compile (default: reduce-overhead failed the probe)"][0]) > 0  # timed instead
    assert "not run: the process crashed in the compile probe (signal 11)" in rows["bn train.compile reduce-overhead"][1]
    assert float(rows["mabn"][0]) > 0 and float(rows["bn"][0]) > 0


def test_the_compiled_rows_are_compiled_beforehand_in_children_and_one_that_crashed_there_is_not_run(monkeypatch):
    from scripts import gpu_check

    # the real children compile in the dry run (its test asserts their rows); here, children that fail
    check = gpu_check.Check("cpu", dry=True, compile_steps=((2, "default"),))
    # a child killed by a signal while compiling: its row is not run in the check's own process; a child still
    # compiling when the wait ends is stopped, and its row compiles in the check's process
    children = {"mabn:2:default": "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)",
                "bn:2:default": "import time; time.sleep(60)"}
    for key, code in children.items():
        check.warm[key] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    monkeypatch.setattr(gpu_check, "WARM_TIMEOUT_S", 2)
    gpu_check.finish_warm_compiles(check)
    assert not check.warm
    assert check.numbers["warm_compile"]["mabn:2:default"] == {"crashed": True, "error": "signal 11"}
    assert check.numbers["warm_compile"]["bn:2:default"] == {"error": "still compiling after 2 s more, stopped"}
    text = gpu_check.step_speed(check)
    rows = {line.split("|")[2].strip(): line.split("|")[3:5] for line in text.splitlines() if line.startswith("| 2 |")}
    assert "not run: the process compiling it beforehand crashed (signal 11)" in rows["mabn train.compile"][1]
    assert float(rows["bn train.compile"][0]) > 0
    assert "bn:2:default still compiling" in text and "mabn:2:default signal 11" in text


def test_compiling_children_share_the_cores_between_their_inductor_worker_pools():
    import os

    from scripts import gpu_check

    read = "import torch._inductor.config as c; print(c.compile_threads)"
    done = subprocess.run([sys.executable, "-c", read], env=gpu_check.compile_child_env(4), capture_output=True, text=True)
    assert int(done.stdout.split()[-1]) == max(1, os.cpu_count() // 4)


def test_the_sync_section_names_the_trainers_syncs_and_fails_on_one_without_a_reason(monkeypatch):
    import pytest

    from mabn import engine
    from scripts import gpu_check

    check = gpu_check.Check("cpu", dry=True, compile_steps=())
    text = gpu_check.host_syncs(check)
    assert "engine.py:agree" in text and check.numbers["trainer_syncs"]
    assert "UNEXPLAINED" not in text

    read = engine.LatestLoss.read

    def read_and_wait(self):  # a progress bar that reads the device every step: what section 8 exists to catch
        torch.zeros(()).item()
        return read(self)

    monkeypatch.setattr(engine.LatestLoss, "read", read_and_wait)
    with pytest.raises(AssertionError, match="without a known reason in the trainer's step: test_gpu_check.py:read_and_wait"):
        gpu_check.host_syncs(check)


def test_the_budget_ends_waits_for_children_and_skips_the_sections_not_started():
    import time

    from scripts import gpu_check

    check = gpu_check.Check("cpu", dry=True, compile_steps=(), budget=2.0)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    check.section("waits for a hung child", lambda: f"stopped: {check.wait(child, timeout=300)[2]}")
    assert time.monotonic() - started < 30 and child.returncode is not None  # killed when the budget ended
    check.section("starts after the budget", lambda: "ran")
    assert check.summary[0][1] == "ok" and "stopped: True" in check.sections[0]
    assert check.summary[1][1] == "skipped: the 2 s budget was spent" and "ran" not in check.sections[1]
    # the step table names the N it did not reach instead of timing it
    table = gpu_check.step_speed(check)
    rows = [line for line in table.splitlines() if "| all | skipped |" in line]
    assert [row.split("|")[1].strip() for row in rows] == ["32", "2"]
    assert "Host time of `train.compile`'s hooks: skipped, the 2 s budget was spent" in table
    assert "compile_hooks_us" not in check.numbers


def test_a_spent_budget_still_writes_the_report_prints_the_summary_last_and_leaves_no_child_running(tmp_path):
    import os
    import signal

    # sections 7 and 10 start their compiling children with the check; skipped, nobody waits for them
    check = subprocess.Popen([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(tmp_path), "--only", "1,7,10",
                              "--budget", "1e-9"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # its own process group: the children's too
    try:
        stdout, stderr = check.communicate(timeout=300)
        assert check.returncode == 1, stderr[-3000:]
        summary = json.loads((tmp_path / "gpu_check.json").read_text())["summary"]
        assert [row[1] for row in summary] == ["skipped: the 1e-09 s budget was spent"] * 3
        assert stdout.rstrip().endswith("|")
        try:
            os.killpg(check.pid, 0)
            left_running = True
        except ProcessLookupError:
            left_running = False
        assert not left_running, "a child of the check outlived it"
    finally:
        try:
            os.killpg(check.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_bad_budget_fails_in_one_line_before_anything_is_written(tmp_path):
    assert refused(tmp_path, "--budget", "0").startswith("error: --budget=0 is not valid; valid: a number of seconds > 0")


def test_an_out_that_is_a_file_fails_in_one_line_and_is_kept(tmp_path):
    (tmp_path / "report.md").write_text("kept")
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(tmp_path / "report.md")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == f"error: --out {tmp_path / 'report.md'} is a file; valid: a folder " \
        "for gpu_check.md and gpu_check.json\n"  # was FileExistsError's traceback
    assert (tmp_path / "report.md").read_text() == "kept"
