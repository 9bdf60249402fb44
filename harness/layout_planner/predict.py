"""Per-rank peak memory and step time of one layout, from the model's shapes, the measured
activations and the device's figures.

Memory at the peak (the start of a backward) on the pp rank that needs most: parameters,
gradients (when earlier passes of the step made them: gradient accumulation, or a pipeline
schedule that runs backwards before its last forwards) and AdamW moments (model_state.py), FSDP's gathered
copies, and the activations of the microbatches the schedule keeps in flight (schedules.py) plus
the step's remainder (logits and loss) on the rank that holds the head. Tensor parallel divides
the activations by tp (sequence parallel shards what the column / row split does not); context
parallel divides them by cp (a rank's queries against all keys) and adds every attention layer's
keys and values gathered from the other cp ranks. FSDP shards over dp_shard x cp.

Step time = compute + bubble + exposed communication:
- compute: 6 x active parameters + attention FLOPs per token (harness/flops.py) over the world,
  with the recompute of the AC mode (a full forward again = +1/3), on the rank with the most
  layers, at peak_tflops x efficiency;
- bubble: the schedule's idle share of that compute;
- FSDP all-gathers (forward, and backward again when resharding) and reduce-scatters (fp32 on
  CUDA) of every micro batch, plus HSDP's all-reduce: overlapped with compute by prefetching,
  so only what exceeds the compute, plus the first layer's gather, is exposed (on GPUs; gloo's
  collectives take the CPU cores the compute needs, and are all exposed);
- tensor parallel's all-gathers and reduce-scatters (4 per layer forward, 4 backward, 4 more
  with full AC's recompute), context parallel's key and value all-gather per attention layer
  (forward, recompute) and their gradients' reduce-scatter (backward), expert parallel's
  dispatch and combine (forward and backward), pipeline sends: not overlapped (each blocks the
  computation that follows it).
Each collective moves (n - 1) / n of its bytes per rank over its group's link: inside a node when
the group's ranks fit one (--gpus-per-node), else across nodes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from harness.config import Config
from harness.layout_planner.activations import ActivationProfile
from harness.layout_planner.devices import Device
from harness.layout_planner.layouts import Layout
from harness.layout_planner.model_state import FP32, ModelState, Sharding, StateBytes, rank_layers, state_bytes
from harness.layout_planner.schedules import bubble_fraction, in_flight
from harness.model_parts import experts_per_token


@dataclass(frozen=True)
class ModelFacts:
    """What the predictions read of the model, gathered once."""
    state: ModelState
    profile: ActivationProfile
    flops_per_token: float
    hidden_size: int
    top_k: int
    kv_width: int  # key and value elements per token of an attention layer, as context parallel gathers them


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    rank: int  # the pipeline rank whose peak this is (the one that needs most)
    state: StateBytes
    activation_bytes: int
    peak_bytes: int
    fits: bool
    times: dict[str, float]  # seconds per step: compute, bubble and each exposed communication
    tokens_per_step: int

    @property
    def step_s(self) -> float:
        return sum(self.times.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def dominant(self) -> str:
        return max(self.times, key=self.times.get)


def _link_GBps(device: Device, span: int, gpus_per_node: int) -> float:
    """Bandwidth of a group whose ranks lie within `span` consecutive ranks."""
    return device.intra_node_GBps if span <= gpus_per_node else device.inter_node_GBps


def predict(facts: ModelFacts, layout: Layout, cfg: Config, world: int, gpus_per_node: int, device: Device,
            layer_modes: tuple[str, ...] | None = None) -> Prediction:
    """`layer_modes`: each layer's AC mode (budget plans); None = `layout.ac_mode` everywhere."""
    num_layers = len(facts.state.layers)
    modes = layer_modes or (layout.ac_mode,) * num_layers
    sharding = Sharding(tp=layout.tp, ep=layout.ep, dp_shard=layout.dp_shard * layout.cp)  # FSDP over dp_shard x cp
    compute_bytes = device.compute_dtype.itemsize
    rows = layout.micro_batch_size / layout.pp_microbatches / layout.tp
    seq = cfg.train.seq_len
    # Context parallel: each rank keeps the activations of its 1/cp of the tokens (its queries
    # against all keys, so attention's scores too), and every layer's gathered keys and values.
    gathered_kv = (layout.micro_batch_size / layout.pp_microbatches * seq * facts.kv_width / layout.tp
                   * compute_bytes * (layout.cp - 1) / layout.cp)
    rows /= layout.cp
    accumulation = cfg.train.global_batch_size // (layout.micro_batch_size * layout.dp_replicate * layout.dp_shard)
    # One data-parallel rank on CPU runs without FSDP (harness/parallelize.py): no gathered copies.
    fsdp = layout.dp_replicate * layout.dp_shard * layout.cp > 1 or device.device_type == "cuda"
    worst: tuple[int, StateBytes, float] | None = None
    most_layers = 0
    for rank in range(layout.pp):
        layer_ids, first, last = rank_layers(num_layers, layout.pp, layout.pp_schedule, layout.stages_per_rank, rank)
        most_layers = max(most_layers, len(layer_ids))
        state = state_bytes(facts.state, sharding, layer_ids, first, last, compute_bytes, pipelined=layout.pp > 1)
        if not fsdp:
            state = dataclasses.replace(state, gathered=0)
        flight = in_flight(layout.pp_schedule, layout.pp, layout.stages_per_rank, layout.pp_microbatches, rank)
        activation = flight * (facts.profile.kept(modes, layer_ids, rows) + len(layer_ids) * gathered_kv)
        if last:  # the head's logits and loss, kept for each microbatch in flight as a layer's activations are
            activation += flight * rows * facts.profile.remainder_bytes
        if not (accumulation > 1 or flight < layout.pp_microbatches) and layer_ids:
            # One forward-then-backward pass: at the start of its backward no gradient exists yet
            # (each is made as the activations it needs are freed); at its end every one does,
            # beside a layer recomputed whole under AC (the largest: a hybrid's attention, not its
            # convolution). The larger is the peak.
            end = max(facts.profile.kept(("none",) * num_layers, [i], rows) for i in layer_ids) + gathered_kv
            if activation > state.grad + end:
                state = dataclasses.replace(state, grad=0)
            else:
                activation = end
        if worst is None or state.total + activation > worst[1].total + worst[2]:
            worst = (rank, state, activation)
    worst_rank, state, activation = worst
    peak = state.total + int(activation)
    times = _step_times(facts, layout, cfg, world, gpus_per_node, device, modes, most_layers)
    return Prediction(layout=layout, rank=worst_rank, state=state, activation_bytes=int(activation), peak_bytes=peak,
                      fits=peak <= device.memory_bytes - device.reserve_bytes, times=times,
                      tokens_per_step=cfg.train.global_batch_size * seq)


