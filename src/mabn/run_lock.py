"""One trainer per run dir: a lock that the run's main process holds while it trains.

Two trainers writing one run dir (the same command started twice, a sweep rerun while its first copy still
runs, `make repro` restarted while a lane of the one before still trains) interleave their checkpoints and
metrics, and a resume or a results table then reads a mix of two trajectories. The lock is `flock` on
`<run dir>/.lock`; the kernel drops it when its process ends, SIGKILL included, so a requeued or resumed run
never meets a stale one. The file names its holder for the error line.
"""
import contextlib
import datetime
import fcntl
import logging
import os
import pathlib
import socket

from .config import ConfigError

LOCK_NAME = ".lock"
log = logging.getLogger(__name__)


class RunDirInUse(ConfigError):
    def __init__(self, run_dir: pathlib.Path, holder: str):
        super().__init__(f"run dir {run_dir} is in use by {holder}: wait for it to finish, stop it (SIGTERM: it "
                         f"checkpoints first), or set tag=-<name> to run apart")
        self.holder = holder


def _open_locked(run_dir: pathlib.Path):
    """The lock file, open and locked by this process; RunDirInUse if another process holds it."""
    handle = open(run_dir / LOCK_NAME, "a+")  # "a+": the holder's line is read, not truncated, before locking
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirInUse(run_dir, holder) from None
    except OSError as err:  # a file system without locks (some NFS mounts: ENOLCK): train, unguarded
        log.warning("cannot lock %s (%s): a second trainer of this run dir would not be refused", handle.name, err)
    return handle


def check_free(run_dir) -> None:
    """Before anything is written: RunDirInUse if a trainer holds `run_dir` now (takes and drops the lock)."""
    run_dir = pathlib.Path(run_dir)
    if (run_dir / LOCK_NAME).is_file():
        _open_locked(run_dir).close()


@contextlib.contextmanager
def hold(run_dir: pathlib.Path):
    """Hold `run_dir` (any folder: `make repro` holds its lanes' log folder) for this process while the block runs."""
    handle = _open_locked(pathlib.Path(run_dir))
    try:
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} (since {started})\n")
        handle.flush()
        yield
    finally:
        handle.close()
