"""Every config composes; Makefile variables reach the config; bad choices fail in one line listing the valid ones."""
import os
import re
import subprocess

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mabn.config import FLAGS, ConfigError, check_overrides, model_kwargs, validate
from mabn.models import build_model

from .conftest import ROOT, train_command

CONFIGS = ROOT / "configs"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("norm", options("norm"))
def test_every_model_and_norm_composes_and_builds(model, norm):
    cfg = _compose([f"model={model}", f"norm={norm}"])
    OmegaConf.resolve(cfg)
    validate(cfg)
    assert cfg.norm.name == norm and cfg.norm.norm_batch == cfg.data.batch_per_gpu
    if model != "resnet50":  # resnet50 is built in the parameter-count test
        net = build_model(**model_kwargs(cfg, 10, steps_per_epoch=100))
        assert net.fc.out_features == 10


@pytest.mark.parametrize("group", ["data", "schedule", "experiment"])
def test_every_option_of_the_other_groups_composes(group):
    for option in options(group):
        cfg = _compose([f"{group}={option}"])
        OmegaConf.to_container(cfg.data, resolve=True)
        OmegaConf.to_container(cfg.schedule, resolve=True)


def test_experiment_pins_the_paper_setting():
    cfg = _compose(["experiment=paper_table_bs2", "norm=mabn"])
    assert (cfg.model.name, cfg.data.name, cfg.data.batch_per_gpu, cfg.norm.norm_batch) == ("resnet50", "imagenet", 32, 2)
    assert cfg.schedule.epochs == 120 and list(cfg.schedule.milestones) == [30, 60, 90]
    assert cfg.norm.name == "mabn"


def _leaves(node, prefix="") -> dict:
    if not isinstance(node, dict):
        return {prefix: node}
    return {k: v for key, child in node.items() for k, v in _leaves(child, f"{prefix}.{key}" if prefix else key).items()}


@pytest.mark.parametrize("ablation", options("ablation"))
def test_every_ablation_switches_one_mabn_setting_and_tags_its_run_dir(ablation):
    def leaves(overrides):
        cfg = _compose(["experiment=imagenette_cpu", "norm=mabn", "norm.norm_batch=2", *overrides])
        return _leaves(OmegaConf.to_container(cfg, resolve=False))

    default, switched = leaves([]), leaves([f"ablation={ablation}"])
    changed = {key for key in default.keys() | switched.keys() if default.get(key) != switched.get(key)}
    assert switched["tag"] == f"-{ablation}"  # one run dir per ablation, named after it
    changed = {key for key in changed if key != "tag" and not key.startswith("hydra.")}
    assert len(changed) == 1 and next(iter(changed)).startswith("norm."), changed


@pytest.mark.parametrize(
    "overrides, steps_per_epoch, expected",
    [
        (["schedule=paper"], 5000, 100),  # no lr warmup (the paper's recipe): the paper's 100
        (["experiment=imagenette_cpu"], 295, 147),  # warmup 0.5 epochs of 295 steps
        (["experiment=imagenette_cpu"], 100, 100),  # lr warmup shorter than 100 forwards: 100
        (["experiment=imagenette_cpu", "data.batch_per_gpu=2", "train.grad_accum=16"], 295, 147 * 16),  # forwards
        (["experiment=imagenette_cpu", "norm.options.warmup=100"], 295, 100),  # an integer is kept
        (["experiment=imagenette_cpu", "ablation=warmup100"], 295, 100),
        (["experiment=imagenette_cpu", "norm.options.warmup=0"], 295, 0),
    ],
)
def test_mabn_warmup_auto_ends_no_earlier_than_the_lr_warmup(overrides, steps_per_epoch, expected):
    cfg = _compose(["norm=mabn", *overrides])
    validate(cfg)
    kwargs = model_kwargs(cfg, 10, steps_per_epoch)
    assert kwargs["warmup"] == expected
    net = build_model(**kwargs)
    assert {m.warmup for m in net.modules() if hasattr(m, "chi_ring")} == {expected}


