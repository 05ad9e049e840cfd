"""NVIDIA DALI input pipeline with the torchvision path's semantics.

The file order comes from the same samplers as the torchvision loader (so sharding by rank, the
per-epoch reshuffle, the dropped last partial training batch, the exactly-once validation shards
and the class-to-label map are identical): each epoch the sampler's order becomes the file list of
DALI's own reader (`fn.readers.file`, which reads ahead on DALI's threads; an external source fed from
Python cost a quarter of the throughput), and DALI decodes on the GPU (`mixed`) when one is present
and on the CPU otherwise, then applies the same augmentation (`Augmentation`) with its own operators.

DALI's random operators have their own generator, seeded per epoch and rank, so unlike the
torchvision path a resumed epoch sees the same images in the same order but not bitwise the same crops.
"""
import logging
import pathlib
import tempfile

import numpy as np
import torch

from .folder import DatasetError
from .samplers import EvalSampler, TrainSampler, sample_seed
from .transforms import (
    IMAGENET_EIGVAL,
    IMAGENET_EIGVEC,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augmentation,
)

log = logging.getLogger(__name__)
READER = "files"  # the reader's name: the iterator asks it for the epoch's size


def dali_unavailable_reason() -> str | None:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as err:  # ImportError, or a broken CUDA runtime inside the wheel
        return f"nvidia-dali cannot be imported: {err}"
    return None


def augment(encoded, aug: Augmentation, train: bool, decoder_device: str):
    """Inside a DALI pipeline: encoded files -> decoded, augmented float CHW images in the input convention."""
    from nvidia.dali import fn, types

    output_type = types.BGR if aug.input_format == "bgr255" else types.RGB
    if train:
        images = fn.decoders.image_random_crop(
            encoded, device=decoder_device, output_type=output_type,
            random_area=list(aug.crop_scale), random_aspect_ratio=list(aug.crop_ratio), num_attempts=10,
        )
        images = fn.resize(images, resize_x=aug.crop_size, resize_y=aug.crop_size, antialias=True)
        mirror = fn.random.coin_flip(probability=0.5) if aug.flip else 0
        crop = None
    else:
        images = fn.decoders.image(encoded, device=decoder_device, output_type=output_type)
        images = fn.resize(images, resize_shorter=aug.val_resize, antialias=True)
        mirror, crop = 0, (aug.crop_size, aug.crop_size)
    # To float CHW in [0, 1]; the lighting noise and the input convention apply there, as in torchvision.
    images = fn.crop_mirror_normalize(images, crop=crop, mirror=mirror, mean=[0.0] * 3, std=[255.0] * 3,
                                      dtype=types.FLOAT, output_layout="CHW")
    if train and aug.lighting_std > 0:
        alpha = fn.random.normal(shape=[3]) * aug.lighting_std
        offset = [sum(IMAGENET_EIGVEC[c][k] * IMAGENET_EIGVAL[k] * alpha[k] for k in range(3)) for c in range(3)]
        if aug.input_format == "bgr255":
            offset = offset[::-1]
        images = images + fn.reshape(fn.stack(*offset), shape=[3, 1, 1])
    if aug.input_format == "bgr255":
        return images * 255.0
    mean = types.Constant(np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1))
    std = types.Constant(np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1))
    return (images - mean) / std


