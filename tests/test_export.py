"""A trained run exported as a torchvision ResNet (our norms, or folded) and loaded back for detection."""
import subprocess
import sys

import pytest
import torch
import torchvision
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

from mabn.models import ExportError, export_backbone, load_backbone
from mabn.models.trained import checkpoint_of, load_trained
from mabn.norms import CenConv2d, MABN2d

from .conftest import ROOT, finished_run, run_script_here


def _export(run_dir, out, *flags):
    return subprocess.run([sys.executable, "scripts/export_backbone.py", str(run_dir), "--out", str(out), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_exported_backbone_is_the_trained_network_in_torchvision_and_feeds_an_fpn(mabn_run, tmp_path):
    done = _export(mabn_run, tmp_path / "backbone.pt")
    assert done.returncode == 0, done.stderr
    backbone = load_backbone(tmp_path / "backbone.pt").eval()
    assert type(backbone) is torchvision.models.ResNet
    assert isinstance(backbone.layer1[0].bn1, MABN2d) and isinstance(backbone.conv1, CenConv2d)
    assert backbone.layer1[0].bn1.layer_name == "layer1.0.bn1"
    ours = load_trained(checkpoint_of(mabn_run)).net
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ours(x)
        torch.testing.assert_close(backbone(x), expected, rtol=0, atol=0)

    export_backbone(mabn_run, tmp_path / "deploy.pt", fold=True)  # the script's --fold, in process
    folded = load_backbone(tmp_path / "deploy.pt").eval()
    assert not any(isinstance(m, MABN2d) for m in folded.modules()) and folded.conv1.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

    fpn = _resnet_fpn_extractor(load_backbone(tmp_path / "backbone.pt"), trainable_layers=5)
    features = fpn(torch.randn(4, 3, 64, 64))  # train mode: one normalization group of 4, as trained
    assert set(features) == {"0", "1", "2", "3", "pool"} and all(torch.isfinite(f).all() for f in features.values())


def _export_refused(run_dir, out, *flags):
    """`_export` where the script refuses before any work, in this process."""
    return run_script_here("export_backbone", run_dir, "--out", out, *flags)


def test_export_errors_are_one_line(mabn_run, tmp_path):
    done = _export_refused(tmp_path, tmp_path / "x.pt")
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "has no checkpoints" in done.stderr
    assert not (tmp_path / "x.pt").exists()
    done = _export_refused(mabn_run, tmp_path)
    assert done.returncode == 2 and done.stderr == f"error: --out {tmp_path} is a directory; valid: a file path such " \
        f"as {tmp_path / 'backbone.pt'}\n"
    best = mabn_run / "checkpoints" / "best.pt"
    before = sorted((p.name, p.stat().st_ino) for p in best.parent.iterdir())
    for out in (best, best.parent / "backbone.pt"):  # would replace the checkpoint it reads, or sit among them
        done = _export_refused(mabn_run, out)
        assert done.returncode == 2 and "is in the run's checkpoints folder" in done.stderr, done.stderr
        assert sorted((p.name, p.stat().st_ino) for p in best.parent.iterdir()) == before
    (tmp_path / "junk.pt").write_bytes(b"not a file")
    with pytest.raises(ExportError, match="cannot be loaded"):
        load_backbone(tmp_path / "junk.pt")


def test_a_gn_run_exports_with_its_norms_and_refuses_to_fold(tiny_shapes, tmp_path):
    run_dir = finished_run(tiny_shapes, tmp_path / "out", "model=resnet18", "model.width=64", "norm=gn",
                           "data.crop_size=32", "data.val_resize=36", "train.max_batches_per_epoch=1")
    done = _export(run_dir, tmp_path / "deploy.pt", "--fold")  # was a state_dict traceback
    assert done.returncode == 2 and "norm gn has no per-channel affine form at inference" in done.stderr, done.stderr
    assert "export without --fold" in done.stderr and not (tmp_path / "deploy.pt").exists()
    assert _export(run_dir, tmp_path / "backbone.pt").returncode == 0
    backbone, x = load_backbone(tmp_path / "backbone.pt").eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), load_trained(checkpoint_of(run_dir)).net(x), rtol=0, atol=0)


@pytest.mark.slow
def test_narrow_models_have_no_torchvision_layout(tiny_shapes, tmp_path):
    run_dir = finished_run(tiny_shapes, tmp_path / "out", "train.max_batches_per_epoch=2")  # model.width=8
    done = _export(run_dir, tmp_path / "x.pt")
    assert done.returncode == 2 and "no torchvision counterpart" in done.stderr and "width=8" in done.stderr
