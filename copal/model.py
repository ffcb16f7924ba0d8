"""A LLaMA-family causal LM seen as embeddings -> decoder blocks -> final norm -> head, with the
blocks run and (for checkpoints on disk) materialised one at a time.

The parts are found from the config and the module tree (the ModuleList of
``config.num_hidden_layers`` blocks, the input/output embeddings, the module holding the rotary
``inv_freq``; the prunable layers are every nn.Linear inside a block), never from name strings;
checkpoint keys are the modules' qualified names. Everything around the blocks (embedding scale,
attention masks, rotary embeddings, final norm, head, soft-capping) runs through the model's own
forward (:meth:`LayeredModel._trace`).
"""

import contextlib
import copy
import ctypes
import hashlib
import json
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .checkpoint import CheckpointError, ShardReader, read_config_json, tensor_digest
from .experts import (checkpoint_names, expert_layers, num_experts, prunable_linears,
                      router_ids, unstack_experts)

# decoders whose blocks are attention + MLP (or mixture of experts) of nn.Linear layers, with
# one rotary embedding, run through the model's own forward (tests/driver/test_model.py checks
# each against it)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "granite",
                         "gemma2", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe")


DTYPE_NAMES = ("float32", "bfloat16", "float16")  # compute and save dtypes, by torch's names


def resolve_dtype(dtype, device) -> torch.dtype:
    """``"auto"``: bf16 on a GPU, fp32 on a CPU (CPUs without bf16 matrix units, such as the
    project's 2-core machines, run bf16 matmuls several times slower than fp32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return getattr(torch, dtype)


def check_execution(*, device, dtype="auto", batch_size="auto", offload_activations=False) -> None:
    """Refuse, before any work, where and how a verb cannot run: a device that is not ``cpu``
    or an available ``cuda[:i]``, an unknown dtype, a batch size that is not a positive integer
    or ``auto``, and ``offload_activations`` on a CPU (the activations are in host memory
    already; the option moves them there from a GPU)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: not a device name (cpu, cuda, cuda:1)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: copal runs on cpu or cuda")
    if parsed.type == "cpu" and parsed.index not in (None, 0):
        raise ValueError(f"device {device!r}: the CPU is one device; use cpu")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is available to this torch "
                             f"({torch.__version__}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA "
                             "device(s) are visible")
    resolve_dtype(dtype, device)
    if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                 or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    if offload_activations and parsed.type == "cpu":
        raise ValueError("offload_activations keeps a GPU run's activations in host memory; on "
                         "the CPU they are there already (drop the option)")


class UnsupportedModelError(ValueError):
    """The model is not a supported LLaMA-family decoder."""


def _check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