def _pipeline(list_file: str, root: str, aug: Augmentation, train: bool, batch: int, threads: int, device_id, seed: int):
    """DALI's own file reader over `list_file` (`<path> <label>` lines, in order: no shuffling or sharding of its
    own, the samplers did both), then the augmentation. `pad_last_batch`: a partial last batch is padded, and
    the iterator (LastBatchPolicy.PARTIAL) hands out only the real samples."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, seed=seed, prefetch_queue_depth=2)
    def build():
        encoded, labels = fn.readers.file(file_list=list_file, file_root=root, random_shuffle=False, pad_last_batch=True,
                                          name=READER)
        return augment(encoded, aug, train, "mixed" if device_id is not None else "cpu"), labels

    pipe = build()
    pipe.build()
    return pipe


class DaliLoader:
    """Yields (images, labels, 0) torch batches, like the torchvision loader (DALI never skips files).

    Each pass (epoch) reads the file list `epoch_files()` returns then, written to a text file for DALI's
    reader (1.28 M paths go in as a file in 0.5 s; as a Python list, 3 s and 6 more at the first batch).
    The training list changes every epoch (the sampler's reshuffle, a resumed epoch's remainder), so its
    pipeline is built anew for each pass (seconds, against an ImageNet epoch's minutes); the validation
    list is fixed and its pipeline reused.
    """

    def __init__(self, name: str, epoch_files, make_pipeline, reuse: bool, drop_last: bool):
        self.epoch_files, self.make_pipeline, self.reuse, self.drop_last = epoch_files, make_pipeline, reuse, drop_last
        self.folder = tempfile.TemporaryDirectory(prefix="mabn-dali-")  # removed with the loader
        self.list_file = pathlib.Path(self.folder.name) / f"{name}.txt"
        self.iterator = None

    def __iter__(self):
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        if self.iterator is None or not self.reuse:
            listing, seed = self.epoch_files()
            if not listing:
                return
            self.iterator = None  # the previous pass's pipeline and threads go before new ones start
            self.list_file.write_bytes(listing)
            policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
            self.iterator = DALIGenericIterator([self.make_pipeline(str(self.list_file), seed)], ["images", "labels"],
                                                reader_name=READER, last_batch_policy=policy, auto_reset=True,
                                                prepare_first_batch=False)
        for (out,) in self.iterator:
            yield out["images"], out["labels"].reshape(-1).long(), 0


def build_dali_loaders(root, classes, aug, data_cfg, rank, world_size, seed, device):
    from . import Loaders
    from .index import load_index

    train_set, val_set = load_index(root / "train", classes), load_index(root / "val", classes)
    for split in (train_set, val_set):
        if split.has_whitespace_in_paths():
            raise DatasetError(f"{split.root} has file or folder names with whitespace, which DALI's file list cannot "
                               f"hold; rename them, or use data.loader=torchvision")
    device_id = int(device.split(":")[1]) if device.startswith("cuda") else None
    if device_id is None and torch.cuda.is_available():
        log.warning("data.loader=dali on a CPU run: decoding on the CPU")
    batch = data_cfg.batch_per_gpu
    threads = max(1, data_cfg.workers)
    val_batch = data_cfg.val_batch_per_gpu or batch
    train_sampler = TrainSampler(train_set, rank, world_size, seed)
    train_batches = len(train_sampler.shards) // batch
    if train_batches == 0:
        raise DatasetError(f"data.batch_per_gpu={batch} exceeds the training images per process in {root / 'train'}")
    position = {"epoch": 0, "start_batch": 0}

    def train_files():
        # The torchvision loader's order: the same sampler, its last partial batch dropped, a resumed
        # epoch starting at its first untrained batch. DALI's random operators get a seed per epoch and rank.
        epoch, start = position["epoch"], position["start_batch"]
        train_sampler.set_epoch(epoch, start * batch)
        indices = train_sampler.indices()[: (train_batches - start) * batch]
        return train_set.file_list(indices), sample_seed(seed, epoch, rank) % 2**31

    def val_files():
        return val_set.file_list(EvalSampler(val_set, rank, world_size).indices), seed

    train = DaliLoader("train", train_files, lambda listing, s: _pipeline(
        listing, str(train_set.root), aug, True, batch, threads, device_id, s), reuse=False, drop_last=True)
    val = DaliLoader("val", val_files, lambda listing, s: _pipeline(
        listing, str(val_set.root), aug, False, val_batch, threads, device_id, s), reuse=True, drop_last=False)

    def set_epoch(epoch: int, start_batch: int = 0) -> None:
        position.update(epoch=epoch, start_batch=start_batch)

    return Loaders(train, val, train_batches, len(val_set), classes, set_epoch)
