"""Whole-config checks that need more than types: sizes, paths, the mesh, the model.

Run by the launcher before any process starts; each failure is one ConfigError line.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
from torch import nn
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForCausalLM, PretrainedConfig

from harness.checkpoint import check_checkpoint, start_point
from harness.config import AcMode, Config, ConfigError
from harness.data_checks import check_corpus, check_data_config
from harness.hf_checkpoint import check_readable
from harness.loss import token_loss_sum
from harness.model_parts import (check_pipeline_support, decoder_layers, expert_count, experts_per_token, layer_configs,
                                 moe_blocks, router_aux_loss_function, tensor_parallel_parts)
from harness.models import build_meta_model, check_weights, error_reason, load_config as load_model_config
from harness.plan import Plan
from harness.rank_layout import on_fake_rank
from harness.run_folder import RunFolder, run_folder
from harness.run_identity import first_difference, read_identity, run_identity
from moe.balance import splits_over_stages
from parallel.ac_budget import BudgetPlan, StepShape, choose_plan
from parallel.cp_attention import check_context_parallel, check_ring
from parallel.fsdp import mixed_precision_policy
from parallel.mesh import ParallelDims
from parallel.pipeline import validate_pipeline
from parallel.pipeline_split import LAYER_PREFIX, stage_module_names
from parallel.tensor_parallel import layer_styles


def validate(cfg: Config, world_size: int, gpus_per_node: int | None = None) -> Plan:
    """Checks the whole config for a world of `world_size` ranks; returns the resolved plan.
    Reads the config only: what the user wrote stays as written. `gpus_per_node`: the GPUs of
    one node the job will run on, when that is not this machine (a Slurm script written here)."""
    _check_positive(cfg)
    folder = run_folder(cfg)
    _check_output_paths(cfg, folder)
    p = cfg.parallel
    try:
        dims = ParallelDims(pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, cp=p.cp, tp=p.tp,
                            ep=p.ep, world_size=world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_batch(cfg, dims)
    model_config = _check_model(cfg)
    try:
        model = build_meta_model(model_config)  # meta device: the structure without memory or weights
    except Exception as e:  # the model's own constructor is the check of what the config holds
        fix = (f"check model.overrides ({', '.join(f'{k}={v!r}' for k, v in cfg.model.overrides.items())})"
               if cfg.model.overrides else "check the model's config.json")
        raise ConfigError(f"model: {type(model_config).__name__} cannot be built ({error_reason(e)}); {fix}") from None
    try:
        decoder_layers(model)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    check_data_config(cfg, model_config, dims)
    _check_experts(cfg, model, dims)
    _check_tensor_parallel(cfg, dims, model, gpus_per_node)
    _check_context_parallel(cfg, dims, model)
    pp_microbatches, stages_per_rank = 1, 1
    if dims.pp > 1:
        pp_microbatches = dims.pp if p.pp_microbatches is None else p.pp_microbatches
        try:
            check_pipeline_support(model)
            stages_per_rank = validate_pipeline(
                num_layers=model_config.num_hidden_layers, pp=dims.pp, schedule=p.pp_schedule,
                stages_per_rank=p.pp_stages_per_rank, n_microbatches=pp_microbatches,
                layers_per_stage=p.pp_layers_per_stage, local_batch_size=cfg.train.micro_batch_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        first_stage = stage_module_names(model_config.num_hidden_layers, dims.pp * stages_per_rank,
                                         p.pp_layers_per_stage)[0]
        if dims.tp > 1 and not any(name.startswith(LAYER_PREFIX) for name in first_stage):
            raise ConfigError(f"parallel.pp_layers_per_stage: under parallel.tp={dims.tp} the first stage needs a "
                              "decoder layer (sequence parallel splits the sequence at its first layer's input); "
                              "give it at least one")
    ac_budget = _check_activation_checkpointing(cfg, dims, model)
    _check_checkpoint(cfg, folder, model_config)
    check_corpus(cfg)  # last: it may tokenize the whole source
    # Under pipeline parallel a stage runs several microbatches back to back; resharding after
    # each forward would all-gather the same weights again for every one of them.
    reshard = p.reshard_after_forward if p.reshard_after_forward is not None else dims.pp == 1
    return Plan(dims=dims, ac_mode=_ac_mode(cfg.ac.mode), micro_batch_size=cfg.train.micro_batch_size,
                grad_accumulation=cfg.train.global_batch_size // (cfg.train.micro_batch_size * dims.dp),
                pp_microbatches=pp_microbatches, pp_stages_per_rank=stages_per_rank, reshard_after_forward=reshard,
                folder=folder, ac_budget=ac_budget)


def _ac_mode(mode: AcMode | bool) -> AcMode:
    if isinstance(mode, bool):
        return "full" if mode else "none"
    return mode


def _check_activation_checkpointing(cfg: Config, dims: ParallelDims, model: nn.Module) -> BudgetPlan | None:
    """The per-layer plan of ac.mode=budget (None for the uniform modes), predicted here on fake
    tensors, so that a budget no plan meets is refused before any worker starts."""
    mode, budget = _ac_mode(cfg.ac.mode), cfg.ac.budget_mib
    if mode != "budget":
        if budget is not None:
            raise ConfigError(f"ac.budget_mib={budget:g}: only ac.mode=budget reads it (ac.mode is {mode}); "
                              "set --ac.mode=budget or unset ac.budget_mib")
        return None
    if budget is None:
        raise ConfigError("ac.budget_mib: ac.mode=budget needs the per-rank activation memory to fit; "
                          "set e.g. --ac.budget_mib=4096")
    if budget <= 0:
        raise ConfigError(f"ac.budget_mib={budget:g}: must be > 0 (MiB of activation memory per rank)")
    if dims.pp > 1:
        raise ConfigError("ac.mode=budget: not supported under pipeline parallel (a stage holds several "
                          "microbatches at once); use parallel.pp=1 or another ac.mode")
    if cfg.train.compile:
        raise ConfigError("ac.mode=budget: the plan is predicted for eager layers; set train.compile=false "
                          "or use another ac.mode")
    # What the workers will run: CUDA computes in FSDP's bf16, CPU in the parameters' fp32.
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    shape = StepShape(rows=cfg.train.micro_batch_size, seq_len=cfg.train.seq_len,
                      dtype=mixed_precision_policy(device_type).param_dtype or torch.float32, device_type=device_type)
    try:
        return on_fake_rank(dims.tp, dims.cp, cfg.train.seq_len, lambda layout: choose_plan(
            model, decoder_layers(model), int(budget * 2**20), shape, token_loss_sum, layout=layout))
    except ValueError as e:
        raise ConfigError(f"ac.budget_mib={budget:g}: too small for train.micro_batch_size={shape.rows} x "
                          f"train.seq_len={shape.seq_len}: {e}; raise ac.budget_mib or lower the micro batch "
                          "or sequence length") from None


def _check_context_parallel(cfg: Config, dims: ParallelDims, model: nn.Module) -> None:
    if dims.cp == 1:
        return
    # HF's router aux loss multiplies two means over the micro batch's tokens; a cp rank sees a
    # part of them, and the product of partial means is not the whole batch's.
    unsupported = [(getattr(model.config, "output_router_logits", False), "HF's router aux loss (output_router_logits)",
                    "set model.overrides.output_router_logits=false")]
    for refused, what, fix in unsupported:
        if refused:
            raise ConfigError(f"parallel.cp={dims.cp}: not supported with {what} yet; {fix} or parallel.cp=1")
    try:
        check_context_parallel(model, cfg.train.seq_len, dims.cp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.parallel.cp_rotate == "ring":
        _check_ring(cfg, model)


def _check_ring(cfg: Config, model: nn.Module) -> None:
    fix = "use parallel.cp_rotate=allgather"
    if cfg.data.document_mask:
        raise ConfigError("parallel.cp_rotate=ring: data.document_mask=true needs a mask between documents, which "
                          f"the ring does not build (it runs plain causal attention); {fix}")
    if torch.cuda.is_available():
        raise ConfigError(f"parallel.cp_rotate=ring: runs on CPU only so far (torch's CPU flash kernel); {fix}")
    try:
        check_ring(model)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_tensor_parallel(cfg: Config, dims: ParallelDims, model: nn.Module, gpus_per_node: int | None) -> None:
    """What tensor parallel shards must split evenly over tp, a tp group must fit in one node, the
    family's TP plan must be one it honours, and the features not yet composed with it are refused."""
    tp = dims.tp
    if tp == 1:
        return
    if gpus_per_node is None and torch.cuda.is_available():
        gpus_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or torch.cuda.device_count()
    if gpus_per_node is not None and tp > gpus_per_node:
        raise ConfigError(f"parallel.tp={tp}: larger than a node's {gpus_per_node} GPUs (a tensor-parallel group "
                          "communicates at every layer and must stay inside one node); set parallel.tp <= "
                          f"{gpus_per_node} and use dp_shard or pp across nodes")
    config = model.config
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab % tp:
        raise ConfigError(f"parallel.tp={tp}: must divide the model's vocab_size={vocab}")
    # Column-parallel projections give each rank whole heads only where tp divides them, in every
    # layer: a per-layer config (Gemma 4's full-attention key/value heads) may differ by layer.
    per_layer = getattr(config, "is_heterogeneous", False)
    for index, layer_config in enumerate(layer_configs(config)):
        for key in ("num_attention_heads", "num_key_value_heads"):
            value = getattr(layer_config, key, None)
            if isinstance(value, int) and value % tp:
                where = f"layer {index}'s {key}={value} ({config.model_type}'s per-layer config)" if per_layer \
                    else f"the model's {key}={value}"
                raise ConfigError(f"parallel.tp={tp}: must divide {where}")
    if cfg.train.seq_len % (tp * dims.cp):
        raise ConfigError(f"parallel.tp={tp}: parallel.tp x parallel.cp must divide train.seq_len={cfg.train.seq_len} "
                          "(sequence parallel splits each rank's tokens over the tp ranks)")
    try:
        layer_styles(tensor_parallel_parts(model))
    except ValueError as e:
        raise ConfigError(f"parallel.tp={tp}: {e}") from None
    # The fake step's memory tracker hooks each module's parameters, and an MoE block under tp
    # runs on tp-local tensors swapped in at its forward (torch refuses hooks on non-leaves).
    if _ac_mode(cfg.ac.mode) == "budget" and moe_blocks(model):
        raise ConfigError(f"parallel.tp={tp}: ac.mode=budget does not measure MoE blocks under tensor parallel "
                          "yet; use ac.mode=selective or full, or parallel.tp=1")


