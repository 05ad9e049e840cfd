#!/usr/bin/env python
"""`make gpu-check`: everything the CUDA path must show, in one command, on one GPU, in under 8 minutes.

  make gpu-check GPU_CHECK_OUT=$OUT          # on the GPU machine (see README "GPU check")
  python scripts/gpu_check.py --out DIR --dry-run   # the same code on CPU at toy sizes (what the test runs)
  make gpu-check GPU_CHECK_OUT=$OUT ARGS="--only 7,10 --compile-steps 32:default,2:default"  # a focused call

Writes DIR/gpu_check.md and DIR/gpu_check.json (after every section, so a crash keeps what ran) and prints
the summary table last. Each section runs on its own: a failure is reported with its traceback and the next
section still runs. `--budget` (default 480 s on the device, the issue's 8 minutes; none in the dry run)
bounds the run: no section starts once it is spent (the rest are listed as skipped), waits for child
processes end with it, and a check still running 30 s past it prints every thread's stack (a hang shows
where it is before the machine's limit kills it).

Sections: environment; correctness (the float64 reference tests on the device, GN/LN/IN against
torch, MABN under float16/bfloat16 autocast, folding ResNet-50, 30 steps of ResNet-50 with AMP +
channels_last whose loss falls, a save-at-15 / reload resume that repeats steps 16-30 bitwise, and
`train.compile` with CUDA graphs through MABN's phases against eager, in child processes that compile
while the sections before run; the step table's compiled models are compiled beforehand the same way,
so that section 10 reads inductor's caches);
the device-to-host syncs left in a steady-state step (a bare step per norm, and the trainer's own step with
each sync's reason); speed side by side (norm layers vs cuDNN BN,
ResNet-50 training steps at N = 32 and 2 per norm, BN at batch 256 against NVIDIA's published
A100 number, inference as the paper's throughput table, the input pipelines).
"""
import argparse
import collections
import copy
import datetime
import faulthandler
import io
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # scripts.bench
from scripts.bench import bench_models, bench_norms  # noqa: E402  (first: it quiets torch.utils.benchmark's import)
from scripts.bench.common import compare, kernel_calls, markdown_table, wall  # noqa: E402
from mabn.compile import MODES, compile_model  # noqa: E402
from mabn.engine import autocast  # noqa: E402
from mabn.fold import fold_norms  # noqa: E402
from mabn.models import build_model  # noqa: E402
from mabn.norms import CenConv2d, MABN2d, build_norm  # noqa: E402

NVIDIA_A100_RN50_AMP = 2470  # img/s, DeepLearningExamples ResNet-50 v1.5, A100 80GB, AMP, batch 256 (published)
PAPER_INFERENCE = {"bn": 237.88, "mabn folded": 237.88, "gn": 99.37, "ln": 125.44, "in": 105.60}  # it/s, SPEC §5


def amp_step(net, opt, scaler, x, y, device: str) -> torch.Tensor:
    """One training step under the trainer's autocast (float16 with GradScaler on CUDA, bfloat16 on CPU)."""
    with autocast(device, True):
        loss = F.cross_entropy(net(x), y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()


class Check:
    """Collects sections (markdown), numbers (json) and summary rows (name, result, detail)."""

    def __init__(self, device: str, dry: bool, compile_steps: tuple, budget: float = math.inf):
        self.device, self.dry, self.compile_steps = device, dry, compile_steps
        self.budget, self.deadline = budget, time.monotonic() + budget
        self.sections, self.numbers, self.summary = [], {}, []
        self.probes: dict[str, subprocess.Popen] = {}  # compile probes running in child processes (section 7)
        self.compile_tests: subprocess.Popen | None = None  # and the compile tests (section 7)
        self.warm: dict[str, subprocess.Popen] = {}  # section 10's compiled models, compiled beforehand in children

    def stop_children(self) -> None:
        """Kill the child processes not waited for (their sections skipped, or the check failed before): left
        running they would outlive the check, compiling on the device after the call has ended."""
        children = [*self.probes.values(), *self.warm.values(), *([self.compile_tests] if self.compile_tests else [])]
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()  # reaped, its pipes drained
        self.probes, self.warm, self.compile_tests = {}, {}, None

    def spent(self) -> str | None:
        """Why nothing more starts, once the budget is spent; else None."""
        return f"the {self.budget:g} s budget was spent" if time.monotonic() >= self.deadline else None

    def wait(self, child: subprocess.Popen, timeout: float) -> tuple[str, str, bool]:
        """The child's (stdout, stderr, whether it was stopped) once it exits, killing it after `timeout` seconds
        or where the budget ends, whichever comes first."""
        try:
            return *child.communicate(timeout=max(0.0, min(timeout, self.deadline - time.monotonic()))), False
        except subprocess.TimeoutExpired:
            child.kill()
            return *child.communicate(), True

    def section(self, title: str, fn) -> None:
        if spent := self.spent():  # a section is never cut off: it starts only while time is left
            skipped = f"skipped: {spent}"
            self.sections.append(f"## {title}\n\n{skipped}.\n")
            self.summary.append([title, skipped, "0 s"])
            return
        print(f"== {title}", file=sys.stderr, flush=True)
        started = time.time()
        try:
            text = fn()
            result = "ok"
        except Exception as err:  # noqa: BLE001 - report everything in one go
            text = f"```\n{traceback.format_exc()}```\n"
            result = f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        seconds = time.time() - started
        self.sections.append(f"## {title}\n\n{text}\n({seconds:.0f} s)\n")
        self.summary.append([title, result, f"{seconds:.0f} s"])

    def timing(self, min_run_time: float = 1.0) -> dict:
        """`compare` settings: three rounds on the device; the dry run only proves the code runs."""
        return dict(rounds=1, min_run_time=0.05) if self.dry else dict(rounds=3, min_run_time=min_run_time)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


# -- environment ------------------------------------------------------------------------------------
def environment(check: Check) -> str:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": check.device,
            "cuda": torch.version.cuda, "dry_run": check.dry}
    if check.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version())
    for module in ("hydra", "omegaconf", "nvidia.dali", "torchvision"):
        try:
            imported = __import__(module, fromlist=["__version__"])
            info[module] = getattr(imported, "__version__", "importable")
        except ImportError:
            info[module] = "missing"
    check.numbers["environment"] = info
    return markdown_table(["", ""], [[k, str(v)] for k, v in info.items()])


