"""Context-parallel attention through transformers' own attention interface.

A family calls attention as `ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v,
mask, scaling=..., softcap=..., sinks=..., ...)` and builds its masks with masking_utils, which
calls `ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]` with the family's composed mask
function (causal, sliding window, chunked, ...). Both are registered here under one name per inner
implementation (`context_parallel_sdpa`, `context_parallel_eager`), so every family that attends
through the interface runs context parallel with its own scaling, soft-cap, sinks and masks:

- the mask function evaluates the family's mask function at the global positions of this rank's
  queries against the global positions of all keys (a [rows, 1, local, seq_len] mask), after
  HF's own packed-sequence handling when documents are masked. A plain causal mask under sdpa is
  not built (None, as HF's own sdpa mask skips it): each of the rank's two chunks then attends to
  the prefix of the sequence that ends with it. On CPU that runs without any mask
  (parallel/cp_causal_attention.py); elsewhere under a bottom-right-aligned causal bias, which
  CUDA's memory-efficient kernel takes without materializing it;
- the attention function all-gathers the key and value heads (before any GQA expansion) over
  the cp group (parallel/cp_keys_values.py), then runs the implementation the model would have
  run (sdpa, or the family's own eager function) on the local queries and all keys. Its backward
  reduce-scatters dK and dV. Under `parallel.cp_rotate=ring` the plain causal CPU path passes
  K/V blocks around the group instead (parallel/cp_ring_attention.py); `check_ring` refuses
  every model whose attention would need a mask there.

This is the all-gather form of context parallel (the one Llama 3 was trained with; it takes any
mask). Under a mask it keeps the whole sequence's K and V per layer on every rank, which is small
next to the queries' activations when keys and values have fewer heads; the plain causal CPU path
keeps only the rank's own and gathers the rest again in backward.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, find_packed_sequence_indices
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from parallel.context_parallel import SequenceShard
from parallel.cp_causal_attention import chunked_causal_attention
from parallel.cp_keys_values import gather_keys_values
from parallel.cp_ring_attention import ring_attention

# The implementations whose masks this module builds: sdpa takes a boolean mask, eager an additive one.
INNER_IMPLEMENTATIONS = ("sdpa", "eager")


def _family_eager_attention(module: nn.Module) -> Callable:
    """The eager attention the family's attention module falls back to: `eager_attention_forward`
    of the module that defines its class (what its forward calls when the implementation is eager)."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    assert function is not None, f"{type(module).__name__} has no eager_attention_forward (validation refuses it)"
    return function


def context_parallel_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, *, shard: SequenceShard, inner: str,
                               **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    attend = _family_eager_attention(module) if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]
    if attention_mask is None:
        assert inner == "sdpa", "local_queries_mask skips only sdpa's plain causal mask"
        if query.device.type == "cpu" and not kwargs.get("dropout") and kwargs.get("position_bias") is None:
            attend_chunks = ring_attention if shard.rotation == "ring" else chunked_causal_attention
            output = attend_chunks(query, key, value, shard, kwargs.get("scaling"))
            return output.transpose(1, 2).contiguous(), None  # HF's attention output is [rows, local, heads, dim]
        assert shard.rotation != "ring", "check_ring refuses what the ring cannot attend"
    key, value = gather_keys_values(key, value, shard)
    if attention_mask is not None:
        return attend(module, query, key, value, attention_mask, **kwargs)
    order = shard.sequence_order.to(key.device)
    key, value = key[:, :, order], value[:, :, order]
    outputs = []
    for index, bias in enumerate(shard.causal_biases):
        end = bias.seq_len_kv
        queries = query[:, :, index * shard.chunk:(index + 1) * shard.chunk]
        output, _ = attend(module, queries, key[:, :, :end], value[:, :, :end], bias, **kwargs)
        outputs.append(output)
    return torch.cat(outputs, dim=1), None  # HF's attention output is [rows, local, heads, dim]


def local_queries_mask(batch_size: int, mask_function: Callable, *, shard: SequenceShard, inner: str,
                       q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                       dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                       **_: object) -> torch.Tensor | None:
    """The family's mask of this rank's queries over the gathered keys: [batch, 1, local, seq_len],
    boolean for sdpa, additive for eager. `mask_function` comes from masking_utils with no packed
    sequence or padding folded in (the model is given an all-true padding mask); documents are
    handled as masking_utils handles packed sequences: positions within the document, and no
    attention across documents."""
    assert q_length == kv_length == shard.local_index.numel() and q_offset == kv_offset == 0, (
        "context parallel trains without a KV cache", q_length, kv_length, q_offset, kv_offset)
    queries, keys = shard.local_index.to(device), shard.gathered_index.to(device)
    batch = torch.arange(batch_size, device=device)[:, None, None, None]
    head = torch.zeros(1, dtype=torch.long, device=device)[None, :, None, None]
    documents = shard.document_positions
    if inner == "sdpa" and documents is None and mask_function is causal_mask_function:
        return None
    if shard.rotation == "ring":
        raise ValueError("parallel.cp_rotate=ring: this model's attention needs a mask other than plain causal "
                         "(a window, chunk or documents), which the ring does not build; "
                         "use parallel.cp_rotate=allgather")
    packed = find_packed_sequence_indices(documents.to(device)) if documents is not None else None
    if packed is None:
        allowed = mask_function(batch, head, queries[None, None, :, None], keys[None, None, None, :])
    else:
        positions = documents.to(device)
        allowed = mask_function(batch, head, positions[:, queries][:, None, :, None],
                                positions[:, keys][:, None, None, :])
        allowed = allowed & (packed[:, queries][:, None, :, None] == packed[:, keys][:, None, None, :])
    allowed = allowed.expand(batch_size, 1, queries.numel(), keys.numel())
    if inner == "sdpa":
        return allowed
    return torch.where(allowed, torch.tensor(0.0, dtype=dtype, device=device), torch.finfo(dtype).min)


