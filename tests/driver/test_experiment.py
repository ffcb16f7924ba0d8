"""A whole experiment through the CLI on a tiny checkpoint: results, report, plots, state files,
and a rerun that resumes instead of starting over."""

import json
import re
import shutil
import signal
from pathlib import Path

import pytest

from copal.cli import main
from copal.experiment import ExperimentConfig
from copal.report import bwt_table, make_plots
from copal.state import load_state

from .tiny import write_corpus


def test_experiment_cli_report_and_resume(checkpoint, corpus, corpus_b, tmp_path, capsys):
    heldout = write_corpus(tmp_path / "heldout.txt", seed=2)
    config = {
        "model": str(checkpoint), "sources": [str(corpus), str(corpus_b)], "heldout": str(heldout),
        "num_calibration": 2, "num_test": 2, "seq_len": 32, "batch_size": 2,
        "runs": [{"method": "copal", "protocol": "continual", "pattern": "2:4"},
                 {"method": "wanda", "protocol": "restart", "pattern": "2:4"}],
    }
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    out = tmp_path / "run"
    assert main(["experiment", "--config", str(config_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "P matrix, copal[sumsq,nograd,raw]-continual 2:4" in printed and "BWT mean" in printed

    results = json.loads((out / "results.json").read_text())
    assert [run["label"] for run in results["runs"]] == [
        "copal[sumsq,nograd,raw]-continual 2:4", "wanda-restart 2:4"]
    for run in results["runs"]:
        assert len(run["P"]) == 2 and len(run["heldout"]["ppl"]) == 2
        # each run's own peak: above 0, at most the process's peak
        assert 0 < run["peak_host_mb"] <= results["peak_rss_mb"] + 1
    assert not list(out.glob(".copal-scratch-*")), "the runs' scratch blocks are removed"
    history, meta = load_state(out / results["runs"][0]["state_file"])
    assert meta["datasets"] == [str(corpus), str(corpus_b)]
    assert meta["pattern"] == "2:4" and meta["aggregation"] == "sumsq" and meta["seq_len"] == 32
    # the experiment's state is continued by another process's verb, with no past data
    assert main(["continue", "--state", str(out / results["runs"][0]["state_file"]),
                 "--data", str(heldout), "--out", str(tmp_path / "step3")]) == 0
    history, meta = load_state(tmp_path / "step3" / "copal-state.safetensors")
    assert meta["datasets"] == [str(corpus), str(corpus_b), str(heldout)]
    assert all(len(layer.acts) == 3 for layer in history.values())
    report = (out / "report.md").read_text()
    assert "| peak host (MB) |" in report and "peak device" not in report
    assert "## Backward transfer" in report and "![bwt](bwt.png)" in report
    assert (out / "bwt.png").stat().st_size > 0

    assert main(["experiment", "--config", str(config_path), "--out", str(out)]) == 0
    assert printed.count("step 1/2") >= 2
    assert "done before with the same config, data and model: skipped" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0



def test_report_merges_a_sweep_split_over_two_results_directories(checkpoint, corpus, corpus_b,
                                                                 tmp_path, capsys):
    outs = []
    for samples in (2, 1):  # one sweep over calibration samples, run as two experiments
        config = {"model": str(checkpoint), "sources": [str(corpus), str(corpus_b)],
                  "num_calibration": 2, "num_test": 2, "seq_len": 32, "batch_size": 2,
                  "runs": [{"method": "wanda", "protocol": "restart", "pattern": "50%",
                            "num_calibration": samples}]}
        config_path = tmp_path / f"config-{samples}.json"
        config_path.write_text(json.dumps(config))
        outs.append(str(tmp_path / f"run-{samples}"))
        assert main(["experiment", "--config", str(config_path), "--out", outs[-1]]) == 0
    merged = tmp_path / "merged"
    capsys.readouterr()
    assert main(["report", *outs, "--out", str(merged)]) == 0
    report = (merged / "report.md").read_text()
    assert "wanda-restart 50% n=2" in report and "wanda-restart 50% n=1" in report
    assert (merged / "bwt_vs_samples.png").stat().st_size > 0

    assert main(["report", *outs]) == 2
    assert "need --out" in capsys.readouterr().err
    assert main(["report", outs[0], outs[0], "--out", str(merged)]) == 2
    assert "more than one" in capsys.readouterr().err
    other = json.loads((Path(outs[1]) / "results.json").read_text())
    other["config"]["num_test"] = 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text(json.dumps(other))
    assert main(["report", outs[0], str(tmp_path / "other"), "--out", str(merged)]) == 2
    assert "differ in num_test" in capsys.readouterr().err

def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    assert main(["prune", "--model", str(tmp_path / "missing"), "--data", "wiki",
                 "--out", str(tmp_path / "out")]) == 2
    assert "not a local directory" in capsys.readouterr().err


def _run(method, protocol, pattern, bwt_mean, num_calibration=None, **options):
    spec = {"method": method, "protocol": protocol, "pattern": pattern,
            "num_calibration": num_calibration, **options}
    label = f"{method}{'[max,grad]' if method == 'copal' else ''}-{protocol} {pattern}"
    label += f" n={num_calibration}" if num_calibration else ""
    return {"spec": spec, "label": label, "bwt_mean": bwt_mean, "bwt_max": 2 * bwt_mean}


def _lines(figure):
    """{label: x values} of the figure's first axes, without matplotlib's unlabelled lines."""
    return {line.get_label(): [float(x) for x in line.get_xdata()]
            for line in figure.axes[0].get_lines() if not line.get_label().startswith("_")}


def test_figures_1_and_3_are_drawn_one_line_per_variant(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    runs = [_run("copal", "continual", p, b) for p, b in (("30%", 0.1), ("50%", 1.0), ("2:4", 5.0))]
    runs += [_run("wanda", "restart", p, b) for p, b in (("30%", 0.5), ("50%", 6.0))]
    runs += [_run("wanda", "restart", "50%", b, n) for n, b in ((1, 9.0), (4, 7.0))]
    figures, savefig = {}, Figure.savefig

    def keep(figure, path, **kwargs):
        figures[Path(path).name] = figure
        savefig(figure, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    paths = make_plots({"config": {"num_calibration": 16, "sources": ["wiki", "kjv"],
                                   "heldout": "jargon"}, "runs": runs}, tmp_path)
    assert [p.name for p in paths] == ["bwt.png", "bwt_vs_sparsity.png", "bwt_vs_samples.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert _lines(figures["bwt_vs_sparsity.png"]) == {
        "copal[max,grad]-continual": [0.3, 0.5], "wanda-restart": [0.3, 0.5],
        "wanda-restart n=1": [0.5], "wanda-restart n=4": [0.5]}
    assert _lines(figures["bwt_vs_samples.png"])["wanda-restart 50%"] == [1, 4, 16]
    setting = "wiki -> kjv; pattern 2:4, 30%, 50%; held-out jargon"
    assert setting in figures["bwt.png"].axes[0].get_title()
    assert setting in figures["bwt_vs_sparsity.png"].texts[0].get_text()


CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_with_distinct_runs(path):
    """A typo in a shipped config would otherwise surface only after hours of earlier runs, and
    two runs with one label would make the second look finished (resume skips by label)."""
    config = ExperimentConfig.load(path)
    labels = [run.label for run in config.runs]
    assert len(set(labels)) == len(labels)


def test_bwt_table_peak_memory_columns():
    run = {"label": "wanda-restart 50%", "bwt_mean": 1.0, "bwt_max": 2.0, "final_mean": 30.0,
           "diagonal": [10.0, 20.0], "seconds": 12.0}
    table = bwt_table({"runs": [dict(run, peak_host_mb=1500.4), dict(run, peak_rss_mb=3068.9),
                                dict(run)]})
    rows = [line.split(" | ")[-1] for line in table.splitlines()[2:]]
    assert rows == ["1500 |", "<= 3069 |", "- |"] and "peak device" not in table
    with_device = bwt_table({"runs": [dict(run, peak_host_mb=1.0, peak_device_mb=2048.0)]})
    assert with_device.splitlines()[-1].endswith("| 1 | 2048 |")


EXPERIMENT_CHILD = """
import sys
from copal.cli import main
sys.exit(main(["experiment", "--config", sys.argv[1], "--out", sys.argv[2]]))
"""


def _progress_steps(out):
    """{run directory: finished steps} of the runs under way in an experiment's output."""
    steps = {}
    for path in (out / ".copal-progress").glob("*/progress.json"):
        try:
            steps[path.parent.name] = len(json.loads(path.read_text())["steps"])
        except (OSError, ValueError):
            pass
    return steps


def _unfinished_steps(out):
    """Steps of the unfinished run that results.json reports (it is rewritten just after the
    run's progress.json, so a kill between the two reports one step fewer)."""
    try:
        return len((json.loads((out / "results.json").read_text())["unfinished"] or {})["P"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _finished_runs(out):
    try:
        return len(json.loads((out / "results.json").read_text())["runs"])
    except (OSError, ValueError, KeyError):
        return 0


def test_killed_experiment_resumes_step_by_step_with_the_same_numbers(checkpoint, corpus,
                                                                       corpus_b, tmp_path):
    """Real SIGKILLs: after run 1's first step, after run 1, after run 2's first step; each
    rerun continues from the last finished step, and the numbers equal an uninterrupted run's."""
    from .test_safety import _child, _kill_when

    heldout = write_corpus(tmp_path / "heldout.txt", seed=2)
    config = {"model": str(checkpoint), "sources": [str(corpus), str(corpus_b)],
              "heldout": str(heldout), "num_calibration": 4, "num_test": 2, "seq_len": 32,
              "runs": [{"method": "copal", "protocol": "continual", "pattern": "2:4"},
                       {"method": "wanda", "protocol": "cascade", "pattern": "50%"}]}
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    reference = tmp_path / "reference"
    assert main(["experiment", "--config", str(config_path), "--out", str(reference)]) == 0
    out = tmp_path / "killed"
    points = [lambda: _unfinished_steps(out) == 1 and _finished_runs(out) == 0,
              lambda: _finished_runs(out) == 1,
              lambda: _finished_runs(out) == 1 and 1 in _progress_steps(out).values()]
    for ready in points:
        child = _child(EXPERIMENT_CHILD, config_path, out)
        _kill_when(child, ready, signal.SIGKILL)
        assert (out / "report.md").is_file(), "what finished is reported"
        if ready is points[0]:  # re-rendered, the report keeps the unfinished run's steps
            assert main(["report", str(out)]) == 0
            assert "## Unfinished: copal" in (out / "report.md").read_text()
    child = _child(EXPERIMENT_CHILD, config_path, out)
    printed, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    assert "resuming after step 1/2" in printed
    assert "\r" not in err and "it/s" not in err, "no progress bars in a file"
    want = json.loads((reference / "results.json").read_text())["runs"]
    got = json.loads((out / "results.json").read_text())["runs"]
    assert [r["label"] for r in got] == [r["label"] for r in want]
    for a, b in zip(got, want):
        assert a["P"] == b["P"] and a["heldout"] == b["heldout"] and a["bwt_max"] == b["bwt_max"]
    assert load_state(out / got[0]["state_file"])[0].keys() == \
        load_state(reference / want[0]["state_file"])[0].keys()
    assert not (out / ".copal-progress").exists()
    assert "## Unfinished" not in (out / "report.md").read_text()


def test_rerun_with_other_settings_or_data_is_refused_unless_overwrite(checkpoint, corpus,
                                                                       tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    shutil.copy(corpus, folder / "a.txt")
    configs = tmp_path / "configs"
    configs.mkdir()
    config = {"model": "../" + checkpoint.name, "sources": ["../texts"], "num_calibration": 2,
              "num_test": 2, "seq_len": 32,
              "runs": [{"method": "wanda", "protocol": "restart", "pattern": "50%"}]}
    shutil.copytree(checkpoint, tmp_path / checkpoint.name)
    path = configs / "config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    # relative paths in a config are relative to its folder, not to the working directory
    assert main(["experiment", "--config", str(path), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["sources"] == [str(folder)]
    assert "aggregation" not in results["runs"][0]["spec"], "no COPAL options on a Wanda run"
    capsys.readouterr()

    (folder / "a.txt").write_text((folder / "a.txt").read_text()[::-1])
    assert main(["experiment", "--config", str(path), "--out", str(out)]) == 2
    assert "the windows of" in capsys.readouterr().err
    assert main(["experiment", "--config", str(path), "--out", str(out),
                 "--set", "seed=1"]) == 2
    assert "seed 0 -> 1" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text()) == results, "nothing was dropped"
    assert main(["experiment", "--config", str(path), "--out", str(out), "--overwrite"]) == 0
    assert "--overwrite: removing the earlier results" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["identity"] != results["identity"]


def test_config_keys_are_honoured_or_refused(checkpoint, corpus):
    base = {"model": str(checkpoint), "sources": [str(corpus)], "num_calibration": 2}
    bad = [
        ({"runs": [{"method": "wanda", "protocol": "restart", "group": "layer"}]}, "COPAL option"),
        ({"runs": [{"method": "copal", "protocol": "continual", "step_weights": [1, 2]}]},
         "2 weight(s) for 1 step(s)"),
        ({"runs": [{"method": "wanda", "protocol": "restart", "num_calibration": 3}]},
         "asks for 3 windows"),
        ({"runs": [{"method": "magnitude", "protocol": "cascade", "num_calibration": 1}]},
         "magnitude uses no calibration"),
        ({"sources": [str(corpus), str(corpus)]}, "named once"),
        ({"num_test": 0}, "num_test"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            ExperimentConfig.from_dict({**base, **change})