# -- correctness ------------------------------------------------------------------------------------
def start_pytest(files: list, selection: str) -> subprocess.Popen:
    """`pytest -q FILES -k SELECTION` on this machine's torch, started in a child process."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k", selection]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def compile_child_env(children: int) -> dict:
    """The environment of one of `children` compiling child processes: inductor starts a pool of compile workers
    per process, one a core by default, so that 8 children on a 16-core machine would start 128; each gets its
    share of the cores instead."""
    return {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": str(max(1, (os.cpu_count() or 1) // children))}


def start_child(check: Check, *args: str, children: int) -> subprocess.Popen:
    """This script in a child process (`--probe`, `--warm-compile`), one of `children` compiling at once."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), *args] + (["--dry-run"] if check.dry else [])
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=compile_child_env(children))


def child_result(child: subprocess.Popen, stdout: str, stderr: str) -> dict:
    """The JSON line a `start_child` child printed last, or `how_it_ended` when it failed."""
    if child.returncode != 0 or not stdout.strip():
        return how_it_ended(child, stderr)
    return json.loads(stdout.strip().splitlines()[-1])


def how_it_ended(child: subprocess.Popen, stderr: str) -> dict:
    """A failed child: `crashed` when a signal killed it (it would have killed the check too), and `error`."""
    tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
    why = f"signal {-child.returncode}" if child.returncode < 0 else f"exit {child.returncode}: {tail[0][:200]}"
    return dict(crashed=child.returncode < 0, error=why)


def finish_pytest(check: Check, name: str, child: subprocess.Popen) -> str:
    """Wait for `start_pytest`'s child; its tail as markdown, raising when it failed."""
    stdout, stderr, _ = check.wait(child, timeout=300)  # stopped: killed, a failure below
    tail = "\n".join(stdout.strip().splitlines()[-15:])
    check.numbers[name] = tail.splitlines()[-1] if tail else ""
    if child.returncode != 0:
        raise AssertionError(f"{' '.join(child.args[3:])} failed:\n{tail}\n{stderr[-2000:]}")
    return f"`{' '.join(child.args[1:])}`\n\n```\n{tail}\n```\n"


def reference_tests(check: Check) -> str:
    """The float64 reference tests of every batch-statistics norm, and of BRN's clip counter, on this device (their
    `device` fixture)."""
    selection = "cuda" if check.device.startswith("cuda") else "cpu and eval"
    files = ["tests/test_norms_mabn.py", "tests/test_norms_bn_brn.py", "tests/test_renorm_clips.py"]
    return finish_pytest(check, "reference_tests", start_pytest(files, selection))


def group_norms_match_torch(check: Check) -> str:
    rows = []
    x = torch.randn(4, 64, 9, 9, dtype=torch.float64, device=check.device, requires_grad=True)
    dy = torch.randn_like(x)
    references = {"gn": torch.nn.GroupNorm(32, 64), "ln": torch.nn.GroupNorm(1, 64), "in": torch.nn.GroupNorm(64, 64)}
    for name, ref in references.items():
        ours = build_norm(name, 64).double().to(check.device)
        ref = ref.double().to(check.device)
        y, y_ref = ours(x), ref(x)
        g, g_ref = torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(y_ref, x, dy)[0]
        err = max((y - y_ref).abs().max().item(), (g - g_ref).abs().max().item())
        assert err < 1e-10, f"{name}: {err}"
        rows.append([name, f"{err:.1e}"])
    return markdown_table(["norm", "max abs diff vs torch (float64, y and dx)"], rows)


def mabn_autocast(check: Check) -> str:
    """MABN fed float16/bfloat16 under autocast: statistics in float32, output close to the float32 layer's."""
    dtypes = [torch.float16, torch.bfloat16] if check.device.startswith("cuda") else [torch.bfloat16]
    rows = []
    for dtype in dtypes:
        torch.manual_seed(0)
        layer = MABN2d(64, norm_batch=2, window=4, warmup=3, renorm_start=5).to(check.device)
        ref = copy.deepcopy(layer)
        for step in range(8):
            x = (torch.randn(8, 64, 14, 14, device=check.device) * 300).requires_grad_()  # x^2 overflows float16
            with torch.autocast(check.device.split(":")[0], dtype=dtype):
                y = layer(x.to(dtype))
            y_ref = ref(x.detach().clone())
            assert y.dtype == dtype and torch.isfinite(y).all(), f"{dtype} step {step}: non-finite output"
            y.float().sum().backward()
        assert layer.running_var.dtype == torch.float32 and torch.isfinite(layer.running_var).all()
        rel = ((y.float() - y_ref).abs().max() / y_ref.abs().max()).item()
        var_rel = ((layer.running_var - ref.running_var).abs().max() / ref.running_var.abs().max()).item()
        assert rel < 2e-2 and var_rel < 1e-2, f"{dtype}: output rel err {rel}, running_var rel err {var_rel}"
        rows.append([str(dtype), f"{rel:.1e}", f"{var_rel:.1e}"])
    return markdown_table(["input dtype (autocast)", "output rel. err vs float32", "running_var rel. err"], rows)


def resnet_shape(check: Check) -> dict:
    if check.dry:
        return dict(arch="resnet18", width=8, stem="small", resolution=32, batch=8)
    return dict(arch="resnet50", width=64, stem="imagenet", resolution=224, batch=32)


