#!/usr/bin/env python
"""Build an ImageNet-N subset (symlinks) for quick experiments.

  python scripts/make_subset.py --src /data/imagenet --dst /data/imagenet100 --classes 100 --train-per-class 300
  python scripts/make_subset.py --src /data/imagenet --dst /data/mine --class-list wnids.txt
"""
import argparse
import sys

from mabn.data.folder import DatasetError
from mabn.data.prepare import make_subset, run_cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="ImageNet-layout root (train/, val/)")
    parser.add_argument("--dst", required=True, help="where the subset's symlink tree goes")
    parser.add_argument("--classes", type=int, help="take the first N classes (sorted wnids)")
    parser.add_argument("--class-list", help="file with one wnid per line (instead of --classes)")
    parser.add_argument("--train-per-class", type=int, help="images per class in train (default: all)")
    parser.add_argument("--val-per-class", type=int, help="images per class in val (default: all)")
    parser.add_argument("--seed", type=int, help="pick images at random with this seed (default: the first K)")
    args = parser.parse_args()
    if not args.class_list and args.classes is None:
        parser.error("give --classes N or --class-list FILE")

    def subset() -> str:
        listed = None
        if args.class_list:
            try:
                with open(args.class_list) as f:
                    listed = [line.split()[0] for line in f if line.strip()]
            except (OSError, UnicodeDecodeError) as err:
                raise DatasetError(f"--class-list {args.class_list} cannot be read ({type(err).__name__}: {err}); "
                                   "valid: a text file with one wnid per line") from None
        chosen = make_subset(args.src, args.dst, args.classes, listed, args.train_per_class, args.val_per_class, args.seed)
        return f"subset of {len(chosen)} classes at {args.dst}"

    return run_cli(subset)


if __name__ == "__main__":
    sys.exit(main())
