"""``copal``: prune, continue, evaluate, run a continual experiment, render a report.

    copal experiment [--config FILE.toml|.json] [--out DIR] [--overwrite]
    copal prune --model DIR --data SOURCE --method wanda --pattern 2:4 --out DIR
    copal continue --state FILE --data SOURCE --out DIR [--model DIR]
    copal evaluate --model DIR --data SOURCE [SOURCE ...]
    copal report DIR [DIR ...] [--out OUT]

Options are never abbreviated, every option is applied or refused, and every error is one line
(``COPAL_TRACEBACK=1`` shows the traceback of an unexpected one).
"""

import argparse
import json
import os
import signal
import sys
import warnings
from pathlib import Path

from copal_kernels import AGGREGATIONS

from .checkpoint import CheckpointError
from .data import DataError
from .methods import (CALIBRATION_INPUTS, DEFAULT_AGGREGATION, DEFAULT_GRADIENT,
                      DEFAULT_NORMALISATION, GRADIENTS, GROUPS, MASK_DEFAULTS, METHODS,
                      NORMALISATIONS, OBS_DEFAULTS, STEP_WEIGHTINGS, WEIGHT_UPDATES, CopalOptions)
from .model import DTYPE_NAMES, UnsupportedModelError
from .outputs import OutputError

COPAL_FLAGS = ("gradient", "aggregation", "normalisation", "group", "step_weights", "weight_update",
               "step_weighting", "dampening", "block_size", "calibration_inputs")
