"""The norm factory, centered convs, folding, and the one-line errors of bad input."""
import pytest
import torch
from torch import nn

from mabn.fold import fold_norms
from mabn.models import build_model, resnet50
from mabn.norms import NORMS, CenConv2d, GhostBatchNorm2d, MABN2d, build_norm


@pytest.mark.parametrize("name", sorted(NORMS))
def test_factory_builds_every_norm_by_name(name):
    layer = build_norm(name, 64, norm_batch=None)
    assert layer.num_features == 64
    layer.train()
    y = layer(torch.randn(4, 64, 3, 3))
    assert y.shape == (4, 64, 3, 3)


@pytest.mark.parametrize("name", sorted(NORMS))
def test_every_norm_refuses_bad_channels_and_norm_batch_when_built(name):
    """0 channels built an empty layer; a bad norm_batch failed at the first forward with torch's shape errors
    (or, for True, ran as 1). The norms without a normalization batch ignore it, but not a bad value."""
    label = type(build_norm(name, 8)).__name__
    for channels, norm_batch, message in ((0, None, "num_features=0"), (2.5, None, "num_features=2.5"),
                                          (8, 0, "norm_batch=0"), (8, -2, "norm_batch=-2"), (8, True, "norm_batch=True")):
        with pytest.raises(ValueError, match=f"^{label}: {message} is not valid; valid: "):
            build_norm(name, channels, norm_batch=norm_batch)


def test_factory_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown norm 'bnx'; valid: bn, brn, gn, in, ln, mabn, syncbn"):
        build_norm("bnx", 8)


@pytest.mark.parametrize("name, reference", [("ln", lambda c: nn.GroupNorm(1, c)), ("in", lambda c: nn.InstanceNorm2d(c, affine=True))])
def test_ln_and_in_are_the_group_norm_special_cases(name, reference):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    ours, ref = build_norm(name, 6).double().train(), reference(6).double().train()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-1, 1)
        ref.weight.copy_(ours.weight), ref.bias.copy_(ours.bias)
    y, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(y_ref, x, dy)[0], rtol=1e-10, atol=1e-10)


def test_resnet50_bn_parameter_count():
    assert sum(p.numel() for p in resnet50("bn").parameters()) == 25_557_032


def test_cenconv_centers_weight_per_output_channel():
    torch.manual_seed(0)
    conv = CenConv2d(3, 4, 3, padding=1)
    assert conv.bias is None
    x = torch.randn(2, 3, 5, 5)
    w = conv.weight - conv.weight.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, w, padding=1))
    # a constant input gives zero output: each centered filter sums to zero
    assert conv(torch.ones(1, 3, 5, 5))[..., 1:-1, 1:-1].abs().max() < 1e-5


def test_centering_backward_is_the_exact_gradient():
    from mabn.norms.cenconv import CenterPerOutputChannel

    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(CenterPerOutputChannel.apply, (w,))


def test_mabn_model_uses_centered_convs_and_switch_turns_them_off():
    with_cen = build_model("resnet18", norm="mabn", width=8, stem="small", num_classes=10)
    without = build_model("resnet18", norm="mabn", width=8, stem="small", num_classes=10, centered_conv=False)
    assert all(isinstance(m, CenConv2d) for m in with_cen.modules() if isinstance(m, nn.Conv2d))
    assert not any(isinstance(m, CenConv2d) for m in without.modules())


@pytest.mark.parametrize("norm", ["bn", "brn", "mabn"])
def test_fold_resnet50_matches_unfused_eval(norm):
    torch.manual_seed(0)
    kwargs = dict(norm_batch=2) if norm != "mabn" else dict(norm_batch=2, warmup=1, window=2)
    model = resnet50(norm, num_classes=10, **kwargs)
    # a few training forwards give the running statistics realistic values
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 64, 64))
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        folded = fold_norms(model)
        got = folded(x)
    norm_types = (GhostBatchNorm2d, MABN2d, type(build_norm("brn", 1)))
    assert not any(isinstance(m, norm_types) for m in folded.modules())
    assert not any(isinstance(m, CenConv2d) for m in folded.modules())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # float32 through 50 layers


def test_fold_keeps_gn_unfolded():
    model = build_model("resnet18", norm="gn", width=32, stem="small", num_classes=10).eval()
    folded = fold_norms(model)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(folded(x), model(x))


@pytest.mark.parametrize(
    "layer, x, message",
    [
        (GhostBatchNorm2d(4, norm_batch=2), torch.randn(4, 4, 3), "expected a 4-D input"),
        (MABN2d(4), torch.randn(2, 5, 3, 3), "input has 5 channels, the layer was built for 4"),
        (MABN2d(4, norm_batch=3), torch.randn(4, 4, 3, 3), "norm_batch=3 does not divide the batch of 4"),
        (GhostBatchNorm2d(4, norm_batch=3), torch.randn(4, 4, 3, 3), "norm_batch=3 does not divide the batch of 4"),
        (GhostBatchNorm2d(4, norm_batch=1), torch.randn(4, 4, 1, 1), "zero variance"),
        (GhostBatchNorm2d(4), torch.randn(1, 4, 1, 1), "zero variance"),
        (build_norm("brn", 4, norm_batch=1), torch.randn(2, 4, 1, 1), "zero variance"),
    ],
)
def test_bad_input_gives_one_line_error(layer, x, message):
    layer.train()
    with pytest.raises(ValueError, match=message) as info:
        layer(x)
    assert "\n" not in str(info.value)


def test_errors_name_the_layer_inside_a_model():
    model = build_model("resnet18", norm="mabn", width=8, stem="small", num_classes=10, norm_batch=3)
    with pytest.raises(ValueError, match=r"MABN2d 'bn1': norm_batch=3 does not divide the batch of 4"):
        model(torch.randn(4, 3, 8, 8))
