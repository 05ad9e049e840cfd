#!/usr/bin/env python
"""Decode every image under a dataset root and list the unreadable or corrupt ones.

  python scripts/verify_dataset.py /data/imagenet --workers 8 --out bad_images.txt
Exit status 1 when any image fails, 0 otherwise.
"""
import argparse
import os
import pathlib
import sys

from mabn.checkpoint import atomic_write_text
from mabn.data import DatasetError
from mabn.data.prepare import find_unreadable
from mabn.preflight import writable_dir_problem


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="dataset root (any folder of images)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    parser.add_argument("--out", help="also write the bad paths here, one per line")
    args = parser.parse_args()
    try:
        if not os.path.isdir(args.root):
            raise DatasetError(f"{args.root} is not a folder")
        if args.out and os.path.isdir(args.out):  # found out after hours of decoding, it lost the list
            raise DatasetError(f"--out {args.out} is a directory; valid: a file path such as {args.out}/bad_images.txt")
        problem = args.out and writable_dir_problem(pathlib.Path(args.out).absolute().parent)
        if problem:  # a file above it was mkdir's traceback, after the decoding
            raise DatasetError(f"--out {args.out} cannot be written: {problem}; valid: a file path in a writable folder")
        bad = find_unreadable(args.root, args.workers)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, reason in bad:
        print(f"{path}\t{reason}")
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, "".join(f"{path}\n" for path, _ in bad))
    print(f"{len(bad)} unreadable images under {args.root}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
