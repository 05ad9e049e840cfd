"""The embedded default dataset: procedurally drawn shapes and textures in the ImageNet folder layout.

Ten classes a small CNN can tell apart within minutes on a CPU, but not trivially: every image has a
random background colour and noise, and the figure a random colour, size, position and rotation.
Written once as `train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG` plus `LOC_synset_mapping.txt`, so the
pipeline reads it exactly as it reads ImageNet.
"""
import logging
import math
import os
import pathlib
import random
import shutil
import tempfile

from PIL import Image, ImageDraw, ImageFilter

from ..progress import progress_bar
from .folder import DatasetError
from .lock import exclusive
from .prepare import ensure_replaceable

log = logging.getLogger(__name__)

CLASSES = [
    "circle", "square", "triangle", "star", "cross",
    "ring", "horizontal_stripes", "vertical_stripes", "checkerboard", "diagonal_stripes",
]
WNIDS = [f"n9{k:07d}" for k in range(1, len(CLASSES) + 1)]  # fake wnids, sorted in class order
VERSION = "shapes10-v1"


def _colour(rng: random.Random, avoid=None) -> tuple[int, int, int]:
    while True:
        c = tuple(rng.randrange(256) for _ in range(3))
        if avoid is None or sum(abs(a - b) for a, b in zip(c, avoid)) > 180:
            return c


def _polygon(cx, cy, radius, sides, angle, star=False):
    points = []
    for k in range(sides * (2 if star else 1)):
        r = radius * (0.45 if star and k % 2 else 1.0)
        a = angle + math.pi * 2 * k / (sides * (2 if star else 1))
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def draw(label: int, size: int, rng: random.Random) -> Image.Image:
    """One image of class `label`."""
    background = _colour(rng)
    ink = _colour(rng, avoid=background)
    big = size * 4  # draw large, then downsample: anti-aliased edges
    img = Image.new("RGB", (big, big), background)
    d = ImageDraw.Draw(img)
    radius = big * rng.uniform(0.18, 0.38)
    cx, cy = (rng.uniform(radius, big - radius) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    width = max(2, int(big * rng.uniform(0.04, 0.08)))
    name = CLASSES[label]
    if name == "circle":
        d.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=ink)
    elif name == "square":
        d.polygon(_polygon(cx, cy, radius, 4, angle), fill=ink)
    elif name == "triangle":
        d.polygon(_polygon(cx, cy, radius, 3, angle), fill=ink)
    elif name == "star":
        d.polygon(_polygon(cx, cy, radius, 5, angle, star=True), fill=ink)
    elif name == "cross":
        for a in (angle, angle + math.pi / 2):
            dx, dy = radius * math.cos(a), radius * math.sin(a)
            d.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=ink, width=width * 2)
    elif name == "ring":
        d.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=ink, width=width)
    else:
        period = big * rng.uniform(0.12, 0.22)
        tex = Image.new("RGB", (big * 2, big * 2), background)
        t = ImageDraw.Draw(tex)
        n = int(big * 2 / period) + 1
        for k in range(n):
            lo = k * period
            if name in ("horizontal_stripes", "diagonal_stripes"):
                t.rectangle([0, lo, big * 2, lo + period / 2], fill=ink)
            elif name == "vertical_stripes":
                t.rectangle([lo, 0, lo + period / 2, big * 2], fill=ink)
            else:  # checkerboard
                for j in range(n):
                    if (k + j) % 2 == 0:
                        t.rectangle([lo, j * period, lo + period, (j + 1) * period], fill=ink)
        if name == "diagonal_stripes":
            tex = tex.rotate(rng.choice([45, -45]) + rng.uniform(-10, 10))
        elif name != "checkerboard":
            tex = tex.rotate(rng.uniform(-12, 12))
        img = tex.crop((big // 2, big // 2, big // 2 + big, big // 2 + big))
    img = img.resize((size, size), Image.BILINEAR).filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6)))
    noise = Image.effect_noise((size, size), rng.uniform(8, 30)).convert("RGB")
    return Image.blend(img, noise, rng.uniform(0.05, 0.2))


def generate(root: str | os.PathLike, train_per_class: int = 260, val_per_class: int = 50, size: int = 64,
             seed: int = 0, progress: bool = True) -> pathlib.Path:
    """Write the dataset under `root` (atomically: a half-written tree is never left behind)."""
    root = pathlib.Path(root)
    reusable(root, train_per_class, val_per_class, size, seed)  # a refusal writes nothing, not even the lock file
    with exclusive(root):  # a second process started at the same time waits here, then reuses the tree
        return _generate(root, train_per_class, val_per_class, size, seed, progress)


def recipe(train_per_class: int = 260, val_per_class: int = 50, size: int = 64, seed: int = 0) -> str:
    """What the VERSION file records under the version line: the options a tree was drawn with."""
    options = dict(train_per_class=train_per_class, val_per_class=val_per_class, size=size, seed=seed)
    for name, value in options.items():  # 0 px was PIL's traceback, 0 per class an empty tree that trained
        low = 0 if name == "seed" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DatasetError(f"{name}={value!r} is not valid; valid: an integer >= {low}")
    return " ".join(f"{name}={value}" for name, value in options.items())


def reusable(root: pathlib.Path, train_per_class: int = 260, val_per_class: int = 50, size: int = 64,
             seed: int = 0) -> bool:
    """Whether `root` holds this version's tree drawn with these options (an older version's is replaced);
    DatasetError when it holds a tree drawn with other options, or is a folder the generator did not write
    (either would be replaced). Writes nothing."""
    wanted = recipe(train_per_class, val_per_class, size, seed)
    marker = root / "VERSION"
    if not marker.is_file():
        ensure_replaceable(root, "VERSION", "the shapes generator")
        return False
    version, _, made = marker.read_text().strip().partition("\n")
    if version != VERSION or not made:  # an older generator's tree: ours to redraw
        return False
    if made == wanted:
        return True
    raise DatasetError(f"{root} holds the shapes drawn with {made}, not with {wanted} as asked; write them to another "
                       f"folder (data.root), or delete {root} to redraw it")


def _generate(root: pathlib.Path, train_per_class: int, val_per_class: int, size: int, seed: int,
              progress: bool) -> pathlib.Path:
    if reusable(root, train_per_class, val_per_class, size, seed):
        return root
    log.info("generating the embedded shapes dataset into %s", root)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".shapes-", dir=root.parent))
    rng = random.Random(seed)
    jobs = [(split, label, k) for split, per in (("train", train_per_class), ("val", val_per_class))
            for label in range(len(CLASSES)) for k in range(per)]
    for split, label, k in progress_bar(jobs, desc=f"generating {root.name}", disable=not progress, unit="img"):
        folder = staging / split / WNIDS[label]
        folder.mkdir(parents=True, exist_ok=True)
        draw(label, size, rng).save(folder / f"{WNIDS[label]}_{split}_{k:05d}.JPEG", quality=90)
    (staging / "LOC_synset_mapping.txt").write_text("".join(f"{w} {c}\n" for w, c in zip(WNIDS, CLASSES)))
    (staging / "VERSION").write_text(f"{VERSION}\n{recipe(train_per_class, val_per_class, size, seed)}\n")
    if root.exists():
        shutil.rmtree(root)
    os.replace(staging, root)
    return root
