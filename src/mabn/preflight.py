"""Checks that run before Hydra creates the run dir: a bad config fails in one line, leaving nothing behind.

Registered as a Hydra callback in configs/train.yaml (`hydra.callbacks.preflight`).
"""
import copy
import os
import pathlib
import shutil
import sys

import torch
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from . import run_lock
from .batch_stats import select_layers
from .config import ConfigError, model_kwargs, require, validate
from .data import DatasetError, check_root
from .distributed import launched_world_size, resolve_device
from .models import ARCHS, STEMS, build_model
from .resume import check_resume


def writable_dir_problem(path: pathlib.Path) -> str | None:
    """Why `path` cannot be created and written, or None: looks at the nearest existing ancestor."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def check_layers(cfg: DictConfig) -> None:
    """Build the model on the meta device (no memory, no init), so that every layer constructor's own checks
    (norm options, GN groups, BRN limits...) and the `stats` layers and channel are checked before anything is
    written."""
    require("model.arch", cfg.model.arch, cfg.model.arch in ARCHS, ", ".join(ARCHS))
    require("model.stem", cfg.model.stem, cfg.model.stem in STEMS, ", ".join(STEMS))
    try:
        with torch.device("meta"):
            model = build_model(**model_kwargs(cfg, num_classes=10, steps_per_epoch=1000))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"norm={cfg.norm.name}, norm.options: {err}") from None
    if cfg.stats.enabled:
        layers = select_layers(model, list(cfg.stats.layers) if cfg.stats.layers else None)
        narrowest = min((layer.num_features for layer in layers.values()), default=None)
        if narrowest is not None:
            require("stats.channel", cfg.stats.channel, cfg.stats.channel < narrowest,
                    f"an integer in [0, {narrowest - 1}] (the narrowest recorded layer has {narrowest} channels)")


def preflight(cfg: DictConfig, output_dir: str, launch: tuple[int, bool] | None = None) -> None:
    """Every config check of one run. `launch`: (processes per run, whether they run on this machine) for the jobs
    of a sweep that a submitit launcher starts (`sweep_launch`); default: this process's own launch."""
    world_size, here = launch or (launched_world_size(), True)  # SLURM's tasks (srun) count before they export
    validate(cfg, world_size)
    if here:  # a SLURM job's GPUs are its node's, not the login node's
        resolve_device(str(cfg.train.device), int(os.environ.get("LOCAL_RANK", 0)))  # no GPU, or not this rank's
    check_layers(cfg)
    check_root(cfg.data)
    root = pathlib.Path(os.path.expanduser(str(cfg.data.root))).absolute()
    problem = cfg.data.get("generate") and not root.exists() and writable_dir_problem(root)
    if problem:  # a file above it was mkdir's traceback, after the run dir had been made
        raise ConfigError(f"data.root={str(cfg.data.root)!r} cannot be generated ({problem}); set data.root to a "
                          "writable folder")
    problem = writable_dir_problem(pathlib.Path(output_dir).absolute())
    if problem:
        raise ConfigError(f"output dir {output_dir!r} cannot be written ({problem}); set output_root to a writable folder")


def check_sweep(config: DictConfig) -> None:
    """The config checks of every job of a sweep, before its first job: a bad value among the swept ones
    (`data.batch_per_gpu=8,0`) failed only when its job came, after the jobs before it had trained. So does the
    resume check, for each job whose run dir follows from its settings (`sweep_job_run_dir`): a finished run
    asked for other settings stopped the sweep only when its job came."""
    from hydra import compose
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # its own expansion, so the jobs are Hydra's
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    swept = {o.get_key_element() for o in overrides if o.is_sweep_override()}
    launch = sweep_launch(config)
    for batch in BasicSweeper.split_arguments(overrides, None):
        for job in batch:
            try:
                composed = compose(config_name=config.hydra.job.config_name, overrides=job, return_hydra_config=True)
                cfg = copy.deepcopy(composed)
                with open_dict(cfg):
                    del cfg["hydra"]  # the job's config as its task function gets it (Hydra's run_job does the same)
                preflight(cfg, config.hydra.sweep.dir, launch)
                run_dir = sweep_job_run_dir(composed)
                if run_dir is not None:
                    check_resume(cfg, run_dir, launch[0])
            except (ConfigError, DatasetError) as err:
                values = " ".join(o for o in job if o.split("=", 1)[0] in swept)
                raise type(err)(f"the sweep's job {values}: {err}" if values else str(err)) from None


NAMED_BY = ("output_root", "task_name", "run_name")  # the keys configs/train.yaml names run dirs by


def sweep_job_run_dir(job: DictConfig) -> pathlib.Path | None:
    """The run dir Hydra gives a sweep's job (`hydra.sweep.dir`/`hydra.sweep.subdir` of the job's config, composed
    with the Hydra node), where it follows from the job's own settings, as the default
    `${output_root}/${task_name}/${run_name}` does; None where it names what Hydra sets only as the job starts
    (`${hydra.job.num}`, `${hydra:job.override_dirname}`): that job is checked when it starts."""
    raw = OmegaConf.to_container(job, resolve=False)
    texts = (raw["hydra"]["sweep"]["dir"], raw["hydra"]["sweep"]["subdir"], *(raw.get(key) for key in NAMED_BY))
    if any("${hydra" in str(text) for text in texts):  # ${hydra.job.num}, ${hydra:job.override_dirname}
        return None
    try:
        return pathlib.Path(str(job.hydra.sweep.dir), str(job.hydra.sweep.subdir))
    except Exception:  # noqa: BLE001 - an interpolation that does not resolve here: Hydra's to report at the job
        return None


