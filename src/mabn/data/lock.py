"""One writer at a time for a dataset folder generated on first use (the shapes set, a resized copy).

Two trainers started together (the repro driver's lanes, a Hydra multirun, `torchrun` ranks on one node) would
otherwise both build the same folder: one deletes the other's staging tree mid-write, or replaces the folder
the other is already reading. The lock is an advisory `flock` on a file beside the folder; whoever gets it
second finds the finished folder and reuses it.
"""
import contextlib
import fcntl
import os
import pathlib


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike):
    """Hold an exclusive lock named after `folder` (`.<name>.lock` in its parent) for the `with` block."""
    folder = pathlib.Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(f".{folder.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
