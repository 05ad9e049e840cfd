"""Both loaders on generated trees: same labels, batches, shards and augmentation; preparation scripts."""
import collections
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from mabn.data import build_loaders
from mabn.data.folder import SeededImageFolder, class_names, collate_skipping_unreadable
from mabn.data.index import FileIndex, load_index
from mabn.data.transforms import Augmentation, torchvision_transform

from .conftest import ROOT, run_script_here

LOADERS = ["torchvision", "dali"]


def data_cfg(root, **overrides):
    cfg = OmegaConf.load(ROOT / "configs" / "data" / "shapes.yaml")
    cfg.merge_with(dict(root=str(root), generate=None, workers=0, batch_per_gpu=8, crop_size=24, val_resize=28))
    cfg.merge_with(overrides)
    return cfg


def epoch_labels(loaders, epoch):
    loaders.set_epoch(epoch)
    return [y.tolist() for _, y, _ in loaders.train]


def test_both_loaders_agree_on_classes_batches_and_order(tiny_shapes):
    built = {name: build_loaders(data_cfg(tiny_shapes, loader=name), 0, 1, seed=3) for name in LOADERS}
    tv, dali = built["torchvision"], built["dali"]
    assert tv.classes == dali.classes == sorted(p.name for p in (tiny_shapes / "train").iterdir())
    assert tv.train_batches == dali.train_batches == 80 // 8
    for epoch in (0, 1):  # same shuffled order each epoch, and a new one per epoch
        assert epoch_labels(tv, epoch) == epoch_labels(dali, epoch)
    assert epoch_labels(tv, 0) != epoch_labels(tv, 1)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_resumed_epoch_continues_the_same_order(tiny_shapes, loader):
    loaders = build_loaders(data_cfg(tiny_shapes, loader=loader), 0, 1, seed=3)
    whole = epoch_labels(loaders, 1)
    loaders.set_epoch(1, start_batch=3)
    assert [y.tolist() for _, y, _ in loaders.train] == whole[3:]
    assert epoch_labels(loaders, 2) != whole  # and the next epoch starts from its first batch, reshuffled
    assert len(epoch_labels(loaders, 2)) == loaders.train_batches


def test_worker_processes_give_the_batches_of_the_main_process_bitwise(tiny_shapes):
    """Workers reseed their own generator per sample; the main process (workers=0) restores the training's."""
    batches = {}
    for workers in (0, 2):
        loaders = build_loaders(data_cfg(tiny_shapes, workers=workers, lighting_std=0.1), 0, 1, seed=3)
        loaders.set_epoch(1)
        torch.manual_seed(0)
        batches[workers] = [x for x, _, _ in loaders.train][:3]
        if workers == 0:  # the training's random stream is where it was
            drawn = torch.rand(4)
            torch.manual_seed(0)
            assert torch.equal(drawn, torch.rand(4))
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))


@pytest.mark.parametrize("loader", LOADERS)
def test_val_shards_over_two_ranks_cover_each_image_once(tiny_shapes, loader):
    # An odd val batch and 30 images: shards of 15, the last batch of each partial.
    shards = [build_loaders(data_cfg(tiny_shapes, loader=loader, val_batch_per_gpu=4), rank, 2) for rank in (0, 1)]
    counts = collections.Counter()
    for shard in shards:
        for _, labels, _ in shard.val:
            counts.update(labels.tolist())
    assert sum(counts.values()) == shards[0].val_size == 30
    assert counts == collections.Counter({k: 3 for k in range(10)})