def folding(check: Check) -> str:
    shape = resnet_shape(check)
    rows = []
    for norm in ("bn", "brn", "mabn"):
        torch.manual_seed(0)
        # float64: float32 convs on a GPU run in TF32 (about 1e-3 relative), which would hide what folding changes
        net = build_model(shape["arch"], norm=norm, num_classes=1000, width=shape["width"], stem=shape["stem"])
        net = net.to(check.device, torch.float64).train()
        with torch.no_grad():
            for _ in range(3):  # move the running statistics off their initial values
                net(torch.randn(shape["batch"], 3, shape["resolution"], shape["resolution"], device=check.device,
                                dtype=torch.float64))
        net.eval()
        x = torch.randn(4, 3, shape["resolution"], shape["resolution"], device=check.device, dtype=torch.float64)
        with torch.no_grad():
            y, y_folded = net(x), fold_norms(net)(x)
        err = ((y - y_folded).abs().max() / y.abs().max()).item()
        assert err < 1e-9, f"{norm}: folded differs by {err} (relative)"
        rows.append([norm, f"{err:.1e}"])
    return markdown_table(["norm", f"{shape['arch']} fold vs unfolded eval (float64), max rel. diff"], rows)


def training_and_resume(check: Check) -> str:
    """30 steps of MABN ResNet-50 at N = 32 with AMP + channels_last on one fixed batch (loss must fall), then
    the state at step 15 reloaded into a fresh model repeats steps 16-30 bitwise (deterministic mode).
    The dry run takes 12 steps and reloads at 6."""
    shape, cuda = resnet_shape(check), check.device.startswith("cuda")
    steps = 12 if check.dry else 30
    half = steps // 2
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    amp_dtype = torch.float16 if cuda else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape["batch"], 3, shape["resolution"], shape["resolution"], generator=gen).to(check.device)
    x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (shape["batch"],), generator=gen).to(check.device)

    def build():
        torch.manual_seed(0)
        net = build_model(shape["arch"], norm="mabn", num_classes=1000, width=shape["width"], stem=shape["stem"],
                          norm_batch=2, window=4, warmup=10, renorm_start=20)
        net = net.to(check.device).to(memory_format=torch.channels_last).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
        return net, opt, torch.amp.GradScaler("cuda", enabled=cuda)

    def step(net, opt, scaler):
        return amp_step(net, opt, scaler, x, y, check.device)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            net, opt, scaler = build()
            losses, saved = [], None
            for k in range(steps):
                losses.append(step(net, opt, scaler))
                if k == half - 1:
                    buffer = io.BytesIO()
                    torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict()}, buffer)
                    saved = buffer.getvalue()
            losses = [v.item() for v in losses]
            net2, opt2, scaler2 = build()
            state = torch.load(io.BytesIO(saved), weights_only=True)
            net2.load_state_dict(state["net"])
            opt2.load_state_dict(state["opt"])
            scaler2.load_state_dict(state["scaler"])
            resumed = [step(net2, opt2, scaler2).item() for _ in range(half, steps)]
    finally:
        torch.use_deterministic_algorithms(False)
    nondeterministic = sorted({str(w.message).splitlines()[0][:120] for w in caught if "deterministic" in str(w.message)})
    assert all(map(lambda v: v == v and abs(v) != float("inf"), losses)), f"non-finite loss: {losses}"
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, f"loss did not fall: first 3 mean {first:.3f}, last 3 mean {last:.3f}"
    same = resumed == losses[half:]
    check.numbers["training"] = dict(losses=losses, resumed=resumed, bitwise_resume=same)
    assert same, f"resume differs: straight {losses[half:half + 5]} vs resumed {resumed[:5]}"
    text = (f"{shape['arch']} MABN (b = 2 in N = {shape['batch']}, window 4, warmup 10, r from 20), AMP {amp_dtype}, "
            f"channels_last, one fixed batch, {steps} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f} (first/last 3 mean "
            f"{first:.3f} / {last:.3f}); a reload after step {half} repeats steps {half + 1}-{steps} bitwise: {same}.\n")
    if nondeterministic:
        text += "\nOps without a deterministic implementation (warned):\n" + "".join(f"- {m}\n" for m in nondeterministic)
    return text


# -- train.compile with CUDA graphs -----------------------------------------------------------------
PROBE_STEPS, PROBE_PHASES = 10, dict(warmup=3, renorm_start=6, window=2)  # t < 3 warmup, 3..6 averaging, t > 6 r on


def compile_probe(device: str, norm: str, mode: str, backend: str, norm_batch: int | None = None) -> dict:
    """Eager and `compile_model(mode)` copies of a small centered-conv net trained side by side in float64
    on the same batches through MABN's three phases; what the compiled copy did differently.

    A real batch of 2 (one group: the layers' batch-norm-kernel path), or with `norm_batch` two groups of
    it (ghost batches, as in the paper's figure: the layers' own group path).
    float64, so that a wrong value (a buffer read after a CUDA-graph replay overwrote it, a gradient from
    a stale buffer) stands out from rounding (~1e-13 here; float32 at b = 2 parts after a few steps)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    conv = CenConv2d if norm == "mabn" else torch.nn.Conv2d
    options = dict(PROBE_PHASES) if norm == "mabn" else {}
    if norm_batch is not None:
        options["norm_batch"] = norm_batch
    batch = 2 if norm_batch is None else 2 * norm_batch
    net = torch.nn.Sequential(conv(3, 16, 3, padding=1), build_norm(norm, 16, **options), torch.nn.ReLU(),
                              conv(16, 16, 3, padding=1), build_norm(norm, 16, **options), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    net = net.to(device, torch.float64).train()
    eager = copy.deepcopy(net)
    counters.clear()
    compiled = compile_model(net, mode=mode, backend=backend)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, net)]
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(PROBE_STEPS):
        x = torch.randn(batch, 3, 8, 8, generator=gen, dtype=torch.float64).to(device)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        pair = []
        for model, opt in zip((eager, compiled), opts):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pair.append(loss.item())
        worst = max(worst, abs(pair[1] - pair[0]) / abs(pair[0]))
    state = max(((a.double() - b.double()).abs().max() / a.double().abs().max().clamp(min=1e-30)).item()
                for a, b in zip(eager.state_dict().values(), net.state_dict().values()))
    return dict(loss_rel=worst, state_rel=state, graphs=counters["stats"]["unique_graphs"],
                graph_breaks=sum(counters["graph_break"].values()),
                cudagraph={k: v for k, v in counters["inductor"].items() if "cudagraph" in k})


# (norm, norm_batch): a real batch of 2, and ghost batches of 2 in a batch of 4. The ghost rows guard the
# layers' group path, whose gradients torch 2.11's compile zeroed while the one-group path was right
# (pytorch/pytorch#180642; `norms._groups.as_output`).
PROBES = (("bn", None), ("mabn", None), ("bn", 2), ("mabn", 2))


def probe_key(norm: str, norm_batch: int | None) -> str:
    """`norm`, or `norm/b2` for ghost batches: the probe's name in rows, `--probe` and the json."""
    return norm if norm_batch is None else f"{norm}/b{norm_batch}"