def _check_positive(cfg: Config) -> None:
    for section, name in [("train", "steps"), ("train", "global_batch_size"), ("train", "micro_batch_size"),
                          ("train", "seq_len"), ("data", "max_bytes"), ("logging", "log_every"),
                          ("checkpoint", "keep")]:
        value = getattr(getattr(cfg, section), name)
        if value <= 0:
            raise ConfigError(f"{section}.{name}={value}: must be > 0")
    for section, name in [("train", "lr"), ("train", "warmup_steps"), ("train", "weight_decay"),
                          ("train", "max_grad_norm"), ("train", "min_lr_ratio")]:
        value = getattr(getattr(cfg, section), name)
        if value < 0:
            raise ConfigError(f"{section}.{name}={value}: must be >= 0")
    # YAML reads nan, .inf and 1e400 as floats, which pass every comparison above.
    for section, name in [("train", "lr"), ("train", "weight_decay"), ("train", "max_grad_norm"),
                          ("train", "min_lr_ratio"), ("eval", "held_out"), ("ac", "budget_mib"),
                          ("moe", "bias_update_rate"), ("logging", "peak_tflops")]:
        value = getattr(getattr(cfg, section), name)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{section}.{name}={value}: must be a finite number")
    if not 0 <= cfg.train.seed < 2**32:
        raise ConfigError(f"train.seed={cfg.train.seed}: must be in [0, 2**32)")
    # Optional counts: null asks for the default; 0 or less never does.
    for section, name in [("parallel", "pp_microbatches"), ("parallel", "pp_stages_per_rank"),
                          ("checkpoint", "every")]:
        value = getattr(getattr(cfg, section), name)
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{name}={value}: must be > 0, or null for the default")
    if cfg.logging.peak_tflops is not None and cfg.logging.peak_tflops <= 0:
        raise ConfigError(f"logging.peak_tflops={cfg.logging.peak_tflops}: must be > 0 (or unset for auto)")
    if cfg.logging.tensorboard_dir is not None and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(f"logging.tensorboard_dir={cfg.logging.tensorboard_dir}: tensorboard is not installed; "
                          "pip install tensorboard, or unset it")
    if cfg.train.lr == 0:
        raise ConfigError("train.lr=0: nothing would train; set a positive learning rate, e.g. 3e-4")
    if cfg.train.min_lr_ratio > 1:
        raise ConfigError(f"train.min_lr_ratio={cfg.train.min_lr_ratio}: must be in [0, 1]")


