"""Result tables and plots from real tiny runs: grouping, counts and numbers checked against metrics files."""
import json
import math
import statistics
import subprocess
import sys

import pytest

from mabn.results import figure_markdown, find_runs, group_runs, paper_top1_err, to_markdown

from .conftest import ROOT, load_script, run_script_here, train_command


@pytest.fixture(scope="module")
def sweep_dir(tiny_shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    cmd = train_command(tiny_shapes, out, "norm=bn,mabn", "data.batch_per_gpu=4,8", "seed=0,1",
                        "train.max_batches_per_epoch=4", "stats.enabled=true", "stats.every=1")
    cmd.insert(3, "--multirun")  # after `-m mabn.train`
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # one more run of a setting, cut short: it must be counted as unfinished, not averaged
    unfinished = out / "train" / "shapes10-resnet18_cpu-bn-b4-n4-s7"
    (unfinished / ".hydra").mkdir(parents=True)
    (unfinished / ".hydra" / "config.yaml").write_text(
        (out / "train" / "shapes10-resnet18_cpu-bn-b4-n4-s0" / ".hydra" / "config.yaml").read_text().replace("seed: 0", "seed: 7"))
    (unfinished / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1_err": 1.0}) + "\n")
    return out


def _final_errors(run_dirs):
    errs = []
    for d in run_dirs:
        records = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        errs.append([r for r in records if "epoch" in r][-1]["val_top1_err"])
    return errs


def test_table_groups_counts_and_averages_match_the_runs(sweep_dir):
    runs = find_runs(sweep_dir)
    assert len(runs) == 9
    rows = group_runs(runs)
    assert len(rows) == 4
    for row in rows:
        _, _, _, norm, b, n, _ = row.key
        assert len(row.finished) == 2 and sorted(r.seed for r in row.finished) == [0, 1]
        dirs = [sweep_dir / "train" / f"shapes10-resnet18_cpu-{norm}-b{b}-n{n}-s{s}" for s in (0, 1)]
        expected = _final_errors(dirs)
        mean, std = row.stat("final_err")
        assert math.isclose(mean, statistics.fmean(expected)) and math.isclose(std, statistics.stdev(expected))
        assert len(row.unfinished) == (1 if (norm, n) == ("bn", 4) else 0)
    markdown = to_markdown(rows)
    assert markdown.count("\n| shapes10 |") == 4 and "| 2 |" in markdown


def test_a_row_whose_runs_are_not_seeds_of_one_setting_is_flagged(sweep_dir, tmp_path):
    """Copies of the sweep's bn/N=8 runs under a second root, one with another momentum and another lr, one
    repeating seed 0 with only operational settings changed: the table still groups them by norm and batch,
    and says which rows mix what."""
    import shutil

    assert "Warning" not in to_markdown(group_runs(find_runs(sweep_dir)))  # the sweep's rows are clean
    other = tmp_path / "other"
    for seed, edit in ((1, lambda t: t.replace("momentum: 0.9", "momentum: 0.8").replace("base_lr: 0.4", "base_lr: 0.2")),
                       (0, lambda t: t.replace("workers: 0", "workers: 3").replace("progress: false", "progress: true"))):
        src = sweep_dir / "train" / f"shapes10-resnet18_cpu-bn-b8-n8-s{seed}"
        dst = other / src.name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "tb"))
        config = dst / ".hydra" / "config.yaml"
        edited = edit(config.read_text())
        assert edited != config.read_text()
        config.write_text(edited)
    markdown = to_markdown(group_runs(find_runs(sweep_dir, other)))
    warnings = [line for line in markdown.splitlines() if line.startswith("- ")]
    assert "Warning: some rows average runs that are not seeds of one setting" in markdown
    assert warnings == ["- shapes10/resnet18_cpu/1/bn/8/8: its runs differ in optim.momentum: 0.9, 0.8; schedule.base_lr: 0.4, 0.2",
                        "- shapes10/resnet18_cpu/1/bn/8/8: seeds 0, 1 appear in more than one run dir"]


