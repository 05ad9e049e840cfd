"""SGD with linear lr scaling, and the learning-rate schedule as a pure function of the step."""
import math

import torch
from torch import nn

POLICIES = ("multistep", "cosine")


def scaled_lr(base_lr: float, sgd_batch: int) -> float:
    """Linear scaling rule (SPEC §1): base_lr is the rate for an SGD batch of 256."""
    return base_lr * sgd_batch / 256


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """One group, or two when norm parameters and biases (every 1-D parameter) are kept out of weight decay."""
    if decay_norm_and_bias:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim_cfg, lr: float) -> torch.optim.SGD:
    groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.decay_norm_and_bias)
    return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov)


def warmup_steps(schedule_cfg, steps_per_epoch: int) -> int:
    """Optimizer steps of the linear learning-rate warmup (0: none, as the paper's multistep recipe)."""
    return int(schedule_cfg.warmup_epochs * steps_per_epoch)


class LRSchedule:
    """lr(step) for step = optimizer steps taken so far: linear warmup, then multistep or cosine decay.

    A pure function of the step, so that resuming needs only the step count.
    """

    def __init__(self, peak_lr: float, steps_per_epoch: int, schedule_cfg):
        if schedule_cfg.policy not in POLICIES:
            raise ValueError(f"schedule.policy={schedule_cfg.policy!r} is not valid; valid: {', '.join(POLICIES)}")
        self.peak = peak_lr
        self.total = max(1, int(schedule_cfg.epochs * steps_per_epoch))
        self.warmup = warmup_steps(schedule_cfg, steps_per_epoch)
        self.policy = schedule_cfg.policy
        self.milestones = [int(m * steps_per_epoch) for m in schedule_cfg.milestones]
        self.gamma = schedule_cfg.gamma
        self.final_fraction = schedule_cfg.get("final_lr_fraction", 0.0)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if self.policy == "multistep":
            return self.peak * self.gamma ** sum(step >= m for m in self.milestones)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.peak * (self.final_fraction + (1 - self.final_fraction) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