# what an interrupted verb leaves
INTERRUPTED = {
    "prune": "nothing was written",
    "continue": "nothing was written",
    "experiment": "the finished runs and steps are saved; rerun the same command to resume",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line naming the verb (no usage block), and an option
    given twice is an error (argparse would keep the last one silently)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        seen = set()
        for token in sys.argv[1:] if args is None else args:
            option = str(token).split("=", 1)[0]
            if option.startswith("--") and option in self._option_string_actions:
                action = self._option_string_actions[option]
                if not isinstance(action, argparse._AppendAction) and option in seen:
                    self.error(f"{option} is given twice")
                seen.add(option)
        return super().parse_known_args(args, namespace)


def _parser(sub, name, **kwargs):
    return sub.add_parser(name, allow_abbrev=False, **kwargs)


def _common(parser, calibration=True, writes=True):
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--batch-size", type=_batch_size, default=None,
                        help="windows per forward chunk, or auto (default: 1 on a CPU, from free "
                             "memory on a GPU)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                        help="compute dtype (auto: bf16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--offload-activations", action="store_true",
                        help="GPU only: keep activations in pinned host memory between blocks")
    if writes:
        parser.add_argument("--save-dtype", choices=DTYPE_NAMES,
                            help="dtype of the written weights (default: each tensor in the "
                                 "input's own; config.json then names the one given)")
    if calibration:
        parser.add_argument("--num-calibration", type=int, help="calibration windows (default 32)")
        parser.add_argument("--seq-len", type=int, help="tokens per window (default 512)")
        parser.add_argument("--seed", type=int, help="seed of the windows' draw (default 0)")


def _batch_size(text: str):
    return text if text == "auto" else int(text)


_batch_size.__name__ = "batch size (a positive integer or auto)"  # argparse's error names it


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="copal", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    exp = _parser(sub, "experiment", help="run a continual experiment; report and plots")
    exp.add_argument("--config", help="TOML or JSON file (see docs/usage.md; relative paths in it "
                     "are relative to its folder); default: the standard protocol (SmolLM2-135M, "
                     "wiki -> kjv -> jargon, 32 x 512 tokens), 50%%, COPAL against Wanda-restart")
    exp.add_argument("--out", default="runs/main", help="results directory (default runs/main); "
                     "a rerun resumes the runs and steps it finished")
    exp.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                     help="override a config key, e.g. --set num_calibration=8")
    exp.add_argument("--overwrite", action="store_true",
                     help="replace results in --out that were made with other settings, data or "
                          "model (only copal's own files there are removed)")

    prune = _parser(sub, "prune", help="prune a checkpoint with one dataset")
    prune.add_argument("--model", required=True, help="checkpoint directory or smollm2-135m")
    prune.add_argument("--data", help="wiki, kjv, jargon, wikitext2, ptb, c4 or a path to a UTF-8 "
                                      "text file or a folder of .txt files (not for magnitude)")
    prune.add_argument("--method", choices=METHODS, default="wanda")
    prune.add_argument("--pattern", default="50%", help="50%%, 0.6, 2:4, 4:8 (N:M keeps N)")
    prune.add_argument("--gradient", choices=GRADIENTS,
                       help="COPAL only: lm (gradient pass over the dense model) or none (g = 1); "
                            f"default {DEFAULT_GRADIENT}")
    prune.add_argument("--aggregation", choices=AGGREGATIONS,
                       help=f"COPAL only: over steps (default {DEFAULT_AGGREGATION}, chosen by "
                            "the ablations in docs/results.md; METHOD.md writes the sum; sumsq "
                            "sums the squared sensitivities, the saliency under the summed Fishers)")
    prune.add_argument("--normalisation", choices=NORMALISATIONS,
                       help="COPAL only: divide each step's norms by their mean, or keep them raw "
                            f"(none); default {DEFAULT_NORMALISATION}")
    prune.add_argument("--group", choices=GROUPS,
                       help="COPAL, unstructured only: per-row (default) or per-layer comparison "
                            "groups")
    prune.add_argument("--weight-update", choices=WEIGHT_UPDATES,
                       help="COPAL only: none (deploy W0 * M, default) or obs (SparseGPT's OBS "
                            "update of W0 on the Hessian accumulated over every step; "
                            "docs/reconstruction.md)")
    prune.add_argument("--step-weighting", choices=STEP_WEIGHTINGS,
                       help="COPAL obs only: weigh past steps' Hessians by their tokens "
                            "(default) or each dataset alike")
    prune.add_argument("--dampening", type=float,
                       help="COPAL obs only: fraction of the mean Hessian diagonal added to it "
                            "(default 0.01, SparseGPT's)")
    prune.add_argument("--obs-block-size", type=int, dest="block_size",
                       help="COPAL obs only: columns per OBS block (default 128, SparseGPT's)")
    prune.add_argument("--step-weights", choices=["linear"],
                       help="COPAL only: linear weighs step s by s (recent datasets more; "
                            "default: all alike); fixed lists go in an experiment's config")
    prune.add_argument("--calibration-inputs", choices=CALIBRATION_INPUTS,
                       help="COPAL obs only: calibrate each block on the inputs of the blocks "
                            "below as pruned by this step (default, SparseGPT's sequential "
                            "calibration) or as dense (docs/reconstruction.md)")
    prune.add_argument("--out", required=True)
    prune.add_argument("--state-out", help="COPAL only: the state file (default "
                                           "OUT/copal-state.safetensors)")
    prune.add_argument("--overwrite", action="store_true",
                       help="replace an output that copal wrote (never anything else)")
    _common(prune)

    cont = _parser(sub, "continue", help="add a dataset to a COPAL-pruned model from its state")
    cont.add_argument("--state", required=True)
    cont.add_argument("--data", required=True)
    cont.add_argument("--out", required=True)
    cont.add_argument("--model", help="the dense model, where it is now (default: where the state "
                                      "says); it must be the one the state was made from")
    cont.add_argument("--state-out", help="default OUT/copal-state.safetensors")
    cont.add_argument("--overwrite", action="store_true",
                      help="replace an output that copal wrote (never anything else)")
    _common(cont, calibration=False)
    cont.set_defaults(dtype=None)  # the state's; another one is refused

    ev = _parser(sub, "evaluate", help="perplexity of a checkpoint on test windows")
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", nargs="+", required=True)
    ev.add_argument("--num-test", type=int, default=32)
    ev.add_argument("--seq-len", type=int, default=512)
    _common(ev, calibration=False, writes=False)

    rep = _parser(sub, "report", help="render report.md and plots from results directories")
    rep.add_argument("directories", nargs="+", metavar="directory",
                     help="results directories of `copal experiment`; several are merged (same "
                          "model and test windows), e.g. a sweep split over configs")
    rep.add_argument("--out", help="where the report goes (default: the one directory given; "
                                   "required with several)")
    return parser


def _prune(args):
    from .api import prune_checkpoint

    flags = {key: getattr(args, key) for key in COPAL_FLAGS if getattr(args, key) is not None}
    if flags and args.method != "copal":
        raise ValueError(f"{', '.join(option_flag(key) for key in flags)}: COPAL option(s), "
                         f"which --method {args.method} does not take")
    update = flags.get("weight_update", "none")
    other = [key for key in flags if key in (MASK_DEFAULTS if update == "obs" else OBS_DEFAULTS)]
    if other:  # even at their defaults: a flag given is honoured or refused
        raise ValueError(f"{', '.join(option_flag(key) for key in other)}: option(s) of COPAL's "
                         f"{'mask-only' if update == 'obs' else 'OBS'} variant, which "
                         f"--weight-update {update} does not take")
    prune_checkpoint(args.model, args.data, args.out, method=args.method, pattern=args.pattern,
                     options=CopalOptions(**flags) if args.method == "copal" else None,
                     num_calibration=args.num_calibration, seq_len=args.seq_len, seed=args.seed,
                     device=args.device, batch_size=args.batch_size, dtype=args.dtype,
                     offload_activations=args.offload_activations, state_out=args.state_out,
                     overwrite=args.overwrite, save_dtype=args.save_dtype)


