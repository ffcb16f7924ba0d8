"""The user's verbs as Python functions: prune a checkpoint, continue a COPAL-pruned model with a
new dataset, evaluate; and :class:`ContinualPruner` for a model already in memory.

Every verb checks everything it is given before the model's blocks are read or any output is
created (the options against the method and pattern, the device, the output locations, the
model's tensors and layer widths, the data and its windows), so bad input costs seconds and
leaves nothing. Checkpoints are streamed block by block: read lazily from the input's shards,
written shard by shard into a staging folder that replaces the output only when complete.
"""

import json
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import torch
from transformers import AutoTokenizer

from . import distributed
from .assets import resolve_model
from .checkpoint import CheckpointError, ShardWriter, copy_non_weights
from .cli import option_flag
from .continual import (DenseWeights, RunSpec, copal_method, hessian_state, prune_step,
                        state_metadata)
from .data import check_window_counts, make_dataset, source_name
from .evaluate import perplexities
from .hessian import check_hessian_dir, hessian_dir, step_dir
from .interop import make_portable
from .methods import CopalOptions, LayerHistory, Pattern, SparseGPT, check_obs_pattern, make_method
from .model import DTYPE_NAMES, LayeredModel, check_execution, resolve_dtype
from .outputs import (MARKER, OutputError, WorkDir, check_output_dir, check_output_file,
                      replace_directory, write_marker)
from .semi_structured import sparsity_config
from .state import is_state_file, load_state, save_state
from .sweep import prune_sweep
from copal_kernels.machine import environment

STATE_NAME = "copal-state.safetensors"
# a calibrating method's windows when none are given (PROTOCOL.md's standard protocol)
DEFAULT_WINDOWS = dict(num_calibration=32, seq_len=512, seed=0)


def _tokenizer(model_dir: Path):
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{model_dir}: no usable tokenizer ({error})") from None


def _copal_options(method: str, options: Optional[CopalOptions], pattern: Pattern):
    """COPAL's options for ``method`` (defaults when None), or None; options given to another
    method, or that ``pattern`` cannot honour, are refused."""
    if method != "copal":
        if options is not None:
            raise ValueError(f"COPAL options ({', '.join(CopalOptions.FIELDS)}) apply to "
                             f"--method copal only, not to {method}")
        if method == "sparsegpt":
            check_obs_pattern(pattern, SparseGPT.block_size)
        return None
    options = options or CopalOptions()
    options.check_pattern(pattern)
    if options.fixed_step_weights:
        raise ValueError("fixed step_weights need every step's weight up front; copal prune and "
                         "copal continue take one step at a time (use copal experiment)")
    return options


def _state_target(state_out, out: Path, *, overwrite: bool, protect) -> Path:
    target = out / STATE_NAME if state_out is None else check_output_file(
        state_out, overwrite=overwrite, protect=protect, what="--state-out", is_ours=is_state_file)
    _check_hessian_target(target, overwrite)
    return target


def _check_hessian_target(target: Path, overwrite: bool) -> None:
    """The second-order folder beside a state file to be written may exist only as the blocks
    of the state being replaced (OutputError before any work)."""
    folder = hessian_dir(target)
    if not folder.exists():
        return
    ours = folder.is_dir() and all(p.name.startswith("block-") for p in folder.iterdir())
    if not (ours and overwrite and target.is_file()):
        raise OutputError(f"{folder} exists" + ("" if ours and target.is_file() else
                          " without its state file, or is not copal's") +
                          f"; it would be replaced by the state {target.name}'s second-order "
                          "blocks: choose another path" + (" or pass --overwrite" if ours and
                                                           target.is_file() else ""))


def _check_save_dtype(save_dtype: Optional[str]) -> None:
    if save_dtype is not None and save_dtype not in DTYPE_NAMES:
        raise ValueError(f"save_dtype must be one of {', '.join(DTYPE_NAMES)} (or None: the "
                         f"input's own dtypes), got {save_dtype!r}")


