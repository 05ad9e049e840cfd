"""ImageNet-layout folders (`<root>/<split>/<class>/*.JPEG`): checking, and the torchvision dataset."""
import logging
import pathlib

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset folder that cannot be trained on; the message is one line naming the path."""


def class_names(split_dir: pathlib.Path) -> list[str]:
    """Sorted class folder names: the label of a class is its index here, for every loader."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_layout(root: str | pathlib.Path) -> list[str]:
    """Check `root` holds `train/` and `val/` with the same non-empty class folders; return the classes."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DatasetError(f"data.root={str(root)!r} does not exist; point it at a folder holding train/ and val/")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DatasetError(f"data.root={str(root)!r} has no {split}/ folder; expected {root}/{split}/<class>/*.JPEG")
    classes = {}
    for split in ("train", "val"):
        split_dir = root / split
        classes[split] = class_names(split_dir)
        if not classes[split]:
            raise DatasetError(f"{split_dir} holds no class folders; expected {split_dir}/<class>/*.JPEG")
        for name in classes[split]:
            if not any(f.suffix.lower() in IMG_EXTENSIONS for f in (split_dir / name).iterdir()):
                raise DatasetError(f"class folder {split_dir / name} holds no images ({', '.join(IMG_EXTENSIONS)})")
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise DatasetError(
            f"train/ and val/ of {root} have different class folders: only in train {only_train[:5]}, "
            f"only in val {only_val[:5]}"
        )
    return classes["train"]


class SeededImageFolder(torch.utils.data.Dataset):
    """An ImageNet-layout split (the files of `index`, a `FileIndex`) whose items are fetched as `(index, seed)`:
    the augmentation of a sample is seeded by its own seed, so it does not depend on worker count, batch
    position or where a run resumed.

    Items are `(image, label, unreadable)`, `unreadable` counting the files that could not be decoded.
    With `substitute_unreadable` (training) an unreadable file is replaced by the next readable one,
    so batches keep their size (normalization groups must divide it); otherwise (evaluation) the
    item is `(None, label, 1)` and the collate function drops it, so no image is counted twice.
    """

    def __init__(self, index, transform, substitute_unreadable: bool):
        self.index, self.transform, self.substitute_unreadable = index, transform, substitute_unreadable
        self.classes, self.root = index.classes, index.root

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item):
        index, seed = item
        unreadable = 0
        for attempt in range(len(self.index)):
            path, label = self.index[(index + attempt) % len(self.index)]
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB")
                break
            except (OSError, ValueError) as err:
                log.warning("skipping unreadable image %s (%s)", path, err)
                unreadable += 1
                if not self.substitute_unreadable:
                    return None, label, unreadable
        else:
            raise OSError(f"no readable image in {self.root}; check it with scripts/verify_dataset.py")
        return seeded(self.transform, img, seed), label, unreadable


def seeded(transform, img, seed: int):
    """`transform(img)` with torch's CPU generator (the one torchvision's random transforms draw from) seeded.

    In a loader worker the generator is the worker's own: it is just reseeded (2 us). In the main process
    (data.workers=0) the training's random stream must not be touched, so its state is saved and restored.
    `torch.random.fork_rng` + `torch.manual_seed` did both for every sample at ~0.4 ms (seeding every
    device backend too), a tenth of what decoding and cropping an ImageNet photo costs."""
    generator = torch.default_generator
    if torch.utils.data.get_worker_info() is not None:
        generator.manual_seed(seed)
        return transform(img)
    state = generator.get_state()
    try:
        generator.manual_seed(seed)
        return transform(img)
    finally:
        generator.set_state(state)


def collate_skipping_unreadable(batch):
    """Stack the decoded samples; return (images, labels, number of unreadable files skipped)."""
    unreadable = sum(item[2] for item in batch)
    good = [(img, label) for img, label, _ in batch if img is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), unreadable
    images, labels = torch.utils.data.default_collate(good)
    return images, labels, unreadable
