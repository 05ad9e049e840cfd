"""The paper's batch statistics (SPEC §6), recorded by hooks that leave the math untouched.

For one channel of chosen norm layers, on the first normalization group of a logged iteration:
forward mu_B and sigma^2_B of the input; backward g_B = mean(dL/dy gamma) and
Psi_B = mean(dL/dy gamma y_hat), with y_hat = (y - beta) / gamma the layer's own normalized
output (so BRN's r, d and MABN's r are included) and dL/dy taken per sample (the gradient of the
mean loss times the SGD micro-batch count and batch size, AMP's loss scale removed), so that runs
of different batch sizes compare; and the values the layer actually runs on
instead: BN's and BRN's running mean/variance, MABN's moving averages of chi_B (forward) and of
Psi_B (backward). For a network with BRN layers, also the share of all their (group, channel) pairs
whose r or d sat at its clip limit in that iteration (mabn.renorm_clips): where BRN's training forward
departed from its eval-mode op. With `lag_layers` (`stats.all_layers=true`), for every MABN and BRN
layer over all its channels, how far the averaged statistic it normalizes with sits from the last
group's own (`lag_summary`): a moving average of stale statistics shows as a bias of one sign across
channels, which one recorded channel can hide. Nothing is registered unless recording is enabled.
"""
import json
import pathlib

import torch
from torch import nn

from .config import ConfigError
from .norms import BatchRenorm2d, GhostBatchNorm2d, MABN2d
from .renorm_clips import RenormClipCounter


def _group_size(layer: nn.Module, batch: int) -> int:
    return getattr(layer, "norm_batch", None) or batch


class BatchStatsRecorder:
    """Hooks on `layers` ({name: module}); `arm()` before a logged iteration, `flush(step)` after backward.
    With `net`, BRN's clip rates over all of its BRN layers are recorded too."""

    def __init__(self, layers: dict[str, nn.Module], channel: int = 0, writer=None, path=None,
                 net: nn.Module | None = None, lag_layers: dict[str, nn.Module] | None = None):
        self.layers, self.channel, self.writer = layers, channel, writer
        self.path = pathlib.Path(path) if path else None
        self.armed, self.current, self.lag, self.handles = False, {}, {}, []
        for name, layer in layers.items():
            self.handles.append(layer.register_forward_hook(self._forward_hook(name)))
        self.lag_layers = lag_layers or {}
        for name, layer in self.lag_layers.items():
            self.handles.append(layer.register_forward_hook(self._lag_hook(name)))
        # Registered once, for the whole run, and gated like the hooks above: a compiled model sees hooks
        # that do nothing (it never runs armed), not hooks that come and go.
        clips = RenormClipCounter(net, when=lambda: self.armed) if net is not None else None
        self.clips = clips.__enter__() if clips is not None and clips.layers else None

    def arm(self, grad_scale: float = 1.0) -> None:
        """Record the next forward/backward; `grad_scale` turns the loss gradient into a per-sample one."""
        self.armed, self.current, self.lag, self.grad_scale = True, {}, {}, grad_scale

    def _lag_hook(self, name):
        def hook(layer, inputs, output):
            if self.armed and layer.training:
                self.lag[name] = lag_summary(layer, inputs[0])

        return hook

    def _forward_hook(self, name):
        def hook(layer, inputs, output):
            if not (self.armed and layer.training):
                return
            c, b = self.channel, _group_size(layer, inputs[0].shape[0])
            with torch.no_grad():
                x = inputs[0][:b, c].detach().double()
                gamma, beta = layer.weight[c].detach().double(), layer.bias[c].detach().double()
                y_hat = (output[:b, c].detach().double() - beta) / gamma
                record = {"mu_B": x.mean().item(), "sigma2_B": x.var(unbiased=False).item()}
                record.update(_used_forward_statistics(layer, c))
            self.current[name] = record

            def grad_hook(grad):
                with torch.no_grad():
                    g = grad[:b, c].detach().double() * (gamma * self.grad_scale)
                    record["g_B"] = g.mean().item()
                    record["Psi_B"] = (g * y_hat).mean().item()

            if output.requires_grad:
                output.register_hook(grad_hook)

        return hook

    def flush(self, step: int) -> None:
        """Write the armed iteration's statistics (call after backward)."""
        if not self.armed:
            return
        for name, record in self.current.items():
            layer = self.layers[name]
            if isinstance(layer, MABN2d) and layer.average == "sma":  # the layer's backward has run now
                record["Psi_avg"] = _ring_mean(layer.psi_ring, layer.psi_seen, self.channel)
            if self.writer is not None:
                for key, value in record.items():
                    self.writer.add_scalar(f"batch_stats/{name}/{key}", value, step)
        line = {"step": step, "channel": self.channel, "layers": self.current}
        if self.clips is not None:
            rates = self.clips.rates()
            self.clips.reset()  # counts only armed forwards, so it stays empty until the next recorded one
            # {"r": share of pairs with r clipped, "d": ..., "layers": {name: [r share, d share]}}
            line["brn_clips"] = {"r": rates["r"], "d": rates["d"],
                                 "layers": {n: [v["r"], v["d"]] for n, v in rates["layers"].items()}}
            if self.writer is not None:
                self.writer.add_scalar("batch_stats/brn_clipped_r", rates["r"], step)
                self.writer.add_scalar("batch_stats/brn_clipped_d", rates["d"], step)
        if self.lag:
            # {layer: [median over channels of used / own - 1, mean over channels of |log(used / own)|]}
            line["lag"] = self.lag
            if self.writer is not None:
                self.writer.add_scalar("batch_stats/lag_abs_log", sum(v[1] for v in self.lag.values()) / len(self.lag), step)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")
        self.armed = False

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.clips is not None:
            self.clips.__exit__(None, None, None)