@pytest.mark.parametrize("input_format", ["torchvision", "bgr255"])
def test_augmentation_outputs_match_between_loaders(tmp_path, input_format):
    # Solid red images: the channel order and value range of each input convention are unambiguous.
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for k in range(8):
                Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / split / name / f"{k}.JPEG", quality=100)
    outs = {}
    for loader in LOADERS:
        loaders = build_loaders(data_cfg(tmp_path, loader=loader, input_format=input_format, lighting_std=0.0), 0, 1)
        loaders.set_epoch(0)
        train_x = next(iter(loaders.train))[0]
        val_x = next(iter(loaders.val))[0]
        outs[loader] = (train_x, val_x)
        for x in (train_x, val_x):
            assert x.shape == (8, 3, 24, 24) and x.dtype == torch.float32
    red = {"torchvision": ((1 - 0.485) / 0.229, 0, (0 - 0.406) / 0.225), "bgr255": (0.0, 0, 255.0)}[input_format]
    channel_of_red = 0 if input_format == "torchvision" else 2
    for loader, (train_x, val_x) in outs.items():
        for x in (train_x, val_x):
            means = x.mean(dim=(0, 2, 3))
            tol = 3.0 if input_format == "bgr255" else 0.05
            assert abs(means[channel_of_red] - (red[0] if input_format == "torchvision" else red[2])) < tol, (loader, means)


def test_lighting_noise_changes_colours_but_not_shapes(tiny_shapes):
    for loader in LOADERS:
        loaders = build_loaders(data_cfg(tiny_shapes, loader=loader, lighting_std=0.1), 0, 1)
        loaders.set_epoch(0)
        x = next(iter(loaders.train))[0]
        assert x.shape == (8, 3, 24, 24) and torch.isfinite(x).all()


def _index(split_dir):
    return FileIndex.scan(split_dir, class_names(split_dir))


def test_file_index_lists_what_imagefolder_lists_in_arrays_and_is_cached_until_the_folder_changes(tiny_shapes, tmp_path,
                                                                                                  monkeypatch):
    import shutil

    import numpy as np
    from torchvision.datasets import ImageFolder

    shutil.copytree(tiny_shapes / "train", tmp_path / "train")
    split = tmp_path / "train"
    classes = class_names(split)
    index = load_index(split, classes, cache_dir=tmp_path / "cache")
    assert [index[i] for i in range(len(index))] == [(p, label) for p, label in ImageFolder(split).samples]
    assert isinstance(index.blob, np.ndarray) and isinstance(index.labels, np.ndarray)  # no per-file Python objects
    # DALI's reader gets the sampler's order as `<relative path> <label>` lines
    assert index.file_list([5, 0]).decode().splitlines() == [
        f"{pathlib.Path(index.path(i)).relative_to(split)} {index.labels[i]}" for i in (5, 0)]
    assert not index.has_whitespace_in_paths()
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    def no_walk(*args, **kwargs):
        raise AssertionError("the cached index was not used")

    monkeypatch.setattr("mabn.data.index.os.walk", no_walk)
    again = load_index(split, classes, cache_dir=tmp_path / "cache")  # another rank, a later run
    assert len(again) == len(index) and again[3] == index[3]
    monkeypatch.undo()
    shutil.copy(split / classes[0] / sorted(p.name for p in (split / classes[0]).iterdir())[0], split / classes[0] / "zz_new.JPEG")
    grown = load_index(split, classes, cache_dir=tmp_path / "cache")
    assert len(grown) == len(index) + 1 and any(grown.path(i).endswith("zz_new.JPEG") for i in range(len(grown)))
    assert [grown[i] for i in range(len(grown))] == [(p, label) for p, label in ImageFolder(split).samples]


