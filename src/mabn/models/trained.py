"""A trained run's network, read back from one of its checkpoints: what export and evaluation start from.

The network is rebuilt from the keyword arguments the run built it with (`model_kwargs`, with its
resolved schedules), loaded with the checkpoint's weights, and its running statistics are replaced by
the rank-averaged ones that the run's own evaluation used (SPEC §1), so it scores as the run did.
"""
import pathlib
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .. import checkpoint as ckpt
from ..config import norm_kwargs


class RunError(ValueError):
    """A run dir or checkpoint that cannot be read back; one line naming what and why."""


@dataclass
class Trained:
    net: nn.Module  # eval mode, on the CPU
    kwargs: dict  # build_model's keyword arguments
    config: DictConfig  # the run's resolved config
    classes: list[str] | None  # class folder names in label order (None: a checkpoint from before they were saved)
    step: int  # optimizer steps the checkpoint was taken after
    path: pathlib.Path


def checkpoint_of(run_dir: str | pathlib.Path) -> pathlib.Path:
    """The run's best checkpoint (lowest val error), else its newest step checkpoint."""
    run_dir = pathlib.Path(run_dir)
    best = run_dir / "checkpoints" / "best.pt"
    if best.is_file():
        return best
    steps = ckpt.CheckpointDir(run_dir).step_files() if (run_dir / "checkpoints").is_dir() else []
    if not steps:
        raise RunError(f"{run_dir} has no checkpoints/best.pt or step checkpoint; pass a run dir of `python -m mabn.train`")
    return steps[0]  # step_files() lists the newest first


def check_output(out: str | pathlib.Path, example: str, flag: str = "--out") -> pathlib.Path:
    """`out` as a file that export or evaluation may write, checked before anything is read or written: not a
    folder, and not in a run's checkpoints folder, where it would replace a checkpoint (the one being read,
    say) or be taken for one when the run resumes."""
    out = pathlib.Path(out)
    if out.is_dir():
        raise RunError(f"{flag} {out} is a directory; valid: a file path such as {out / example}")
    folder = out.resolve().parent
    if folder.name == "checkpoints" and (ckpt.CheckpointDir(folder.parent).step_files() or (folder / "best.pt").exists()):
        raise RunError(f"{flag} {out} is in the run's checkpoints folder {folder}, where it would replace or pass for "
                       f"a checkpoint; valid: a file outside it, such as {folder.parent / out.name}")
    return out


def load_trained(path: str | pathlib.Path) -> Trained:
    """The network of the training checkpoint at `path`, as the run evaluated it."""
    from . import build_model

    path = pathlib.Path(path)
    try:
        state = ckpt.load(path)
    except Exception as err:
        raise RunError(f"{path} cannot be loaded: {ckpt.describe_error(err)}") from None
    cfg = OmegaConf.create(state["config"])
    kwargs = state.get("model_kwargs")
    if kwargs is None:  # checkpoints before model_kwargs were saved: schedules resolved for a 1-iteration run
        num_classes = state["model"]["fc.weight"].shape[0]
        kwargs = dict(arch=cfg.model.arch, norm=cfg.norm.name, num_classes=num_classes, width=cfg.model.width,
                      stem=cfg.model.stem, centered_conv=cfg.norm.get("centered_conv"),
                      zero_init_last_gamma=cfg.model.zero_init_last_gamma, **norm_kwargs(cfg.norm, 1))
    net = build_model(**kwargs)
    net.load_state_dict(state["model"])
    buffers = dict(net.named_buffers())
    with torch.no_grad():
        for name, value in state.get("eval_running_stats", {}).items():
            buffers[name].copy_(value)
    return Trained(net.eval(), kwargs, cfg, state.get("classes"), int(state["progress"]["step"]), path)
