"""Pruning a checkpoint streamed from disk holds about one block in host memory, not the model:
measured in a fresh process on a synthetic checkpoint of 16 blocks (random weights)."""

import json
import subprocess
import sys
import textwrap

from .tiny import tiny_checkpoint, write_corpus

CHILD = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from copal.api import prune_checkpoint
    from copal.phases import HostPeak

    with HostPeak(interval=0.002) as host:
        prune_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], method="wanda", pattern="50%",
                         num_calibration=2, seq_len=16, dtype="float32", log=lambda *_: None)
    print(json.dumps({"growth_kb": (host.peak - host.start) // 1024}))
""")


def _prune_growth(tmp_path, blocks, hidden=512, intermediate=1536):
    """Peak host-memory growth (bytes) while pruning a synthetic checkpoint of ``blocks``."""
    checkpoint = tiny_checkpoint(tmp_path / f"synthetic{blocks}", hidden=hidden,
                                 intermediate=intermediate, layers=blocks, vocab=96)
    corpus = write_corpus(tmp_path / "text.txt")
    result = subprocess.run([sys.executable, "-c", CHILD, str(checkpoint), str(corpus),
                             str(tmp_path / f"out{blocks}")], capture_output=True, text=True,
                            check=True, env={"TRITON_INTERPRET": "0", "PATH": "/usr/bin:/bin",
                                             "COPAL_HOME": str(tmp_path / "home")})
    return json.loads(result.stdout.strip().splitlines()[-1])["growth_kb"] * 1024


def test_streamed_pruning_peak_host_memory(tmp_path):
    hidden, intermediate = 512, 1536
    block_bytes = 4 * (2 * hidden * hidden + 2 * hidden * hidden // 2 + 3 * hidden * intermediate)
    small, large = _prune_growth(tmp_path, 8), _prune_growth(tmp_path, 32)
    print(f"peak host growth: 8 blocks {small / 2**20:.1f} MiB, 32 blocks {large / 2**20:.1f} MiB; "
          f"one block {block_bytes / 2**20:.1f} MiB, 32-block model {32 * block_bytes / 2**20:.0f} MiB")
    # four times the model (+288 MiB), about the same peak: a block or two plus fixed costs
    # (imports, tokenizer, the model's meta skeleton), not the model
    assert large - small < 2 * block_bytes
    assert large < 32 * block_bytes / 4