def written_summary(out: Path) -> str:
    """What a written checkpoint holds, for people: pattern, achieved sparsity per layer type,
    the tensors' dtypes (from the shards' headers) and the size on disk."""
    from safetensors import safe_open

    config = json.loads((Path(out) / "config.json").read_text())
    mark, pruning = config["sparsity_config"], config["copal_pruning"]
    dtypes, size = set(), 0
    for shard in sorted(Path(out).glob("*.safetensors")):
        size += shard.stat().st_size
        with safe_open(str(shard), framework="pt") as handle:
            dtypes |= {handle.get_slice(key).get_dtype() for key in handle.keys()}
    layers = ", ".join(f"{name.rpartition('.')[2]} {value:.1%}"
                       for name, value in pruning["sparsity_by_layer_type"].items())
    return (f"  {mark['sparsity_structure']}, {mark['global_sparsity']:.2%} of the block weights "
            f"zero ({layers}); tensors {', '.join(sorted(dtypes))}; {size / 2**20:.1f} MiB")


def mark_config(path: Path, entries: dict) -> None:
    """Add ``entries`` (copal.semi_structured.sparsity_config) to a written config.json."""
    config = json.loads(path.read_text())
    config.update(entries)
    path.write_text(json.dumps(config, indent=2) + "\n")


def _land_state(staged: Path, target: Path) -> None:
    """Move a state written in a work folder onto ``target``: its second-order blocks first (an
    older folder moved aside and removed once the new one is in), then the file. A process
    killed between the two leaves a file and a folder that the state's identifier tells apart:
    refused, never used together (copal.hessian)."""
    if hessian_dir(staged).is_dir():
        replace_directory(hessian_dir(staged), hessian_dir(target))
    os.replace(staged, target)


def _sweep(lm: LayeredModel, windows: torch.Tensor, pruner, pattern: Pattern,
           options: Optional[CopalOptions], history: Dict[str, LayerHistory],
           previous: Optional[Path], step: int, sweep_options: dict):
    """The ``run_sweep`` of :func:`_write_pruned`: ``pruner`` over ``windows``, or for COPAL's
    OBS update a method made with step ``step``'s second-order state (reading ``previous``,
    writing the folder it is given), which it returns."""
    def sweep(done, hessian_target):
        hessians = (hessian_state(options, previous, hessian_target, step)
                    if options is not None and options.obs else None)
        method = pruner if hessians is None else make_method(
            "copal", history=history, grad_norms=None, options=options, hessians=hessians)
        prune_sweep(lm, windows, method, pattern, on_block_done=done, **sweep_options)
        return hessians

    return sweep