def _check_output_paths(cfg: Config, folder: RunFolder) -> None:
    """What the run writes must be creatable: a path under a file or in a read-only folder fails
    here, not in every worker."""
    for name, path, is_file in [("run.dir", folder.dir, False), ("checkpoint.dir", folder.checkpoint_dir, False),
                                ("train.metrics_file", folder.metrics_file, True),
                                ("data.cache_dir", cfg.data.cache_dir, False),
                                ("logging.tensorboard_dir", cfg.logging.tensorboard_dir, False)]:
        if path is None:
            continue
        if os.path.exists(path):
            if os.path.isdir(path) == is_file:
                what = "a directory; give a file path" if is_file else "not a directory; choose another path"
                raise ConfigError(f"{name}={path}: exists and is {what}")
            continue
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ConfigError(f"{name}={path}: {parent} is a file, not a folder; choose another path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"{name}={path}: cannot create it ({parent} is not writable); choose another path")


def _check_batch(cfg: Config, dims: ParallelDims) -> None:
    t = cfg.train
    per_step = t.micro_batch_size * dims.dp
    if t.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size}: must be a multiple of "
                          f"micro_batch_size*dp = {t.micro_batch_size}*{dims.dp} = {per_step}")


def _check_model(cfg: Config) -> PretrainedConfig:
    m = cfg.model
    if m.path is not None:
        if not os.path.exists(m.path):
            raise ConfigError(f"model.path={m.path}: no such file or directory; give a local HF model "
                              "directory or its config.json")
        config_file = os.path.join(m.path, "config.json") if os.path.isdir(m.path) else m.path
        try:
            check_readable(m.path)
            if not os.path.isfile(config_file):
                raise ValueError("no config.json in that directory")
            check_readable(config_file)
        except ValueError as e:
            raise ConfigError(f"model.path={m.path}: {e}") from None
    try:
        model_config = load_model_config(m.preset, m.path)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as e:
        where = f"model.path={m.path}" if m.path is not None else f"model.preset={m.preset}"
        raise ConfigError(f"{where}: cannot load its config ({error_reason(e)}); fix its config.json (a "
                          "transformers config whose model_type this transformers knows)") from None
    _check_causal_lm(m.path, model_config)
    for key in m.overrides:
        if key == "model_type":
            raise ConfigError("model.overrides.model_type: the model's type comes from model.preset or model.path; "
                              "drop this override")
        if not hasattr(model_config, key):
            raise ConfigError(f"model.overrides.{key}: not a field of {type(model_config).__name__}")
    try:
        model_config = load_model_config(m.preset, m.path, m.overrides)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_sizes(cfg, model_config)
    if cfg.train.seq_len > getattr(model_config, "max_position_embeddings", cfg.train.seq_len):
        raise ConfigError(f"train.seq_len={cfg.train.seq_len}: longer than the model's "
                          f"max_position_embeddings={model_config.max_position_embeddings}")
    if m.path is not None:
        try:
            check_weights(m.path, model_config)
        except ValueError as e:
            raise ConfigError(f"model.path={m.path}: {e}") from None
    return model_config


