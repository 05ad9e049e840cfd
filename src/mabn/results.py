"""Result tables from run dirs: group runs by setting, average over seeds, lay the paper's numbers beside."""
import collections
import csv
import io
import math
import pathlib
import statistics
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from .checkpoint import read_records
from .resume import flat, is_operational

# SPEC §5: ResNet-50 ImageNet val top-1 error (%), by (norm, normalization batch).
PAPER_TABLE = {("bn", 32): 23.41, ("bn", 2): 35.22, ("brn", 2): 30.29, ("mabn", 2): 23.67}
# The paper's figure (read off the plot, +-0.1) and GN's batch-independent number (GN paper).
PAPER_FIGURE = {
    "bn": {32: 23.4, 16: 24.3, 8: 25.45, 4: 27.9, 2: 35.2},
    "brn": {32: 23.55, 16: 24.4, 8: 25.3, 4: 26.85, 2: 30.3},
    "mabn": {32: 23.6, 16: 23.6, 8: 23.6, 4: 23.6, 2: 23.67},
    "gn": {32: 24.1, 16: 24.1, 8: 24.1, 4: 24.1, 2: 24.1},
}


def paper_top1_err(norm: str, norm_batch: int) -> float | None:
    return PAPER_TABLE.get((norm, norm_batch), PAPER_FIGURE.get(norm, {}).get(norm_batch))


@dataclass
class Run:
    path: pathlib.Path
    data: str
    model: str
    norm: str
    norm_batch: int
    batch_per_gpu: int
    tag: str
    seed: int
    schedule_epochs: int
    epochs: list[dict] = field(default_factory=list)
    finished: bool = False
    settings: dict = field(default_factory=dict)  # every setting that shapes training (`run_settings`)

    @property
    def key(self) -> tuple:
        return (self.data, self.model, self.schedule_epochs, self.norm, self.norm_batch, self.batch_per_gpu, self.tag)

    @property
    def final_err(self) -> float | None:
        return self.epochs[-1]["val_top1_err"] if self.epochs else None

    @property
    def best_err(self) -> float | None:
        return min(e["val_top1_err"] for e in self.epochs) if self.epochs else None


def figure_path(out: str | pathlib.Path) -> pathlib.Path:
    """A plot's `--out`, checked before any run is read: a file whose suffix names a format matplotlib writes
    (given none, matplotlib would add .png and the script name a file it did not write)."""
    from matplotlib.backend_bases import FigureCanvasBase  # only the plotting scripts need matplotlib

    out = pathlib.Path(out)
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; valid: a file path such as {out / 'figure.png'}")
    if out.suffix.lstrip(".").lower() not in formats:
        problem = f"matplotlib does not write {out.suffix}" if out.suffix else "no suffix to name the format"
        raise ValueError(f"--out {out}: {problem}; valid: a file ending in .{', .'.join(formats)}")
    return out


def load_run(run_dir: pathlib.Path) -> Run | None:
    config_file, metrics_file = run_dir / ".hydra" / "config.yaml", run_dir / "metrics.jsonl"
    if not (config_file.is_file() and metrics_file.is_file()):
        return None
    cfg = OmegaConf.load(config_file)
    run = Run(
        path=run_dir, data=cfg.data.name, model=cfg.model.name, norm=cfg.norm.name,
        norm_batch=int(cfg.norm.norm_batch), batch_per_gpu=int(cfg.data.batch_per_gpu), tag=str(cfg.get("tag", "")),
        seed=int(cfg.seed), schedule_epochs=int(cfg.schedule.epochs), settings=run_settings(cfg),
    )
    for record in read_records(metrics_file):
        if "epoch" in record:
            run.epochs.append(record)
        elif record.get("event") == "finished":
            run.finished = True
    return run


def run_settings(cfg) -> dict:
    """{dotted key: value} of the settings that shape training, as the resume check sees them, less the seed:
    what the seeds averaged in one row must share."""
    try:
        settings = flat(cfg)
    except Exception:  # noqa: BLE001 - an interpolation this process cannot resolve: compare the text
        settings = flat(cfg, resolve=False)
    return {k: v for k, v in settings.items() if not is_operational(k) and k != "seed"}


