"""One full COPAL step (gradient pass, pruning sweep, propagation, offload) on synthetic LLaMA
shapes, timed per phase against the floors measured in the same run.

SYNTHETIC WEIGHTS (random, seeded): these numbers are speed and memory, never quality.

For each shape and pattern: the step on ``--blocks`` blocks (all of them for the 7B shape) with
``--samples`` x ``--seq`` calibration tokens in bf16. Bigger shapes run a few blocks twice (k and
2k blocks); the full model is projected linearly from the difference, which is the per-block
cost with the fixed costs (embedding, LM head, loss) taken out. The gradient pass runs in rounds
planned (copal.gradients.plan_gradient_pass) for the *full* model with a host budget for kept
block inputs equal to the calibration activations, so the projection includes the re-reads and
recomputation that bounded host memory costs.

Floors, measured here: compute = the step's minimal FLOPs (gradient pass forward + backward,
sweep forward + propagation: 5 forward-equivalents of the blocks, 3 of the head) at the measured
bf16 matmul rate; transfer = the bytes this schedule moves (the gradient pass's block reads,
the sweep reads each block once and writes it back) at the measured host<->device bandwidth. The floor is
the larger of the two (they can overlap).

Run: ``python -m benchmarks.gpu_sweep`` (GPU; under 8 minutes on one H200), writes JSON to $OUT
or benchmarks/results/ and prints a table last. ``--device cpu --shape tiny`` is a smoke run
of the same code on a CPU (its numbers mean nothing).
"""

import argparse
import datetime
import gc
import json
import os
import time
from pathlib import Path

import torch

from copal.gradients import GradientPlan, gradient_norms, plan_gradient_pass, window_input_bytes
from copal.methods import CopalOptions, Pattern, make_method
from copal.phases import HostPeak, PhaseTimer, resident_bytes
from copal.sweep import prune_sweep, release_pinned_cache, resolve_batch_size
from copal.synthetic import SHAPES, SYNTHETIC_LABEL, synthetic_config, synthetic_model
from copal_kernels.machine import environment

try:
    from .common import RESULTS_DIR, median_seconds, print_table
except ImportError:  # run as a script
    from common import RESULTS_DIR, median_seconds, print_table


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    return median_seconds(fn, repeats=3)


def measure_floors(device) -> dict:
    """bf16 matmul FLOP/s and host->device / device->host bytes/s from pinned memory."""
    size = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    matmul = 2 * size ** 3 / _time(lambda: a @ b, device)
    nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    h2d = nbytes / _time(lambda: dev.copy_(host, non_blocking=True), device)
    d2h = nbytes / _time(lambda: host.copy_(dev, non_blocking=True), device)
    return {"matmul_flops": matmul, "h2d_bytes_per_s": h2d, "d2h_bytes_per_s": d2h,
            "matmul_dtype": str(dtype).replace("torch.", "")}


def block_params(config) -> int:
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    return 2 * h * h + 2 * kv * h + 3 * h * i


def step_flops(config, blocks: int, samples: int, seq: int) -> float:
    """Minimal FLOPs of one COPAL step: 5 forward-equivalents of the blocks (gradient forward
    1 + backward 2, sweep forward 1 + propagation 1), 3 of the LM head (forward + backward)."""
    tokens = samples * seq
    attention = 2 * 2 * seq * config.hidden_size * tokens / 2  # QK^T and PV, causal half
    block_forward = 2 * block_params(config) * tokens + attention
    head_forward = 2 * config.vocab_size * config.hidden_size * tokens
    return 5 * blocks * block_forward + 3 * head_forward


