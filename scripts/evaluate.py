#!/usr/bin/env python
"""Evaluate a trained run: top-1/top-5 error of its best checkpoint (or a given one) on its val set or another
folder in the ImageNet layout, at its test resolution or another, optionally beside the same weights with
re-estimated norm statistics (--precise-stats) and with the norms folded into the convs (--fold).

  python scripts/evaluate.py outputs/train/<run>                          # the run's best checkpoint, its val set
  python scripts/evaluate.py outputs/train/<run> --fold                   # and the folded network: same predictions
  python scripts/evaluate.py outputs/train/<run>/checkpoints/step-00004000.pt --crop-size 224 --val-resize 256
  python scripts/evaluate.py outputs/train/<run> --root /data/imagenet-r --split val --out imagenet-r.json
  python scripts/evaluate.py outputs/train/<run> --precise-stats 8192     # and with re-estimated norm statistics
  python scripts/evaluate.py outputs/train/<run> --precise-stats 32768 --precise-epoch 1   # another draw, more images
  make eval ARGS="--fold"                                                 # the newest run under outputs/
  make eval RUN=outputs/train/<run> ARGS="--crop-size 224 --val-resize 256"

A test folder's class folders must carry the run's class names (a subset is fine); labels follow the names.
A new --crop-size alone keeps the run's resize/crop ratio (256/224). The running statistics are the
rank-averaged ones the run's own evaluation used. Prints a table; --out also writes it as JSON (with the
source commit).
"""
import argparse
import json
import logging
import pathlib
import sys

from mabn.checkpoint import atomic_write_text
from mabn.data import DatasetError
from mabn.evaluation import DEVICES, EvalSettings, evaluate_checkpoint, newest_run, summary
from mabn.models.trained import RunError, check_output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", help="a run dir of `python -m mabn.train` (its best checkpoint) or a checkpoint "
                        "file (default: the newest run under --outputs)")
    parser.add_argument("--outputs", default="outputs", help="where to look for the newest run (default: outputs)")
    parser.add_argument("--root", help="a folder holding <split>/<class>/* (default: the run's data.root)")
    parser.add_argument("--split", default="val", help="the split folder under the root (default: val)")
    parser.add_argument("--folder-classes-only", action="store_true",
                        help="predict among the folder's classes only (ImageNet-A/-R's protocol for their 200-class "
                        "subsets; default: among all of the run's classes)")
    parser.add_argument("--crop-size", type=int, help="center-crop size in px (default: the run's data.crop_size)")
    parser.add_argument("--val-resize", type=int, help="shorter side before the crop (default: the run's ratio to the crop)")
    parser.add_argument("--batch", type=int, default=100, help="images per forward pass (default: 100)")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes (default: 2)")
    parser.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)} (default: auto, a GPU if any)")
    parser.add_argument("--amp", action="store_true", help="autocast to float16 (CUDA) / bfloat16 (CPU)")
    parser.add_argument("--fold", action="store_true", help="also score the network with its norms folded into its convs")
    parser.add_argument("--precise-stats", type=int, default=0, metavar="IMAGES",
                        help="also score with the norms' statistics re-estimated on about this many training images "
                        "with the final weights (PreciseBN; e.g. 8192; default 0: off)")
    parser.add_argument("--precise-average", default="auto",
                        help="equal: each batch's estimate weighs the same, the statistics held at the trained values "
                        "(PreciseBN; exact for BN); ema: the layers' own moving averages replayed from the trained "
                        "values, all layers together (give enough images to forget those); auto (default): ema with "
                        "BRN or MABN layers, whose training forward normalizes by their running statistics, else equal")
    parser.add_argument("--precise-epoch", type=int, default=0, metavar="E",
                        help="take the re-estimation's images in training epoch E's order and augmentation, "
                        "and the next epochs' when more are asked for (default 0; another E: another draw)")
    parser.add_argument("--out", help="also write the result to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    settings = EvalSettings(root=args.root, split=args.split, crop_size=args.crop_size, val_resize=args.val_resize,
                            batch=args.batch, workers=args.workers, device=args.device, amp=args.amp, fold=args.fold,
                            folder_classes_only=args.folder_classes_only,
                            precise_images=args.precise_stats, precise_average=args.precise_average,
                            precise_epoch=args.precise_epoch,
                            progress=not args.no_progress)
    try:
        if args.out:
            check_output(args.out, "eval.json")
        run = args.run
        if run is None:
            run = newest_run(args.outputs)
            print(f"the newest run under {args.outputs}/: {run}")
        record = evaluate_checkpoint(run, settings)
    except (RunError, DatasetError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary(record)))
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