class LayeredModel:
    """Block-wise access to a causal LM.

    Build with :meth:`from_model` (an in-memory ``PreTrainedModel``; its blocks are used in
    place) or :meth:`from_checkpoint` (a directory of safetensors shards; only the non-block parts
    are loaded up front, each block is read from its shards by :meth:`load_block` and dropped by
    :meth:`unload_block`).
    """

    def __init__(self, model: PreTrainedModel, reader: Optional[ShardReader] = None,
                 source: Optional[Path] = None):
        _check_supported(model.config)
        model.requires_grad_(False)
        self.model = model
        self.config = model.config
        self.reader = reader
        self.source = source
        self.stored_dtypes: Dict[str, torch.dtype] = {}  # checkpoint key -> dtype on disk
        self.dtype = next(model.get_input_embeddings().parameters()).dtype
        # the decoder (the module that runs the blocks): the parent of the one ModuleList of
        # config.num_hidden_layers modules
        lists = [name for name, m in model.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) == model.config.num_hidden_layers]
        base = model.get_submodule(lists[0].rpartition(".")[0]) if len(lists) == 1 else model
        self.base = base
        blocks = [m for m in base.children()
                  if isinstance(m, nn.ModuleList) and len(m) == model.config.num_hidden_layers]
        # rotary embeddings: buffers, no weights (Gemma 3 in transformers 4.x has two)
        self.rotaries = [m for m in base.children() if next(m.buffers(), None) is not None
                         and next(m.parameters(), None) is None]
        if len(blocks) != 1 or not self.rotaries:
            raise UnsupportedModelError(
                f"{type(model).__name__}: cannot find one list of {model.config.num_hidden_layers} "
                "decoder blocks and a rotary embedding"
            )
        self.blocks: nn.ModuleList = blocks[0]
        try:  # transformers 5's stacked experts as one Linear per expert projection
            unstack_experts(model, self.blocks)
        except ValueError as error:
            raise UnsupportedModelError(str(error)) from None
        self.embed = model.get_input_embeddings()
        self.head = model.get_output_embeddings()
        # qualified module names are the checkpoint keys' prefixes
        self.module_names = {id(module): name for name, module in model.named_modules()}
        others = [m for m in base.children()
                  if m is not self.blocks and m not in self.rotaries and m is not self.embed
                  and any(True for _ in m.parameters())]
        if len(others) != 1:
            raise UnsupportedModelError(f"{type(model).__name__}: cannot find the final norm")
        self.norm = others[0]
        self.block_names = [self.module_names[id(block)] for block in self.blocks]
        # names inside a block that the checkpoint spells otherwise (transformers 5's renamings)
        try:
            self._renamed = checkpoint_names(model, self.block_names[0], (
                name for block in self.blocks for name, _ in block.named_parameters())) \
                if num_experts(self.config) else {}
        except ValueError as error:
            raise UnsupportedModelError(str(error)) from None
        parent, _, attribute = self.module_names[id(self.blocks)].rpartition(".")
        self._blocks_parent = (model.get_submodule(parent), attribute)
        self._block_index = {id(block): index for index, block in enumerate(self.blocks)}
        self._tuples = [None]  # whether the model's forward expects blocks to return tuples
        self._context_key = self._context = None
        self._block_buffers: Dict[int, Dict[str, torch.Tensor]] = {}  # lazy: rebuilt, by name
        for index, block in enumerate(self.blocks):
            linears = self.linears(block)
            routers = router_ids(block)
            known = {id(m.weight) for m in linears.values()}
            known |= {id(p) for m in block.modules() if id(m) in routers for p in m.parameters()}
            unknown = [name for name, p in block.named_parameters()
                       if p.dim() >= 2 and id(p) not in known]
            if not linears or unknown:
                raise UnsupportedModelError(
                    f"block {index}: " + (f"{unknown[0]} is a weight outside any nn.Linear"
                                          if unknown else "no nn.Linear layer to prune"))

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: PreTrainedModel) -> "LayeredModel":
        return cls(model)

    @classmethod
    def from_checkpoint(cls, directory, dtype: torch.dtype = torch.bfloat16) -> "LayeredModel":
        """Open a local checkpoint; loads embeddings, final norm and head, no block. Every
        tensor the model needs is checked against the shards' headers first (present, with the
        shape the config implies). Raises CheckpointError, UnsupportedModelError."""
        directory = Path(directory)
        reader = ShardReader(directory)
        read_config_json(directory)  # a malformed file gets a one-line error naming it
        try:
            config = AutoConfig.from_pretrained(directory)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{directory / 'config.json'}: transformers cannot read it "
                                  f"({error})") from None
        return cls.from_reader(config, reader, dtype, directory)

    @classmethod
    def from_reader(cls, config, reader, dtype: torch.dtype = torch.bfloat16,
                    source=None) -> "LayeredModel":
        """A lazy model over any tensor source with ``weight_map`` (checkpoint key -> where) and
        ``read(keys) -> {key: host tensor}``: a :class:`ShardReader`, or the synthetic source of
        :mod:`copal.synthetic`. Loads embeddings, final norm and head, no block."""
        _check_supported(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        layered = cls(model, reader, source)
        if hasattr(reader, "headers"):
            layered._check_stored_shapes()
        layered._materialise_outer()
        return layered

    def _check_stored_shapes(self) -> None:
        """Every tensor of the blocks and the outer modules is in the checkpoint, in a float
        dtype, with the shape that the config gives it; and the blocks hold no tensor the config
        does not use (a config with fewer layers than the shards). Read from the shards'
        headers, no data. Records each tensor's stored dtype (:attr:`stored_dtypes`)."""
        expected = {}
        for index in range(self.num_blocks):
            for key, name in self.block_keys(index).items():
                expected[key] = tuple(self.blocks[index].get_parameter(name).shape)
        for key, tensor in self._outer_parameters().items():
            expected[key] = tuple(tensor.shape)
        head_key = f"{self.module_names[id(self.head)]}.weight"
        if getattr(self.config, "tie_word_embeddings", False) or head_key not in self.reader.weight_map:
            expected.pop(head_key, None)  # tied, or checked when the outer modules load
        headers = self.reader.headers()
        for key, shape in expected.items():
            if key not in headers:
                raise CheckpointError(f"{self.source}: tensor {key!r} is in no shard")
            dtype, stored = headers[key]
            where = self.source / self.reader.weight_map[key]
            if not isinstance(dtype, torch.dtype):
                raise CheckpointError(f"{where}: tensor {key!r} is stored as {dtype}, not a "
                                      "float dtype")
            if stored != shape:
                raise CheckpointError(f"{where}: tensor {key!r} has shape {list(stored)}, the "
                                      f"config implies {list(shape)}")
            self.stored_dtypes[key] = dtype
        prefix = self.block_names[0].rsplit(".", 1)[0] + "." if self.block_names else None
        unused = sorted(key for key in headers if prefix and key.startswith(prefix)
                        and key not in expected)
        if unused:
            raise CheckpointError(
                f"{self.source}: the checkpoint holds {unused[0]!r} (and {len(unused) - 1} more "
                f"block tensors) that a model of this config ({self.config.num_hidden_layers} "
                "blocks) does not use; is config.json the checkpoint's own?")

    def _outer_parameters(self) -> Dict[str, torch.Tensor]:
        """Checkpoint key -> parameter of every module outside the blocks (tied ones once)."""
        block_ids = {id(p) for p in self.blocks.parameters()}
        params, seen = {}, set()
        for module in (self.embed, self.norm, self.head):
            for pname, param in module.named_parameters():
                if id(param) in block_ids or id(param) in seen:
                    continue
                seen.add(id(param))
                params[f"{self.module_names[id(module)]}.{pname}"] = param
        return params

    def _materialise_outer(self) -> None:
        """Load every parameter outside the blocks and rebuild their buffers on the host."""
        names = self.module_names
        block_ids = {id(p) for p in self.blocks.parameters()}
        wanted = {}
        for module in (self.embed, self.norm, self.head):
            for pname, param in module.named_parameters():
                if id(param) in block_ids:
                    continue
                wanted[f"{names[id(module)]}.{pname}"] = (module, pname)
        tied = getattr(self.config, "tie_word_embeddings", False)
        head_key = f"{names[id(self.head)]}.weight"
        if tied or head_key not in self.reader.weight_map:
            wanted.pop(head_key, None)
        tensors = self.reader.read(wanted)
        for key, (module, pname) in wanted.items():
            setattr(module, pname, nn.Parameter(tensors[key].to(self.dtype), requires_grad=False))
        if head_key not in wanted:
            if not tied and head_key not in self.reader.weight_map:
                raise CheckpointError(f"{self.source}: no {head_key} and embeddings are not tied")
            self.head.weight = self.embed.weight
        self._rebuild_buffers()

    def _rebuild_buffers(self) -> None:
        """The buffers (rotary frequencies, Gemma's embedding scale; in transformers 4's
        Qwen2-MoE a rotary embedding inside every block), which a model built on the meta device
        lacks, computed by the model class itself: a twin of the config with one block per layer
        type is built on the host and its buffers copied by name, a block's from the twin's
        block of its layer type (kept in :attr:`_block_buffers` for :meth:`load_block`)."""
        missing = {name: b for name, b in self.model.named_buffers() if b.is_meta}
        if not missing:
            return
        types = getattr(self.config, "layer_types", None)
        types = types if isinstance(types, list) else [None] * self.num_blocks
        twin_block = {index: list(dict.fromkeys(types)).index(kind)
                      for index, kind in enumerate(types)}
        prefix = self.module_names[id(self.blocks)] + "."

        def in_block(name):  # (block index, name inside it), or None outside the blocks
            if not name.startswith(prefix):
                return None
            index, _, rest = name[len(prefix):].partition(".")
            return int(index), rest

        def twin_name(name):  # a block's buffer -> the twin's block of its layer type
            where = in_block(name)
            return name if where is None else f"{prefix}{twin_block[where[0]]}.{where[1]}"

        made = None
        for one_head in (True, False):  # a one-head twin where the config takes head_dim
            twin = self._twin_buffers(one_head)
            if all(twin_name(name) in twin and twin[twin_name(name)].shape == b.shape
                   for name, b in missing.items()):
                made = twin
                break
        if made is None:
            raise UnsupportedModelError(f"{type(self.model).__name__}: cannot rebuild its "
                                        f"buffers {', '.join(missing)} when streaming the "
                                        "checkpoint")
        self._block_buffers = {index: {} for index in range(self.num_blocks)}
        for name in missing:
            where = in_block(name)
            if where is not None:
                self._block_buffers[where[0]][where[1]] = made[twin_name(name)].clone()
            else:
                owner, _, attribute = name.rpartition(".")
                self.model.get_submodule(owner)._buffers[attribute] = made[name].clone()

    def _twin_buffers(self, one_head: bool) -> Dict[str, torch.Tensor]:
        """The buffers of a small host model of this config: one block of each layer type, a
        tiny vocabulary and MLP, and (``one_head``) one attention head of the same width."""
        small = copy.deepcopy(self.config)
        small.num_hidden_layers = 1
        if isinstance(getattr(small, "layer_types", None), list):
            small.layer_types = list(dict.fromkeys(small.layer_types))
            small.num_hidden_layers = len(small.layer_types)
        small.intermediate_size, small.vocab_size = 8, 8
        for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
            if getattr(small, key, None):
                setattr(small, key, 8)
        for key in ("num_local_experts", "num_experts"):  # as few experts as a token takes
            if getattr(small, key, None):
                setattr(small, key, getattr(small, "num_experts_per_tok", None) or 1)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if isinstance(getattr(small, key, None), int):
                setattr(small, key, 0)
        if one_head:
            small.head_dim = (getattr(self.config, "head_dim", None)
                              or self.config.hidden_size // self.config.num_attention_heads)
            small.num_attention_heads = small.num_key_value_heads = 1
        try:
            return dict(AutoModelForCausalLM.from_config(small, dtype=self.dtype).named_buffers())
        except (ValueError, TypeError, RuntimeError):
            return {}

    # ---- blocks -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def lazy(self) -> bool:
        return self.reader is not None

    def _stored(self, name: str) -> str:
        """A parameter's name in a block as the checkpoint spells it (transformers 5 names
        Mixtral's ``block_sparse_moe`` ``mlp`` in memory)."""
        return self._renamed.get(name, name)

    def layer_name(self, name: str) -> str:
        """A Linear's name in a block, as the checkpoint spells it: the same in every
        transformers version, so states and reports made under one serve the other."""
        return self._stored(f"{name}.weight")[:-len(".weight")]

    def linears(self, block: nn.Module) -> Dict[str, nn.Linear]:
        """The prunable layers of a block: every nn.Linear but a mixture-of-experts router
        (copal.experts), by :meth:`layer_name`."""
        return {self.layer_name(name): m for name, m in prunable_linears(block).items()}

    def routers(self, block: nn.Module) -> frozenset:
        """The names of the block's mixture-of-experts routers (never pruned; copal.experts)."""
        ids = router_ids(block)
        return frozenset(self.layer_name(name) for name, m in block.named_modules()
                         if id(m) in ids)

    def expert_layers(self, block: nn.Module) -> Dict[str, Optional[str]]:
        """The block's experts' Linears (copal.experts.expert_layers), by :meth:`layer_name`."""
        return {self.layer_name(name): owner and self.layer_name(owner)
                for name, owner in expert_layers(block, self.config.model_type).items()}

    def block_keys(self, index: int) -> Dict[str, str]:
        """{checkpoint key: parameter name in the block} of block ``index``."""
        prefix = self.block_names[index]
        return {f"{prefix}.{self._stored(name)}": name
                for name, _ in self.blocks[index].named_parameters()}

    def checkpoint_state(self, index: int, block: nn.Module) -> Dict[str, torch.Tensor]:
        """``block``'s (block ``index``'s) tensors by checkpoint key, to write."""
        prefix = self.block_names[index]
        return {f"{prefix}.{self._stored(name)}": tensor.detach()
                for name, tensor in block.state_dict().items()}

    def read_block_state(self, index: int) -> Dict[str, torch.Tensor]:
        """The block's tensors as stored in the source checkpoint (names relative to the block)."""
        keys = self.block_keys(index)
        tensors = self.reader.read(keys)
        return {keys[key]: tensor.to(self.dtype) for key, tensor in tensors.items()}

    def load_block(self, index: int, device, state: Optional[Dict[str, torch.Tensor]] = None,
                   owned: bool = False) -> nn.Module:
        """Put block ``index`` on ``device`` (reading it from the checkpoint when lazy, or taking
        ``state``) and return it. ``owned``: ``state``'s tensors are fresh copies already on
        ``device`` that the block takes over as they are (a prefetched block)."""
        block = self.blocks[index]
        if state is None and self.lazy:
            state = self.read_block_state(index)
        for name, buffer in self._block_buffers.get(index, {}).items():
            owner, _, attribute = name.rpartition(".")
            block.get_submodule(owner)._buffers[attribute] = buffer
        if state is not None and owned:
            block.load_state_dict(state, strict=True, assign=True)
            block.requires_grad_(False)
        elif state is not None:
            if any(p.is_meta for p in block.parameters()):  # lazy: the loaded tensors become the block
                copy = getattr(self.reader, "shares_tensors", False)  # the source keeps its own
                block.load_state_dict({k: v.to(device, copy=copy) for k, v in state.items()},
                                      strict=True, assign=True)
                block.requires_grad_(False)
            else:  # copy into the block's own tensors, never alias (pruning writes in place)
                block.to(device)
                block.load_state_dict(state, strict=True)
        return block.to(device)

    def unload_block(self, index: int, device="cpu") -> None:
        """Move a finished block off the accelerator; a lazy model drops its weights entirely."""
        self.blocks[index].to("meta" if self.lazy else device)
        if self.lazy:  # its weights are gone: give their memory back (in-memory models keep theirs)
            _release_host_memory()

    def block_state(self, index: int) -> Dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.blocks[index].state_dict().items()}

    def outer_state(self) -> Dict[str, torch.Tensor]:
        """Every tensor outside the blocks, by checkpoint key (tied weights once)."""
        return {key: param.detach() for key, param in self._outer_parameters().items()}

    # ---- checks before any work ---------------------------------------------------------------
    def check_pattern(self, pattern) -> None:
        """Every prunable layer of every block can take ``pattern`` (a :class:`Pattern`);
        raises ValueError naming the first that cannot. Reads no weights."""
        for index, block in enumerate(self.blocks):
            for name, linear in self.linears(block).items():
                pattern.check_layer(f"block {index} {name}", linear.in_features)

    def check_seq_len(self, seq_len: int) -> None:
        """Windows of ``seq_len`` tokens fit the model's positions (ValueError otherwise)."""
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit is not None and seq_len > limit:
            raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings "
                             f"({limit})")

    def fingerprint(self) -> str:
        """What identifies this model's computation: the architecture fields of its config and
        every weight's name, shape and value (as fp32, so a bf16 checkpoint and its fp32 copy in
        memory agree), not where it is stored. Checkpoints hash their shards once (cached by
        file identity); an in-memory model hashes its tensors."""
        digest = hashlib.sha256(json.dumps(_architecture(self.config), sort_keys=True).encode())
        if self.lazy:
            keys = [key for index in range(self.num_blocks) for key in self.block_keys(index)]
            keys += list(self._outer_parameters())
            tensors = self.reader.tensor_digests(keys)
        else:
            tensors = {key: tensor_digest(param) for key, param in self._outer_parameters().items()}
            for index in range(self.num_blocks):
                for key, tensor in self.checkpoint_state(index, self.blocks[index]).items():
                    tensors[key] = tensor_digest(tensor)
        for key in sorted(tensors):
            digest.update(f"{key}:{tensors[key]};".encode())
        return digest.hexdigest()[:32]

    # ---- running ------------------------------------------------------------------------------
    # The parts around the blocks run through the model's own forward (transformers' code), with
    # every decoder layer replaced by a probe: what a layer receives (its attention mask from
    # transformers' mask utilities: causal, sliding-window or per-layer ``layer_types``; its
    # rotary embeddings, per layer type where a model has several; positions) and what the model
    # does to the embeddings and the final hidden states (Gemma's scaling, Granite's multipliers,
    # logit soft-capping) are exactly the model's, in every transformers version it runs on.

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, S] -> the first block's input [B, S, H], as the model computes it."""
        seen = self._trace(input_ids=input_ids, stop_at=0)
        return seen[0][0]

    def block_context(self, hidden: torch.Tensor):
        """What the model gives each block for a batch of full windows shaped like ``hidden``
        [B, S, H]: per block index, its keyword arguments (attention mask, rotary embeddings,
        positions). Cached for the last shape, device and dtype."""
        key = (tuple(hidden.shape[:2]), hidden.device, hidden.dtype)
        if self._context_key != key:
            ids = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            seen = self._trace(input_ids=ids)
            self._context = {index: record[1] for index, record in seen.items()}
            self._context_key = key
        return self._context

    def run_block(self, block: nn.Module, hidden: torch.Tensor, context) -> torch.Tensor:
        output = block(hidden, **context[self._block_index[id(block)]])
        return output[0] if isinstance(output, tuple) else output  # 4.x returns a tuple

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last block's output [B, S, H] -> logits [B, S, V], through the model's own final
        norm, head and whatever its forward does after them (soft-capping, scaling)."""
        ids = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        self._outer_to(hidden.device, head=True)
        with self._probes(stop_at=None, seen={}):
            handle = self.norm.register_forward_pre_hook(lambda module, args: (hidden,) + args[1:])
            try:
                return self.model(input_ids=ids, use_cache=False).logits
            finally:
                handle.remove()

    def _trace(self, stop_at: Optional[int] = None, **inputs) -> Dict[int, tuple]:
        """Run the base model's forward on ``inputs`` with probes for the blocks: {index:
        (hidden input, keyword arguments)}; stops at block ``stop_at`` or before the final norm."""
        seen: Dict[int, tuple] = {}
        self._outer_to(inputs["input_ids"].device)
        with self._probes(stop_at, seen):
            handle = self.norm.register_forward_pre_hook(_stop)
            try:
                self.base(**inputs, use_cache=False)
            except _Stop:
                pass
            finally:
                handle.remove()
        if len(seen) < (len(self.blocks) if stop_at is None else stop_at + 1):
            raise UnsupportedModelError(f"{type(self.model).__name__}: its forward did not run "
                                        "every decoder block in order")
        return seen

    def _outer_to(self, device, head: bool = False) -> None:
        """The modules the traced forward runs outside the blocks onto ``device`` (where they
        already are, after the first call); the final norm and head only for logits."""
        for module in [self.embed, *self.rotaries] + ([self.norm, self.head] if head else []):
            module.to(device)

    @contextlib.contextmanager
    def _probes(self, stop_at, seen):
        """The blocks replaced by :class:`_Probe` in the model while the context runs."""
        probes = nn.ModuleList(_Probe(index, block, seen, stop_at, self._tuples)
                               for index, block in enumerate(self.blocks))
        parent, name = self._blocks_parent
        setattr(parent, name, probes)
        try:
            yield
        finally:
            setattr(parent, name, self.blocks)


class _Stop(Exception):
    """Ends a traced forward once what was needed is recorded."""


def _stop(module, args):
    raise _Stop


class _Probe(nn.Module):
    """Stands in for decoder block ``index`` during a traced forward: records the hidden states
    and keyword arguments the model passes it and returns the hidden states unchanged, as a
    tensor or as a 1-tuple, as the model's version expects (``tuples``: a one-element list,
    found on the first trace from whether the next block receives what this one returned)."""

    def __init__(self, index, block, seen, stop_at, tuples):
        super().__init__()
        self.index, self.seen, self.stop_at, self.tuples = index, seen, stop_at, tuples
        for attribute in ("attention_type", "layer_type", "is_sliding"):  # read by some forwards
            if hasattr(block, attribute):
                setattr(self, attribute, getattr(block, attribute))

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise UnsupportedModelError("the model passes its decoder blocks positional "
                                        "arguments beyond the hidden states")
        previous = self.seen.get(self.index - 1)
        if previous is not None and self.tuples[0] is None:  # what the previous probe returned
            self.tuples[0] = hidden_states is not previous[0]
        context = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        self.seen[self.index] = (hidden_states, context)
        if self.index == self.stop_at:
            raise _Stop
        return (hidden_states,) if self.tuples[0] else hidden_states


# the config fields that decide what a LLaMA-family model computes, beside its tensors
_ARCHITECTURE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                      "rms_norm_eps", "hidden_act", "tie_word_embeddings", "sliding_window")


# fields that only some architectures have: in the fingerprint where set (so the fingerprints
# of the architectures supported before them stay what their states recorded)
_OPTIONAL_ARCHITECTURE_KEYS = ("layer_types", "use_sliding_window", "attn_logit_softcapping",
                               "final_logit_softcapping", "query_pre_attn_scalar",
                               "embedding_multiplier", "residual_multiplier",
                               "attention_multiplier", "logits_scaling", "rope_local_base_freq",
                               "num_experts_per_tok",
                               "moe_intermediate_size", "shared_expert_intermediate_size",
                               "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers")


def _architecture(config) -> dict:
    fields = {key: getattr(config, key, None) for key in _ARCHITECTURE_KEYS}
    if num_experts(config):  # Mixtral's num_local_experts, which transformers 5 also calls num_experts
        fields["num_experts"] = num_experts(config)
    for key in _OPTIONAL_ARCHITECTURE_KEYS:
        value = getattr(config, key, None)
        if value and not (key == "layer_types" and set(value) == {"full_attention"}):
            fields[key] = value
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    fields["rope_theta"] = getattr(config, "rope_theta", None) or (
        rope.get("rope_theta") if isinstance(rope, dict) else None)
    return fields


_LIBC = None


def _release_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only). Once glibc has raised its mmap
    threshold, freed multi-MB tensors stay in its heap, and a block sweep's resident memory
    creeps up by most of a block per block (measured: 32 synthetic blocks, +290 MiB without,
    flat with; tests/driver/test_synthetic.py)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
