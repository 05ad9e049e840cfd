#!/usr/bin/env python
"""`make bench`: every benchmark, side by side in one process, as one markdown report.

  python -m scripts.bench.run_all [--quick] [--device cuda] [--out outputs/bench]
"""
import argparse
import datetime
import json
import pathlib
import platform
import sys

import torch

from mabn.host_memory import keep_freed_blocks

from . import bench_detection, bench_loaders, bench_models, bench_norms, bench_scale
from .common import device_name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer rounds (smoke run)")
    parser.add_argument("--no-compile", action="store_true", help="skip everything torch.compile'd (MABN kernels, compiled training steps)")
    parser.add_argument("--only", choices=["norms", "models", "detection", "loaders", "scale"],
                        help="run one part (scale runs only when asked: it builds a 1.28 M-file tree once)")
    parser.add_argument("--out", default="outputs/bench")
    args = parser.parse_args()
    # Checked before the minutes of measuring: a bad device failed at the first part, an --out file at the end.
    if args.device != "cpu" and not (args.device == "cuda" or args.device.startswith("cuda:")):
        parser.error(f"--device {args.device!r} is not valid; valid: cpu, cuda or cuda:N")
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here; valid: cpu")
    if pathlib.Path(args.out).exists() and not pathlib.Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file; valid: a folder for the bench_*.md and bench_*.json reports")
    if args.device == "cpu":
        keep_freed_blocks()  # as training on CPU does (mabn.train)
    parts = {
        "norms": ("Norm layers: training forward + backward", lambda: bench_norms.run(args.device, args.quick, not args.no_compile)),
        "models": ("ResNet-50: training step and inference", lambda: bench_models.run(args.device, args.quick, not args.no_compile)),
        "detection": ("Detection at a real batch of 2", lambda: bench_detection.run(args.device, args.quick)),
        "scale": ("ImageNet scale without ImageNet", lambda: bench_scale.run(args.device, args.quick)),
        "loaders": ("Input pipelines", lambda: bench_loaders.run(args.device, args.quick)),
    }
    report = [f"# mabn benchmarks\n\n{datetime.datetime.now():%Y-%m-%d %H:%M}, {device_name(args.device)}, "
              f"torch {torch.__version__}, Python {platform.python_version()}. Ratios are measured side by side "
              f"in one process (interleaved rounds, medians); absolute numbers beside them for scale.\n"]
    numbers = {}
    for key, (title, fn) in parts.items():
        if (args.only and key != args.only) or (key == "scale" and args.only != "scale"):
            continue
        print(f"running {key} ...", file=sys.stderr, flush=True)
        text, values = fn()
        report.append(f"## {title}\n\n{text}")
        numbers.update(values)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ("gpu" if args.device.startswith("cuda") else "cpu") + (f"_{args.only}" if args.only else "")  # a part never overwrites the whole report
    (out / f"bench_{suffix}.md").write_text("\n".join(report))
    (out / f"bench_{suffix}.json").write_text(json.dumps(numbers, indent=1))
    print("\n".join(report))
    print(f"written to {out / f'bench_{suffix}.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