def _main(script, monkeypatch, *argv) -> None:
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *map(str, argv)])
    script.main()


def test_results_script_writes_md_and_csv_and_the_plots(sweep_dir, tmp_path, monkeypatch, capsys):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "results_table.py"), str(sweep_dir), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ((tmp_path / "results.md").read_text() + "\n" + (tmp_path / "figure.md").read_text()).strip()
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 5
    figure = (tmp_path / "figure.md").read_text().splitlines()
    assert figure[0] == "| norm | b = 8 |"  # N = 4 and 8 have 4 finished runs each: the tie goes to the larger N
    for norm in ("bn", "mabn"):
        errs = _final_errors([sweep_dir / "train" / f"shapes10-resnet18_cpu-{norm}-b8-n8-s{s}" for s in (0, 1)])
        cell = f"{statistics.fmean(errs):.2f} ± {statistics.stdev(errs):.2f} (2: {errs[0]:.2f}, {errs[1]:.2f})"
        assert f"| {norm} | {cell} |" in figure
    assert "| paper bn | 25.45 |" in figure
    every_run = (tmp_path / "runs.md").read_text().splitlines()[2:]
    assert len(every_run) == 9 and sum("| unfinished |" in line for line in every_run) == 1
    assert all(line.rstrip(" |").rsplit("| ", 1)[1] not in ("", "-", "unrecorded") for line in every_run if "-s7" not in line)
    # The plotting scripts in process (one matplotlib import instead of five interpreters).
    plot_results, plot_batch_stats = load_script("plot_results"), load_script("plot_batch_stats")
    _main(plot_results, monkeypatch, "error-vs-batch", sweep_dir, "--out", tmp_path / "evb.png", "--paper")
    runs = sorted((sweep_dir / "train").glob("*-s0"))
    _main(plot_results, monkeypatch, "curves", *runs, "--out", tmp_path / "curves.png")
    capsys.readouterr()
    _main(plot_batch_stats, monkeypatch, *runs[:2], "--out", tmp_path / "stats.png")
    stats = capsys.readouterr().out
    assert "std Psi_B" in stats and stats.count("| bn1 |") == 2
    assert all(" s0 |" in line for line in stats.splitlines() if line.startswith("| bn1 |"))  # seeds told apart
    mabn = [r for r in runs if "-mabn-" in r.name]
    _main(plot_batch_stats, monkeypatch, *runs[:1], *mabn, "--out", tmp_path / "lag.png", "--lag-windows", "0,2,4")
    lag = capsys.readouterr().out
    rows = [line for line in lag.split("used/own - 1", 1)[1].splitlines() if line.startswith("| bn1 |")]
    assert len(rows) == len(mabn) == 2 and all(row.count("(n=2)") == 2 for row in rows)  # steps 0-1 and 2-3; no BN row
    with pytest.raises(SystemExit, match=r"^error: --lag-windows='5,2' is not valid"):
        _main(plot_batch_stats, monkeypatch, mabn[0], "--lag-windows", "5,2")
    for png in ("evb.png", "curves.png", "stats.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_an_out_the_scripts_cannot_write_is_one_error_line_before_any_run_is_read(tmp_path, monkeypatch):
    plot_results, plot_batch_stats = load_script("plot_results"), load_script("plot_batch_stats")
    for out, message in ((tmp_path, "is a directory"), (tmp_path / "figure", "no suffix to name the format"),
                         (tmp_path / "figure.txt", "matplotlib does not write .txt; valid: a file ending in .")):
        for argv in ((plot_results, "curves", tmp_path), (plot_batch_stats, tmp_path)):
            with pytest.raises(SystemExit, match=f"^error: --out {out}: |^error: --out {out} ") as exit_:
                _main(argv[0], monkeypatch, *argv[1:], "--out", out)
            assert message in str(exit_.value)
    (tmp_path / "results.md").write_text("kept\n")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "results_table.py"), str(tmp_path), "--out",
                           str(tmp_path / "results.md")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == f"error: --out {tmp_path / 'results.md'} is a file; valid: a " \
        "folder for results.md, results.csv, runs.md and figure.md\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]


