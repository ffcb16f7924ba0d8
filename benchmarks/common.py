"""What every benchmark records beside its numbers: machine, versions, date; shared shapes."""

import json
import statistics
import time
from pathlib import Path

from copal_kernels.machine import environment

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# LLaMA linear shapes [out, in]: q/k/v/o, gate/up, down
LLAMA_7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
LLAMA_65B_SHAPES = [(8192, 8192), (22016, 8192), (8192, 22016)]


def append_results(filename: str, records: list) -> Path:
    """Append one JSON line per record (each carries the environment) to results/<filename>."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / filename
    env = environment()
    with path.open("a") as handle:
        for record in records:
            handle.write(json.dumps({**env, **record}) + "\n")
    return path


def median_seconds(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` on the CPU (for the GPU use triton.testing.do_bench)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_table(rows: list, columns: list) -> None:
    widths = [max(len(col), *(len(str(row[col])) for row in rows)) for col in columns]
    print("  ".join(col.ljust(width) for col, width in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row[col]).ljust(width) for col, width in zip(columns, widths)))
