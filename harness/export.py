"""Export a checkpoint as a Hugging Face model directory (config.json + model.safetensors).

`python -m harness.export CHECKPOINT OUT_DIR`: CHECKPOINT is a `step_XXXXXXX` folder, or a
checkpoint directory (its newest complete checkpoint is taken). Runs in one process without a
process group: DCP reads every saved shard (FSDP, pipeline stages, expert-parallel experts)
into the full tensors of a plain HF model built from the config saved with the checkpoint, so
the layout that wrote it does not matter.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoConfig, AutoModelForCausalLM

from harness.checkpoint import check_checkpoint, complete_checkpoints


def find_checkpoint(path: str) -> str:
    """`path` itself when it is a checkpoint, else the newest complete one under it."""
    if os.path.isfile(os.path.join(path, ".metadata")):
        return path
    found = complete_checkpoints(path)
    if not found:
        raise ValueError("neither a checkpoint nor a directory holding step_XXXXXXX checkpoints")
    return found[-1][1]


def export(checkpoint: str, out_dir: str) -> str:
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
    model.to_empty(device="cpu")
    state = model.state_dict()
    dcp.load({"model": state}, checkpoint_id=checkpoint)
    model.load_state_dict(state)
    # Non-persistent buffers (rotary inv_freq) are neither in the checkpoint nor written here:
    # from_pretrained computes them.
    model.save_pretrained(out_dir, safe_serialization=True)
    return checkpoint


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