def implementation_name(inner: str) -> str:
    return f"context_parallel_{inner}"


def use_context_parallel_attention(model: nn.Module, shard: SequenceShard) -> None:
    """Runs `model`'s attention context parallel over `shard` (its implementation must be one of
    INNER_IMPLEMENTATIONS, which validation checks). Registering again rebinds the name to the
    newest shard: one process trains one model at a time."""
    inner = model.config._attn_implementation
    assert inner in INNER_IMPLEMENTATIONS, inner
    name = implementation_name(inner)
    AttentionInterface.register(name, partial(context_parallel_attention, shard=shard, inner=inner))
    AttentionMaskInterface.register(name, partial(local_queries_mask, shard=shard, inner=inner))
    model.set_attn_implementation(name)


# The layer types whose masks masking_utils builds from positions alone, which this module evaluates
# at global positions. Other mixers (linear attention, state-space, short convolutions, sparse
# attention's indexers) carry state along the sequence or select keys from it, which a split by
# sequence would cut.
SPLITTABLE_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def check_context_parallel(model: nn.Module, seq_len: int, cp: int) -> None:
    """Raises ValueError (one line) where `model` cannot train context parallel over `cp` ranks on
    sequences of `seq_len` tokens: a length that does not split into 2 x cp chunks, a sequence mixer
    other than softmax attention (named by its layer type), attention not called through
    transformers' interface, under a mask of the module's own, or through an implementation whose
    masks are not built here."""
    name, fix = type(model).__name__, "use parallel.cp=1"
    if seq_len % (2 * cp):
        raise ValueError(f"train.seq_len={seq_len}: context parallel cuts each sequence into 2*parallel.cp={2 * cp} "
                         f"equal chunks; use a seq_len divisible by {2 * cp}")
    for layer_type in getattr(model.config, "layer_types", None) or ():
        if layer_type not in SPLITTABLE_LAYER_TYPES:
            raise ValueError(f"parallel.cp={cp}: {name} has '{layer_type}' layers, whose sequence mixing context "
                             f"parallel cannot split (it splits {', '.join(SPLITTABLE_LAYER_TYPES)}); {fix}")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"parallel.cp={cp}: {name} does not call attention through transformers' "
                         f"AttentionInterface, which context parallel runs on; {fix}")
    own_mask = attention_under_its_own_mask(model)
    if own_mask is not None:
        module, mask = own_mask
        raise ValueError(f"parallel.cp={cp}: {name}'s {module} attends under a mask it makes itself ({mask}), not "
                         f"the position mask context parallel builds over the whole sequence; {fix}")
    inner = model.config._attn_implementation
    if inner not in INNER_IMPLEMENTATIONS:
        raise ValueError(f"parallel.cp={cp}: {name} attends with '{inner}', whose masks context parallel does not "
                         f"build (it builds {' and '.join(INNER_IMPLEMENTATIONS)} masks); {fix}")


def check_ring(model: nn.Module) -> None:
    """Raises ValueError (one line) where `model`'s attention needs more than plain causal attention
    without dropout, all the ring form runs: an implementation other than sdpa, layers other than
    full attention, the sliding window or attention chunks masking_utils reads from the config, or
    attention dropout."""
    config, name = model.config, type(model).__name__
    inner = config._attn_implementation
    reasons = [(inner != "sdpa", f"attends with '{inner}', and the ring runs sdpa"),
               (any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()),
                "has layers other than full attention, whose masks the ring does not build"),
               (getattr(config, "sliding_window", None) is not None,
                "has a sliding window, whose mask the ring does not build"),
               (getattr(config, "attention_chunk_size", None) is not None,
                "attends in chunks, whose mask the ring does not build"),
               ((getattr(config, "attention_dropout", 0) or 0) > 0,
                "has attention dropout, which the ring does not apply")]
    for refused, what in reasons:
        if refused:
            raise ValueError(f"parallel.cp_rotate=ring: {name} {what} (it runs plain causal attention); "
                             "use parallel.cp_rotate=allgather")


def attention_under_its_own_mask(model: nn.Module) -> tuple[str, str] | None:
    """A module class of `model` whose forward calls the attention interface with a mask other than
    one it was given (the mask masking_utils built, which is what context parallel replaces), and
    that mask's expression; None when every one passes its argument on. Doge's attention, say,
    adds a bias computed from each key's value to the mask: under context parallel the module
    would see only this rank's keys."""
    for cls in dict.fromkeys(type(module) for module in model.modules()):
        try:
            source = textwrap.dedent(inspect.getsource(cls.forward))
        except (OSError, TypeError):  # no Python source (a builtin or C++ module)
            continue
        forward = ast.parse(source).body[0]
        if not isinstance(forward, ast.FunctionDef):
            continue
        given = {argument.arg for argument in forward.args.args + forward.args.kwonlyargs}
        # `attention_interface`: the name transformers' families give the function they take from
        # ALL_ATTENTION_FUNCTIONS; its mask is the fifth argument or `attention_mask=`.
        for node in ast.walk(forward):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "attention_interface"):
                continue
            masks = [keyword.value for keyword in node.keywords if keyword.arg == "attention_mask"] + node.args[4:5]
            if masks and not (isinstance(masks[0], ast.Name) and masks[0].id in given):
                return cls.__name__, ast.unparse(masks[0])
    return None
