"""COPAL's second-order state: per decoder block, per distinct Linear input, the weighted sum of
the Gram matrices of every step, so that a step can rebuild SparseGPT's Hessian of the union of
every dataset seen without any of their data (docs/reconstruction.md).

For step s with calibration inputs ``X_s`` [in, n_s] of a Linear input and weight ``w_s``:

    G_{<=t} = sum_{s<=t} w_s X_s X_s^T        (fp32 [in, in])
    N_{<=t} = sum_{s<=t} w_s n_s              (fp64)
    H_{<=t} = 2 G_{<=t} / N_{<=t}

``w_s = lambda_s`` weighs every token alike ("tokens": H is exactly the Hessian of the union of
the calibration sets); ``w_s = lambda_s / n_s`` weighs every dataset alike ("datasets"). With
equal-sized calibration sets the two coincide.

On disk: one safetensors file per block, ``block-NNNNN.safetensors``, with ``<input>.gram`` and
``<input>.total`` per distinct input (``<input>``: the name of the first Linear that reads it) and
metadata: the format, the number of steps, the weighting, which Linears read each input, and the
step's identifier (random, one per step), which the state file records too, so that a state file
and a folder of blocks that do not belong together are refused. A step reads block i of the
previous state and writes block i of the new one, so the host holds one block's matrices at a
time and the previous state is never modified.
"""

import json
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import write_atomically

FORMAT = "copal-hessian/1"
WEIGHTINGS = ("tokens", "datasets")


class HessianStateError(ValueError):
    """A second-order state that cannot serve this model or this step (names the file)."""


def block_file(directory: Path, index: int) -> Path:
    return Path(directory) / f"block-{index:05d}.safetensors"


def hessian_dir(state_path) -> Path:
    """Where a COPAL state file keeps its second-order blocks: beside it, ``<name>.hessian``
    (``copal-state.safetensors`` -> ``copal-state.safetensors.hessian``)."""
    state_path = Path(state_path)
    return state_path.with_name(state_path.name + ".hessian")


def step_dir(root: Path, step: int) -> Path:
    """The folder of step ``step``'s blocks in a run's working folder ``root``."""
    return Path(root) / f"hessian-{step:04d}"


def hessian_id(directory: Path) -> str:
    """The identifier of the step that wrote ``directory``'s blocks (from its first block)."""
    return _open_block(block_file(directory, 0))[0]["id"]


class HessianState:
    """Read the previous step's blocks from ``previous`` (None at step 1), write this step's
    (``step``, 1-based) into ``target`` (None: compute without writing, as the ranks of a group
    other than rank 0 do, copal.distributed). ``weighting``: "tokens" or "datasets";
    ``lambda_t``: this step's weight (CopalOptions.step_weight)."""

    def __init__(self, previous: Optional[Path], target: Optional[Path], step: int,
                 weighting: str, lambda_t: float = 1.0):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"step weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        if (previous is None) != (step == 1):
            raise ValueError(f"step {step} of a second-order state needs the previous one "
                             "exactly when it is not the first")
        self.previous = Path(previous) if previous is not None else None
        self.target = Path(target) if target is not None else None
        self.step = step
        self.weighting = weighting
        self.lambda_t = float(lambda_t)
        self.id = uuid.uuid4().hex

    def _read(self, index: int, groups: Dict[str, List[str]], widths: Dict[str, int]):
        path = block_file(self.previous, index)
        meta, tensors = _open_block(path, tensors=True)
        _check_block(path, meta, self.step - 1, self.weighting)
        if json.loads(meta.get("inputs", "{}")) != groups:
            raise HessianStateError(f"{path}: its Linear inputs {meta.get('inputs')} are not "
                                    f"this model's block {index} ({json.dumps(groups)})")
        for owner, width in widths.items():
            gram = tensors.get(f"{owner}.gram")
            if gram is None or tuple(gram.shape) != (width, width) or f"{owner}.total" not in tensors:
                raise HessianStateError(f"{path}: no [{width}, {width}] Gram matrix for {owner}")
        return tensors

    def update(self, index: int, grams: Dict[str, Tuple[torch.Tensor, int]],
               groups: Dict[str, List[str]]) -> Dict[str, torch.Tensor]:
        """Add this step's ``grams`` ({input: (X X^T fp32 [in, in], n tokens)}) of block
        ``index`` (``groups``: {input: the Linears that read it}) to the previous sums, write
        the new block, and return {input: H_{<=t} = 2 G / N} on the grams' device."""
        widths = {owner: gram.shape[0] for owner, (gram, _) in grams.items()}
        old = self._read(index, groups, widths) if self.previous is not None else {}
        sums, hessians = {}, {}
        for owner, (gram, tokens) in grams.items():
            # an expert that no token of this step reached adds nothing (its Gram is zero)
            weight = self.lambda_t / (max(tokens, 1) if self.weighting == "datasets" else 1)
            step_sum = gram if weight == 1 else gram * weight
            total = weight * tokens
            if old:
                step_sum = old[f"{owner}.gram"].to(gram.device) + step_sum
                total = float(old[f"{owner}.total"]) + total
            sums[f"{owner}.gram"] = step_sum.to("cpu", torch.float32).contiguous()
            sums[f"{owner}.total"] = torch.tensor(total, dtype=torch.float64)
            hessians[owner] = step_sum * (2.0 / total) if total else step_sum  # none: zeros
        metadata = {"format": FORMAT, "steps": str(self.step), "weighting": self.weighting,
                    "inputs": json.dumps(groups), "id": self.id}
        if self.target is not None:
            self.target.mkdir(parents=True, exist_ok=True)
            write_atomically(block_file(self.target, index),
                             lambda name: save_file(sums, name, metadata=metadata))
        return hessians


def _open_block(path: Path, tensors: bool = False):
    """(metadata, {name: tensor} if ``tensors`` else None) of one block file; a missing or
    unreadable one raises HessianStateError naming it."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}), (
                {name: handle.get_tensor(name) for name in handle.keys()} if tensors else None)
    except (SafetensorError, OSError) as error:
        raise HessianStateError(f"{path}: missing or unreadable ({error})") from None


def _check_block(path: Path, meta: dict, steps: int, weighting: str) -> None:
    if meta.get("format") != FORMAT:
        raise HessianStateError(f"{path}: not a block of a COPAL second-order state")
    if meta.get("steps") != str(steps) or meta.get("weighting") != weighting:
        raise HessianStateError(
            f"{path}: holds {meta.get('steps')} step(s) weighted by {meta.get('weighting')}; "
            f"expected {steps} weighted by {weighting}")


def check_hessian_dir(directory: Path, num_blocks: int, steps: int, weighting: str,
                      state_id: str) -> None:
    """Before any work: every block file of a state is there and says it holds ``steps`` steps
    weighted by ``weighting``, written by the step ``state_id`` that the state file records
    (HessianStateError naming the first file that does not)."""
    for index in range(num_blocks):
        path = block_file(directory, index)
        meta, _ = _open_block(path)
        _check_block(path, meta, steps, weighting)
        if meta.get("id") != state_id:
            raise HessianStateError(f"{path}: written by another run than its state file's "
                                    f"(step {meta.get('id')}, the state's {state_id}); the state "
                                    "file and this folder do not belong together")
