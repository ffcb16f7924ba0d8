"""Without Triton (macOS, Windows, minimal CPU images; it is an optional extra): the package and
the driver import, the CLI runs, and the torch path gives the masks that the Triton kernels give
here (and their sums and updated weights within rounding). A child process is made to lack Triton: ``sys.modules["triton"] = None``
makes every ``import triton`` raise ImportError, as where it is not installed."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import copal_kernels as ck

from .driver.tiny import tiny_checkpoint, write_corpus

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import sys
    sys.modules["triton"] = sys.modules["triton.language"] = None
    import torch
    import copal_kernels as ck
    import copal.api
    from copal.cli import main
    from tests.test_without_triton import results

    assert not ck._dispatch.HAS_TRITON and "triton" not in [m.split(".")[0] for m in sys.modules
                                                            if sys.modules[m] is not None]
    try:
        ck.nm._nm_kernel[(1,)]()
    except RuntimeError as error:
        print("launch:", error)
    torch.save(results(), sys.argv[1])
    main(["prune", "--model", sys.argv[2], "--data", sys.argv[3], "--out", sys.argv[4],
          "--method", "wanda", "--pattern", "2:4", "--num-calibration", "4", "--seq-len", "32"])
""")


def results():
    """Every op on fixed random inputs (fp32 and bf16, odd shapes)."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(24, 40, generator=generator).to(dtype)
        grads = torch.rand(2, 24, generator=generator)
        acts = torch.rand(2, 40, generator=generator)
        name = str(dtype).split(".")[1]
        out[f"nm {name}"] = ck.nm_mask(weight, grads, acts, n=2, m=4)
        out[f"nm 3:8 {name}"] = ck.nm_mask(weight, None, acts[0], n=3, m=8)
        out[f"row {name}"] = ck.unstructured_mask(weight, grads, acts, sparsity=0.5)
        out[f"layer {name}"] = ck.unstructured_mask(weight, None, acts[0], sparsity=0.3,
                                                    group="layer")
        out[f"wanda {name}"] = ck.wanda_mask(weight=weight, scaler_row=acts[0], prune_n=2,
                                             prune_m=4)
        out[f"sumsq {name}"] = ck.channel_sumsq_(torch.zeros(40), torch.randn(
            3, 7, 40, generator=generator).to(dtype))
        x = torch.randn(64, 40, generator=generator)
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(
            x.t() @ x + 0.1 * torch.eye(40))), upper=True)
        pruned = weight.float().clone()
        ck.sparsegpt_prune_(pruned, hinv, prune_n=2, prune_m=4, blocksize=8)
        out[f"sparsegpt {name}"] = pruned
    return out


@pytest.mark.skipif(not ck._dispatch.HAS_TRITON, reason="compares against the Triton kernels")
def test_without_triton_the_package_imports_the_cli_runs_and_masks_match(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus.txt")
    saved, out = tmp_path / "results.pt", tmp_path / "pruned"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="0",
               COPAL_HOME=str(tmp_path / "home"))
    child = subprocess.run([sys.executable, "-c", CHILD, saved, checkpoint, corpus, out],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert "launch: the Triton kernel _nm_kernel needs Triton, which is not installed" in \
        child.stdout
    help_text = subprocess.run([sys.executable, "-c", "import sys; sys.modules['triton'] = None; "
                                "from copal.cli import main; main(['--help'])"], cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "prune" in help_text.stdout, help_text.stderr[-2000:]
    assert (out / "config.json").is_file()
    # the same ops through the Triton kernels (their interpreter on a CPU)
    assert ck._dispatch.use_triton(torch.zeros(1)) or torch.cuda.is_available()
    expected, actual = results(), torch.load(saved)
    assert expected.keys() == actual.keys()
    for key in expected:  # masks bit for bit; sums and updated weights by relative error
        want, got = expected[key].cpu(), actual[key]
        if want.dtype == torch.bool:
            assert torch.equal(want, got), key
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=key)
            assert torch.equal(want == 0, got == 0), key