def _check_causal_lm(path: str | None, config: PretrainedConfig) -> None:
    """The harness trains what AutoModelForCausalLM builds, as a language model of its own
    (a vocabulary and a stack of decoder layers): not encoders' or image models' configs, nor
    speculative-decoding assistants. (A multimodal checkpoint whose language model is one arrives
    here as its text config: `multimodal.language_model_config`.)"""
    mapping = AutoModelForCausalLM._model_mapping
    fix = "give a decoder-only language model's config (or a multimodal checkpoint whose language model is one)"
    text = config.get_text_config()
    if type(config) not in mapping and text is not config:
        raise ConfigError(f"model.path={path}: {config.model_type}'s language model "
                          f"({text.model_type}) has no causal-LM class in transformers (AutoModelForCausalLM); {fix}")
    if type(config) not in mapping:
        raise ConfigError(f"model.path={path}: {config.model_type} has no causal-LM class in transformers "
                          f"(AutoModelForCausalLM); {fix}")
    if not hasattr(config, "vocab_size"):
        raise ConfigError(f"model.path={path}: {config.model_type} builds {mapping[type(config)].__name__}, not a "
                          f"language model of its own (its config has no vocab_size); {fix}")


_POSITIVE_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "head_dim", "intermediate_size")


def _check_sizes(cfg: Config, config: PretrainedConfig) -> None:
    """Sizes that would build a model that cannot train (no layers, no width) or a forward that
    fails in every worker (query heads that key/value heads do not divide)."""
    m = cfg.model

    def where(key: str) -> str:
        return f"model.overrides.{key}" if key in m.overrides else f"model.path={m.path}: {key}"

    def size(key: str) -> int | None:
        try:
            value = getattr(config, key, None)
        except Exception:  # per-layer configs (Gemma 4) refuse to read a per-layer field globally
            return None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    for key in _POSITIVE_SIZES:
        value = size(key)
        if value is not None and value <= 0:
            raise ConfigError(f"{where(key)}={value}: must be > 0")
    heads, kv_heads = size("num_attention_heads"), size("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        key = "num_key_value_heads" if "num_key_value_heads" in m.overrides else "num_attention_heads"
        raise ConfigError(f"{where(key)}={size(key)}: num_key_value_heads={kv_heads} must divide "
                          f"num_attention_heads={heads} (each key/value head serves a group of query heads)")


def _check_experts(cfg: Config, model: nn.Module, dims: ParallelDims) -> None:
    model_config, blocks = model.config, moe_blocks(model)
    if cfg.moe.bias_update_rate < 0:
        raise ConfigError(f"moe.bias_update_rate={cfg.moe.bias_update_rate}: must be >= 0")
    if cfg.moe.bias_update_rate > 0 and not any(getattr(block.router, "e_score_correction_bias", None) is not None
                                                for block in blocks):
        raise ConfigError("moe.bias_update_rate: aux-loss-free balancing needs routers with an "
                          "e_score_correction_bias (e.g. deepseek_v3); set it to 0 for this model")
    experts, top_k = expert_count(model_config), experts_per_token(model_config)
    if experts and top_k > experts:
        raise ConfigError(f"model: each token is routed to {top_k} experts but the model has {experts}; lower "
                          "the top-k (e.g. model.overrides.num_experts_per_tok) or raise the expert count")
    if getattr(model_config, "output_router_logits", False):
        _check_aux_loss(model, dims)
    if dims.ep == 1:
        return
    experts = expert_count(model_config)
    if experts == 0:
        raise ConfigError(f"parallel.ep={dims.ep}: the model has no experts; set parallel.ep=1")
    if experts % dims.ep:
        raise ConfigError(f"parallel.ep={dims.ep}: must divide the model's {experts} experts")
    from moe.expert_parallel import check_expert_parallel_support

    if not blocks:
        raise ConfigError(f"parallel.ep={dims.ep}: {model_config.model_type}'s experts are not transformers' fused "
                          "experts modules (gate_up_proj/up_proj + down_proj); set parallel.ep=1")
    for block in blocks:
        try:
            check_expert_parallel_support(block.experts, dims.ep)
        except ValueError as e:
            raise ConfigError(f"parallel.ep={dims.ep}: {e}; set parallel.ep=1") from None
    if cfg.moe.dispatcher != "alltoall" and cfg.moe.dispatcher_strict:
        _check_dispatcher_available(cfg.moe.dispatcher, dims.ep, blocks[0].experts)


def _check_dispatcher_available(name: str, ep: int, experts: nn.Module) -> None:
    """A strict DeepEP / HybridEP dispatcher that cannot run here would fail in every worker."""
    from moe.dispatch import preflight
    from moe.experts import expert_input_size

    try:
        preflight(name, ep, expert_input_size(experts))
    except RuntimeError as e:
        raise ConfigError(f"moe.dispatcher={name}: unavailable here ({e}) and moe.dispatcher_strict=true; "
                          "set moe.dispatcher_strict=false to fall back to alltoall") from None


def _check_aux_loss(model: nn.Module, dims: ParallelDims) -> None:
    config, family_loss = model.config, router_aux_loss_function(model)
    if family_loss is None:
        raise ConfigError(f"model.overrides.output_router_logits: {config.model_type}'s forward returns no router "
                          "aux loss; set it to false (routers with a correction bias: moe.bias_update_rate)")
    # Pipeline stages (their layers) and tensor-parallel ranks (their slices of the sequence) each
    # see part of the routing: the loss is the switch loss of their summed statistics.
    split = [name for name, size in (("pp", dims.pp), ("tp", dims.tp)) if size > 1]
    if split and not splits_over_stages(family_loss, expert_count(config), experts_per_token(config)):
        raise ConfigError(f"model.overrides.output_router_logits: {config.model_type}'s router aux loss is not HF's "
                          "switch loss, which pipeline stages and tensor-parallel ranks compute from summed "
                          f"statistics; use {' and '.join(f'parallel.{name}=1' for name in split)} or aux-loss-free "
                          "balancing")


def _check_checkpoint(cfg: Config, folder: RunFolder, model_config: PretrainedConfig) -> None:
    c = cfg.checkpoint
    if os.path.exists(folder.checkpoint_dir) and not os.path.isdir(folder.checkpoint_dir):
        raise ConfigError(f"checkpoint.dir={folder.checkpoint_dir}: exists and is not a directory; choose another path")
    if c.resume_from is not None and not os.path.isdir(c.resume_from):
        raise ConfigError(f"checkpoint.resume_from={c.resume_from}: no such checkpoint directory")
    if c.load_weights_only and c.resume_from is None:
        raise ConfigError("checkpoint.load_weights_only: set checkpoint.resume_from to the checkpoint whose "
                          "weights to start from")
    start = start_point(c, folder.checkpoint_dir)
    if start is None:
        return
    if start.path == c.resume_from:
        where, fix = f"checkpoint.resume_from={c.resume_from}", "point checkpoint.resume_from at another checkpoint"
    else:
        where, fix = (f"checkpoint.dir={folder.checkpoint_dir}",
                      "delete it to resume from an older one, or set checkpoint.resume_from")
    name = os.path.basename(os.path.normpath(start.path))
    try:
        check_checkpoint(start.path)
    except ValueError as e:
        raise ConfigError(f"{where}: checkpoint {name} is corrupt ({e}); {fix}") from None
    # Another run's checkpoint: resuming it would continue someone else's model or data.
    other_run = ("choose another --run.name, or start from its weights with "
                 f"--checkpoint.resume_from={start.path} --checkpoint.load_weights_only=true")
    saved = read_identity(start.path)
    if saved is None:
        raise ConfigError(f"{where}: checkpoint {name} does not record what it was trained as (no readable "
                          f"run.json); {other_run}")
    difference = first_difference(saved, run_identity(cfg, model_config), model_only=start.weights_only)
    if difference is not None:
        what = "model" if start.weights_only else "run"
        raise ConfigError(f"{where}: checkpoint {name} is another {what} ({difference}); "
                          + ("use a checkpoint of this model" if start.weights_only else other_run))
