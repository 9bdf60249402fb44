"""Memory and time of putting a large model onto 4 gloo ranks: sharded load versus a full copy.

    python -m tests.bench.load_bench [--family llama] [--hidden 1536 --layers 16 --vocab 32000] [--layouts ...]
        [--modes ...] [--out runs/bench_load.json]

Writes a Llama checkpoint from a config (`save_pretrained`, safetensors in 1 GB shards with an
index; ~0.5B parameters, 1.8 GiB in fp32, by default), in fp32 and in bf16 (as Hub checkpoints
usually are), into a temporary directory, then builds the training run on 4 gloo ranks
(`build_run`, one thread per rank) as dp_shard=4 and as pp=2 x dp_shard=2, and trains one step,
with the weights from:

- `sharded load, fp32/bf16 file`: `model.path` = the checkpoint; each rank reads its slices
  (harness/hf_checkpoint.py);
- `seeded init`: `model.path` = its config.json only; each rank initialises its shards
  (harness/init_weights.py);
- `full copy, ...`: what every rank did before: the whole model in memory (`from_pretrained`, or
  a fresh init), then its shards copied out of it (the source replaced by `InMemoryWeights`).

Per rank: RSS growth over the RSS just before `build_run`, at its peak during the build (load)
and during step 1 (the kernel's VmHWM, reset through /proc/self/clear_refs before each phase;
ru_maxrss would carry the spawning parent's peak across fork+exec), against model bytes / ranks,
and the build's wall time; the worst rank is reported. Step 1 adds gradients and AdamW moments (3 x the shard) and FSDP's gathered
layers.

`--family inkling2_text`: the checkpoint is Inkling2's instead (its tiny config from
tests/families.py at the given width, depth and vocabulary), whose LM head is stored padded to
vocab_size (64 rows more here): the conversion that drops the padding takes the whole tensor,
so every rank holding a part of the head reads all of it. Each row says how many bytes of the
checkpoint conversions read whole that way (none for Llama).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch

from harness.config import Config, load_config
from harness.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from harness.validation import validate
from tests.bench.results import write_results

WORLD = 4
LAYOUTS = {"dp_shard=4": ["--parallel.dp_shard=4"],
           "pp=2 x dp_shard=2": ["--parallel.pp=2", "--parallel.dp_shard=2"]}
# name -> (checkpoint: fp32 / bf16 / none, whole model in memory first)
MODES = {"sharded load, fp32 file": ("fp32", False), "full copy, fp32 file": ("fp32", True),
         "sharded load, bf16 file": ("bf16", False), "full copy, bf16 file": ("bf16", True),
         "seeded init": (None, False), "full copy, fresh init": (None, True)}


def _measure(rank: int, world_size: int, cfg: Config, full_copy: bool) -> dict[str, float]:
    import harness.trainer as trainer

    if full_copy:
        from harness.materialize import InMemoryWeights
        from harness.models import reference_model

        def whole_model_then_shards(model, seed, path):
            return InMemoryWeights(reference_model(model.config, seed, path))

        trainer.weight_source = whole_model_then_shards
    plan = validate(cfg, world_size)
    before = rss_bytes()
    reset_peak_rss()
    started = time.perf_counter()
    run = trainer.build_run(cfg, plan)
    build_s = time.perf_counter() - started
    load_growth = peak_rss_bytes() - before
    reset_peak_rss()
    trainer.train_step(run)
    return {"build_s": build_s, "load_growth": load_growth, "step_growth": peak_rss_bytes() - before}


def _model_config(family: str, hidden: int, layers: int, vocab: int):
    from transformers import AutoConfig

    if family == "inkling2_text":
        from tests.families import tiny_config

        config = tiny_config(family)
        pattern = config.layer_types
        config.update(dict(hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab + 64,
                           unpadded_vocab_size=vocab, layer_types=[pattern[i % len(pattern)] for i in range(layers)]))
        return config
    return AutoConfig.for_model("llama", hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab,
                                intermediate_size=hidden * 8 // 3 // 256 * 256, num_attention_heads=hidden // 128,
                                num_key_value_heads=max(1, hidden // 512), head_dim=128,
                                max_position_embeddings=2048, tie_word_embeddings=False)


def _whole_read_bytes(path: str) -> int:
    """Bytes of the checkpoint in `path` that conversions read whole (none without weights)."""
    from harness.hf_checkpoint import HFCheckpoint
    from harness.models import build_meta_model, load_config as load_model_config

    if path.endswith(".json"):
        return 0
    checkpoint = HFCheckpoint(path, build_meta_model(load_model_config(None, path)))
    entries = [checkpoint.entries[key] for key in checkpoint.whole_read_keys()]
    return sum(math.prod(e.shape) * {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}[e.dtype] for e in entries)


def _write_checkpoints(directory: str, family: str, hidden: int, layers: int, vocab: int) -> int:
    """`directory`/fp32 and `directory`/bf16; returns the model's bytes in fp32."""
    from harness.models import reference_model

    model = reference_model(_model_config(family, hidden, layers, vocab), seed=0)
    model.save_pretrained(os.path.join(directory, "fp32"), max_shard_size="1GB")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(os.path.join(directory, "bf16"), max_shard_size="1GB")
    return model_bytes


def main() -> None:
    from tests.multiproc import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["llama", "inkling2_text"], default="llama")
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--out", default="runs/bench_load.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        model_bytes = _write_checkpoints(directory, args.family, args.hidden, args.layers, args.vocab)
        print(f"checkpoint: {model_bytes / 2**30:.2f} GiB fp32 ({model_bytes // 4 / 1e9:.2f}B parameters) in "
              f"{directory}; {WORLD} ranks, model bytes / ranks = {model_bytes / WORLD / 2**30:.2f} GiB")
        for layout in args.layouts:
            for mode in args.modes:
                checkpoint, full_copy = MODES[mode]
                path = os.path.join(directory, checkpoint) if checkpoint else os.path.join(directory, "fp32",
                                                                                         "config.json")
                cfg = load_config(None, [f"--model.path={path}", *LAYOUTS[layout], "--train.steps=1", "--train.seq_len=32",
                                         "--train.global_batch_size=8", "--train.micro_batch_size=2",
                                         "--data.max_bytes=200000", "--train.metrics_file=null",
                                         "--logging.progress=false"])
                per_rank = run_ranks(_measure, WORLD, cfg, full_copy, timeout=1800)
                row = {"layout": layout, "mode": mode, "model_bytes": model_bytes,
                       "whole_read_bytes": 0 if full_copy else _whole_read_bytes(path),
                       **{key: max(r[key] for r in per_rank) for key in per_rank[0]}}
                rows.append(row)
                print(_format(row), flush=True)
    print()
    print("| layout | weights | read whole | load: peak RSS growth / rank | x bytes/ranks | step 1: peak RSS growth "
          "/ rank | x bytes/ranks | build s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        share = row["model_bytes"] / WORLD
        print(f"| {row['layout']} | {row['mode']} | {row['whole_read_bytes'] / 2**30:.2f} GiB | "
              f"{row['load_growth'] / 2**30:.2f} GiB | {row['load_growth'] / share:.2f} | "
              f"{row['step_growth'] / 2**30:.2f} GiB | {row['step_growth'] / share:.2f} | {row['build_s']:.1f} |")
    write_results(args.out, rows)


def _format(row: dict) -> str:
    return (f"{row['layout']:>18} | {row['mode']:>23} | load +{row['load_growth'] / 2**30:.2f} GiB | "
            f"step 1 +{row['step_growth'] / 2**30:.2f} GiB | build {row['build_s']:.1f} s")


if __name__ == "__main__":
    main()
