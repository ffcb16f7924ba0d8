"""The synthetic source of real LLaMA shapes, the prefetching block stream and the micro-batched
gradient pass; the whole COPAL step on a synthetic model keeps host memory bounded."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from copal.gradients import GradientPlan, gradient_norms, plan_gradient_pass
from copal.methods import Pattern, make_method
from copal.model import LayeredModel
from copal.sweep import (embed_windows, observe_blocks, prune_sweep, resolve_batch_size, run_blocks,
                         stream_blocks)
from copal.synthetic import SHAPES, SyntheticReader, synthetic_config, synthetic_model

from .tiny import tiny_model


@pytest.mark.parametrize("shape", ["llama-7b", "llama2-70b", "tiny"])
def test_reader_serves_every_tensor_of_the_architecture(shape):
    config = synthetic_config(shape, num_blocks=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    reader = SyntheticReader(config)
    assert {k: reader.shapes[k] for k in expected} == expected
    assert set(reader.shapes) == set(expected)
    assert SHAPES[shape][0] == config.hidden_size


def test_synthetic_model_repeats_blocks_and_keeps_its_source():
    lm = synthetic_model("tiny", dtype=torch.float32, distinct_blocks=2)
    first = lm.load_block(0, "cpu").mlp.up_proj.weight.clone()
    assert 0.018 < float(first.std()) < 0.022
    prune_sweep(lm, torch.randint(0, 1024, (2, 16)), make_method("magnitude"), Pattern.parse("50%"))
    again = lm.load_block(2, "cpu").mlp.up_proj.weight  # block 2 is block 0's seeded weights
    assert torch.equal(again, first), "pruning must not write into the synthetic source"
    assert not torch.equal(lm.load_block(1, "cpu").mlp.up_proj.weight, first)
    with pytest.raises(ValueError, match="unknown synthetic shape"):
        synthetic_config("llama-9b")


def test_stream_blocks_yields_in_order_with_states():
    lm = LayeredModel.from_model(tiny_model())
    states = {i: {k: torch.full_like(v, float(i)) for k, v in lm.block_state(i).items()}
              for i in range(lm.num_blocks)}
    seen = []
    for index, block in stream_blocks(lm, reversed(range(lm.num_blocks)), "cpu", states.get):
        seen.append(index)
        assert torch.all(block.mlp.up_proj.weight == index)
    assert seen == list(reversed(range(lm.num_blocks)))


@pytest.mark.parametrize("micro_batch,segment", [(2, 1), (5, 2), (2, 3)],
                         ids=["rounds", "segments", "rounds+segments"])
def test_bounded_gradient_pass_equals_one_round(micro_batch, segment):
    lm = LayeredModel.from_model(tiny_model(layers=5))
    windows = torch.randint(0, lm.config.vocab_size, (5, 20), generator=torch.Generator().manual_seed(1))
    whole = gradient_norms(lm, windows, batch_size=2, micro_batch=5, segment=1)
    bounded = gradient_norms(lm, windows, batch_size=2, micro_batch=micro_batch, segment=segment)
    assert whole.keys() == bounded.keys() and len(whole) == 5 * 7
    for key in whole:
        assert torch.allclose(whole[key], bounded[key], rtol=1e-5, atol=0), key


@pytest.mark.parametrize("blocks,windows,budget", [(80, 128, 128), (80, 128, 1100), (32, 128, 64),
                                                   (32, 128, 5000), (30, 32, 10), (4, 3, 1)])
def test_plan_takes_the_fewest_block_reads_that_fit(blocks, windows, budget):
    plan = plan_gradient_pass(blocks, windows, 1, budget)
    fits = lambda p: p.micro_batch == 1 or p.kept_inputs * p.micro_batch <= budget
    assert fits(plan)
    for segment in range(1, blocks + 1):
        for micro_batch in range(1, windows + 1):
            other = GradientPlan(blocks, windows, micro_batch, segment)
            if fits(other):
                assert plan.block_reads <= other.block_reads, other
    if budget >= blocks * windows:  # everything fits: one round, every input kept, 2 reads a block
        assert plan.block_reads <= 2 * blocks


CHILD = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from transformers import LlamaConfig
    from copal.phases import HostPeak
    from copal.gradients import GradientPlan, gradient_norms, plan_gradient_pass
    from copal.methods import CopalOptions, Pattern, make_method
    from copal.model import LayeredModel
    from copal.synthetic import SyntheticReader
    from copal.sweep import prune_sweep

    blocks = int(sys.argv[1])
    config = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=blocks,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=128)
    lm = LayeredModel.from_reader(config, SyntheticReader(config, dtype=torch.float32, pin=False),
                                  torch.float32)
    windows = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))
    with HostPeak(interval=0.002) as host:
        grads = gradient_norms(lm, windows, batch_size=4, micro_batch=2)
        prune_sweep(lm, windows, make_method("copal", history={}, grad_norms=grads, options=CopalOptions()),
                    Pattern.parse("2:4"), batch_size=4)
    print(json.dumps({"growth_kb": (host.peak - host.start) // 1024}))
""")


