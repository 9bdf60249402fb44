"""Fresh weights for a seed, the same on every layout, without ever building the whole model.

Each module is initialised by the model's own `_init_weights` (so every family keeps its
initialisation: normal projections, unit norms, zero router biases), on full-size temporaries of
that module's tensors alone, under a generator seeded from the seed and the module's canonical
name. A rank then keeps the parts of each temporary that it owns. The random stream of a module
therefore does not depend on which ranks hold it, how it is sharded or which pipeline stage it
sits in, and the largest buffer is one module's tensors. Buffers outside the state dict (rotary
frequencies, Falcon-H1's MuP vector) are computed, not drawn: once for the whole model, as
transformers computes them (`computed_buffers`), for a fresh init and a checkpoint alike.
"""

from __future__ import annotations

import copy
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
        self.computed = computed_buffers(model)

    def _init_for(self, module_name: str):
        prefix = module_name
        while prefix not in self.inits:
            prefix = prefix.rpartition(".")[0]
        return self.inits[prefix]

    def fill(self, module_name: str, module: nn.Module, targets: dict[str, Target]) -> None:
        """Initialises the module's tensors named in `targets` (its direct parameters and buffers)."""
        for target in targets.values():
            if not target.persistent:
                target.local.copy_(self.computed[target.name][target.region])
        targets = {attr: target for attr, target in targets.items() if target.persistent}
        if not targets:
            return
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


def computed_buffers(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The non-persistent buffers of `model` (meta is fine) by name (rotary inv_freq, Falcon-H1's
    MuP vector), as `from_pretrained` computes them: transformers' `initialize_weights` over the
    whole model, each module's init after its children's, so a buffer that an enclosing model's
    init writes (FalconH1Model's, into every mixer) has that value. It runs on a copy whose other
    tensors stay on the meta device."""
    skeleton = copy.deepcopy(model)
    names = []
    # Every path to a module several layers share (Zamba's block) names its buffers.
    for module_name, module in skeleton.named_modules(remove_duplicate=False):
        module.__dict__.pop("_is_hf_initialized", None)  # set by from_config: the init would skip the module
        for attr in module._non_persistent_buffers_set:
            buffer = module._buffers.get(attr)
            if buffer is not None:
                module._buffers[attr] = torch.zeros(buffer.shape, dtype=buffer.dtype)
                names.append(f"{module_name}.{attr}" if module_name else attr)
    skeleton.initialize_weights()
    return {name: skeleton.get_buffer(name) for name in names}


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
