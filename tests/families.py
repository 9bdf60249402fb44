"""Tiny configs of every decoder-only text family the installed transformers ships as a causal LM.

Sizes are shrunk through whatever fields a family's config has; the family-specific scalars that
a re-implemented forward would drop (logit scales and soft-caps, embedding and residual
multipliers, tied embeddings) are set away from their neutral values, so a layout that loses one
cannot match the one-process model.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from harness.model_parts import training_randomness

VOCAB = 256
SIZES: dict[str, Any] = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=256, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, num_experts=8, num_local_experts=8, n_routed_experts=8,
    moe_num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=32,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, sliding_window=8, first_k_dense_replace=1,
    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=1, mamba_d_state=8, mamba_n_heads=4,
    mamba_d_head=32, mamba_d_ssm=128, mamba_n_groups=1, mamba_expand=2, rotary_dim=8, n_shared_experts=1, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, use_cache=False,
)
# Away from neutral: a dropped multiplier or cap changes the logits.
SCALARS: dict[str, float] = dict(
    logit_scale=0.25, final_logit_softcapping=5.0, attn_logit_softcapping=3.0, embedding_multiplier=3.0,
    logits_scaling=2.5, residual_multiplier=0.7, attention_multiplier=0.3, router_aux_loss_coef=0.01,
)
# Values applied over SIZES and SCALARS for families the generic fields cannot shrink or build,
# or leave with per-layer features at full-size defaults or switched off; one entry per family,
# alphabetical, saying why.
FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    # DeepSeek sparse attention under MLA: the indexer keeps 8 of the 32 tokens, so its selection shows.
    "axk2": dict(index_n_heads=4, index_head_dim=16, index_topk=8),
    # Bytes through a local encoder, a global transformer over patches and a local decoder, each a
    # sub-config of its own (no top-level layer count), patched by a frozen entropy model; its hash
    # n-gram embeddings default to 500002 rows per n-gram size. It builds; the harness, which
    # needs one list of decoder layers, refuses it.
    "blt": dict(encoder_hash_byte_group_size=[3, 4], encoder_hash_byte_group_vocab=64, local_attention_window_len=8,
                patcher_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    vocab_size=VOCAB),
                encoder_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=VOCAB,
                                    hidden_size_global=64, intermediate_size=96),
                decoder_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                                    hidden_size_global=64, intermediate_size=96),
                global_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)),
    # Rotary parameters are per layer type (none by default: a KeyError) and the full-attention
    # layers may have none (NoPE); its M-RoPE sections must cover head_dim / 2 = 8.
    "cohere_compass_text": dict(layer_types=["sliding_attention", "full_attention"] * 2, rope_parameters={
        "sliding_attention": dict(rope_type="default", rope_theta=10_000.0, mrope_section=[4, 2, 2]),
        "full_attention": None}),
    # Attention and experts are nested configs; DbrxAttention reads an attn_config.rope_theta its
    # config class does not declare; the experts copy d_model before the hidden_size alias sets it.
    # clip_qkv clips (q, k, v reach ~0.2); routing weights are 2-normed.
    "dbrx": dict(d_model=64, attn_config=dict(kv_n_heads=2, clip_qkv=0.2, rope_theta=10000.0),
                 ffn_config=dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2, moe_loss_weight=0.01,
                                 moe_normalize_expert_weights=2.0)),
    # DeepSeek sparse attention, as axk2.
    "deepseek_v32": dict(index_n_heads=4, index_head_dim=16, index_topk=8),
    # Sliding-window layers are per-layer configs with their own MLA sizes (swa_*, default 64
    # heads); indexed (sparse) attention keeps 4 of the keys; keys need as many heads as queries.
    "dots3_note_text": dict(num_key_value_heads=4, swa_num_attention_heads=2, swa_num_key_value_heads=2,
                            swa_q_lora_rank=16, swa_kv_lora_rank=32, swa_head_dim=16, swa_qk_nope_head_dim=8,
                            swa_v_head_dim=8, index_topk=4, index_head_dim=16, index_n_heads=2,
                            shared_experts_intermediate_size=32, routed_scaling_factor=2.5),
    # The last 2 layers reuse keys and values of the first 2 (default 15 of 35: none would produce
    # the full-attention ones); per-layer embeddings default to a 262144-row table; AltUp predicts 2
    # streams; the first 2 layers keep only their top 5% MLP activations (0.95: sparse).
    "gemma3n_text": dict(layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
                         hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, laurel_rank=8,
                         altup_num_inputs=2, activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0]),
    # The leading dense layers' MLP and the shared expert default to 32768 and 8192 wide.
    "ergo": dict(first_dense_intermediate_size=96, shared_intermediate_size=32),
    # Full-attention layers get their own head_dim (global_head_dim, default 512) and k=v heads; the
    # last 2 layers reuse keys and values of the first 2 (one producer per layer type) and widen
    # their MLP; per-layer embeddings default to a 262144-row table; the MoE block runs beside the MLP.
    "gemma4_text": dict(layer_types=["sliding_attention", "full_attention"] * 2, global_head_dim=32,
                        attention_k_eq_v=True, num_global_key_value_heads=1, num_kv_shared_layers=2,
                        use_double_wide_mlp=True, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
                        enable_moe_block=True, top_k_experts=2),
    # Gemma 4 without per-layer embeddings or experts: the same per-layer head_dim and KV sharing.
    "gemma4_unified_text": dict(layer_types=["sliding_attention", "full_attention"] * 2, global_head_dim=32,
                                attention_k_eq_v=True, num_global_key_value_heads=1, num_kv_shared_layers=2,
                                use_double_wide_mlp=True),
    # DeepSeek sparse attention, as axk2; every other layer reuses the previous layer's top-k.
    "glm_moe_dsa": dict(index_n_heads=4, index_head_dim=16, index_topk=8,
                        indexer_types=["full", "shared", "full", "shared"]),
    # Per-layer attention comes as [[types], repeats] (not layer_types); a window shorter than the
    # sequence makes its local layers differ from its global ones.
    "gpt_neo": dict(attention_types=[[["global", "local"], 2]], window_size=8),
    # Checkpoints pad the LM head's rows to vocab_size; the model keeps unpadded_vocab_size of them
    # (default 200058 of 201024): every byte token keeps its logit, and the padding is there to drop.
    "inkling2_loop_text": dict(vocab_size=VOCAB + 8, unpadded_vocab_size=VOCAB),
    "inkling2_text": dict(vocab_size=VOCAB + 8, unpadded_vocab_size=VOCAB),
    # No default layer pattern (conv or attention per layer); one dense layer, then MoE.
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"], num_dense_layers=1,
                     routed_scaling_factor=1.5),
    # Heads of its own field names must fill the expanded width (hidden * expand = heads * head_dim);
    # chunks shorter than the sequence run the chunked scan across chunk borders.
    "mamba2": dict(num_heads=8, state_size=8, chunk_size=8),
    # Full-attention layers need the QSA token indexer's sizes (unset: a TypeError), here keeping 4
    # keys in blocks of 2; the hashed n-gram per-layer embedding on layer 1 defaults to 16 heads of
    # 20M-row tables; hyper-connections keep hc_count=4 residual streams through a low-rank mixer.
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=4,
                           indexer_compress_ratio=2, hc_lowrank=8, ple_layer_ids=[1], ple_embed_dim=32,
                           heads_per_ngram=2, ngram_vocab_size_base=64, split_ngram_parts=1,
                           make_ngram_vocab_size_divisible_by=8),
    # Layers are Mamba or hybrid (Mamba plus the one shared transformer block); with 4 layers the
    # default pattern has one hybrid layer, which HF's tie of the shared block refuses: two share it.
    "zamba": dict(layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid"], n_mamba_heads=2,
                  mamba_d_state=8),
    # As Zamba, with Mamba-2 heads; two memory blocks alternate over three hybrid layers (one
    # shared, one not), with per-layer adapters (which add to keys and values as wide as the
    # queries: no grouped heads) and rotary in the shared attention. That attention reads the
    # hidden states concatenated with the embeddings: its heads split twice the hidden width.
    "zamba2": dict(layers_block_type=["hybrid", "linear_attention", "hybrid", "hybrid"], num_mem_blocks=2,
                   n_mamba_heads=4, mamba_d_state=8, chunk_size=8, use_shared_attention_adapter=True,
                   adapter_rank=8, num_key_value_heads=4, head_dim=32, use_mem_rope=True),
    # One expert per token only; alternating sliding-window layers, its router's own width, and a
    # bias on the (tied) LM head.
    "zaya": dict(num_experts_per_tok=1, num_experts=4, layer_types=["hybrid", "hybrid_sliding"] * 2,
                 router_hidden_size=32, lm_head_bias=True),
}
# Multimodal wrappers, encoders and encoder-decoders also registered as causal LMs, and
# speculative-decoding assistants (they read the target model's hidden states).
_NOT_DECODER_ONLY_TEXT = ("bart", "bert", "roberta", "electra", "xlm", "camembert", "marian", "mbart", "pegasus",
                          "blenderbot", "prophetnet", "plbart", "mvp", "trocr", "whisper", "musicgen", "moshi",
                          "rembert", "roformer", "roc_bert", "xmod", "data2vec", "big_bird", "bigbird", "megatron",
                          "reformer", "xlnet", "git", "fuyu", "emu3", "mllama", "got_ocr2", "phi4_multimodal",
                          "moss_transcribe", "ernie", "cpmant", "gemma4_assistant",
                          "gemma4_unified_assistant")


def decoder_only_families() -> list[str]:
    return sorted(name for name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                  if name.startswith("ernie4") or not name.startswith(_NOT_DECODER_ONLY_TEXT))


def tiny_config(family: str, tied: bool | None = None) -> PretrainedConfig:
    """The family's default config, shrunk, with its scalars away from neutral."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = AutoConfig.for_model(family)
        # Per-layer configs (gemma4, dots3_note) raise on reading a per-layer field globally; only
        # which fields exist matters here.
        default.allow_global_per_layer_attribute_access = True
        values = {key: value for key, value in {**SIZES, **SCALARS}.items()
                  if hasattr(default, key) and not isinstance(getattr(type(default), key, None), property)}
        if "qk_rope_head_dim" in values:  # multi-head latent attention: rotary runs on the rope part
            values["head_dim"] = values["qk_rope_head_dim"]
        if "kv_lora_rank" in values:
            # Latent attention decompresses a key and a value per query head, yet HF's attention
            # functions repeat them by num_attention_heads / num_key_value_heads wherever a mask
            # is given (eager, sdpa with padding or document masks): as in every MLA checkpoint,
            # the counts are equal.
            values["num_key_value_heads"] = values["num_attention_heads"]
        values.update(FAMILY_FIELDS.get(family, {}))
        try:
            config = AutoConfig.for_model(family, **values)
        except ValueError:  # configs that check their per-layer patterns against the layer count
            config = AutoConfig.for_model(family, **values, **_resized_patterns(default, SIZES["num_hidden_layers"]))
    if hasattr(config, "num_hidden_layers"):  # BLT counts layers per sub-config
        for key, pattern in _resized_patterns(config, config.num_hidden_layers).items():
            setattr(config, key, pattern)
    # Dropout and router jitter draw random numbers in training, which no two layouts draw alike:
    # off here, as docs/supported-models.md says.
    for key in training_randomness(config):
        setattr(config, key, 0.0)
    if tied is not None:
        config.tie_word_embeddings = tied
    return config


