"""scripts/fake_imagenet.py: an ImageNet-layout tree of links that every loader reads as real JPEGs."""
import subprocess
import sys

from PIL import Image
from torchvision.datasets import ImageFolder

from .conftest import ROOT, run_script_here


def _fake(*args):
    return subprocess.run([sys.executable, "scripts/fake_imagenet.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_the_tree_has_imagenets_layout_and_its_links_read_as_the_pools_images(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    for k, color in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (20 + k, 16), color).save(pool / f"{k}.JPEG")
    out = _fake("--dst", tmp_path / "fi", "--pool", pool, "--classes", 2, "--train-per-class", 4, "--val-per-class", 1)
    assert out.returncode == 0, out.stderr
    assert "wrote 10 links to 3 pool images" in out.stdout
    train, val = ImageFolder(tmp_path / "fi" / "train"), ImageFolder(tmp_path / "fi" / "val")
    assert train.classes == val.classes == ["n90000000", "n90000001"] and (len(train), len(val)) == (8, 2)
    assert [train[i][0].size[0] for i in range(4)] == [20, 21, 22, 20]  # the pool's images in turn
    assert (tmp_path / "fi" / "train" / "n90000000" / "n90000000_00000.JPEG").is_symlink()


def test_a_dst_that_is_not_a_new_folder_is_one_error_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x\n")
    for dst in (afile, afile / "below", tmp_path / "full"):  # the first two were NotADirectoryError's traceback
        out = run_script_here("fake_imagenet", "--dst", dst, "--classes", 1, "--train-per-class", 1, "--val-per-class", 1)
        assert out.returncode == 2 and out.stderr.startswith(f"error: --dst='{dst}'") and out.stderr.count("\n") == 1
    assert afile.read_text() == "not a folder\n" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "full"]
