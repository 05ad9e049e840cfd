#!/usr/bin/env python
"""Make a copy of an ImageNet-layout tree at a small resolution (shorter side in pixels), for CPU experiments.

  python scripts/resize_dataset.py --src ../shared/data/imagenette --dst .cache/datasets/imagenette-80px --short-side 80
"""
import argparse
import os
import pathlib
import sys

from mabn.data.prepare import resize_tree, run_cli
from mabn.preflight import writable_dir_problem


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True)
    parser.add_argument("--dst", required=True)
    parser.add_argument("--short-side", type=int, required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    problem = writable_dir_problem(pathlib.Path(args.dst).absolute())
    if problem:  # a file at or above it was OSError's bare text
        print(f"error: --dst {args.dst} cannot be written: {problem}; valid: a new or empty folder", file=sys.stderr)
        return 2
    return run_cli(lambda: f"resized copy at {resize_tree(args.src, args.dst, args.short_side, args.workers)}")


if __name__ == "__main__":
    sys.exit(main())
