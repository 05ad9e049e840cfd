"""Input pipelines: `build_loaders(cfg.data, ...)` returns train/val loaders whichever backend is chosen.

Both backends yield `(images, labels, skipped)` batches, `skipped` counting unreadable images that
were dropped, and map sorted class folder names to labels, so the trainer does not care which one
it got.
"""
import logging
import os
import pathlib
from dataclasses import dataclass
from typing import Iterable

import torch
from torch.utils.data import DataLoader

from ..stop import shield_loader_worker
from . import shapes
from .folder import (
    DatasetError,
    SeededImageFolder,
    check_layout,
    collate_skipping_unreadable,
)
from .index import load_index
from .prepare import resize_tree, reusable_copy
from .samplers import EvalSampler, TrainSampler
from .transforms import INPUT_FORMATS, Augmentation, torchvision_transform

log = logging.getLogger(__name__)
LOADERS = ("torchvision", "dali")
GENERATORS = ("shapes", "resize")  # data.generate: how data.root is made when missing (null: it is a dataset)


@dataclass
class Loaders:
    train: Iterable
    val: Iterable
    train_batches: int  # batches per epoch on this rank (the last partial batch is dropped)
    val_size: int  # images in the whole val set (all ranks together)
    classes: list[str]
    set_epoch: callable  # set_epoch(epoch, start_batch=0): reshuffle; skip already-trained batches


def resolve_root(data_cfg) -> pathlib.Path:
    """The dataset folder, generated on first use (data.generate); a generated one is checked against what is
    asked (never another resize, nor a folder the generator did not write: mabn.data.prepare.reusable_copy)."""
    root = pathlib.Path(os.path.expanduser(str(data_cfg.root)))
    how = data_cfg.get("generate")
    if how == "shapes":
        shapes.generate(root, **data_cfg.get("generate_options", {}))
    elif how == "resize":
        options = data_cfg.generate_options
        resize_tree(os.path.expanduser(str(options.source)), root, options.short_side, options.get("workers", 2))
    return root


def check_root(data_cfg) -> None:
    """Raise DatasetError, writing nothing, when data.root cannot serve: a dataset not in the ImageNet layout,
    or a root that generating would have to replace without being the generator's own (resolve_root)."""
    root = pathlib.Path(os.path.expanduser(str(data_cfg.root)))
    how = data_cfg.get("generate")
    if not how:
        check_layout(root)
    elif how == "shapes":
        shapes.reusable(root, **data_cfg.get("generate_options", {}))
    elif how == "resize":
        source = pathlib.Path(os.path.expanduser(str(data_cfg.generate_options.source)))
        check_layout(source)
        reusable_copy(source, root, data_cfg.generate_options.short_side)


def build_loaders(data_cfg, rank: int = 0, world_size: int = 1, seed: int = 0, device: str = "cpu") -> Loaders:
    if data_cfg.loader not in LOADERS:
        raise DatasetError(f"data.loader={data_cfg.loader!r} is not valid; valid: {', '.join(LOADERS)}")
    root = resolve_root(data_cfg)
    classes = check_layout(root)
    aug = Augmentation.from_config(data_cfg)
    if data_cfg.loader == "dali":
        from .dali import build_dali_loaders, dali_unavailable_reason

        reason = dali_unavailable_reason()
        if reason is None:
            return build_dali_loaders(root, classes, aug, data_cfg, rank, world_size, seed, device)
        log.warning("data.loader=dali unavailable (%s); falling back to torchvision", reason)
    return build_torchvision_loaders(root, classes, aug, data_cfg, rank, world_size, seed, device)


def build_torchvision_loaders(root, classes, aug, data_cfg, rank, world_size, seed, device) -> Loaders:
    train_set = SeededImageFolder(load_index(root / "train", classes), torchvision_transform(aug, train=True),
                                  substitute_unreadable=True)
    val_set = SeededImageFolder(load_index(root / "val", classes), torchvision_transform(aug, train=False),
                                substitute_unreadable=False)
    train_sampler = TrainSampler(train_set, rank, world_size, seed)
    common = dict(
        num_workers=data_cfg.workers,
        pin_memory=device.startswith("cuda"),
        persistent_workers=data_cfg.workers > 0,
        collate_fn=collate_skipping_unreadable,
        # A stop signal sent to the whole job reaches the workers too: they must outlive it (mabn.stop).
        worker_init_fn=shield_loader_worker,
        # Its own generator: creating an epoch's iterator must not consume the global RNG (exact resume).
        generator=torch.Generator().manual_seed(seed),
    )
    batch = data_cfg.batch_per_gpu
    train = DataLoader(train_set, batch, sampler=train_sampler, drop_last=True, **common)
    val = DataLoader(val_set, data_cfg.val_batch_per_gpu or batch, sampler=EvalSampler(val_set, rank, world_size), **common)
    train_batches = len(train_sampler.shards) // batch
    if train_batches == 0:
        raise DatasetError(
            f"data.batch_per_gpu={batch} exceeds the {len(train_sampler.shards)} training images per process "
            f"in {root / 'train'}; use a smaller batch"
        )

    def set_epoch(epoch: int, start_batch: int = 0) -> None:
        train_sampler.set_epoch(epoch, start_batch * batch)

    return Loaders(train, val, train_batches, len(val_set), classes, set_epoch)


__all__ = ["DatasetError", "INPUT_FORMATS", "LOADERS", "Loaders", "build_loaders", "check_layout", "resolve_root"]
