"""The benchmark runner works end to end (a smoke run; speed targets live in `make bench`, not in tests), and
the CPU allocator setting it and training share does what it says."""
import subprocess
import sys
import textwrap

from .conftest import ROOT


def test_bench_runner_writes_a_report(tmp_path):
    out = subprocess.run([sys.executable, "-m", "scripts.bench.run_all", "--quick", "--only", "norms", "--no-compile",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = (tmp_path / "bench_cpu_norms.md").read_text()
    assert "| 2x64x112x112 | mabn |" in report and "/ BN" in report


def test_bench_refuses_a_device_or_out_it_cannot_use_before_measuring(tmp_path):
    (tmp_path / "report").write_text("kept")
    for flags, message in ((["--device", "tpu"], "--device 'tpu' is not valid; valid: cpu, cuda or cuda:N"),
                           (["--out", str(tmp_path / "report")], "is a file; valid: a folder")):  # after minutes, before
        out = subprocess.run([sys.executable, "-m", "scripts.bench.run_all", "--quick", "--only", "norms", *flags],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and message in out.stderr and "running norms" not in out.stderr, out.stderr
    assert (tmp_path / "report").read_text() == "kept"


def _page_faults_per_step(keep: bool) -> int:
    """Median minor page faults of 9 steady-state steps (an occasional step faults in ~1,000 pages for
    something else, which a mean over a few steps would count). Without the setting, the run pins
    glibc's initial thresholds (128 KiB): left to itself glibc raises them as blocks are freed, so
    whether the default faults every step depends on the order of frees (measured: 9,000-25,000
    faults a step in one process, 1 in another)."""
    code = textwrap.dedent(f"""
        import resource, torch, torch.nn.functional as F
        from mabn.host_memory import keep_freed_blocks
        from mabn.models import resnet50
        torch.set_num_threads(1)
        assert keep_freed_blocks() if {keep} else keep_freed_blocks(mmap_threshold=128 * 1024, trim_threshold=128 * 1024)
        model = resnet50("mabn", num_classes=10)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        step(); step()
        faults = []
        for _ in range(9):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            step()
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(sorted(faults)[len(faults) // 2])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_keep_freed_blocks_stops_training_steps_from_page_faulting_their_memory_back():
    """With its initial 128 KiB thresholds glibc hands the step's big blocks back to the OS and faults them in
    again, zeroed, every step; with the setting training uses on CPU, steady-state steps reuse them."""
    returned, kept = _page_faults_per_step(False), _page_faults_per_step(True)
    assert returned > 1000, f"expected blocks above the mmap threshold to fault in every step, got {returned}"
    assert kept < returned / 20, f"{kept} page faults per step with the setting, {returned} without"


def test_the_hook_table_stands_in_for_the_buffers_a_compiled_mabn_forward_rebinds():
    """`compile_hook_table` times the hooks with REBOUND's buffers swapped, as if a compiled forward had rebound
    them; a forward that rebinds others would be timed short. One traced training forward says which."""
    import torch

    from mabn.compile import compile_model
    from mabn.norms import MABN2d
    from scripts.bench.bench_models import REBOUND

    torch._dynamo.reset()
    layer = MABN2d(4, warmup=0, renorm_start=0).train()
    before = dict(layer._buffers)
    compile_model(layer, backend="eager", fullgraph=True)(torch.randn(2, 4, 3, 3, requires_grad=True))
    assert sorted(name for name, buffer in layer._buffers.items() if buffer is not before[name]) == sorted(REBOUND)
