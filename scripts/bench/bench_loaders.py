"""Input pipelines: images/s of DALI (CPU decode; `mixed` on GPU) vs torchvision, same cores, same augmentation."""
import pathlib
import time

from omegaconf import OmegaConf

from mabn.data import build_loaders
from mabn.data.shapes import generate

from .common import markdown_table

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette"


def dataset_root(cache: pathlib.Path) -> tuple[pathlib.Path, str]:
    """224 px JPEGs: Imagenette when it is beside the checkout, else generated shapes at 224 px."""
    if (IMAGENETTE / "train").is_dir():
        return IMAGENETTE, "Imagenette (224 px JPEG)"
    return generate(cache / "shapes224", train_per_class=60, val_per_class=10, size=224, progress=False), \
        "generated shapes (224 px JPEG)"


def images_per_second(loaders, max_images: int) -> float:
    loaders.set_epoch(0)
    seen, start = 0, None
    for images, _, _ in loaders.train:
        if start is None:  # the first batch pays for worker start-up
            start, seen = time.perf_counter(), 0
            continue
        seen += images.shape[0]
        if seen >= max_images:
            break
    return seen / (time.perf_counter() - start)


def run(device: str, quick: bool = False, workers: int = 2) -> tuple[str, dict]:
    root, label = dataset_root(ROOT / ".cache" / "bench")
    cfg = OmegaConf.load(ROOT / "configs" / "data" / "imagenet.yaml")
    cfg.merge_with(dict(root=str(root), workers=workers, batch_per_gpu=32, lighting_std=0.1))
    max_images = 320 if quick else 2000
    results = {}
    for loader in ("torchvision", "dali"):
        cfg.loader = loader
        results[loader] = images_per_second(build_loaders(cfg, 0, 1, 0, "cpu"), max_images)
    if device.startswith("cuda"):
        cfg.loader = "dali"
        results["dali mixed (GPU decode)"] = images_per_second(build_loaders(cfg, 0, 1, 0, device), max_images)
    rows = [[name, f"{v:.0f}", f"{v / results['torchvision']:.2f}"] for name, v in results.items()]
    text = (f"{label}, train augmentation (random-resized-crop 224, flip, lighting), batch 32, "
            f"{workers} workers/threads:\n\n")
    text += markdown_table(["loader", "images/s", "/ torchvision"], rows)
    return text, {f"loader_{k}": v for k, v in results.items()}
