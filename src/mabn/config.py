"""Config invariants checked before any work, and the translation of config groups into builder arguments."""
import pathlib

from omegaconf import DictConfig, OmegaConf

from .data import INPUT_FORMATS, LOADERS
from .norms import BATCH_STAT_NORMS
from .optim import POLICIES, warmup_steps

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
    if total is not None and total != n * world_size * accum:
        raise ConfigError(
            f"train.total_batch={total} but data.batch_per_gpu={n} x {world_size} processes x "
            f"train.grad_accum={accum} = {n * world_size * accum}; change one of them"
        )
    warmup = cfg.norm.get("options", {}).get("warmup")
    if cfg.norm.name == "mabn" and warmup != "auto" and (isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0):
        raise ConfigError(f"norm.options.warmup={warmup!r} is not valid; valid: auto, or an integer >= 0 (forwards)")
    if cfg.schedule.epochs <= 0:
        raise ConfigError(f"schedule.epochs={cfg.schedule.epochs!r} must be positive")
    if cfg.train.nan_policy not in ("stop", "skip"):
        raise ConfigError(f"train.nan_policy={cfg.train.nan_policy!r} is not valid; valid: stop, skip")
    for key, value, valid in (
        ("data.loader", cfg.data.loader, LOADERS),
        ("data.input_format", cfg.data.input_format, INPUT_FORMATS),
        ("schedule.policy", cfg.schedule.policy, POLICIES),
    ):
        if value not in valid:
            raise ConfigError(f"{key}={value!r} is not valid; valid: {', '.join(valid)}")
    resume = str(cfg.train.resume)
    if resume not in ("auto", "never") and not pathlib.Path(resume).is_file():
        raise ConfigError(f"train.resume={resume!r} is not a checkpoint file; valid: auto, never, or a path to a .pt file")


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
