#!/usr/bin/env python
"""Plot the batch statistics recorded with `stats.enabled=true` (SPEC §6) for two or more runs side by side,
and print, per layer, the standard deviation of each statistic over iterations: the paper's argument
that the backward statistics (g_B, Psi_B) are as noisy as the forward ones, as a picture and a number.

  python scripts/plot_batch_stats.py outputs/train/bn_b2 outputs/train/bn_b32 outputs/train/mabn_b2 --out stats.png

`--lag-windows 160,300,600` also prints, for MABN and BRN runs, how far the statistic the layer divides by
is from the current group's own: for MABN the moving average chi_avg against chi_B = sigma^2_B + mu_B^2,
for BRN the running variance (what its r carries the normalization to, within r's clip) against
sigma^2_B; the median of used / own - 1 over the recorded iterations of each window. Averaging stale
statistics shows as a bias of one sign; a small group's own noise as a spread around a small positive
median. (BN divides by its own sigma^2_B in training: no row.) For BRN runs that recorded them, it then
prints the share of all BRN (group, channel) pairs whose r or d sat at its clip limit, averaged over each
window's recorded iterations: where BRN trained as its eval-mode op (0 %) and where it did not. For runs
trained with `stats.all_layers=true` it prints the same lag over every MABN/BRN layer and all their
channels: the median of used / own - 1 (each layer's median over channels, then the median over layers
and iterations) and the mean |log(used / own)|.
"""
import argparse
import pathlib
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mabn.checkpoint import read_records  # noqa: E402
from mabn.results import figure_path, load_run  # noqa: E402

STATISTICS = ["mu_B", "sigma2_B", "g_B", "Psi_B"]
# What MABN normalizes with instead of sigma^2_B and Psi_B: its moving averages (drawn dashed on those panels).
AVERAGED = {"sigma2_B": "chi_avg", "Psi_B": "Psi_avg"}
CLIPS = "brn_clips"  # not a layer: BRN's clip rates over all its layers
LAG = "lag"  # not a layer: every MABN/BRN layer's lag over all its channels (stats.all_layers)


def load_stats(run_dir: pathlib.Path) -> tuple[str, dict, str]:
    """The run's label, its recorded series {layer: {statistic: [(step, value)]}} and its norm; BRN's clip
    rates, where recorded, as the series of the pseudo-layer CLIPS: {"r": [(step, share)], "d": [...]}, and
    the all-layer lag as LAG's: {layer: [(step, [median used/own - 1, mean |log used/own|])]}."""
    path = run_dir / "batch_stats.jsonl"
    if not path.is_file():
        sys.exit(f"error: {path} missing; train with stats.enabled=true")
    series: dict = {}
    for record in read_records(path):
        for layer, values in record["layers"].items():
            for key, value in values.items():
                series.setdefault(layer, {}).setdefault(key, []).append((record["step"], value))
        for key in ("r", "d") if "brn_clips" in record else ():
            series.setdefault(CLIPS, {}).setdefault(key, []).append((record["step"], record["brn_clips"][key]))
        for layer, value in record.get("lag", {}).items():
            series.setdefault(LAG, {}).setdefault(layer, []).append((record["step"], value))
    run = load_run(run_dir)
    label = f"{run.norm} b={run.norm_batch} N={run.batch_per_gpu}{run.tag} s{run.seed}" if run else run_dir.name
    return label, series, run.norm if run else ""


def used_over_own(stats: dict, norm: str) -> list[tuple[int, float]]:
    """(step, used / own - 1) of what the layer divides by in training against its group's own statistic."""
    if "chi_avg" in stats:  # MABN: SMA of the second moment (NaN while its ring fills)
        return [(step, avg / (var + mu * mu) - 1) for (step, avg), (_, var), (_, mu)
                in zip(stats["chi_avg"], stats["sigma2_B"], stats["mu_B"]) if avg == avg]
    if norm == "brn" and "running_var" in stats:
        return [(step, run_var / var - 1) for (step, run_var), (_, var) in zip(stats["running_var"], stats["sigma2_B"])]
    return []


def lag_table(loaded: list, layers: list, edges: list[int]) -> list[str]:
    """Markdown rows: median of used / own - 1 per layer, MABN or BRN run and window [edges[i], edges[i+1])."""
    windows = list(zip(edges, edges[1:]))
    rows = ["| layer | run | " + " | ".join(f"used/own - 1, iterations [{a}, {b})" for a, b in windows) + " |",
            "|---|---|" + "---|" * len(windows)]
    for layer in layers:
        for label, series, norm in loaded:
            ratios = used_over_own(series.get(layer, {}), norm)
            if not ratios:
                continue
            cells = []
            for a, b in windows:
                inside = [r for step, r in ratios if a <= step < b]
                cells.append(f"{statistics.median(inside):+.3f} (n={len(inside)})" if inside else "-")
            rows.append(f"| {layer} | {label} | " + " | ".join(cells) + " |")
    return rows


