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


def run_script_here(name: str, *args) -> "subprocess.CompletedProcess":
    """scripts/<name>.py run with `args` in this process, as a finished process: its exit status, stdout and stderr.
    For refusals, which exit before any work: a new process spends 3-4 s importing torch (the runs that do the
    work go through a subprocess)."""
    import contextlib
    import io
    import subprocess
    import sys
    from unittest import mock

    main = load_script(name).main
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "argv", [str(ROOT / "scripts" / f"{name}.py"), *map(str, args)]), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main()
        except SystemExit as exit_:
            code = exit_.code
    if isinstance(code, str):  # SystemExit("error: ..."): the interpreter prints it and exits 1
        err.write(code + "\n")
        code = 1
    return subprocess.CompletedProcess([name, *map(str, args)], code or 0, out.getvalue(), err.getvalue())


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


def at_a_terminal(cmd: list[str]) -> list[str]:
    """`cmd` (`[sys.executable, ...]`) with Python's own Ctrl-C handling, as when typed at a terminal: a shell
    script's background job (a CI runner, say) hands its children SIGINT ignored, which they then leave so."""
    import sys

    return [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
            "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])", *cmd[1:]]


def finished_run(root, out, *overrides) -> pathlib.Path:
    """The run dir of a `train_command` run that has finished."""
    import subprocess

    done = subprocess.run(train_command(root, out, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return next(p.parent for p in pathlib.Path(out).rglob("metrics.jsonl"))


@pytest.fixture(scope="session")
def mabn_run(tiny_shapes, tmp_path_factory):
    """A finished MABN run (ResNet-18 at torchvision's width, 32 px, one epoch), for export and evaluation."""
    return finished_run(tiny_shapes, tmp_path_factory.mktemp("runs"), "model=resnet18", "model.width=64", "norm=mabn",
                        "norm.norm_batch=4", "norm.options.window=2", "norm.options.warmup=2", "data.crop_size=32",
                        "data.val_resize=36")
