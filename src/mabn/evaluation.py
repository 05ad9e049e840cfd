"""Evaluate a trained checkpoint on its val set or another folder, at its test resolution or another,
optionally beside the same weights with re-estimated statistics (`mabn.precise_stats`) and with its norms
folded into the convs (`scripts/evaluate.py`, `make eval`).

Training evaluates each epoch at one resolution on one val set; a researcher then asks more of the
same weights: the error at the test resolution of the paper's table (224 after training at 96), on
another test set in the ImageNet layout, or of the deployed network whose norms are folded into its
convs (SPEC §2), which must score as the trained one does. All the networks scored see the same
decoded batches, so their logits can be compared image by image.

Labels follow class *names*: a folder's classes are mapped onto the run's by name (checked against
the names saved in the checkpoint), so a test set holding a subset of the classes scores correctly,
and one whose folders are named otherwise (ImageNet-V2's `0..999`) is refused instead of scored
against the wrong labels.
"""
import itertools
import logging
import math
import pathlib
import time
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from torchvision.datasets.folder import IMG_EXTENSIONS

from .checkpoint import read_records
from .data import DatasetError, build_loaders, resolve_root
from .data.folder import SeededImageFolder, class_names, collate_skipping_unreadable
from .data.index import load_index
from .data.samplers import EvalSampler
from .data.transforms import Augmentation, torchvision_transform
from .engine import autocast, error_rates, score
from .fold import eval_affine_defined, fold_norms
from .models.trained import RunError, Trained, checkpoint_of, load_trained
from .precise_stats import AVERAGES, coupled, recompute_running_stats
from .progress import progress_bar
from .train import source_version

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class EvalSettings:
    root: str | None = None  # a folder holding <split>/<class>/*; None: the run's data.root
    split: str = "val"
    crop_size: int | None = None  # None: the run's data.crop_size
    val_resize: int | None = None  # None: the run's ratio val_resize / crop_size, at crop_size
    batch: int = 100
    workers: int = 2
    device: str = "auto"
    amp: bool = False
    fold: bool = False
    folder_classes_only: bool = False  # predict among the folder's classes only (ImageNet-A/-R's protocol)
    precise_images: int = 0  # > 0: also score with statistics re-estimated on about this many training images
    precise_average: str = "auto"  # equal, ema (the layers' own moving averages replayed) or auto (mabn.precise_stats)
    precise_epoch: int = 0  # the training epoch whose order and augmentation the re-estimation's images follow
    progress: bool = True


def checkpoint_path(run: str | pathlib.Path) -> pathlib.Path:
    """A checkpoint file as given, or a run dir's best (else newest) checkpoint."""
    run = pathlib.Path(run)
    if run.is_file():
        return run
    if not run.is_dir():
        raise RunError(f"{run} does not exist; pass a run dir of `python -m mabn.train` or one of its checkpoints/*.pt")
    return checkpoint_of(run)


def newest_run(outputs: str | pathlib.Path) -> pathlib.Path:
    """The run dir under `outputs` whose checkpoint was written last (what `make eval` scores by default)."""
    found = [(p.stat().st_mtime, p.parent.parent) for p in pathlib.Path(outputs).glob("**/checkpoints/*.pt")]
    if not found:
        raise RunError(f"no run with checkpoints under {outputs}/; train one (make train) or pass a run dir")
    return max(found)[1]


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise RunError(f"--device {device!r} is not valid; valid: {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: torch sees no CUDA device here; valid: cpu or auto")
    return device


def sizes(trained: Trained, settings: EvalSettings) -> tuple[int, int]:
    """(crop, resize): given ones, else the run's; a new crop alone keeps the run's resize/crop ratio."""
    data = trained.config.data
    crop = data.crop_size if settings.crop_size is None else settings.crop_size  # `or` would take 0 for the run's
    resize = settings.val_resize if settings.val_resize is not None else (
        data.val_resize if crop == data.crop_size else round(crop * data.val_resize / data.crop_size))
    for flag, value in (("--crop-size", crop), ("--val-resize", resize)):
        if value < 1:
            raise RunError(f"{flag} {value} is not valid; valid: a positive number of pixels")
    if resize < crop:
        raise RunError(f"--val-resize {resize} is smaller than --crop-size {crop}; valid: a resize >= the crop "
                       f"(the shorter side is resized, then the center crop taken)")
    return crop, resize


def label_map(folder: list[str], trained: Trained, split_dir: pathlib.Path) -> torch.Tensor:
    """The run's label of each of the folder's classes (by name)."""
    num_classes = trained.kwargs["num_classes"]
    if trained.classes is None:  # a checkpoint from before the names were saved: only the count can be checked
        if len(folder) != num_classes:
            raise DatasetError(f"{split_dir} has {len(folder)} class folders, the run's network {num_classes} classes")
        log.warning("%s holds no class names (an older checkpoint); assuming %s has the run's classes in sorted order",
                    trained.path, split_dir)
        return torch.arange(num_classes)
    index = {name: i for i, name in enumerate(trained.classes)}
    unknown = [name for name in folder if name not in index]
    if unknown:
        raise DatasetError(
            f"{split_dir} has {len(unknown)} class folders the run never trained on, e.g. {unknown[:3]}; valid: "
            f"folders named as the run's classes, e.g. {trained.classes[:3]} (a subset is fine)"
        )
    return torch.tensor([index[name] for name in folder])


