"""Dataset preparation: sort ImageNet's flat val folder, build ImageNet-N subsets, find unreadable images."""
import csv
import logging
import os
import pathlib
import random
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..progress import progress_bar
from .folder import DatasetError, class_names
from .lock import exclusive

log = logging.getLogger(__name__)


def ensure_replaceable(root: pathlib.Path, marker: str, writer: str) -> None:
    """Raise DatasetError unless `root` is missing, an empty folder, or a tree `writer` made (it holds `marker`).
    A generator replaces only its own trees: data.root pointed at a real dataset while data.generate is on (or
    --dst at one) must not delete that dataset."""
    if (root / marker).is_file() or not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return
    raise DatasetError(f"{root} is not empty and was not written by {writer} (it has no {marker} file), which would "
                       f"replace it; to train on it set data.generate=null (e.g. data=imagenet), else write to a new folder")


def run_cli(action) -> int:
    """Exit status of a preparation script: 0 and `action()`'s message printed, or 2 and one `error:` line."""
    try:
        message = action()
    except (DatasetError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(message)
    return 0


def val_labels_from_loc_csv(csv_path: str | os.PathLike) -> dict[str, str]:
    """{image id: wnid} from Kaggle's LOC_val_solution.csv (ImageId, PredictionString 'wnid x y x y ...')."""
    labels = {}
    try:
        with open(csv_path, newline="") as f:
            rows = csv.DictReader(f)
            if not {"ImageId", "PredictionString"} <= set(rows.fieldnames or ()):
                raise DatasetError(f"{csv_path} has columns {rows.fieldnames}, not ImageId,PredictionString; "
                                   "valid: Kaggle's LOC_val_solution.csv")
            for line, row in enumerate(rows, start=2):
                if not (row["PredictionString"] or "").split():
                    raise DatasetError(f"{csv_path} line {line} has no wnid in PredictionString")
                labels[row["ImageId"]] = row["PredictionString"].split()[0]
    except (UnicodeDecodeError, csv.Error) as err:  # a binary or mangled file: no traceback
        raise DatasetError(f"{csv_path} is not a CSV file ({type(err).__name__}: {err}); valid: Kaggle's "
                           "LOC_val_solution.csv") from None
    if not labels:
        raise DatasetError(f"{csv_path} holds no rows with ImageId,PredictionString")
    return labels


def val_labels_from_devkit(ground_truth: str | os.PathLike, meta_mat: str | os.PathLike) -> dict[str, str]:
    """{image id: wnid} from the devkit's ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID per
    line, in image order) and meta.mat (ILSVRC2012_ID -> WNID)."""
    from scipy.io import loadmat

    try:
        synsets = loadmat(str(meta_mat), squeeze_me=True)["synsets"].reshape(-1)  # squeeze_me leaves 1 synset 0-d
        wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    except OSError:
        raise  # a missing file: run_cli's one line
    except Exception as err:  # scipy raises IndexError, MatReadError, ValueError... for a file that is not a .mat
        raise DatasetError(f"{meta_mat} is not the devkit's meta.mat ({type(err).__name__}: {err})") from None
    try:
        ids = [int(word) for word in pathlib.Path(ground_truth).read_text().split()]
    except (UnicodeDecodeError, ValueError) as err:
        raise DatasetError(f"{ground_truth} is not the devkit's validation ground truth (one class ID per line): "
                           f"{type(err).__name__}: {err}") from None
    unknown = sorted(set(ids) - set(wnid_of))
    if unknown:
        raise DatasetError(f"{ground_truth} names class IDs {unknown[:5]} that {meta_mat} does not have")
    return {f"ILSVRC2012_val_{k:08d}": wnid_of[i] for k, i in enumerate(ids, start=1)}


def sort_val_folder(val_dir: str | os.PathLike, labels: dict[str, str], out_dir=None, link: bool = False,
                    progress: bool = True) -> int:
    """Place every image of the flat `val_dir` in `<out_dir>/<wnid>/` (default: in place, moved).

    Returns the number placed. Raises DatasetError, before touching anything, if an image has no label.
    """
    val_dir = pathlib.Path(val_dir)
    out_dir = pathlib.Path(out_dir) if out_dir else val_dir
    images = sorted(p for p in val_dir.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not images:
        raise DatasetError(f"{val_dir} holds no images to sort")
    missing = [p.name for p in images if p.stem not in labels]
    if missing:
        raise DatasetError(f"{len(missing)} images of {val_dir} have no label (first: {missing[0]}); wrong labels file?")
    for path in progress_bar(images, desc="sorting val", unit="img", disable=not progress):
        target = out_dir / labels[path.stem] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            if target.is_symlink() and target.resolve() == path.resolve():
                continue  # placed by an earlier, interrupted run
            target.symlink_to(path.resolve())
        elif out_dir == val_dir:
            path.rename(target)
        else:
            shutil.copy2(path, target)
    return len(images)


def make_subset(src: str | os.PathLike, dst: str | os.PathLike, num_classes: int | None = None,
                classes: list[str] | None = None, train_per_class: int | None = None,
                val_per_class: int | None = None, seed: int | None = None) -> list[str]:
    """Symlink a subset of an ImageNet-layout tree: the first `num_classes` (or the listed) classes,
    the first (or, with `seed`, random) K images per class. Returns the chosen classes.

    `dst` must be missing, empty, or a subset of the same `src` made before (its SUBSET file): links added to
    another folder would mix its images with the subset's, and `dst` = `src` added nothing but said it had."""
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    marker = dst / "SUBSET"
    made = marker.read_text().strip() if marker.is_file() else None
    if made is not None and made != str(src.resolve()):
        raise DatasetError(f"{dst} holds a subset of {made}, not of {src.resolve()}; give a new --dst")
    if made is None and dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise DatasetError(f"{dst} is not empty and is no subset made by make_subset (it has no SUBSET file); "
                           f"give a new --dst (the subset's links would mix with what is there)")
    if classes is not None and not classes:
        raise DatasetError("the class list names no classes; valid: a file with one wnid per line")
    for name, value in (("train_per_class", train_per_class), ("val_per_class", val_per_class)):
        if value is not None and (not isinstance(value, int) or value < 1):  # -1 took all but the last image, 0 none
            raise DatasetError(f"{name}={value} is not valid; valid: an integer >= 1, or none given (every image)")
    for split in ("train", "val"):  # checked before writing: a val/ missing was found after train/'s links
        if not (src / split).is_dir():
            raise DatasetError(f"{src} has no {split}/ folder; valid: an ImageNet-layout tree ({src}/train/<class>/, "
                               f"{src}/val/<class>/)")
    available = class_names(src / "train")
    if classes is None:
        if num_classes is None or not 0 < num_classes <= len(available):
            raise DatasetError(f"num_classes={num_classes} must be between 1 and the {len(available)} classes of {src}")
        classes = available[:num_classes]
    unknown = sorted(set(classes) - set(available))
    if unknown:
        raise DatasetError(f"classes {unknown[:5]} are not in {src / 'train'}")
    no_val = sorted(set(classes) - set(class_names(src / "val")))
    if no_val:
        raise DatasetError(f"classes {no_val[:5]} are in {src / 'train'} but not in {src / 'val'}; a subset needs both")
    rng = random.Random(seed)
    dst.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{src.resolve()}\n")
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for name in classes:
            files = sorted(p for p in (src / split / name).iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
            if per_class is not None and per_class < len(files):
                files = sorted(rng.sample(files, per_class)) if seed is not None else files[:per_class]
            (dst / split / name).mkdir(parents=True, exist_ok=True)
            for f in files:
                link = dst / split / name / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    return classes


def check_workers(workers, flag: str = "--workers") -> None:
    """Processes of a preparation pool: a positive integer (0 or -2 ran one process without a word)."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise DatasetError(f"{flag} {workers!r} is not valid; valid: a positive integer (processes)")


def _check_image(path: str) -> str | None:
    try:
        with Image.open(path) as img:
            img.convert("RGB").load()  # a full decode: truncated files fail here, not at open
        return None
    except Exception as err:
        return f"{type(err).__name__}: {err}"


def find_unreadable(root: str | os.PathLike, workers: int = 2, progress: bool = True) -> list[tuple[str, str]]:
    """(path, reason) for every image file under `root` that does not decode; DatasetError when it holds none."""
    check_workers(workers)
    files = sorted(str(p) for p in pathlib.Path(root).rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:  # a wrong root must not pass as a dataset with no bad images
        raise DatasetError(f"{root} holds no image files ({' '.join(IMG_EXTENSIONS)}); pass a dataset root")
    bad = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_check_image, files, chunksize=64)
        for path, reason in progress_bar(zip(files, results), total=len(files), desc="verifying", unit="img", disable=not progress):
            if reason is not None:
                bad.append((path, reason))
    return bad


def _resize_one(job: tuple[str, str, int]) -> str | None:
    src, dst, short_side = job
    try:
        with Image.open(src) as img:
            img = img.convert("RGB")
            scale = short_side / min(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img.resize(size, Image.BICUBIC, reducing_gap=3.0).save(dst, quality=90)
        return None
    except Exception as err:
        return f"{src}: {type(err).__name__}: {err}"


def resize_tree(src: str | os.PathLike, dst: str | os.PathLike, short_side: int, workers: int = 2,
                progress: bool = True) -> pathlib.Path:
    """A copy of an ImageNet-layout tree with every image's shorter side resized to `short_side` (JPEG),
    so that small-resolution experiments do not decode full-size images every epoch. Written to a
    staging folder and renamed into place when complete; an existing complete copy is reused, and nothing
    else at `dst` is replaced (`reusable_copy`)."""
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    check_workers(workers)
    reusable_copy(src, dst, short_side)  # a refusal writes nothing, not even the lock file; asked again under the lock
    with exclusive(dst):  # a second process started at the same time waits here, then reuses the copy
        return _resize_tree(src, dst, short_side, workers, progress)


def reusable_copy(src: pathlib.Path, dst: pathlib.Path, short_side: int) -> bool:
    """Whether `dst` already is the `short_side` px copy of `src`; DatasetError when it cannot become one (a bad
    side, a copy at another side or of another tree, a folder a resize did not write). Writes nothing."""
    if not isinstance(short_side, int) or isinstance(short_side, bool) or short_side < 1:
        raise DatasetError(f"short side {short_side!r} is not valid; valid: a positive integer (pixels)")
    marker = dst / "RESIZED"
    if not marker.is_file():
        ensure_replaceable(dst, "RESIZED", "a resize")
        return False
    made, wanted = marker.read_text().strip(), f"{src.resolve()} {short_side}"
    if made == wanted:
        return True
    source, _, side = made.rpartition(" ")
    raise DatasetError(f"{dst} holds the {side} px copy of {source}, not the {short_side} px copy of {src.resolve()} "
                       f"asked for; write it to another folder, or delete {dst} to remake it")


def _resize_tree(src: pathlib.Path, dst: pathlib.Path, short_side: int, workers: int, progress: bool) -> pathlib.Path:
    if reusable_copy(src, dst, short_side):
        return dst
    log.info("writing a %d px copy of %s into %s", short_side, src, dst)
    check = [split for split in ("train", "val") if not (src / split).is_dir()]
    if check:
        raise DatasetError(f"{src} has no {check[0]}/ folder to resize; expected an ImageNet-layout tree")
    staging = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    jobs = []
    for path in sorted(src.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMG_EXTENSIONS:
            target = staging / path.relative_to(src).with_suffix(".JPEG")
            target.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((str(path), str(target), short_side))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        failures = [f for f in progress_bar(pool.map(_resize_one, jobs, chunksize=64), total=len(jobs), desc=f"resizing to {short_side}px",
                                    unit="img", disable=not progress) if f]
    if failures:
        raise DatasetError(f"{len(failures)} images could not be resized (first: {failures[0]}); see scripts/verify_dataset.py")
    (staging / "RESIZED").write_text(f"{src.resolve()} {short_side}\n")
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(staging, dst)
    return dst
