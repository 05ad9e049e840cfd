"""Which checkpoint a run continues from (`train.resume`), and the check that it is the same run.

A run dir is named by a few of its settings (train.yaml's `run_name`), so running a command again resumes
its run. Every other setting that changes what is trained (schedule, optimizer, norm options, data and
augmentation...) must match the checkpoint's as well: otherwise a finished 10-epoch run "resumed" with
`schedule.epochs=1` stops at once and its 10-epoch error is reported as a 1-epoch one. Settings that only
change how a run executes or what it records (OPERATIONAL) may differ; `train.resume_changes` lists further
keys one means to change, e.g. `[schedule.epochs]` to train a finished run on. Keys one of the two configs
lacks (a setting added since the checkpoint was written) are not compared. An explicit `train.resume=PATH`
is a deliberate start from that checkpoint: only the settings a run dir is named by must match.
"""
import os
import pathlib

import torch
from omegaconf import DictConfig, OmegaConf

from . import checkpoint as ckpt
from .config import ConfigError, model_kwargs
from .data.folder import class_names
from .models import build_model

# Named first when several keys differ: the settings a run dir's name is made of.
HEADLINE = ("model.arch", "model.width", "model.stem", "norm.name", "norm.norm_batch", "data.batch_per_gpu")
# How a run executes or what it records: free to change between a checkpoint and its resume (a key or a group).
OPERATIONAL = (
    "hydra", "task_name", "output_root", "run_name",
    "train.device", "train.deterministic", "train.compile", "train.compile_mode", "train.channels_last",
    "train.resume", "train.resume_changes", "train.checkpoint_keep", "train.checkpoint_every_steps",
    "train.checkpoint_minutes", "train.log_every", "train.progress", "train.nan_policy", "train.max_nonfinite_skips",
    "train.total_batch", "train.stop_after_epochs", "stats",
    "data.root", "data.workers", "data.val_batch_per_gpu", "data.max_unreadable",
    "data.generate_options.source", "data.generate_options.workers",  # where a generated copy is made from, how fast
)


class ResumeMismatch(ConfigError):
    pass


def flat(cfg: DictConfig, resolve: bool = True) -> dict:
    """{dotted key: value} of every leaf of the run's settings (Hydra's own node left out)."""
    out = {}

    def walk(value, key):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}")
        else:
            out[key] = value

    for key in cfg:
        if key != "hydra":
            node = cfg[key]
            walk(OmegaConf.to_container(node, resolve=resolve) if OmegaConf.is_config(node) else node, str(key))
    return out


def _free(key: str, free: tuple) -> bool:
    return any(key == k or key.startswith(k + ".") for k in free)


def is_operational(key: str) -> bool:
    """Does setting `key` only change how a run executes or what it records (OPERATIONAL)?"""
    return _free(key, OPERATIONAL)


def differences(saved: DictConfig, current: DictConfig, allowed=()) -> list[tuple[str, object, object]]:
    """(key, checkpoint's value, this run's value) of every setting that differs and may not, headline keys first."""
    before, now = flat(saved), flat(current)
    free = OPERATIONAL + tuple(allowed)
    found = [(k, before[k], now[k]) for k in before if k in now and before[k] != now[k] and not _free(k, free)]
    return sorted(found, key=lambda d: HEADLINE.index(d[0]) if d[0] in HEADLINE else len(HEADLINE))


def check_same_run(state: dict, current: DictConfig, path, world_size: int) -> None:
    """`train.resume=auto` (the run dir's own checkpoint): every setting but the operational ones must match,
    and the number of processes (the SGD batch, the lr and each process's data shard follow it). An explicit
    checkpoint path is a deliberate start from it (e.g. training a finished run on in another run dir): only
    the HEADLINE settings, without which the state would not fit the model, must match."""
    saved = OmegaConf.create(state["config"])
    allowed = [str(k) for k in (OmegaConf.select(current, "train.resume_changes") or [])]
    found = differences(saved, current, allowed)
    if str(OmegaConf.select(current, "train.resume")) != "auto":
        found = [d for d in found if d[0] in HEADLINE]
    elif state.get("world_size", world_size) != world_size:
        raise ResumeMismatch(
            f"checkpoint {path} was trained by {state['world_size']} processes, this run has {world_size}: the SGD "
            f"batch, the lr and each process's data shard depend on it; run it with {state['world_size']} processes "
            f"(GPUS= or PROCS=), or train.resume=never to start over"
        )
    if not found:
        return
    (key, before, now), more = found[0], found[1:]
    others = f" (and {', '.join(k for k, _, _ in more[:4])}{', ...' if len(more) > 4 else ''})" if more else ""
    keys = ",".join(k for k, _, _ in found)
    raise ResumeMismatch(
        f"checkpoint {path} was trained with {key}={before}, this run asks for {key}={now}{others}; "
        f"use another run_name or tag, train.resume=never to start over, or train.resume_changes=[{keys}] "
        f"to continue it with the change"
    )