def run_window_table(loaded: list, edges: list[int], key: str, heading: str, cell) -> list[str]:
    """Markdown rows, one per run that recorded the pseudo-layer `key`: `cell(records, a, b)` per window
    [edges[i], edges[i+1]); no rows at all when no run recorded it."""
    windows = list(zip(edges, edges[1:]))
    rows = ["| run | " + " | ".join(f"{heading}, iterations [{a}, {b})" for a, b in windows) + " |",
            "|---|" + "---|" * len(windows)]
    for label, series, _ in loaded:
        if series.get(key):
            rows.append(f"| {label} | " + " | ".join(cell(series[key], a, b) for a, b in windows) + " |")
    return rows if len(rows) > 2 else []


def clip_table(loaded: list, edges: list[int]) -> list[str]:
    """Markdown rows: BRN's shares of pairs with r and with d clipped, mean per run and window (in %)."""
    def cell(clips, a, b):
        r = [v for step, v in clips["r"] if a <= step < b]
        d = [v for step, v in clips["d"] if a <= step < b]
        return f"{100 * statistics.fmean(r):.2f} % / {100 * statistics.fmean(d):.2f} % (n={len(r)})" if r else "-"

    return run_window_table(loaded, edges, CLIPS, "r / d clipped", cell)


def all_layers_table(loaded: list, edges: list[int]) -> list[str]:
    """Markdown rows: the lag over every MABN/BRN layer and channel, per run and window (stats.all_layers)."""
    def cell(lag, a, b):
        inside = [value for points in lag.values() for step, value in points if a <= step < b]
        return (f"{statistics.median(v[0] for v in inside):+.3f}, {statistics.fmean(v[1] for v in inside):.3f} "
                f"(n={len(inside)})" if inside else "-")

    return run_window_table(loaded, edges, LAG, "used/own - 1, mean abs log", cell)


def parse_edges(text: str) -> list[int]:
    try:
        edges = [int(v) for v in text.split(",")]
    except ValueError:
        edges = []
    if len(edges) < 2 or edges != sorted(set(edges)):
        sys.exit(f"error: --lag-windows={text!r} is not valid; valid: two or more increasing iterations, e.g. 160,300,600")
    return edges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run dirs trained with stats.enabled=true")
    parser.add_argument("--out", default="batch_stats.png")
    parser.add_argument("--lag-windows", help="iterations bounding windows, e.g. 160,300,600: MABN's and BRN's averaging lag per window")
    args = parser.parse_args()
    try:
        figure_path(args.out)
    except ValueError as err:
        sys.exit(f"error: {err}")
    edges = parse_edges(args.lag_windows) if args.lag_windows else None
    loaded = [load_stats(pathlib.Path(r)) for r in args.runs]
    layers = sorted({layer for _, series, _ in loaded for layer in series} - {CLIPS, LAG})
    fig, axes = plt.subplots(len(layers), len(STATISTICS), figsize=(4 * len(STATISTICS), 3 * len(layers)), squeeze=False)
    columns = STATISTICS + list(AVERAGED.values())
    print("| layer | run | " + " | ".join(f"std {s}" for s in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for row, layer in enumerate(layers):
        for label, series, _ in loaded:
            stds = []
            for col, stat in enumerate(STATISTICS):
                for name, style in ((stat, "-"), (AVERAGED.get(stat), "--")):
                    points = series.get(layer, {}).get(name, []) if name else []
                    if points:  # x: fraction of the run, so runs with different steps per epoch line up
                        last = max(p[0] for p in points) or 1
                        axes[row][col].plot([p[0] / last for p in points], [p[1] for p in points], style,
                                            label=label if style == "-" else f"{label} ({name})", linewidth=0.8)
            for stat in columns:
                values = [p[1] for p in series.get(layer, {}).get(stat, []) if p[1] == p[1]]  # NaN: ring not full yet
                stds.append(f"{statistics.pstdev(values):.3g}" if len(values) > 1 else "-")
            print(f"| {layer} | {label} | " + " | ".join(stds) + " |")
        for col, stat in enumerate(STATISTICS):
            axes[row][col].set_title(f"{layer}: {stat}", fontsize=9)
            axes[row][col].set_xlabel("fraction of training")
            axes[row][col].grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    if edges:
        print()
        print("\n".join(lag_table(loaded, layers, edges)))
        for extra in (clip_table(loaded, edges), all_layers_table(loaded, edges)):
            if extra:
                print()
                print("\n".join(extra))
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
