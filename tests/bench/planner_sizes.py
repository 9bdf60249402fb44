"""The layout planner on published model sizes: a Llama 3.1 8B (dense) and a Qwen3-30B-A3B (MoE)
on 8, 64 and 512 H100s, the layout it picks, its predicted memory and tokens/s.

    nice -n 10 python -m tests.bench.planner_sizes [--worlds 8 64 512] [--out runs/bench_planner_sizes.json]

The models are built on the meta device from their published HF config values (transformers'
own config classes, written here by hand: nothing is downloaded). The recipes follow the
published runs they are compared with in docs/planner.md: the 8B at 8192 tokens, 2 sequences per
GPU (TorchTitan's Llama 3.1 8B runs); the 30B-A3B at 4096 tokens, 4 sequences per GPU (NeMo
AutoModel's Qwen3 MoE 30B run).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from transformers import AutoConfig

from harness.config import load_config
from harness.layout_planner.devices import named_device
from harness.layout_planner.layouts import Layout
from harness.layout_planner.planner import make_plan, model_facts_for
from harness.layout_planner.predict import predict
from tests.bench.results import write_results

GiB = 2**30
# Llama 3.1 8B's config.json.
LLAMA_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)
# Qwen3-30B-A3B's config.json: 48 layers, all MoE (128 experts, 8 routed per token).
QWEN3_30B_A3B = dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                     mlp_only_layers=[], vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, tie_word_embeddings=False)
MODELS = {"Llama 3.1 8B": (LLAMA_8B, 8192, 2), "Qwen3-30B-A3B": (QWEN3_30B_A3B, 4096, 4)}
# Published runs, predicted in their own layout: (model, GPUs, global batch, layout, what was measured).
PUBLISHED = [
    ("Llama 3.1 8B", 8, 16, Layout(pp=1, dp_replicate=1, dp_shard=8, tp=1, ep=1, micro_batch_size=2,
                                   ac_mode="selective"),
     "TorchTitan, benchmarks/llama3_h100_202412_torchtitan.md table 1 (FSDP, eager, bf16): "
     "5,762 tokens/s/GPU, 82.4 GiB"),
    ("Llama 3.1 8B", 128, 256, Layout(pp=1, dp_replicate=1, dp_shard=128, tp=1, ep=1, micro_batch_size=2,
                                      ac_mode="selective"),
     "TorchTitan, same file, table 3 (FSDP, eager, bf16): 5,605 tokens/s/GPU, 67.0 GiB"),
    *[("Qwen3-30B-A3B", 8, 512, Layout(pp=1, dp_replicate=1, dp_shard=8, tp=1, ep=8, micro_batch_size=4,
                                       ac_mode=mode),
       "NeMo AutoModel performance summary (DGX-H100, bf16, TE + DeepEP; AC not stated): 12,040 tokens/s/GPU, "
       "277 TFLOP/s/GPU") for mode in ("none", "full")],
]


def _config_path(directory: str, name: str, values: dict) -> str:
    values = dict(values)
    path = os.path.join(directory, name.replace(" ", "_"))
    AutoConfig.for_model(values.pop("model_type"), **values).save_pretrained(path)
    return os.path.join(path, "config.json")


def _published(directory: str, device) -> list[dict]:
    rows = []
    for name, world, batch, layout, measured in PUBLISHED:
        values, seq_len, _ = MODELS[name]
        path = _config_path(directory, name, values)
        cfg = load_config(None, [f"--model.path={path}", f"--train.seq_len={seq_len}",
                                 f"--train.global_batch_size={batch}"])
        facts = model_facts_for(cfg, device, lambda line: None)
        prediction = predict(facts, layout, cfg, world, 8, device)
        row = {"model": name, "world": world, "layout": layout.describe(), "micro_batch_size": layout.micro_batch_size,
               "ac": layout.ac_mode, "peak_gib": prediction.peak_bytes / GiB,
               "tokens_per_s_per_gpu": prediction.tokens_per_s / world, "published": measured}
        rows.append(row)
        print(f"{name} on {world} x H100 as published ({row['layout']}, micro batch {layout.micro_batch_size}, AC "
              f"{layout.ac_mode}): predicted {row['peak_gib']:.1f} GiB, {row['tokens_per_s_per_gpu']:,.0f} "
              f"tokens/s/GPU; {measured}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", nargs="+", type=int, default=[8, 64, 512])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--out", default="runs/bench_planner_sizes.json")
    args = parser.parse_args()
    device = named_device("h100")
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        published = _published(directory, device)
        for name in args.models:
            values, seq_len, per_gpu = MODELS[name]
            path = _config_path(directory, name, values)
            for world in args.worlds:
                cfg = load_config(None, [f"--model.path={path}", f"--train.seq_len={seq_len}",
                                         f"--train.global_batch_size={per_gpu * world}",
                                         f"--train.micro_batch_size={per_gpu}",
                                         # validation asks for one global batch of data: 8.4M tokens at 512 GPUs
                                         "--data.max_bytes=20000000"])
                started = time.perf_counter()
                plan = make_plan(cfg, world, 8, device, lambda line: None, wanted=1)
                best = plan.best
                row = {"model": name, "world": world, "seq_len": seq_len, "global_batch_size": per_gpu * world,
                       "layouts": plan.candidates, "validated": plan.validated,
                       "planning_s": time.perf_counter() - started,
                       "layout": best.layout.describe() if best else None,
                       "micro_batch_size": best.layout.micro_batch_size if best else None,
                       "ac": (best.layout.ac_mode if best.layout.ac_budget_mib is None
                              else f"budget {best.layout.ac_budget_mib:.0f} MiB") if best else None,
                       "peak_gib": best.peak_bytes / GiB if best else None,
                       "tokens_per_s_per_gpu": best.tokens_per_s / world if best else None,
                       "mfu": (best.tokens_per_s / world * plan.facts.flops_per_token / (device.peak_tflops * 1e12)
                               if best else None),
                       "dominant": best.dominant if best else None,
                       "times": best.times if best else None}
                rows.append(row)
                print(f"{name} on {world} x H100: {row['layout']} micro {row['micro_batch_size']} AC {row['ac']}: "
                      f"{row['peak_gib']:.1f} GiB, {row['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, MFU "
                      f"{row['mfu']:.0%} ({row['layouts']} layouts, planned in {row['planning_s']:.0f} s)", flush=True)
    print()
    print("| model | H100s | layout | micro batch | AC | predicted GiB/GPU | predicted tokens/s/GPU | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['world']} | {row['layout']} | {row['micro_batch_size']} | {row['ac']} | "
              f"{row['peak_gib']:.1f} | {row['tokens_per_s_per_gpu']:,.0f} | {row['mfu']:.0%} |")
    write_results(args.out, {"device": device.describe(), "rows": rows, "published": published})


if __name__ == "__main__":
    main()
