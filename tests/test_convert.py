"""convert_model over real torchvision architectures (built with weights=None: nothing is downloaded)."""
import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import detection
from torchvision.ops.misc import FrozenBatchNorm2d

from mabn.convert import convert_model, is_source_norm
from mabn.fold import fold_norms
from mabn.norms import NORMS, CenConv2d, MABN2d

CLASSIFIERS = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "regnet_y_400mf", "mobilenet_v3_small",
               "efficientnet_b0"]
QUICK = ("resnet18", "mobilenet_v3_small")  # checked in `make test`; the rest with `make test-slow`
DETECTORS = ["fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "retinanet_resnet50_fpn"]
TRAIN_NORMS = ["bn", "syncbn", "gn", "brn", "mabn"]
EVAL_EXACT_NORMS = ["bn", "syncbn", "brn", "mabn"]  # norms that can hold BN's eval function


def classifier(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_norm_state(getattr(torchvision.models, name)(weights=None, num_classes=10))


def detector(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64,
                                     box_score_thresh=0.0, **({} if name.startswith("retina") else {"rpn_post_nms_top_n_test": 50}))
    return randomize_norm_state(model)


@torch.no_grad()
def randomize_norm_state(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that carrying them over is tested."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if is_source_norm(m):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.copy_(torch.rand(c, generator=gen) - 0.5)
    return model.eval()


def count(model: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in QUICK + ("efficientnet_b0",) else pytest.mark.slow)
                                  for n in CLASSIFIERS])
def test_classifier_eval_function_survives_conversion_and_folding(name):
    model = classifier(name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(x)
    bns = count(model, nn.BatchNorm2d)
    for norm in EVAL_EXACT_NORMS:
        converted = convert_model(copy.deepcopy(model), norm, norm_batch=2 if norm != "syncbn" else None,
                                  centered_conv=False).eval()
        assert count(converted, NORMS[norm]) == bns and not any(is_source_norm(m) for m in converted.modules())
        with torch.no_grad():
            out = converted(x)
            folded = fold_norms(converted)
            out_folded = folded(x)
        scale = reference.abs().max().item()
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5 * scale, msg=f"{name} {norm}")
        torch.testing.assert_close(out_folded, out, rtol=1e-5, atol=1e-5 * scale, msg=f"{name} {norm} folded")
        assert count(folded, NORMS[norm]) == 0, f"{name} {norm}: every norm follows a conv and folds"


@pytest.mark.filterwarnings("ignore:gn has no running statistics")
@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "resnet18" else pytest.mark.slow) for n in CLASSIFIERS])
def test_every_converted_classifier_trains_with_every_norm(name):
    model = classifier(name)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    for norm in TRAIN_NORMS:
        kwargs = {"norm_batch": 2} if norm in ("bn", "brn", "mabn") else {}
        if norm == "mabn":
            kwargs.update(window=2, warmup=1)  # reach the moving averages within two steps
        converted = convert_model(copy.deepcopy(model), norm, **kwargs).train()
        assert (count(converted, CenConv2d) > 0) == (norm == "mabn")  # centered convs exactly for MABN
        opt = torch.optim.SGD(converted.parameters(), lr=0.01)
        for _ in range(3):
            loss = nn.functional.cross_entropy(converted(x), y)
            assert torch.isfinite(loss), f"{name} {norm}"
            opt.zero_grad()
            loss.backward()
            opt.step()
        if norm == "mabn":
            assert all(int(m.num_batches_tracked) == 3 for m in converted.modules() if isinstance(m, MABN2d))


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == DETECTORS[0] else pytest.mark.slow) for n in DETECTORS])
def test_detector_eval_outputs_survive_conversion_and_folding(name):
    model = detector(name)
    images = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(4)) for _ in range(2)]
    batch = model.transform(images)[0].tensors
    with torch.no_grad():
        reference, features = model(images), model.backbone(batch)
    for norm in ("bn", "mabn"):
        converted = convert_model(copy.deepcopy(model), norm, norm_batch=2 if norm == "bn" else None,
                                  centered_conv=False).eval()
        folded = fold_norms(converted)
        assert count(folded, NORMS[norm]) == 0, "the backbone is folded although the detector cannot be traced"
        for model_ in (converted, folded):
            with torch.no_grad():
                got, got_features = model_(images), model_.backbone(batch)
            for level, value in features.items():  # what conversion touches: float rounding only
                scale = value.abs().max().item()
                torch.testing.assert_close(got_features[level], value, rtol=1e-5, atol=1e-5 * scale)
            for a, b in zip(got, reference):  # a random detector's box decoding amplifies rounding ~100x
                assert len(b["boxes"]) > 0
                torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-2, atol=1e-2)
                torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-3, atol=1e-4)


@pytest.mark.filterwarnings("ignore:gn has no running statistics")
@pytest.mark.slow  # make test trains a converted Faster R-CNN in test_mabn_detector_at_a_real_batch_of_2...
@pytest.mark.parametrize("name", DETECTORS)
def test_every_converted_detector_trains(name):
    model = detector(name)
    gen = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 64, 64, generator=gen) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([1]),
                "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)} for _ in range(2)]
    for t in targets:
        t["masks"][0, 8:48, 8:40] = 1
    for norm in ("gn", "brn", "mabn"):
        converted = convert_model(copy.deepcopy(model), norm, **({"window": 2, "warmup": 1} if norm == "mabn" else {}))
        converted.train()
        losses = converted(images, targets)
        loss = sum(losses.values())
        assert torch.isfinite(loss), f"{name} {norm}: {losses}"
        loss.backward()


