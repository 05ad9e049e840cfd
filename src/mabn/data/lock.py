"""One writer at a time for what the data package builds on first use and shares: the shapes set, a resized
copy of a dataset, the cached file index of a split.

Two processes started together (the repro driver's lanes, a Hydra multirun, the ranks of a `torchrun` job on
one node) would otherwise build the same thing at once: one deletes the other's staging tree mid-write, or
replaces a folder the other is already reading. The lock is an advisory `flock` on a file beside the target;
whoever gets it second finds the finished target and reuses it.
"""
import contextlib
import fcntl
import os
import pathlib


@contextlib.contextmanager
def exclusive(target: str | os.PathLike):
    """Hold an exclusive lock named after `target` (`.<name>.lock` in its parent) for the `with` block."""
    target = pathlib.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
