#!/usr/bin/env python
"""Sort ImageNet's flat validation folder into class folders (the layout every loader reads).

Either labels file works:
  Kaggle layout:  python scripts/prepare_imagenet.py --val-dir /data/imagenet/val --loc-csv LOC_val_solution.csv
  devkit layout:  python scripts/prepare_imagenet.py --val-dir /data/imagenet/val \\
                      --ground-truth ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt \\
                      --meta ILSVRC2012_devkit_t12/data/meta.mat
By default files are moved in place; --out DIR writes a new tree (copies, or symlinks with --link).
"""
import argparse
import pathlib
import sys

from mabn.data.prepare import (
    run_cli,
    sort_val_folder,
    val_labels_from_devkit,
    val_labels_from_loc_csv,
)
from mabn.preflight import writable_dir_problem


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--val-dir", required=True, help="flat folder of ILSVRC2012_val_*.JPEG")
    parser.add_argument("--loc-csv", help="LOC_val_solution.csv")
    parser.add_argument("--ground-truth", help="devkit ILSVRC2012_validation_ground_truth.txt")
    parser.add_argument("--meta", help="devkit meta.mat (with --ground-truth)")
    parser.add_argument("--out", help="write the sorted tree here instead of moving files in place")
    parser.add_argument("--link", action="store_true", help="with --out: symlink instead of copy")
    args = parser.parse_args()
    if bool(args.loc_csv) == bool(args.ground_truth or args.meta) or not (args.loc_csv or (args.ground_truth and args.meta)):
        parser.error("give --loc-csv, or --ground-truth with --meta (one labels file, not both)")
    if args.link and not args.out:  # in place, it left the images where they were and linked them into class folders
        parser.error("--link needs --out (in place, the images are moved)")
    # both checked before the labels are read: either was an OSError's bare text, --out's after the bar had started
    if not pathlib.Path(args.val_dir).is_dir():
        print(f"error: --val-dir={args.val_dir!r} is not a folder; valid: ImageNet's flat validation folder "
              "(ILSVRC2012_val_*.JPEG)", file=sys.stderr)
        return 2
    problem = args.out and writable_dir_problem(pathlib.Path(args.out).absolute())
    if problem:
        print(f"error: --out={args.out!r} is not valid: {problem}; give a folder to write the sorted tree in",
              file=sys.stderr)
        return 2

    def sort_val() -> str:
        if args.loc_csv:
            labels = val_labels_from_loc_csv(args.loc_csv)
        else:
            labels = val_labels_from_devkit(args.ground_truth, args.meta)
        count = sort_val_folder(args.val_dir, labels, args.out, args.link)
        return f"sorted {count} validation images into class folders under {args.out or args.val_dir}"

    return run_cli(sort_val)


if __name__ == "__main__":
    sys.exit(main())
