#!/usr/bin/env python
"""Top-1 error table of every run under the given folders, with the paper's numbers beside.

  python scripts/results_table.py outputs            # writes outputs/results.md, results.csv, runs.md (every run, its
                                                     # commits) and figure.md (norm x normalization batch, every seed)
  python scripts/results_table.py outputs/repro --out docs/results
"""
import argparse
import pathlib
import sys

from mabn.results import figure_markdown, find_runs, group_runs, runs_markdown, to_csv, to_markdown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="*", default=["outputs"], help="folders holding run dirs (searched recursively)")
    parser.add_argument("--out", help="folder for results.md and results.csv (default: the first root)")
    args = parser.parse_args()
    if args.out and pathlib.Path(args.out).exists() and not pathlib.Path(args.out).is_dir():
        print(f"error: --out {args.out} is a file; valid: a folder for results.md, results.csv, runs.md and figure.md",
              file=sys.stderr)
        return 2
    try:
        runs = find_runs(*args.roots)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: no run dirs (metrics.jsonl + .hydra/config.yaml) under {', '.join(args.roots)}", file=sys.stderr)
        return 2
    rows = group_runs(runs)
    out = pathlib.Path(args.out or args.roots[0])
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows)
    (out / "results.md").write_text(markdown)
    (out / "results.csv").write_text(to_csv(rows))
    (out / "runs.md").write_text(runs_markdown(runs))
    figure = figure_markdown(rows)
    (out / "figure.md").write_text(figure)
    print(markdown)
    print(figure)
    print(f"({len(runs)} run{'' if len(runs) == 1 else 's'}; written to {out / 'results.md'}, {out / 'results.csv'}, {out / 'runs.md'} and "
          f"{out / 'figure.md'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
