"""ImageNet scale without ImageNet (`--only scale`, slow, not in `make test`), on a 1.28 M-file tree of links
(scripts/fake_imagenet.py, built once under .cache/): what grows with the number of files.

- the file list: torchvision's ImageFolder listing vs mabn's FileIndex (scan, then cached), time and memory;
- time from `python -m mabn.train data=imagenet ...` to its first training step (the trainer logs it), for
  1 and 2 gloo processes, both loaders, with the file index cold (first run) and cached;
- resident and proportional memory (RSS, PSS) of the main process and of each of 4 loader workers after the
  first batches and after a long stretch of the epoch, beside the same loader holding the file list as
  ImageFolder does (Python tuples: every worker copies the pages it touches);
- ResNet-50 checkpoint save/load time, size and the memory the save adds;
- the evaluation bookkeeping over 50,000 val images.
"""
import gc
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import torch
from omegaconf import OmegaConf

from mabn.checkpoint import atomic_save
from mabn.data import build_loaders
from mabn.data.folder import class_names
from mabn.data.index import CACHE_DIR, FileIndex, cache_file, load_index
from mabn.data.samplers import EvalSampler
from mabn.distributed import DistInfo
from mabn.engine import FIRST_STEP, evaluate
from mabn.models import resnet50

from .common import markdown_table

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette"


def fake_imagenet(quick: bool) -> pathlib.Path:
    classes, per_class = (100, 100) if quick else (1000, 1281)
    dst = ROOT / ".cache" / f"fake_imagenet_{classes}x{per_class}"
    if not (dst / "val").is_dir():
        pool = ["--pool", str(IMAGENETTE)] if IMAGENETTE.is_dir() else []
        subprocess.run([sys.executable, str(ROOT / "scripts" / "fake_imagenet.py"), "--dst", str(dst), "--classes",
                        str(classes), "--train-per-class", str(per_class), *pool], check=True)
    return dst


def held_mib(files) -> float:
    """Memory the file list holds: its arrays, or its list, tuples and path strings (labels are shared ints)."""
    if isinstance(files, FileIndex):
        return (files.blob.nbytes + files.offsets.nbytes + files.labels.nbytes) / 2**20
    labels = {id(label): sys.getsizeof(label) for _, label in files}
    return (sys.getsizeof(files) + sum(sys.getsizeof(t) + sys.getsizeof(t[0]) for t in files) + sum(labels.values())) / 2**20


# -- the file list ----------------------------------------------------------------------------------
def file_lists(root: pathlib.Path) -> tuple[str, dict]:
    from torchvision.datasets import ImageFolder

    split = root / "train"
    classes = class_names(split)
    rows, numbers = [], {}
    with tempfile.TemporaryDirectory() as cache:
        for name, fn in (
            ("torchvision ImageFolder (list of tuples)", lambda: ImageFolder(split).samples),
            ("mabn FileIndex, first scan (then cached)", lambda: load_index(split, classes, cache)),
            ("mabn FileIndex, cached (every other rank and run)", lambda: load_index(split, classes, cache)),
        ):
            gc.collect()
            start = time.perf_counter()
            files = fn()
            seconds = time.perf_counter() - start
            rows.append([name, f"{len(files):,}", f"{seconds:.1f}", f"{held_mib(files):.0f}"])
            numbers[name] = dict(seconds=seconds, held_mib=held_mib(files))
            del files
    text = f"Train split of {root.name} ({len(classes)} classes), listed in one process:\n\n"
    return text + markdown_table(["file list", "files", "seconds", "memory held (MiB)"], rows), numbers


# -- time to the first training step ----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its ranks in sessions of their own: killing the group misses them)."""
    children = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def first_step_seconds(root: pathlib.Path, loader: str, procs: int, out: pathlib.Path, quick: bool) -> float:
    """Wall seconds from launching the trainer to its log line of the first training step; then it is killed."""
    overrides = ["data=imagenet", f"data.root={root}", f"data.loader={loader}", "data.workers=4", "model=resnet50",
                 "train.device=cpu", f"output_root={out}", "train.progress=false", f"run_name={loader}-{procs}"]
    if quick:
        overrides += ["data.crop_size=64", "data.val_resize=72", "data.batch_per_gpu=8"]
    if procs == 1:
        command = [sys.executable, "-m", "mabn.train", *overrides]
    else:
        command = [sys.executable, "scripts/launch.py", "--cpu", "--gpus", str(procs), "--master-port", str(free_port()),
                   "--", *overrides]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds, tail = None, []
    try:
        for line in proc.stdout:
            tail = (tail + [line])[-30:]
            if FIRST_STEP in line:
                seconds = time.perf_counter() - start
                break
    finally:
        kill_tree(proc)
    if seconds is None:
        raise RuntimeError(f"{' '.join(command)} ended before its first step:\n{''.join(tail)}")
    return seconds


