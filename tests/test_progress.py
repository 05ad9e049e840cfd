"""mabn.progress: one bar rule for every long loop, in place on a terminal, once a minute in a log file."""
import io
import time

from mabn.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _draws(stream: io.StringIO, desc: str) -> list[str]:
    return [d for d in stream.getvalue().replace("\r", "\n").splitlines() if d.startswith(desc)]


def _loop(monkeypatch, stream: io.StringIO) -> list[str]:
    monkeypatch.setattr("sys.stderr", stream)
    for _ in progress_bar(range(40), desc="work"):
        time.sleep(0.01)  # 0.4 s: tqdm's own 0.1 s interval would redraw about four times
    return _draws(stream, "work")


def test_in_a_log_file_the_bar_is_drawn_at_its_start_and_end(monkeypatch):
    draws = _loop(monkeypatch, io.StringIO())
    assert len(draws) == 2 and "40/40" in draws[-1], draws


def test_on_a_terminal_the_bar_keeps_tqdms_interval(monkeypatch):
    draws = _loop(monkeypatch, Terminal())
    assert len(draws) > 2 and "40/40" in draws[-1], draws
