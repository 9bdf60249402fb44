"""Tensor + sequence parallel against the one-process run (fp32, CPU, gloo), under FSDP2 and
under pipeline stages, activation checkpointing under it, and the plans it refuses."""

import os
import re
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoConfig, PretrainedConfig

from harness.checkpoint import complete_checkpoints
from harness.config import Config, ConfigError
from harness.loss import token_loss_sum
from harness.materialize import canonical_name
from harness.model_parts import tensor_parallel_parts
from harness.models import build_meta_model, load_config as load_model_config, reference_model
from harness.summary import startup_summary
from harness.trainer import build_run, resume_run
from harness.validation import validate
from parallel.tensor_parallel import layer_styles
from parallel.mesh import ParallelDims
from tests.ac_helpers import assert_kept_bytes_predicted, kept_bytes_on_rank, predicted_layers_and_budget_config
from tests.families import hand_shrunk_config, tiny_config as family_tiny_config
from tests.family_matrix import compare
from tests.layout_run import assert_matches_reference, train_layout
from tests.multiproc import run_ranks
from tests.reference import reference_run, tiny_config
from tests.test_layouts_moe import STEADY_SEED


def _family_flags(tmp_path, family: str, tied: bool = False) -> list[str]:
    """A family's hand-shrunk config (non-neutral logit scale / soft-caps), saved for model.path."""
    config = hand_shrunk_config(family)
    config.tie_word_embeddings = tied
    return _config_flags(tmp_path, family, config)


def _config_flags(tmp_path, family: str, config: PretrainedConfig) -> list[str]:
    folder = os.path.join(tmp_path, family)
    config.save_pretrained(folder)
    return [f"--model.path={folder}/config.json"]


def _train_each(rank: int, world_size: int, cfgs: list, saved: int | None = None, checkpoint_root: str | None = None,
                resumed: Config | None = None) -> tuple[list, dict[str, torch.Tensor] | None]:
    """Each cfg trained, `cfgs[saved]` checkpointed under `checkpoint_root` at its end; then
    `resumed` (another layout of it) loads that checkpoint: its full parameters right after."""
    results = [train_layout(rank, world_size, cfg, checkpoint_root if index == saved else None)
               for index, cfg in enumerate(cfgs)]
    if resumed is None:
        return results, None
    run = build_run(resumed, validate(resumed, world_size))
    (_, path), = complete_checkpoints(checkpoint_root)
    resume_run(run, path)
    return results, get_model_state_dict(run.modules[0], options=StateDictOptions(full_state_dict=True))


