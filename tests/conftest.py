import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