def start_up(root: pathlib.Path, quick: bool) -> tuple[str, dict]:
    rows, numbers = [], {}
    cases = [("torchvision", 1, "cold"), ("torchvision", 1, "cached"), ("torchvision", 2, "cold"),
             ("torchvision", 2, "cached"), ("dali", 1, "cached"), ("dali", 2, "cached")]
    with tempfile.TemporaryDirectory() as tmp:
        for loader, procs, index in cases:
            if index == "cold":  # the cache the trainer uses (.cache/index beside the checkout)
                for split in ("train", "val"):
                    cache_file(root / split, ROOT / CACHE_DIR).unlink(missing_ok=True)
            seconds = first_step_seconds(root, loader, procs, pathlib.Path(tmp) / f"{loader}-{procs}-{index}", quick)
            rows.append([loader, str(procs), index, f"{seconds:.1f}"])
            numbers[f"first_step_{loader}_{procs}procs_{index}_s"] = seconds
            print(f"  first step: {loader}, {procs} process(es), index {index}: {seconds:.1f} s", file=sys.stderr, flush=True)
    size = "ResNet-50, crop 224, batch 32 per process" if not quick else "ResNet-50, crop 64, batch 8 per process"
    text = (f"Time from `python -m mabn.train data=imagenet data.root=<this tree>` (2 processes: `make train PROCS=2`, "
            f"gloo) to its log line of the first training step, {size}, 4 loader workers (DALI: threads) per process; "
            f"`cold`: the file index is built by this run (one scan under a lock, shared by the ranks), `cached`: "
            f"read from `.cache/index/` (every later run):\n\n")
    return text + markdown_table(["loader", "processes", "file index", "seconds to first step"], rows), numbers


# -- loader worker memory ---------------------------------------------------------------------------
def rss_pss_mib(pid: int) -> tuple[float, float]:
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                values[key] = int(rest.split()[0]) / 1024
    return values["Rss"], values["Pss"]


class TupleIndex(list):
    """The file list as `torchvision.datasets.ImageFolder.samples` holds it: a list of (path, label) tuples."""

    def __init__(self, index: FileIndex):
        super().__init__(index[i] for i in range(len(index)))
        self.classes, self.root = index.classes, index.root


def worker_memory(root: pathlib.Path, as_tuples: bool, batches: int, workers: int = 4) -> dict:
    cfg = OmegaConf.load(ROOT / "configs" / "data" / "imagenet.yaml")
    # Small crops: decoding is what costs here, the crop size does not change what the index does to memory.
    cfg.merge_with(dict(root=str(root), workers=workers, batch_per_gpu=64, crop_size=32, val_resize=32, lighting_std=0.0))
    loaders = build_loaders(cfg, 0, 1, 0, "cpu")
    dataset = loaders.train.dataset
    if as_tuples:
        dataset.index = TupleIndex(dataset.index)
    gc.collect()
    loaders.set_epoch(0)
    iterator = iter(loaders.train)
    samples = {}
    for b in range(1, batches + 1):
        next(iterator)
        if b in (10, batches):
            pids = [os.getpid()] + [w.pid for w in iterator._workers]
            samples[b] = [rss_pss_mib(pid) for pid in pids]
    del iterator
    return samples


