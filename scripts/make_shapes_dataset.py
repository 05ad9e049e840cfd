#!/usr/bin/env python
"""Generate the embedded default dataset (ten classes of drawn shapes) in the ImageNet layout.

`make train` does this on first use; run it by hand to choose the place or the size:
    python scripts/make_shapes_dataset.py --root .cache/datasets/shapes10 --train-per-class 260
"""
import argparse
import sys

from mabn.data.prepare import run_cli
from mabn.data.shapes import generate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".cache/datasets/shapes10",
                        help="output folder (a tree of an older generator is redrawn, one drawn with other options kept)")
    parser.add_argument("--train-per-class", type=int, default=260)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    return run_cli(lambda: f"dataset ready at "
                           f"{generate(args.root, args.train_per_class, args.val_per_class, args.size, args.seed)}")


if __name__ == "__main__":
    sys.exit(main())
