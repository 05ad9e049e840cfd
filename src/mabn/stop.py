"""Stop signals: which signals mean "finish the step, checkpoint, exit" (Ctrl-C, a kill, SLURM preemption or
time limit), the trainer's flag for them, and the shield that keeps forked loader workers alive through them.

Ctrl-C is one of them, once: the first asks for the stop like SIGTERM, the second aborts at once (Python's
KeyboardInterrupt; checkpoints are atomic). Where SIGINT is ignored (a shell script's background job), it stays so.

SLURM, `timeout` and `kill -- -PGID` signal every process of the job, loader workers included. A worker
left with the default action dies at once, and its death surfaces in the trainer as "DataLoader worker ...
is killed by signal" in the middle of a step: no checkpoint, and a Hydra multirun goes on to its next job.
`shield_loader_worker` (the loaders' `worker_init_fn`) lets each worker absorb the first stop signal that
does not come from the trainer, so the trainer finishes its step and checkpoints on its normal path; the
trainer's own SIGTERM (the loader's shutdown, multiprocessing's exit) still ends a worker at once.
"""
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Callable


def stop_signals() -> list[signal.Signals]:
    """SIGINT (Ctrl-C), SIGTERM, SIGUSR1, and submitit's preemption/time-limit signal: SIGUSR2 unless
    SUBMITIT_PREEMPT_SIGNAL names another (submitit asks SLURM for `--signal=USR2@signal_delay_s`; its local
    executor sends the same)."""
    names = ["INT", "TERM", "USR1", os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]
    return list(dict.fromkeys(getattr(signal, f"SIG{name}") for name in names if hasattr(signal, f"SIG{name}")))


@dataclass
class StopSignal:
    """Set by a stop signal (`stop_signals`): finish the step, checkpoint, exit cleanly; then
    `forward_to_previous_handler` lets submitit requeue the job. `on_signal(signum)`, if given, runs in the
    handler once the flag is set (`make repro`'s driver passes the signal on to its runs); `announce`, if
    given, is written to stderr at the first Ctrl-C (one line, from the process that speaks for the job),
    followed by "; Ctrl-C again aborts at once" where the second one does.
    `second_interrupt_aborts=False` where a second SIGINT is no one's second Ctrl-C: torchrun's agent passes
    the terminal's Ctrl-C on to its ranks, which the terminal's has already reached."""

    on_signal: Callable[[int], None] | None = None
    announce: str | None = None
    second_interrupt_aborts: bool = True
    received: int | None = None
    previous: dict = field(default_factory=dict)

    def install(self) -> "StopSignal":
        for sig in stop_signals():
            if sig == signal.SIGINT and signal.getsignal(sig) is not signal.default_int_handler:
                continue  # ignored (a background job) or someone else's: not ours to take
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.second_interrupt_aborts:
                signal.signal(signum, self.previous[signum])  # the next Ctrl-C aborts at once
            if self.announce and self.received != signum:  # once: a torchrun rank also gets its agent's copy
                again = "; Ctrl-C again aborts at once" if self.second_interrupt_aborts else ""
                os.write(2, f"\n{self.announce}{again}\n".encode())  # not logging: its lock may be held here
        self.received = signum
        if self.on_signal is not None:
            self.on_signal(signum)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def forward_to_previous_handler(self) -> None:
        """After the checkpoint: let a handler installed before ours (submitit's requeue) see the signal; not
        Python's Ctrl-C handler, whose KeyboardInterrupt would end a run that has just stopped cleanly."""
        handler = self.previous.get(self.received)
        if callable(handler) and handler is not signal.default_int_handler:
            signal.raise_signal(self.received)


def shield_loader_worker(worker_id: int) -> None:
    """A loader's `worker_init_fn`: this worker outlives the first stop signal sent by anyone but the trainer.

    The stop signals are blocked here and taken by a thread (`sigwaitinfo` tells who sent each): one from
    the parent ends the worker at once with status 0, as torch's own SIGTERM handler in a worker does (the
    loader's and multiprocessing's shutdown); the first from elsewhere (SLURM, `timeout`, a group kill) is
    absorbed, the next kills it by that signal. A signal the worker ignores (inherited from a trainer that
    ignores it) stays ignored. Where `sigwaitinfo` is missing (macOS), torch's default stays."""
    if not hasattr(signal, "sigwaitinfo"):
        return
    # Not one this process ignores (SIGINT in a background job's trainer, inherited): blocked, it would be taken.
    signals = {sig for sig in stop_signals() if signal.getsignal(sig) is not signal.SIG_IGN}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # threads started from here on inherit the mask
    threading.Thread(target=_take_stop_signals, args=(signals,), name="mabn-stop-shield", daemon=True).start()


def _take_stop_signals(signals: set) -> None:
    absorbed = False
    while True:
        info = signal.sigwaitinfo(signals)
        if info.si_pid == os.getppid():
            os._exit(0)
        if absorbed:
            # Die of it: unblocked in this thread only, the signal's own action (default, or torch's SIGTERM
            # handler, which re-raises the default for a sender other than the parent) ends the process.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {info.si_signo})
            signal.pthread_kill(threading.get_ident(), info.si_signo)
            os._exit(128 + info.si_signo)  # not reached
        absorbed = True
