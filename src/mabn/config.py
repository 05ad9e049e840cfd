"""Config invariants checked before any work, and the translation of config groups into builder arguments."""
import pathlib
import re

from omegaconf import DictConfig, OmegaConf

from .compile import MODES as COMPILE_MODES
from .data import GENERATORS, INPUT_FORMATS, LOADERS
from .norms import BATCH_STAT_NORMS
from .norms._groups import is_int, is_number
from .optim import POLICIES, warmup_steps

TAG = re.compile(r"-[A-Za-z0-9._=+-]*")  # a suffix of the run dir's name: no path separators or spaces
NAME = re.compile(r"[A-Za-z0-9._=+-]+")  # one folder name: no path separators or spaces
FLAGS = ("train.amp", "train.channels_last", "train.deterministic", "train.compile", "train.progress", "stats.enabled",
         "stats.all_layers", "optim.nesterov", "optim.decay_norm_and_bias", "data.flip", "model.zero_init_last_gamma")  # true or false
CONFIG_DIR = str(pathlib.Path(__file__).resolve().parents[2] / "configs")  # an editable install: src/mabn/ in the checkout
MIN_MABN_WARMUP = 100  # the paper's MABN warmup (iterations of current statistics), SPEC §2


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key, the value and what is valid."""


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Raise ConfigError on the first invalid value (before data, model or output is touched)."""
    n = cfg.data.batch_per_gpu
    if not isinstance(n, int) or n <= 0:
        raise ConfigError(f"data.batch_per_gpu={n!r} must be a positive integer (make train BS=32)")
    b = cfg.norm.norm_batch
    if not isinstance(b, int) or b <= 0:
        raise ConfigError(f"norm.norm_batch={b!r} must be a positive integer dividing data.batch_per_gpu={n}")
    if n % b != 0:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise ConfigError(f"norm.norm_batch={b} does not divide data.batch_per_gpu={n}; valid: {divisors}")
    if b != n and cfg.norm.name not in BATCH_STAT_NORMS:
        raise ConfigError(
            f"norm.norm_batch={b} differs from data.batch_per_gpu={n}, but norm '{cfg.norm.name}' has no "
            f"normalization batch; ghost batches apply to {', '.join(BATCH_STAT_NORMS)}"
        )
    accum = cfg.train.grad_accum
    if not isinstance(accum, int) or accum <= 0:
        raise ConfigError(f"train.grad_accum={accum!r} must be a positive integer")
    total = cfg.train.get("total_batch")
    require("train.total_batch", total, total is None or (is_int(total) and total > 0), "null or a positive integer")
    if total is not None and total != n * world_size * accum:
        fits = total % (n * world_size) == 0
        hint = f"train.grad_accum={total // (n * world_size)} gives it on {world_size} processes" if fits else "change one of them"
        raise ConfigError(
            f"train.total_batch={total} but data.batch_per_gpu={n} x {world_size} processes x "
            f"train.grad_accum={accum} = {n * world_size * accum}; {hint}"
        )
    epochs = cfg.schedule.epochs
    require("schedule.epochs", epochs, is_int(epochs) and epochs > 0, "a positive integer")
    require("seed", cfg.seed, is_int(cfg.seed) and cfg.seed >= 0, "an integer >= 0")
    for key in FLAGS:
        flag = OmegaConf.select(cfg, key)  # a string such as "yes" or "no" is truthy: it would switch the feature on
        require(key, flag, isinstance(flag, bool), "true or false")
    centered = cfg.norm.get("centered_conv")
    require("norm.centered_conv", centered, centered is None or isinstance(centered, bool), "null (the norm's default), true or false")
    width = cfg.model.width
    require("model.width", width, is_int(width) and width > 0, "a positive integer (channels of the first stage)")
    check_data(cfg.data)
    check_schedule_and_optim(cfg)
    check_train(cfg)
    device = str(cfg.train.device)
    if world_size > 1 and device.startswith("cuda:"):  # NCCL's 'Duplicate GPU detected' once they all joined
        raise ConfigError(f"train.device={device!r} puts all {world_size} processes on one GPU; valid with several "
                          "processes: auto or cuda (each takes GPU LOCAL_RANK)")
    warmup = cfg.norm.get("options", {}).get("warmup")
    require("norm.options.warmup", warmup, cfg.norm.name != "mabn" or warmup == "auto" or (is_int(warmup) and warmup >= 0),
            "auto, or an integer >= 0 (forwards)")
    for key, value in (cfg.norm.get("options") or {}).items():
        # `*_frac` keys are fractions of the run's iterations (norm_kwargs): a negative one became 1
        # iteration and one above 1 outlasted the run (BRN that never renormalizes), both silently.
        if str(key).endswith("_frac"):
            require(f"norm.options.{key}", value, is_number(value) and 0 <= value <= 1,
                    "a number in [0, 1] (a fraction of the run's iterations)")
    for key, value, valid in (
        ("train.nan_policy", cfg.train.nan_policy, ("stop", "skip")),
        ("data.loader", cfg.data.loader, LOADERS),
        ("data.input_format", cfg.data.input_format, INPUT_FORMATS),
        ("schedule.policy", cfg.schedule.policy, POLICIES),
    ):
        require(key, value, value in valid, ", ".join(valid))
    resume = str(cfg.train.resume)
    if resume not in ("auto", "never") and not pathlib.Path(resume).is_file():
        raise ConfigError(f"train.resume={resume!r} is not a checkpoint file; valid: auto, never, or a path to a .pt file")


