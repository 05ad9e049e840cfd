"""Evaluating a trained checkpoint (scripts/evaluate.py): the run's own score, the folded network beside it,
other folders mapped by class name, other resolutions, and bad input in one line."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mabn.data import DatasetError
from mabn.data.transforms import Augmentation, torchvision_transform
from mabn.evaluation import EvalSettings, evaluate_checkpoint, newest_run
from mabn.models.trained import RunError, checkpoint_of, load_trained

from .conftest import ROOT, run_script_here

QUIET = dict(workers=0, progress=False, device="cpu")


def _evaluate(*args):
    return subprocess.run([sys.executable, "scripts/evaluate.py", *map(str, args), "--no-progress", "--workers", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_run_scores_as_its_own_evaluation_did_and_its_folded_network_predicts_the_same(mabn_run, tmp_path):
    done = _evaluate(mabn_run, "--fold", "--out", tmp_path / "eval.json")
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "eval.json").read_text())
    last = [r for r in map(json.loads, (mabn_run / "metrics.jsonl").read_text().splitlines()) if "epoch" in r][-1]
    assert record["images"] == last["val_images"] == 30
    assert record["trained"]["top1_err"] == pytest.approx(last["val_top1_err"], abs=1e-9)
    assert record["trained"]["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    assert record["folded_norms"] == 20  # every MABN layer of the ResNet-18 follows a conv
    assert record["predictions_agree"] == 100.0 and record["max_abs_logit_diff"] < 1e-4
    assert record["folded"]["top1_err"] == record["trained"]["top1_err"]
    assert record["source"] and record["checkpoint"].endswith("best.pt") and record["crop_size"] == 32
    assert record["trained_by"] == [last["source"]]
    assert "folded: 20 norms merged" in done.stdout and f"wrote {tmp_path / 'eval.json'}" in done.stdout


def _subset(tiny_shapes, tmp_path, classes, rename=None):
    """A val folder holding only `classes` (symlinked images), optionally under other folder names."""
    for name in classes:
        (tmp_path / "val" / (rename or {}).get(name, name)).symlink_to(tiny_shapes / "val" / name)
    return tmp_path


def test_a_folder_with_some_of_the_classes_is_scored_against_the_runs_labels(mabn_run, tiny_shapes, tmp_path):
    trained = load_trained(checkpoint_of(mabn_run))
    picked = trained.classes[7:9]  # labels 7 and 8 in the run, 0 and 1 in the folder
    (tmp_path / "val").mkdir()
    root = _subset(tiny_shapes, tmp_path, picked)
    record = evaluate_checkpoint(mabn_run, EvalSettings(root=str(root), **QUIET))

    transform = torchvision_transform(Augmentation.from_config(trained.config.data), train=False)
    images, labels = [], []
    for label, name in enumerate(trained.classes):
        if name in picked:
            for path in sorted((tiny_shapes / "val" / name).iterdir()):
                images.append(transform(Image.open(path).convert("RGB")))
                labels.append(label)
    with torch.no_grad():
        logits = trained.net(torch.stack(images))
    expected = F.cross_entropy(logits, torch.tensor(labels)).item()
    by_folder_index = F.cross_entropy(logits, torch.tensor(labels) - 7).item()
    assert abs(expected - by_folder_index) > 1e-3  # the check below can tell the two labellings apart
    assert record["images"] == len(labels) == 6 and record["classes"] == 2
    assert record["trained"]["loss"] == pytest.approx(expected, rel=1e-5)

    # ImageNet-A/-R's protocol: the prediction is made among the folder's classes only.
    only = evaluate_checkpoint(mabn_run, EvalSettings(root=str(root), folder_classes_only=True, **QUIET))
    among_two = logits[:, 7:9]
    assert only["trained"]["loss"] == pytest.approx(F.cross_entropy(among_two, torch.tensor(labels) - 7).item(), rel=1e-5)
    wrong = (among_two.argmax(1) != torch.tensor(labels) - 7).double().mean().item()
    assert only["trained"]["top1_err"] == pytest.approx(100 * wrong) and only["folder_classes_only"]


def test_folders_named_otherwise_are_refused(mabn_run, tiny_shapes, tmp_path):
    trained = load_trained(checkpoint_of(mabn_run))
    (tmp_path / "val").mkdir()
    root = _subset(tiny_shapes, tmp_path, trained.classes[:2], rename={trained.classes[0]: "0"})
    with pytest.raises(DatasetError, match=r"1 class folders the run never trained on, e.g. \['0'\]; valid: folders "
                       "named as the run's classes"):
        evaluate_checkpoint(mabn_run, EvalSettings(root=str(root), **QUIET))


def test_a_folder_with_no_image_to_score_is_refused(mabn_run, tmp_path):
    # Both were reported as 100 % top-1 and top-5 error on 0 images.
    trained = load_trained(checkpoint_of(mabn_run))
    (tmp_path / "empty" / "val" / trained.classes[0]).mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"empty/val holds no images in its 1 class folders"):
        evaluate_checkpoint(mabn_run, EvalSettings(root=str(tmp_path / "empty"), **QUIET))
    (tmp_path / "junk" / "val" / trained.classes[0]).mkdir(parents=True)
    (tmp_path / "junk" / "val" / trained.classes[0] / "a.JPEG").write_bytes(b"not a JPEG")
    with pytest.raises(DatasetError, match="none of the 1 images could be read; nothing to score"):
        evaluate_checkpoint(mabn_run, EvalSettings(root=str(tmp_path / "junk"), **QUIET))


def test_another_crop_keeps_the_runs_resize_ratio_and_another_split_is_read(mabn_run):
    record = evaluate_checkpoint(mabn_run, EvalSettings(crop_size=48, split="train", **QUIET))
    assert (record["crop_size"], record["val_resize"]) == (48, 54)  # the run: 32 and 36
    assert record["images"] == 80 and record["data"].endswith("train")


def test_a_checkpoint_without_class_names_is_scored_when_the_count_matches(mabn_run, tmp_path):
    state = torch.load(checkpoint_of(mabn_run), weights_only=True)
    del state["classes"]
    torch.save(state, tmp_path / "old.pt")
    record = evaluate_checkpoint(tmp_path / "old.pt", EvalSettings(**QUIET))
    full = evaluate_checkpoint(mabn_run, EvalSettings(**QUIET))
    assert record["trained"] == full["trained"]


@pytest.mark.parametrize("settings, message", [
    (dict(val_resize=20), "--val-resize 20 is smaller than --crop-size 32"),
    (dict(crop_size=0), "--crop-size 0 is not valid; valid: a positive number of pixels"),
    (dict(val_resize=0), "--val-resize 0 is not valid; valid: a positive number of pixels"),
    (dict(batch=0), "--batch 0 is not valid"),
    (dict(split="test"), "test does not exist"),
    (dict(device="tpu"), "--device 'tpu' is not valid; valid: auto, cpu, cuda"),
    (dict(precise_images=8, precise_average="mean"), "--precise-average 'mean' is not valid; valid: auto, equal, ema"),
    (dict(precise_images=8, precise_epoch=-1), "--precise-epoch -1 is not valid; valid: an epoch number >= 0"),
    pytest.param(dict(device="cuda"), "torch sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
])
def test_bad_settings_name_the_value_and_what_is_valid(mabn_run, settings, message):
    with pytest.raises((RunError, DatasetError), match=message.replace("(", r"\(").replace("[", r"\[")):
        evaluate_checkpoint(mabn_run, EvalSettings(**{**QUIET, **settings}))


def _evaluate_refused(*args):
    """`_evaluate` where the script refuses before any work, in this process."""
    return run_script_here("evaluate", *args, "--no-progress", "--workers", "0")


def test_a_missing_run_or_a_directory_as_out_is_one_error_line_and_writes_nothing(mabn_run, tmp_path):
    done = _evaluate_refused(tmp_path / "nope")
    assert done.returncode == 2 and done.stderr == f"error: {tmp_path / 'nope'} does not exist; pass a run dir of " \
        "`python -m mabn.train` or one of its checkpoints/*.pt\n"
    done = _evaluate_refused(mabn_run, "--out", tmp_path)
    assert done.returncode == 2 and "is a directory" in done.stderr and os.listdir(tmp_path) == []
    step = sorted((mabn_run / "checkpoints").glob("step-*.pt"))[-1]
    size = step.stat().st_size
    done = _evaluate_refused(mabn_run, "--out", step)  # the JSON would replace a checkpoint of the run
    assert done.returncode == 2 and done.stderr.startswith(f"error: --out {step} is in the run's checkpoints folder")
    assert step.stat().st_size == size


def test_a_run_without_best_pt_is_read_at_its_newest_step_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for step in (90, 100, 110):  # named as CheckpointDir keeps them; 100 < 110 as numbers, not only as text
        (tmp_path / "checkpoints" / f"step-{step:08d}.pt").touch()
    assert checkpoint_of(tmp_path) == tmp_path / "checkpoints" / "step-00000110.pt"


def test_make_eval_without_a_run_scores_the_newest(mabn_run, tmp_path):
    assert newest_run(mabn_run.parent.parent) == mabn_run
    with pytest.raises(RunError, match="no run with checkpoints under"):
        newest_run(tmp_path)