def sweep_launch(config: DictConfig) -> tuple[int, bool]:
    """(processes per run, whether they run on this machine) for the jobs of a sweep. submitit's launchers start
    nodes x tasks_per_node processes a job (on SLURM's nodes for hydra/launcher=slurm): the check at the sweep's
    start counted 1, and refused `experiment=paper_table_bs32` (train.total_batch=256 on 8 GPUs) on SLURM."""
    launcher = config.hydra.launcher
    target = str(launcher.get("_target_", ""))
    if target.endswith((".SlurmLauncher", ".LocalLauncher")):
        nodes, tasks = launcher.get("nodes", 1), launcher.get("tasks_per_node", 1)
        return int(nodes or 1) * int(tasks or 1), target.endswith(".LocalLauncher")
    return launched_world_size(), True  # Hydra's basic launcher: the jobs run in this process (torchrun's, srun's)


def check_launcher(config: DictConfig) -> None:
    """A SLURM launcher where SLURM is, asked for no more tasks than GPUs a node: submitit looks for `srun` when
    the sweep's first batch is launched, and without it ended the sweep in a traceback."""
    launcher = config.hydra.launcher
    if not str(launcher.get("_target_", "")).endswith(".SlurmLauncher"):
        return
    missing = [tool for tool in ("srun", "sbatch") if shutil.which(tool) is None]  # submitit's check; its submit
    if missing:
        raise ConfigError(f"hydra/launcher=slurm but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          "not on PATH here (no SLURM); valid: run the sweep on a SLURM login node, or "
                          "hydra/launcher=local (submitit's local executor) or no launcher override to run the jobs on "
                          "this machine")
    tasks, gpus = launcher.get("tasks_per_node"), launcher.get("gpus_per_node")
    if isinstance(tasks, int) and isinstance(gpus, int) and 0 < gpus < tasks:  # found when the job started, queued
        raise ConfigError(f"hydra.launcher.tasks_per_node={tasks} but gpus_per_node={gpus}: each task trains on one "
                          f"GPU of its node; valid: tasks_per_node <= gpus_per_node (equal uses every GPU)")


def check_run_dir_free(run_dir) -> None:
    """No other trainer holds the run dir (`run_lock`). Rank 0's check only: a job's ranks share its run dir,
    and rank 0 may hold it already when another rank gets here."""
    launched_world_size()  # exports SLURM's task ids as RANK
    if int(os.environ.get("RANK", 0)) == 0:
        run_lock.check_free(run_dir)


HYDRA_RECORDS = ("config.yaml", "hydra.yaml", "overrides.yaml")  # what Hydra writes into <run dir>/.hydra


class Preflight(Callback):
    """Single run: every check, the run dir's lock and the resume check included, before Hydra writes the run
    dir's `.hydra/`.

    Multirun: the config checks, and the resume check of each job whose run dir follows from its settings, before
    the sweep starts; the lock and resume checks of each job run again once Hydra has written that job's `.hydra/`
    (no callback comes earlier; a run dir may have changed meanwhile, or be the launcher's to name), so the run
    dirs' records are read at the sweep's start and a job that fails the check puts its dir's back before it exits
    (jobs that a launcher runs in other processes, submitit's, still fail the check but cannot restore the records).
    """

    def __init__(self) -> None:
        self.records: dict[pathlib.Path, dict[str, bytes]] = {}

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        def check():
            preflight(config, config.hydra.run.dir)
            check_run_dir_free(config.hydra.run.dir)
            check_resume(config, config.hydra.run.dir, launched_world_size())

        self._fail_on_error(check)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._fail_on_error(lambda: (check_launcher(config), check_sweep(config)))
        for folder in pathlib.Path(config.hydra.sweep.dir).glob(f"*/{config.hydra.output_subdir}"):
            self.records[folder.resolve()] = {name: (folder / name).read_bytes() for name in HYDRA_RECORDS
                                              if (folder / name).is_file()}

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return  # checked in on_run_start, before anything was written
        run_dir = pathlib.Path(config.hydra.runtime.output_dir)

        def check():
            try:
                check_run_dir_free(run_dir)
                check_resume(config, run_dir, launched_world_size())
            except ConfigError:
                folder = (run_dir / config.hydra.output_subdir).resolve()
                for name, data in self.records.get(folder, {}).items():
                    (folder / name).write_bytes(data)  # the records of the run that is there, not of this refused job
                raise

        self._fail_on_error(check)

    @staticmethod
    def _fail_on_error(check) -> None:
        try:
            check()
        except (ConfigError, DatasetError) as err:
            # SystemExit passes through Hydra's error reporting: one line, no traceback.
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