@pytest.mark.parametrize("world_size, layout", [
    (2, ["--parallel.tp=2", "--parallel.dp_shard=1"]),
    (4, ["--parallel.tp=2", "--parallel.dp_shard=2"]),
], ids=["tp2", "tp2-fsdp2"])
def test_layout_matches_single_process(tmp_path, world_size, layout):
    # Gemma 2 with tied embeddings: soft-capped attention and logits, a scaled embedding, four norms
    # per layer, and the head sharing the vocabulary-sharded embedding. Apertus's learnable XIELU
    # activation takes this rank's MLP features: its replicated parameters' gradient is summed over
    # the ranks (this rank's share alone let the replicas part, 5e-4 in loss by step 3). Under
    # FSDP2, DeepSeek-V3's multi-head latent attention (the plan's mla_kv_a_proj, a replicated
    # low-rank query projection and norms) and its MoE layers (router, routed and shared experts
    # on each rank's slice of the sequence, their gradients summed over tp).
    # Llama's weights are read from safetensors, each rank its tp x fsdp slices; the families'
    # are the seeded init. Llama's steps and parameters are compared as every preset layout test
    # does, later steps of the families as the family matrix allows them (family_matrix.compare).
    reference_model(load_model_config("llama", None), seed=7).save_pretrained(tmp_path / "llama")
    cfgs = [tiny_config(*layout, f"--model.path={tmp_path / 'llama'}"),
            tiny_config(*layout, *_family_flags(tmp_path, "gemma2", tied=True)),
            tiny_config(*layout, *_family_flags(tmp_path, "cohere")),
            tiny_config(*layout, *_config_flags(tmp_path, "apertus", family_tiny_config("apertus")))]
    presets, saved, resumed = [0], None, None
    if world_size == 4:
        deepseek_v3 = _config_flags(tmp_path, "deepseek_v3", family_tiny_config("deepseek_v3"))
        cfgs.append(tiny_config(*layout, *deepseek_v3, "--moe.bias_update_rate=0.01"))
        # Expert parallel over the ranks of equal tp index, each tp rank dispatching its slice of
        # the sequence: Qwen3-MoE with HF's aux loss (its statistics summed over tp), checkpointed
        # and loaded into tp=1 x ep=2; DeepSeek-V3's shared experts and MLA with aux-loss-free
        # balancing (its expert loads summed over tp as well; two steps: the second routes with
        # the first's biases).
        qwen3_moe = ["--model.preset=qwen3_moe", STEADY_SEED, "--model.overrides.output_router_logits=true",
                     "--model.overrides.router_aux_loss_coef=0.1"]
        cfgs += [tiny_config(*layout, "--parallel.ep=2", *qwen3_moe),
                 tiny_config(*layout, "--parallel.ep=2", *deepseek_v3, "--moe.bias_update_rate=0.01", "--train.steps=2")]
        presets, saved = [0, len(cfgs) - 2], len(cfgs) - 2
        resumed = tiny_config("--parallel.dp_shard=4", "--parallel.ep=2", *qwen3_moe)
    outcome = run_ranks(_train_each, world_size, cfgs, saved, str(tmp_path / "ckpt"), resumed)
    results = [per_rank for per_rank, _ in outcome]
    for index, cfg in enumerate(cfgs):
        reference = reference_run(cfg)
        if index in presets:
            assert_matches_reference([per_rank[index] for per_rank in results], reference)
            continue
        routed = "deepseek_v3" in cfg.model.path
        for per_rank in results:
            assert compare(per_rank[index], reference, routed=routed) == "ok", cfg.model.path
            if cfg.moe.bias_update_rate > 0:  # the loads of every tp rank's tokens moved the biases
                biases = [name for name in reference[2] if name.endswith("e_score_correction_bias")]
                assert biases and all(torch.equal(per_rank[index][2][name], reference[2][name]) for name in biases)
    if resumed is not None:
        trained = results[0][saved][2]
        for _, loaded in outcome:
            assert loaded.keys() == trained.keys()
            for name, value in loaded.items():
                assert torch.equal(value, trained[name]), name


# DTensor's collectives (torch.ops._c10d_functional); FSDP2's and the loss's are c10d's own.
_TP_COLLECTIVES = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_to_all_single")


class CollectiveCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "_c10d_functional" and func.__name__.split(".")[0] in _TP_COLLECTIVES:
            self.counts[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def _step_under_each_ac_mode(rank: int, world_size: int, cfgs: dict, plans: dict) -> dict:
    """Per AC mode: the loss, every gradient shard, and the TP collectives of forward and backward.
    `plans`: the modes validated before the spawn (ac.mode=budget measures on a fake process group,
    which only a process without one can start)."""
    out = {}
    for mode, cfg in cfgs.items():
        plan = plans.get(mode) or validate(cfg, world_size)
        run = build_run(cfg, plan)
        model = run.modules[0]
        summary = startup_summary(cfg, plan, model.config, type(model).__name__, 0, run.modules, 0, None)
        inputs, labels = run.sampler.local_batch(0, 0, 1)
        forward, backward = CollectiveCounter(), CollectiveCounter()
        with forward:
            loss = token_loss_sum(model(input_ids=inputs, use_cache=False).logits, labels)
        with backward:
            loss.backward()
        grads = {canonical_name(name): p.grad.to_local().clone() for name, p in model.named_parameters()}
        says_saved = any("recompute in backward issues no TP collective" in line for line in summary)
        out[mode] = (loss.detach(), grads, forward.counts, backward.counts, says_saved)
    return out


def _ac_steps_and_kept_bytes(rank: int, world_size: int, cfgs: dict, plans: dict) -> tuple[dict, dict]:
    meshes = ParallelDims(pp=1, dp_replicate=1, dp_shard=1, cp=1, tp=2, ep=1, world_size=2).build_meshes("cpu")
    cfg = cfgs["none"]
    kept = kept_bytes_on_rank(load_model_config("llama", None), meshes, cfg.train.micro_batch_size, cfg.train.seq_len)
    return _step_under_each_ac_mode(rank, world_size, cfgs, plans), kept


def test_activation_checkpointing_is_bitwise_and_selective_recomputes_no_collective():
    """Uniform modes and a budget plan that mixes them; the budget's per-layer prediction (one
    rank's fake step) is what each layer keeps on a rank."""
    cfgs = {mode: tiny_config("--parallel.tp=2", "--parallel.dp_shard=1", f"--ac.mode={mode}")
            for mode in ("none", "selective", "full")}
    predicted, budget_cfg = predicted_layers_and_budget_config(cfgs["none"], tp=2, cp=1)
    cfgs["budget"] = budget_cfg
    plans = {"budget": validate(budget_cfg, 2)}
    assert len(set(plans["budget"].ac_budget.layer_modes)) > 1, plans["budget"].ac_budget.describe()
    for per_mode, kept in run_ranks(_ac_steps_and_kept_bytes, 2, cfgs, plans):
        assert_kept_bytes_predicted(predicted, kept)
        loss, grads, forward, backward, _ = per_mode["none"]
        assert sum(forward.values()) > 0 and sum(backward.values()) > 0, (forward, backward)
        assert [per_mode[mode][4] for mode in ("none", "selective", "full")] == [False, True, False]
        for mode in ("selective", "full", "budget"):
            other_loss, other_grads, other_forward, other_backward, _ = per_mode[mode]
            assert torch.equal(loss, other_loss), mode
            for name, grad in grads.items():
                assert torch.equal(grad, other_grads[name]), (mode, name)
            assert other_forward == forward, mode
        # Full AC runs each layer's forward again in backward, collectives included; selective AC
        # saved them, so its backward issues exactly the collectives of no AC.
        assert sum(per_mode["full"][3].values()) > sum(backward.values()), (per_mode["full"][3], backward)
        assert per_mode["selective"][3] == backward, (per_mode["selective"][3], backward)


def _pipelines_then_ac(rank: int, world_size: int, cfgs: list, ac_cfgs: dict) -> tuple[list, dict]:
    return _train_each(rank, world_size, cfgs)[0], _pipeline_step_under_each_ac_mode(rank, world_size, ac_cfgs)


def _pipeline_step_under_each_ac_mode(rank: int, world_size: int, cfgs: dict) -> dict:
    """Per AC mode: this rank's loss (None off the last stage), gradient shards, and the TP
    collectives of one pipeline step (forward and backward of every microbatch)."""
    out = {}
    for mode, cfg in cfgs.items():
        run = build_run(cfg, validate(cfg, world_size))
        inputs, labels = run.sampler.local_batch(0, 0, 1)
        micro = cfg.train.micro_batch_size
        with CollectiveCounter() as counter:
            loss = run.forward_backward(inputs[:micro], labels[:micro])
        grads = {canonical_name(name): p.grad.to_local().clone()
                 for module in run.modules for name, p in module.named_parameters()}
        out[mode] = (loss, grads, counter.counts)
    return out


def test_pipeline_stages_under_tensor_parallel(tmp_path):
    # pp=2 x tp=2: stages hand on the sequence-sharded residual stream. Gemma 2's tied embeddings
    # sit on the first and last stage (one rank each under 1F1B, one rank for both under the V
    # placement of ZBVZeroBubble, whose backward splits input and weight gradients); Cohere's
    # logit scale on the last of four stages of Interleaved1F1B. Qwen3-MoE's HF aux loss: the last
    # stage takes it of the router statistics carried through the stages and summed over tp (one
    # step: its gradient norm carries the aux loss's gradient, at a weight of 1, where a loss of a
    # tp rank's own statistics is 9e-2 off; at 0.1 only 1.2e-5).
    pp_tp = ["--parallel.pp=2", "--parallel.tp=2", "--parallel.dp_shard=1", "--parallel.pp_microbatches=2"]
    gemma2, cohere = _family_flags(tmp_path, "gemma2", tied=True), _family_flags(tmp_path, "cohere")
    cfgs = [tiny_config(*pp_tp, "--parallel.pp_schedule=1F1B", *gemma2),
            tiny_config(*pp_tp, "--parallel.pp_schedule=ZBVZeroBubble", *gemma2),
            tiny_config(*pp_tp, "--parallel.pp_schedule=Interleaved1F1B", *cohere),
            tiny_config(*pp_tp, "--model.preset=qwen3_moe", "--train.steps=1",
                        "--model.overrides.output_router_logits=true", "--model.overrides.router_aux_loss_coef=1.0")]
    ac_cfgs = {mode: tiny_config(*pp_tp, "--parallel.pp_schedule=GPipe", f"--ac.mode={mode}", "--train.steps=1")
               for mode in ("none", "selective", "full")}
    results = run_ranks(_pipelines_then_ac, 4, cfgs, ac_cfgs, timeout=900)
    for index, cfg in enumerate(cfgs):
        reference = reference_run(cfg)
        for per_rank, _ in results:
            assert compare(per_rank[index], reference) == "ok", cfg.parallel.pp_schedule
    for _, per_mode in results:
        loss, grads, counts = per_mode["none"]
        assert sum(counts.values()) > 0, counts
        for mode in ("selective", "full"):
            other_loss, other_grads, _ = per_mode[mode]
            assert (loss is None and other_loss is None) or torch.equal(loss, other_loss), mode
            for name, grad in grads.items():
                assert torch.equal(grad, other_grads[name]), (mode, name)
        # Full AC runs each layer's forward again in backward, TP collectives included; selective
        # AC saved them, so its step issues exactly the collectives of no AC.
        assert sum(per_mode["full"][2].values()) > sum(counts.values()), (per_mode["full"][2], counts)
        assert per_mode["selective"][2] == counts, (per_mode["selective"][2], counts)


@pytest.mark.parametrize("family, fields, message", [
    ("gpt2", {}, "gpt2: transformers ships no tensor-parallel plan"),
    ("minicpm5_moe", dict(n_routed_experts=4, num_experts_per_tok=2),
     "styles layers.*.self_attn.k_proj 'unit_colwise', which tensor parallel does not support"),
    # Blocks the plan leaves whole run replicated through hooks on their forward; AltUp's
    # predict and correct would bypass them.
    ("gemma3n_text", dict(layer_types=["full_attention"], num_kv_shared_layers=0, activation_sparsity_pattern=[0.0],
                          vocab_size_per_layer_input=64, hidden_size_per_layer_input=8),
     "altup (Gemma3nTextAltUp) holds parameters its TP plan does not place, and the layer uses its predict"),
    ("doge", {}, "DogeDecoderLayer holds parameters of its own"),
    # Per-layer inputs are computed from the whole sequence; sequence parallel hands a layer its slice.
    ("gemma4_text", dict(layer_types=["full_attention"], num_kv_shared_layers=0, vocab_size_per_layer_input=64,
                         hidden_size_per_layer_input=8),
     "gemma4_text: its layers take per-layer inputs computed from the whole sequence"),
])
def test_plans_it_cannot_honour_are_refused_in_one_line(family, fields, message):
    config = AutoConfig.for_model(family, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                                  num_hidden_layers=1, intermediate_size=32, vocab_size=64, **fields)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        layer_styles(tensor_parallel_parts(build_meta_model(config)))
    assert "\n" not in str(error.value) and str(error.value).endswith("use parallel.tp=1")


@pytest.mark.parametrize("family, tp, message", [
    # Gemma 4's full-attention layers have their own key/value heads (1 in its tiny config).
    ("gemma4_unified_text", 2, "parallel.tp=2: must divide layer 1's num_key_value_heads=1"),
    # Dots 3's sliding-window layers have their own query heads (2 in its tiny config, 4 elsewhere).
    ("dots3_note_text", 4, "parallel.tp=4: must divide layer 2's num_attention_heads=2"),
])
def test_every_layers_heads_must_divide_by_tp(tmp_path, family, tp, message):
    cfg = tiny_config(f"--parallel.tp={tp}", "--parallel.dp_shard=1",
                      *_config_flags(tmp_path, family, family_tiny_config(family)))
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        validate(cfg, tp)
    assert "\n" not in str(error.value) and family in str(error.value)