def evaluate_checkpoint(run: str | pathlib.Path, settings: EvalSettings = EvalSettings()) -> dict:
    """Score the run's network (and its re-estimated and folded copies) on `settings.root`/`settings.split`;
    returns the record."""
    if settings.batch < 1:
        raise RunError(f"--batch {settings.batch} is not valid; valid: a positive integer")
    if settings.workers < 0:
        raise RunError(f"--workers {settings.workers} is not valid; valid: an integer >= 0")
    if settings.precise_images < 0:
        raise RunError(f"--precise-stats {settings.precise_images} is not valid; valid: a number of training images > 0 "
                       "(0: off)")
    if settings.precise_average not in AVERAGES:
        raise RunError(f"--precise-average {settings.precise_average!r} is not valid; valid: {', '.join(AVERAGES)}")
    if settings.precise_epoch < 0:
        raise RunError(f"--precise-epoch {settings.precise_epoch} is not valid; valid: an epoch number >= 0")
    source = source_version()  # at the start: the code running is the checkout's as it was then
    device = resolve_device(settings.device)
    trained = load_trained(checkpoint_path(run))
    crop, resize = sizes(trained, settings)
    root = pathlib.Path(settings.root).expanduser() if settings.root else resolve_root(trained.config.data)
    split_dir = root / settings.split
    loader, labels_of, classes = folder_loader(trained, split_dir, crop, resize, settings, device)

    networks = {"trained": trained.net.to(device)}
    record = dict(checkpoint=str(trained.path), step=trained.step, arch=trained.kwargs["arch"],
                  norm=trained.kwargs["norm"], data=str(split_dir), classes=classes, crop_size=crop,
                  val_resize=resize, device=device, amp=settings.amp, folder_classes_only=settings.folder_classes_only)
    if settings.precise_images:
        networks["precise"], precise = precise_network(trained, settings, device)
        record.update({f"precise_{k}": v for k, v in precise.items()})
    if settings.fold:
        networks["folded"] = fold_norms(trained.net)
        norms = sum(eval_affine_defined(m) for m in trained.net.modules())
        record["folded_norms"] = norms - sum(eval_affine_defined(m) for m in networks["folded"].modules())
    record.update(score_networks(networks, loader, labels_of, device, settings))
    record.update(source=source, trained_by=training_sources(trained.path))
    return record


