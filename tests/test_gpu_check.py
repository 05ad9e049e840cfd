"""`make gpu-check` cannot rot: its dry run executes every section on CPU at toy sizes."""
import json
import subprocess
import sys

import torch

from .conftest import ROOT


def test_gpu_check_dry_run_passes_every_section(tmp_path):
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert len(report["summary"]) == 12 and all(row[1] == "ok" for row in report["summary"])
    assert report["training"]["bitwise_resume"] is True
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check")
    assert done.stdout.rstrip().endswith("|")  # the summary table comes last


def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    if torch.cuda.is_available():
        return
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: no CUDA device") and len(done.stderr.splitlines()) == 1


def test_bad_compile_steps_fail_in_one_line_before_anything_is_written(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(out), "--compile-steps", "32:fast"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: --compile-steps item '32:fast' is not valid; valid: N:MODE") and not out.exists()
