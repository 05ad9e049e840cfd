#!/usr/bin/env python
"""The paper's comparison as one resumable plan of training runs, run in parallel lanes (`make repro`).

  python scripts/repro.py                          # the whole plan, seeds 0 and 1, two lanes
  python scripts/repro.py --only figure --seeds 0  # one part of it
  python scripts/repro.py --list                   # what would run, and what is done already
  python scripts/repro.py --only figure --seeds 2,3,4 --norms bn,mabn --batches 32   # more seeds of two points

The plan, in the order it runs (part by part, each with every seed, so a stopped sweep has the figure's
seeds, and so MABN's spread over seeds, before the real batch and the ablations):
  figure     BN, BRN and MABN at normalization batch b = 32, 16, 8, 4, 2 inside N = 32 (ghost batches)
             and GN once (batch independent; first seed only)
  real_b2    BN and MABN at a real per-process batch of 2, gradients accumulated over 16 micro-batches
  ablations  the MABN switches of configs/ablation/ at b = 2, and warmup100 at b = 32 and 2
  proposal   MABN at every b of the figure with its switch to moving averages where BRN's corrections start
             (t0 = 500 iterations in this schedule), a rule proposed in docs/results/imagenette.md and
             kept out of the main table (tagged runs)
  third      a third seed wherever the first two seeds of a setting differ by more than --spread points;
             queued as soon as both seeds are in, ahead of the parts after the setting's own

Each run is `python -m mabn.train experiment=... <overrides> seed=S`; its run dir is named by its
configuration, so a rerun resumes it, and a run whose metrics.jsonl says it finished is skipped. Each
lane is one process with `cores / lanes` threads (two single-thread lanes beat one two-thread run by
~15 % on 2 cores). `--archive DIR` copies each finished run's records (config, metrics, batch
statistics; no checkpoints) to DIR/<task>/<run>, and runs finished there count as done, so a sweep
can continue on another machine from the committed records alone. With the override
`train.stop_after_epochs=K` every run stops after epoch K (the first epochs of every seed, say) and is
reported as paused, not finished: the same command without it trains each on from there.
"""
import argparse
import os
import pathlib
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from mabn import run_lock
from mabn.checkpoint import read_records
from mabn.config import CONFIG_DIR, ConfigError, check_overrides, validate
from mabn.preflight import check_layers, writable_dir_problem
from mabn.stop import StopSignal

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARTS = ("figure", "real_b2", "ablations", "proposal", "third")
FIGURE_BATCHES = (32, 2, 4, 16, 8)  # run order: the table's two points first
NORMS = ("bn", "brn", "mabn", "gn")  # the plan's norms
ABLATIONS = ("sma_forward_only", "sma_backward_only", "ema", "no_centered_conv", "no_renorm")
PROPOSED_WARMUP = 500  # BRN's t0 in imagenette_cpu: max(min_t0 = 500, t0_frac x 2,360 iterations)
RECORDS = (".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.jsonl", "batch_stats.jsonl")


def part_runs(part: str, seeds: list[int]) -> list[list[str]]:
    """Overrides of every run of one part of the plan (`third` is decided from results), in run order."""
    runs = []
    for seed in seeds:
        if part == "figure":
            for b in FIGURE_BATCHES:
                runs += [[f"norm={norm}", f"norm.norm_batch={b}", f"seed={seed}"] for norm in ("mabn", "bn", "brn")]
            if seed == seeds[0]:
                runs.append(["norm=gn", f"seed={seed}"])
        elif part == "real_b2":
            runs += [[f"norm={norm}", "data.batch_per_gpu=2", "train.grad_accum=16", f"seed={seed}"] for norm in ("mabn", "bn")]
        elif part == "ablations":
            runs += [["norm=mabn", "norm.norm_batch=2", f"ablation={a}", f"seed={seed}"] for a in ABLATIONS]
            runs += [["norm=mabn", f"norm.norm_batch={b}", "ablation=warmup100", f"seed={seed}"] for b in (32, 2)]
        elif part == "proposal":
            runs += [["norm=mabn", f"norm.norm_batch={b}", f"norm.options.warmup={PROPOSED_WARMUP}",
                      f"tag=-warmup{PROPOSED_WARMUP}", f"seed={seed}"] for b in FIGURE_BATCHES]
    return runs


