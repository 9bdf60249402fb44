"""Fresh weights for a seed, the same on every layout, without ever building the whole model.

Each module is initialised by the model's own `_init_weights` (so every family keeps its
initialisation: normal projections, unit norms, zero router biases, rotary frequencies), on
full-size temporaries of that module's tensors alone, under a generator seeded from the seed and
the module's canonical name. A rank then keeps the parts of each temporary that it owns. The
random stream of a module therefore does not depend on which ranks hold it, how it is sharded or
which pipeline stage it sits in, and the largest buffer is one module's tensors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel


@dataclass
class Target:
    """A tensor to fill: `local` receives `full[region]` of the global tensor named `name`."""
    name: str  # canonical state-dict name
    local: torch.Tensor
    global_shape: torch.Size
    region: tuple[slice, ...]
    persistent: bool  # False for buffers outside the state dict (rotary inv_freq)


def module_seed(seed: int, module_name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SeededInit:
    """HF's `_init_weights` of `model` (any instance of the family, meta is fine), per module:
    as transformers does, each module gets the one of its nearest enclosing pretrained model
    (xLSTM's backbone initialises its embeddings through `self.embeddings`)."""

    def __init__(self, model: nn.Module, seed: int) -> None:
        self.inits = {name: sub._init_weights for name, sub in model.named_modules() if isinstance(sub, PreTrainedModel)}
        assert "" in self.inits, "a transformers model"
        self.seed = seed

    def _init_for(self, module_name: str):
        prefix = module_name
        while prefix not in self.inits:
            prefix = prefix.rpartition(".")[0]
        return self.inits[prefix]

    def fill(self, module_name: str, module: nn.Module, targets: dict[str, Target]) -> None:
        """Initialises the module's tensors named in `targets` (its direct parameters and buffers)."""
        originals = []
        for owner in module.modules():
            for store in (owner._parameters, owner._buffers):
                for attr, tensor in store.items():
                    if tensor is not None:
                        originals.append((store, attr, tensor))
                        store[attr] = _stand_in(tensor, targets.get(attr) if owner is module else None,
                                                as_parameter=store is owner._parameters)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(module_seed(self.seed, module_name))
                self._init_for(module_name)(module)
            # Read back from the module: an init may assign a new tensor rather than fill in place.
            for attr, target in targets.items():
                target.local.copy_(getattr(module, attr)[target.region])
        finally:
            for store, attr, original in originals:
                store[attr] = original


def _stand_in(tensor: torch.Tensor, target: Target | None, as_parameter: bool) -> torch.Tensor:
    """What the family's init writes into instead of `tensor`: a full-size zero tensor for a
    target (zeros, not empty: a tensor the init leaves alone must still be the same everywhere),
    else a meta tensor that takes the writes and keeps nothing. Not targets: a tied weight its
    first owner filled (CTRL's head holds one next to its bias) and sub-modules' tensors, which a
    family's init may also write (FalconMamba's mixer sets its convolution's and projections') and
    which their own module's init fills; the real ones may be DTensor shards, which each would
    draw from another stream or not fit a plain write."""
    if target is not None:
        full = torch.zeros(target.global_shape, dtype=tensor.dtype)
    else:
        full = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    return nn.Parameter(full, requires_grad=False) if as_parameter else full
