"""One training run on an initialised process group: build everything, then the loop."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import DeviceMesh

from harness.checkpoint import (TrainState, complete_checkpoints, finished_line, is_due, load_checkpoint,
                                load_weights, save_checkpoint, start_point, training_state)
from harness.config import Config
from harness.data import BatchSampler, load_tokens
from harness.data.splits import samplers
from harness.evaluate import evaluate
from harness.flops import flops_per_token, peak_flops_per_rank
from harness.layout_planner.plan_check import PlanCheck
from harness.loss import count_tokens, token_loss_sum
from harness.memory import peak_mib, state_mib
from harness.metrics import MetricsLog, report_outputs
from harness.model_parts import aux_loss_coefficient, decoder_layers, expert_count, experts_per_token, moe_blocks
from harness.models import build_meta_model, load_config as load_model_config, weight_source
from harness.nonfinite import NonFiniteStep, TrainingStopped, nonfinite_line
from harness.parallelize import parallelize
from harness.plan import Plan, resolved_recipe
from harness.preemption import PreemptionRequest
from harness.run_folder import save_recipe
from harness.run_identity import IDENTITY_FILE, identity_file_text, run_identity
from harness.schedule import lr_factor
from harness.summary import startup_summary
from moe.balance import aux_loss_term, router_statistics, summed_over_ranks, switch_aux_loss, update_expert_bias
from moe.load_meter import ExpertLoadMeter, expert_load_row, takes_routing
from parallel.context_parallel import SequenceShard, forward_arguments
from parallel.fsdp import mixed_precision_policy
from parallel.grad_clip import clip_grad_norm_
from parallel.tied_stages import TiedAcrossStages

if TYPE_CHECKING:
    from parallel.pipeline import PipelinePlan

logger = logging.getLogger(__name__)


class GlobalTokenLoss:
    """Token-summed loss divided by the step's token count over all data-parallel ranks.

    Summing it over microbatches and ranks gives the one-process mean, so gradients need no
    further scaling (FSDP sums rather than averages; pipeline schedules do not rescale).
    """

    def __init__(self) -> None:
        self.global_tokens = torch.ones(())

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(logits, labels) / self.global_tokens


class LastStageAuxLoss:
    """The last pipeline stage's loss with HF's router aux loss on: the token loss plus the aux
    loss of the router statistics every stage added to, scaled as `aux_loss_term` scales it over
    the step's `num_terms` microbatch forwards (all ranks); under tensor parallel, of the
    statistics summed over `tp_mesh`. The token losses are kept apart: they are what the step
    reports."""

    def __init__(self, token_loss: GlobalTokenLoss, config, num_terms: int, tp_mesh: DeviceMesh | None) -> None:
        self.token_loss, self.num_terms, self.tp_mesh = token_loss, num_terms, tp_mesh
        self.coefficient, self.num_experts = aux_loss_coefficient(config), expert_count(config)
        self.token_losses: list[torch.Tensor] = []

    def __call__(self, output: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        logits, router_stats = output
        if self.tp_mesh is not None:
            router_stats = summed_over_ranks(router_stats, self.tp_mesh)
        loss = self.token_loss(logits, labels)
        self.token_losses.append(loss.detach())
        return loss + self.coefficient * switch_aux_loss(router_stats, self.num_experts) / self.num_terms

    def step(self, pipeline: PipelinePlan, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """`pipeline.step`, returning the token loss alone."""
        pipeline.step(inputs, labels)
        if not pipeline.has_last_stage:
            return None
        losses, self.token_losses = self.token_losses, []
        return torch.stack(losses).sum()


@dataclass
class Run:
    """What the loop needs, built once; checkpointing saves and restores its state."""
    cfg: Config
    plan: Plan
    modules: list[nn.Module]  # the model, or this rank's pipeline stages
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: BatchSampler
    loss_fn: GlobalTokenLoss
    # (inputs, labels) -> this rank's loss (None off the last pipeline stage); accumulates gradients
    forward_backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]
    dp_group: dist.ProcessGroup  # the ranks that read different samples
    token_group: dist.ProcessGroup  # the ranks that hold different tokens: dp x cp
    routing_group: dist.ProcessGroup  # the ranks that route different tokens: dp x cp x tp (sequence parallel)
    pp_group: dist.ProcessGroup | None
    flops_per_token: float
    peak_flops_per_rank: float
    expert_modules: list[nn.Module]  # experts under expert parallel, for aux-loss-free balancing
    expert_load: ExpertLoadMeter | None
    state: TrainState = field(default_factory=TrainState)
    eval_sampler: BatchSampler | None = None  # the held-out split, when eval.every > 0
    tied: TiedAcrossStages | None = None  # a tied embedding's copies on the first and last pipeline stage
    sequence_shard: SequenceShard | None = None  # this rank's tokens of each sequence, under context parallel

    @property
    def step(self) -> int:
        return self.state.step

    def checkpoint_state(self) -> dict[str, Stateful]:
        return training_state(self.modules, self.optimizer, self.scheduler, self.state)


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_run(cfg: Config, plan: Plan) -> Run:
    device, dims = device_for_rank(), plan.dims
    meshes = dims.build_meshes(device.type)
    model_config = load_model_config(cfg.model.preset, cfg.model.path, cfg.model.overrides)
    model = build_meta_model(model_config)
    model_class, parameters = type(model).__name__, sum(p.numel() for p in model.parameters())
    model_flops = flops_per_token(model, model_config, cfg.train.seq_len)
    weights = weight_source(model, cfg.train.seed, cfg.model.path)
    shard = (SequenceShard(meshes.cp.get_group(), cfg.train.seq_len, cfg.parallel.cp_rotate) if dims.cp > 1
             else None)
    parallelize_fn = partial(parallelize, cfg=cfg, plan=plan, meshes=meshes, weights=weights, device=device,
                             sequence_shard=shard)
    loss_fn = GlobalTokenLoss()
    t = cfg.train
    tp_mesh = meshes.tp if dims.tp > 1 else None
    if dims.pp > 1:
        from harness.pipeline_stage import carried_examples, stage_builder, tied_embedding_copies
        from parallel.pipeline import pipeline_model

        p = cfg.parallel
        carried = carried_examples(model)
        aux_loss = (LastStageAuxLoss(loss_fn, model_config, t.global_batch_size // plan.pipeline_microbatch_size,
                                     tp_mesh) if carried else None)
        pipeline = pipeline_model(stage_builder(model, dims.tp, shard), len(decoder_layers(model)), meshes.pp,
                                  schedule=p.pp_schedule, n_microbatches=plan.pp_microbatches,
                                  stages_per_rank=plan.pp_stages_per_rank, layers_per_stage=p.pp_layers_per_stage,
                                  parallelize_fn=parallelize_fn, device=device, loss_fn=aux_loss or loss_fn,
                                  microbatch_shape=(plan.pipeline_microbatch_size, t.seq_len // dims.cp),
                                  activation_dtype=mixed_precision_policy(device.type).param_dtype or torch.float32,
                                  carried=carried, sequence_shards=dims.tp)
        modules = list(pipeline.stage_modules)
        step = partial(aux_loss.step, pipeline) if aux_loss is not None else pipeline.step
        forward_backward = partial(_pipeline_step, step)
        tied = tied_embedding_copies(model, pipeline, meshes.world, p.pp_schedule, plan.pp_stages_per_rank)
    else:
        parallelize_fn(model)
        tied = None
        aux_terms = cfg.train.global_batch_size // cfg.train.micro_batch_size
        modules = [model]
        forward_backward = partial(_forward_backward, model, loss_fn,
                                   aux_terms if getattr(model_config, "output_router_logits", False) else 0, tp_mesh)
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=t))
    tokens = load_tokens(cfg.data)
    sampler, eval_sampler = samplers(tokens, cfg)
    experts = [block.experts for module in modules for block in moe_blocks(module)]
    expert_modules = experts if dims.ep > 1 else []
    dispatcher = expert_modules[0]._expert_parallel.dispatcher_reason if expert_modules else None
    # Decided on the whole model, so every rank reports counts, with MoE layers in its stages or not.
    counted = any(takes_routing(block.experts) for block in moe_blocks(model))
    expert_load = ExpertLoadMeter(experts, expert_count(model_config)) if counted else None
    summary = startup_summary(cfg, plan, model_config, model_class, parameters, modules, len(tokens), dispatcher)
    if dist.get_rank() == 0:
        logger.info("\n".join(summary))
    return Run(cfg=cfg, plan=plan, modules=modules, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
               loss_fn=loss_fn, forward_backward=forward_backward, dp_group=meshes.dp.get_group(),
               token_group=meshes.dp_cp.get_group(), routing_group=meshes.dp_cp_tp.get_group(),
               pp_group=meshes.pp.get_group() if dims.pp > 1 else None, flops_per_token=model_flops,
               peak_flops_per_rank=peak_flops_per_rank(cfg.logging.peak_tflops,
                                                       int(os.environ.get("LOCAL_WORLD_SIZE", "1"))),
               expert_modules=expert_modules,
               expert_load=expert_load, eval_sampler=eval_sampler,
               tied=tied, sequence_shard=shard)


def _pipeline_step(step: Callable[..., torch.Tensor | None], inputs: torch.Tensor, labels: torch.Tensor,
                   **_model_inputs: torch.Tensor) -> torch.Tensor | None:
    """A pipeline schedule's step; each stage builds the model inputs besides its first stage's
    ids itself (harness/pipeline_stage.py), since a schedule hands stages only what they pass on."""
    return step(inputs, labels)


def _forward_backward(model: nn.Module, loss_fn: GlobalTokenLoss, aux_terms: int, tp_mesh: DeviceMesh | None,
                      inputs: torch.Tensor, labels: torch.Tensor, **model_inputs: torch.Tensor) -> torch.Tensor:
    """Backward of the token loss plus, when the model returns one, HF's router aux loss averaged
    over the step's `aux_terms` microbatch forwards (all ranks); returns the token loss alone.
    Under tensor parallel (`tp_mesh`) each rank's routers saw its slice of the sequence, and HF's
    loss of a slice is not the micro batch's: the switch loss of the router statistics summed over
    tp is (validation checked that the family's loss is the switch loss).
    `model_inputs`: `position_ids` (data.document_mask: they restart at each document, and HF masks
    attention across them; context parallel: the global positions) and context parallel's mask."""
    # No KV cache in training: recompute under activation checkpointing would append to it again.
    outputs = model(input_ids=inputs, use_cache=False, **model_inputs)
    loss = loss_fn(outputs.logits, labels)
    total = loss
    if aux_terms and tp_mesh is None:
        total = loss + aux_loss_term(outputs, aux_loss_coefficient(model.config), aux_terms)
    elif aux_terms:
        experts = expert_count(model.config)
        stats = router_statistics(tuple(outputs.router_logits), experts, experts_per_token(model.config))
        aux = switch_aux_loss(summed_over_ranks(stats, tp_mesh), experts)
        total = loss + aux_loss_coefficient(model.config) * aux / aux_terms
    total.backward()
    return loss.detach()


@dataclass
class PendingStep:
    """A finished step's values, on the host; rows are written in bursts on logging steps
    (`metrics_rows`)."""
    step: int
    lr: float
    tokens: int  # the step's global token count
    loss: float
    grad_norm: float
    expert_counts: list[float] | None  # routing decisions per expert, summed over the world
    extra: dict = field(default_factory=dict)  # values added to the row (evaluation)


def agree_on_step(run: Run) -> None:
    """Sets the loss divisor of the next step: its global token count, from one world all-reduce
    that nothing waits for.

    Every pipeline and tensor-parallel rank of a data-parallel group counts the same labels (the
    ranks of a cp group each their own), so the world sum is pp x tp times the dp x cp sum. The
    sum is float64 so the count is exact before it is cast.
    """
    copies = run.plan.dims.pp * run.plan.dims.tp
    assert dist.get_world_size(run.token_group) * copies == dist.get_world_size(), "the world is pp x dp x cp x tp"
    _, labels, _ = local_batch(run, run.step)
    tokens = torch.tensor([float(count_tokens(labels))], dtype=torch.float64, device=device_for_rank())
    dist.all_reduce(tokens)
    run.loss_fn.global_tokens = (tokens[0] / copies).float()


def agree_after_backward(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor,
                         preemption: PreemptionRequest | None) -> tuple[PendingStep, bool]:
    """The values of the step about to be applied, and whether any rank asked to stop after it:
    one world all-reduce of this rank's loss share, a flag for a non-finite gradient norm, the
    preemption flag and the expert counts, and one read from the device (the step's one wait).
    Raises NonFiniteStep when the loss or the gradient norm is not finite.

    The all-reduce has the same layout at every step: a ring all-reduce splits its buffer by the
    buffer's length, so summing several steps' losses in one buffer would make a step's float sum
    depend on the steps read with it, and so on where the run last resumed.
    """
    device = device_for_rank()
    asked = preemption is not None and preemption.requested
    counts = run.expert_load.take_counts().to(device) if run.expert_load is not None else torch.zeros(0, device=device)
    flags = torch.stack([(~torch.isfinite(grad_norm)).float(), torch.tensor(float(asked), device=device)])
    # Ranks without the last pipeline stage contribute zero loss, and the ranks of a tp group the
    # same loss, so a world sum of the loss over tp is the dp sum.
    summed = torch.cat([loss.reshape(1) / run.plan.dims.tp, flags, counts])
    dist.all_reduce(summed)
    host = torch.cat([summed, grad_norm.reshape(1).float(), run.loss_fn.global_tokens.reshape(1)]).tolist()
    (global_loss, bad_norms, askers), expert_counts, (norm, tokens) = host[:3], host[3:-2], host[-2:]
    step = run.step + 1
    # Any rank's non-finite gradient norm counts, so every rank raises here, or none does.
    if not math.isfinite(global_loss) or bad_norms > 0:
        raise NonFiniteStep(step, global_loss, norm)
    pending = PendingStep(step=step, lr=run.scheduler.get_last_lr()[0], tokens=int(tokens), loss=global_loss,
                          grad_norm=norm, expert_counts=expert_counts if run.expert_load is not None else None)
    return pending, askers > 0


def local_batch(run: Run, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This rank's inputs and labels of `step`, and (data.document_mask) the document positions of
    its rows over the whole sequence. Under context parallel, the inputs and labels are this rank's
    tokens of its data-parallel rank's rows (the labels were shifted over the whole sequence)."""
    dp_rank, dp_size = dist.get_rank(run.dp_group), dist.get_world_size(run.dp_group)
    inputs, labels = run.sampler.local_batch(step, dp_rank, dp_size)
    positions = run.sampler.position_ids(step, dp_rank, dp_size) if run.cfg.data.document_mask else None
    if run.sequence_shard is not None:
        inputs, labels = run.sequence_shard.split(inputs), run.sequence_shard.split(labels)
    return inputs, labels, positions


def run_step(run: Run, preemption: PreemptionRequest | None = None) -> tuple[PendingStep, bool]:
    """One optimizer step over the global batch, after `agree_on_step`; returns its values and
    whether to stop after it (`agree_after_backward`, which also refuses a non-finite step)."""
    cfg, device = run.cfg, device_for_rank()
    inputs, labels, positions = local_batch(run, run.step)
    inputs, labels = inputs.to(device), labels.to(device)
    loss = torch.zeros((), device=device)
    micro = cfg.train.micro_batch_size
    positions = positions.to(device) if positions is not None else None
    shard = run.sequence_shard
    for start in range(0, inputs.shape[0], micro):
        rows = slice(start, start + micro)
        documents = positions[rows] if positions is not None else None
        extra, forward = forward_arguments(shard, inputs[rows].shape[0], documents, device)
        with forward:
            micro_loss = run.forward_backward(inputs[rows], labels[rows], **extra)
        if micro_loss is not None:
            loss += micro_loss
    params = run.optimizer.param_groups[0]["params"]  # every parameter of this rank's modules
    if run.tied is not None:
        run.tied.sum_gradients()
    grad_norm = clip_grad_norm_(params, cfg.train.max_grad_norm, run.pp_group,
                                uncounted=run.tied.uncounted if run.tied is not None else ())
    pending, stop = agree_after_backward(run, loss, grad_norm, preemption)
    run.optimizer.step()
    run.scheduler.step()
    if cfg.moe.bias_update_rate > 0:
        update_expert_bias(run.modules, cfg.moe.bias_update_rate, run.routing_group)
    run.optimizer.zero_grad(set_to_none=True)
    run.state.step += 1
    return pending, stop


def metrics_rows(run: Run, pending: list[PendingStep], elapsed_s: float) -> list[dict]:
    """The metrics rows of `pending`. `elapsed_s`: wall time of those steps, shared evenly."""
    params = run.optimizer.param_groups[0]["params"]
    memory = {**state_mib(params, run.optimizer), "peak_mib": peak_mib(device_for_rank())}
    step_time = elapsed_s / len(pending)
    rows = []
    for p in pending:
        tokens_per_s = p.tokens / step_time
        mfu = tokens_per_s / dist.get_world_size() * run.flops_per_token / run.peak_flops_per_rank
        row = {"step": p.step, "loss": p.loss, "grad_norm": p.grad_norm, "lr": p.lr, "tokens": p.tokens,
               "tokens_per_s": tokens_per_s, "step_time_s": step_time, "mfu": mfu, **memory}
        if p.expert_counts is not None:
            row.update(expert_load_row(p.expert_counts))
        row.update(p.extra)
        rows.append(row)
    return rows


def train_step(run: Run) -> dict:
    """One optimizer step over the global batch, read back at once; returns its metrics row."""
    started = time.perf_counter()
    agree_on_step(run)
    pending, _ = run_step(run)
    return metrics_rows(run, [pending], time.perf_counter() - started)[0]


def _wait_for_device() -> float:
    """The time once the device has finished what the host queued (a logging step's time)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _log_rows(log: MetricsLog, rows: list[dict]) -> list[dict]:
    for row in rows:
        log.log(row)
    return rows


def checkpoint_run(run: Run, root: str) -> str:
    """A checkpoint of `run` at its current step under `root` (a collective); returns its path."""
    cfg = run.cfg
    identity = run_identity(cfg, load_model_config(cfg.model.preset, cfg.model.path, cfg.model.overrides))
    files = {"config.json": run.modules[0].config.to_json_string(),  # what export rebuilds the model from
             IDENTITY_FILE: identity_file_text(identity, resolved_recipe(cfg, run.plan))}
    return save_checkpoint(run.checkpoint_state(), root, run.step, cfg.checkpoint.keep, files)


def resume_run(run: Run, path: str) -> None:
    """Restores model, optimizer, LR schedule, step and (same world size only) RNG from `path`."""
    load_checkpoint(run.checkpoint_state(), path)
    logger.info("checkpoint: resumed from %s at step %d", path, run.step)


def train(cfg: Config, plan: Plan, preemption: PreemptionRequest | None = None) -> list[dict]:
    """Trains up to cfg.train.steps, resuming from the newest checkpoint; returns the metrics rows
    of this invocation (on every rank). When `preemption` is signalled, checkpoints and stops."""
    folder = plan.folder
    check = PlanCheck(cfg) if cfg.logging.plan_check else None
    run = build_run(cfg, plan)
    start = start_point(cfg.checkpoint, folder.checkpoint_dir)
    if start is not None and start.weights_only:
        load_weights(run.modules, start.path)
        logger.info("checkpoint: model weights from %s; optimizer, schedule and step start fresh", start.path)
    elif start is not None:
        resume_run(run, start.path)
        if run.step >= cfg.train.steps:
            # The launcher says so before starting workers; this is the torchrun-worker path.
            if dist.get_rank() == 0:
                logger.info(finished_line(start.path, run.step, cfg.train.steps, folder.checkpoint_dir))
            return []
    if dist.get_rank() == 0:
        save_recipe(folder, resolved_recipe(cfg, plan))
    log = MetricsLog(folder.metrics_file, cfg.train.steps, cfg.logging.log_every, cfg.logging.progress,
                     enabled=dist.get_rank() == 0, start_step=run.step, tensorboard_dir=cfg.logging.tensorboard_dir)
    rows: list[dict] = []
    pending: list[PendingStep] = []  # steps since the last logged one, written together
    first_step, total = run.step + 1, cfg.train.steps
    window_start = time.perf_counter()
    try:
        while run.step < total:
            step_start = time.perf_counter()
            agree_on_step(run)
            done, stop = run_step(run, preemption)
            pending.append(done)
            step = run.step
            if check is not None and check.is_due(step, first_step, total):
                checked = _wait_for_device()
                line = check.line(cfg, plan, checked - step_start)
                if line is not None:
                    logger.info(line)
                window_start += time.perf_counter() - checked  # the prediction is no step's time
            evaluating = cfg.eval.every > 0 and (step % cfg.eval.every == 0 or step == total)
            checkpointing = stop or is_due(cfg.checkpoint.every, step, total)
            if evaluating or checkpointing or log.wants_row(step):
                elapsed = _wait_for_device() - window_start
                if evaluating:
                    pending[-1].extra.update(evaluate(run.modules[0], run.eval_sampler, cfg.eval.steps,
                                                      cfg.train.micro_batch_size, cfg.data.document_mask,
                                                      run.dp_group, run.token_group, device_for_rank(),
                                                      run.sequence_shard))
                rows += _log_rows(log, metrics_rows(run, pending, elapsed))
                pending = []
                if checkpointing:
                    checkpoint_run(run, folder.checkpoint_dir)
                window_start = time.perf_counter()
            if stop:
                logger.info("preemption signal: stopped after step %d", step)
                break
    except NonFiniteStep as bad:
        if pending:  # the steps before it were applied: their rows stay
            _log_rows(log, metrics_rows(run, pending, _wait_for_device() - window_start))
        newest = complete_checkpoints(folder.checkpoint_dir)
        raise TrainingStopped(nonfinite_line(bad, newest[-1][1] if newest else None, first_step,
                                             start.path if start is not None else None, cfg.model.path)) from None
    finally:
        log.close()
    if dist.get_rank() == 0:
        newest = complete_checkpoints(folder.checkpoint_dir)
        for line in report_outputs(folder.metrics_file, newest[-1][1] if newest else None):
            logger.info(line)
    return rows
