"""The file list of an ImageNet-layout split, built once per folder and shared: numpy arrays, not Python objects.

At ImageNet's size (1.28 M files) walking the folder costs every rank of every run its start-up time,
and a list of 1.28 M `(path, label)` tuples is copied page by page into every forked loader worker as
reference counts touch it. `FileIndex` holds the relative paths as one byte array with offsets and the
labels as an int array (nothing for a worker to copy), in the order `torchvision.datasets.ImageFolder`
lists them. `load_index` caches it under `.cache/index/`, keyed by the folder and checked against the
modification times of the split and class folders (adding or removing a file changes its folder's), and
builds it under a file lock, so the ranks of a run, and later runs, share one scan.
"""
import hashlib
import json
import os
import pathlib

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from .lock import exclusive

INDEX_VERSION = 1
CACHE_DIR = ".cache/index"  # relative to where training starts (the checkout, for make train)


class FileIndex:
    """`index[i] -> (path, label)` over arrays; `paths` relative to `root` are stored as UTF-8 bytes."""

    def __init__(self, root: pathlib.Path, classes: list[str], blob: np.ndarray, offsets: np.ndarray, labels: np.ndarray):
        self.root, self.classes = pathlib.Path(root), list(classes)
        self.blob, self.offsets, self.labels = blob, offsets, labels
        self.prefix = str(self.root) + os.sep

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return self.prefix + self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode()

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.path(i), int(self.labels[i])

    def file_list(self, indices) -> bytes:
        """`<path relative to root> <label>` lines for `indices`, in that order: a reader's file list (DALI)."""
        blob, offsets = self.blob.tobytes(), self.offsets.tolist()
        suffix = [f" {label}\n".encode() for label in range(len(self.classes))]
        labels = self.labels.tolist()
        return b"".join(blob[offsets[i]:offsets[i + 1]] + suffix[labels[i]] for i in indices)

    def has_whitespace_in_paths(self) -> bool:
        return bool(np.isin(self.blob, np.frombuffer(b" \t\n\r", dtype=np.uint8)).any())

    @classmethod
    def scan(cls, split_dir: pathlib.Path, classes: list[str]) -> "FileIndex":
        """List the split as ImageFolder does: classes in order, folders in sorted order, files sorted,
        image extensions only, links followed."""
        split_dir = pathlib.Path(split_dir)
        names, labels = [], []
        for label, name in enumerate(classes):
            for dirpath, files in sorted(_walk(str(split_dir / name))):
                rel = os.path.relpath(dirpath, split_dir)
                for file in sorted(files):
                    names.append(os.path.join(rel, file).encode())
                    labels.append(label)
        offsets = np.zeros(len(names) + 1, dtype=np.int64)
        np.cumsum([len(n) for n in names], out=offsets[1:])
        blob = np.frombuffer(b"".join(names), dtype=np.uint8).copy()
        return cls(split_dir, classes, blob, offsets, np.asarray(labels, dtype=np.int32))


def _walk(top: str):
    """`(folder, image file names)` for `top` and every folder below it, links followed, as os.walk yields them.

    Unlike os.walk, an entry named like an image is taken for a file without asking the file system: os.walk
    stats every link to learn whether it is a folder, one system call per image in a tree of links."""
    try:
        entries = list(os.scandir(top))
    except OSError:  # os.walk skips unreadable folders too
        return
    files, folders = [], []
    for entry in entries:
        if entry.name.lower().endswith(IMG_EXTENSIONS):
            files.append(entry.name)
        elif entry.is_dir():
            folders.append(entry.path)
    yield top, files
    for folder in folders:
        yield from _walk(folder)


def signature(split_dir: pathlib.Path, classes: list[str]) -> str:
    """What must not change for a cached index to hold: the folder, its classes, their folders' mtimes."""
    stamps = [os.stat(split_dir).st_mtime_ns] + [os.stat(split_dir / name).st_mtime_ns for name in classes]
    return json.dumps([INDEX_VERSION, str(split_dir.resolve()), classes, stamps])


def load_index(split_dir: str | os.PathLike, classes: list[str], cache_dir: str | os.PathLike = CACHE_DIR) -> FileIndex:
    """The split's FileIndex from the cache when it is current, else scanned (once, under a lock) and cached."""
    split_dir = pathlib.Path(split_dir)
    sig = signature(split_dir, classes)
    cache_dir = pathlib.Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        return FileIndex.scan(split_dir, classes)  # read-only place: scan, as ImageFolder would
    cache = cache_file(split_dir, cache_dir)
    with exclusive(cache):  # another rank may be writing it: wait, then read its result
        index = _read(cache, split_dir, classes, sig)
        if index is None:
            index = FileIndex.scan(split_dir, classes)
            staging = cache.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(staging, blob=index.blob, offsets=index.offsets, labels=index.labels, signature=np.array(sig))
            os.replace(staging, cache)
    return index


def cache_file(split_dir: str | os.PathLike, cache_dir: str | os.PathLike = CACHE_DIR) -> pathlib.Path:
    """Where `load_index` keeps the index of `split_dir` (one file per folder, whatever its contents)."""
    key = hashlib.sha1(str(pathlib.Path(split_dir).resolve()).encode()).hexdigest()[:16]
    return pathlib.Path(cache_dir) / (key + ".npz")


def _read(cache: pathlib.Path, split_dir: pathlib.Path, classes: list[str], sig: str) -> FileIndex | None:
    if not cache.is_file():
        return None
    try:
        with np.load(cache) as data:
            if str(data["signature"]) != sig:
                return None
            return FileIndex(split_dir, classes, data["blob"], data["offsets"], data["labels"])
    except (OSError, ValueError, KeyError):  # a damaged cache file is rebuilt
        return None


__all__ = ["FileIndex", "cache_file", "load_index"]
