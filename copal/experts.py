"""Mixture-of-experts decoder blocks (Mixtral, Qwen2-MoE, Qwen3-MoE): which Linears are experts
and which route, and transformers 5's stacked expert weights as one nn.Linear per projection.

Transformers 4 builds the experts as an ``nn.ModuleList`` of MLPs of ``nn.Linear``; transformers
5 stacks them into two parameters, ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], but
still reads and writes checkpoints in the per-expert layout (``experts.{e}.w1.weight`` ...). The
project prunes per expert (each expert's statistics come from the tokens routed to it), so
:func:`unstack_experts` replaces a stacked module by :class:`ExpertLinears`, the per-expert layout
of the checkpoints and of transformers 4, computing what the stacked module computes. The
Linears and parameters that are direct children of the module holding the experts (the router
``gate``, Qwen2-MoE's ``shared_expert_gate``) compute the routing and are never pruned
(:func:`router_ids`): a pruned router would send tokens to other experts.
"""

from typing import Dict, Optional, Set

import torch
from torch import nn

# the checkpoints' names of one expert's gate, up and down projections, per model type (the
# layout of the models on the Hub and of save_pretrained in transformers 4 and 5)
EXPERT_PROJECTIONS = {
    "mixtral": ("w1", "w3", "w2"),
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
}


class ExpertLinears(nn.ModuleList):
    """E experts, each an MLP ``down(act(gate(x)) * up(x))`` of three nn.Linear named as in the
    checkpoint, run on the tokens routed to it: what transformers 5's stacked experts module
    computes, with the same call (hidden states [T, H], ``top_k_index`` [T, k] and
    ``top_k_weights`` [T, k] from the router) and the same order of tokens and experts."""

    def __init__(self, experts: int, hidden: int, intermediate: int, names, act_fn, device,
                 dtype):
        super().__init__()
        self.names = tuple(names)
        for _ in range(experts):
            expert = nn.Module()
            expert.act_fn = act_fn  # no parameters; on each expert, as a ModuleList holds only them
            for name, (rows, columns) in zip(self.names, ((intermediate, hidden),
                                                          (intermediate, hidden),
                                                          (hidden, intermediate))):
                setattr(expert, name, nn.Linear(columns, rows, bias=False, device=device,
                                                dtype=dtype))
            self.append(expert)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        gate_name, up_name, down_name = self.names
        output = torch.zeros_like(hidden_states)
        routed = top_k_index.t()  # [k, T]: the stacked module's order, by rank then token
        for index, expert in enumerate(self):
            position, tokens = torch.where(routed == index)
            if tokens.numel() == 0:  # no token: its Linears do not run (nor their hooks)
                continue
            x = hidden_states[tokens]
            h = expert.act_fn(getattr(expert, gate_name)(x)) * getattr(expert, up_name)(x)
            y = getattr(expert, down_name)(h) * top_k_weights[tokens, position, None]
            output.index_add_(0, tokens, y.to(output.dtype))
        return output


def num_experts(config) -> int:
    return getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0


def _stacked(module: nn.Module, experts: int) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return experts > 0 and any(p.dim() == 3 and p.shape[0] == experts for p in params.values())


def unstack_experts(model: nn.Module, blocks: nn.ModuleList) -> None:
    """Replace every stacked experts module inside ``blocks`` by an :class:`ExpertLinears` whose
    weights are views of the stacked tensors (in-memory models keep one copy; models on the meta
    device stay there). Mutates ``model``; its forward and ``save_pretrained`` are unchanged.
    Raises ValueError for a layout it does not know (biases, transposed weights, other
    parameters)."""
    config = model.config
    experts = num_experts(config)
    for block in blocks:
        for parent in list(block.modules()):
            for child_name, child in list(parent.named_children()):
                if not _stacked(child, experts):
                    continue
                params = dict(child.named_parameters(recurse=False))
                names = EXPERT_PROJECTIONS.get(config.model_type)
                gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
                if (names is None or set(params) != {"gate_up_proj", "down_proj"}
                        or not isinstance(getattr(child, "act_fn", None), nn.Module)
                        or getattr(child, "has_bias", False) or getattr(child, "is_transposed", False)
                        or gate_up.dim() != 3 or down.dim() != 3
                        or gate_up.shape[1] != 2 * down.shape[2] or gate_up.shape[2] != down.shape[1]):
                    raise ValueError(f"{type(child).__name__}: stacked experts of a layout this "
                                     f"version does not know ({', '.join(params)})")
                intermediate, hidden = down.shape[2], down.shape[1]
                unstacked = ExpertLinears(experts, hidden, intermediate, names, child.act_fn,
                                          device="meta", dtype=gate_up.dtype)
                for index, expert in enumerate(unstacked):
                    views = (gate_up[index, :intermediate], gate_up[index, intermediate:],
                             down[index])
                    for name, view in zip(names, views):
                        getattr(expert, name).weight = nn.Parameter(view, requires_grad=False)
                setattr(parent, child_name, unstacked)