def override(run: list[str], key: str) -> str | None:
    """The value `run` sets for `key`, else None."""
    return next((o.split("=", 1)[1] for o in run if o.startswith(f"{key}=")), None)


def selected(run: list[str], norms: list[str] | None, batches: list[int] | None) -> bool:
    """Whether `run` is one of `norms` (None: any) at one of the normalization batches `batches` (None: any).

    A run's normalization batch is its norm.norm_batch, else its real batch (real_b2); GN has none, so it is
    left out once batches are named."""
    if norms is not None and override(run, "norm") not in norms:
        return False
    b = override(run, "norm.norm_batch") or override(run, "data.batch_per_gpu")
    return batches is None or (b is not None and int(b) in batches)


Ranked = tuple[tuple[int, int, int], list[str]]  # ((part, 0 planned / 1 third seed, position), overrides)


def ranked_runs(parts: list[str], seeds: list[int], norms: list[str] | None = None,
                batches: list[int] | None = None) -> list[Ranked]:
    """The plan's runs (all but `third`, decided from results) with their rank: lower runs first; only those of
    `norms` at `batches` (None: all)."""
    return [((PARTS.index(part), 0, i), run) for part in PARTS if part in parts
            for i, run in enumerate(part_runs(part, seeds)) if selected(run, norms, batches)]


class Plan:
    """Resolves run dirs through Hydra's own composition, so names match what training will use."""

    compose_lock = threading.Lock()  # Hydra's global state is not thread-safe, and lanes queue third seeds

    def __init__(self, experiment: str, output_root: str, extra: list[str], archive: pathlib.Path | None):
        self.experiment, self.output_root, self.extra, self.archive = experiment, output_root, extra, archive
        self.composed: dict[tuple[str, ...], tuple[pathlib.Path, int | None]] = {}

    def overrides(self, run: list[str]) -> list[str]:
        return [f"experiment={self.experiment}", *run, f"output_root={self.output_root}", *self.extra]

    def _compose(self, run: list[str]) -> tuple[pathlib.Path, int | None]:
        """(run dir, train.stop_after_epochs) of the run's composed config; SystemExit with one `error:` line when
        the overrides do not compose or give a value the run's preflight would refuse (every run would fail)."""
        with self.compose_lock:
            if tuple(run) not in self.composed:
                try:
                    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
                        cfg = compose(config_name="train", overrides=self.overrides(run), return_hydra_config=True)
                    validate(cfg)
                    check_layers(cfg)
                except (HydraException, ConfigError) as err:
                    if isinstance(err, HydraException):  # name the mistyped option or key, and what is valid there
                        try:
                            check_overrides(self.overrides(run), CONFIG_DIR)
                        except ConfigError as named:
                            err = named
                    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    raise SystemExit(f"error: {' '.join(run + self.extra)}: {first}") from None
                run_dir = pathlib.Path(str(cfg.output_root)) / str(cfg.task_name) / str(cfg.run_name)
                self.composed[tuple(run)] = run_dir, cfg.train.get("stop_after_epochs")
            return self.composed[tuple(run)]

    def run_dir(self, run: list[str]) -> pathlib.Path:
        return self._compose(run)[0]

    def stop_after_epochs(self, run: list[str]) -> int | None:
        """The epoch the run is asked to pause after (`train.stop_after_epochs`), None if it runs to its end."""
        return self._compose(run)[1]

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


def epoch_records(run_dir: pathlib.Path) -> list[dict]:
    """The per-epoch records of a run dir's metrics.jsonl (none before its first epoch)."""
    return [r for r in read_records(run_dir / "metrics.jsonl") if "epoch" in r]


def epochs_done(run_dir: pathlib.Path) -> int:
    """Epochs a run dir has recorded: what a resumed run does not train again."""
    return len(epoch_records(run_dir))


def eta_hours(trained: list[tuple[float, int, int]], left: int, lanes: int) -> float:
    """Hours for `left` more runs in `lanes` lanes, from this driver's finished runs as (minutes, epochs trained,
    epochs in the run): minutes per epoch trained, so a resumed run's short rest does not pass for a whole run."""
    minutes, epochs = sum(t[0] for t in trained), sum(t[1] for t in trained)
    run_epochs = sum(t[2] for t in trained) / len(trained)
    return minutes / max(epochs, 1) * run_epochs * left / lanes / 60


