"""Input checks and the normalization-group view shared by every batch-statistics norm."""
import torch


def check_input(layer, x: torch.Tensor) -> None:
    """Raise a one-line error naming the layer when `x` is not (N, C, H, W) with C = num_features."""
    if x.dim() != 4:
        raise ValueError(f"{layer_label(layer)}: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != layer.num_features:
        raise ValueError(
            f"{layer_label(layer)}: input has {x.shape[1]} channels, the layer was built for {layer.num_features}"
        )


def group_view(layer, x: torch.Tensor, norm_batch: int | None) -> torch.Tensor:
    """View x (N, C, H, W) as (G, b, C, H*W): G consecutive normalization groups of b samples each.

    Raises a one-line error when b does not divide N, or when a group has a single value per channel
    (its variance would be zero and the normalization meaningless).
    """
    n, c, h, w = x.shape
    b = n if norm_batch is None else norm_batch
    if n % b != 0:
        raise ValueError(
            f"{layer_label(layer)}: norm_batch={b} does not divide the batch of {n} samples; "
            f"use a divisor of {n}"
        )
    if b * h * w == 1:
        raise ValueError(
            f"{layer_label(layer)}: norm_batch={b} on {h}x{w} feature maps gives one value per channel "
            f"(zero variance); use norm_batch >= 2 or a larger input"
        )
    return x.reshape(n // b, b, c, h * w)


def require(owner: str, name: str, value, ok: bool, valid: str) -> None:
    """Raise a one-line ValueError `owner: name=value is not valid; valid: ...` unless `ok`."""
    if not ok:
        raise ValueError(f"{owner}: {name}={value!r} is not valid; valid: {valid}")


def require_sizes(owner: str, num_features, norm_batch) -> None:
    """The arguments every norm takes: its channels, and the normalization batch (None: the whole batch; ignored
    by the norms that have none, but still a valid value). Without this, 0 built an empty layer and a bad
    norm_batch failed at the first forward with torch's shape errors."""
    require(owner, "num_features", num_features, is_int(num_features) and num_features >= 1, "an integer >= 1 (channels)")
    require(owner, "norm_batch", norm_batch, norm_batch is None or (is_int(norm_batch) and norm_batch >= 1),
            "None (the whole batch) or an integer >= 1")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def layer_label(layer) -> str:
    """`ClassName 'model.path'` when the model named its layers (see `name_norm_layers`), else the class."""
    name = getattr(layer, "layer_name", None)
    return f"{type(layer).__name__} '{name}'" if name else type(layer).__name__


def per_sample(t: torch.Tensor, norm_batch: int) -> torch.Tensor:
    """Expand a (G, C) per-group statistic to (N, C, 1, 1), keeping x's own shape and memory format."""
    if t.shape[0] == 1:  # one group: broadcasting does the expansion, no copy
        return t[:, :, None, None]
    return t.repeat_interleave(norm_batch, dim=0)[:, :, None, None]


def scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * scale + shift with broadcastable per-(group, channel) scale and shift, in one pass."""
    return torch.addcmul(shift, x, scale)


def second_moment(groups: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """mean(x^2) per (group, channel) of the (G, b, C, H*W) view, with no temporary of x's size (H*W
    reduced first, then b, as `grad_sums`), accumulated in `dtype` (default: the view's own).
    MABN's chi_B; of centered values, BN's biased variance."""
    count = groups.shape[1] * groups.shape[3]
    return torch.linalg.vector_norm(groups, 2, dim=3, dtype=dtype).square_().sum(1).div_(count)


def grad_sums(dy: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum dy, sum dy x) per (group, channel) of (G, b, C, H*W) views.

    Reduced over the contiguous H*W first, then over the b samples: one strided reduction over
    (b, H*W) is several times slower on CPU at every shape.
    """
    return dy.sum(3).sum(1), (dy * x).sum(3).sum(1)


def store_buffer(layer, name: str, value: torch.Tensor, backward: bool = False) -> None:
    """Set buffer `name` of `layer` to `value` (no autograd): in place, except in a forward traced by
    torch.compile, which rebinds it.

    AOTAutograd may recompute in the backward what the forward derived from a buffer (MABN's
    variance from its chi ring and r from running_var, BRN's r and d from its running statistics
    and counter) by reading the buffer's graph input, which an in-place write has already changed:
    the gradients would silently differ from eager. A rebound buffer leaves that input untouched.
    The backward (nothing reads the buffers after it) writes in place."""
    with torch.no_grad():
        if torch.compiler.is_compiling() and not backward:
            setattr(layer, name, value.detach())
        else:
            getattr(layer, name).copy_(value)


def lerp_buffer(layer, name: str, end: torch.Tensor, weight: float) -> None:
    """Move running-statistic buffer `name` of `layer` toward `end` by `weight` (no autograd): one
    in-place lerp in eager mode; under torch.compile rebound, for the reason `store_buffer` gives."""
    with torch.no_grad():
        if torch.compiler.is_compiling():
            setattr(layer, name, torch.lerp(getattr(layer, name), end, weight).detach())
        else:
            getattr(layer, name).lerp_(end, weight)


def as_output(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`y` in `dtype`, as an autograd.Function's forward returns it: `y` itself when it already is.

    `y.to(dtype)` would return the same tensor under a second name; torch 2.11's compile then routes
    the output's gradient to that alias and every gradient before the layer is zero, silently
    (pytorch/pytorch#180642, fixed in 2.12; the machines lent for `make gpu-check` run 2.11)."""
    return y if y.dtype == dtype else y.to(dtype)


def per_group(t: torch.Tensor) -> torch.Tensor:
    """A (G, C) statistic (or a (C,) parameter) shaped to broadcast against the (G, b, C, H*W) view."""
    return t[:, None, :, None] if t.dim() == 2 else t[:, None]