def option_flag(key: str) -> str:
    """The CLI flag that sets CopalOptions field ``key``."""
    return "--obs-block-size" if key == "block_size" else "--" + key.replace("_", "-")


def _experiment(args):
    from .experiment import ExperimentConfig, run_experiment

    config = ExperimentConfig.load(args.config) if args.config else ExperimentConfig()
    if args.set:
        data = config.to_dict()
        for item in args.set:
            key, _, value = item.partition("=")
            try:
                data[key] = json.loads(value)
            except ValueError:
                raise ValueError(f"--set {item}: the value is not JSON (strings need quotes: "
                                 f"{key}='\"...\"')") from None
        config = ExperimentConfig.from_dict(data)
    device = _join_group(config.device)
    if device != config.device:
        config = ExperimentConfig.from_dict(dict(config.to_dict(), device=device))
    run_experiment(config, args.out, overwrite=args.overwrite)


def _report(args):
    from .distributed import launched
    from .experiment import check_report_dir, merge_results, read_results
    from .report import print_summary, write_report

    if launched():
        raise ValueError("copal report renders files and runs in one process, not under torchrun")
    if len(args.directories) > 1 and not args.out:
        raise ValueError("several results directories need --out for the merged report")
    parts = []
    for directory in args.directories:
        results = read_results(directory)
        if results is None:
            raise FileNotFoundError(f"{Path(directory) / 'results.json'}: no results of "
                                    "`copal experiment`")
        parts.append(results)
    out = check_report_dir(args.out) if args.out else Path(args.directories[0])
    results = merge_results(parts)
    print_summary(results)
    print(f"report {write_report(results, out)}")


def _join_group(device: str) -> str:
    """Under torchrun: join the process group and leave the printing to rank 0; returns the
    device this rank computes on (copal.distributed). Alone: ``device`` as it is."""
    from . import distributed

    if not distributed.launched():
        return device
    device = str(distributed.setup(device))
    if not distributed.is_writer():
        sys.stdout = open(os.devnull, "w")
    return device


def _run(args):
    if args.command in ("prune", "continue", "evaluate"):
        args.device = _join_group(args.device)
    if args.command == "experiment":
        _experiment(args)
    elif args.command == "prune":
        _prune(args)
    elif args.command == "continue":
        from .api import continue_checkpoint

        continue_checkpoint(args.state, args.data, args.out, model=args.model, device=args.device,
                            batch_size=args.batch_size, dtype=args.dtype,
                            offload_activations=args.offload_activations,
                            state_out=args.state_out, overwrite=args.overwrite,
                            save_dtype=args.save_dtype)
    elif args.command == "evaluate":
        from .api import evaluate_checkpoint

        result = evaluate_checkpoint(args.model, args.data, num_test=args.num_test,
                                     seq_len=args.seq_len, device=args.device,
                                     batch_size=args.batch_size or "auto", dtype=args.dtype,
                                     offload_activations=args.offload_activations)
        print(json.dumps(result, indent=1, allow_nan=False))
    elif args.command == "report":
        _report(args)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so every verb cleans up what it started."""


def _terminate(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def _warning_line(message, category, filename, lineno, line=None):
    return f"copal: warning: {message}\n"


def main(argv=None) -> int:
    warnings.formatwarning = _warning_line
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # blamed on the verb they were given to, not on `copal`
        verbs = parser._subparsers._group_actions[0].choices
        verbs[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:  # one line per step when the output goes to a file
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError):
        pass
    handlers = {}
    for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is not None:
            try:
                handlers[signum] = signal.signal(signum, _terminate)
            except ValueError:  # not the main thread: leave signals alone
                pass
    try:
        _run(args)
    except KeyboardInterrupt as stop:
        cause = str(stop) if isinstance(stop, Terminated) else "Ctrl-C"
        print(f"copal {args.command}: interrupted ({cause}); "
              f"{INTERRUPTED.get(args.command, 'stopped')}", file=sys.stderr)
        return 130
    except (CheckpointError, DataError, UnsupportedModelError, OutputError, ValueError,
            OSError) as error:
        if os.environ.get("COPAL_TRACEBACK") == "1":
            raise
        print(f"copal {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:
        if os.environ.get("COPAL_TRACEBACK") == "1":
            raise
        print(f"copal {args.command}: error: {type(error).__name__}: {_one_line(error)} (an unexpected "
              "error: COPAL_TRACEBACK=1 shows where)", file=sys.stderr)
        return 1
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