def probe_mode(check: Check) -> str:
    return "default" if check.dry else "reduce-overhead"


def start_probes(check: Check) -> None:
    """Start `compile_probe` for each norm in a child process of its own, and the compile tests, now: they
    run while the correctness sections run (none of them is timed), and a crash there (CUDA graphs have segfaulted on
    buffers fed back, pytorch/pytorch#192748) becomes a row of the report instead of the end of the check."""
    for norm, norm_batch in PROBES:
        key = probe_key(norm, norm_batch)
        # children=8: small nets, a few kernels each, beside section 10's compiles (start_warm_compiles)
        check.probes[key] = start_child(check, "--probe", f"{key}:{probe_mode(check)}", children=8)
    # The CPU tests of train.compile (every norm, graphs per phase, losses as eager's; DDP and SyncBN on two processes)
    # on this machine's torch, which is not the one CI runs: torch 2.11 got the gradients of the layers' group
    # path and of SyncBN's collective wrong there. The dry run starts a quick one, to show that it runs.
    check.compile_tests = start_pytest(["tests/test_compile.py", "tests/test_distributed.py"],
                                       "mode_is_checked" if check.dry else "compile or syncbn")


def finish_probe(check: Check, key: str) -> dict:
    child = check.probes.pop(key)
    stdout, stderr, stopped = check.wait(child, timeout=600)
    notes = sorted({line.strip()[:160] for line in stderr.splitlines() if "cudagraph" in line.lower()})
    if stopped:  # a tiny net still compiling has hung, or the budget ended: treated as a crash (not timed in section 10)
        return dict(crashed=True, error="still running when the wait ended, stopped", notes=notes)
    return dict(child_result(child, stdout, stderr), notes=notes)


def compiled_phases(check: Check) -> str:
    """`train.compile` through MABN's phases (BN beside it), as the launch-bound real batch of 2 would run it:
    with CUDA graphs (`reduce-overhead`) on the device; the dry run traces with AOTAutograd, no code generation."""
    mode = probe_mode(check)
    if not check.probes:
        start_probes(check)
    try:
        tests, failed = finish_pytest(check, "compile_tests", check.compile_tests), []
    except AssertionError as err:
        tests, failed = f"```\n{err}\n```\n", ["the compile tests failed on this torch"]
    rows = []
    for norm, norm_batch in PROBES:
        key = probe_key(norm, norm_batch)
        result = finish_probe(check, key)
        check.numbers.setdefault("compile_probe", {})[f"{key}:{mode}"] = result
        if "error" in result:
            result["failed"] = result["error"]
            rows.append([key, mode, "-", "-", "-", "-", result["error"]])
            failed.append(f"{key} {result['error']}")
            continue
        skips = result["cudagraph"].get("cudagraph_skips", 0)
        rows.append([key, mode, f"{result['loss_rel']:.1e}", f"{result['state_rel']:.1e}", str(result["graphs"]),
                     str(skips) if check.device.startswith("cuda") else "-", "; ".join(result["notes"][:3]) or "-"])
        wrong = []
        if result["loss_rel"] > 1e-9 or result["state_rel"] > 1e-9:
            wrong.append(f"differs from eager (loss {result['loss_rel']:.1e}, state {result['state_rel']:.1e})")
        if result["graph_breaks"] or result["graphs"] > (3 if norm == "mabn" else 1):
            wrong.append(f"{result['graphs']} graphs, {result['graph_breaks']} graph breaks")
        if wrong:
            result["failed"] = "; ".join(wrong)
            failed.append(f"{key}: {result['failed']}")
    text = (f"Two convs (centered for MABN) + {{BN, MABN}} + linear, a real batch of 2 at 8 px (`/b2`: ghost batches of 2 in "
            f"a batch of 4), float64, eager and `compile_model(mode="
            f"{mode!r})` side by side for {PROBE_STEPS} SGD steps on the same batches (MABN: warmup to t = 3, averaging, "
            f"r from t = 7: three graphs); largest relative difference of a step's loss and of any state entry, "
            f"graphs compiled, CUDA-graph skips and inductor's notes on them:\n\n")
    text += markdown_table(["norm", "mode", "loss rel. diff", "state rel. diff", "graphs", "cudagraph skips", "notes"], rows)
    text += f"\nThe CPU tests of `train.compile` on this machine's torch {torch.__version__}:\n\n{tests}"
    assert not failed, "; ".join(failed)
    return text


# -- syncs ------------------------------------------------------------------------------------------
# Why each device-to-host sync left in the trainer's step stays, by the function that makes it (the innermost of its
# stack that is named here); engine.train_one_epoch's docstring lists the same. Any other sync in the trainer's step
# fails section 8.
SYNC_REASONS = {
    "agree": "per micro-batch: the loss must be known finite before backward (MABN's backward would write NaN "
             "into its Psi ring); the stop/checkpoint flags share this one read",
    "_maybe_opt_step": "per optimizer step, float16 AMP: GradScaler reads its inf flag to skip an overflowed step",
    "push": "CPU only (no device there): LatestLoss reads the loss directly",
    "epoch_loss": "once an epoch, at its end: the epoch's mean loss (a collective)",
    "synchronize": "once an epoch, at its end: the epoch's wall time for its throughput",
    "set_sync_debug_mode": "made outside any Python call (autograd's backward thread), so reported when the mode is "
                           "switched off: see the bare step's table for the norm that makes it",
}
EPOCH_END = {"epoch_loss", "synchronize"}  # in train_one_epoch after its last step: not counted as a step's


