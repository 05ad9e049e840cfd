#!/usr/bin/env python
"""An ImageNet-size tree of links to a small pool of real JPEGs: rehearse start-up, memory and checkpoints at
1.28 M files without ImageNet, in minutes and a few MB of disk.

  python scripts/fake_imagenet.py --dst /tmp/fake_imagenet                      # 1000 classes x 1281 + 50
  python scripts/fake_imagenet.py --dst /tmp/fi --pool ../shared/data/imagenette --classes 100 --train-per-class 100

Each file is a short relative link (`../../.pool/<k>.JPEG`, stored inside its inode: no data block) to
one of DST/.pool's images, which link to the pool's JPEGs (Imagenette's when --pool is given, else
generated shapes); names are ImageNet's (n<wnid>_<k>.JPEG), so every loader reads real JPEG bytes.
"""
import argparse
import os
import pathlib
import sys

from mabn.data.folder import IMG_EXTENSIONS
from mabn.preflight import writable_dir_problem
from mabn.progress import progress_bar


def pool_images(pool: str | None, dst: pathlib.Path) -> list[str]:
    """The pool's JPEGs, or 200 generated ones written into dst/.pool (beside train/ and val/)."""
    if pool:
        files = sorted(str(p.resolve()) for p in pathlib.Path(pool).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise SystemExit(f"error: --pool={pool!r} holds no images ({', '.join(IMG_EXTENSIONS)}); give a folder of JPEGs")
        return files
    from mabn.data.shapes import generate

    root = generate(dst / ".pool", train_per_class=20, val_per_class=1, size=160, progress=False)
    return sorted(str(p.resolve()) for p in (root / "train").rglob("*.JPEG"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dst", required=True, help="folder to create (must not exist, or be empty)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--train-per-class", type=int, default=1281)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--pool", help="folder of real JPEGs to link to (default: generated shapes)")
    args = parser.parse_args()
    for name in ("classes", "train_per_class", "val_per_class"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')}={getattr(args, name)} is not valid; valid: an integer >= 1", file=sys.stderr)
            return 2
    dst = pathlib.Path(os.path.expanduser(args.dst))
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        print(f"error: --dst={args.dst!r} exists and is not an empty folder; give a new folder", file=sys.stderr)
        return 2
    problem = writable_dir_problem(dst.absolute())  # a file above it: NotADirectoryError's traceback at mkdir
    if problem:
        print(f"error: --dst={args.dst!r} is not valid: {problem}; give a new folder", file=sys.stderr)
        return 2
    pool = pool_images(args.pool, dst)
    (dst / ".pool").mkdir(parents=True, exist_ok=True)
    for k, source in enumerate(pool):  # one long link per pool image; the tree's links stay short
        if not (dst / ".pool" / f"{k}.JPEG").exists():
            os.symlink(source, dst / ".pool" / f"{k}.JPEG")
    total = args.classes * (args.train_per_class + args.val_per_class)
    with progress_bar(total=total, unit="link", desc="linking") as bar:
        k = 0
        for c in range(args.classes):
            wnid = f"n{90000000 + c:08d}"
            for split, count in (("train", args.train_per_class), ("val", args.val_per_class)):
                folder = dst / split / wnid
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    os.symlink(f"../../.pool/{k % len(pool)}.JPEG", folder / f"{wnid}_{i:05d}.JPEG")
                    k += 1
                bar.update(count)
    print(f"wrote {total} links to {len(pool)} pool images under {dst} ({args.classes} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