_MISSING = object()  # OmegaConf.select's default for a key the config does not have


def require(key: str, value, ok: bool, valid: str) -> None:
    """Raise the one-line ConfigError `key=value is not valid; valid: ...` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not valid; valid: {valid}")


def check_overrides(argv: list, config_dir: str) -> None:
    """Raise ConfigError when a command-line override names what the config does not have, before Hydra composes
    anything: a group option with no file (`norm=batchnorm`, `experiment=nope`, a sweep's `norm=bn,foo`) or a key
    (`schedule.epoch=2`). Hydra's own reports are 6 to 15 lines, exit 1, a sweep's came twice, and for a key they
    advise `+schedule.epoch=2`, which adds a setting nothing reads; and an override Hydra's grammar cannot read
    (`schedule.epochs 2`). Hydra's own parsers read the command line; a command line its argument parser refuses,
    groups from plugins (hydra/*), `+`/`++` additions and hydra.* keys are left to Hydra."""
    import argparse

    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType, ValueType
    from hydra.errors import OverrideParseException

    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        args, rest = parser.parse_known_args(argv)
    except argparse.ArgumentError:
        return
    if args.config_name or args.config_path or args.config_dir:
        return
    grammar, overrides = OverridesParser.create(), []
    for text in [*args.overrides, *(a for a in rest if not a.startswith("-"))]:  # one at a time: the error names it
        try:
            overrides += grammar.parse_overrides([text])
        except OverrideParseException as err:  # `ARGS="schedule.epochs 2"`: Hydra's 3 lines and a traceback hint
            why = [line for line in str(err).splitlines() if not line.startswith(("Error parsing", "See http"))][:1]
            raise ConfigError(f"{text!r} is not an override ({why[0].strip() if why else 'unreadable'}); valid: "
                              "key=value, group=option, +key=value or ~key (Hydra's override grammar)") from None
    picks, keys = [], []  # the groups as the first job picks them (to compose its config), the keys to look up
    for override in overrides:
        name = override.key_or_group
        group = pathlib.Path(config_dir, name)
        if override.package is not None or override.is_delete() or name.startswith(("hydra/", "hydra.")):
            continue
        if not group.is_dir():
            if override.type == OverrideType.CHANGE:
                keys.append(override)
            continue
        if override.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP):
            picked = list(override.sweep_string_iterator())
            picks.append(f"{'+' if override.type == OverrideType.ADD else ''}{name}={picked[0]}")
        elif override.value_type == ValueType.ELEMENT:
            value = override.value()
            picked = value if isinstance(value, list) else [value]
            picks.append(override.input_line)
        else:  # glob and range sweeps: Hydra expands them against the group itself
            continue
        options = sorted(str(f.relative_to(group).with_suffix("")) for f in group.rglob("*.yaml"))
        for choice in picked:
            if isinstance(choice, str) and choice not in options:
                raise ConfigError(f"{name}={choice!r} is not valid; valid: {', '.join(options)}")
    if not keys:
        return
    try:
        with initialize_config_dir(config_dir=str(pathlib.Path(config_dir).absolute()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=picks)
    except Exception:  # whatever stops composing here stops Hydra's run too, which reports it
        return
    for override in keys:
        path, node, found = override.key_or_group.split("."), cfg, 0
        while found < len(path) and OmegaConf.is_dict(node) and path[found] in node.keys():  # keys(): `???` ones too
            node = OmegaConf.select(node, path[found], throw_on_resolution_failure=False)
            found += 1
        if found == len(path) or OmegaConf.is_list(node):  # into a list: Hydra's to check
            continue
        parent = path[:found] if OmegaConf.is_dict(node) else path[:found - 1]  # `seed.x`: below a value
        node = OmegaConf.select(cfg, ".".join(parent)) if parent else cfg
        valid = ", ".join(".".join([*parent, str(k)]) for k in sorted(node.keys()) if k != "hydra")
        config = f"the config with {' '.join(picks)}" if picks else "the config"  # a sweep's: its first job's
        raise ConfigError(f"{override.input_line} is not valid: {config} has no {'.'.join(path)}; valid: {valid}")


def check_data(data: DictConfig) -> None:
    """Sizes and counts of the data group (the layout of data.root is checked by mabn.data.check_layout)."""
    crop, resize = data.crop_size, data.get("val_resize")
    require("data.crop_size", crop, is_int(crop) and crop > 0, "a positive integer (pixels)")
    require("data.val_resize", resize, is_int(resize) and resize >= crop, f"an integer >= data.crop_size={crop}")
    scale = list(data.crop_scale) if OmegaConf.is_list(data.get("crop_scale")) else data.get("crop_scale")
    require("data.crop_scale", scale, isinstance(scale, list) and len(scale) == 2 and all(map(is_number, scale))
             and 0 < scale[0] <= scale[1] <= 1, "[min, max] area fractions with 0 < min <= max <= 1")
    val_batch = data.get("val_batch_per_gpu")
    require("data.val_batch_per_gpu", val_batch, val_batch is None or (is_int(val_batch) and val_batch > 0),
             "null (data.batch_per_gpu) or a positive integer")
    require("data.workers", data.workers, is_int(data.workers) and data.workers >= 0, "an integer >= 0 (0: load in the main process)")
    require("data.lighting_std", data.lighting_std, is_number(data.lighting_std) and data.lighting_std >= 0, "a number >= 0 (0: off)")
    unreadable = data.get("max_unreadable")
    require("data.max_unreadable", unreadable, unreadable is None or (is_int(unreadable) and unreadable >= 0), "null or an integer >= 0")
    how = data.get("generate")
    require("data.generate", how, how is None or how in GENERATORS, f"null (data.root is a dataset), {', '.join(GENERATORS)}")
    sizes = dict(shapes=("train_per_class", "val_per_class", "size"), resize=("short_side",)).get(how, ())
    for key in sizes:  # a generated tree of 0 px images or no images would train without complaint
        value = OmegaConf.select(data, f"generate_options.{key}")
        require(f"data.generate_options.{key}", value, is_int(value) and value > 0, "a positive integer")
    workers = OmegaConf.select(data, "generate_options.workers") if how == "resize" else None
    require("data.generate_options.workers", workers, workers is None or (is_int(workers) and workers > 0),
            "a positive integer (resizing processes)")


def check_schedule_and_optim(cfg: DictConfig) -> None:
    sched, optim = cfg.schedule, cfg.optim
    require("schedule.base_lr", sched.base_lr, is_number(sched.base_lr) and sched.base_lr > 0, "a number > 0")
    require("schedule.warmup_epochs", sched.warmup_epochs, is_number(sched.warmup_epochs) and 0 <= sched.warmup_epochs <= sched.epochs,
             f"a number in [0, schedule.epochs={sched.epochs}]")
    milestones = list(sched.milestones)
    require("schedule.milestones", milestones, all(map(is_number, milestones)) and milestones == sorted(milestones)
             and all(0 < m < sched.epochs for m in milestones), f"increasing epochs within (0, {sched.epochs})")
    require("schedule.gamma", sched.gamma, is_number(sched.gamma) and 0 < sched.gamma <= 1, "a number in (0, 1]")
    final = sched.get("final_lr_fraction", 0.0)
    require("schedule.final_lr_fraction", final, is_number(final) and 0 <= final <= 1, "a number in [0, 1]")
    require("optim.momentum", optim.momentum, is_number(optim.momentum) and 0 <= optim.momentum < 1, "a number in [0, 1)")
    require("optim.weight_decay", optim.weight_decay, is_number(optim.weight_decay) and optim.weight_decay >= 0, "a number >= 0")


def check_train(cfg: DictConfig) -> None:
    train = cfg.train
    device = str(train.device)
    require("train.device", device, re.fullmatch(r"auto|cpu|cuda(:\d+)?", device) is not None, "auto, cpu, cuda or cuda:N")
    for key in ("checkpoint_keep", "log_every"):
        require(f"train.{key}", train[key], is_int(train[key]) and train[key] >= 1, "an integer >= 1")
    for key in ("checkpoint_every_steps", "checkpoint_minutes", "max_nonfinite_skips"):
        require(f"train.{key}", train[key], is_number(train[key]) and train[key] >= 0, "a number >= 0 (0: off)")
    require("train.compile_mode", train.compile_mode, train.compile_mode in COMPILE_MODES, ", ".join(COMPILE_MODES))
    cap = train.get("max_batches_per_epoch")
    require("train.max_batches_per_epoch", cap, cap is None or (is_int(cap) and cap > 0), "null or a positive integer")
    pause = train.get("stop_after_epochs")
    require("train.stop_after_epochs", pause, pause is None or (is_int(pause) and pause > 0), "null or a positive integer")
    smoothing = train.label_smoothing
    require("train.label_smoothing", smoothing, is_number(smoothing) and 0 <= smoothing <= 1, "a number in [0, 1]")
    require("stats.every", cfg.stats.every, is_int(cfg.stats.every) and cfg.stats.every >= 1, "an integer >= 1")
    require("stats.channel", cfg.stats.channel, is_int(cfg.stats.channel) and cfg.stats.channel >= 0,
             "an integer >= 0 (below the recorded layers' channels)")
    changes = train.get("resume_changes") or []
    require("train.resume_changes", changes, OmegaConf.is_list(changes) or isinstance(changes, list),
             "a list of settings, e.g. [schedule.epochs]")
    for key in changes:
        require("train.resume_changes", key, isinstance(key, str) and OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING,
                 "a list of this config's settings as dotted keys, e.g. [schedule.epochs]")
    root = str(cfg.get("output_root", "outputs"))
    require("output_root", root, not root.startswith("~"), "a path without ~ (Hydra does not expand it): use $HOME/...")
    tag = cfg.get("tag", "")
    # The run name is <...>-n<batch_per_gpu><tag>-s<seed>: without its dash a tag runs into the batch ("n32e1").
    # Its text is what counts: Hydra reads tag=-2 as the number -2, which names the run "...-n32-2-s0" as meant.
    require("tag", tag, tag == "" or (tag is not None and TAG.fullmatch(str(tag)) is not None),
             '"" or a run-name suffix starting with "-", of letters, digits and . _ - = + (e.g. tag=-e1)')
    # Runs land in <output_root>/<task_name>/<run_name>, run_name built from data.name and model.name: a "/"
    # in any of them nested the run a level deeper, where the result tables did not look, and task_name=../x
    # or run_name=../x put it outside output_root; an empty name left "shapes10--bn-..." and blank table cells.
    for key in ("data.name", "model.name", "task_name", "run_name"):
        name = OmegaConf.select(cfg, key)
        require(key, name, name is not None and NAME.fullmatch(str(name)) is not None and str(name) not in (".", ".."),
                "one folder name of letters, digits and . _ - = + (no / or spaces)")


def sgd_batch(cfg: DictConfig, world_size: int) -> int:
    return cfg.data.batch_per_gpu * world_size * cfg.train.grad_accum


def auto_mabn_warmup(lr_warmup_forwards: int) -> int:
    """MABN's `warmup: auto` (SPEC §8): switch to moving averages no earlier than the end of the
    learning-rate warmup, and never before the paper's 100 iterations."""
    return max(MIN_MABN_WARMUP, lr_warmup_forwards)


def norm_kwargs(norm_cfg: DictConfig, total_iters: int, lr_warmup_forwards: int = 0) -> dict:
    """Keyword arguments of `build_norm` for this norm config.

    Both counts are training forwards (what the layers count: optimizer steps x train.grad_accum).
    BRN's schedule is configured as fractions of the run's total iterations (`*_frac` keys), so
    short runs get a proportional schedule; they become iteration counts here. `warmup: auto`
    becomes MABN's warmup for this schedule (`auto_mabn_warmup`); an integer is kept.
    """
    kwargs = dict(OmegaConf.to_container(norm_cfg.get("options", {}), resolve=True))
    for key in [k for k in kwargs if k.endswith("_frac")]:
        kwargs[key.removesuffix("_frac")] = max(1, round(kwargs.pop(key) * total_iters))
    if kwargs.get("warmup") == "auto":
        kwargs["warmup"] = auto_mabn_warmup(lr_warmup_forwards)
    if norm_cfg.name in BATCH_STAT_NORMS:
        kwargs["norm_batch"] = norm_cfg.norm_batch
    return kwargs


def model_kwargs(cfg: DictConfig, num_classes: int, steps_per_epoch: int) -> dict:
    """Keyword arguments of `mabn.models.build_model` for this run.

    The norms count training forwards (optimizer steps x train.grad_accum), so the run's length and
    its learning-rate warmup reach `norm_kwargs` in forwards.
    """
    forwards_per_step = cfg.train.grad_accum
    total_forwards = int(steps_per_epoch * cfg.schedule.epochs) * forwards_per_step
    lr_warmup_forwards = warmup_steps(cfg.schedule, steps_per_epoch) * forwards_per_step
    return dict(
        arch=cfg.model.arch,
        norm=cfg.norm.name,
        num_classes=num_classes,
        width=cfg.model.width,
        stem=cfg.model.stem,
        centered_conv=cfg.norm.get("centered_conv"),
        zero_init_last_gamma=cfg.model.zero_init_last_gamma,
        **norm_kwargs(cfg.norm, total_forwards, lr_warmup_forwards),
    )