class EmulatedSyncs(TorchDispatchMode):
    """On CPU, where `torch.cuda.set_sync_debug_mode` reports nothing: warn as it would at each host read
    (`.item()`, `bool(tensor)`, `.tolist()`), so that the dry run runs the same capture and classification."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            warnings.warn("called a synchronizing CUDA operation (emulated on CPU: a host read)", stacklevel=2)
        return func(*args, **(kwargs or {}))


def capture_syncs(device: str, fn) -> list[list[traceback.FrameSummary]]:
    """The Python stack of every device-to-host sync `fn()` makes (sync debug mode's warnings on CUDA)."""
    stacks = []

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            stacks.append(traceback.extract_stack()[:-1])

    with warnings.catch_warnings():  # restores showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = show
        if device.startswith("cuda"):
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            with EmulatedSyncs():
                fn()
    return stacks


def sync_site(stack: list[traceback.FrameSummary]) -> tuple[str, str]:
    """(where: file:function:line of the innermost frame, the reason's key or "" when none is known)."""
    machinery = ("warnings.py", "_python_dispatch.py", "eval_frame.py", "_compile.py")  # warnings, dynamo's wrappers
    frames = [f for f in stack if not f.filename.endswith(machinery) and f.name != "__torch_dispatch__"]  # (EmulatedSyncs)
    inner = frames[-1]
    key = next((f.name for f in reversed(frames) if f.name in SYNC_REASONS), "")
    return f"{pathlib.Path(inner.filename).name}:{inner.name}:{inner.lineno}", key


def trainer_job(check: Check, out: pathlib.Path):
    """The trainer's Job (`mabn.train.Job`) on a generated dataset: MABN ResNet-50 with ghost batches of 2,
    AMP + channels_last, progress bar and TensorBoard scalars every step (the dry run: a toy ResNet-18)."""
    from hydra import compose, initialize_config_dir

    from mabn.data.shapes import generate
    from mabn.distributed import DistInfo
    from mabn.train import CONFIG_DIR, Job

    root = generate(ROOT / ".cache" / "gpu_check" / "shapes64", train_per_class=40, val_per_class=2, size=64, progress=False)
    model = ["model.width=8", "model.stem=small"] if check.dry else ["model=resnet50"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"data.root={root}", "data.generate=null", "data.workers=2", f"data.batch_per_gpu={8 if check.dry else 32}",
            "data.crop_size=56", "data.val_resize=64", *model, "norm=mabn", "norm.norm_batch=2",
            "norm.options.warmup=2", "norm.options.window=2", "norm.options.renorm_start=3",
            "train.amp=true", "train.channels_last=true", f"train.device={check.device}", "train.progress=true",
            "train.log_every=1"])
    torch.manual_seed(0)
    return Job(cfg, DistInfo(device=check.device), out)


TRAINER_WARM, TRAINER_MEASURED = 6, 3  # optimizer steps: past MABN's phases (r from step 3), then measured


def trainer_syncs(check: Check) -> tuple[str, list]:
    """The trainer's own loop (`engine.train_one_epoch`) for TRAINER_MEASURED steady steps under sync capture."""
    import tempfile

    from mabn.engine import Progress, train_one_epoch
    from mabn.stop import StopSignal

    with tempfile.TemporaryDirectory() as tmp:
        job, progress = trainer_job(check, pathlib.Path(tmp)), Progress()
        job.open_logs(progress)
        job.steps_per_epoch = TRAINER_WARM  # where the epoch ends; the next call goes on from there
        train_one_epoch(job, progress, StopSignal())
        job.steps_per_epoch = TRAINER_WARM + TRAINER_MEASURED
        stacks = capture_syncs(check.device, lambda: train_one_epoch(job, progress, StopSignal()))
        job.writer.close()
    counts = collections.Counter(sync_site(stack) for stack in stacks)
    rows = [[where, f"{n} (epoch end)" if key in EPOCH_END else f"{n / TRAINER_MEASURED:.2f}", SYNC_REASONS.get(key, "UNEXPLAINED")]
            for (where, key), n in sorted(counts.items())]
    return markdown_table(["where (file:function:line)", "syncs a step", "why it stays"], rows), rows


def host_syncs(check: Check) -> str:
    """Device-to-host syncs of one steady-state step: a bare step per norm (the model and optimizer alone), and
    the trainer's own step (finiteness check, stop/checkpoint flags, GradScaler, progress bar, TensorBoard)."""
    cuda = check.device.startswith("cuda")
    shape = resnet_shape(check)
    x = torch.randn(shape["batch"], 3, shape["resolution"], shape["resolution"], device=check.device)
    y = torch.randint(0, 1000, (shape["batch"],), device=check.device)
    rows = []
    for norm, kwargs in (("bn", {}), ("brn", {"norm_batch": 2}), ("mabn", {"norm_batch": 2, "warmup": 2, "window": 2})):
        torch.manual_seed(0)
        net = build_model(shape["arch"], norm=norm, num_classes=1000, width=shape["width"], stem=shape["stem"], **kwargs)
        net = net.to(check.device).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()

        for _ in range(4):  # past MABN's warmup, host counters cached
            step()
        check.sync()
        stacks = capture_syncs(check.device, step)
        places = sorted({sync_site(stack)[0] for stack in stacks})
        rows.append([norm, str(len(stacks)), ", ".join(places) or "-"])
    check.numbers["syncs"] = {r[0]: int(r[1]) for r in rows}
    text = ("" if cuda else "No CUDA device: host reads (`.item()`, `bool(tensor)`) stand in for the syncs that "
            "`torch.cuda.set_sync_debug_mode` reports on CUDA.\n\n")
    text += "A bare step (forward, backward, SGD), per norm:\n\n"
    text += markdown_table(["norm", "syncs in one step", "where"], rows)
    table, trainer_rows = trainer_syncs(check)
    check.numbers["trainer_syncs"] = {r[0]: r[1] for r in trainer_rows}
    text += (f"\nThe trainer's step (`engine.train_one_epoch`: MABN, ghost batches of 2, AMP + channels_last, progress "
             f"bar, TensorBoard every step), {TRAINER_MEASURED} steady steps after {TRAINER_WARM}:\n\n{table}")
    unexplained = [r[0] for r in trainer_rows if r[2] == "UNEXPLAINED"]
    assert not unexplained, f"syncs without a known reason in the trainer's step: {', '.join(unexplained)}\n\n{text}"
    return text


