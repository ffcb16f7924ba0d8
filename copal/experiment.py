"""A whole continual experiment from a small config: open the model and load the data once,
evaluate the dense model, run each (method, protocol, pattern), write the report and plots.

Nothing finished is lost, and nothing stale is reported as done:

- every finished run is keyed by what determines its numbers: the model's fingerprint (its
  weights and architecture), a digest of every dataset's calibration and test windows, the
  dtype, the device type, the batch size, and the run's own spec. A rerun into the same output
  skips the runs whose key matches (and says so), keeps the finished runs its config no longer
  names, and refuses an output whose results were made with other data, model or settings
  unless ``overwrite`` (which then clears this project's files there, and nothing else);
- each run saves every finished step (:class:`copal.continual.RunStore`, under
  ``.copal-progress/`` in the output), so a run that is killed resumes from its last finished
  step with the same numbers;
- results.json and the report are rewritten after every step, with the unfinished run's steps
  so far, so an interrupted experiment leaves a report of what finished.

The model is streamed from its checkpoint block by block, like ``copal prune``: the host never
holds it whole.
"""

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from transformers import AutoTokenizer

from .assets import SMOLLM2_NAME, resolve_model
from . import distributed
from .atomic import write_atomically
from .checkpoint import CheckpointError
from .continual import RunSpec, RunStore, run_continual, state_metadata
from .data import SOURCES, check_window_counts, make_dataset, source_name, windows_digest
from .evaluate import perplexities
from .hessian import hessian_dir, hessian_id
from .methods import Pattern
from .model import LayeredModel, check_execution, resolve_dtype
from .outputs import OutputError, probe_writable, refuse_dangerous, replace_directory
from .phases import HostPeak, peak_resident_bytes
from .report import is_report, plot_files, print_summary, write_report
from .state import is_state_file, save_state
from copal_kernels.machine import environment

try:
    import fcntl
except ImportError:  # not on Windows: two experiments in one directory are then not detected
    fcntl = None

RESULTS_FORMAT = "copal-results/2"
PROGRESS_DIR = ".copal-progress"


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

    def __post_init__(self):
        kinds = {str: "a string", int: "an integer", bool: "true or false"}
        for key, kind in (("model", str), ("device", str), ("dtype", str), ("seed", int),
                          ("offload_activations", bool)):
            value = getattr(self, key)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"config: {key} must be {kinds[kind]}, got {value!r}")
        if not isinstance(self.sources, list) or not all(isinstance(s, str) for s in self.sources):
            raise ValueError(f"config: sources must be a list of names or paths, got {self.sources!r}")
        if self.heldout is not None and not isinstance(self.heldout, str):
            raise ValueError(f"config: heldout must be a name or a path, got {self.heldout!r}")
        if not self.sources:
            raise ValueError("config: sources is empty")
        # file sources by where they are, so one file named two ways is one source
        self.sources = [source_name(s) for s in self.sources]
        self.heldout = source_name(self.heldout) if self.heldout else None
        if len(set(self.sources)) != len(self.sources) or self.heldout in self.sources:
            raise ValueError("config: every source (and the held-out one) must be named once")
        check_window_counts(num_calibration=self.num_calibration, num_test=self.num_test,
                            seq_len=self.seq_len)
        for key in ("num_calibration", "num_test"):
            if getattr(self, key) < 1:
                raise ValueError(f"config: {key} must be at least 1")
        if not self.runs:
            raise ValueError("config: no runs")
        labels = [run.label for run in self.runs]
        if len(set(labels)) != len(labels):
            raise ValueError("config: two runs with the same label (the same run twice)")
        for run in self.runs:
            if run.num_calibration and run.num_calibration > self.num_calibration:
                raise ValueError(f"config: run {run.label!r} asks for {run.num_calibration} "
                                 f"windows; the datasets have num_calibration = "
                                 f"{self.num_calibration}")
            if run.options is not None:
                run.options.check_steps(len(self.sources))

    @classmethod
    def from_dict(cls, data: dict, base: Optional[Path] = None) -> "ExperimentConfig":
        """``base``: the folder that relative paths (model, sources, held-out) are relative to
        (a config file's folder); None: the working directory."""
        data = dict(data)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        if "runs" in data:
            if not isinstance(data["runs"], list) or not all(isinstance(r, dict) for r in data["runs"]):
                raise ValueError("runs must be a list of tables ([[runs]] in TOML, a list of "
                                 "objects in JSON)")
            data["runs"] = [RunSpec.from_dict(run) for run in data["runs"]]
        if base is not None:
            if data.get("model", SMOLLM2_NAME) != SMOLLM2_NAME:
                data["model"] = _from(base, data["model"])
            if "sources" in data:
                data["sources"] = [s if s in SOURCES else _from(base, s) for s in data["sources"]]
            if data.get("heldout") and data["heldout"] not in SOURCES:
                data["heldout"] = _from(base, data["heldout"])
        return cls(**data)

    @classmethod
    def load(cls, path) -> "ExperimentConfig":
        """A TOML or JSON file; relative paths in it are relative to its folder."""
        path = Path(path)
        if path.suffix not in (".toml", ".json"):
            raise ValueError(f"config {path}: a .toml or .json file, please")
        try:
            text = path.read_text()
        except OSError as error:
            raise ValueError(f"config {path}: cannot read it ({error.strerror or error})") from None
        try:
            if path.suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except ValueError as error:
            raise ValueError(f"config {path}: not valid {path.suffix.lstrip('.') or 'JSON'} "
                             f"({error})") from None
        try:
            return cls.from_dict(data, base=path.resolve().parent)
        except (TypeError, ValueError) as error:
            raise ValueError(f"config {path}: {error}") from None

    def to_dict(self) -> dict:
        data = {key: getattr(self, key) for key in self.__dataclass_fields__}
        data["runs"] = [run.to_dict() for run in self.runs]
        return data