def _write_pruned(lm: LayeredModel, model_dir: Path, out: Path, overwrite: bool, run_sweep,
                  provenance: dict, state=None) -> Path:
    """Run ``run_sweep(on_block_done, hessian_target)`` writing each finished block as a shard
    of ``out``, each tensor in the dtype the input stores it in (computations may run in
    another), or every float tensor in ``provenance["save_dtype"]`` when it is set (config.json
    then says so); then copy the input's other files (config, tokenizer, generation config, ...),
    write the provenance marker and ``state`` (``(path, history, metadata, obs)``;
    ``hessian_target``: where the sweep writes the state's second-order blocks when ``obs``,
    else None; the sweep returns their :class:`copal.hessian.HessianState`). A state inside
    ``out`` lands with the checkpoint; one elsewhere is written in a work folder beside its
    target (removed by the next run there if this process is killed) and moved there only once
    the checkpoint has landed, so a failed run neither leaves nor replaces a state.

    In a group of ranks (copal.distributed) only rank 0 writes; the others run the same sweep
    and wait for it to land."""
    if not distributed.is_writer():
        run_sweep(None, None)
        distributed.barrier()
        return out
    writer = ShardWriter(out, lm.num_blocks + 1, overwrite=overwrite, protect=[model_dir])
    pending = None  # a work folder for a state outside the output
    try:
        staged = hessians = None
        if state is not None:
            path, obs = state[0], state[3]
            if path.parent == out or out in path.parents:
                staged = writer.staging / path.relative_to(out)
            else:
                pending = WorkDir(path.parent, f".{path.name}.copal-pending-")
                staged = pending.path / path.name
            hessians = hessian_dir(staged) if obs else None

        save_name = provenance.get("save_dtype")
        save_dtype = getattr(torch, save_name) if save_name else None

        def stored(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
            return {key: tensor.to(save_dtype if save_dtype is not None and
                                   tensor.is_floating_point() else
                                   lm.stored_dtypes.get(key, tensor.dtype))
                    for key, tensor in tensors.items()}

        zeros, totals = defaultdict(int), defaultdict(int)  # per layer type, for the mark
        routers = set()

        def write_block(index, block):
            routers.update(lm.routers(block))
            for name, linear in lm.linears(block).items():
                zeros[name] += int((linear.weight == 0).sum())
                totals[name] += linear.weight.numel()
            writer.write_shard(index, stored(lm.checkpoint_state(index, block)))

        written = run_sweep(write_block, hessians)
        writer.write_shard(lm.num_blocks, stored(lm.outer_state()))

        def save_extra(staging):
            copy_non_weights(model_dir, staging, skip=(MARKER,))
            pattern = provenance["pattern"]
            entries = sparsity_config(pattern if ":" in pattern else "unstructured", zeros,
                                      totals, provenance, routers)
            if save_dtype is not None:  # the keys transformers 5 and 4 read
                entries.update(dtype=provenance["save_dtype"], torch_dtype=provenance["save_dtype"])
            mark_config(staging / "config.json", entries)
            make_portable(staging)
            write_marker(staging, provenance)
            if state is not None:
                metadata = dict(state[2], hessian_id=written.id) if hessians else state[2]
                save_state(staged, state[1], metadata)

        landed = writer.finish(save_extra)
        if pending is not None:
            _land_state(staged, state[0])
        distributed.barrier()
        return landed
    except BaseException:
        writer.abort()
        raise
    finally:
        if pending is not None:
            pending.release()


def _rerun(verb: str, arguments: dict, provenance: dict) -> List[str]:
    """The ``copal`` command line that makes the checkpoint again: ``arguments`` ({flag: value},
    None left out), the options that differ from their defaults, and the execution that ran
    (dtype, batch size, device, save dtype); ``continue`` takes its options from the state.
    Fixed step weights have no flag (an experiment's config takes them): then the command says
    so in its last word."""
    command = ["copal", verb]
    for flag, value in arguments.items():
        if value is not None:
            command += [flag, str(value)]
    options = provenance.get("options") or {} if verb == "prune" else {}  # continue: the state's
    defaults = CopalOptions().to_dict()
    for field, value in options.items():
        if value == defaults[field]:
            continue
        if isinstance(value, list):
            return command + ["#step_weights-needs-an-experiment-config"]
        command += [option_flag(field), str(value)]
    windows = provenance.get("windows") or {}
    if verb == "prune" and provenance.get("method") != "magnitude":
        for key in ("num_calibration", "seq_len", "seed"):
            command += [f"--{key.replace('_', '-')}", str(windows[key])]
        command += ["--batch-size", str(provenance["batch_size"])]
    command += ["--dtype", provenance["dtype"], "--device", provenance["device"]]
    if provenance.get("save_dtype"):
        command += ["--save-dtype", provenance["save_dtype"]]
    return command


def prune_checkpoint(model: str, data: Optional[str], out_dir, *, method: str = "wanda",
                     pattern: str = "50%", options: Optional[CopalOptions] = None,
                     num_calibration: Optional[int] = None, seq_len: Optional[int] = None,
                     seed: Optional[int] = None, device="cpu", batch_size=None, dtype="auto",
                     offload_activations: bool = False, state_out=None, overwrite: bool = False,
                     save_dtype: Optional[str] = None, log=print) -> Path:
    """Prune ``model`` (a checkpoint directory, or ``smollm2-135m``) with ``data``'s calibration
    windows and write the pruned checkpoint to ``out_dir``.

    ``method="copal"`` is step 1 of a continual run: its state goes to ``state_out`` (default
    ``out_dir``/copal-state.safetensors), written before the checkpoint lands; ``options``
    (:class:`CopalOptions`) for COPAL only. ``magnitude`` takes no data and no calibration
    option (``data``, ``num_calibration``, ``seq_len``, ``seed``, ``batch_size`` must be None);
    other methods default to 32 windows of 512 tokens, seed 0. ``offload_activations`` keeps the
    calibration activations in pinned host memory between blocks (GPU only).

    The written tensors keep the input's dtypes (computations run in ``dtype``); ``save_dtype``
    (``float32``, ``bfloat16``, ``float16``) writes every float tensor in that one instead, and
    config.json says so. A summary of what was written is logged (pattern, achieved sparsity per
    layer type, dtypes, size).

    Raises, before any work: ValueError (options), OutputError (``out_dir``, ``state_out``),
    CheckpointError / UnsupportedModelError (the model), DataError (the data)."""
    parsed = Pattern.parse(pattern)
    options = _copal_options(method, options, parsed)
    _check_save_dtype(save_dtype)
    calibration = dict(num_calibration=num_calibration, seq_len=seq_len, seed=seed,
                       batch_size=batch_size)
    if method == "magnitude":
        given = [key for key, value in dict(data=data, **calibration).items() if value is not None]
        if given:
            raise ValueError("magnitude prunes by |W| alone and calibrates on nothing; drop "
                             + ", ".join("--" + key.replace("_", "-") for key in given))
        windows = None
    else:
        if data is None:
            raise ValueError(f"{method} calibrates on data: give a source")
        windows = {key: DEFAULT_WINDOWS[key] if calibration[key] is None else calibration[key]
                   for key in DEFAULT_WINDOWS}
        if windows["num_calibration"] < 1:
            raise ValueError(f"num_calibration must be at least 1, got {windows['num_calibration']}")
        check_window_counts(num_test=0, **{k: windows[k] for k in ("num_calibration", "seq_len")})
    batch_size = "auto" if batch_size is None else batch_size
    check_execution(device=device, dtype=dtype, batch_size=batch_size,
                    offload_activations=offload_activations)
    model_dir = distributed.from_writer(lambda: resolve_model(model, progress=log))
    out = distributed.from_writer(
        lambda: check_output_dir(out_dir, overwrite=overwrite, protect=[model_dir]))
    state_path = None
    if method == "copal":
        state_path = distributed.from_writer(
            lambda: _state_target(state_out, out, overwrite=overwrite, protect=[model_dir]))
    elif state_out is not None:
        raise ValueError("--state-out: only --method copal writes a state")
    lm = LayeredModel.from_checkpoint(model_dir, dtype=resolve_dtype(dtype, device))
    lm.check_pattern(parsed)
    dataset = None
    if windows is not None:
        lm.check_seq_len(windows["seq_len"])
        dataset = make_dataset(data, _tokenizer(model_dir), num_test=0, **windows)
    fingerprint = lm.fingerprint()
    history: Dict[str, LayerHistory] = {}
    if method != "copal":
        pruner = make_method(method)
    else:  # the OBS update's method is made in the sweep, where its state is written
        pruner = None if options.obs else copal_method(lm, history, dataset.calibration, options,
                                                       device=device, batch_size=batch_size)
    datasets = [source_name(data)] if data is not None else []
    execution = dict(dtype=str(lm.dtype).removeprefix("torch."), batch_size=batch_size)
    provenance = dict(verb="prune", method=method, pattern=parsed.exact,
                      options=options.to_dict() if options else None, datasets=datasets,
                      windows=windows, **execution, save_dtype=save_dtype, device=str(device),
                      input=str(Path(model_dir).resolve()), input_fingerprint=fingerprint,
                      environment=environment())
    provenance["rerun"] = _rerun("prune", {
        "--model": provenance["input"], "--data": data, "--out": Path(out_dir).resolve(),
        "--method": method, "--pattern": parsed.exact,
        "--state-out": Path(state_out).resolve() if state_out else None}, provenance)
    state = None
    if method == "copal":
        state = (state_path, history, state_metadata(
            Path(model_dir).resolve(), fingerprint, datasets, options, parsed,
            num_calibration=windows["num_calibration"], seq_len=windows["seq_len"],
            seed=windows["seed"], **execution), options.obs)
    calibration_windows = dataset.calibration if dataset is not None else torch.empty(0, 1)
    log(f"pruning {model_dir} with {method} at {parsed}"
        + (f" on {data} ({len(calibration_windows)} windows of {windows['seq_len']} tokens)"
           if dataset is not None else ""))
    sweep = _sweep(lm, calibration_windows, pruner, parsed, options, history, None, 1,
                   dict(device=device, batch_size=batch_size,
                        offload_activations=offload_activations))
    out = _write_pruned(lm, model_dir, out, overwrite, sweep, provenance, state)
    if state_path is not None:
        log(f"COPAL state {state_path}")
    log(f"pruned checkpoint {out}\n{written_summary(out)}")
    return out


def _check_history_fits(history: Dict[str, LayerHistory], lm: LayeredModel, state) -> None:
    """The state's layers are exactly the model's prunable layers, with their widths."""
    expected = {}
    for index, block in enumerate(lm.blocks):
        for name, linear in lm.linears(block).items():
            expected[f"{index}.{name}"] = (linear.in_features, linear.out_features)
    missing = sorted(set(expected) - set(history))
    extra = sorted(set(history) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{state}: the state's layers do not match the model's {lm.num_blocks} blocks"
            + (f"; the model's {missing[0]} (and {len(missing) - 1} more) is not in it" if missing else "")
            + (f"; its {extra[0]} (and {len(extra) - 1} more) is not in the model" if extra else ""))
    for key, (in_features, out_features) in expected.items():
        layer = history[key]
        if any(v.numel() != in_features for v in layer.acts) or any(
                v.numel() != out_features for v in layer.grads):
            raise ValueError(f"{state}: layer {key} has vectors of another width than the model's "
                             f"[{out_features}, {in_features}]")


def continue_checkpoint(state: str, data: str, out_dir, *, model: Optional[str] = None,
                        device="cpu", batch_size=None, dtype=None,
                        offload_activations: bool = False, state_out=None,
                        overwrite: bool = False, save_dtype: Optional[str] = None,
                        log=print) -> Path:
    """Add dataset ``data`` to a COPAL run from its saved state alone (no past data): masks are
    recomputed from the dense model with the importance of every step.

    The dense model is the one the state names, or ``model`` (where it is now); either way its
    fingerprint (weights and architecture) must be the state's, and the state's layers must be
    the model's. The pattern, options, window definition, compute dtype and batch size come from
    the state: ``dtype`` (None: the state's) must be the state's, a ``batch_size`` other than
    the state's is taken and said (its rounding may move near-tied weights, docs/usage.md).
    Raises, before any work: ValueError, OutputError, CheckpointError, DataError."""
    _check_save_dtype(save_dtype)
    history, meta = load_state(state)
    if dtype is not None and str(resolve_dtype(dtype, device)).removeprefix("torch.") != meta["dtype"]:
        raise ValueError(f"{state}: its steps computed in {meta['dtype']}; continuing in "
                         f"{resolve_dtype(dtype, device)} would mix precisions (drop --dtype)")
    dtype = meta["dtype"]
    if batch_size is None:
        batch_size = meta["batch_size"]
    elif batch_size != meta["batch_size"]:
        log(f"note: batch size {batch_size} where the state's steps used {meta['batch_size']}")
    check_execution(device=device, dtype=dtype, batch_size=batch_size,
                    offload_activations=offload_activations)
    if isinstance(meta["step_weights"], list):
        raise ValueError(f"{state}: made with fixed step weights lambda={meta['step_weights']} "
                         "for its steps; continuing it would need one more, which copal "
                         "continue does not take")
    options = CopalOptions.from_dict({key: meta[key] for key in CopalOptions.FIELDS})
    pattern = Pattern.parse(meta["pattern"])
    if model is None:
        model_dir = Path(meta["model"])
        if not model_dir.is_dir():
            raise FileNotFoundError(f"the state's dense model {model_dir} is gone; pass --model "
                                    "with where it is now")
    else:
        model_dir = distributed.from_writer(lambda: resolve_model(model, progress=log))
    out = distributed.from_writer(lambda: check_output_dir(
        out_dir, overwrite=overwrite, protect=[model_dir, Path(state)]))
    state_path = distributed.from_writer(lambda: _state_target(
        state_out, out, overwrite=overwrite, protect=[model_dir, Path(state)]))
    lm = LayeredModel.from_checkpoint(model_dir, dtype=resolve_dtype(dtype, device))
    lm.check_pattern(pattern)
    lm.check_seq_len(meta["seq_len"])
    previous_hessians = hessian_dir(state) if options.obs else None
    if options.obs:
        check_hessian_dir(previous_hessians, lm.num_blocks, len(meta["datasets"]),
                          options.step_weighting, meta["hessian_id"])
    else:
        _check_history_fits(history, lm, state)
    fingerprint = lm.fingerprint()
    if fingerprint != meta["model_fingerprint"]:
        raise ValueError(f"{model_dir} is not the dense model the state {state} was made from "
                         f"(fingerprint {fingerprint[:12]}, the state's {meta['model_fingerprint'][:12]}); "
                         "pass --model with that model")
    windows = {key: meta[key] for key in ("num_calibration", "seq_len", "seed")}
    dataset = make_dataset(data, _tokenizer(model_dir), num_test=0, **windows)
    step = len(meta["datasets"]) + 1
    pruner = None if options.obs else copal_method(lm, history, dataset.calibration, options,
                                                   device=device, batch_size=batch_size)
    log(f"COPAL step {step} on {data} after {', '.join(meta['datasets'])}")
    meta = dict(meta, datasets=meta["datasets"] + [source_name(data)],
                model=str(Path(model_dir).resolve()), batch_size=batch_size)
    provenance = dict(verb="continue", method="copal", pattern=pattern.exact,
                      options=options.to_dict(), datasets=meta["datasets"], windows=windows,
                      dtype=meta["dtype"], batch_size=batch_size, save_dtype=save_dtype,
                      device=str(device),
                      input=str(Path(model_dir).resolve()), input_fingerprint=fingerprint,
                      state=str(Path(state).resolve()), environment=environment())
    provenance["rerun"] = _rerun("continue", {
        "--state": provenance["state"], "--data": data, "--out": Path(out_dir).resolve(),
        "--model": provenance["input"], "--batch-size": batch_size,
        "--state-out": Path(state_out).resolve() if state_out else None}, provenance)
    sweep = _sweep(lm, dataset.calibration, pruner, pattern, options, history, previous_hessians,
                   step, dict(device=device, batch_size=batch_size,
                              offload_activations=offload_activations))
    out = _write_pruned(lm, model_dir, out, overwrite, sweep, provenance,
                        (state_path, history, meta, options.obs))
    log(f"COPAL state {state_path}\npruned checkpoint {out}\n{written_summary(out)}")
    return out


def evaluate_checkpoint(model: str, sources: List[str], *, num_test: int = 32, seq_len: int = 512,
                        device="cpu", batch_size="auto", dtype="auto",
                        offload_activations: bool = False,
                        tokenizer_from: Optional[str] = None) -> Dict[str, float]:
    """Perplexity of a checkpoint on each source's test windows, streamed block by block.
    Raises ValueError where the model's perplexity is not a number (NaN/Inf logits)."""
    check_window_counts(num_calibration=0, num_test=num_test, seq_len=seq_len)
    if num_test < 1:
        raise ValueError(f"num_test must be at least 1, got {num_test}")
    check_execution(device=device, dtype=dtype, batch_size=batch_size,
                    offload_activations=offload_activations)
    model_dir = distributed.from_writer(lambda: resolve_model(model))
    lm = LayeredModel.from_checkpoint(model_dir, dtype=resolve_dtype(dtype, device))
    lm.check_seq_len(seq_len)
    tokenizer = _tokenizer(Path(tokenizer_from) if tokenizer_from else model_dir)
    tests = {s: make_dataset(s, tokenizer, num_calibration=0, num_test=num_test,
                             seq_len=seq_len).test for s in sources}
    return perplexities(lm, tests, device=device, batch_size=batch_size,
                        offload_activations=offload_activations)


def _check_on_host(model) -> None:
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.device.type != "cpu":
            raise ValueError(
                f"ContinualPruner takes a model held on the host and moves one block at a time to "
                f"its device; {name} is on {tensor.device}. Load the model on the CPU (no "
                "device_map), or prune its checkpoint with prune_checkpoint")


class ContinualPruner:
    """Continual pruning of an in-memory model, one dataset at a time (library use)::

        pruner = ContinualPruner(model, method="copal", pattern="2:4")
        pruner.step(windows_a)          # int64 [n, seq_len] token ids; prunes ``model`` in place
        pruner.step(windows_b)
        pruner.save_state("state.safetensors", datasets=["a", "b"])

    ``model``: a ``PreTrainedModel`` of a supported type (copal.model.SUPPORTED_MODEL_TYPES;
    UnsupportedModelError otherwise) whose tensors are all on the host (ValueError otherwise);
    transformers 5's stacked experts of a mixture-of-experts model are replaced in place by one
    nn.Linear per expert projection, sharing their storage (copal.experts). ``device`` is where
    its blocks are pruned, one at a time. A host copy of its dense weights is kept for every
    protocol but cascade (restart, joint and COPAL start each step from W0); joint also keeps
    every step's windows. COPAL keeps its state. A step that fails restores the model (and the state) to what they were before
    it: it holds a host copy of the weights until it completes.
    """

    def __init__(self, model, *, method: str = "copal", protocol: Optional[str] = None,
                 pattern: str = "50%", options: Optional[CopalOptions] = None, device="cpu",
                 batch_size="auto", offload_activations: bool = False):
        check_execution(device=device, batch_size=batch_size,
                        offload_activations=offload_activations)
        protocol = protocol or ("continual" if method == "copal" else "restart")
        self.spec = RunSpec(method, protocol, pattern, options)
        self.pattern = Pattern.parse(pattern)
        if self.spec.options is not None and self.spec.options.fixed_step_weights:
            raise ValueError("fixed step_weights need every step's weight up front; a "
                             "ContinualPruner takes one step at a time")
        _check_on_host(model)
        self.lm = LayeredModel.from_model(model)
        self.lm.check_pattern(self.pattern)
        self.dense = None if protocol == "cascade" else DenseWeights.snapshot(self.lm)
        self.model_fingerprint = self.lm.fingerprint() if method == "copal" else None
        self.history: Dict[str, LayerHistory] = {}
        # the OBS update's second-order state, one folder per step, in a temporary folder
        self._hessian_root = self._hessian_id = None
        if self.spec.options is not None and self.spec.options.obs:
            self._hessian_root = tempfile.TemporaryDirectory(prefix="copal-hessian-")
        self.joint_windows: List[torch.Tensor] = []  # joint only: every step's windows
        self.steps = 0
        self.window_shape = None
        self.options = dict(device=device, batch_size=batch_size, offload=offload_activations)

    def step(self, windows: torch.Tensor, desc: Optional[str] = None) -> None:
        """Prune the model in place for one more dataset; ``windows``: int64 [n, seq_len] token
        ids of the model's vocabulary. On any error (or interruption) the model and the state
        are as they were before the call."""
        if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[0] == 0 \
                or windows.dtype != torch.long:
            shape = list(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
            raise ValueError(f"windows must be int64 [n >= 1, seq_len], got "
                             f"{getattr(windows, 'dtype', '')} {shape}")
        vocab = self.lm.embed.num_embeddings
        if int(windows.min()) < 0 or int(windows.max()) >= vocab:
            raise ValueError(f"windows hold token ids in [{int(windows.min())}, "
                             f"{int(windows.max())}]; the model's vocabulary is [0, {vocab})")
        check_window_counts(num_calibration=len(windows), num_test=0, seq_len=windows.shape[1])
        self.lm.check_seq_len(windows.shape[1])
        previous = [{k: v.clone() for k, v in self.lm.block_state(i).items()}
                    for i in range(self.lm.num_blocks)]
        lengths = {key: len(layer.acts) for key, layer in self.history.items()}
        hessians = None
        if self._hessian_root is not None:
            hessians = hessian_state(self.spec.options, self._hessian_dir(self.steps) if self.steps
                                     else None, self._hessian_dir(self.steps + 1), self.steps + 1)
        try:
            calibration = torch.cat(self.joint_windows + [windows]) \
                if self.spec.protocol == "joint" else windows
            prune_step(self.lm, self.dense, self.history, calibration, self.pattern, self.spec,
                       desc=desc or f"{self.spec.label} step {self.steps + 1}",
                       hessians=hessians, **self.options)
        except BaseException:
            if hessians is not None:
                shutil.rmtree(hessians.target, ignore_errors=True)
            for key in list(self.history):
                layer = self.history[key]
                if key not in lengths:
                    del self.history[key]
                else:
                    del layer.acts[lengths[key]:], layer.grads[lengths[key]:]
            for block, state in zip(self.lm.blocks, previous):
                block.to("cpu").load_state_dict(state, strict=True)
            raise
        if self.spec.protocol == "joint":
            self.joint_windows.append(windows)
        if hessians is not None:
            if self.steps:
                shutil.rmtree(self._hessian_dir(self.steps))
            self._hessian_id = hessians.id
        self.steps += 1
        self.window_shape = tuple(windows.shape)

    def _hessian_dir(self, step: int) -> Path:
        return step_dir(self._hessian_root.name, step)

    def save_state(self, path, *, datasets: List[str], seed: Optional[int] = None,
                   overwrite: bool = False) -> Path:
        """COPAL's state after the steps so far (``datasets``: their names, in order), written
        atomically; an existing file is replaced only with ``overwrite`` and if it is a state.
        In a group of ranks (copal.distributed) rank 0 writes it (every rank holds the same)."""
        if self.spec.method != "copal" or not self.steps:
            raise ValueError("only a COPAL pruner with at least one step has a state")
        if len(datasets) != self.steps:
            raise ValueError(f"datasets names {len(datasets)} dataset(s) for {self.steps} step(s)")
        return distributed.from_writer(
            lambda: self._write_state(self._state_target(path, overwrite), datasets, seed))

    @staticmethod
    def _state_target(path, overwrite: bool) -> Path:
        target = check_output_file(path, overwrite=overwrite, what="state file",
                                   is_ours=is_state_file)
        _check_hessian_target(target, overwrite)
        return target

    def _write_state(self, target: Path, datasets: List[str], seed: Optional[int]) -> Path:
        metadata = state_metadata(
            getattr(self.lm.model.config, "_name_or_path", ""), self.model_fingerprint, datasets,
            self.spec.options, self.pattern, num_calibration=self.window_shape[0],
            seq_len=self.window_shape[1], seed=seed,
            dtype=str(self.lm.dtype).removeprefix("torch."),
            batch_size=self.options["batch_size"], hessian_id=self._hessian_id)
        if self._hessian_root is None:
            return save_state(target, self.history, metadata)
        pending = WorkDir(target.parent, f".{target.name}.copal-pending-")
        try:
            staged = pending.path / target.name
            shutil.copytree(self._hessian_dir(self.steps), hessian_dir(staged))
            save_state(staged, self.history, metadata)
            _land_state(staged, target)
        finally:
            pending.release()
        return target