def _used_forward_statistics(layer: nn.Module, c: int) -> dict:
    """The statistics the layer runs on in place of the batch's (after this forward's update)."""
    if isinstance(layer, MABN2d):
        return {"chi_avg": _ring_mean(layer.chi_ring, layer.chi_seen, c), "running_var": layer.running_var[c].item()}
    if isinstance(layer, BatchRenorm2d):
        return {"running_mean": layer.running_mean[c].item(), "running_var": layer.running_std[c].item() ** 2}
    if isinstance(layer, GhostBatchNorm2d):
        return {"running_mean": layer.running_mean[c].item(), "running_var": layer.running_var[c].item()}
    return {}


def lag_summary(layer: nn.Module, x: torch.Tensor) -> list[float]:
    """[median over channels of used / own - 1, mean over channels of |log(used / own)|] for the last
    normalization group of input `x` (called after the layer's forward, so its buffers include it):
    MABN's SMA of chi_B (exactly what that group divided by once the ring is full) against the group's
    own chi_B; BRN's running variance (what r carries its normalization to, read after this forward's
    update) against the group's sigma^2_B."""
    b = _group_size(layer, x.shape[0])
    with torch.no_grad():
        group = x[-b:].detach().double()
        if isinstance(layer, MABN2d):
            own, used = group.pow(2).mean((0, 2, 3)), _ring_filled(layer.chi_ring, layer.chi_seen).double().mean(0)
        else:
            own, used = group.var((0, 2, 3), unbiased=False), layer.running_std.double() ** 2
        ratio = (used + layer.eps) / (own + layer.eps)
        return [(ratio - 1).median().item(), ratio.log().abs().mean().item()]


def lag_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer `lag_summary` applies to: MABN with its simple moving average, and BRN."""
    return {n: m for n, m in model.named_modules()
            if (isinstance(m, MABN2d) and m.average == "sma" and m.average_forward) or isinstance(m, BatchRenorm2d)}


def _ring_filled(ring: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """The filled entries of a moving-average ring (all of it once full: their mean is then the SMA)."""
    return ring[:min(int(seen), ring.shape[0])]


def _ring_mean(ring: torch.Tensor, seen: torch.Tensor, c: int) -> float:
    """Mean of the filled entries of a moving-average ring in channel `c` (the SMA once it is full)."""
    filled = _ring_filled(ring, seen)[:, c]
    return filled.mean().item() if len(filled) else float("nan")


def select_layers(model: nn.Module, names: list[str] | None) -> dict[str, nn.Module]:
    """The norm layers to record: the named ones, or by default the first and the last."""
    norms = {n: m for n, m in model.named_modules() if isinstance(m, (GhostBatchNorm2d, BatchRenorm2d, MABN2d))}
    if names:
        unknown = [n for n in names if n not in norms]
        if unknown:
            raise ConfigError(f"stats.layers {unknown} are not norm layers of the model; valid e.g. {list(norms)[:4]}")
        return {n: norms[n] for n in names}
    keys = list(norms)
    return {k: norms[k] for k in (keys[:1] + keys[-1:])} if keys else {}