def final_error(run_dir: pathlib.Path) -> float | None:
    """The last epoch's val top-1 error of a finished run, else None."""
    if not is_finished(run_dir):
        return None
    epochs = epoch_records(run_dir)
    return epochs[-1]["val_top1_err"] if epochs else None


def setting(run: list[str]) -> list[str]:
    """A run's overrides less its seed: what its seeds share."""
    return [o for o in run if not o.startswith("seed=")]


def third_seed(plan: Plan, run: list[str], seeds: list[int], spread: float) -> list[str] | None:
    """Seed max(seeds)+1 of `run`'s setting if its first two seeds have finished more than `spread` points apart."""
    if len(seeds) < 2:
        return None
    dirs = [plan.finished_dir([*setting(run), f"seed={seed}"]) for seed in seeds[:2]]
    errs = [final_error(d) for d in dirs if d is not None]
    if len(errs) < 2 or None in errs or abs(errs[0] - errs[1]) <= spread:
        return None
    return [*setting(run), f"seed={max(seeds) + 1}"]


def third_seed_follow_up(plan: Plan, seeds: list[int], spread: float):
    """`run_lanes`' follow-up: once a setting's two seeds are in, its third seed where they differ by more than
    `spread`, ranked after the rest of its part and before the parts after it."""
    def thirds(rank, run) -> list[Ranked]:
        third = third_seed(plan, run, seeds, spread)
        return [((rank[0], 1, rank[2]), third)] if third and not plan.finished(third) else []
    return thirds


def third_seeds(plan: Plan, ranked: list[Ranked], follow_up) -> list[Ranked]:
    """The third seeds due already (a setting's two seeds in, too far apart, the third not run), once each."""
    due: dict[str, Ranked] = {}
    for rank, run in ranked:
        for item in follow_up(rank, run):
            due.setdefault(plan.run_dir(item[1]).name, item)
    return list(due.values())


