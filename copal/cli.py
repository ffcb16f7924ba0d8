"""``copal``: prune, continue, evaluate, run a continual experiment, render a report.

    copal experiment [--config FILE.toml|.json] [--out DIR]
    copal prune --model DIR --data SOURCE --method wanda --pattern 2:4 --out DIR
    copal continue --state FILE --data SOURCE --out DIR
    copal evaluate --model DIR --data SOURCE [SOURCE ...]
    copal report DIR [DIR ...] [--out OUT]
"""

import argparse
import json
import sys
from pathlib import Path

from copal_kernels import AGGREGATIONS

from .checkpoint import CheckpointError
from .data import DataError
from .methods import (DEFAULT_AGGREGATION, DEFAULT_GRADIENT, DEFAULT_NORMALISATION, GRADIENTS,
                      METHODS, NORMALISATIONS)
from .model import UnsupportedModelError


def _common(parser, calibration=True):
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batch-size", type=_batch_size, default="auto",
                        help="windows per forward chunk, or auto (1 on a CPU, from free memory on a GPU)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="compute dtype (auto: bf16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--offload-activations", action="store_true",
                        help="keep activations in pinned host memory between blocks (GPU)")
    if calibration:
        parser.add_argument("--num-calibration", type=int, default=32)
        parser.add_argument("--seq-len", type=int, default=512)
        parser.add_argument("--seed", type=int, default=0)


def _batch_size(text: str):
    return text if text == "auto" else int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="copal", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    exp = sub.add_parser("experiment", help="run a continual experiment; report and plots")
    exp.add_argument("--config", help="TOML or JSON file (see docs/usage.md); default: the "
                     "standard protocol (SmolLM2-135M, wiki -> kjv -> jargon, 32 x 512 tokens), "
                     "50%%, COPAL against Wanda-restart")
    exp.add_argument("--out", default="runs/main", help="results directory (default runs/main)")
    exp.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                     help="override a config key, e.g. --set num_calibration=8")

    prune = sub.add_parser("prune", help="prune a checkpoint with one dataset")
    prune.add_argument("--model", required=True, help="checkpoint directory or smollm2-135m")
    prune.add_argument("--data", required=True, help="wiki, kjv, jargon, wikitext2, ptb, c4 or a path")
    prune.add_argument("--method", choices=METHODS, default="wanda")
    prune.add_argument("--pattern", default="50%", help="50%%, 0.6, 2:4, 4:8 (N:M keeps N)")
    prune.add_argument("--gradient", choices=GRADIENTS, default=DEFAULT_GRADIENT,
                       help="COPAL only: lm (gradient pass over the dense model) or none (g = 1); "
                            f"default {DEFAULT_GRADIENT}")
    prune.add_argument("--aggregation", choices=AGGREGATIONS, default=DEFAULT_AGGREGATION,
                       help=f"COPAL only: over steps (default {DEFAULT_AGGREGATION}, chosen by "
                            "the ablations in docs/results.md; METHOD.md writes the sum; sumsq "
                            "sums the squared sensitivities, the saliency under the summed Fishers)")
    prune.add_argument("--normalisation", choices=NORMALISATIONS, default=DEFAULT_NORMALISATION,
                       help="COPAL only: divide each step's norms by their mean, or keep them raw "
                            f"(none); default {DEFAULT_NORMALISATION}")
    prune.add_argument("--group", choices=["row", "layer"], default="row",
                       help="COPAL, unstructured only: per-row or per-layer comparison groups")
    prune.add_argument("--out", required=True)
    prune.add_argument("--state-out", help="COPAL state file (default OUT/copal-state.safetensors)")
    prune.add_argument("--overwrite", action="store_true")
    _common(prune)

    cont = sub.add_parser("continue", help="add a dataset to a COPAL-pruned model from its state")
    cont.add_argument("--state", required=True)
    cont.add_argument("--data", required=True)
    cont.add_argument("--out", required=True)
    cont.add_argument("--state-out")
    cont.add_argument("--overwrite", action="store_true")
    _common(cont, calibration=False)

    ev = sub.add_parser("evaluate", help="perplexity of a checkpoint on test windows")
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", nargs="+", required=True)
    ev.add_argument("--num-test", type=int, default=32)
    ev.add_argument("--seq-len", type=int, default=512)
    _common(ev, calibration=False)

    rep = sub.add_parser("report", help="render report.md and plots from results directories")
    rep.add_argument("directories", nargs="+", metavar="directory",
                     help="results directories of `copal experiment`; several are merged (same "
                          "model and test windows), e.g. a sweep split over configs")
    rep.add_argument("--out", help="where the report goes (default: the one directory given; "
                                   "required with several)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "experiment":
            from .experiment import ExperimentConfig, run_experiment

            config = ExperimentConfig.load(args.config) if args.config else ExperimentConfig()
            if args.set:
                data = {**config.__dict__}
                data["runs"] = [run.__dict__ for run in config.runs]
                for item in args.set:
                    key, _, value = item.partition("=")
                    data[key] = json.loads(value)
                config = ExperimentConfig.from_dict(data)
            run_experiment(config, args.out)
        elif args.command == "prune":
            from .api import prune_checkpoint

            prune_checkpoint(args.model, args.data, args.out, method=args.method,
                             pattern=args.pattern, num_calibration=args.num_calibration,
                             seq_len=args.seq_len, seed=args.seed, device=args.device,
                             batch_size=args.batch_size, dtype=args.dtype,
                             offload_activations=args.offload_activations, gradient=args.gradient,
                             aggregation=args.aggregation, normalisation=args.normalisation,
                             group=args.group, state_out=args.state_out,
                             overwrite=args.overwrite)
        elif args.command == "continue":
            from .api import continue_checkpoint

            continue_checkpoint(args.state, args.data, args.out, device=args.device,
                                batch_size=args.batch_size, dtype=args.dtype,
                                offload_activations=args.offload_activations,
                                state_out=args.state_out, overwrite=args.overwrite)
        elif args.command == "evaluate":
            from .api import evaluate_checkpoint

            result = evaluate_checkpoint(args.model, args.data, num_test=args.num_test,
                                         seq_len=args.seq_len, device=args.device,
                                         batch_size=args.batch_size, dtype=args.dtype,
                                         offload_activations=args.offload_activations)
            print(json.dumps(result, indent=1))
        elif args.command == "report":
            from .experiment import merge_results
            from .report import print_summary, write_report

            if len(args.directories) > 1 and not args.out:
                raise ValueError("several results directories need --out for the merged report")
            parts = []
            for directory in args.directories:
                path = Path(directory) / "results.json"
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: no results of `copal experiment`")
                parts.append(json.loads(path.read_text()))
            results = merge_results(parts)
            print_summary(results)
            print(f"report {write_report(results, args.out or args.directories[0])}")
    except (CheckpointError, DataError, UnsupportedModelError, ValueError, FileNotFoundError) as error:
        print(f"copal {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
