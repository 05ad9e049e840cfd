"""Input pipelines: the project's torchvision and DALI paths beside the plain library pipelines under them
(torchvision `ImageFolder` + `DataLoader`; DALI `fn.readers.file` over the folder), same augmentation, same
cores, interleaved rounds, medians. The wrappers add the exact sample order and resume; the target is that
they cost under 10 % (each path >= 0.9x its library)."""
import pathlib
import statistics
import time

from omegaconf import OmegaConf

from mabn.data import build_loaders
from mabn.data.dali import READER, augment, dali_unavailable_reason
from mabn.data.shapes import generate
from mabn.data.transforms import Augmentation, torchvision_transform

from .common import markdown_table

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette"


def dataset_root(cache: pathlib.Path) -> tuple[pathlib.Path, str]:
    """224 px JPEGs: Imagenette when it is beside the checkout, else generated shapes at 224 px."""
    if (IMAGENETTE / "train").is_dir():
        return IMAGENETTE, "Imagenette (224 px JPEG)"
    return generate(cache / "shapes224", train_per_class=60, val_per_class=10, size=224, progress=False), \
        "generated shapes (224 px JPEG)"


def plain_torchvision(root: pathlib.Path, aug: Augmentation, batch: int, workers: int):
    import torch
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(root / "train", transform=torchvision_transform(aug, train=True))
    return torch.utils.data.DataLoader(dataset, batch, shuffle=True, num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)


def plain_dali(root: pathlib.Path, aug: Augmentation, batch: int, threads: int, device_id):
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, seed=0, prefetch_queue_depth=2)
    def build():
        encoded, labels = fn.readers.file(file_root=str(root / "train"), random_shuffle=True, name=READER)
        return augment(encoded, aug, True, "mixed" if device_id is not None else "cpu"), labels

    pipe = build()
    pipe.build()
    return DALIGenericIterator([pipe], ["images", "labels"], reader_name=READER, auto_reset=True)


def torchvision_batches(loader):
    while True:  # endless: a new pass when one ends
        for images, _ in loader:
            yield images


def dali_batches(iterator):
    while True:
        for (out,) in iterator:
            yield out["images"]


def images_per_second(stream, max_images: int) -> float:
    next(stream)  # the first batch of a round pays for (re)starting workers or a pipeline
    seen, start = 0, time.perf_counter()
    while seen < max_images:
        seen += next(stream).shape[0]
    return seen / (time.perf_counter() - start)


def run(device: str, quick: bool = False, workers: int = 2, rounds: int = 3) -> tuple[str, dict]:
    root, label = dataset_root(ROOT / ".cache" / "bench")
    cfg = OmegaConf.load(ROOT / "configs" / "data" / "imagenet.yaml")
    cfg.merge_with(dict(root=str(root), workers=workers, batch_per_gpu=32, lighting_std=0.0))
    aug, max_images = Augmentation.from_config(cfg), (160 if quick else max(2000, 250 * workers))  # rounds of seconds, not noise
    dali = dali_unavailable_reason() is None
    device_id = int(device.split(":")[1]) if device.startswith("cuda:") else (0 if device == "cuda" else None)

    def project(loader: str, on: str):
        cfg.loader = loader
        loaders = build_loaders(cfg, 0, 1, 0, on)

        def passes():
            epoch = 0
            while True:
                loaders.set_epoch(epoch)
                yield from (x for x, _, _ in loaders.train)
                epoch += 1
        return passes()

    streams = {"torchvision ImageFolder + DataLoader": torchvision_batches(plain_torchvision(root, aug, 32, workers)),
               "mabn torchvision path": project("torchvision", "cpu")}
    if dali:
        streams["DALI fn.readers.file"] = dali_batches(plain_dali(root, aug, 32, workers, None))
        streams["mabn DALI path"] = project("dali", "cpu")
        if device_id is not None:
            streams["DALI fn.readers.file, mixed (GPU decode)"] = dali_batches(plain_dali(root, aug, 32, workers, device_id))
            streams["mabn DALI path, mixed (GPU decode)"] = project("dali", device)
    samples = {name: [] for name in streams}
    for _ in range(1 if quick else rounds):  # interleaved: the machine's noise hits every loader alike
        for name, stream in streams.items():
            samples[name].append(images_per_second(stream, max_images))
    results = {name: statistics.median(v) for name, v in samples.items()}
    baseline = {"mabn torchvision path": "torchvision ImageFolder + DataLoader", "mabn DALI path": "DALI fn.readers.file",
                "mabn DALI path, mixed (GPU decode)": "DALI fn.readers.file, mixed (GPU decode)"}
    rows = []
    for name, value in results.items():
        ratio = f"{value / results[baseline[name]]:.2f}" if name in baseline else "1.00"
        rows.append([name, f"{value:.0f}", ratio, f"{value / results['torchvision ImageFolder + DataLoader']:.2f}"])
    text = (f"{label}, train augmentation (random-resized-crop {aug.crop_size}, flip, no lighting), batch 32, "
            f"{workers} workers/threads, median of {1 if quick else rounds} interleaved rounds of {max_images} images"
            f"{'' if dali else ' (DALI not importable here: its rows are missing)'}:\n\n")
    text += markdown_table(["loader", "images/s", "/ its library", "/ torchvision"], rows)
    numbers = {f"loader_{name}": value for name, value in results.items()}
    numbers.update({f"loader_{name}_over_library": results[name] / results[base] for name, base in baseline.items()
                    if name in results})
    return text, numbers
