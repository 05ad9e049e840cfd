"""ImageNet scale without ImageNet (`--only scale`, slow, not in `make test`): on a 1.28 M-file tree of links
(scripts/fake_imagenet.py, built once under .cache/fake_imagenet): listing the train split as torchvision's
ImageFolder does vs mabn's FileIndex (scan, then cached), the memory of the file list, and ResNet-50
checkpoint save/load."""
import gc
import pathlib
import subprocess
import sys
import tempfile
import time
import tracemalloc

import torch

from mabn.checkpoint import atomic_save
from mabn.data.folder import class_names
from mabn.data.index import FileIndex, load_index
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


def timed(fn):
    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    current = tracemalloc.take_snapshot().statistics("filename")
    held = sum(stat.size for stat in current)
    tracemalloc.stop()
    return result, seconds, held, peak


def run(device: str, quick: bool = False) -> tuple[str, dict]:
    from torchvision.datasets import ImageFolder

    root = fake_imagenet(quick)
    split = root / "train"
    classes = class_names(split)
    rows, numbers = [], {}
    with tempfile.TemporaryDirectory() as cache:
        for name, fn in (
            ("torchvision ImageFolder (list of tuples)", lambda: ImageFolder(split).samples),
            ("mabn FileIndex, first scan (then cached)", lambda: load_index(split, classes, cache)),
            ("mabn FileIndex, cached (every other rank and run)", lambda: load_index(split, classes, cache)),
        ):
            result, seconds, held, peak = timed(fn)
            rows.append([name, f"{len(result):,}", f"{seconds:.1f}", f"{held / 2**20:.0f}"])
            numbers[name] = dict(seconds=seconds, held_mib=held / 2**20)
            del result
    net = resnet50("mabn")
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "ckpt.pt"
        state = {"model": net.state_dict(), "optimizer": torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9).state_dict()}
        start = time.perf_counter()
        atomic_save(state, path)
        save = time.perf_counter() - start
        start = time.perf_counter()
        torch.load(path, weights_only=True)
        load = time.perf_counter() - start
        size = path.stat().st_size
    numbers["checkpoint"] = dict(save_s=save, load_s=load, mib=size / 2**20)
    text = f"Train split of {root.name} ({len(classes)} classes), listed in one process:\n\n"
    text += markdown_table(["file list", "files", "seconds", "Python heap held (MiB)"], rows)
    text += f"\nResNet-50 (MABN) checkpoint, model + SGD state: {size / 2**20:.0f} MiB, save {save:.2f} s (fsynced), load {load:.2f} s.\n"
    return text, numbers
