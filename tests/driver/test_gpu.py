"""The driver's CUDA paths (side-stream prefetch from pinned memory, activations parked in pinned
host memory, kernels compiled for the GPU) against the same step on the CPU. GPU only."""

import pytest
import torch

from copal.gradients import gradient_norms
from copal.methods import CopalOptions, Pattern, make_method
from copal.sweep import prune_sweep
from copal.synthetic import synthetic_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _copal_step(device, pattern, offload=False):
    """Gradient norms and the pruned masks of one COPAL step on a tiny synthetic model."""
    lm = synthetic_model("tiny", dtype=torch.float32, distinct_blocks=8)
    windows = torch.randint(0, 1024, (6, 64), generator=torch.Generator().manual_seed(0))
    grads = gradient_norms(lm, windows, device=device, batch_size=4, micro_batch=4, segment=3)
    kept = {}
    method = make_method("copal", history={}, grad_norms=grads, options=CopalOptions())
    prune_sweep(lm, windows, method, Pattern.parse(pattern), device=device, batch_size=4,
                offload_activations=offload,
                on_block_done=lambda i, block: kept.update(
                    {f"{i}.{name}": (linear.weight != 0).cpu()
                     for name, linear in lm.linears(block).items()}))
    return grads, kept


@pytest.mark.parametrize("pattern", ["2:4", "50%"])
def test_copal_step_on_cuda_matches_cpu(pattern):
    grads_cpu, masks_cpu = _copal_step("cpu", pattern)
    grads_gpu, masks_gpu = _copal_step("cuda", pattern)
    assert grads_gpu.keys() == grads_cpu.keys()
    for key, ref in grads_cpu.items():
        assert grads_gpu[key].device.type == "cpu"
        assert float((grads_gpu[key] - ref).norm() / ref.norm()) < 1e-3, key
    differing = sum(int((masks_gpu[k] != masks_cpu[k]).sum()) for k in masks_cpu)
    total = sum(m.numel() for m in masks_cpu.values())
    # fp32 sums in another order flip only near-ties; the sequential sweep may amplify a few
    assert differing / total < 2e-3, f"{differing} of {total} mask entries differ"


def test_pinned_activation_offload_changes_nothing_on_cuda():
    grads, masks = _copal_step("cuda", "2:4", offload=False)
    grads_offload, masks_offload = _copal_step("cuda", "2:4", offload=True)
    assert all(torch.equal(grads[k], grads_offload[k]) for k in grads)
    assert all(torch.equal(masks[k], masks_offload[k]) for k in masks)


def test_copal_obs_step_on_cuda_is_sparsegpt_and_keeps_its_state_on_the_host(tmp_path):
    """COPAL's OBS update on the GPU: step 1 equals SparseGPT on the GPU bit for bit, and its
    second-order state is written from the host."""
    from copal.continual import hessian_state
    from safetensors.torch import load_file

    options = CopalOptions(weight_update="obs")
    windows = torch.randint(0, 1024, (4, 64), generator=torch.Generator().manual_seed(0))
    weights = []
    for method in (make_method("sparsegpt"),
                   make_method("copal", history={}, grad_norms=None, options=options,
                               hessians=hessian_state(options, None, tmp_path / "h", 1))):
        lm = synthetic_model("tiny", dtype=torch.float32, num_blocks=2)
        done = {}
        prune_sweep(lm, windows, method, Pattern.parse("2:4"), device="cuda", batch_size=2,
                    on_block_done=lambda i, block: done.update(
                        {f"{i}.{k}": v.cpu() for k, v in block.state_dict().items()}))
        weights.append(done)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert load_file(tmp_path / "h" / "block-00000.safetensors")["self_attn.q_proj.gram"].is_cpu
