#!/usr/bin/env python
"""Write a trained run's ResNet as a torchvision-layout backbone file, for detection and deployment.

  python scripts/export_backbone.py outputs/train/<run> --out backbone.pt          # our norm layers
  python scripts/export_backbone.py outputs/train/<run> --out deploy.pt --fold     # norms folded into plain convs

The run's best checkpoint is used (else its newest), with the rank-averaged running statistics that
evaluation used. Load it with `mabn.models.load_backbone(path)`, a `torchvision.models.ResNet`.
Only runs of resnet18/resnet50 at width 64 with the imagenet stem have a torchvision layout.
"""
import argparse
import sys

from mabn.models import ExportError, export_backbone


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run dir of `python -m mabn.train` (holds checkpoints/)")
    parser.add_argument("--out", required=True, help="file to write")
    parser.add_argument("--fold", action="store_true", help="fold every norm into its conv (plain convs with bias)")
    parser.add_argument("--checkpoint", help="this checkpoint instead of the run's best")
    args = parser.parse_args()
    try:
        info = export_backbone(args.run_dir, args.out, fold=args.fold, checkpoint=args.checkpoint)
    except (ExportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: torchvision {info['arch']} with {'folded convs' if info['folded'] else info['norm']} "
          f"({info['num_classes']} classes) from {info['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
