"""Results -> tables (printed and markdown) and plots (matplotlib, optional)."""

from collections import defaultdict
from pathlib import Path
from typing import List

from .atomic import write_atomically
from .methods import Pattern

TITLE = "# Continual pruning report"


def _fmt(value: float) -> str:
    return f"{value:.2f}"


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def p_matrix_table(run: dict) -> str:
    header = ["after step"] + run["datasets"]
    if run.get("heldout"):
        header.append(f"held-out {run['heldout']['name']}")
    rows = []
    for t, row in enumerate(run["P"]):
        cells = [f"{t + 1} ({run['datasets'][t]})"] + [_fmt(v) for v in row]
        if run.get("heldout"):
            cells.append(_fmt(run["heldout"]["ppl"][t]))
        rows.append(cells)
    return markdown_table(header, rows)


def _megabytes(run: dict, key: str) -> str:
    if key in run:
        return f"{run[key]:.0f}"
    if key == "peak_host_mb" and "peak_rss_mb" in run:
        # recorded before per-run peaks: the process's peak up to the end of the run, a bound
        return f"<= {run['peak_rss_mb']:.0f}"
    return "-"


def bwt_table(results: dict) -> str:
    header = ["run", "BWT mean", "BWT max", "final mean ppl", "diagonal P[t][t]", "time (s)",
              "peak host (MB)"]
    on_device = any("peak_device_mb" in run for run in results["runs"])
    header += ["peak device (MB)"] if on_device else []
    rows = []
    for run in results["runs"]:
        rows.append([run["label"], _fmt(run["bwt_mean"]), _fmt(run["bwt_max"]),
                     _fmt(run["final_mean"]), " / ".join(_fmt(v) for v in run["diagonal"]),
                     f"{run['seconds']:.0f}", _megabytes(run, "peak_host_mb")]
                    + ([_megabytes(run, "peak_device_mb")] if on_device else []))
    return markdown_table(header, rows)


def dense_table(results: dict) -> str:
    dense = results["dense"]
    return markdown_table(list(dense), [[_fmt(v) for v in dense.values()]])


def render_markdown(results: dict, plots: List[Path]) -> str:
    env = results["environment"]
    config = results["config"]
    parts = [
        TITLE,
        f"Model `{config['model']}`, sequence {' -> '.join(config['sources'])}, "
        f"{config['num_calibration']} calibration windows and {config['num_test']} test windows "
        f"of {config['seq_len']} tokens per dataset (seed {config['seed']}).",
        f"Run on {env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"{env['date']}; peak host memory {results.get('peak_rss_mb', 0):.0f} MB.",
        "## Dense model perplexity", dense_table(results),
        "## Backward transfer (perplexity points; above 0 is forgetting)", bwt_table(results),
        "BWT alone flatters stasis: read it beside the diagonal and the final mean perplexity.",
        "## Perplexity matrices P[t][i] (rows: after step t; columns: dataset i)",
    ]
    for run in results["runs"]:
        parts += [f"### {run['label']}", p_matrix_table(run)]
    unfinished = results.get("unfinished")
    if unfinished:
        parts += [f"## Unfinished: {unfinished['label']}",
                  f"{len(unfinished['P'])} of {len(unfinished['datasets'])} steps finished (the "
                  "experiment was interrupted or is running; rerunning the same command resumes "
                  "after the last finished step).", p_matrix_table(unfinished)]
    if plots:
        parts.append("## Plots")
        parts += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n\n".join(parts) + "\n"


PLOTS = ("bwt.png", "bwt_vs_sparsity.png", "bwt_vs_samples.png")


def plot_files() -> List[str]:
    """The names of every plot :func:`make_plots` may write."""
    return list(PLOTS)


def _setting(results: dict) -> str:
    """What every plot's numbers depend on: the order, the patterns, the held-out set."""
    config = results.get("config", {})
    patterns = sorted({run["spec"]["pattern"] for run in results["runs"]})
    return (f"{' -> '.join(config.get('sources', []))}; pattern {', '.join(patterns)}; "
            f"held-out {config.get('heldout') or 'none'}")


def make_plots(results: dict, directory: Path) -> List[Path]:
    """BWT of every run; BWT against sparsity (the paper's Figure 1) and against the number of
    calibration samples (Figure 3) where the runs vary those; each titled with the order, the
    patterns and the held-out set. Empty if matplotlib is missing or no run finished."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    runs = results["runs"]
    if not runs:
        return []
    setting = _setting(results)
    paths = []
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(runs)), 3.5))
    xs = range(len(runs))
    ax.bar([x - 0.2 for x in xs], [r["bwt_mean"] for r in runs], width=0.4, label="BWT mean")
    ax.bar([x + 0.2 for x in xs], [r["bwt_max"] for r in runs], width=0.4, label="BWT max")
    ax.set_xticks(list(xs), [r["label"] for r in runs], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("perplexity points")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend()
    ax.set_title(f"Backward transfer: {setting}", fontsize=8)
    fig.tight_layout()
    paths.append(directory / "bwt.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    def line_plot(filename, key_of, series_of, xlabel, title, log_x=False):
        """One line per ``series_of(run)`` (the label without the x variable), x = key_of(run)."""
        series = defaultdict(list)
        for run in runs:
            x = key_of(run)
            if x is not None:
                series[series_of(run)].append((x, run))
        if not any(len({x for x, _ in pts}) > 1 for pts in series.values()):
            return
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for name, points in series.items():
            points.sort(key=lambda p: p[0])
            for axis, metric in zip(axes, ("bwt_mean", "bwt_max")):
                axis.plot([p[0] for p in points], [p[1][metric] for p in points], marker="o", label=name)
        for axis, metric in zip(axes, ("mean BWT", "worst BWT")):
            if log_x:
                axis.set_xscale("log", base=2)
            axis.set_xlabel(xlabel)
            axis.set_ylabel(metric)
            axis.axhline(0, color="black", linewidth=0.5)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{title}\n{setting}", fontsize=9)
        fig.tight_layout()
        paths.append(directory / filename)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    def sparsity_of(run):
        pattern = Pattern.parse(run["spec"]["pattern"])
        return pattern.sparsity if pattern.kind == "unstructured" else None

    def method_of(run):  # the label's "method[options]-protocol"
        return run["label"].split(" ")[0]

    def samples_of(run):
        return run["spec"].get("num_calibration") or results["config"].get("num_calibration")

    line_plot("bwt_vs_sparsity.png", sparsity_of,
              lambda r: method_of(r) + (f" n={r['spec']['num_calibration']}"
                                        if r["spec"].get("num_calibration") else ""),
              "sparsity", "BWT against sparsity (Figure 1)")
    line_plot("bwt_vs_samples.png", samples_of,
              lambda r: f"{method_of(r)} {r['spec']['pattern']}",
              "calibration samples", "BWT against calibration samples (Figure 3)", log_x=True)
    return paths


def is_report(path) -> bool:
    """True for a report.md that :func:`write_report` wrote."""
    try:
        with open(path) as handle:
            return handle.readline().rstrip("\n") == TITLE
    except (OSError, UnicodeDecodeError):
        return False


def write_report(results: dict, directory) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plots = make_plots(results, directory)
    text = render_markdown(results, plots)
    return write_atomically(directory / "report.md", lambda name: Path(name).write_text(text))


def print_summary(results: dict, out=print) -> None:
    out("\nDense perplexity:\n" + dense_table(results))
    for run in results["runs"]:
        out(f"\nP matrix, {run['label']}:\n" + p_matrix_table(run))
    if results["runs"]:
        out("\nBWT:\n" + bwt_table(results))