def _holders(block: nn.Module):
    """(module, its children) for every module of ``block`` that holds experts: a child that is
    an nn.ModuleList (the experts of transformers 4, or :class:`ExpertLinears`)."""
    for module in block.modules():
        children = list(module.children())
        if any(isinstance(child, nn.ModuleList) for child in children):
            yield module, children


def router_ids(block: nn.Module) -> Set[int]:
    """The modules of ``block`` that route tokens to experts: in a module holding experts, each
    direct child that is an nn.Linear or holds parameters but no nn.Linear (transformers 5's
    router). Empty for a dense block."""
    found = set()
    for _, children in _holders(block):
        for child in children:
            if isinstance(child, nn.ModuleList):
                continue
            if isinstance(child, nn.Linear) or (
                    next(child.parameters(), None) is not None
                    and not any(isinstance(m, nn.Linear) for m in child.modules())):
                found.add(id(child))
    return found


def prunable_linears(block: nn.Module) -> Dict[str, nn.Linear]:
    """Every nn.Linear of ``block`` but a router, by its name in the module tree."""
    routers = router_ids(block)
    return {name: m for name, m in block.named_modules()
            if isinstance(m, nn.Linear) and id(m) not in routers}


def expert_layers(block: nn.Module, model_type: str) -> Dict[str, Optional[str]]:
    """{name of an expert's nn.Linear: the name of the Linear of the same expert that reads the
    same input (its gate projection, for its up projection), or None}, by names in the module
    tree. Each sees only the tokens routed to its expert (possibly none in a chunk, or in a whole
    calibration set), so which of them read one input is known from the structure, not from a
    forward: an expert's gate and up projections (EXPERT_PROJECTIONS, the same names in
    transformers 4's expert MLPs and in :class:`ExpertLinears`)."""
    gate, up, _ = EXPERT_PROJECTIONS.get(model_type, (None, None, None))
    names = {id(m): name for name, m in block.named_modules()}
    layers = {}
    for _, children in _holders(block):
        for child in children:
            if not isinstance(child, nn.ModuleList):
                continue
            for expert in child:
                linears = {name: m for name, m in expert.named_children()
                           if isinstance(m, nn.Linear)}
                for name, linear in linears.items():
                    shares = name == up and gate in linears
                    layers[names[id(linear)]] = names[id(linears[gate])] if shares else None
    return layers


def checkpoint_names(model: nn.Module, prefix: str, names) -> Dict[str, str]:
    """{name inside a block: its name in the checkpoint} for the ``names`` (of parameters inside
    a decoder block) that transformers 5 renames when it saves (Mixtral's ``mlp`` is
    ``block_sparse_moe`` on disk), by transformers' own reverse conversion applied to the keys of
    the block whose qualified name is ``prefix``; empty where it has none (transformers 4).
    Transformers' renamings are patterns without block indices, so block 0's serve every block
    (a renaming that moved a key out of its block is refused)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {}
    names = sorted(set(names))
    # a placeholder per key, its value the key's position, to pair each key with its new name
    reverted = revert_weight_conversion(model, {f"{prefix}.{name}": torch.tensor([position])
                                                for position, name in enumerate(names)})
    renamed = {}
    for key, tensor in reverted.items():
        name = names[int(tensor[0])]
        if not key.startswith(prefix + "."):
            raise ValueError(f"transformers saves {prefix}.{name} as {key}, outside its block")
        if key[len(prefix) + 1:] != name:
            renamed[name] = key[len(prefix) + 1:]
    return renamed