def _from(base: Path, value: str) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


# the config keys that the numbers depend on (with the identity's fingerprints); results made
# with other values are not mixed in
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
            "unfinished": parts[0].get("unfinished") if len(parts) == 1 else None,
            "peak_rss_mb": max(part.get("peak_rss_mb", 0.0) for part in parts)}


def _slug(label: str) -> str:
    readable = "".join(c if c.isalnum() else "_" for c in label)
    return f"{readable}-{hashlib.sha256(label.encode()).hexdigest()[:6]}"


def _run_key(identity: dict, spec: RunSpec) -> str:
    text = json.dumps({"identity": identity, "spec": spec.to_dict()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _differences(previous: dict, config: dict, identity: dict) -> List[str]:
    """What differs between a results.json and this experiment, in words."""
    if previous.get("format") != RESULTS_FORMAT:
        return ["written by an older copal, without fingerprints of its data and model"]
    found = [f"{key} {previous['config'].get(key)!r} -> {config[key]!r}" for key in RESULT_KEYS
             if previous["config"].get(key) != config[key]]
    windows_changed = bool(found)  # then the windows' digests differ anyway
    old = previous.get("identity", {})
    if old.get("model_fingerprint") != identity["model_fingerprint"]:
        found.append("the model's weights or architecture (fingerprint)")
    old_data, new_data = old.get("data", {}), identity["data"]
    if not windows_changed:
        found += [f"the windows of {name} (its text or the tokenizer changed)"
                  for name in new_data if name in old_data and old_data[name] != new_data[name]]
    for key in ("dtype", "device", "batch_size"):
        if old.get(key) != identity[key]:
            found.append(f"{key} {old.get(key)!r} -> {identity[key]!r}")
    return found


LOCK_NAME = ".copal-experiment.lock"


def read_results(directory) -> Optional[dict]:
    """The results.json that ``copal experiment`` wrote in ``directory``, or None (none there,
    or a file of that name that is not copal's)."""
    try:
        results = json.loads((Path(directory) / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(results, dict) and isinstance(results.get("config"), dict) \
            and isinstance(results.get("runs"), list):
        return results
    return None


def _is_ours(out: Path) -> bool:
    """An output directory that copal experiment made: its results.json, or nothing but the
    lock and the progress of a run killed before its first results."""
    return read_results(out) is not None or all(
        p.name in (LOCK_NAME, PROGRESS_DIR) for p in out.iterdir())


# what `copal experiment` writes into its output directory: all that --overwrite removes
def _own_files(out: Path) -> List[Path]:
    names = ["results.json", "report.md", PROGRESS_DIR, *plot_files()]
    states = [p for p in sorted(out.glob("state-*.safetensors")) if is_state_file(p)]
    return [out / n for n in names if (out / n).exists()] + states + [
        hessian_dir(p) for p in states if hessian_dir(p).is_dir()]


class _ExperimentLock:
    """One experiment at a time per output directory (an flock, released by the kernel when the
    process dies, even by SIGKILL)."""

    def __init__(self, out: Path):
        self.handle = open(out / LOCK_NAME, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.handle.close()
                raise OutputError(f"{out}: another copal experiment is writing there now") from None

    def close(self):
        self.handle.close()


def _check_out(out_dir, model_dir: Path) -> Path:
    """The output directory, checked (not created: that waits until the inputs are checked):
    never a place :func:`copal.outputs.refuse_dangerous` refuses, nor inside the model; if it
    exists and is not empty, it must hold copal's own results (then they are resumed)."""
    out = refuse_dangerous(out_dir, "--out")
    model = Path(model_dir).resolve()
    if out == model or model in out.parents:
        raise OutputError(f"--out {out_dir} lies inside the model {model_dir}; choose a "
                          "directory outside it")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"--out {out_dir} is a file, not a directory")
        if not _is_ours(out):
            raise OutputError(f"--out {out_dir} is not empty and holds no results of copal "
                              "experiment; choose a new or empty directory")
    probe_writable(out, "--out")
    return out


def check_report_dir(path) -> Path:
    """Where ``copal report --out`` may write: a new or empty directory, a results directory of
    copal experiment, or one holding a report that copal wrote (OutputError otherwise)."""
    out = refuse_dangerous(path, "--out")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"--out {path} is a file, not a directory")
        if any(out.iterdir()) and not _is_ours(out) and not is_report(out / "report.md"):
            raise OutputError(f"--out {path} is not empty and holds no report or results of "
                              "copal; choose a new or empty directory")
    probe_writable(out, "--out")
    return out


def run_experiment(config: ExperimentConfig, out_dir, *, overwrite: bool = False,
                   log=print) -> dict:
    """Run every run of ``config``; results in ``out_dir``/results.json, report.md, plots, and
    one COPAL state file per COPAL run. Returns the results.

    Raises, before any work: ValueError (settings), OutputError (``out_dir``: not writable,
    another experiment writing there, results made with other settings without
    ``overwrite``), CheckpointError, DataError. Interrupted (KeyboardInterrupt, SIGTERM through
    the CLI), it writes results.json and the report of what finished, then re-raises."""
    check_execution(device=config.device, dtype=config.dtype, batch_size=config.batch_size,
                    offload_activations=config.offload_activations)
    model_dir = distributed.from_writer(lambda: resolve_model(config.model, progress=log))
    out = distributed.from_writer(lambda: _check_out(out_dir, model_dir))
    distributed.check_shared_folder(out)
    return _run(config, out, model_dir, overwrite, log)


def _run(config: ExperimentConfig, out: Path, model_dir: Path, overwrite: bool, log) -> dict:
    log(f"model {model_dir}")
    dtype = resolve_dtype(config.dtype, config.device)
    lm = LayeredModel.from_checkpoint(model_dir, dtype=dtype)
    for spec in config.runs:
        lm.check_pattern(Pattern.parse(spec.pattern))
    lm.check_seq_len(config.seq_len)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{model_dir}: no usable tokenizer ({error})") from None
    windows = dict(num_calibration=config.num_calibration, num_test=config.num_test,
                   seq_len=config.seq_len, seed=config.seed)
    datasets = [make_dataset(source, tokenizer, **windows) for source in config.sources]
    heldout = make_dataset(config.heldout, tokenizer, **windows) if config.heldout else None
    for d in datasets + ([heldout] if heldout else []):
        log(f"dataset {d.name}: {len(d.calibration)} calibration, {len(d.test)} test windows")
    identity = {"model_fingerprint": lm.fingerprint(),
                "data": {d.name: windows_digest(d) for d in datasets + ([heldout] if heldout else [])},
                "dtype": str(dtype).removeprefix("torch."),
                "device": torch.device(config.device).type, "batch_size": config.batch_size}

    if not distributed.is_writer():  # rank 0 writes everything (copal.distributed)
        return _continue(config, out, lm, identity, datasets, heldout, model_dir, overwrite, log)
    out.mkdir(parents=True, exist_ok=True)
    lock = _ExperimentLock(out)
    try:
        return _continue(config, out, lm, identity, datasets, heldout, model_dir, overwrite, log)
    finally:
        lock.close()


def _continue(config, out, lm, identity, datasets, heldout, model_dir, overwrite, log) -> dict:
    """The experiment from its dense perplexities on, with the output directory locked."""
    config_dict = config.to_dict()
    results_path = out / "results.json"
    results = {"format": RESULTS_FORMAT, "config": config_dict, "identity": identity,
               "environment": environment(), "runs": [], "peak_rss_mb": 0.0}
    previous = distributed.from_writer(
        lambda: _previous_results(results_path, out, config_dict, identity, overwrite, log))
    if previous is not None:
        results.update(runs=previous["runs"], dense=previous.get("dense"),
                       peak_rss_mb=previous.get("peak_rss_mb", 0.0))
    labels = {spec.label for spec in config.runs}
    for run in results["runs"]:
        if run["label"] not in labels:
            log(f"kept: {run['label']} (finished before; not in this config)")
    keys = {_slug(spec.label) for spec in config.runs}
    for progress in sorted((out / PROGRESS_DIR).glob("*/progress.json")):
        if progress.parent.name not in keys:
            log(f"kept: the unfinished steps in {progress.parent} (a run not in this config; add "
                "it back to resume it, or delete the folder)")

    def save(unfinished=None):
        if not distributed.is_writer():
            return
        results["environment"] = environment()
        results["peak_rss_mb"] = max(results["peak_rss_mb"], peak_resident_bytes() / 2**20)
        results["unfinished"] = unfinished
        _write_json(results_path, results)
        write_report(results, out)

    try:
        if not results.get("dense"):
            test_sets = {d.name: d.test for d in datasets}
            if heldout is not None:
                test_sets[f"heldout:{heldout.name}"] = heldout.test
            results["dense"] = perplexities(lm, test_sets, device=config.device,
                                            batch_size=config.batch_size,
                                            offload_activations=config.offload_activations,
                                            desc="dense evaluate")
            log("dense: " + ", ".join(f"{k} {v:.2f}" for k, v in results["dense"].items()))
            save()
        done = {run["label"]: run for run in results["runs"]}
        for spec in config.runs:
            key = _run_key(identity, spec)
            if spec.label in done:
                log(f"{spec.label}: done before with the same config, data and model: skipped")
                continue
            log(f"{spec.label}:")
            results["runs"].append(_run_one(spec, key, lm, model_dir, identity, datasets,
                                            heldout, config, out, save, log))
            save()
    except BaseException:
        if results.get("dense"):
            save(results.get("unfinished"))  # what finished stays reported
        raise
    save()
    print_summary(results, log)
    log(f"\nresults {results_path}\nreport {out / 'report.md'}")
    return results


def _previous_results(path: Path, out: Path, config: dict, identity: dict, overwrite: bool, log):
    """The finished runs of an earlier experiment in ``out`` that this one continues, or None;
    results made with other settings are refused, or with ``overwrite`` cleared."""
    if not path.is_file():
        if (out / PROGRESS_DIR).is_dir():  # steps of a run killed before any results.json
            shutil.rmtree(out / PROGRESS_DIR)
        return None
    previous = read_results(out)
    if previous is None:
        raise OutputError(f"{path} is not a results.json of copal experiment; choose another --out")
    try:
        differences = _differences(previous, config, identity)
    except (KeyError, TypeError, AttributeError):
        differences = ["its results.json is damaged"]
    if not differences:
        return previous
    if not overwrite:
        raise OutputError(f"{out} holds results made with other settings ({'; '.join(differences)}); "
                          "choose another --out, or pass --overwrite to replace them")
    removed = _own_files(out)
    log(f"--overwrite: removing the earlier results in {out} ({'; '.join(differences)}): "
        + ", ".join(p.name for p in removed))
    for item in removed:
        shutil.rmtree(item) if item.is_dir() else item.unlink()
    return None


def _run_one(spec, key, lm, model_dir, identity, datasets, heldout, config, out, save, log) -> dict:
    store = distributed.writer_first(
        lambda: RunStore(out / PROGRESS_DIR / _slug(spec.label), key, log=log))

    def unfinished():
        return {"label": spec.label, "datasets": [d.name for d in datasets],
                "P": [step["P"] for step in store.steps],
                "heldout": ({"name": heldout.name, "ppl": [s["heldout"] for s in store.steps]}
                            if heldout is not None else None)}

    def on_commit():
        store.notes["peak_host_mb"] = max(host.peak / 2**20, store.notes.get("peak_host_mb", 0.0))
        save(unfinished())

    store.on_commit = on_commit
    on_gpu = torch.device(config.device).type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(config.device)
    with HostPeak(interval=0.05) as host:
        try:
            run = run_continual(lm, None, datasets, spec, heldout=heldout, device=config.device,
                                batch_size=config.batch_size,
                                offload_activations=config.offload_activations, store=store,
                                log=log)
        except BaseException:
            save(unfinished() if store.steps else None)
            raise
    # this run's own peaks (the process's resident memory includes what all runs share:
    # libraries, embeddings and head, the token windows)
    run["peak_host_mb"] = max(host.peak / 2**20, store.notes.get("peak_host_mb", 0.0))
    if on_gpu:
        run["peak_device_mb"] = torch.cuda.max_memory_allocated(config.device) / 2**20
    run["key"] = key
    history, hessians = run.pop("history"), run.pop("hessian_dir")
    if spec.method == "copal" and distributed.is_writer():
        state_name = f"state-{_slug(spec.label)}.safetensors"
        written = None
        if hessians is not None and hessians.exists():  # the OBS variant's blocks: beside it
            written = hessian_id(hessians)
            replace_directory(hessians, hessian_dir(out / state_name))
        save_state(out / state_name, history, state_metadata(
            Path(model_dir).resolve(), identity["model_fingerprint"], run["datasets"],
            spec.options, Pattern.parse(spec.pattern),
            num_calibration=spec.num_calibration or config.num_calibration,
            seq_len=config.seq_len, seed=config.seed, dtype=identity["dtype"],
            batch_size=config.batch_size, hessian_id=written))
        run["state_file"] = state_name
    store.close()
    if distributed.is_writer() and not any(store.directory.parent.iterdir()):
        store.directory.parent.rmdir()
    return run
