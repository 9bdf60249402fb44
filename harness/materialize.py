"""Allocate a parallelized meta-device model and fill it from the reference weights."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

# Wrappers that checkpointing and compile insert into module paths; state-dict keys omit them.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def materialize(model: nn.Module, reference: nn.Module, device: torch.device | str) -> None:
    """Every rank takes its shards of `reference`'s parameters; buffers are copied whole.

    Non-persistent buffers (rotary `inv_freq`) are not in the state dict and `to_empty` leaves
    them uninitialised, so they are copied by name as well.
    """
    model.to_empty(device=device)
    reference_buffers = dict(reference.named_buffers())
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(reference_buffers[canonical_name(name)])
    set_model_state_dict(model, reference.state_dict(),
                         options=StateDictOptions(full_state_dict=True, strict=False))
