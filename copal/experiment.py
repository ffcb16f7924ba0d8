"""A whole continual experiment from a small config: open the model and load the data once,
evaluate the dense model, run each (method, protocol, pattern), save results after every run (a
rerun with the same output directory skips finished runs), write the report and plots. The model
is streamed from its checkpoint block by block, like ``copal prune``: the host never holds it
whole; pruned blocks wait between steps in a scratch folder of the output directory."""

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from transformers import AutoTokenizer

from .assets import SMOLLM2_NAME, resolve_model
from .atomic import write_atomically
from .continual import RunSpec, ScratchBlocks, run_continual, state_metadata
from .data import make_dataset
from .evaluate import perplexities
from .model import LayeredModel, resolve_dtype
from .phases import HostPeak, peak_resident_bytes
from .report import print_summary, write_report
from .state import save_state
from copal_kernels.machine import environment


@dataclass
class ExperimentConfig:
    model: str = SMOLLM2_NAME
    sources: List[str] = field(default_factory=lambda: ["wiki", "kjv", "jargon"])
    heldout: Optional[str] = None
    num_calibration: int = 32
    num_test: int = 32
    seq_len: int = 512
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: object = "auto"  # windows per forward chunk, or "auto" (see sweep.resolve_batch_size)
    offload_activations: bool = False  # keep activations in pinned host memory between blocks
    runs: List[RunSpec] = field(default_factory=lambda: [
        RunSpec("copal", "continual", "50%"), RunSpec("wanda", "restart", "50%")])

    @classmethod
    def from_dict(cls, data: dict) -> "ExperimentConfig":
        data = dict(data)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        runs = [RunSpec(**run) for run in data.pop("runs", [])] or None
        config = cls(**data)
        if runs:
            config.runs = runs
        if not config.sources:
            raise ValueError("config: sources is empty")
        return config

    @classmethod
    def load(cls, path) -> "ExperimentConfig":
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib

            return cls.from_dict(tomllib.loads(text))
        return cls.from_dict(json.loads(text))


# what the numbers depend on: a results directory made with the same values is resumed
RESULT_KEYS = ("model", "sources", "heldout", "num_calibration", "num_test", "seq_len", "seed",
               "dtype")


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=1)
    write_atomically(path, lambda name: Path(name).write_text(text))


def merge_results(parts: List[dict]) -> dict:
    """One results dict from several ``results.json`` dicts, e.g. a sweep split over two configs
    (Figure 3's 1..64 samples and its 128): every part's runs in order, each run's spec given
    its own number of calibration windows; the first part's environment and dense perplexities.
    The parts must share every key of :data:`RESULT_KEYS` but ``num_calibration`` (the same
    model and test windows, so their perplexities compare); a label in two parts is an error."""
    if not parts:
        raise ValueError("no results to merge")
    first = parts[0]["config"]
    runs, labels = [], set()
    for part in parts:
        differing = [key for key in RESULT_KEYS
                     if key != "num_calibration" and part["config"].get(key) != first.get(key)]
        if differing:
            raise ValueError(f"cannot merge results that differ in {', '.join(differing)}")
        for run in part["runs"]:
            if run["label"] in labels:
                raise ValueError(f"run {run['label']!r} is in more than one of the merged results")
            labels.add(run["label"])
            spec = dict(run["spec"], num_calibration=run["spec"].get("num_calibration")
                        or part["config"]["num_calibration"])
            runs.append(dict(run, spec=spec))
    return {"config": first, "environment": parts[0]["environment"], "runs": runs,
            "dense": parts[0].get("dense"),
            "peak_rss_mb": max(part.get("peak_rss_mb", 0.0) for part in parts)}


def run_experiment(config: ExperimentConfig, out_dir, log=print) -> dict:
    """Run every run of ``config``; results in ``out_dir``/results.json, report.md, plots, and
    one COPAL state file per COPAL run. Returns the results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"
    config_dict = asdict(config)
    results = {"config": config_dict, "environment": environment(), "runs": [], "peak_rss_mb": 0.0}
    if results_path.is_file():
        previous = json.loads(results_path.read_text())
        if all(previous.get("config", {}).get(key) == config_dict[key] for key in RESULT_KEYS):
            results["runs"] = previous["runs"]
            results["dense"] = previous.get("dense")
            results["peak_rss_mb"] = previous.get("peak_rss_mb", 0.0)
            log(f"resuming: {len(results['runs'])} finished run(s) in {results_path}")
    done = {run["label"] for run in results["runs"]}

    model_dir = resolve_model(config.model, progress=log)
    log(f"model {model_dir}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lm = LayeredModel.from_checkpoint(model_dir, dtype=resolve_dtype(config.dtype, config.device))
    for stale in out_dir.glob(ScratchBlocks.SCRATCH_PREFIX + "*"):  # left by a killed run
        shutil.rmtree(stale)
    windows = dict(num_calibration=config.num_calibration, num_test=config.num_test,
                   seq_len=config.seq_len, seed=config.seed)
    datasets = [make_dataset(source, tokenizer, **windows) for source in config.sources]
    heldout = make_dataset(config.heldout, tokenizer, **windows) if config.heldout else None
    for d in datasets + ([heldout] if heldout else []):
        log(f"dataset {d.name}: {len(d.calibration)} calibration, {len(d.test)} test windows")

    if not results.get("dense"):
        test_sets = {d.name: d.test for d in datasets}
        if heldout is not None:
            test_sets[f"heldout:{heldout.name}"] = heldout.test
        results["dense"] = perplexities(lm, test_sets, device=config.device,
                                        batch_size=config.batch_size,
                                        offload_activations=config.offload_activations,
                                        desc="dense evaluate")
        log("dense: " + ", ".join(f"{k} {v:.2f}" for k, v in results["dense"].items()))
        _write_json(results_path, results)

    for spec in config.runs:
        if spec.label in done:
            log(f"{spec.label}: done before, skipped")
            continue
        log(f"{spec.label}:")
        on_gpu = torch.device(config.device).type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(config.device)
        with HostPeak(interval=0.05) as host:
            run = run_continual(lm, None, datasets, spec, heldout=heldout,
                                device=config.device, batch_size=config.batch_size,
                                offload_activations=config.offload_activations,
                                scratch_dir=out_dir, log=log)
        # this run's own peaks (the process's resident memory includes what all runs share:
        # libraries, embeddings and head, the token windows)
        run["peak_host_mb"] = host.peak / 2**20
        if on_gpu:
            run["peak_device_mb"] = torch.cuda.max_memory_allocated(config.device) / 2**20
        history = run.pop("history")
        if history:
            state_name = "state-" + "".join(c if c.isalnum() else "_" for c in spec.label) + ".safetensors"
            save_state(out_dir / state_name, history, state_metadata(
                Path(model_dir).resolve(), run["datasets"], spec,
                num_calibration=spec.num_calibration or config.num_calibration,
                seq_len=config.seq_len, seed=config.seed))
            run["state_file"] = state_name
        results["runs"].append(run)
        results["peak_rss_mb"] = max(results["peak_rss_mb"], peak_resident_bytes() / 2**20)
        _write_json(results_path, results)

    results["environment"] = environment()
    results["peak_rss_mb"] = max(results["peak_rss_mb"], peak_resident_bytes() / 2**20)
    _write_json(results_path, results)
    report = write_report(results, out_dir)
    print_summary(results, log)
    log(f"\nresults {results_path}\nreport {report}")
    return results