def test_a_root_that_does_not_exist_is_an_error_not_a_smaller_table(sweep_dir, tmp_path, monkeypatch):
    """`results_table.py outputs/repro outputs/rerun` with the second mistyped tabled the first alone, as if the
    reruns had never been made; the plot drew the same smaller figure."""
    typo = tmp_path / "repor"
    done = run_script_here("results_table", sweep_dir, typo, "--out", tmp_path / "table")
    assert done.returncode == 2 and done.stderr == f"error: {typo} does not exist; valid: folders holding run dirs " \
        "(e.g. outputs/train)\n"
    assert not (tmp_path / "table").exists()
    with pytest.raises(SystemExit, match=f"^error: {typo}, {tmp_path / 'x'} do not exist; valid: "):
        _main(load_script("plot_results"), monkeypatch, "error-vs-batch", sweep_dir, typo, tmp_path / "x",
              "--out", tmp_path / "evb.png")
    assert not (tmp_path / "evb.png").exists()
    one = next(run for run in sorted((sweep_dir / "train").iterdir()) if (run / "metrics.jsonl").exists())
    done = run_script_here("results_table", one, "--out", tmp_path / "table")
    assert done.returncode == 0 and done.stderr.startswith("(1 run; written to ")


def test_a_line_cut_short_by_a_kill_is_left_out_by_every_reader(tmp_path):
    """A run killed mid-write leaves its last line cut short until it resumes (and rewinds its records); the table,
    the plots, repro (deciding what to resume) and evaluation stopped at it with a JSONDecodeError."""
    from mabn.evaluation import training_sources

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\ndata: {name: d, batch_per_gpu: 8}\nmodel: {name: m}\n"
                                                "norm: {name: mabn, norm_batch: 4}\nschedule: {epochs: 2}\n")
    epoch = {"epoch": 1, "val_top1_err": 50.0, "source": "abc"}
    (run / "metrics.jsonl").write_text(json.dumps(epoch) + '\n{"epoch": 2, "val_top1_err": 4')
    stats = {"step": 0, "layers": {"bn1": {"mu_B": 0.5}}}
    (run / "batch_stats.jsonl").write_text(json.dumps(stats) + '\n{"step": 10, "layers": {"bn1": {"mu_B": 0.')
    assert [r.epochs for r in find_runs(tmp_path)] == [[epoch]]
    assert load_script("repro").epoch_records(run) == [epoch]
    assert training_sources(run / "checkpoints" / "best.pt") == ["abc"]
    assert load_script("plot_batch_stats").load_stats(run)[1] == {"bn1": {"mu_B": [(0, 0.5)]}}


def test_lag_compares_what_mabn_and_brn_divide_by_with_the_groups_own_and_skips_bn():
    plot_batch_stats = load_script("plot_batch_stats")
    own = {"mu_B": [(0, 1.0), (20, 1.0)], "sigma2_B": [(0, 1.0), (20, 3.0)]}
    mabn = {**own, "chi_avg": [(0, float("nan")), (20, 6.0)]}  # NaN while the ring fills: skipped
    brn = {**own, "running_var": [(0, 2.0), (20, 1.5)]}
    assert plot_batch_stats.used_over_own(mabn, "mabn") == [(20, 6.0 / (3.0 + 1.0) - 1)]
    assert plot_batch_stats.used_over_own(brn, "brn") == [(0, 1.0), (20, -0.5)]
    assert plot_batch_stats.used_over_own(brn, "bn") == []  # BN trains on its own statistics


def test_clip_table_averages_brns_recorded_clip_rates_per_window_and_skips_runs_without_them():
    plot_batch_stats = load_script("plot_batch_stats")
    brn = {plot_batch_stats.CLIPS: {"r": [(0, 1.0), (20, 0.5), (40, 0.1)], "d": [(0, 1.0), (20, 0.25), (40, 0.0)]}}
    rows = plot_batch_stats.clip_table([("brn s0", brn, "brn"), ("bn s0", {"bn1": {}}, "bn")], [0, 20, 60])
    assert rows[2:] == ["| brn s0 | 100.00 % / 100.00 % (n=1) | 30.00 % / 12.50 % (n=2) |"]
    assert plot_batch_stats.clip_table([("bn s0", {"bn1": {}}, "bn")], [0, 20]) == []