# -- speed ------------------------------------------------------------------------------------------
def norm_speed(check: Check) -> str:
    # eager kernels only: the layer's `kernel=compiled` variant was slower than eager on the H100 (2026-11-27)
    # and its compiles cost the time section 10's train.compile rows need
    finish_warm_compiles(check)  # the first timed section: no child competes for the host's cores
    text, numbers = bench_norms.run(check.device, quick=check.dry, compiled=False)
    check.numbers["norm_layers"] = numbers
    return text


STEP_BATCHES = (32, 2)  # N of the ResNet-50 step table: the paper's batch and a real batch of 2


def parse_compile_steps(text: str) -> tuple:
    """`--compile-steps` "2:default,32:reduce-overhead" -> ((2, "default"), (32, "reduce-overhead"))."""
    items = []
    for item in filter(None, text.split(",")):
        batch, _, mode = item.partition(":")
        if batch not in {str(n) for n in STEP_BATCHES} or mode not in MODES:
            raise ValueError(f"--compile-steps item {item!r} is not valid; valid: N:MODE with N 32 or 2 and MODE one of "
                             f"{', '.join(MODES)}, comma-separated (or empty for none)")
        items.append((int(batch), mode))
    return tuple(items)


STEP_VARIANTS = {"bn": dict(norm="bn"), "gn": dict(norm="gn"), "brn": dict(norm="brn"),
                 "mabn": dict(norm="mabn", **bench_models.STEADY)}  # MABN past its warmup: averages and r on