def mixed_settings(runs: list[Run]) -> dict[str, list]:
    """Settings whose values differ between `runs` ({key: the distinct values}); a key some runs lack (a
    setting added after they ran) is not compared."""
    out = {}
    for key in sorted(set().union(*(r.settings for r in runs))) if runs else ():
        if all(key in r.settings for r in runs):
            values = []
            for r in runs:
                if r.settings[key] not in values:
                    values.append(r.settings[key])
            if len(values) > 1:
                out[key] = values
    return out


def find_runs(*roots: str | pathlib.Path) -> list[Run]:
    """Every run dir (a metrics.jsonl beside .hydra/config.yaml) under the roots, single runs and sweeps alike.
    A root that does not exist is a ValueError, not an empty folder: a mistyped one of several roots would
    otherwise leave its runs out of the table without a word."""
    missing = [str(root) for root in roots if not pathlib.Path(root).exists()]
    if missing:
        raise ValueError(f"{', '.join(missing)} {'does' if len(missing) == 1 else 'do'} not exist; valid: folders holding run dirs (e.g. outputs/train)")
    runs = []
    for root in roots:
        for metrics in sorted(pathlib.Path(root).rglob("metrics.jsonl")):
            run = load_run(metrics.parent)
            if run is not None:
                runs.append(run)
    return runs


@dataclass
class Row:
    key: tuple
    finished: list[Run]
    unfinished: list[Run]

    def stat(self, attr: str) -> tuple[float, float] | None:
        values = [getattr(r, attr) for r in self.finished]
        if not values:
            return None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def group_runs(runs: list[Run]) -> list[Row]:
    groups: dict[tuple, Row] = {}
    for run in runs:
        row = groups.setdefault(run.key, Row(run.key, [], []))
        (row.finished if run.finished else row.unfinished).append(run)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[6], k[3], -k[4], -k[5]))]


COLUMNS = ["data", "model", "epochs", "norm", "b", "N", "tag", "runs", "final top-1 err", "best top-1 err", "paper", "delta",
           "unfinished"]


def _fmt(stat) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def table_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for row in rows:
        data, model, epochs, norm, b, n, tag = row.key
        final = row.stat("final_err")
        paper = paper_top1_err(norm, b)
        comparable = paper is not None and final is not None and model == "resnet50" and data == "imagenet"
        out.append([
            data, model, str(epochs), norm, str(b), str(n), tag or "", str(len(row.finished)), _fmt(final), _fmt(row.stat("best_err")),
            f"{paper:.2f}" if paper is not None else "-", f"{final[0] - paper:+.2f}" if comparable else "-",
            str(len(row.unfinished)) if row.unfinished else "",
        ])
    return out


def to_markdown(rows: list[Row]) -> str:
    body = table_rows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    note = ("\nTop-1 error in % on the val set, mean ± std over finished runs (seeds); `paper`: the paper's "
            "ResNet-50 ImageNet number for that norm and normalization batch (SPEC §5; GN from the GN paper), "
            "`delta` only where the run is ResNet-50 on ImageNet. Unfinished runs are counted, not averaged.\n")
    return "\n".join(lines) + "\n" + note + mixing_warnings(rows)


def mixing_warnings(rows: list[Row]) -> str:
    """A line per row whose runs are not seeds of one setting: they differ in another setting, or repeat a seed."""
    lines = []
    for row in rows:
        runs = row.finished + row.unfinished
        label = "/".join(str(k) for k in row.key if k != "")
        mixed = mixed_settings(runs)
        if mixed:
            shown = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in list(mixed.items())[:4])
            lines.append(f"- {label}: its runs differ in {shown}{' ...' if len(mixed) > 4 else ''}")
        seeds = collections.Counter(r.seed for r in runs)
        repeated = sorted(seed for seed, count in seeds.items() if count > 1)
        if repeated:
            several = len(repeated) > 1
            lines.append(f"- {label}: seed{'s' if several else ''} {', '.join(map(str, repeated))} "
                         f"appear{'' if several else 's'} in more than one run dir")
    if not lines:
        return ""
    return ("\n**Warning: some rows average runs that are not seeds of one setting** (give such runs a `tag`, or "
            "keep them under separate roots):\n\n" + "\n".join(lines) + "\n")


