#!/usr/bin/env python
"""Plots from run dirs: top-1 error vs normalization batch (one line per norm, like the paper's figure),
and training curves of several runs on one plot.

  python scripts/plot_results.py error-vs-batch outputs --out outputs/error_vs_batch.png [--paper]
  python scripts/plot_results.py curves outputs/train/run_a outputs/train/run_b --out curves.png
"""
import argparse
import collections
import pathlib
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mabn.norms import is_per_sample  # noqa: E402
from mabn.results import PAPER_FIGURE, figure_path, find_runs, load_run  # noqa: E402


NORM_COLORS = {"bn": "C0", "brn": "C1", "mabn": "C2", "gn": "C3", "syncbn": "C4", "ln": "C5", "in": "C6"}


def error_lines(runs) -> dict:
    """{panel: {(norm, line label): {b: [final errors]}}}, one panel per (data, model, epochs).

    Runs at another per-process batch N than the panel's usual one (e.g. a real batch of 2 beside ghost
    batches in N = 32) get their own line. A per-sample norm (GN, LN, IN) has no normalization batch:
    its runs stand at every b of the panel, so it is drawn flat, as in the paper's figure. The usual N is the
    most common one, a tie going to the larger N, as in results.figure_markdown's table."""
    counts = collections.Counter(r.batch_per_gpu for r in runs)
    usual_n = max(counts, key=lambda n: (counts[n], n))
    panels = collections.defaultdict(lambda: collections.defaultdict(lambda: collections.defaultdict(list)))
    for run in runs:
        line = run.tag + ("" if run.batch_per_gpu == usual_n else f" N={run.batch_per_gpu}")
        panels[(run.data, run.model, run.schedule_epochs)][(run.norm, line)][run.norm_batch].append(run.final_err)
    for lines in panels.values():
        batches = {b for (norm, _), by_batch in lines.items() if not is_per_sample(norm) for b in by_batch}
        for (norm, line), by_batch in list(lines.items()):
            if is_per_sample(norm) and batches:
                errs = [e for b in sorted(by_batch) for e in by_batch[b]]
                lines[(norm, line)] = {b: errs for b in batches}
    return panels


def error_vs_batch(roots, out, paper: bool, with_tags: bool = False) -> None:
    try:
        finished = [r for r in find_runs(*roots) if r.finished]
    except ValueError as err:
        sys.exit(f"error: {err}")
    runs = [r for r in finished if with_tags or not r.tag]
    if not runs and finished:  # all tagged: "no finished runs" sent one looking for a training problem
        tags = sorted({r.tag for r in finished})
        sys.exit(f"error: no untagged finished runs under {', '.join(map(str, roots))}; the {len(finished)} finished runs there "
                 f"are tagged ({', '.join(tags[:3])}{', ...' if len(tags) > 3 else ''}): --with-tags draws them")
    if not runs:
        sys.exit(f"error: no finished runs under {', '.join(map(str, roots))}")
    panels = error_lines(runs)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], sorted(panels.items())):
        for (norm, tag), by_batch in sorted(lines.items()):
            batches = sorted(by_batch)
            means = [statistics.fmean(by_batch[b]) for b in batches]
            stds = [statistics.stdev(by_batch[b]) if len(by_batch[b]) > 1 else 0.0 for b in batches]
            ax.errorbar(batches, means, yerr=stds, marker="o", capsize=3, label=f"{norm}{tag}",
                        color=None if tag else NORM_COLORS.get(norm))
        if paper:
            for norm, points in PAPER_FIGURE.items():
                xs = sorted(points)
                ax.plot(xs, [points[x] for x in xs], linestyle="--", alpha=0.5, color=NORM_COLORS.get(norm),
                        label=f"paper {norm} (R50 ImageNet)")
        ax.set_xscale("log", base=2)
        ax.invert_xaxis()
        ax.set_xlabel("normalization batch b")
        ax.set_ylabel("val top-1 error (%)")
        ax.set_title("{} / {} / {} epochs".format(*panel))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def curves(run_dirs, out) -> None:
    fig, (loss_ax, err_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for path in run_dirs:
        run = load_run(pathlib.Path(path))
        if run is None or not run.epochs:
            sys.exit(f"error: {path} is not a run dir with metrics")
        label = f"{run.norm} b={run.norm_batch} N={run.batch_per_gpu}{run.tag} s{run.seed}"
        epochs = [e["epoch"] for e in run.epochs]
        loss_ax.plot(epochs, [e["train_loss"] for e in run.epochs], marker=".", label=label)
        err_ax.plot(epochs, [e["val_top1_err"] for e in run.epochs], marker=".", label=label)
    loss_ax.set(xlabel="epoch", ylabel="train loss")
    err_ax.set(xlabel="epoch", ylabel="val top-1 error (%)")
    for ax in (loss_ax, err_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    e = sub.add_parser("error-vs-batch", help="top-1 error vs normalization batch, one line per norm")
    e.add_argument("roots", nargs="+")
    e.add_argument("--out", default="error_vs_batch.png")
    e.add_argument("--paper", action="store_true", help="also draw the paper's ImageNet figure (dashed)")
    e.add_argument("--with-tags", action="store_true", help="also draw tagged runs (ablations), one line per tag")
    c = sub.add_parser("curves", help="train loss and val error per epoch of several runs")
    c.add_argument("runs", nargs="+")
    c.add_argument("--out", default="curves.png")
    args = parser.parse_args()
    try:
        figure_path(args.out)
    except ValueError as err:
        sys.exit(f"error: {err}")
    if args.what == "error-vs-batch":
        error_vs_batch(args.roots, args.out, args.paper, args.with_tags)
    else:
        curves(args.runs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