def folder_loader(trained: Trained, split_dir: pathlib.Path, crop: int, resize: int, settings: EvalSettings, device: str):
    """The loader of `split_dir` at the run's test transform (resized, center-cropped), the run's label of each of
    the folder's labels, and the folder's class count."""
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir} does not exist; expected {split_dir}/<class>/*.JPEG")
    folder = class_names(split_dir)
    if not folder:
        raise DatasetError(f"{split_dir} holds no class folders; expected {split_dir}/<class>/*.JPEG")
    labels_of = label_map(folder, trained, split_dir).to(device)
    data = OmegaConf.merge(trained.config.data, dict(crop_size=crop, val_resize=resize))
    dataset = SeededImageFolder(load_index(split_dir, folder),
                                torchvision_transform(Augmentation.from_config(data), train=False),
                                substitute_unreadable=False)
    if len(dataset) == 0:  # scored as 100 % error on 0 images before
        raise DatasetError(f"{split_dir} holds no images in its {len(folder)} class folders; expected "
                           f"{split_dir}/<class>/*.JPEG ({', '.join(IMG_EXTENSIONS)})")
    loader = DataLoader(dataset, settings.batch, sampler=EvalSampler(dataset, 0, 1), num_workers=settings.workers,
                        collate_fn=collate_skipping_unreadable, pin_memory=device == "cuda")
    return loader, labels_of, len(folder)


@torch.no_grad()
def score_networks(networks: dict, loader, labels_of: torch.Tensor, device: str, settings: EvalSettings) -> dict:
    """Every network on the same batches: their error rates, and how far the folded one is from the trained one."""
    counts = {name: torch.zeros(4, dtype=torch.float64, device=device) for name in networks}
    max_diff = torch.zeros((), dtype=torch.float64, device=device)
    agree = torch.zeros((), dtype=torch.float64, device=device)
    unreadable = 0
    started = time.perf_counter()
    for images, labels, skipped in progress_bar(loader, desc="evaluating", unit="batch", disable=not settings.progress):
        unreadable += skipped
        if labels.numel() == 0:
            continue
        x = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        y = labels if settings.folder_classes_only else labels_of[labels]
        logits = {}
        for name, net in networks.items():
            with autocast(device, settings.amp):
                logits[name] = net(x).float()
            if settings.folder_classes_only:  # the logits of the folder's classes, in the folder's label order
                logits[name] = logits[name][:, labels_of]
            counts[name] += score(logits[name], y)
        if "folded" in logits:
            max_diff = torch.maximum(max_diff, (logits["folded"] - logits["trained"]).abs().max().double())
            agree += (logits["folded"].argmax(1) == logits["trained"].argmax(1)).sum().double()
    results = {name: error_rates(c) for name, c in counts.items()}
    images = results["trained"]["val_images"]
    if images == 0:
        raise DatasetError(f"none of the {unreadable} images could be read; nothing to score")
    record = dict(images=images, unreadable=unreadable, seconds=round(time.perf_counter() - started, 2),
                  **{name: {k.removeprefix("val_"): v for k, v in r.items() if k != "val_images"}
                     for name, r in results.items()})
    if "folded" in networks:
        record.update(max_abs_logit_diff=max_diff.item(), predictions_agree=100.0 * agree.item() / max(images, 1))
    return record


def training_sources(checkpoint: pathlib.Path) -> list[str]:
    """The commits that trained the run (its metrics.jsonl's `source`s, in order), where the run dir is at hand."""
    sources = []
    for record in read_records(checkpoint.parent.parent / "metrics.jsonl"):
        source = record.get("source")
        if source and source not in sources:
            sources.append(source)
    return sources


def precise_network(trained: Trained, settings: EvalSettings, device: str) -> tuple[torch.nn.Module, dict]:
    """The network with its statistics re-estimated (mabn.precise_stats) on the run's training images, batched
    and augmented as the run trained (its N, its groups of b, its seed), from epoch `precise_epoch` on into
    the next ones as far as the images asked for reach; and what was used."""
    data = OmegaConf.merge(trained.config.data, dict(loader="torchvision", workers=settings.workers))
    loaders = build_loaders(data, 0, 1, trained.config.seed, device)
    batch = data.batch_per_gpu
    batches = math.ceil(settings.precise_images / batch)
    epochs = math.ceil(batches / loaders.train_batches)

    def train_batches():
        for epoch in range(settings.precise_epoch, settings.precise_epoch + epochs):
            loaders.set_epoch(epoch)
            yield from loaders.train

    if settings.precise_average == "equal" and any(coupled(m) for m in trained.net.modules()):
        log.warning("--precise-average equal holds BRN's / MABN's statistics at the trained values, which their training "
                    "forward normalizes by: each layer's estimate is made against statistics the pass then replaces "
                    "(not self-consistent); --precise-average ema (the default, auto) re-estimates them jointly")
    done = recompute_running_stats(trained.net, itertools.islice(train_batches(), batches), device,
                                   settings.progress, settings.precise_average, total=batches)
    used = dict(images=batches * batch, batch=batch, layers=done.layers, average=done.average,
                epoch=settings.precise_epoch, epochs=epochs, trained_weight=done.trained_weight)
    return done.net, used if done.renorm_clips is None else dict(used, renorm_clips=done.renorm_clips)


def summary(record: dict) -> list[str]:
    """The lines the command prints."""
    lines = [
        f"{record['checkpoint']} (step {record['step']}, {record['arch']}, {record['norm']}) on {record['data']}: "
        f"{record['images']} images of {record['classes']} classes at {record['crop_size']} px "
        f"(resized to {record['val_resize']}), {record['device']}{' AMP' if record['amp'] else ''}, {record['seconds']:.0f} s",
        f"{'network':<8} {'top-1 err':>9} {'top-5 err':>9} {'loss':>7}",
    ]
    for name in ("trained", "precise", "folded"):
        if name in record:
            r = record[name]
            lines.append(f"{name:<8} {r['top1_err']:>8.2f}% {r['top5_err']:>8.2f}% {r['loss']:>7.4f}")
    if "precise" in record:
        first, epochs = record["precise_epoch"], record["precise_epochs"]
        lines.append(f"precise: the statistics of {record['precise_layers']} norms re-estimated with the final weights "
                     f"over {record['precise_images']} training images in batches of {record['precise_batch']} "
                     f"(train mode; epoch {first}{'' if epochs == 1 else f'-{first + epochs - 1}'}), " +
                     ("equal weights" if record["precise_average"] == "equal" else
                      f"the layers' own moving averages replayed (the trained values still weigh "
                      f"{100 * record['precise_trained_weight']:.2g}%)"))
        if "precise_renorm_clips" in record:
            clips = record["precise_renorm_clips"]
            lines.append(f"in those forwards BRN's r was clipped in {100 * clips['r']:.2f}% and d in {100 * clips['d']:.2f}% "
                         f"of {clips['pairs']} (group, channel) statistics")
    if "folded" in record:
        lines.append(f"folded: {record['folded_norms']} norms merged into their convs; max |logit difference| "
                     f"{record['max_abs_logit_diff']:.2e}; same prediction on {record['predictions_agree']:.2f}% of images")
    if record["unreadable"]:
        lines.append(f"{record['unreadable']} unreadable images skipped (not counted)")
    return lines