def step_inputs(check: Check, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch for the step table's N (`batch`, toy sizes in the dry run): channels_last images, labels."""
    shape, n = resnet_shape(check), batch if not check.dry else {32: 8, 2: 2}[batch]
    x = torch.randn(n, 3, shape["resolution"], shape["resolution"], device=check.device).to(memory_format=torch.channels_last)
    return x, torch.randint(0, 1000, (n,), device=check.device)


def step_fn(check: Check, kwargs: dict, x: torch.Tensor, y: torch.Tensor, mode: str | None = None):
    """One AMP training step of a fresh ResNet (`kwargs` for build_model), `compile_model(mode=mode)` unless None.
    The dry run traces with the eager backend: the same hooks and phases, no code generation."""
    shape = resnet_shape(check)
    torch.manual_seed(0)
    net = build_model(shape["arch"], num_classes=1000, width=shape["width"], stem=shape["stem"], **kwargs)
    net = net.to(check.device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=check.device.startswith("cuda"))
    if mode is not None:
        net = compile_model(net, mode=mode, backend="eager" if check.dry else "inductor")
    return lambda: amp_step(net, opt, scaler, x, y, check.device)


WARM_TIMEOUT_S = 300  # the longest wait for one of them once the check needs the host's cores back


def start_warm_compiles(check: Check) -> None:
    """Compile each `train.compile` row of the step table once, in a child process of its own, while the
    correctness sections run. Inductor keeps what it compiles in on-disk caches (FX graphs, AOTAutograd, Triton
    kernels) that the check's own process then reads, so section 10 pays a cache load instead of a compile.
    Measured through these functions with inductor on a 2-core CPU (a narrow ResNet-18, first step cold / warm):
    BN 32 / 10 s, MABN 45 / 15 s on torch 2.11; 26 / 1.3 s and 36 / 8 s on 2.14. A child killed by a signal is
    also a warning: the same model would take the check down with it, so section 10 leaves that row out."""
    keys = [f"{norm}:{batch}:{mode}" for batch, mode in check.compile_steps for norm in ("bn", "mabn")]
    for key in keys:
        check.warm[key] = start_child(check, "--warm-compile", key, children=len(keys))


def warm_compile(check: Check, key: str) -> dict:
    """`--warm-compile NORM:N:MODE`'s child: the step table's model compiled by one step; its wall time."""
    norm, batch, mode = key.split(":")
    x, y = step_inputs(check, int(batch))
    return {"seconds": wall(step_fn(check, STEP_VARIANTS[norm], x, y, mode), check.device)}


def finish_warm_compiles(check: Check) -> None:
    """Wait for `start_warm_compiles`'s children (before anything is timed: they would share the host's cores);
    each one's first-step seconds, or how it ended, in check.numbers["warm_compile"]."""
    for key, child in list(check.warm.items()):
        # a hung child must not hold the check: stopped, not a crash, its row compiles in the check's own process
        waited = time.monotonic()
        stdout, stderr, stopped = check.wait(child, timeout=WARM_TIMEOUT_S)
        waited = time.monotonic() - waited
        del check.warm[key]
        result = (dict(error=f"still compiling after {waited:.0f} s more, stopped") if stopped
                  else child_result(child, stdout, stderr))
        check.numbers.setdefault("warm_compile", {})[key] = result


def step_speed(check: Check) -> str:
    shape, cuda = resnet_shape(check), check.device.startswith("cuda")
    amp_dtype = torch.float16 if cuda else torch.bfloat16
    finish_warm_compiles(check)
    warm = check.numbers.get("warm_compile", {})
    rows = []
    for batch in STEP_BATCHES:
        if spent := check.spent():  # N = 32 took the rest of the budget: N = 2 is named, not timed
            rows.append([str(batch), "all", "skipped", spent, "-", "-"])
            continue
        # train.compile (torch.compile of the whole model) where --compile-steps asks (default: both N, since on an
        # H100 eager steps are bound by the host's launches at N = 32 too); compiled beforehand (start_warm_compiles).
        compiled, failures = {}, {}
        for n_asked, mode in check.compile_steps:
            for norm in ("bn", "mabn") if n_asked == batch else ():
                name = f"{norm} train.compile{'' if mode == 'default' else ' ' + mode}"
                compiled[name] = (mode, STEP_VARIANTS[norm])
                probe = check.numbers.get("compile_probe", {}).get(f"{norm}:{mode}", {})  # section 7
                child = warm.get(f"{norm}:{batch}:{mode}", {})
                if probe.get("crashed"):  # it would take the whole check down with it
                    failures[name] = f"not run: the process crashed in the compile probe ({probe['error']})"
                elif child.get("crashed"):
                    failures[name] = f"not run: the process compiling it beforehand crashed ({child['error']})"
                elif probe.get("failed") and mode != "default":  # time the default mode instead
                    failures[name] = f"not timed: failed the compile probe ({probe['failed']})"
                    compiled[f"{norm} train.compile (default: {mode} failed the probe)"] = ("default", STEP_VARIANTS[norm])
        todo = {**STEP_VARIANTS, **{name: kwargs for name, (_, kwargs) in compiled.items()}}
        x, y = step_inputs(check, batch)
        n, fns = x.shape[0], {}
        for name, kwargs in todo.items():
            if name in failures:
                continue
            if name in compiled:
                # compiled by compare's warm-up call; named first, so that a crash there shows which
                print(f"   N = {n}: {name} compiles on its first step", file=sys.stderr, flush=True)
            fns[name] = step_fn(check, kwargs, x, y, compiled[name][0] if name in compiled else None)
        warmups = {}
        times = compare(fns, check.device, failures=failures, warmups=warmups, **check.timing())
        if "bn" not in times:
            raise RuntimeError(f"N = {n}: eager BN, the baseline, failed: {failures['bn']}")
        for name in todo:
            if name in failures:
                rows.append([str(n), name, "FAILED", failures[name], "-", "-"])
                check.numbers[f"step_{name.replace(' ', '_')}_n{n}_failed"] = failures[name]
                continue
            t = times[name]
            ops = "-" if name in compiled else str(kernel_calls(fns[name]))  # launches bound the real batch of 2
            # the first step's wall time: for the `train.compile` rows, compiling (what they cost the check's 8 minutes)
            rows.append([str(n), name, f"{n / t:.1f}", f"{t / times['bn']:.2f}", ops, f"{warmups[name]:.1f}"])
            check.numbers[f"step_{name.replace(' ', '_')}_n{n}_over_bn"] = t / times["bn"]
            check.numbers[f"step_{name.replace(' ', '_')}_n{n}_first_step_s"] = warmups[name]
    text = (f"{shape['arch']} at {shape['resolution']} px, AMP ({amp_dtype}) + channels_last, forward + backward + SGD step "
            f"(targets MABN / BN <= 1.10 at N = 32, <= 1.25 at N = 2; `train.compile` rows: --compile-steps "
            f"{','.join(f'{b}:{m}' for b, m in check.compile_steps) or '(none)'}; time / BN against eager BN):\n\n")
    text += markdown_table(["N", "norm", "images/s", "time / BN", "ops", "first step s"], rows)
    if warm:
        text += ("\nCompiled first in child processes while the correctness sections ran (their first step, s; on the "
                 "device the `first step s` above then loads inductor's caches): "
                 + ", ".join(f"{key} {r['seconds']:.1f}" if "seconds" in r else f"{key} {r['error']}" for key, r in warm.items())
                 + "\n")
    if spent := check.spent():
        return text + f"\nHost time of `train.compile`'s hooks: skipped, {spent}\n"
    hook_text, hook_numbers = bench_models.compile_hook_table(check.device, check.dry)  # this host's share of a graphed step
    check.numbers.update(hook_numbers)
    return text + "\n" + hook_text


def bn_throughput(check: Check) -> str:
    shape, cuda = resnet_shape(check), check.device.startswith("cuda")
    batch = 16 if check.dry else 256
    torch.backends.cudnn.benchmark = True
    net = build_model(shape["arch"], norm="bn", num_classes=1000, width=shape["width"], stem=shape["stem"])
    net = net.to(check.device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    x = torch.randn(batch, 3, shape["resolution"], shape["resolution"], device=check.device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=check.device)

    t = compare({"bn": lambda: amp_step(net, opt, scaler, x, y, check.device)}, check.device, **check.timing(2.0))["bn"]
    rate = batch / t
    check.numbers["bn_b256_img_per_s"] = rate
    return (f"{shape['arch']} BN, batch {batch}, AMP + channels_last: **{rate:.0f} img/s** "
            f"(NVIDIA DeepLearningExamples, A100 80GB, same model and batch, AMP: {NVIDIA_A100_RN50_AMP} img/s; "
            f"ratio {rate / NVIDIA_A100_RN50_AMP:.2f}).\n")


def inference_speed(check: Check) -> str:
    shape = resnet_shape(check)
    batch = 8 if check.dry else 64
    x = torch.randn(batch, 3, shape["resolution"], shape["resolution"], device=check.device)
    nets = {}
    for norm in ("bn", "mabn", "gn", "ln", "in"):
        torch.manual_seed(0)
        nets[norm] = build_model(shape["arch"], norm=norm, num_classes=1000, width=shape["width"], stem=shape["stem"])
        nets[norm] = nets[norm].to(check.device).eval()
    nets["bn"] = fold_norms(nets["bn"])
    nets["mabn folded"] = fold_norms(nets.pop("mabn"))
    with torch.no_grad():
        times = compare({k: (lambda net=net: net(x)) for k, net in nets.items()}, check.device, **check.timing())
    rows = []
    for name, t in times.items():
        paper = PAPER_INFERENCE[name]
        rows.append([name, f"{batch / t:.0f}", f"{times['bn'] / t:.2f}", f"{paper:.2f}", f"{paper / PAPER_INFERENCE['bn']:.2f}"])
        check.numbers[f"infer_{name.replace(' ', '_')}_rel_bn"] = times["bn"] / t
    text = f"{shape['arch']} eval at batch {batch}, {shape['resolution']} px, float32 (BN and MABN folded into the convs):\n\n"
    return text + markdown_table(["model", "images/s", "speed / BN", "paper it/s", "paper speed / BN"], rows)


LOADER_WORKERS = 16


def loader_speed(check: Check) -> str:
    from scripts.bench import bench_loaders

    # the 16 workers (a GPU node feeds each GPU from many cores); the dry run stays at 2 (this machine's cores)
    workers = 2 if check.dry else min(LOADER_WORKERS, os.cpu_count() or 1)
    text, numbers = bench_loaders.run(check.device, quick=check.dry, workers=workers)
    check.numbers["loaders"] = numbers
    return text


BUDGET_S = 480.0  # the 8 minutes on one GPU; the device call's own limit should leave a minute beyond it

SECTIONS = [
    ("Environment", environment),
    ("Correctness: float64 reference tests on the device", reference_tests),
    ("Correctness: GN, LN, IN against torch", group_norms_match_torch),
    ("Correctness: MABN under float16/bfloat16 autocast", mabn_autocast),
    ("Correctness: folding", folding),
    ("Correctness: 30 training steps, AMP + channels_last, bitwise resume", training_and_resume),
    ("Correctness: train.compile through MABN's phases, with CUDA graphs", compiled_phases),
    ("Device-to-host syncs in one training step", host_syncs),
    ("Speed: norm layers, training forward + backward", norm_speed),
    ("Speed: ResNet-50 training step per norm", step_speed),
    ("Speed: BN at batch 256 against NVIDIA's published number", bn_throughput),
    ("Speed: inference, the paper's throughput table", inference_speed),
    ("Speed: input pipelines", loader_speed),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for gpu_check.md and gpu_check.json (required)")
    parser.add_argument("--dry-run", action="store_true", help="run everything on CPU at toy sizes")
    parser.add_argument("--only", help="comma-separated section numbers (1-based) to run")
    parser.add_argument("--budget", type=float,
                        help=f"seconds the check may take (default {BUDGET_S:.0f} on the device, the issue's 8 minutes; "
                             "none in the dry run): no section starts after them, child processes are not waited for past them")
    parser.add_argument("--compile-steps", default="32:reduce-overhead,2:reduce-overhead",
                        help="train.compile rows of the ResNet-50 step table, N:MODE comma-separated "
                             f"(N 32 or 2; MODE {', '.join(MODES)}); default both N with CUDA graphs (a norm that fails "
                             "section 7's probe in that mode is timed in the default mode), empty for none")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # KEY:MODE (probe_key), one compile_probe as a JSON line (start_probes's child)
    parser.add_argument("--warm-compile", help=argparse.SUPPRESS)  # NORM:N:MODE, start_warm_compiles's child
    args = parser.parse_args()
    if args.warm_compile:
        print(json.dumps(warm_compile(Check("cpu" if args.dry_run else "cuda:0", args.dry_run, ()), args.warm_compile)))
        return 0
    if args.probe:
        key, mode = args.probe.split(":")
        norm, _, ghost = key.partition("/b")
        device, backend = ("cpu", "aot_eager_decomp_partition") if args.dry_run else ("cuda:0", "inductor")
        torch._logging.set_logs(perf_hints=True)  # inductor says there why it skips CUDA graphs
        print(json.dumps(compile_probe(device, norm, mode, backend, int(ghost) if ghost else None)))
        return 0
    if not args.out:
        print("error: --out is required: the folder for gpu_check.md and gpu_check.json", file=sys.stderr)
        return 2
    if pathlib.Path(args.out).exists() and not pathlib.Path(args.out).is_dir():  # was a traceback
        print(f"error: --out {args.out} is a file; valid: a folder for gpu_check.md and gpu_check.json", file=sys.stderr)
        return 2
    try:
        compile_steps = parse_compile_steps(args.compile_steps)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device is visible; `python scripts/gpu_check.py --dry-run --out DIR` runs the same code on CPU",
              file=sys.stderr)
        return 2
    if args.budget is not None and not 0 < args.budget < math.inf:
        print(f"error: --budget={args.budget:g} is not valid; valid: a number of seconds > 0", file=sys.stderr)
        return 2
    budget = args.budget if args.budget is not None else math.inf if args.dry_run else BUDGET_S
    only = None
    if args.only:
        try:
            only = {int(k) for k in args.only.split(",")}
        except ValueError:
            only = set()
        if not only or not only <= set(range(1, len(SECTIONS) + 1)):
            print(f"error: --only={args.only!r} is not valid; valid: comma-separated numbers 1-{len(SECTIONS)}", file=sys.stderr)
            return 2
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check("cpu" if args.dry_run else "cuda:0", args.dry_run, compile_steps, budget)
    started = time.time()
    if budget < math.inf:
        faulthandler.dump_traceback_later(budget + 30, exit=False)  # a hang prints where it hangs
    source = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True).stdout.strip()
    section_of = {fn: index for index, (_, fn) in enumerate(SECTIONS, 1)}
    if only is None or section_of[compiled_phases] in only:
        start_probes(check)  # they compile beside sections 1-6
    step_section = section_of[step_speed]
    if only is None or step_section in only and min(only) < step_section:  # something to run beside them
        start_warm_compiles(check)
    try:
        for index, (title, fn) in enumerate(SECTIONS, 1):
            if only is None or index in only:
                check.section(title, lambda fn=fn: fn(check))
                summary = write_report(out, check, source, started)  # after each section: a crash keeps what ran
    finally:
        check.stop_children()
        faulthandler.cancel_dump_traceback_later()
    print("\n".join(check.sections))
    print(summary)
    return 0 if all(row[1] == "ok" for row in check.summary) else 1


def write_report(out: pathlib.Path, check: Check, source: str, started: float) -> str:
    """DIR/gpu_check.md and .json with the sections run so far; returns the summary table."""
    summary = markdown_table(["section", "result", "time"], check.summary)
    head = (f"# GPU check\n\n{datetime.datetime.now():%Y-%m-%d %H:%M}, {check.numbers.get('environment', {}).get('gpu', check.device)}, "
            f"torch {torch.__version__}, commit {source or 'unknown'}, {time.time() - started:.0f} s"
            f"{' (dry run on CPU, toy sizes)' if check.dry else ''}.\n\n{summary}\n")
    (out / "gpu_check.md").write_text(head + "\n".join(check.sections))
    (out / "gpu_check.json").write_text(json.dumps({"summary": check.summary, **check.numbers}, indent=1, default=str))
    return summary


if __name__ == "__main__":
    sys.exit(main())