def test_all_layers_table_takes_the_median_and_mean_over_layers_and_iterations_per_window():
    plot_batch_stats = load_script("plot_batch_stats")
    lag = {"bn1": [(0, [0.5, 0.4]), (20, [-0.2, 0.3])], "layer4.1.bn2": [(20, [-0.4, 0.1]), (40, [-0.3, 0.2])]}
    rows = plot_batch_stats.all_layers_table([("mabn s0", {plot_batch_stats.LAG: lag}, "mabn"),
                                              ("bn s0", {"bn1": {}}, "bn")], [0, 20, 60])
    assert rows[2:] == ["| mabn s0 | +0.500, 0.400 (n=1) | -0.300, 0.200 (n=3) |"]


def test_paper_numbers():
    assert paper_top1_err("bn", 2) == 35.22 and paper_top1_err("mabn", 2) == 23.67 and paper_top1_err("brn", 2) == 30.29
    assert paper_top1_err("gn", 32) == 24.1 and paper_top1_err("bn", 32) == 23.41


def test_a_per_sample_norm_is_drawn_flat_over_the_panels_normalization_batches(sweep_dir):
    import dataclasses

    plot = load_script("plot_results")
    runs = [r for r in find_runs(sweep_dir) if r.finished]
    # GN runs at N = 4 (its norm_batch is N): one per seed, beside BN and MABN at b = 4 and 8
    gn = [dataclasses.replace(r, norm="gn", norm_batch=4) for r in runs if (r.norm, r.batch_per_gpu) == ("bn", 4)]
    (lines,) = plot.error_lines(runs + gn).values()
    assert {b for (norm, _), by_b in lines.items() if norm != "gn" for b in by_b} == {4, 8}
    gn_line = [by_b for (norm, _), by_b in lines.items() if norm == "gn"]
    assert len(gn_line) == 1 and set(gn_line[0]) == {4, 8}
    assert gn_line[0][4] == gn_line[0][8] == [r.final_err for r in gn] and len(gn) == 2


def test_the_plots_usual_n_is_the_most_common_and_a_tie_goes_to_the_larger_n_as_in_the_table(sweep_dir):
    import dataclasses

    plot = load_script("plot_results")
    one = next(r for r in find_runs(sweep_dir) if r.finished)
    at = lambda n, count: [dataclasses.replace(one, batch_per_gpu=n, norm_batch=2, seed=s) for s in range(count)]
    labels = lambda runs: {label for _, label in next(iter(plot.error_lines(runs).values()))}
    assert labels(at(2, 3) + at(32, 3)) == {"", " N=2"}  # a tie, the small N listed first: N = 32 is the usual one
    assert labels(at(2, 4) + at(32, 3)) == {"", " N=32"}  # the most common N wins


def test_runs_that_are_all_tagged_are_named_as_such_by_the_figure_and_its_table(sweep_dir, tmp_path, monkeypatch):
    # The plot said "no finished runs" and figure.md was left empty, as if training or writing had failed.
    import dataclasses

    plot = load_script("plot_results")
    tagged = [dataclasses.replace(r, tag="-ablation") for r in find_runs(sweep_dir)]
    monkeypatch.setattr(plot, "find_runs", lambda *roots: tagged)
    with pytest.raises(SystemExit, match=r"^error: no untagged finished runs under .*; the 8 finished runs there are "
                       r"tagged \(-ablation\): --with-tags draws them$"):
        plot.error_vs_batch([sweep_dir], tmp_path / "evb.png", paper=False)
    assert figure_markdown(group_runs(tagged)).startswith("No untagged finished runs: the figure leaves out tagged runs")
    assert "| bn |" in figure_markdown(group_runs(find_runs(sweep_dir)))