def check_fits(state: dict, current: DictConfig, path) -> None:
    """The checkpoint must fit this run: data.root's classes are its classes, and its model tensors are the
    ones this config builds (same names and shapes): `train.resume_changes` may let a setting differ that
    changes them (norm.name, model.width, norm.options.window...), and loading then failed with
    load_state_dict's traceback, the run dir made."""
    classes = state.get("classes")
    if not classes or not isinstance(state.get("model"), dict):
        return
    # data.root may move (OPERATIONAL), but a label is an index into the class list: other classes, even as
    # many, would continue training with every label meaning another class.
    split = pathlib.Path(os.path.expanduser(str(current.data.root))) / "train"
    here = class_names(split) if split.is_dir() else None
    if here is not None and here != list(classes):
        other = next((c for c in here if c not in classes), None) or next((c for c in classes if c not in here), None)
        detail = f"e.g. {other!r} is in one only" if other else "in another order"
        raise ResumeMismatch(
            f"checkpoint {path} was trained on {len(classes)} classes, data.root={str(current.data.root)!r} has "
            f"{len(here)} ({detail}); labels would change meaning: point data.root at the run's dataset, "
            f"or train.resume=never to start over"
        )
    with torch.device("meta"):  # shapes only: no memory, no init
        model = build_model(**model_kwargs(current, num_classes=len(classes), steps_per_epoch=1000))
    now = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in state["model"].items()}
    missing, unexpected = [k for k in now if k not in saved], [k for k in saved if k not in now]
    reshaped = [k for k in now if k in saved and now[k] != saved[k]]
    if missing or unexpected or reshaped:
        why = (f"{len(missing)} tensors missing from it, e.g. {missing[0]!r}" if missing else
               f"{len(unexpected)} tensors this model lacks, e.g. {unexpected[0]!r}" if unexpected else
               f"{reshaped[0]!r} is {list(saved[reshaped[0]])} in it, {list(now[reshaped[0]])} here")
        raise ResumeMismatch(
            f"checkpoint {path} does not fit the model this run builds ({why}); train.resume_changes cannot change "
            f"the model's tensors: use another run_name or tag, or train.resume=never to start over"
        )


def find_checkpoint(cfg: DictConfig, run_dir, mmap: bool = False) -> tuple[dict, pathlib.Path] | tuple[None, None]:
    """(state, path) that `train.resume` names: 'auto' (the run dir's newest good checkpoint), a path, or
    'never' (None, None); an explicit path that does not load is a ConfigError. `mmap`: see `ckpt.load`."""
    mode = str(cfg.train.resume)
    if mode == "never":
        return None, None
    if mode == "auto":
        return ckpt.CheckpointDir(run_dir).load_latest(mmap=mmap)
    path = pathlib.Path(mode)
    try:
        return ckpt.load(path, mmap=mmap), path
    except Exception as err:
        raise ConfigError(f"train.resume={mode!r} cannot be loaded: {ckpt.describe_error(err)}") from err


def check_resume(cfg: DictConfig, run_dir, world_size: int) -> None:
    """Before anything is written: the checkpoint this run would continue from is one of the same run (its
    tensors mapped, not read: the trainer loads the checkpoint again to resume)."""
    state, path = find_checkpoint(cfg, run_dir, mmap=True)
    if state is not None:
        check_same_run(state, cfg, path, world_size)
        check_fits(state, cfg, path)