def test_frozen_batchnorm_stays_frozen_unless_asked():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
    frozen = convert_model(copy.deepcopy(model), "mabn", centered_conv=False).eval()
    assert all(not p.requires_grad for m in frozen.modules() if isinstance(m, MABN2d) for p in m.parameters())
    torch.testing.assert_close(frozen(x), reference, rtol=1e-5, atol=1e-5)
    thawed = convert_model(copy.deepcopy(model), "mabn", unfreeze=True)
    assert all(p.requires_grad for m in thawed.modules() if isinstance(m, MABN2d) for p in m.parameters())
    partly = torchvision.models.resnet18(weights=None)
    partly.layer1.requires_grad_(False)
    partly = convert_model(partly, "bn")
    assert not partly.layer1[0].bn1.weight.requires_grad and partly.layer2[0].bn1.weight.requires_grad


def test_centered_convs_keep_weights_and_change_the_function_as_documented():
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    convs = {path: m.weight.clone() for path, m in model.named_modules() if type(m) is nn.Conv2d}
    converted = convert_model(model, "mabn")
    for path, weight in convs.items():
        conv = converted.get_submodule(path)
        if weight[0].numel() == 1:
            assert type(conv) is nn.Conv2d  # centering one weight per channel would zero it
            continue
        assert isinstance(conv, CenConv2d)
        torch.testing.assert_close(conv.weight, weight)
        centered = conv.effective_weight()
        torch.testing.assert_close(centered.mean(dim=(1, 2, 3)), torch.zeros(len(weight)), atol=1e-6, rtol=0)


def test_gn_conversion_warns_that_running_statistics_are_lost():
    with pytest.warns(UserWarning, match="gn has no running statistics"):
        converted = convert_model(torchvision.models.resnet18(weights=None), "gn")
    assert count(converted, NORMS["gn"]) == 20


@pytest.mark.parametrize("norm", ["bn", "mabn", "gn", "in"])
def test_a_bn_that_tracked_no_running_statistics_warns_that_the_eval_function_changed(norm):
    """torch's BatchNorm2d(track_running_stats=False) normalizes each eval batch by its own statistics; a converted
    layer with running statistics starts them at 0 and 1 (it was converted without a word), one without has none."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False)).eval()
    x = torch.randn(4, 3, 8, 8)
    before = model(x)
    message = "gamma and beta only" if norm in ("gn", "in") else "had track_running_stats=False"
    with pytest.warns(UserWarning, match=message):
        convert_model(model, norm, centered_conv=False)
    assert not torch.allclose(model(x), before, atol=1e-3)  # the change the warning speaks of


def test_errors_name_the_value_and_what_is_valid():
    model = torchvision.models.resnet18(weights=None)
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'; valid: .*mabn"):
        convert_model(model, "batchnorm")
    with pytest.raises(ValueError, match="norm_batch=0 is not valid"):
        convert_model(model, "mabn", norm_batch=0)
    with pytest.raises(ValueError, match="norm 'gn' has no normalization batch"):
        convert_model(model, "gn", norm_batch=2)
    with pytest.raises(ValueError, match="Linear has no BatchNorm2d"):
        convert_model(nn.Linear(3, 3), "mabn")
    with pytest.raises(ValueError, match="MABN2d 'bn1': .*window=0"):
        convert_model(model, "mabn", window=0)
    converted = convert_model(model, "mabn", norm_batch=3).train()
    with pytest.raises(ValueError, match="MABN2d 'bn1': norm_batch=3 does not divide the batch of 4"):
        converted(torch.randn(4, 3, 32, 32))


def test_mabn_detector_at_a_real_batch_of_2_learns_and_resumes_bitwise():
    """A converted Faster R-CNN trained with 2 images per step: MABN's group is the whole batch of 2, so its
    moving averages run over iterations (window 4, from step 6; r from step 11)."""
    from mabn.detection import small_fasterrcnn, synthetic_boxes

    def build():
        torch.manual_seed(0)
        return convert_model(small_fasterrcnn(), "mabn", window=4, warmup=6, renorm_start=10).train()

    pool = synthetic_boxes(8, generator=torch.Generator().manual_seed(0))
    batches = [(pool[0][i:i + 2], pool[1][i:i + 2]) for i in range(0, 8, 2)]

    def step(model, opt, k):
        images, targets = batches[k % len(batches)]
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = [step(model, opt, k) for k in range(24)]  # six passes over the 4 batches
    assert all(map(torch.isfinite, torch.tensor(losses)))
    # The last two passes against the first, per pass: one pass's loss swings by a factor of 2 between
    # steps, and a 4-step comparison failed at 2 threads (different rounding, one spike at step 15).
    # Measured over 5 init seeds at 1 and 2 threads: 0.58-0.82 of the first pass.
    assert sum(losses[-8:]) / 2 < 0.9 * sum(losses[:4]), losses
    mabn = [m for m in model.modules() if isinstance(m, MABN2d)]
    assert mabn and all(int(m.num_batches_tracked) == 24 for m in mabn)

    saved = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()), "rng": torch.get_rng_state()}
    straight = [step(model, opt, k) for k in range(24, 27)]
    resumed = build()
    resumed.load_state_dict(saved["model"])
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.01, momentum=0.9)
    opt2.load_state_dict(saved["opt"])
    torch.set_rng_state(saved["rng"])  # the RPN and ROI samplers draw from it
    assert [step(resumed, opt2, k) for k in range(24, 27)] == straight
