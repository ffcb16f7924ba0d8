"""A whole experiment through the CLI on a tiny checkpoint: results, report, plots, state files,
and a rerun that resumes instead of starting over."""

import json

from copal.cli import main
from copal.state import load_state


def test_experiment_cli_report_and_resume(checkpoint, corpus, corpus_b, tmp_path, capsys):
    config = {
        "model": str(checkpoint), "sources": [str(corpus), str(corpus_b)], "heldout": str(corpus),
        "num_calibration": 2, "num_test": 2, "seq_len": 32, "batch_size": 2,
        "runs": [{"method": "copal", "protocol": "continual", "pattern": "2:4"},
                 {"method": "wanda", "protocol": "restart", "pattern": "2:4"}],
    }
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    out = tmp_path / "run"
    assert main(["experiment", "--config", str(config_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "P matrix, copal[max,grad]-continual 2:4" in printed and "BWT mean" in printed

    results = json.loads((out / "results.json").read_text())
    assert [run["label"] for run in results["runs"]] == [
        "copal[max,grad]-continual 2:4", "wanda-restart 2:4"]
    for run in results["runs"]:
        assert len(run["P"]) == 2 and len(run["heldout"]["ppl"]) == 2
    history, meta = load_state(out / results["runs"][0]["state_file"])
    assert meta["datasets"] == [str(corpus), str(corpus_b)]
    report = (out / "report.md").read_text()
    assert "## Backward transfer" in report and "![bwt](bwt.png)" in report
    assert (out / "bwt.png").stat().st_size > 0

    assert main(["experiment", "--config", str(config_path), "--out", str(out)]) == 0
    assert printed.count("step 1/2") >= 2
    assert "done before, skipped" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    assert main(["prune", "--model", str(tmp_path / "missing"), "--data", "wiki",
                 "--out", str(tmp_path / "out")]) == 2
    assert "not a local directory" in capsys.readouterr().err