def _step_growth(blocks):
    result = subprocess.run([sys.executable, "-c", CHILD, str(blocks)], capture_output=True,
                            text=True, check=True,
                            env={"TRITON_INTERPRET": "0", "PATH": "/usr/bin:/bin"})
    return json.loads(result.stdout.strip().splitlines()[-1])["growth_kb"] * 1024


def test_copal_step_on_synthetic_shapes_peak_host_memory():
    hidden, intermediate, kv = 512, 1536, 256
    block_bytes = 4 * (2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * intermediate)
    small, large = _step_growth(8), _step_growth(32)
    print(f"COPAL step peak host growth: 8 blocks {small / 2**20:.1f} MiB, 32 blocks "
          f"{large / 2**20:.1f} MiB; one block {block_bytes / 2**20:.1f} MiB, 32-block model "
          f"{32 * block_bytes / 2**20:.0f} MiB")
    # gradient pass (2-window rounds) + sweep over 4x the blocks: the peak grows by the stored
    # block inputs of one round (24 more blocks x 256 KiB), not by blocks; one run's peak moves
    # by up to two blocks with the prefetch thread's timing (as in test_memory.py)
    assert large - small < 3 * block_bytes
    # the source's 2 distinct blocks, the block at work, one round's inputs and fixed costs
    # (autograd, thread pools), and that spread: under 12 of the model's 32 blocks
    assert large < 12 * block_bytes


def test_gpu_sweep_benchmark_smoke_run_on_cpu(tmp_path):
    """The GPU benchmark's code path end to end on a CPU (tiny shape, projection from 2 and 4
    blocks); its numbers mean nothing here."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_sweep", "--device", "cpu", "--shape", "tiny",
         "--pattern", "2:4", "--samples", "2", "--seq", "16", "--blocks", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, env={"TRITON_INTERPRET": "0", "PATH": "/usr/bin:/bin"},
        cwd=str(Path(__file__).resolve().parents[2]))
    assert result.returncode == 0, result.stderr[-2000:]
    (written,) = tmp_path.glob("gpu_sweep-*.json")
    record = json.loads(written.read_text())["records"][0]
    assert record["label"].startswith("synthetic weights")
    assert record["run"]["blocks"] == 4 and record["run"]["small_run"]["blocks"] == 2
    assert record["projected_full"]["seconds"] > 0
    assert {"load", "forward", "kernels", "propagate", "offload"} <= set(record["run"]["sweep_phases"])


def test_gpu_kernels_benchmark_smoke_run_on_cpu(tmp_path):
    """The kernel benchmark's code path end to end under the interpreter (one tiny shape; every
    target row and the SparseGPT loop, masks checked); its numbers mean nothing here."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_kernels", "--device", "cpu", "--shapes", "tiny",
         "--out", str(tmp_path)],
        capture_output=True, text=True, env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"},
        cwd=str(Path(__file__).resolve().parents[2]))
    assert result.returncode == 0, result.stderr[-2000:]
    (written,) = tmp_path.glob("gpu_kernels-*.json")
    record = json.loads(written.read_text())
    targets = [row for row in record["results"] if row["target"] != "-"]
    assert len(targets) == 10 and all(row["met"] in ("yes", "NO") for row in targets)
    assert [row["same_mask"] for row in record["sparsegpt"]] == [True, True]
    assert "SparseGPT's block loop per layer" in result.stdout


def test_batch_size_auto_and_checks():
    lm = synthetic_model("tiny", dtype=torch.float32)
    assert resolve_batch_size("auto", lm, 64, "cpu") == 1
    assert resolve_batch_size(3, lm, 64, "cpu") == 3
    for bad in (0, -2, "eight", 2.5):
        with pytest.raises(ValueError, match="batch_size"):
            resolve_batch_size(bad, lm, 64, "cpu")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_observing_stops_at_the_last_layer_with_the_same_statistics(arch):
    lm = LayeredModel.from_model(tiny_model(arch))
    windows = torch.randint(0, lm.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(2))
    method = make_method("sparsegpt")  # activations and Gram matrices
    with torch.no_grad():
        chunks = embed_windows(lm, windows, "cpu", 2)
        block = lm.load_block(0, "cpu")
        linears = lm.linears(block)
        assert list(linears)[-1] == "mlp.down_proj"
        with method.observe(linears) as full:
            run_blocks(lm, block, chunks, "cpu")
        with method.observe(linears) as stopped:
            observe_blocks(lm, block, chunks, "cpu")
    for name in linears:
        assert torch.equal(full[name].act_sumsq, stopped[name].act_sumsq), name
        assert torch.equal(full[name].gram, stopped[name].gram), name
        assert full[name].tokens == stopped[name].tokens == 36