def test_auto_warmup_matches_the_lr_schedule_it_follows():
    from mabn.optim import LRSchedule

    cfg = _compose(["norm=mabn", "experiment=imagenette_cpu"])
    schedule = LRSchedule(1.0, 295, cfg.schedule)
    warmup = model_kwargs(cfg, 10, 295)["warmup"]
    assert schedule(warmup - 1) == 1.0 and schedule(warmup - 2) < 1.0  # step `warmup` (forward t = warmup) is at the peak


@pytest.mark.parametrize("value", ["-5", "soon", "1.5", "true"])
def test_bad_mabn_warmup_is_a_config_error(value):
    from mabn.config import ConfigError

    cfg = _compose(["norm=mabn", f"norm.options.warmup={value}"])
    with pytest.raises(ConfigError, match="norm.options.warmup"):
        validate(cfg)


def _make_config(*variables) -> str:
    """The job config `make train VAR=...` would run, printed by Hydra without training."""
    out = subprocess.run(
        ["make", "-s", "train", *variables, "ARGS=--cfg job"], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_makefile_variables_reach_the_config():
    cfg = OmegaConf.create(_make_config("NORM=mabn", "BS=4"))
    assert cfg.norm.name == "mabn" and cfg.data.batch_per_gpu == 4
    assert cfg.norm.norm_batch == 4  # b follows N unless set
    cfg = OmegaConf.create(_make_config("EXP=paper_table_bs2", "NORM=brn", "RESUME=never"))
    assert cfg.norm.name == "brn" and cfg.norm.norm_batch == 2 and cfg.train.resume == "never"


def test_make_train_and_sweep_write_under_outputs_when_it_is_given():
    """`make sweep OUTPUTS=dir` trained into ./outputs and then tabled dir/train; make train ignored it too."""
    assert OmegaConf.create(_make_config("OUTPUTS=/data/runs")).output_root == "/data/runs"
    assert OmegaConf.create(_make_config()).output_root == "outputs"  # the config's own (configs/local/ may set it)
    out = subprocess.run(["make", "-n", "--no-print-directory", "train", "OUTPUTS=/data/runs", "ARGS=output_root=/x"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines()[-1].endswith("output_root=/data/runs output_root=/x")  # ARGS come last: they win
    out = subprocess.run(["make", "-n", "--no-print-directory", "sweep", "OUTPUTS=/data/runs"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    train, table = [line for line in out.stdout.splitlines() if "mabn.train" in line or "results_table" in line]
    assert " output_root=/data/runs " in train and table.endswith("results_table.py /data/runs/train")


def test_make_tensorboard_reads_the_output_root_that_training_wrote():
    # it read ./outputs whatever OUTPUTS said, unlike table, plot, eval and repro
    out = subprocess.run(["make", "-n", "--no-print-directory", "tensorboard", "OUTPUTS=/data/runs", "ARGS=--port 6007"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)  # -n: printed, not run
    commands = [line for line in out.stdout.splitlines() if "tensorboard" in line]
    assert out.returncode == 0 and commands[-1].endswith("tensorboard --logdir /data/runs --port 6007"), out.stdout


def test_make_train_puts_a_multirun_flag_before_the_overrides():
    # `make train NORM=bn ARGS="-m seed=0,1"`: Hydra read the overrides after -m as 'unrecognized arguments'
    for extra in ([], ["PROCS=2"]):
        out = subprocess.run(["make", "-n", "--no-print-directory", "train", "NORM=bn", "ARGS=-m seed=0,1", *extra],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        words = out.stdout.splitlines()[-1].split()
        assert out.returncode == 0 and words[-3:] == ["-m", "norm=bn", "seed=0,1"], out.stdout


def test_unknown_group_option_lists_the_valid_ones():
    out = subprocess.run(
        ["make", "-s", "train", "NORM=batchnorm", "ARGS=--cfg job"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode != 0 and errors == [f"error: norm='batchnorm' is not valid; valid: {', '.join(options('norm'))}"]


@pytest.mark.parametrize("argv, refused", [
    (["norm=bn", "model=resnet50", "experiment=paper_table_bs2", "schedule.epochs=2"], None),
    (["-m", "norm=bn,mabn", "data.batch_per_gpu=2,32"], None),
    (["+ablation=[ema,warmup100]"], None),
    (["norm=glob(*)", "norm=null", "~experiment", "hydra/launcher=submitit_local", "model@other=anything"], None),
    (["--config-name", "other", "norm=anything"], None),  # another config: Hydra's to check
    (["--cfg", "bogus", "norm=anything"], None),  # a command line Hydra refuses: its report, not a second one
    (["model=resnet_50"], "model='resnet_50' is not valid; valid: resnet18, resnet18_cpu, resnet50"),
    (["--multirun", "norm=bn,mab"], "norm='mab' is not valid"),
    (["-m", "norm=choice(bn,BN)"], "norm='BN' is not valid"),
    (["+ablation=[ema,warmup]"], "ablation='warmup' is not valid; valid: ema, no_centered_conv,"),
    (["--cfg", "job", "data=imagenet1k"], "data='imagenet1k' is not valid; valid: imagenet, imagenette, imagenette64, shapes"),
    # keys: Hydra's report advised `+schedule.epoch=2`, a setting nothing reads
    (["data=imagenet", "data.root=/x", "data.crop_scale.0=0.3", "norm=mabn", "norm.options.window=4", "train.resume=a.pt",
      "hydra.launcher.partition=gpu", "+schedule.final_lr_fraction=0.1"], None),
    (["schedule.epoch=2"], "schedule.epoch=2 is not valid: the config has no schedule.epoch; valid: schedule.base_lr, "
                           "schedule.epochs, schedule.final_lr_fraction,"),
    (["-m", "norm=bn,mabn", "norm.options.window=4"], "norm.options.window=4 is not valid: the config with norm=bn has no "
                                                      "norm.options.window; valid: norm.options.eps, norm.options.momentum"),
    (["sched.epochs=2"], "sched.epochs=2 is not valid: the config has no sched.epochs; valid: data, model, norm, optim,"),
    (["seed.x=1"], "seed.x=1 is not valid: the config has no seed.x; valid: data, model,"),
    # Hydra's grammar: its 3 lines with a link, and a hint at HYDRA_FULL_ERROR
    (["schedule.epochs", "2"], "'schedule.epochs' is not an override (missing EQUAL at '<EOF>'); valid: key=value, "
                               "group=option, +key=value or ~key"),
    (["-m", "seed=0,1", "norm=bn,"], "'norm=bn,' is not an override (mismatched input '<EOF>' expecting"),
])
def test_group_options_and_keys_are_checked_before_hydra_composes(argv, refused):
    if refused is None:
        check_overrides(argv, str(CONFIGS))
    else:
        with pytest.raises(ConfigError, match="^" + re.escape(refused)):
            check_overrides(argv, str(CONFIGS))


def test_slurm_launcher_config_composes():
    cfg = _compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 2, 8, 8)


BAD_VALUES = {  # override -> what the one error line must say (tests/test_reliability.py: the line, end to end)
    "data.batch_per_gpu=0": "data.batch_per_gpu=0 must be a positive integer",
    "data.batch_per_gpu=8 norm.norm_batch=3": "norm.norm_batch=3 does not divide data.batch_per_gpu=8; valid: [1, 2, 4, 8]",
    "norm=gn norm.norm_batch=2": "norm 'gn' has no normalization batch",
    "train.grad_accum=0": "train.grad_accum=0 must be a positive integer",
    "data.batch_per_gpu=8 train.total_batch=256": "train.total_batch=256 but data.batch_per_gpu=8 x 1 processes x "
                                                  "train.grad_accum=1 = 8; train.grad_accum=32 gives it on 1 processes",
    "data.loader=ffcv": "data.loader='ffcv' is not valid; valid: torchvision, dali",
    "data.input_format=rgb": "data.input_format='rgb' is not valid",
    "schedule.policy=linear": "schedule.policy='linear' is not valid; valid: multistep, cosine",
    "norm=mabn norm.options.window=0": "window=0 is not valid; valid: an integer >= 1",
    "norm=mabn norm.options.warmup=-5": "norm.options.warmup=-5 is not valid",
    "norm=mabn norm.options.momentum=1.5": "momentum=1.5 is not valid; valid: a number in [0, 1]",
    "norm=mabn norm.options.renorm_clip=0.5": "renorm_clip=0.5 is not valid; valid: a number >= 1",
    "norm=mabn norm.options.renorm_start=-1": "renorm_start=-1 is not valid",
    "norm=mabn norm.options.average=wma": "average='wma' is not one of sma, ema",
    "norm=mabn norm.options.eps=0": "eps=0 is not valid; valid: a number > 0",
    **{f"norm=mabn norm.options.{key}=no": f"MABN2d: {key}='no' is not valid; valid: True or False"  # "no" is truthy
       for key in ("renorm", "average_forward", "average_backward")},
    "norm=gn norm.options.num_groups=7": "16 channels cannot be split into 7 groups",
    "norm=gn norm.options.num_groups=0": "num_groups=0 is not valid",
    "norm=brn norm.options.r_max_final=0.5": "r_max_final=0.5 is not valid; valid: a number >= 1",
    "norm=brn norm.options.d_max_final=-1": "d_max_final=-1 is not valid",
    "norm=brn norm.options.momentum=0": "momentum=0 is not valid; valid: a number in (0, 1]",
    "norm=bn norm.options.momentum=2": "momentum=2 is not valid",
    # fractions of the run: -0.5 became 1 iteration, 2 a BRN that never renormalized
    "norm=brn norm.options.t0_frac=2": "norm.options.t0_frac=2 is not valid; valid: a number in [0, 1]",
    "norm=brn norm.options.r_ramp_frac=-0.5": "norm.options.r_ramp_frac=-0.5 is not valid",
    "norm=brn norm.options.d_ramp_frac=soon": "norm.options.d_ramp_frac='soon' is not valid",
    "data.crop_size=0": "data.crop_size=0 is not valid; valid: a positive integer",
    # names of the run's folders: nested a level deeper, or outside output_root (task_name=../x)
    "data.name=x/y": "data.name='x/y' is not valid; valid: one folder name",
    "model.name=": "model.name='' is not valid; valid: one folder name",
    "task_name=../x": "task_name='../x' is not valid",
    "task_name=..": "task_name='..' is not valid",
    "run_name=../x": "run_name='../x' is not valid",
    "run_name=a:b": "run_name='a:b' is not valid",
    "data.val_resize=16": "data.val_resize=16 is not valid; valid: an integer >= data.crop_size=",
    "data.crop_scale=[0.5,0.2]": "data.crop_scale=[0.5, 0.2] is not valid",
    "data.workers=-1": "data.workers=-1 is not valid",
    "data.val_batch_per_gpu=0": "data.val_batch_per_gpu=0 is not valid",
    "data.lighting_std=-0.1": "data.lighting_std=-0.1 is not valid",
    "data.generate=download": "data.generate='download' is not valid; valid: null (data.root is a dataset), shapes, resize",
    "data.generate_options.size=0": "data.generate_options.size=0 is not valid; valid: a positive integer",
    "data.generate_options.val_per_class=-1": "data.generate_options.val_per_class=-1 is not valid",
    "data=imagenette64 data.generate_options.short_side=0": "data.generate_options.short_side=0 is not valid",
    "data=imagenette64 data.generate_options.workers=0": "data.generate_options.workers=0 is not valid; valid: a positive",
    "schedule.base_lr=0": "schedule.base_lr=0 is not valid",
    "schedule.warmup_epochs=-1": "schedule.warmup_epochs=-1 is not valid",
    "schedule=paper schedule.milestones=[90,30]": "schedule.milestones=[90, 30] is not valid; valid: increasing epochs",
    "schedule.gamma=0": "schedule.gamma=0 is not valid",
    "optim.momentum=1": "optim.momentum=1 is not valid; valid: a number in [0, 1)",
    "optim.weight_decay=-1": "optim.weight_decay=-1 is not valid",
    "train.device=tpu": "train.device='tpu' is not valid; valid: auto, cpu, cuda or cuda:N",
    "train.device=cuda:abc": "train.device='cuda:abc' is not valid; valid: auto, cpu, cuda or cuda:N",  # passed, as cuda:
    "train.checkpoint_keep=0": "train.checkpoint_keep=0 is not valid",
    "train.compile=yes": "train.compile='yes' is not valid; valid: true or false",
    "train.compile_mode=fast": "train.compile_mode='fast' is not valid; valid: default, reduce-overhead, max-autotune",
    "train.max_batches_per_epoch=0": "train.max_batches_per_epoch=0 is not valid",
    "stats.every=0": "stats.every=0 is not valid",
    "output_root='~/runs'": "output_root='~/runs' is not valid; valid: a path without ~",  # as the shell passes it quoted
    "tag=e1": "tag='e1' is not valid; valid: \"\" or a run-name suffix starting with \"-\"",
    "tag=-a/b": "tag='-a/b' is not valid",
    "seed=1.5": "seed=1.5 is not valid; valid: an integer >= 0",
    "seed=-1": "seed=-1 is not valid",
    "schedule.epochs=0": "schedule.epochs=0 is not valid; valid: a positive integer",
    "train.total_batch=0": "train.total_batch=0 is not valid; valid: null or a positive integer",
    "train.label_smoothing=2": "train.label_smoothing=2 is not valid; valid: a number in [0, 1]",
    "stats.enabled=true stats.channel=-1": "stats.channel=-1 is not valid",
    "stats.enabled=true stats.channel=16": "stats.channel=16 is not valid; valid: an integer in [0, 15]",
    "stats.enabled=true stats.layers=[nope]": "stats.layers ['nope'] are not norm layers of the model",
    **{f"{key}=yes": f"{key}='yes' is not valid; valid: true or false" for key in FLAGS},  # "yes" is truthy
    "optim.nesterov=3": "optim.nesterov=3 is not valid; valid: true or false",
    "norm=mabn norm.centered_conv=yes": "norm.centered_conv='yes' is not valid; valid: null (the norm's default), true or false",
    "model.width=0": "model.width=0 is not valid; valid: a positive integer",
    "model.width=abc": "model.width='abc' is not valid",
    "model.arch=resnet7": "model.arch='resnet7' is not valid; valid: resnet18, resnet50",
    "model.stem=big": "model.stem='big' is not valid; valid: imagenet, small",
}


@pytest.mark.parametrize("tag, run_name_end", [("-e1", "n32-e1-s0"), ("-2", "n32-2-s0"), ("", "n32-s0")])
def test_a_tag_with_its_dash_passes_and_ends_the_run_name(tag, run_name_end):
    cfg = _compose([f"tag={tag}"])  # Hydra reads tag=-2 as a number: its text is the suffix all the same
    validate(cfg)
    assert cfg.run_name.endswith(run_name_end)


def test_a_sweep_checks_every_job_before_its_first_trains(tiny_shapes, tmp_path):
    """A bad swept value failed only when its job came, after the jobs before it had trained (and left its run dir)."""
    cmd = [arg for arg in train_command(tiny_shapes, tmp_path) if not arg.startswith("data.batch_per_gpu=")]
    cmd[3:3] = ["--multirun", "norm=bn,mabn", "data.batch_per_gpu=8,0"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.splitlines()[-1] == "error: the sweep's job norm=bn data.batch_per_gpu=0: " \
        "data.batch_per_gpu=0 must be a positive integer (make train BS=32)", done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # no job ran, no run dir made


@pytest.mark.parametrize("overrides", list(BAD_VALUES))
def test_every_bad_value_is_one_config_error_before_anything_is_built(overrides):
    from mabn.config import ConfigError
    from mabn.preflight import check_layers

    cfg = _compose(overrides.split())
    with pytest.raises(ConfigError) as err:
        validate(cfg)
        check_layers(cfg)
    assert BAD_VALUES[overrides] in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_must_fit_the_model_and_the_classes_of_the_run_that_continues_it(tmp_path):
    """Checked before the run dir is touched: a model whose tensors differ (a change train.resume_changes let
    through) failed in load_state_dict; a data.root with other classes trained on with labels meaning others."""
    from mabn.resume import ResumeMismatch, check_fits

    for name in ("cat", "dog", "eel"):
        (tmp_path / "train" / name).mkdir(parents=True)
    overrides = ["norm=mabn", "model.width=8", f"data.root={tmp_path}", "data.generate=null"]
    cfg = _compose(overrides)
    state = {"classes": ["cat", "dog", "eel"], "model": build_model(**model_kwargs(cfg, 3, 100)).state_dict()}
    check_fits(state, cfg, "ck.pt")  # the same: no error
    for more, message in ((["model.width=16"], "'conv1.weight' is [8, 3, 3, 3] in it, [16, 3, 3, 3] here"),
                          (["norm=bn"], "tensors missing from it, e.g. 'bn1.running_mean'"),
                          (["norm.options.window=4"], "'bn1.chi_ring' is [16, 8] in it, [4, 8] here")):
        with pytest.raises(ResumeMismatch, match="does not fit the model this run builds") as err:
            check_fits(state, _compose(overrides + more), "ck.pt")
        assert message in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "train" / "eel").rename(tmp_path / "train" / "emu")
    with pytest.raises(ResumeMismatch, match="trained on 3 classes, data.root=.* has 3 \\(e.g. 'emu' is in one only\\)"):
        check_fits(state, cfg, "ck.pt")


def test_one_gpu_named_for_several_processes_is_refused():
    """`GPUS=8 ARGS=train.device=cuda:0` put every rank on GPU 0: NCCL's 'Duplicate GPU detected' once all joined."""
    from mabn.config import ConfigError

    validate(_compose(["train.device=cuda:0"]), world_size=1)  # one process: its GPU (when there is one)
    for device in ("auto", "cuda", "cpu"):
        validate(_compose([f"train.device={device}"]), world_size=8)
    with pytest.raises(ConfigError, match=r"^train.device='cuda:0' puts all 8 processes on one GPU; valid with several "
                                          r"processes: auto or cuda \(each takes GPU LOCAL_RANK\)$"):
        validate(_compose(["train.device=cuda:0"]), world_size=8)


def test_the_preflight_counts_the_tasks_of_a_job_that_srun_started(tmp_path):
    """`srun --ntasks=2 python -m mabn.train train.total_batch=64` (an sbatch script of one's own): the preflight read
    WORLD_SIZE before SLURM's variables were exported and refused the run as one process."""
    from unittest import mock

    from mabn.preflight import preflight

    slurm = dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="1",
                 SLURM_NODEID="0", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node1")
    cfg = _compose([f"data.root={tmp_path / 'shapes'}", "train.total_batch=64"])
    # the whole environment is put back after: the export's WORLD_SIZE, RANK, MASTER_ADDR... left in this test
    # process made every later training subprocess of its worker wait for a process group
    with mock.patch.dict(os.environ, slurm):
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
        preflight(cfg, str(tmp_path / "out"))
        assert os.environ["WORLD_SIZE"] == "2" and os.environ["LOCAL_RANK"] == "1"
    assert "MASTER_ADDR" not in os.environ or os.environ["MASTER_ADDR"] != "node1"