def run_step(shape: str, blocks: int, pattern: str, samples: int, seq: int, batch_size: int,
             plan: GradientPlan, device) -> dict:
    """One COPAL step on ``blocks`` synthetic blocks; phase times, peaks, bytes moved.

    Host memory: ``baseline`` is the process before the model exists (interpreter, CUDA context,
    earlier runs' caches released); ``source`` the synthetic checkpoint's resident tensors (one
    block, embedding, head), which a real run reads from disk instead."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        release_pinned_cache()
    gc.collect()
    baseline = resident_bytes()
    lm = synthetic_model(shape, num_blocks=blocks, dtype=torch.bfloat16 if device.type == "cuda"
                         else torch.float32, seed=0, distinct_blocks=1)
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, lm.config.vocab_size, (samples, seq), generator=generator)
    batch_size = resolve_batch_size(batch_size, lm, seq, device)
    lm.read_block_state(0)  # draw the source's block before the clock starts
    block_bytes = block_params(lm.config) * torch.empty((), dtype=lm.dtype).element_size()
    host_out = {}

    def offload(index, block):  # the finished block to (reused, pinned) host memory
        for name, tensor in block.state_dict().items():
            if name not in host_out:
                host_out[name] = torch.empty(tensor.shape, dtype=tensor.dtype,
                                             pin_memory=device.type == "cuda")
            host_out[name].copy_(tensor, non_blocking=True)

    gradient_timer, sweep_timer = PhaseTimer(), PhaseTimer()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with HostPeak() as host:
        _sync(device)
        start = time.perf_counter()
        grads = gradient_norms(lm, windows, device=device, batch_size=batch_size,
                               micro_batch=plan.micro_batch, segment=plan.segment,
                               timer=gradient_timer, desc="gradients")
        gradient_seconds = time.perf_counter() - start
        method = make_method("copal", history={}, grad_norms=grads, options=CopalOptions())
        prune_sweep(lm, windows, method, Pattern.parse(pattern), device=device,
                    batch_size=batch_size, on_block_done=offload, timer=sweep_timer, desc="sweep")
        _sync(device)
        total = time.perf_counter() - start
    done = GradientPlan(blocks, samples, plan.micro_batch, plan.segment)
    return {
        "shape": shape, "blocks": blocks, "pattern": pattern, "samples": samples, "seq": seq,
        "batch_size": batch_size, "micro_batch": plan.micro_batch, "segment": plan.segment,
        "rounds": plan.rounds,
        "seconds": total, "gradient_seconds": gradient_seconds,
        "sweep_seconds": total - gradient_seconds,
        "gradient_phases": dict(gradient_timer.seconds), "sweep_phases": dict(sweep_timer.seconds),
        "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "peak_device_reserved_bytes": (torch.cuda.max_memory_reserved(device)
                                       if device.type == "cuda" else None),
        "peak_host_bytes": host.peak, "host_growth_bytes": host.peak - host.start,
        "host_baseline_bytes": baseline, "host_above_baseline_bytes": host.peak - baseline,
        "source_host_bytes": lm.reader.host_bytes(),
        "block_bytes": block_bytes,
        "h2d_bytes": (done.block_reads + blocks) * block_bytes, "d2h_bytes": blocks * block_bytes,
        "kept_inputs_bytes_per_round": done.kept_inputs * plan.micro_batch * window_input_bytes(lm, seq),
    }


def project(small: dict, large: dict, full_blocks: int) -> dict:
    """Linear projection to ``full_blocks`` from runs on k and 2k blocks."""
    per_block = (large["seconds"] - small["seconds"]) / (large["blocks"] - small["blocks"])
    return {"per_block_seconds": per_block,
            "seconds": large["seconds"] + per_block * (full_blocks - large["blocks"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", nargs="+", default=["llama-7b", "llama-65b", "llama2-70b"],
                        choices=sorted(SHAPES))
    parser.add_argument("--pattern", nargs="+", default=["2:4", "50%"])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch-size", type=lambda t: t if t == "auto" else int(t), default="auto",
                        help="windows per forward chunk, or auto (from free device memory)")
    parser.add_argument("--blocks", type=int, default=2,
                        help="k: shapes not in --full-shapes run k and 2k blocks and are projected")
    parser.add_argument("--full-shapes", nargs="*", default=["llama-7b"],
                        help="shapes run with all their blocks")
    parser.add_argument("--device-memory-cap-gb", type=float, default=None,
                        help="cap this process's device memory (the caching allocator then "
                             "reuses its free blocks instead of reserving more): proves a step "
                             "fits a smaller GPU")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(RESULTS_DIR))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --device cpu --shape tiny for a smoke run")
    if device.type == "cuda" and args.device_memory_cap_gb:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.device_memory_cap_gb * 1e9 / total),
                                                   device)

    floors = measure_floors(device)
    print(f"{SYNTHETIC_LABEL}\nmeasured: matmul {floors['matmul_flops'] / 1e12:.0f} TFLOP/s, "
          f"h2d {floors['h2d_bytes_per_s'] / 1e9:.1f} GB/s, d2h {floors['d2h_bytes_per_s'] / 1e9:.1f} GB/s")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_sweep-{stamp}.json"
    records, rows = [], []
    # pattern-major, so that a run cut short by its time limit still has every shape once
    for pattern in args.pattern:
        for shape in args.shape:
            full = synthetic_config(shape)
            full_blocks = full.num_hidden_layers
            # the gradient pass may keep as many block inputs on the host as the sweep has
            # activations; planned for the full model, whatever number of blocks runs here
            window_bytes = args.seq * full.hidden_size * 2
            plan = plan_gradient_pass(full_blocks, args.samples, window_bytes,
                                      args.samples * window_bytes)
            whole = shape in args.full_shapes or 2 * args.blocks >= full_blocks
            if whole:
                run = run_step(shape, full_blocks, pattern, args.samples, args.seq,
                               args.batch_size, plan, device)
                projected = {"per_block_seconds": None, "seconds": run["seconds"]}
            else:
                small = run_step(shape, args.blocks, pattern, args.samples, args.seq,
                                 args.batch_size, plan, device)
                run = run_step(shape, 2 * args.blocks, pattern, args.samples, args.seq,
                               args.batch_size, plan, device)
                run["small_run"] = small
                projected = project(small, run, full_blocks)
            flops = step_flops(full, full_blocks, args.samples, args.seq)
            block_bytes = run["block_bytes"]
            moved_h2d = (plan.block_reads + full_blocks) * block_bytes
            compute_floor = flops / floors["matmul_flops"]
            transfer_floor = (moved_h2d / floors["h2d_bytes_per_s"]
                              + full_blocks * block_bytes / floors["d2h_bytes_per_s"])
            floor = max(compute_floor, transfer_floor)
            record = {"label": SYNTHETIC_LABEL, "run": run, "projected_full": projected,
                      "full_blocks": full_blocks, "full_flops": flops,
                      "compute_floor_s": compute_floor, "transfer_floor_s": transfer_floor,
                      "floor_s": floor, "ratio_to_floor": projected["seconds"] / floor,
                      "floors": floors}
            records.append(record)
            phases = {**{f"grad {k}": v for k, v in run["gradient_phases"].items()},
                      **run["sweep_phases"]}
            print(f"\n{shape} {pattern} ({run['blocks']} blocks run; gradient pass {plan.rounds} "
                  f"round(s) of {plan.micro_batch} windows, segments of {plan.segment}): " + ", ".join(f"{k} {v:.2f}s" for k, v in phases.items()))
            rows.append({
                "shape": shape, "pattern": pattern, "blocks run": run["blocks"],
                "step s (full)": f"{projected['seconds']:.1f}",
                "floor s": f"{floor:.1f} ({'compute' if compute_floor >= transfer_floor else 'transfer'})",
                "x floor": f"{projected['seconds'] / floor:.2f}",
                "peak dev GB": "-" if run["peak_device_bytes"] is None else f"{run['peak_device_bytes'] / 1e9:.1f}",
                "reserved GB": "-" if run["peak_device_reserved_bytes"] is None else f"{run['peak_device_reserved_bytes'] / 1e9:.1f}",
                "peak host GB": f"{run['peak_host_bytes'] / 1e9:.1f}",
                "host above baseline GB": f"{run['host_above_baseline_bytes'] / 1e9:.1f}",
                "2 blocks + acts GB": f"{(2 * block_bytes + args.samples * window_bytes) / 1e9:.1f}",
            })
            print("  " + ", ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
            # rewritten after every record: a run stopped by its time limit keeps what it did
            path.write_text(json.dumps({"environment": environment(), "args": vars(args),
                                        "records": records}, indent=1))

    print(f"\nresults {path}\n{SYNTHETIC_LABEL}")
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
