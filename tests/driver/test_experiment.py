"""A whole experiment through the CLI on a tiny checkpoint: results, report, plots, state files,
and a rerun that resumes instead of starting over."""

import json
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
    assert "done before, skipped" in capsys.readouterr().out
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
    paths = make_plots({"config": {"num_calibration": 16}, "runs": runs}, tmp_path)
    assert [p.name for p in paths] == ["bwt.png", "bwt_vs_sparsity.png", "bwt_vs_samples.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert _lines(figures["bwt_vs_sparsity.png"]) == {
        "copal[max,grad]-continual": [0.3, 0.5], "wanda-restart": [0.3, 0.5],
        "wanda-restart n=1": [0.5], "wanda-restart n=4": [0.5]}
    assert _lines(figures["bwt_vs_samples.png"])["wanda-restart 50%"] == [1, 4, 16]


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
