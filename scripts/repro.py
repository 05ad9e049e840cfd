#!/usr/bin/env python
"""The paper's comparison as one resumable plan of training runs, run in parallel lanes (`make repro`).

  python scripts/repro.py                          # the whole plan, seeds 0 and 1, two lanes
  python scripts/repro.py --only figure --seeds 0  # one part of it
  python scripts/repro.py --list                   # what would run, and what is done already

The plan, in the order it runs (part by part, each with every seed, so a stopped sweep has the figure's
seeds, and so MABN's spread over seeds, before the real batch and the ablations):
  figure     BN, BRN and MABN at normalization batch b = 32, 16, 8, 4, 2 inside N = 32 (ghost batches)
             and GN once (batch independent; first seed only)
  real_b2    BN and MABN at a real per-process batch of 2, gradients accumulated over 16 micro-batches
  ablations  the MABN switches of configs/ablation/ at b = 2, and warmup100 at b = 32 and 2
  third      a third seed wherever the first two seeds of a setting differ by more than --spread points

Each run is `python -m mabn.train experiment=... <overrides> seed=S`; its run dir is named by its
configuration, so a rerun resumes it, and a run whose metrics.jsonl says it finished is skipped. Each
lane is one process with `cores / lanes` threads (two single-thread lanes beat one two-thread run by
~15 % on 2 cores). `--archive DIR` copies each finished run's records (config, metrics, batch
statistics; no checkpoints) to DIR/<task>/<run>, and runs finished there count as done, so a sweep
can continue on another machine from the committed records alone.
"""
import argparse
import json
import os
import pathlib
import queue
import shutil
import subprocess
import sys
import threading
import time

from hydra import compose, initialize_config_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARTS = ("figure", "real_b2", "ablations", "third")
FIGURE_BATCHES = (32, 2, 4, 16, 8)  # run order: the table's two points first
ABLATIONS = ("sma_forward_only", "sma_backward_only", "ema", "no_centered_conv", "no_renorm")
RECORDS = (".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.jsonl", "batch_stats.jsonl")


def planned_runs(parts: list[str], seeds: list[int]) -> list[list[str]]:
    """Overrides of every run of the plan (except `third`, decided from results), in run order."""
    runs = []
    if "figure" in parts:
        for seed in seeds:
            for b in FIGURE_BATCHES:
                runs += [[f"norm={norm}", f"norm.norm_batch={b}", f"seed={seed}"] for norm in ("mabn", "bn", "brn")]
            if seed == seeds[0]:
                runs.append(["norm=gn", f"seed={seed}"])
    if "real_b2" in parts:
        runs += [[f"norm={norm}", "data.batch_per_gpu=2", "train.grad_accum=16", f"seed={seed}"]
                 for seed in seeds for norm in ("mabn", "bn")]
    if "ablations" in parts:
        for seed in seeds:
            runs += [["norm=mabn", "norm.norm_batch=2", f"ablation={a}", f"seed={seed}"] for a in ABLATIONS]
            runs += [["norm=mabn", f"norm.norm_batch={b}", "ablation=warmup100", f"seed={seed}"] for b in (32, 2)]
    return runs


class Plan:
    """Resolves run dirs through Hydra's own composition, so names match what training will use."""

    def __init__(self, experiment: str, output_root: str, extra: list[str], archive: pathlib.Path | None):
        self.experiment, self.output_root, self.extra, self.archive = experiment, output_root, extra, archive

    def overrides(self, run: list[str]) -> list[str]:
        return [f"experiment={self.experiment}", *run, f"output_root={self.output_root}", *self.extra]

    def run_dir(self, run: list[str]) -> pathlib.Path:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=self.overrides(run), return_hydra_config=True)
        return pathlib.Path(str(cfg.output_root)) / str(cfg.task_name) / str(cfg.run_name)

    def archived(self, run_dir: pathlib.Path) -> pathlib.Path | None:
        return self.archive / run_dir.parent.name / run_dir.name if self.archive else None

    def finished_dir(self, run: list[str]) -> pathlib.Path | None:
        """Where the run finished: its run dir, else its archived records, else None."""
        run_dir = self.run_dir(run)
        return next((d for d in (run_dir, self.archived(run_dir)) if d is not None and is_finished(d)), None)

    def finished(self, run: list[str]) -> bool:
        return self.finished_dir(run) is not None


