"""NVIDIA DALI input pipeline with the torchvision path's semantics.

The file order comes from the same samplers as the torchvision loader (so sharding by rank, the
per-epoch reshuffle, the dropped last partial training batch, the exactly-once validation shards
and the class-to-label map are identical), and an external source feeds the encoded files to
DALI, which decodes on the GPU (`mixed`) when one is present and on the CPU otherwise, then
applies the same augmentation (`Augmentation`) with its own operators.

DALI's random operators have their own generator, so unlike the torchvision path a resumed
epoch sees the same images in the same order but not bitwise the same crops.
"""
import logging

import numpy as np
import torch

from .folder import DatasetError
from .samplers import EvalSampler, TrainSampler
from .transforms import (
    IMAGENET_EIGVAL,
    IMAGENET_EIGVEC,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augmentation,
)

log = logging.getLogger(__name__)


def dali_unavailable_reason() -> str | None:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as err:  # ImportError, or a broken CUDA runtime inside the wheel
        return f"nvidia-dali cannot be imported: {err}"
    return None


class EncodedBatches:
    """DALI batch source: (encoded file bytes, labels) of batch `iteration` of epoch `epoch_idx`.

    A pure function of DALI's (epoch_idx, iteration), so DALI may prefetch across epoch ends. The
    first epoch DALI runs is `first_epoch` of the run, starting at `start_batch` (resume).
    """

    def __init__(self, samples, sampler, batch_size: int, drop_last: bool):  # samples[i] -> (path, label): a FileIndex
        self.samples, self.sampler, self.batch_size, self.drop_last = samples, sampler, batch_size, drop_last
        self.first_epoch, self.start_batch, self._orders = 0, 0, {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            self._orders = {epoch: [index for index, _ in self.sampler]}  # keep one epoch's order
        return self._orders[epoch]

    def __call__(self, info):
        epoch = self.first_epoch + info.epoch_idx
        order = self._order(epoch)
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        begin = (info.iteration + (self.start_batch if info.epoch_idx == 0 else 0)) * self.batch_size
        if begin >= stop:
            raise StopIteration
        files, labels = [], []
        for index in order[begin : min(begin + self.batch_size, stop)]:
            path, label = self.samples[index]
            try:
                files.append(np.fromfile(path, dtype=np.uint8))
            except OSError as err:
                raise DatasetError(f"cannot read {path} ({err}); check the tree with scripts/verify_dataset.py") from err
            labels.append(np.array([label], dtype=np.int64))
        return files, labels


def _pipeline(source: EncodedBatches, aug: Augmentation, train: bool, batch: int, threads: int, device_id, seed: int):
    from nvidia.dali import fn, pipeline_def, types

    decoder_device = "mixed" if device_id is not None else "cpu"

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, seed=seed, prefetch_queue_depth=2)
    def build():
        encoded, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                             dtype=[types.UINT8, types.INT64])
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
            images = images * 255.0
        else:
            mean = types.Constant(np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1))
            std = types.Constant(np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1))
            images = (images - mean) / std
        return images, labels

    pipe = build()
    pipe.build()
    return pipe


class DaliLoader:
    """Yields (images, labels, 0) torch batches, like the torchvision loader (DALI never skips files)."""

    def __init__(self, pipe):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.iterator = DALIGenericIterator([pipe], ["images", "labels"], auto_reset=True, prepare_first_batch=False)

    def __iter__(self):
        for (out,) in self.iterator:
            yield out["images"], out["labels"].reshape(-1).long(), 0


def build_dali_loaders(root, classes, aug, data_cfg, rank, world_size, seed, device):
    from . import Loaders
    from .index import load_index

    train_set, val_set = load_index(root / "train", classes), load_index(root / "val", classes)
    device_id = int(device.split(":")[1]) if device.startswith("cuda") else None
    if device_id is None and torch.cuda.is_available():
        log.warning("data.loader=dali on a CPU run: decoding on the CPU")
    batch = data_cfg.batch_per_gpu
    threads = max(1, data_cfg.workers)
    train_sampler = TrainSampler(train_set, rank, world_size, seed)
    train_source = EncodedBatches(train_set, train_sampler, batch, drop_last=True)
    val_batch = data_cfg.val_batch_per_gpu or batch
    val_source = EncodedBatches(val_set, EvalSampler(val_set, rank, world_size), val_batch, drop_last=False)
    train = DaliLoader(_pipeline(train_source, aug, True, batch, threads, device_id, seed + rank))
    val = DaliLoader(_pipeline(val_source, aug, False, val_batch, threads, device_id, seed))
    train_batches = len(train_sampler.shards) // batch
    if train_batches == 0:
        raise DatasetError(f"data.batch_per_gpu={batch} exceeds the training images per process in {root / 'train'}")

    started = []

    def set_epoch(epoch: int, start_batch: int = 0) -> None:
        # DALI counts its own epochs; only where the run (re)starts needs telling.
        if not started:
            train_source.first_epoch, train_source.start_batch = epoch, start_batch
            started.append(epoch)

    return Loaders(train, val, train_batches, len(val_set), classes, set_epoch)
