"""The benchmark runner works end to end (a smoke run; speed targets live in `make bench`, not in tests)."""
import subprocess
import sys

from .conftest import ROOT


def test_bench_runner_writes_a_report(tmp_path):
    out = subprocess.run([sys.executable, "-m", "scripts.bench.run_all", "--quick", "--only", "norms", "--no-compile",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = (tmp_path / "bench_cpu.md").read_text()
    assert "| 2x64x112x112 | mabn |" in report and "/ BN" in report