def memory(root: pathlib.Path, quick: bool) -> tuple[str, dict]:
    batches = 40 if quick else 2500  # 2,500 batches of 64: 160,000 samples, an eighth of the epoch
    rows, numbers = [], {}
    for name, as_tuples in (("mabn FileIndex (arrays)", False), ("list of (path, label) tuples, as ImageFolder", True)):
        started = time.perf_counter()
        samples = worker_memory(root, as_tuples, batches)
        seconds = time.perf_counter() - started
        (main_10, *workers_10), (main_end, *workers_end) = samples[10], samples[batches]
        growth = [end[1] - first[1] for first, end in zip(workers_10, workers_end)]
        rows.append([name, f"{main_10[0]:.0f} / {main_10[1]:.0f}", f"{main_end[0]:.0f} / {main_end[1]:.0f}",
                     ", ".join(f"{w[0]:.0f} / {w[1]:.0f}" for w in workers_10),
                     ", ".join(f"{w[0]:.0f} / {w[1]:.0f}" for w in workers_end), f"{max(growth):.0f}"])
        numbers[f"memory_{'tuples' if as_tuples else 'fileindex'}"] = dict(
            main_first=main_10, main_end=main_end, workers_first=workers_10, workers_end=workers_end,
            max_worker_pss_growth_mib=max(growth), seconds=seconds)
        print(f"  memory, {name}: worker PSS growth up to {max(growth):.0f} MiB ({seconds:.0f} s)", file=sys.stderr, flush=True)
    text = (f"Memory (MiB, RSS / PSS) of the torchvision loader with 4 workers, batch 64 (crop 32: decoding is what "
            f"costs here, the crop size changes nothing in the index), after 10 batches and after {batches:,} "
            f"batches ({batches * 64:,} samples of the epoch's shuffled order); "
            f"the last column is the largest PSS growth of one worker between the two:\n\n")
    header = ["file list", "main, 10 batches", f"main, {batches:,}", "workers, 10 batches", f"workers, {batches:,}",
              "worker PSS growth"]
    return text + markdown_table(header, rows), numbers


# -- checkpoints and evaluation ---------------------------------------------------------------------
def peak_rss_added(fn) -> tuple[float, float]:
    """(seconds, MiB the peak RSS rose above the RSS before `fn`), peak reset through /proc/self/clear_refs."""
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = status("VmRSS")
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, status("VmHWM") - before


def checkpoint() -> tuple[str, dict]:
    net = resnet50("mabn")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()  # momentum buffers exist, as in a training checkpoint
    model_mib = sum(t.numel() * t.element_size() for t in net.state_dict().values()) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "ckpt.pt"
        state = {"model": net.state_dict(), "optimizer": opt.state_dict()}
        save, save_added = peak_rss_added(lambda: atomic_save(state, path))
        size = path.stat().st_size / 2**20
        load, load_added = peak_rss_added(lambda: torch.load(path, weights_only=True))
    numbers = dict(save_s=save, load_s=load, mib=size, model_mib=model_mib, save_peak_added_mib=save_added,
                   load_peak_added_mib=load_added)
    text = (f"ResNet-50 (MABN) checkpoint, model ({model_mib:.0f} MiB) + SGD momentum: {size:.0f} MiB on disk; save "
            f"{save:.2f} s (fsynced), peak memory added {save_added:.0f} MiB; load {load:.2f} s, "
            f"{load_added:.0f} MiB added (the loaded copy).\n")
    return text, {"checkpoint": numbers}


def eval_bookkeeping(quick: bool) -> tuple[str, dict]:
    """`engine.evaluate` over 50,000 labels with a model that costs nothing: what the counting itself costs."""
    total, batch = (5000 if quick else 50_000), 32
    torch.manual_seed(0)
    labels = torch.randint(0, 1000, (total,))
    model = torch.nn.Linear(1, 1000)
    shards = {world: sum(len(EvalSampler(range(total), r, world)) for r in range(world)) for world in (1, 2, 8)}
    loader = [(torch.ones(len(y), 1), y, 0) for y in labels.split(batch)]
    start = time.perf_counter()
    stats = evaluate(model, loader, DistInfo(0, 1, 0, "cpu"))
    seconds = time.perf_counter() - start
    assert stats["val_images"] == total and all(n == total for n in shards.values()), (stats, shards)
    text = (f"Evaluation bookkeeping over {total:,} val images (top-1/5 and loss counted on the device, one "
            f"all-reduce at the end; a model that costs nothing): {seconds:.2f} s, {stats['val_images']:,} counted; "
            f"the val shards of 1, 2 and 8 ranks hold {', '.join(f'{n:,}' for n in shards.values())} images "
            f"(each image once, no padding).\n")
    return text, {"eval_bookkeeping_s": seconds}


def run(device: str, quick: bool = False) -> tuple[str, dict]:
    root = fake_imagenet(quick)
    text, numbers = "", {}
    for part in (lambda: file_lists(root), lambda: start_up(root, quick), lambda: memory(root, quick),
                 checkpoint, lambda: eval_bookkeeping(quick)):
        part_text, part_numbers = part()
        text += part_text + "\n"
        numbers.update(part_numbers)
    return text, numbers
