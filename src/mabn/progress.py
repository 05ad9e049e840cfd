"""Progress bars for long work (training, evaluation, statistics re-estimation, dataset preparation), one
rule for all: on a terminal tqdm redraws in place; in a log file (SLURM, nohup, `2> log`) every redraw is
kept, so there the bar redraws once a minute instead of tqdm's every 0.1 s (at GPU speed, about 80 MB a day
of bar in the log)."""
import sys

from tqdm import tqdm

# Both intervals: tqdm's monitor thread otherwise forces a redraw after maxinterval (10 s).
LOG_FILE_BAR_SECONDS = 60


def progress_bar(iterable=None, **options) -> tqdm:
    """`tqdm(iterable, **options)`, redrawn once a minute when stderr (where it draws) is not a terminal."""
    if not sys.stderr.isatty():
        options = dict(mininterval=LOG_FILE_BAR_SECONDS, maxinterval=LOG_FILE_BAR_SECONDS) | options
    return tqdm(iterable, dynamic_ncols=True, **options)