def _step_times(facts: ModelFacts, layout: Layout, cfg: Config, world: int, gpus_per_node: int, device: Device,
                modes: tuple[str, ...], most_layers: int) -> dict[str, float]:
    num_layers = len(facts.state.layers)
    seq, compute_bytes = cfg.train.seq_len, device.compute_dtype.itemsize
    dp = layout.dp_replicate * layout.dp_shard
    shards = layout.dp_shard * layout.cp  # FSDP shards over dp_shard x cp
    accumulation = cfg.train.global_batch_size // (layout.micro_batch_size * dp)
    microbatches = accumulation * layout.pp_microbatches  # pipeline passes x microbatches each
    rows = layout.micro_batch_size / layout.pp_microbatches
    recompute = facts.profile.recompute_fraction(modes) / 3
    imbalance = most_layers * layout.pp / num_layers
    flops = facts.flops_per_token * cfg.train.global_batch_size * seq / world
    compute = flops / (device.peak_tflops * 1e12 * device.efficiency) * (1 + recompute) * imbalance
    times = {"compute": compute,
             "bubble": compute * bubble_fraction(layout.pp_schedule, layout.pp, layout.stages_per_rank,
                                                 layout.pp_microbatches)}
    layer_ids, first, last = rank_layers(num_layers, layout.pp, layout.pp_schedule, layout.stages_per_rank, 0)
    sharding = Sharding(tp=layout.tp, ep=layout.ep, dp_shard=shards)
    units = [facts.state.layers[i] for i in layer_ids]
    # FSDP: per micro batch, gathers in the compute dtype and reduce-scatters in fp32.
    gathered = sum(sharding.gathered_numel(t) * (shards // (layout.ep if t.expert else 1) - 1)
                   / (shards // (layout.ep if t.expert else 1)) for unit in units for t in unit)
    gathers = 1 if layout.pp > 1 else 2
    fsdp_bytes = accumulation * gathered * (gathers * compute_bytes + FP32)
    fsdp = fsdp_bytes / 1e9 / _link_GBps(device, shards * layout.tp, gpus_per_node)
    if layout.dp_replicate > 1:
        local = sum(sharding.local_numel(t) for unit in units for t in unit)
        r = layout.dp_replicate
        fsdp += accumulation * 2 * local * FP32 * (r - 1) / r / 1e9 / _link_GBps(device, dp * layout.tp, gpus_per_node)
    first_unit = sum(sharding.gathered_numel(t) for t in units[0]) * compute_bytes if units and shards > 1 else 0
    exposed = max(0.0, fsdp - compute) if device.overlaps_communication else fsdp
    times["fsdp"] = exposed + first_unit / 1e9 / _link_GBps(device, shards * layout.tp, gpus_per_node)
    tokens = rows * seq / layout.cp  # one microbatch's tokens on this rank
    activation = tokens * facts.hidden_size * compute_bytes  # one microbatch's hidden states
    if layout.tp > 1:
        per_layer = 8 + (4 if "full" in modes else 0)
        tp = (microbatches * len(layer_ids) * per_layer * activation * (layout.tp - 1) / layout.tp)
        times["tp"] = tp / 1e9 / _link_GBps(device, layout.tp, gpus_per_node)
    if layout.ep > 1:
        moe_layers = sum(1 for i in layer_ids if any(t.expert for t in facts.state.layers[i]))
        # Under tp each rank dispatches its slice of the sequence (sequence parallel).
        ep = microbatches * moe_layers * 4 * activation / layout.tp * facts.top_k * (layout.ep - 1) / layout.ep
        times["ep"] = ep / 1e9 / _link_GBps(device, layout.ep * layout.tp, gpus_per_node)
    if layout.cp > 1:
        # Keys and values all-gathered per attention layer forward (again under full AC), their
        # gradients reduce-scattered in backward, over the cp ranks (strided by tp).
        passes = 2 + (1 if "full" in modes else 0)
        kv = tokens * facts.kv_width / layout.tp * compute_bytes * (layout.cp - 1)
        cp = microbatches * len(layer_ids) * passes * kv
        times["cp"] = cp / 1e9 / _link_GBps(device, layout.cp * layout.tp, gpus_per_node)
    if layout.pp > 1:
        sends = microbatches * layout.stages_per_rank * 2 * activation
        times["pp"] = sends / 1e9 / _link_GBps(device, world, gpus_per_node)
    return times


def model_facts(model, profile: ActivationProfile, seq_len: int) -> ModelFacts:
    from harness.flops import flops_per_token

    return ModelFacts(state=ModelState.of(model), profile=profile,
                      flops_per_token=flops_per_token(model, model.config, seq_len),
                      hidden_size=model.config.hidden_size, top_k=max(experts_per_token(model.config), 1),
                      kv_width=_kv_width(model.config))


def _kv_width(config) -> int:
    """Key and value elements per token of one attention layer, from the config's head counts."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * (getattr(config, "num_key_value_heads", None) or heads) * head_dim