FIGURE_NORMS = ("bn", "brn", "mabn", "gn")  # the paper's figure's order; other norms follow by name


def figure_markdown(rows: list[Row]) -> str:
    """The paper's figure as a table: top-1 error by norm (rows) and normalization batch b (columns).

    Untagged finished runs of the setting with the most runs (data, model, epochs, per-process batch N; a tie
    goes to the larger N); each cell is mean ± std (runs: every seed's value, by seed), so the spread over
    seeds reads off directly. The paper's figure lies beneath (SPEC §5), for the shape only.
    """
    plain = [r for r in rows if not r.key[6] and r.finished]
    if not plain:  # an empty figure.md read as a failure to write it
        return ("No untagged finished runs: the figure leaves out tagged runs (ablations) and unfinished ones; "
                "results.md lists every run.\n")
    counts = collections.Counter()
    for row in plain:
        counts[row.key[:3] + row.key[5:6]] += len(row.finished)
    setting = max(counts, key=lambda k: (counts[k], k[3]))
    cells = {(r.key[3], r.key[4]): r for r in plain if r.key[:3] + r.key[5:6] == setting}
    batches = sorted({b for _, b in cells}, reverse=True)
    norms = sorted({norm for norm, _ in cells}, key=lambda n: (FIGURE_NORMS.index(n) if n in FIGURE_NORMS else 99, n))
    lines = ["| norm | " + " | ".join(f"b = {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for norm in norms:
        row_cells = []
        for b in batches:
            row = cells.get((norm, b))
            if row is None:
                row_cells.append("")
                continue
            mean, std = row.stat("final_err")
            errs = ", ".join(f"{r.final_err:.2f}" for r in sorted(row.finished, key=lambda r: r.seed))
            row_cells.append(f"{mean:.2f} (1)" if len(row.finished) == 1 else f"{mean:.2f} ± {std:.2f} ({len(row.finished)}: {errs})")
        lines.append(f"| {norm} | " + " | ".join(row_cells) + " |")
    for norm in [n for n in norms if n in PAPER_FIGURE]:
        paper = [PAPER_FIGURE[norm].get(b) for b in batches]
        lines.append(f"| paper {norm} | " + " | ".join("" if v is None else f"{v:.2f}" for v in paper) + " |")
    data, model, epochs, n = setting
    note = (f"\nTop-1 val error (%) of {data}, {model}, {epochs} epoch{'' if epochs == 1 else 's'}, N = {n} per process, untagged runs: mean ± std "
            "(runs: each seed's final error, by seed). `paper`: ResNet-50 on ImageNet, read off the paper's figure "
            "(SPEC §5), for the shape only. Other settings and tagged runs (ablations): results.md.\n")
    return "\n".join(lines) + "\n" + note


def runs_markdown(runs: list[Run]) -> str:
    """One line per run: its seed, state, final error and the commits of the code that ran it (`source`)."""
    lines = ["| run | seed | epochs | final top-1 err | source |", "|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: (r.key[6], r.key[3], -r.key[4], -r.key[5], r.seed)):
        sources = sorted({str(e.get("source", "unrecorded")) for e in run.epochs}) or ["-"]
        err = f"{run.final_err:.2f}" if run.finished else "unfinished"
        lines.append(f"| {run.path.name} | {run.seed} | {len(run.epochs)}/{run.schedule_epochs} | {err} | {', '.join(sources)} |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["data", "model", "epochs", "norm", "norm_batch", "batch_per_gpu", "tag", "runs", "final_err_mean",
                     "final_err_std", "best_err_mean", "best_err_std", "paper_err", "unfinished"])
    for row in rows:
        final, best = row.stat("final_err"), row.stat("best_err")
        paper = paper_top1_err(row.key[3], row.key[4])
        writer.writerow([*row.key, len(row.finished), *(final or ("", "")), *(best or ("", "")),
                         "" if paper is None else paper, len(row.unfinished)])
    return buffer.getvalue()
