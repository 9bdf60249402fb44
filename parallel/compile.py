"""torch.compile per transformer block, applied after activation checkpointing and before FSDP
(TorchTitan's order): each block compiles once and is reused by every layer of its shape, FSDP's
hooks stay outside the compiled code, and a checkpointed block compiles together with its
selective-AC policy.
"""

from __future__ import annotations

import shutil

import torch
from torch import nn


def compile_unavailable_reason(device_type: str) -> str | None:
    """Why inductor cannot compile here (None when it can). On CPU it builds C++ kernels."""
    if device_type != "cpu":
        return None
    try:
        from torch._inductor import cpp_builder

        compiler = cpp_builder.get_cpp_compiler()
    except Exception as e:  # private API: a failure means inductor would fail the same way
        return f"no C++ compiler for inductor ({type(e).__name__}: {e})"
    if shutil.which(compiler) is None:
        return f"no C++ compiler for inductor ({compiler} not found; install one or set CXX)"
    return None


def compile_layers(model: nn.Module, layers: nn.ModuleList | nn.ModuleDict) -> None:
    """Replaces each block of `layers` (in `layers` and in `model`'s tree) by its compiled module."""
    slots = list(layers.items()) if isinstance(layers, nn.ModuleDict) else list(enumerate(layers))
    for key, layer in slots:
        parents = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
                   if child is layer]
        compiled = torch.compile(layer)
        # transformers wraps some attention classes' forward (`use_kernelized_func`, from the
        # `kernels` package: Llama's, for its rotary embedding) to set a module-level context
        # variable and reset it on return. Inside a checkpointed block dynamo refuses that
        # mutation (it cannot replay it when the backward recomputes the forward) and ran the
        # block eagerly; the pair cancels out and only routes which function the traced graph
        # calls, so the recomputation needs no replay.
        compiled.forward = torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)(
            compiled.forward)
        for parent, name in parents:
            setattr(parent, name, compiled)
        layers[key] = compiled