def test_file_index_walks_nested_and_linked_folders_as_imagefolder_does(tiny_shapes, tmp_path):
    import shutil

    from torchvision.datasets import ImageFolder

    split = tmp_path / "train"
    shutil.copytree(tiny_shapes / "train", split)
    classes = class_names(split)
    first = sorted((split / classes[0]).iterdir())
    (split / classes[0] / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(first[0], split / classes[0] / "nested" / "deeper" / "a.jpeg")
    shutil.copy(first[1], split / classes[0] / "nested" / "B.PNG.notes")  # not an image: left out
    (split / classes[1] / "linked").symlink_to(split / classes[0] / "nested")  # a linked folder is followed
    (split / classes[2] / "link.JPEG").symlink_to(first[2])  # a linked image is an image
    index = FileIndex.scan(split, classes)
    assert [index[i] for i in range(len(index))] == [(p, label) for p, label in ImageFolder(split).samples]
    assert any("linked/deeper/a.jpeg" in index.path(i) for i in range(len(index)))


def test_unreadable_train_image_is_replaced_and_counted(tiny_shapes, tmp_path):
    import shutil

    shutil.copytree(tiny_shapes / "train", tmp_path / "train")
    victim = sorted((tmp_path / "train").rglob("*.JPEG"))[0]
    victim.write_bytes(b"\xff\xd8 truncated")
    aug = Augmentation(crop_size=16, val_resize=16)
    index = _index(tmp_path / "train")
    train = SeededImageFolder(index, torchvision_transform(aug, True), substitute_unreadable=True)
    val = SeededImageFolder(index, torchvision_transform(aug, False), substitute_unreadable=False)
    images, labels, skipped = collate_skipping_unreadable([train[(0, 1)], train[(1, 2)]])
    assert images.shape[0] == 2 and skipped == 1
    images, labels, skipped = collate_skipping_unreadable([val[(0, 0)], val[(1, 0)]])
    assert images.shape[0] == 1 and skipped == 1


def test_same_seed_same_augmentation_whatever_the_worker(tiny_shapes):
    aug = Augmentation(crop_size=16, val_resize=16)
    ds = SeededImageFolder(_index(tiny_shapes / "train"), torchvision_transform(aug, True), substitute_unreadable=True)
    torch.manual_seed(123)
    a = ds[(5, 777)][0]
    torch.rand(10)  # global RNG state must not matter
    b = ds[(5, 777)][0]
    assert torch.equal(a, b) and not torch.equal(a, ds[(5, 778)][0])


def test_dali_refuses_file_names_its_file_list_cannot_hold(tiny_shapes, tmp_path, monkeypatch):
    import shutil

    import mabn.data.dali as dali
    from mabn.data import DatasetError

    # The check comes before DALI is imported: it holds where DALI is missing (the GPU machines), which
    # would otherwise fall back to torchvision first.
    monkeypatch.setattr(dali, "dali_unavailable_reason", lambda: None)
    shutil.copytree(tiny_shapes, tmp_path / "data")
    victim = sorted((tmp_path / "data" / "val").rglob("*.JPEG"))[0]
    victim.rename(victim.with_name("a copy.JPEG"))
    with pytest.raises(DatasetError, match="whitespace.*data.loader=torchvision"):
        build_loaders(data_cfg(tmp_path / "data", loader="dali"), 0, 1)


def test_dali_unavailable_falls_back_with_a_warning(tiny_shapes, monkeypatch, caplog):
    import mabn.data.dali as dali

    monkeypatch.setattr(dali, "dali_unavailable_reason", lambda: "nvidia-dali cannot be imported: test")
    with caplog.at_level(logging.WARNING):
        loaders = build_loaders(data_cfg(tiny_shapes, loader="dali"), 0, 1)
    assert "falling back to torchvision" in caplog.text
    assert isinstance(loaders.train, torch.utils.data.DataLoader)


def _flat_val(tmp_path, n=6):
    flat = tmp_path / "val"
    flat.mkdir()
    wnids = {}
    for k in range(1, n + 1):
        image_id = f"ILSVRC2012_val_{k:08d}"
        Image.new("RGB", (8, 8), (k * 20, 0, 0)).save(flat / f"{image_id}.JPEG")
        wnids[image_id] = ["n01440764", "n01443537", "n01484850"][k % 3]
    return flat, wnids


def _run_script(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_prepare_imagenet_from_loc_csv(tmp_path):
    flat, wnids = _flat_val(tmp_path)
    csv_path = tmp_path / "LOC_val_solution.csv"
    csv_path.write_text("ImageId,PredictionString\n" + "".join(f"{i},{w} 1 2 3 4 {w} 5 6 7 8\n" for i, w in wnids.items()))
    out = _run_script(ROOT / "scripts" / "prepare_imagenet.py", "--val-dir", flat, "--loc-csv", csv_path)
    assert out.returncode == 0, out.stderr
    placed = {p.stem: p.parent.name for p in flat.rglob("*.JPEG")}
    assert placed == wnids and not list(flat.glob("*.JPEG"))


def test_prepare_imagenet_from_devkit_files(tmp_path):
    from scipy.io import savemat

    flat, wnids = _flat_val(tmp_path)
    ids = {"n01440764": 449, "n01443537": 1, "n01484850": 2}  # ILSVRC2012_IDs need not follow wnid order
    synsets = np.zeros((3,), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    for row, (wnid, ilsvrc_id) in enumerate(ids.items()):
        synsets[row] = (ilsvrc_id, wnid)
    savemat(tmp_path / "meta.mat", {"synsets": synsets})
    (tmp_path / "gt.txt").write_text("".join(f"{ids[w]}\n" for w in wnids.values()))
    out = _run_script(ROOT / "scripts" / "prepare_imagenet.py", "--val-dir", flat, "--ground-truth", tmp_path / "gt.txt",
                      "--meta", tmp_path / "meta.mat", "--out", tmp_path / "sorted", "--link")
    assert out.returncode == 0, out.stderr
    placed = {p.stem: p.parent.name for p in (tmp_path / "sorted").rglob("*.JPEG")}
    assert placed == wnids
    (tmp_path / "sorted" / "n01440764" / "ILSVRC2012_val_00000003.JPEG").unlink()  # as if interrupted: run it again
    again = _run_script(*out.args[1:])
    assert again.returncode == 0, again.stderr  # was FileExistsError on the first link already there
    assert {p.stem: p.parent.name for p in (tmp_path / "sorted").rglob("*.JPEG")} == wnids


def test_prepare_imagenet_names_a_labels_file_it_cannot_read(tmp_path):
    from scipy.io import savemat

    from mabn.data import DatasetError
    from mabn.data.prepare import val_labels_from_devkit, val_labels_from_loc_csv

    (tmp_path / "wrong.csv").write_text("id,label\nILSVRC2012_val_00000001,n01440764\n")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xd8\xff\xe0 a JPEG")
    (tmp_path / "gt.txt").write_text("1\n7\n")
    synsets = np.zeros((1,), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    synsets[0] = (1, "n01440764")
    savemat(tmp_path / "meta.mat", {"synsets": synsets})
    savemat(tmp_path / "other.mat", {"x": 1})
    cases = ((val_labels_from_loc_csv, ("wrong.csv",), r"has columns \['id', 'label'\], not ImageId,PredictionString"),
             (val_labels_from_loc_csv, ("binary.csv",), "is not a CSV file"),  # these three were tracebacks
             (val_labels_from_devkit, ("gt.txt", "other.mat"), "other.mat is not the devkit's meta.mat"),
             (val_labels_from_devkit, ("wrong.csv", "meta.mat"), "wrong.csv is not the devkit's validation ground truth"),
             (val_labels_from_devkit, ("gt.txt", "meta.mat"), r"gt.txt names class IDs \[7\] that .*meta.mat does not have"))
    for reader, files, message in cases:
        with pytest.raises(DatasetError, match=message):
            reader(*(tmp_path / f for f in files))
    flat, _ = _flat_val(tmp_path)
    for flags in (("--loc-csv", "wrong.csv", "--link"), ("--loc-csv", "wrong.csv", "--ground-truth", "gt.txt")):
        done = run_script_here("prepare_imagenet", "--val-dir", flat, *flags)
        assert done.returncode == 2 and ("--link needs --out" in done.stderr or "not both" in done.stderr), done.stderr
    # --val-dir not a folder, --out below a file: OSError's bare text, --out's after the progress bar had started
    (tmp_path / "good.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"{p.stem},n01440764 1 2 3 4\n" for p in flat.glob("*.JPEG")))
    for flags, message in ((("--val-dir", tmp_path / "good.csv"), "error: --val-dir=.* is not a folder; valid: "),
                           (("--val-dir", flat, "--out", tmp_path / "good.csv" / "sorted"),
                            r"error: --out=.* is not valid: .*good.csv is not a directory; give a folder")):
        done = run_script_here("prepare_imagenet", "--loc-csv", tmp_path / "good.csv", *flags)
        assert done.returncode == 2 and re.fullmatch(message + ".*\n", done.stderr), done.stderr
    assert len(list(flat.glob("*.JPEG"))) == 6


def test_prepare_imagenet_refuses_unlabelled_images(tmp_path):
    flat, wnids = _flat_val(tmp_path)
    csv_path = tmp_path / "labels.csv"
    first = next(iter(wnids))
    csv_path.write_text(f"ImageId,PredictionString\n{first},{wnids[first]} 1 2 3 4\n")
    out = _run_script(ROOT / "scripts" / "prepare_imagenet.py", "--val-dir", flat, "--loc-csv", csv_path)
    assert out.returncode == 2 and "5 images" in out.stderr and "have no label" in out.stderr
    assert len(list(flat.glob("*.JPEG"))) == 6  # nothing moved


def test_make_subset_and_verify_dataset(tiny_shapes, tmp_path):
    from mabn.data import DatasetError
    from mabn.data.prepare import make_subset

    out = _run_script(ROOT / "scripts" / "make_subset.py", "--src", tiny_shapes, "--dst", tmp_path / "sub", "--classes", 3,
                      "--train-per-class", 2)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "sub" / "train").iterdir()) == ["n90000001", "n90000002", "n90000003"]
    assert all(len(list(d.iterdir())) == 2 for d in (tmp_path / "sub" / "train").iterdir())
    assert all(len(list(d.iterdir())) == 3 for d in (tmp_path / "sub" / "val").iterdir())
    # -1 took every image but the last, 0 none (empty class folders), -1 with a seed was a traceback
    for bad, seed in ((dict(train_per_class=0), None), (dict(val_per_class=-1), None), (dict(val_per_class=-1), 1)):
        with pytest.raises(DatasetError, match=f"^{next(iter(bad))}=.* is not valid; valid: an integer >= 1, or none given"):
            make_subset(tiny_shapes, tmp_path / "bad", 3, seed=seed, **bad)
    assert not (tmp_path / "bad").exists()
    assert make_subset(tiny_shapes, tmp_path / "sub", 4) == ["n90000001", "n90000002", "n90000003", "n90000004"]  # grown
    (tmp_path / "mine" / "train").mkdir(parents=True)
    (tmp_path / "empty.txt").write_text("\n")
    full_jpeg = next((tiny_shapes / "train" / "n90000001").iterdir())
    # train/ without val/, or a class missing from val/: train/'s links were written, then an OSError
    shutil.copytree(tiny_shapes / "train", tmp_path / "half" / "train")
    for message in ("has no val/ folder; valid: an ImageNet-layout tree", r"are in .*train but not in .*val"):
        with pytest.raises(DatasetError, match=message):
            make_subset(tmp_path / "half", tmp_path / "bad", 2)
        assert not (tmp_path / "bad").exists()
        shutil.copytree(tiny_shapes / "val" / "n90000002", tmp_path / "half" / "val" / "n90000002", dirs_exist_ok=True)
    # into the source itself (it said it made the subset), into another folder (links mixed into it), from another src
    for dst, src, message in ((tiny_shapes, tiny_shapes, "is no subset made by make_subset"),
                              (tmp_path / "mine", tiny_shapes, "is no subset made by make_subset"),
                              (tmp_path / "sub", tmp_path / "mine", f"holds a subset of {tiny_shapes.resolve()}, not of")):
        with pytest.raises(DatasetError, match=message):
            make_subset(src, dst, 1)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["train"]
    for flags, message in ((["--class-list", tmp_path / "empty.txt"], "the class list names no classes"),
                           (["--class-list", tmp_path / "none.txt"], "No such file or directory"),
                           (["--class-list", full_jpeg], "cannot be read (UnicodeDecodeError")):  # a traceback
        done = run_script_here("make_subset", "--src", tiny_shapes, "--dst", tmp_path / "new", *flags)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and message in done.stderr, done.stderr
    assert not (tmp_path / "new").exists()

    good = _run_script(ROOT / "scripts" / "verify_dataset.py", tmp_path / "sub", "--workers", 1)
    assert good.returncode == 0 and "0 unreadable" in good.stderr
    bad_file = tmp_path / "sub" / "val" / "n90000002" / "broken.JPEG"
    full = (tiny_shapes / "train" / "n90000001").iterdir().__next__().read_bytes()
    bad_file.write_bytes(full[: len(full) // 2])  # a truncated JPEG: opens, fails to decode
    bad = _run_script(ROOT / "scripts" / "verify_dataset.py", tmp_path / "sub", "--workers", 1)
    assert bad.returncode == 1 and str(bad_file) in bad.stdout and "1 unreadable" in bad.stderr
    listed = tmp_path / "lists" / "bad.txt"  # its folder is made
    assert _run_script(ROOT / "scripts" / "verify_dataset.py", tmp_path / "sub", "--workers", 1, "--out", listed).returncode == 1
    assert listed.read_text() == f"{bad_file}\n"
    (tmp_path / "empty").mkdir()
    for args, message in (((tmp_path / "sub", "--workers", 0), "--workers 0 is not valid; valid: a positive integer"),
                          ((tmp_path / "sub", "--out", tmp_path), f"--out {tmp_path} is a directory"),  # was a traceback
                          ((tmp_path / "empty",), f"{tmp_path / 'empty'} holds no image files"),  # was 0 unreadable
                          ((tmp_path / "sub", "--out", listed / "x"),  # mkdir's traceback, after the decoding
                           f"--out {listed / 'x'} cannot be written: {listed} is not a directory")):
        done = run_script_here("verify_dataset", *args)
        assert done.returncode == 2 and done.stderr.startswith(f"error: {message}"), done.stderr
    # resize_dataset's --dst at or below a file: OSError's bare text
    for dst in (listed, listed / "small"):
        done = run_script_here("resize_dataset", "--src", tmp_path / "sub", "--dst", dst,
                        "--short-side", 8, "--workers", 1)
        assert done.returncode == 2 and done.stderr == (f"error: --dst {dst} cannot be written: {listed} is not a "
                                                        "directory; valid: a new or empty folder\n"), done.stderr
    assert listed.read_text() == f"{bad_file}\n"


def test_resize_tree_makes_a_small_copy_once(tiny_shapes, tmp_path):
    from mabn.data import resolve_root

    cfg = data_cfg(tmp_path / "small", generate="resize",
                   generate_options={"source": str(tiny_shapes), "short_side": 16, "workers": 1})
    root = resolve_root(cfg)
    images = sorted(root.rglob("*.JPEG"))
    assert len(images) == 110 and all(min(Image.open(p).size) == 16 for p in images[:5])
    assert sorted(p.name for p in (root / "val").iterdir()) == sorted(p.name for p in (tiny_shapes / "val").iterdir())
    stamp = (root / "RESIZED").stat().st_mtime_ns
    assert resolve_root(cfg) == root and (root / "RESIZED").stat().st_mtime_ns == stamp  # reused, not redone


def test_a_resized_copy_serves_only_the_side_it_was_made_at(tiny_shapes, tmp_path):
    """A run asking for another side with the same data.root trained on the old copy without a word."""
    from mabn.data import DatasetError, check_root, resize_tree, resolve_root

    def cfg(side):
        return data_cfg(tmp_path / "small", generate="resize",
                        generate_options={"source": str(tiny_shapes), "short_side": side, "workers": 1})

    root = resolve_root(cfg(16))
    stamp = (root / "RESIZED").stat().st_mtime_ns
    for check in (check_root, resolve_root):
        with pytest.raises(DatasetError, match=r"small holds the 16 px copy of .*shapes, not the 20 px copy"):
            check(cfg(20))
    assert (root / "RESIZED").stat().st_mtime_ns == stamp and min(Image.open(next(root.rglob("*.JPEG"))).size) == 16
    with pytest.raises(DatasetError, match="short side 0 is not valid; valid: a positive integer"):
        resize_tree(tiny_shapes, tmp_path / "zero", 0, workers=1, progress=False)  # was a copy of 1 px images
    with pytest.raises(DatasetError, match="--workers 0 is not valid; valid: a positive integer"):
        resize_tree(tiny_shapes, tmp_path / "zero", 16, workers=0, progress=False)  # was one process without a word
    assert not (tmp_path / "zero").exists() and not (tmp_path / ".zero.lock").exists()


def test_the_shapes_serve_only_the_options_they_were_drawn_with(tmp_path):
    """A run asking for another size or count with the same data.root trained on the old tree without a word."""
    from mabn.data import DatasetError, check_root, resolve_root

    def cfg(size):
        return data_cfg(tmp_path / "shapes", generate="shapes",
                        generate_options={"train_per_class": 1, "val_per_class": 1, "size": size})

    root = resolve_root(cfg(16))
    stamp = (root / "VERSION").stat().st_mtime_ns
    for check in (check_root, resolve_root):
        with pytest.raises(DatasetError, match="shapes holds the shapes drawn with train_per_class=1 val_per_class=1 "
                                               "size=16 seed=0, not with .* size=24 seed=0 as asked"):
            check(cfg(24))
    assert (root / "VERSION").stat().st_mtime_ns == stamp and Image.open(next(root.rglob("*.JPEG"))).size == (16, 16)
    (root / "VERSION").write_text("shapes10-v1\n")  # the marker of trees drawn before it named the options: redrawn
    assert resolve_root(cfg(24)) == root and Image.open(next(root.rglob("*.JPEG"))).size == (24, 24)
    done = _run_script(ROOT / "scripts" / "make_shapes_dataset.py", "--root", tmp_path / "zero", "--size", 0)
    assert done.returncode == 2 and done.stderr == "error: size=0 is not valid; valid: an integer >= 1\n"  # traceback
    assert not (tmp_path / "zero").exists()


def test_a_generator_never_replaces_a_folder_it_did_not_write(tiny_shapes, tmp_path):
    """data.root set to a real dataset while data.generate is still on (the default data=shapes, or a resize)
    deleted that dataset and wrote the generated one in its place; so did a resize's --dst. Now: one error,
    the folder untouched; an empty folder is written into."""
    from mabn.data import DatasetError, check_root, resolve_root

    mine = tmp_path / "imagenet"
    shutil.copytree(tiny_shapes, mine)
    (mine / "VERSION").unlink()
    (mine / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(mine) for p in mine.rglob("*"))
    small = {"train_per_class": 2, "val_per_class": 1, "size": 16}
    resize = {"source": str(tiny_shapes), "short_side": 16, "workers": 1}
    for how, options, marker in (("shapes", small, "VERSION"), ("resize", resize, "RESIZED")):
        for check in (check_root, resolve_root):
            with pytest.raises(DatasetError, match=f"imagenet is not empty and was not written by .* no {marker} file"):
                check(data_cfg(mine, generate=how, generate_options=options))
    assert sorted(p.relative_to(mine) for p in mine.rglob("*")) == before and (mine / "notes.txt").read_text() == "mine"
    assert not (tmp_path / ".imagenet.lock").exists()  # refused before the lock file beside it is made
    (tmp_path / "empty").mkdir()
    assert resolve_root(data_cfg(tmp_path / "empty", generate="shapes", generate_options=small)) == tmp_path / "empty"
    assert len(list((tmp_path / "empty").rglob("*.JPEG"))) == 30


def test_a_second_process_waits_for_the_copy_being_written_and_reuses_it(tiny_shapes, tmp_path):
    """Two trainers started together (the repro lanes) once both wrote the same resized copy: one deleted the
    other's staging folder mid-write (FileNotFoundError). The second now waits on the lock and reuses the copy."""
    from mabn.data.lock import exclusive
    from mabn.data.prepare import _resize_tree

    dst = tmp_path / "small"
    code = ("from mabn.data.prepare import resize_tree; print('ready', flush=True); "
            f"resize_tree({str(tiny_shapes)!r}, {str(dst)!r}, 16, workers=1, progress=False); print('done')")
    with exclusive(dst):
        other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        assert other.stdout.readline().strip() == "ready"
        try:
            other.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        assert other.poll() is None and not dst.exists() and not dst.with_name(".small.partial").exists()
        _resize_tree(tiny_shapes, dst, 16, workers=1, progress=False)  # this process writes the copy
        stamp = (dst / "RESIZED").stat().st_mtime_ns
    out, _ = other.communicate(timeout=60)
    assert other.returncode == 0 and out.strip() == "done"
    assert (dst / "RESIZED").stat().st_mtime_ns == stamp and len(list(dst.rglob("*.JPEG"))) == 110
