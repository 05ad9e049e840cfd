"""Multi-process behaviour on CPU with gloo: DDP with per-process norm statistics, SyncBN, evaluation, launch."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mabn.distributed import DistInfo, closing_process_group, running_stat_buffers

from .conftest import ROOT, train_command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    with closing_process_group():  # as training does
        fn(rank, world, *args)


def run_ranks(fn, *args, world=2):
    """`fn(rank, world, *args)` on `world` gloo processes; a rank that raises or dies fails the test."""
    mp.start_processes(_worker, args=(world, free_port(), fn, args), nprocs=world, start_method="spawn")


def _gloo_threads() -> list[str]:
    """The names of this process's gloo threads (Linux: /proc), e.g. `pt_gloo_runloop`."""
    names = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
    return [name for name in names if "gloo" in name]


def _named_gloo_threads(timeout: float = 10.0) -> list[str]:
    """`_gloo_threads()` once there are any: torch 2.11's name themselves about 50 ms after init_process_group
    returns (read at once, 10 of 15 runs there found none)."""
    deadline = time.monotonic() + timeout
    while not (names := _gloo_threads()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return names


def _dynamo_after_init_worker(rank, world, out):
    import torch._dynamo  # noqa: F401  after init, as a worker that compiles first imports it

    assert _named_gloo_threads(), "the check below would pass vacuously"
    with closing_process_group():  # as a run ends (the one around this worker then finds no group)
        pass
    (out / f"threads{rank}.json").write_text(json.dumps(_gloo_threads()))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names read from /proc")
def test_destroying_the_group_ends_its_gloo_threads_when_dynamo_was_imported_after_init(tmp_path):
    # Why they could outlive it: the import at the top of mabn/distributed.py (without it, 3 SyncBN test runs
    # in 190 aborted a rank at exit; with it, 0 in 100).
    run_ranks(_dynamo_after_init_worker, tmp_path)
    assert [json.loads((tmp_path / f"threads{rank}.json").read_text()) for rank in (0, 1)] == [[], []]


def _job(root, out, rank, world, norm):
    from hydra import compose, initialize_config_dir

    from mabn.train import Job

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"data.root={root}", "data.generate=null", "data.workers=0", "data.batch_per_gpu=4", "norm.norm_batch=2",
            "data.crop_size=24", "data.val_resize=28", "model.width=8", f"norm={norm}", "train.progress=false",
            "norm.options.warmup=2" if norm == "mabn" else "seed=0", "norm.options.window=2" if norm == "mabn" else "seed=0",
        ])
    torch.manual_seed(rank)
    return Job(cfg, DistInfo(rank, world, 0, "cpu"), out)


def _train_steps_worker(rank, world, root, out, norm):
    from mabn.engine import Progress, evaluate, train_one_epoch
    from mabn.stop import StopSignal

    job = _job(root, out / f"rank{rank}", rank, world, norm)
    progress, records = Progress(), []
    for steps in (1, 2, 3):
        job.steps_per_epoch = steps  # where the epoch ends (read by train_one_epoch); each call goes on by one step
        train_one_epoch(job, progress, StopSignal())
        assert progress.step == steps
        params = [p.detach().clone() for p in job.net.parameters()]
        buffers = {k: v.clone() for k, v in running_stat_buffers(job.net).items()}
        gathered = [None] * world
        dist.all_gather_object(gathered, (params, buffers))
        records.append(gathered)
    before = {k: v.clone() for k, v in job.net.state_dict().items()}
    val = evaluate(job.net, job.loaders.val, job.info)
    after = job.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "evaluation must leave the per-rank buffers"
    from mabn.distributed import rank_averaged_running_stats

    averaged = rank_averaged_running_stats(job.net, job.info)
    if rank == 0:
        torch.save(dict(records=records, val=val, state=job.net.state_dict(), averaged=averaged), out / "result.pt")