def is_finished(run_dir: pathlib.Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and '"event": "finished"' in metrics.read_text()


def final_error(run_dir: pathlib.Path) -> float | None:
    """The last epoch's val top-1 error of a finished run, else None."""
    if not is_finished(run_dir):
        return None
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [r for r in records if "epoch" in r]
    return epochs[-1]["val_top1_err"] if epochs else None


def third_seeds(plan: Plan, parts: list[str], seeds: list[int], spread: float) -> list[list[str]]:
    """Seed max(seeds)+1 of every planned setting whose first two seeds' final errors differ by > spread."""
    if len(seeds) < 2:
        return []
    extra = []
    for a, b in zip(planned_runs(parts, seeds[:1]), planned_runs(parts, seeds[1:2])):
        errs = [final_error(d) if (d := plan.finished_dir(run)) is not None else None for run in (a, b)]
        if None not in errs and abs(errs[0] - errs[1]) > spread:
            extra.append([o for o in a if not o.startswith("seed=")] + [f"seed={max(seeds) + 1}"])
    return extra


def archive_run(plan: Plan, run_dir: pathlib.Path) -> None:
    target = plan.archived(run_dir)
    for name in RECORDS:
        source = run_dir / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def run_lanes(plan: Plan, runs: list[list[str]], lanes: int, threads: int, log_dir: pathlib.Path) -> int:
    """Run `runs` in `lanes` parallel subprocesses; returns the number of failed runs."""
    todo: queue.Queue = queue.Queue()
    for i, run in enumerate(runs):
        todo.put((i, run, plan.run_dir(run)))  # composed here: Hydra's global state is not thread-safe
    failed, lock, finished_minutes = [], threading.Lock(), []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log_dir.mkdir(parents=True, exist_ok=True)

    def lane(index: int) -> None:
        while True:
            try:
                i, run, run_dir = todo.get_nowait()
            except queue.Empty:
                return
            log_file = log_dir / f"{run_dir.name}.log"
            started = time.time()
            print(f"[lane {index}] {i + 1}/{len(runs)} start {run_dir.name} (log {log_file})", flush=True)
            cmd = [sys.executable, "-m", "mabn.train", *plan.overrides(run), "train.progress=false"]
            with open(log_file, "a") as log:
                code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            minutes = (time.time() - started) / 60
            if code == 0 and is_finished(run_dir):
                if plan.archive:
                    archive_run(plan, run_dir)
                with lock:
                    finished_minutes.append(minutes)
                    left = len(runs) - len(finished_minutes) - len(failed)
                    # a resumed run's minutes are only its rest: the estimate firms up as whole runs finish
                    eta = sum(finished_minutes) / len(finished_minutes) * left / lanes / 60
                print(f"[lane {index}] {i + 1}/{len(runs)} done  {run_dir.name}: top-1 err {final_error(run_dir):.2f} % "
                      f"in {minutes:.1f} min; {left} left, about {eta:.1f} h", flush=True)
            else:
                with lock:
                    failed.append(run_dir.name)
                print(f"[lane {index}] {i + 1}/{len(runs)} FAILED {run_dir.name} (exit {code}, {minutes:.1f} min; "
                      f"see {log_file})", flush=True)

    workers = [threading.Thread(target=lane, args=(k + 1,)) for k in range(lanes)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return len(failed)


def parse_list(text: str, kind, valid=None, name="") -> list:
    values = [kind(v) for v in text.split(",") if v.strip()]
    bad = [v for v in values if valid is not None and v not in valid]
    if not values or bad:
        raise SystemExit(f"error: {name}={text!r} is not valid; valid: a comma-separated list of {', '.join(map(str, valid)) if valid else 'integers'}")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="imagenette_cpu", help="configs/experiment/ option (default imagenette_cpu)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of the plan: {', '.join(PARTS)}")
    parser.add_argument("--lanes", type=int, default=2, help="runs side by side (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="threads per run (default: cores / lanes, at least 1)")
    parser.add_argument("--spread", type=float, default=2.0, help="third seed where two seeds differ by more (points)")
    parser.add_argument("--output-root", default="outputs", help="where run dirs go (default outputs)")
    parser.add_argument("--archive", type=pathlib.Path, help="copy finished runs' records here; runs found here count as done")
    parser.add_argument("--list", action="store_true", help="print the plan with each run's state, run nothing")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (key=value)")
    args = parser.parse_args()
    try:
        seeds = parse_list(args.seeds, int, name="--seeds")
    except ValueError:
        raise SystemExit(f"error: --seeds={args.seeds!r} is not valid; valid: comma-separated integers, e.g. 0,1")
    parts = parse_list(args.only, str, PARTS, name="--only")
    if args.lanes < 1:
        raise SystemExit(f"error: --lanes={args.lanes} is not valid; valid: an integer >= 1")
    if not (ROOT / "configs" / "experiment" / f"{args.experiment}.yaml").is_file():
        valid = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
        raise SystemExit(f"error: --experiment={args.experiment!r} is not valid; valid: {', '.join(valid)}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.lanes)
    plan = Plan(args.experiment, args.output_root, args.overrides, args.archive)

    runs = planned_runs(parts, seeds)
    todo = [run for run in runs if not plan.finished(run)]
    print(f"{len(runs)} planned runs, {len(runs) - len(todo)} finished, {len(todo)} to run in {args.lanes} lanes "
          f"x {threads} threads", flush=True)
    if args.list:
        for run in runs:
            print(f"  {'done' if plan.finished(run) else 'todo'}  {plan.run_dir(run).name}")
        return 0
    log_dir = pathlib.Path(args.output_root) / "lanes"
    failures = run_lanes(plan, todo, args.lanes, threads, log_dir)
    if "third" in parts:
        extra = [run for run in third_seeds(plan, parts, seeds, args.spread) if not plan.finished(run)]
        if extra:
            print(f"third seeds: {len(extra)} settings differ by more than {args.spread} points", flush=True)
            failures += run_lanes(plan, extra, args.lanes, threads, log_dir)
    if failures:
        print(f"error: {failures} runs failed; their logs are in {log_dir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