def save_random_model(family: str, path: str) -> None:
    """transformers' own save_pretrained of the family's tiny model, randomly initialised: a
    checkpoint in the layout the family's Hub checkpoints have (transformers' conversion mapping
    reversed: experts one tensor each, projections fused as the family's checkpoints fuse them)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(family)).save_pretrained(path)


def _resized_patterns(config: PretrainedConfig, layers: int) -> dict[str, list]:
    """Per-layer type lists of another length, repeated or cut to `layers`."""
    resized = {}
    for key in ("layer_types", "mlp_layer_types"):
        pattern = getattr(config, key, None)
        if isinstance(pattern, list) and pattern and len(pattern) != layers:
            resized[key] = [pattern[i % len(pattern)] for i in range(layers)]
    return resized


def probe(family: str) -> str:
    """'ok' when the tiny model builds and runs a forward and backward on CPU, else why not."""
    from transformers import AutoModelForCausalLM

    try:
        config = tiny_config(family)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids).logits.float().sum().backward()
        return "ok"
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def probe_all(families: list[str]) -> dict[str, str]:
    """`probe` of each family in a child process capped at 4 GiB and 60 s."""
    import multiprocessing

    results = {}
    with multiprocessing.get_context("fork").Pool(1, maxtasksperchild=1) as pool:
        for name in families:
            try:
                results[name] = pool.apply_async(_probe_limited, (name,)).get(timeout=60)
            except multiprocessing.TimeoutError:
                results[name] = "timeout"
    return results


def _probe_limited(family: str) -> str:
    import resource

    # A family whose config ignores the size fields can build a multi-GB model: cap the child.
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    return probe(family)


# Hand-shrunk configs of families with unusual blocks (hybrid mixers, per-layer-type rotary and
# masks), whose family pieces are away from their neutral values.
_HAND_TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=4,
                  vocab_size=256, intermediate_size=96, max_position_embeddings=256, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
HAND_SHRUNK: dict[str, dict[str, Any]] = {
    "cohere": dict(logit_scale=0.25),
    "cohere2": dict(logit_scale=0.25, sliding_window=8),
    "granite": dict(embedding_multiplier=3.0, logits_scaling=2.5, residual_multiplier=0.7, attention_multiplier=0.3),
    "gemma2": dict(final_logit_softcapping=5.0, attn_logit_softcapping=3.0, sliding_window=8),
    "gemma3_text": dict(final_logit_softcapping=5.0, sliding_window=8, sliding_window_pattern=2),
    "olmo3": dict(sliding_window=8),
    "qwen3_next": dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32),
    "lfm2": dict(layer_types=["conv", "full_attention", "conv", "full_attention"]),
    "nemotron_h": dict(hybrid_override_pattern="M*M*", mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8,
                       n_groups=1),
    "granitemoehybrid": dict(embedding_multiplier=3.0, logits_scaling=2.5, num_local_experts=4,
                             num_experts_per_tok=2),
    # Gemma 4 as its larger checkpoints: no per-layer inputs or KV-shared layers (pipeline stages
    # refuse those), per-layer head_dim, k = v, an MoE block beside the MLP.
    "gemma4_text": dict(layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=8,
                        final_logit_softcapping=5.0, global_head_dim=32, attention_k_eq_v=True,
                        num_global_key_value_heads=1, hidden_size_per_layer_input=0, num_kv_shared_layers=0,
                        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32),
}


def hand_shrunk_config(family: str) -> PretrainedConfig:
    config = AutoConfig.for_model(family, **{**_HAND_TINY, **HAND_SHRUNK[family]})
    config.use_cache = False
    return config


if __name__ == "__main__":
    import sys

    for name, result in probe_all(sys.argv[1:] or decoder_only_families()).items():
        print(f"{name:28s} {result}", flush=True)