@pytest.mark.parametrize("norm", ["bn", "mabn"])
def test_ddp_parameters_agree_buffers_stay_per_process_eval_covers_val_once(tiny_shapes, tmp_path, norm):
    run_ranks(_train_steps_worker, tiny_shapes, tmp_path, norm)
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    for step, gathered in enumerate(result["records"], start=1):
        (params0, buffers0), (params1, buffers1) = gathered
        assert all(torch.equal(a, b) for a, b in zip(params0, params1)), f"parameters differ after step {step}"
        assert any(not torch.equal(buffers0[k], buffers1[k]) for k in buffers0), "norm buffers must stay per process"

    # Single-process evaluation of the same weights with the rank-averaged statistics: same counts.
    job = _single_job(tiny_shapes, tmp_path, norm)
    state = dict(result["state"])
    state.update(result["averaged"])
    job.net.load_state_dict(state)
    from mabn.engine import evaluate

    single = evaluate(job.net, job.loaders.val, job.info)
    assert result["val"]["val_images"] == single["val_images"] == 30
    assert result["val"]["val_top1_err"] == single["val_top1_err"]
    assert result["val"]["val_top5_err"] == single["val_top5_err"]


def _ddp_compile_worker(rank, world, out, norm):
    import copy

    from mabn.compile import compile_model
    from mabn.distributed import wrap_ddp

    from .test_compile import BACKEND, RENORM_START, WARMUP, WINDOW, tiny_net, train_side_by_side

    options = dict(warmup=WARMUP, renorm_start=RENORM_START, window=WINDOW) if norm == "mabn" else {}
    net = tiny_net(norm, norm_batch=2, **options)  # ghost batches: the layers' own group path
    eager_net = copy.deepcopy(net)
    info = DistInfo(rank, world, 0, "cpu")
    losses = train_side_by_side(wrap_ddp(eager_net, info), compile_model(wrap_ddp(net, info), backend=BACKEND), net,
                                steps=RENORM_START + 4, seed=1 + rank)  # MABN's three phases; each rank its own data
    torch.save(dict(losses=losses, eager=eager_net.state_dict(), compiled=net.state_dict()), out / f"ddp_compile{rank}.pt")


@pytest.mark.parametrize("norm", ["bn", "mabn"])
def test_ddp_with_train_compile_trains_as_eager_ddp(tmp_path, norm):
    """`GPUS>1 train.compile=true`: the compiled model wraps DDP (dynamo steps around DDP's own forward), float64."""
    run_ranks(_ddp_compile_worker, tmp_path, norm)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"ddp_compile{rank}.pt", weights_only=True)
        for step, (eager, compiled) in enumerate(result["losses"], start=1):
            assert compiled == pytest.approx(eager, rel=1e-10), f"rank {rank}, step {step}"
        for name, value in result["eager"].items():
            torch.testing.assert_close(result["compiled"][name], value, rtol=1e-10, atol=1e-12, msg=name)


def _single_job(root, out, norm):
    return _job(root, out / "single", 0, 1, norm)


def _syncbn_worker(rank, world, out, mode):
    from mabn.compile import compile_model
    from mabn.distributed import wrap_ddp
    from mabn.norms import build_norm

    from .test_compile import BACKEND

    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1
    dy = torch.randn_like(x)
    layer = build_norm("syncbn", 3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        layer.bias.copy_(torch.tensor([0.0, -1.0, 1.0]))
    part = x[2 * rank : 2 * rank + 2].clone().requires_grad_(True)
    # compiled: AOTAutograd with inductor's decompositions (tests/test_compile.py); the collective is
    # traced into the graph. torch 2.11 gave wrong gradients there (pytorch/pytorch#180642, norms/syncbn.py)
    # ddp: wrapped as training wraps the model; torch's DDP refused any SyncBatchNorm on CPU (mabn.distributed).
    # It averages the parameters' gradients over the ranks, so their sum below is the same.
    run = dict(eager=lambda: layer, compiled=lambda: compile_model(layer, backend=BACKEND),
               ddp=lambda: wrap_ddp(layer, DistInfo(rank, world, 0, "cpu")))[mode]()
    y = run(part)
    y.backward(dy[2 * rank : 2 * rank + 2])
    grads = torch.stack([layer.weight.grad, layer.bias.grad])
    dist.all_reduce(grads)
    torch.save(dict(y=y.detach(), dx=part.grad, grads=grads, running=(layer.running_mean, layer.running_var)),
               out / f"syncbn{rank}.pt")


@pytest.mark.parametrize("mode", ["eager", "compiled", "ddp"])
def test_syncbn_on_two_ranks_equals_bn_on_the_whole_batch(tmp_path, mode):
    run_ranks(_syncbn_worker, tmp_path, mode)
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    dy = torch.randn_like(x)
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 1.0]))
    y = bn(x)
    y.backward(dy)
    parts = [torch.load(tmp_path / f"syncbn{r}.pt", weights_only=True) for r in (0, 1)]
    tol = dict(rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), **tol)
    torch.testing.assert_close(torch.cat([p["dx"] for p in parts]), x.grad, **tol)
    torch.testing.assert_close(parts[0]["grads"], torch.stack([bn.weight.grad, bn.bias.grad]), **tol)
    torch.testing.assert_close(parts[0]["running"][0], bn.running_mean, **tol)
    torch.testing.assert_close(parts[1]["running"][1], bn.running_var, **tol)


