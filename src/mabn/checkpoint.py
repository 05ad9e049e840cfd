"""Checkpoints: atomic writes, the last K kept plus the best, and loading that falls back past a bad file.

A run resumed from a checkpoint also rewinds its line records (`rewind_records`): what a killed
process wrote after its last checkpoint is written again by the resumed one, so it is dropped.

A checkpoint is a plain dict of tensors and Python values (so `torch.load(weights_only=True)`
reads it): model, optimizer, AMP scaler, RNG states, epoch and batch position, and the run's
config as YAML.
"""
import json
import logging
import os
import pathlib
import random
import re
import zipfile

import numpy as np
import torch

log = logging.getLogger(__name__)
STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def atomic_save(obj, path: pathlib.Path) -> None:
    """Write to a temp file in the same folder, fsync, rename over `path`: a reader never sees half a file."""
    _atomic_write(pathlib.Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    """`atomic_save` for a text file (a report): whole or not at all."""
    _atomic_write(pathlib.Path(path), lambda f: f.write(text.encode()))


def _atomic_write(path: pathlib.Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rewind_records(path: pathlib.Path, keep) -> None:
    """Drop the JSON lines of `path` for which `keep(record)` is false (atomically).

    A line cut short by a kill is dropped too: it cannot be read, and the resumed run writes it again."""
    path = pathlib.Path(path)
    if not path.is_file():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and line.endswith(b"\n") and _keeps(keep, line)]
    if len(kept) != len(lines):
        _atomic_write(path, lambda f: f.writelines(kept))


def read_records(path: str | os.PathLike) -> list[dict]:
    """The JSON records of the line file `path` (metrics.jsonl, batch_stats.jsonl); none when it is missing. A line
    cut short by a kill (or being written now) is left out, as `rewind_records` drops it: reports read run dirs
    that a killed run left as they were."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            if line.strip() and line.endswith(b"\n"):
                records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _keeps(keep, line: bytes) -> bool:
    try:
        return bool(keep(json.loads(line)))
    except ValueError:
        return False


def link_or_save(source: pathlib.Path, path: pathlib.Path, state: dict) -> None:
    """`path` becomes a hard link to the checkpoint just written (no second write of a model-sized file);
    atomically, by renaming a fresh link over it. Where links are not allowed, it is saved again."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_save(state, path)


def rng_state() -> dict:
    mt_name, mt_keys, mt_pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(mt_keys.copy()), "pos": mt_pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy(), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class CheckpointDir:
    """`<run_dir>/checkpoints/step-<global step>.pt` (the last `keep`) and `best.pt`."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3):
        self.dir = pathlib.Path(run_dir) / "checkpoints"
        self.keep = max(1, keep)

    def step_files(self) -> list[pathlib.Path]:
        """Step checkpoints, newest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := STEP_FILE.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict, step: int, is_best: bool = False) -> pathlib.Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step-{step:08d}.pt"
        atomic_save(state, path)
        if is_best:
            link_or_save(path, self.dir / "best.pt", state)
        for old in self.step_files()[self.keep :]:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self, map_location="cpu", mmap: bool = False) -> tuple[dict, pathlib.Path] | tuple[None, None]:
        """The newest checkpoint that loads; a broken one is reported and the one before it is tried."""
        for path in self.step_files():
            try:
                return load(path, map_location, mmap), path
            except Exception as err:  # truncated, corrupt or foreign file: fall back to the previous one
                log.warning("checkpoint %s cannot be loaded (%s); trying the previous one", path, describe_error(err))
        return None, None


def read(path: str | os.PathLike, map_location="cpu", mmap: bool = False):
    """What `torch.save` wrote to `path`, read with weights_only=True. A file that is not torch.save's zip archive
    (another file, or one cut short) is named as such: torch's own errors for it speak of pickle opcodes and
    save options, and advise weights_only=False."""
    if not zipfile.is_zipfile(path):
        raise ValueError("not a checkpoint: torch.save writes a zip archive, and this file is not one (or is cut short)")
    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def load(path: str | os.PathLike, map_location="cpu", mmap: bool = False) -> dict:
    """A training checkpoint; `mmap=True` maps the tensors instead of reading them (to look at its config)."""
    state = read(path, map_location, mmap)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not a mabn training checkpoint (no model/config entries)")
    return state


def describe_error(err: Exception) -> str:
    """One line for a load failure (torch's unpickling errors span many lines)."""
    text = str(err).strip()
    if "WeightsUnpickler error:" in text:  # torch's weights-only refusal (a foreign object in the file) opens with
        # advice to load with weights_only=False (arbitrary code); its reason follows the marker
        reason = " ".join(text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0].split())
        return f"{type(err).__name__}: not a weights-only checkpoint ({reason})"[:300]
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first}"[:300]
