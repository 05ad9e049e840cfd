import importlib.util
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette"



def load_script(name: str):
    """The module scripts/<name>.py, to test its functions (the scripts are run as files, not imported)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """A small generated dataset in the ImageNet layout (10 classes, 32 px)."""
    from mabn.data.shapes import generate

    return generate(tmp_path_factory.mktemp("data") / "shapes", train_per_class=8, val_per_class=3, size=32,
                    progress=False)


def train_command(root, out, *overrides):
    """`python -m mabn.train` on a tiny dataset, quick settings; extra overrides win."""
    import sys

    return [
        sys.executable, "-m", "mabn.train", f"data.root={root}", "data.generate=null", f"output_root={out}",
        "data.crop_size=24", "data.val_resize=28", "data.batch_per_gpu=8", "data.workers=0", "model.width=8",
        "schedule.epochs=1", "train.progress=false", *overrides,
    ]