def _launch(port, *overrides):
    return [sys.executable, str(ROOT / "scripts" / "launch.py"), "--cpu", "--gpus", "2", "--master-port", str(port), "--",
            *overrides]


def test_torchrun_job_writes_one_checkpoint_a_single_process_can_load(tiny_shapes, tmp_path):
    overrides = train_command(tiny_shapes, tmp_path)[3:]
    out = subprocess.run(_launch(free_port(), *overrides, "norm=mabn", "data.batch_per_gpu=4"), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dirs = list((tmp_path / "train").iterdir())
    assert len(run_dirs) == 1
    records = [json.loads(line) for line in (run_dirs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in records] == [1, None]  # written once, not once per rank
    assert records[0]["val_images"] == 30
    ckpts = list((run_dirs[0] / "checkpoints").glob("step-*.pt"))
    assert len(ckpts) == 1
    state = torch.load(ckpts[0], weights_only=True)
    assert state["world_size"] == 2 and state["eval_running_stats"]
    from mabn.models import build_model

    model = build_model("resnet18", norm="mabn", num_classes=10, width=8, stem="small", norm_batch=4)
    model.load_state_dict(state["model"])
    # ... and a single process continues the run from it
    cont = subprocess.run(train_command(tiny_shapes, tmp_path, "norm=mabn", "data.batch_per_gpu=4", "schedule.epochs=2",
                                        f"train.resume={ckpts[0]}", "run_name=continued"),
                          capture_output=True, text=True, timeout=300)
    assert cont.returncode == 0, cont.stderr[-2000:]
    # ... but not in its own run dir, as if it were the same run: its SGD batch, lr and shards follow the world size
    same = subprocess.run(train_command(tiny_shapes, tmp_path, "norm=mabn", "data.batch_per_gpu=4"),
                          capture_output=True, text=True, timeout=300)
    assert same.returncode == 2 and "was trained by 2 processes, this run has 1" in same.stderr, same.stderr[-2000:]
    # A job whose ranks refuse its config ends in their error line and one of the launcher's: torchrun's
    # traceback and failure report buried them (exit status 1).
    refused = subprocess.run(_launch(free_port(), *overrides, "norm=mabn", "data.batch_per_gpu=4", "schedule.epochs=2"),
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "was trained with schedule.epochs=1, this run asks for schedule.epochs=2" in refused.stderr
    assert refused.stderr.rstrip().splitlines()[-1] == "error: the job did not start: a rank refused it (its error line is above)"


def test_a_stop_signal_to_a_torchrun_job_checkpoints_every_rank_and_ends_in_one_line(tiny_shapes, tmp_path):
    # As SLURM or `timeout` sends it: to every process of the job, torchrun's agent included.
    overrides = train_command(tiny_shapes, tmp_path, "data.batch_per_gpu=2", "schedule.epochs=20", "data.workers=1",
                              "train.checkpoint_every_steps=1")[3:]
    proc = subprocess.Popen(_launch(free_port(), *overrides), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list(tmp_path.rglob("checkpoints/step-*.pt")):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the stop"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert output.rstrip().splitlines()[-1].startswith("stopped by signal 15: the ranks were asked to checkpoint")
    assert "stop signal 15: checkpoint" in output and "Traceback" not in output, output[-3000:]
    newest = max(tmp_path.rglob("checkpoints/step-*.pt"), key=lambda p: p.name)
    assert torch.load(newest, weights_only=True)["world_size"] == 2


def test_a_sweep_under_torchrun_runs_each_job_on_every_rank(tiny_shapes, tmp_path):
    """`make train PROCS=2 NORM=bn ARGS="-m seed=0,1"`: `-m` after the overrides was Hydra's 'unrecognized arguments'
    in every rank; placed first, the second job's new process group was refused (gloo: connection refused)."""
    overrides = train_command(tiny_shapes, tmp_path, "data.batch_per_gpu=4")[3:]
    out = subprocess.run(_launch(free_port(), *overrides, "-m", "seed=0,1"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for seed in (0, 1):
        run_dir = tmp_path / "train" / f"shapes10-resnet18_cpu-bn-b4-n4-s{seed}"
        assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["event"] == "finished"
        newest = max((run_dir / "checkpoints").glob("step-*.pt"))
        assert torch.load(newest, weights_only=True)["world_size"] == 2


@pytest.mark.parametrize("flags, named", [(["--cpu", "--gpus", "0"], "PROCS=0"), (["--gpus", "0"], "GPUS=0")])
def test_launch_names_the_make_variable_of_a_bad_process_count(flags, named):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "launch.py"), *flags, "--"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip() == f"error: {named} and NODES=1 are not valid; valid: integers >= 1"


def test_launch_refuses_an_unknown_group_option_before_torchrun_starts_the_ranks():
    out = subprocess.run(_launch(free_port(), "-m", "experiment=paper_table_bs2,paper_table_bs3"), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.splitlines() == [
        "error: experiment='paper_table_bs3' is not valid; valid: imagenette_cpu, imagenette_gpu, paper_table_bs2, "
        "paper_table_bs32"], out.stderr[-2000:]  # no torchrun command line, no rank's line


def test_launch_refuses_more_gpus_than_visible_and_a_busy_or_impossible_port():
    if torch.cuda.device_count() < 64:
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "launch.py"), "--gpus", "64", "--"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "GPUS=64 but" in out.stderr and "GPUs are visible" in out.stderr
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(_launch(port), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"MASTER_PORT={port} is in use" in out.stderr
    for port in (0, 99999):
        out = subprocess.run(_launch(port), capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stderr == f"error: MASTER_PORT={port} is not valid; valid: a TCP port in " \
            "1-65535 (default 29500)\n", out.stderr
    addresses = (("", "MASTER_ADDR='' is not valid"), ("nohost.invalid", "MASTER_ADDR=nohost.invalid does not resolve"),
                 ("192.0.2.1", "MASTER_ADDR=192.0.2.1 is not an address of this machine"))  # both said: port in use
    for addr, message in addresses:
        command = _launch(free_port())
        out = subprocess.run([*command[:2], "--master-addr", addr, *command[2:]], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stderr.startswith(f"error: {message}"), out.stderr


def test_the_device_of_a_process_must_be_there(monkeypatch):
    """A SLURM job with more tasks than GPUs per node ended each extra rank in CUDA's 'invalid device ordinal'
    traceback; `train.device=cuda:abc` passed the config check."""
    from mabn.config import ConfigError
    from mabn.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 3) == "cpu" and resolve_device("cpu", 3) == "cpu"
    with pytest.raises(ConfigError, match=r"^train.device='cuda:1' but no CUDA device is visible; valid here: auto or cpu$"):
        resolve_device("cuda:1", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [resolve_device(d, 3) for d in ("auto", "cuda", "cuda:2", "cpu")] == ["cuda:3", "cuda:3", "cuda:2", "cpu"]
    for requested in ("auto", "cuda"):
        with pytest.raises(ConfigError, match=r"^this process has LOCAL_RANK=4 but 4 GPUs are visible: one process per "
                                              r"GPU; valid: .*tasks_per_node = gpus_per_node$"):
            resolve_device(requested, 4)
    with pytest.raises(ConfigError, match=r"^train.device='cuda:4' but 4 GPUs are visible; valid here: cuda:0 to cuda:3"):
        resolve_device("cuda:4", 0)


def test_a_slurm_task_takes_its_gpu_among_the_nodes_gpus():
    """submitit's export narrowed CUDA_VISIBLE_DEVICES to the task's GPU while the trainer took cuda:LOCAL_RANK:
    every task of a node but the first asked for a GPU it could not see."""
    slurm = dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="123", SLURM_NTASKS="8", SLURM_PROCID="7", SLURM_LOCALID="3",
                 SLURM_NODEID="1", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[1-2]", CUDA_VISIBLE_DEVICES="0,1,2,3")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    code = ("import json, os; from mabn.distributed import launched_world_size; n = launched_world_size(); "
            "print(json.dumps([n] + [os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'CUDA_VISIBLE_DEVICES')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**env, **slurm})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [8, "7", "3", "0,1,2,3"]
