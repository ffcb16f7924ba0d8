"""Does keeping COPAL's second-order state in bf16 or fp16 on disk change the masks or the
perplexity? (docs/reconstruction.md, "Size").

A finished run's state holds, per block, the Gram sums ``G_{<=t}`` that its last step pruned
with. This re-prunes the dense model from that state, block by block, three times: with the
Grams as stored (fp32); rounded to bf16 and back; and divided by their token counts, rounded to
fp16 and back (the raw sums can exceed fp16's range, 65504: such entries are counted). That is
what a half-size copy would give the next step. Then it counts the mask entries that differ from the fp32 re-prune, the
relative change of the pruned weights, and evaluates each on the run's test windows. The fp32
re-prune is the run's own last model: its perplexities equal the last row of the run's P matrix
when both ran with the same number of threads (the test checks it to 1e-6; with another thread
count the arithmetic's last bits, and near-tied choices, move: the gap is recorded, and over
1e-2 the benchmark stops).

This is an upper bound on a half-precision copy's effect: a real step would add its own
fresh fp32 Gram to the rounded past sum, where here the whole sum is rounded.

    python -m benchmarks.hessian_storage runs/reconstruction-standard \
        --state state-copal_obs_tokens__continual_2_4-ad6fcc.safetensors

Appends a record (machine, versions, date) to benchmarks/results/hessian_storage.jsonl, or to
``--out``/hessian_storage.jsonl.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from copal.evaluate import perplexities
from copal.hessian import block_file, hessian_dir
from copal.methods import CopalOptions, Pattern, obs_prune
from copal.model import LayeredModel

from copal_kernels.machine import environment

try:
    from .common import RESULTS_DIR
except ImportError:  # run as a script
    from common import RESULTS_DIR

# name: (the dtype on disk, whether the sum G is stored divided by its token count N)
STORAGE = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False),
           "fp16 of G/N": (torch.float16, True)}


def reprune(lm: LayeredModel, directory: Path, pattern: Pattern, options: CopalOptions):
    """{storage: [pruned block state per block]} and {storage: (mask entries differing from
    fp32, relative Frobenius change of the pruned weights from fp32's)} over the model."""
    states = {name: [] for name in STORAGE}
    flips = {name: 0 for name in STORAGE}
    fp16_overflow = 0  # entries of G beyond fp16's range (65504): the raw sum cannot be fp16
    change = {name: [0.0, 0.0] for name in STORAGE}  # ||W_s - W_fp32||^2, ||W_fp32||^2
    entries = 0
    for index in range(lm.num_blocks):
        started = time.perf_counter()
        dense = lm.read_block_state(index)
        with safe_open(str(block_file(directory, index)), framework="pt") as handle:
            groups = json.loads(handle.metadata()["inputs"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        block = {name: dict(dense) for name in STORAGE}
        for owner, names in groups.items():
            gram, total = tensors[f"{owner}.gram"], float(tensors[f"{owner}.total"])
            fp16_overflow += int((gram.abs() > torch.finfo(torch.float16).max).sum())
            for storage, (dtype, normalised) in STORAGE.items():
                if normalised:
                    hessian = (gram / total).to(dtype).to(torch.float32) * 2.0
                else:
                    hessian = gram.to(dtype).to(torch.float32) * (2.0 / total)
                for name in names:
                    block[storage][f"{name}.weight"] = obs_prune(
                        dense[f"{name}.weight"], hessian, pattern, block_size=options.block_size,
                        dampening=options.dampening, layer=f"block {index} {name} ({storage})")
        for name in (n for names in groups.values() for n in names):
            reference = block["fp32"][f"{name}.weight"]
            entries += reference.numel()
            for storage in STORAGE:
                weight = block[storage][f"{name}.weight"]
                flips[storage] += int(((weight == 0) != (reference == 0)).sum())
                change[storage][0] += float((weight - reference).double().pow(2).sum())
                change[storage][1] += float(reference.double().pow(2).sum())
        for storage in STORAGE:
            states[storage].append(block[storage])
        print(f"block {index}: re-pruned from the state in {time.perf_counter() - started:.1f} s",
              flush=True)
    stats = {s: {"mask_entries_differing": flips[s], "mask_entries": entries,
                 "relative_weight_change": (change[s][0] / change[s][1]) ** 0.5} for s in STORAGE}
    stats["fp16"] = {"gram_entries_beyond_fp16_range": fp16_overflow}
    return states, stats


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a `copal experiment` output directory")
    parser.add_argument("--state", required=True,
                        help="the COPAL-OBS run's state file in it (its .hessian folder is read)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    results = json.loads((args.run / "results.json").read_text())
    run = next((r for r in results["runs"] if r.get("state_file") == args.state), None)
    if run is None:
        parser.error(f"no run of {args.run} wrote the state {args.state}")
    spec, config = run["spec"], results["config"]
    if config["device"] != "cpu" or results["identity"]["dtype"] != "float32":
        parser.error("the re-prune runs in fp32 on the CPU, so it reproduces only a run made "
                     f"there (this one: {config['device']}, {results['identity']['dtype']})")
    options = CopalOptions.from_dict({key: spec[key] for key in CopalOptions.FIELDS if key in spec})
    if not options.obs:
        parser.error(f"{args.state} is not a state of COPAL's OBS update")
    pattern = Pattern.parse(spec["pattern"])
    directory = hessian_dir(args.run / args.state)

    from transformers import AutoTokenizer

    from copal.assets import resolve_model
    from copal.data import make_dataset

    model = resolve_model(config["model"])
    tokenizer = AutoTokenizer.from_pretrained(model)
    test_sets = {source: make_dataset(source, tokenizer, num_calibration=0,
                                      num_test=config["num_test"], seq_len=config["seq_len"],
                                      seed=config["seed"]).test
                 for source in run["datasets"]}
    lm = LayeredModel.from_checkpoint(model, dtype=torch.float32)
    states, stats = reprune(lm, directory, pattern, options)
    final_row = dict(zip(run["datasets"], run["P"][-1]))
    print(f"fp16: {stats['fp16']['gram_entries_beyond_fp16_range']} entries of the Gram sums lie "
          "beyond fp16's range")
    for storage in STORAGE:
        stats[storage]["perplexity"] = perplexities(
            lm, test_sets, block_states=lambda index: states[storage][index],
            desc=f"evaluate ({storage})")
        print(f"{storage}: {stats[storage]}")
    print(f"the run's last P row: {final_row}")
    gap = max(abs(stats["fp32"]["perplexity"][name] / value - 1) for name, value in final_row.items())
    print(f"fp32 re-prune against the run's last row: {gap:.1e} relative")
    if gap > 1e-2:
        raise SystemExit("the fp32 re-prune is not the run's last model: the comparison would "
                         "mean nothing (another state, or another model?)")
    record = {**environment(), "benchmark": "COPAL OBS second-order state stored in half precision",
              "run": str(args.run), "state": args.state, "label": run["label"],
              "model": config["model"], "windows": f"{config['num_test']}x{config['seq_len']} test",
              "run_final_row": final_row, "fp32_against_run": gap,
              "threads": torch.get_num_threads(), "storage": stats}
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "hessian_storage.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    main()
