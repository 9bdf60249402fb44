"""Export a checkpoint as a Hugging Face model directory, streaming.

`python -m harness.export CHECKPOINT OUT_DIR`: CHECKPOINT is a `step_XXXXXXX` folder, or a
checkpoint directory (its newest complete checkpoint is taken). Runs in one process without a
process group and never holds the whole model: the tensors are grouped into shard files of at
most `max_shard_bytes`, and for each file DCP reads just that file's tensors, whole, out of
every saved shard (FSDP, pipeline stages, expert-parallel experts), so the layout that wrote the
checkpoint does not matter. Tensors are written in the layout `save_pretrained` writes
(transformers' conversion mapping reversed: MoE experts one tensor per expert, projections the
family's checkpoints fuse joined back), as `model.safetensors`, or
`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`; the tensors one reversed
conversion joins go into one file together.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.core_model_loading import revert_weight_conversion

from harness.checkpoint import check_checkpoint, complete_checkpoints
from harness.checkpoint_conversion import save_units
from harness.hf_checkpoint import INDEX_FILE

# transformers' own default is 50 GB; smaller files load and copy more easily.
MAX_SHARD_BYTES = 5 * 2**30


def find_checkpoint(path: str) -> str:
    """`path` itself when it is a checkpoint, else the newest complete one under it."""
    if os.path.isfile(os.path.join(path, ".metadata")):
        return path
    found = complete_checkpoints(path)
    if not found:
        raise ValueError("neither a checkpoint nor a directory holding step_XXXXXXX checkpoints")
    return found[-1][1]


def export(checkpoint: str, out_dir: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Writes the HF directory; returns the checkpoint it was made from."""
    checkpoint = find_checkpoint(checkpoint)
    try:
        check_checkpoint(checkpoint)
    except ValueError as e:
        raise ValueError(f"{os.path.basename(checkpoint)} is corrupt ({e})") from None
    config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    # Training turns the KV cache off (activation checkpointing recomputes with it otherwise);
    # generation with the exported model wants it back.
    config.use_cache = True
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Non-persistent buffers (rotary inv_freq) are not in the state dict: from_pretrained computes them.
    # Tied parameters are written once, under their first name, as save_pretrained does.
    persistent = model.state_dict()
    tensors = {**dict(model.named_parameters()), **{n: b for n, b in model.named_buffers() if n in persistent}}
    groups = _shard_groups(tensors, save_units(model, list(tensors)), max_shard_bytes)
    os.makedirs(out_dir, exist_ok=True)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        state = {name: torch.empty(tensors[name].shape, dtype=tensors[name].dtype) for name in group}
        dcp.load({"model": state}, checkpoint_id=checkpoint)
        state = revert_weight_conversion(model, state)
        file = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in state})
        total += sum(v.numel() * v.element_size() for v in state.values())
    if len(groups) > 1:
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    config.save_pretrained(out_dir)
    return checkpoint


def _shard_groups(tensors: dict[str, torch.Tensor], units: list[list[str]], max_bytes: int) -> list[list[str]]:
    """Consecutive units of state-dict names packed into files of at most `max_bytes` (a bigger unit alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for unit in units:
        nbytes = sum(tensors[name].numel() * tensors[name].element_size() for name in unit)
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].extend(unit)
        size += nbytes
    return groups


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m harness.export CHECKPOINT OUT_DIR", file=sys.stderr)
        return 2
    source, out_dir = argv
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        print(f"error: {out_dir}: exists and is not an empty directory; choose a new output directory",
              file=sys.stderr)
        return 2
    try:
        used = export(source, out_dir)
    except ValueError as e:
        print(f"error: {source}: {e}; pass a step_XXXXXXX folder or a checkpoint.dir written by training",
              file=sys.stderr)
        return 2
    print(f"exported {used} -> {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