def archive_run(plan: Plan, run_dir: pathlib.Path) -> None:
    target = plan.archived(run_dir)
    for name in RECORDS:
        source = run_dir / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def run_lanes(plan: Plan, runs: list[Ranked], lanes: int, threads: int, log_dir: pathlib.Path,
              follow_up=None) -> tuple[int, int | None]:
    """Run `runs` in `lanes` parallel subprocesses, lowest rank first; returns the number of failed runs, and
    the stop signal that ended the plan early (None if none came). A run asked to pause after epoch K
    (`train.stop_after_epochs=K`) that exits cleanly with K epochs recorded is paused, not failed.

    `follow_up(rank, run)`, called after each finished run, returns more ranked runs to queue (third seeds).
    A stop signal (mabn.stop: Ctrl-C, SIGTERM, SIGUSR1, SIGUSR2) sent to this driver alone is passed on to the
    runs in progress, which checkpoint and exit as they do on their own; no lane starts another run."""
    todo: queue.PriorityQueue = queue.PriorityQueue()
    queued, failed, lock, trained, paused = set(), [], threading.Lock(), [], set()
    children: dict[int, subprocess.Popen] = {}

    def pass_on(signum: int) -> None:
        # In the main thread, which holds `lock` nowhere else: a lane holding it lets go at once.
        with lock:
            running = list(children.values())
        for child in running:
            # Ctrl-C at a terminal reached the runs too (one process group), and a second SIGINT aborts a run.
            child.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    stop = StopSignal(on_signal=pass_on, announce="Ctrl-C: the runs in progress finish their step, checkpoint and exit")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log_dir.mkdir(parents=True, exist_ok=True)

    def put(rank, run) -> bool:
        run_dir = plan.run_dir(run)
        with lock:
            if run_dir.name in queued:
                return False
            queued.add(run_dir.name)
            todo.put((rank, len(queued), run, run_dir))  # the count breaks ties: lists never compare
        return True

    for rank, run in runs:
        put(rank, run)

    def lane(index: int) -> None:
        while True:
            try:
                rank, i, run, run_dir = todo.get_nowait()
            except queue.Empty:
                return
            if stop.received is not None:
                return
            log_file = log_dir / f"{run_dir.name}.log"
            started, epochs_before = time.time(), epochs_done(run_dir)
            print(f"[lane {index}] {i}/{len(queued)} start {run_dir.name} (log {log_file})", flush=True)
            cmd = [sys.executable, "-m", "mabn.train", *plan.overrides(run), "train.progress=false"]
            with open(log_file, "a") as log:
                with lock:  # a stop signal is either seen here or passed on to this child
                    if stop.received is not None:
                        return
                    children[index] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                code = children[index].wait()
                with lock:
                    del children[index]
            minutes = (time.time() - started) / 60
            if stop.received is not None and not (code == 0 and is_finished(run_dir)):
                print(f"[lane {index}] {i}/{len(queued)} stopped {run_dir.name} (exit {code}, {minutes:.1f} min)", flush=True)
                return
            if code == 0 and is_finished(run_dir):
                try:
                    if plan.archive:
                        archive_run(plan, run_dir)
                except OSError as err:  # a full disk: the run stays done in its run dir; say so, count it failed
                    with lock:
                        failed.append(run_dir.name)
                    print(f"[lane {index}] {i}/{len(queued)} FAILED to archive {run_dir.name}: {err}", flush=True)
                    continue
                for more_rank, more in follow_up(rank, run) if follow_up else []:
                    if put(more_rank, more):
                        print(f"[lane {index}] queued {plan.run_dir(more).name}: its first two seeds differ by "
                              f"more than the spread", flush=True)
                with lock:
                    epochs = epochs_done(run_dir)
                    trained.append((minutes, epochs - epochs_before, epochs))
                    left = len(queued) - len(trained) - len(failed)
                    eta = eta_hours(trained, left, lanes)
                print(f"[lane {index}] {i}/{len(queued)} done  {run_dir.name}: top-1 err {final_error(run_dir):.2f} % "
                      f"in {minutes:.1f} min; {left} left, about {eta:.1f} h", flush=True)
            elif code == 0 and (pause := plan.stop_after_epochs(run)) and epochs_done(run_dir) >= pause:
                with lock:
                    paused.add(pause)
                print(f"[lane {index}] {i}/{len(queued)} paused {run_dir.name} after epoch {pause} "
                      f"(train.stop_after_epochs) in {minutes:.1f} min", flush=True)
            else:
                with lock:
                    failed.append(run_dir.name)
                print(f"[lane {index}] {i}/{len(queued)} FAILED {run_dir.name} (exit {code}, {minutes:.1f} min; "
                      f"see {log_file})", flush=True)

    stop.install()
    workers = [threading.Thread(target=lane, args=(k + 1,)) for k in range(lanes)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        stop.uninstall()
    for pause in sorted(paused):
        print(f"runs paused after epoch {pause} (train.stop_after_epochs={pause}); the same command "
              f"without it trains them on", flush=True)
    return len(failed), stop.received


def parse_list(text: str, kind, valid=None, name="", hint: str | None = None) -> list:
    """`text`'s comma-separated values as `kind`, each one of `valid` (None: any); else a one-line error saying
    what is valid (`hint`, by default the valid values)."""
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:  # not a `kind`: an integer list given a word
        values = []
    if not values or any(valid is not None and v not in valid for v in values):
        hint = hint or f"a comma-separated list of {', '.join(map(str, valid))}"
        raise SystemExit(f"error: {name}={text!r} is not valid; valid: {hint}")
    return values


def check_folder(flag: str, folder) -> None:
    """`folder` must be a folder, or creatable as one: a file there failed only when the first run finished
    (--archive: the lane's thread died and the plan ended early with exit 0) or as a traceback (--output-root)."""
    problem = writable_dir_problem(pathlib.Path(folder).absolute()) if folder is not None else None
    if problem:
        raise SystemExit(f"error: {flag}={str(folder)!r} is not valid ({problem}); valid: a folder, new or existing")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="imagenette_cpu", help="configs/experiment/ option (default imagenette_cpu)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of the plan: {', '.join(PARTS)}")
    parser.add_argument("--norms", help=f"comma-separated norms to run, of {', '.join(NORMS)} (default: all)")
    parser.add_argument("--batches", help="comma-separated normalization batches b to run, of "
                        f"{', '.join(map(str, sorted(FIGURE_BATCHES)))} (default: all; GN, with none, is left out)")
    parser.add_argument("--lanes", type=int, default=2, help="runs side by side (default 2)")
    parser.add_argument("--threads", type=int, help="threads per run (default: cores / lanes, at least 1)")
    parser.add_argument("--spread", type=float, default=2.0, help="third seed where two seeds differ by more (points)")
    parser.add_argument("--output-root", default="outputs", help="where run dirs go (default outputs)")
    parser.add_argument("--archive", type=pathlib.Path, help="copy finished runs' records here; runs found here count as done")
    parser.add_argument("--list", action="store_true", help="print the plan with each run's state, run nothing")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (key=value)")
    args = parser.parse_args()
    seeds = parse_list(args.seeds, int, name="--seeds", hint="comma-separated integers >= 0, e.g. 0,1")
    if min(seeds) < 0 or len(set(seeds)) < len(seeds):  # -1 failed in every run's preflight; 0,0 ran seed 0 once
        raise SystemExit(f"error: --seeds={args.seeds!r} is not valid; valid: distinct integers >= 0, e.g. 0,1")
    parts = parse_list(args.only, str, PARTS, name="--only")
    norms = parse_list(args.norms, str, NORMS, name="--norms") if args.norms is not None else None
    batches = parse_list(args.batches, int, sorted(FIGURE_BATCHES), name="--batches") if args.batches is not None else None
    if not args.spread >= 0:  # negative or nan: every setting would get a third seed
        raise SystemExit(f"error: --spread={args.spread} is not valid; valid: a number of points >= 0 (default 2)")
    if args.lanes < 1:
        raise SystemExit(f"error: --lanes={args.lanes} is not valid; valid: an integer >= 1")
    if args.threads is not None and args.threads < 1:  # it becomes each lane's OMP_NUM_THREADS
        raise SystemExit(f"error: --threads={args.threads} is not valid; valid: an integer >= 1 (default: cores / lanes)")
    if not pathlib.Path(CONFIG_DIR, "experiment", f"{args.experiment}.yaml").is_file():
        valid = sorted(p.stem for p in pathlib.Path(CONFIG_DIR, "experiment").glob("*.yaml"))
        raise SystemExit(f"error: --experiment={args.experiment!r} is not valid; valid: {', '.join(valid)}")
    for flag, folder in (("--output-root", args.output_root), ("--archive", args.archive)):
        check_folder(flag, folder)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.lanes)
    plan = Plan(args.experiment, args.output_root, args.overrides, args.archive)

    ranked = ranked_runs(parts, seeds, norms, batches)
    if not ranked:
        raise SystemExit(f"error: --norms={args.norms} --batches={args.batches} select no run of --only={args.only}; "
                         f"valid: a norm and b that part runs (GN has no b; real_b2 runs bn and mabn at b = 2)")
    todo = [(rank, run) for rank, run in ranked if not plan.finished(run)]
    print(f"{len(ranked)} planned runs, {len(ranked) - len(todo)} finished, {len(todo)} to run in {args.lanes} lanes "
          f"x {threads} threads", flush=True)

    thirds = third_seed_follow_up(plan, seeds, args.spread) if "third" in parts else None
    # third seeds of settings whose two seeds are in already; the others are queued as their seeds finish
    due = third_seeds(plan, ranked, thirds) if thirds else []
    if due:
        print(f"{len(due)} third seeds to run (two seeds more than {args.spread} points apart)", flush=True)
    if args.list:
        for _, run in ranked:
            print(f"  {'done' if plan.finished(run) else 'todo'}  {plan.run_dir(run).name}")
        for _, run in due:
            print(f"  todo  {plan.run_dir(run).name} (third seed)")
        return 0
    log_dir = pathlib.Path(args.output_root) / "lanes"
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        with run_lock.hold(log_dir):  # one driver per output root: a second would start the same runs
            failures, stopped = run_lanes(plan, todo + due, args.lanes, threads, log_dir, follow_up=thirds)
    except run_lock.RunDirInUse as err:
        print(f"error: {args.output_root} is in use by another make repro ({err.holder}); wait for it, stop it "
              f"(kill: its runs checkpoint), or set --output-root", file=sys.stderr)
        return 2
    if stopped:
        print(f"stopped by signal {stopped}: the runs in progress checkpointed; the same command resumes the plan",
              file=sys.stderr)
        return 128 + stopped
    if failures:
        print(f"error: {failures} runs failed; their logs are in {log_dir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
