"""Memory-budget activation checkpointing: none, selective or full per decoder layer.

The plan is chosen from measurements, not per-family formulas: the model's own forward and
backward run on fake tensors (no memory, no weights) under PyTorch's `MemTracker`, with the very
checkpoint wrappers a run applies, for the real microbatch shape and activation dtype. That gives
each layer's kept bytes per mode (what its forward leaves alive for backward, its output
included) and the peak of a whole step for any per-layer plan. Recompute cost comes from the
same fake forward: each op's roofline cost, summed over the ops a mode recomputes.

Choice: from none everywhere, move layers to modes that keep less, best bytes saved per cost
added first, until the simulated peak fits the budget.

Under tensor and context parallel the fake step is one rank's: the copy it runs is parallelized as
a run parallelizes it (`RankLayout`, on a fake process group), so each layer keeps what it keeps on
a rank: its slice of the sequence in the residual stream and norms, its heads and features in the
column-parallel parts, and under context parallel the whole sequence's gathered keys and values.
"""

from __future__ import annotations

import contextlib
import math
import copy
from dataclasses import dataclass
from typing import Any, Callable, Collection, ContextManager, Iterator, Sequence

import torch
from torch import nn
from torch._subclasses import fake_impls
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import CheckpointPolicy, SelectiveCheckpointContext
from torch.utils.flop_counter import flop_registry

from parallel.activation_checkpointing import (_layer_slots, apply_activation_checkpointing,
                                               make_selective_checkpoint_context_fn)
from parallel.context_parallel import SequenceShard

# The recipe's name of this mode, next to `activation_checkpointing.AC_MODES`'s uniform ones.
BUDGET_MODE = "budget"

# The modes a budget plan picks from, from most to least activation memory kept.
BUDGET_MODES = ("none", "selective", "full")

# Machine balance (FLOPs per byte of memory traffic) of the roofline that prices recomputed ops,
# per device type: what a 2-thread CPU reaches on the report's llama layer (~320 GFLOP/s in
# matmuls, ~25 GB/s in element-wise ops), and an H100's bf16 peak over its HBM bandwidth. Only
# the ratio between ops' costs matters: it decides whether saving matmuls (selective) or
# recomputing everything (full) buys memory more cheaply.
_FLOPS_PER_BYTE = {"cpu": 12.0, "cuda": 250.0}

# MemTracker categories that are model state rather than activations.
_STATE_CATEGORIES = (_MemRefType.PARAM, _MemRefType.GRAD, _MemRefType.BUFFER, _MemRefType.OPT)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepShape:
    """What one training forward runs on one rank: rows x seq_len tokens, activations in `dtype`
    (the parameters' compute dtype) on `device_type`."""
    rows: int
    seq_len: int
    dtype: torch.dtype
    device_type: str


@dataclass(frozen=True)
class RankLayout:
    """One rank of a tensor- and/or context-parallel layout, for the fake step: `parallelize` does
    to a meta-device model what the run does before activation checkpointing (context-parallel
    attention over `sequence_shard`, tensor parallel), on meshes of a fake process group."""
    parallelize: Callable[[nn.Module], None]
    sequence_shard: SequenceShard | None


@dataclass(frozen=True)
class LayerCost:
    kept_bytes: dict[str, int]  # per mode: bytes the layer's forward leaves alive for backward
    recompute_cost: dict[str, float]  # per mode: roofline cost of the forward ops it recomputes


@dataclass(frozen=True)
class BudgetPlan:
    budget_bytes: int
    layer_modes: tuple[str, ...]
    predicted_bytes: int  # simulated peak activation memory of a step under `layer_modes`

    def mode_counts(self) -> str:
        """E.g. "2 none, 1 selective, 1 full"."""
        return ", ".join(f"{self.layer_modes.count(m)} {m}" for m in BUDGET_MODES if m in self.layer_modes)

    def describe(self) -> str:
        """E.g. "budget 300 MiB -> 2 none, 1 selective, 1 full (predicted 287.0 MiB)"."""
        return (f"budget {self.budget_bytes / 2**20:g} MiB -> {self.mode_counts()} "
                f"(predicted {self.predicted_bytes / 2**20:.1f} MiB)")


def _grouped_mm_shape(mat_a: torch.Tensor, mat_b: torch.Tensor, offs: torch.Tensor | None) -> tuple[int, ...]:
    """Output shape of `aten._grouped_mm` (its forward and the two GEMMs of its backward)."""
    if mat_a.dim() == 2 and mat_b.dim() == 3:
        return mat_a.shape[0], mat_b.shape[-1]
    if mat_a.dim() == 3 and mat_b.dim() == 2:
        return mat_a.shape[1], mat_b.shape[-1]
    if mat_a.dim() == 2 and mat_b.dim() == 2:  # groups split the shared dimension
        return offs.shape[0], mat_a.shape[0], mat_b.shape[1]
    return mat_a.shape[0], mat_a.shape[1], mat_b.shape[-1]


def _fake_grouped_mm(fake_mode: FakeTensorMode, func: Any, mat_a: torch.Tensor, mat_b: torch.Tensor,
                     offs: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> Any:
    """Fake `_grouped_mm` for the dtypes torch's meta kernel rejects (it takes bf16 only, while the
    CPU kernel also runs fp32); bf16 goes on to the meta kernel."""
    if mat_a.dtype == torch.bfloat16:
        return NotImplemented
    meta = torch.empty(_grouped_mm_shape(mat_a, mat_b, offs), dtype=out_dtype or mat_a.dtype, device="meta")
    return FakeTensor(fake_mode, meta, mat_a.device)


@contextlib.contextmanager
def _fake_friendly_ops() -> Iterator[None]:
    """Run on fake tensors what a training step runs on real ones.

    - Grouped GEMM in fp32 (MoE experts on CPU): a fake kernel for the shapes (`_fake_grouped_mm`),
      so the step runs the very op SAC's policy sees in a real run.
    - Packed-sequence detection: on fake position ids transformers cannot tell there is one
      sequence per row and builds an explicit mask (more memory, another attention kernel). The
      simulated batch is one sequence per row, as the training batches are.
    """
    import transformers.masking_utils as hf_masks

    grouped_mm = torch.ops.aten._grouped_mm.default
    fake_impls.register_op_impl(grouped_mm)(_fake_grouped_mm)
    find_packed = hf_masks.find_packed_sequence_indices
    hf_masks.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        hf_masks.find_packed_sequence_indices = find_packed
        fake_impls._deregister_op_impl(grouped_mm)


def _meta_copy(model: nn.Module, layers: Sequence[nn.Module]) -> tuple[nn.Module, list[nn.Module]]:
    """A copy of the (meta) model to wrap and run, and its copies of `layers`."""
    memo: dict[int, Any] = {}
    fake = copy.deepcopy(model, memo)
    return fake, [memo[id(layer)] for layer in layers]


def _make_fake(model: nn.Module, shape: StepShape) -> None:
    """Replace the parameters and buffers of `model` by fake tensors on the run's device, parameters
    in the compute dtype, tied parameters still tied, tensor-parallel shards (DTensors) as this
    rank's shards. Call under a FakeTensorMode."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, tensor in store.items():
                if tensor is None:
                    continue
                if id(tensor) not in made:
                    dtype = shape.dtype if is_param and tensor.is_floating_point() else tensor.dtype
                    if isinstance(tensor, DTensor):
                        with unset_fake_temporarily():  # the meta shard's shape
                            local_shape = tensor.to_local().shape
                        local = torch.empty(local_shape, dtype=dtype, device=shape.device_type)
                        empty = DTensor.from_local(local, tensor.device_mesh, tensor.placements, run_check=False,
                                                   shape=tensor.shape, stride=tensor.stride())
                    else:
                        empty = torch.empty(tensor.shape, dtype=dtype, device=shape.device_type)
                    made[id(tensor)] = nn.Parameter(empty, requires_grad=tensor.requires_grad) if is_param else empty
                store[name] = made[id(tensor)]


def _activation_bytes(snapshot: dict[Any, dict[Any, int]]) -> int:
    return sum(snap["Total"] - sum(snap.get(key, 0) for key in _STATE_CATEGORIES) for snap in snapshot.values())


def _flops(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """FLOPs of one op: torch's flop counter, plus the attention kernels and grouped GEMMs it
    does not count; 0 for everything else (priced by its memory traffic)."""
    name = func.name()
    if "scaled_dot_product" in name and "backward" not in name:
        # Counted here for every kernel: torch < 2.13's formula asserts as many key/value heads as
        # query heads, which CUDA kernels taking grouped-query attention (enable_gqa) do not have.
        query, key, value = args[:3]
        return _attention_flops(query.shape, key.shape, value.shape)
    count = flop_registry.get(func._overloadpacket)
    if count is not None:
        return count(*args, **kwargs, out_val=out)
    if "grouped_mm" in name:
        return 2 * out.numel() * args[0].shape[-1]
    return 0


def _attention_flops(query: torch.Size, key: torch.Size, value: torch.Size) -> int:
    """Scores and weighted sum, each query head against its (possibly shared) key/value head."""
    *batch_heads, queries, head_dim = query
    keys, value_dim = key[-2], value[-1]
    return 2 * math.prod(batch_heads) * queries * keys * (head_dim + value_dim)


def _roofline_cost(func: Any, args: tuple, kwargs: dict, out: Any, device_type: str) -> float:
    """max(FLOPs / machine balance, bytes read and written) of one op; views move no data."""
    if func.is_view:
        return 0.0
    tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
    traffic = sum(t.numel() * t.element_size() for t in tensors)
    balance = _FLOPS_PER_BYTE.get(device_type, _FLOPS_PER_BYTE["cuda"])
    return max(_flops(func, args, kwargs, out) / balance, float(traffic))


class _RecomputeCost(TorchDispatchMode):
    """Inside decoder layer i's forward: the cost of all its ops (full AC recomputes them all) and
    of those the selective policy would recompute, asked in the order a checkpoint asks."""

    def __init__(self, layers: Sequence[nn.Module], device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self.layer: int | None = None
        self.full = [0.0] * len(layers)
        self.selective = [0.0] * len(layers)
        context_fn = make_selective_checkpoint_context_fn()
        self._policy = None
        for index, layer in enumerate(layers):
            def enter(*_: Any, index: int = index) -> None:
                self.layer = index
                self._policy = context_fn()[0].policy_fn  # fresh matmul counters, as per checkpoint
            layer.register_forward_pre_hook(enter)
            layer.register_forward_hook(lambda *_: setattr(self, "layer", None))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.layer is not None:
            cost = _roofline_cost(func, args, kwargs, out, self.device_type)
            self.full[self.layer] += cost
            decision = self._policy(SelectiveCheckpointContext(is_recompute=False), func, *args, **kwargs)
            if decision != CheckpointPolicy.MUST_SAVE:
                self.selective[self.layer] += cost
        return out


@dataclass(frozen=True)
class _Simulation:
    peak_bytes: int
    kept_bytes: list[int]  # per layer: activation bytes its forward added
    recompute: _RecomputeCost | None


def track_step(model: nn.Module, layers: Sequence[nn.Module], input_ids: torch.Tensor, loss_fn: LossFn,
               model_inputs: dict[str, torch.Tensor], during: ContextManager = contextlib.nullcontext()
               ) -> tuple[int, list[int]]:
    """Forward and backward of `model` on `input_ids` (its own labels) under MemTracker: the peak
    activation bytes (everything but parameters, gradients, buffers and optimizer state) and the
    bytes each of `layers` (checkpoint-wrapped or not) left alive after its forward. Fake or real
    tensors alike; `during`: a context the step runs in."""
    tracker = MemTracker()
    kept = [0] * len(layers)
    forward = [True]  # a checkpointed layer's recompute in backward runs its hooks again
    handles = []
    for index, layer in enumerate(layers):
        def before(*_: Any, index: int = index) -> None:
            if forward[0]:
                kept[index] = -_activation_bytes(tracker.get_tracker_snapshot("current"))
        def after(*_: Any, index: int = index) -> None:
            if forward[0]:
                kept[index] += _activation_bytes(tracker.get_tracker_snapshot("current"))
        handles += [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]
    tracker.track_external(model, input_ids)
    with tracker, during:
        loss = loss_fn(model(input_ids=input_ids, **model_inputs).logits, input_ids)
        forward[0] = False
        loss.backward()
    for handle in handles:
        handle.remove()
    peak = max(_activation_bytes({device: snap}) for device, snap in tracker.get_tracker_snapshot("peak").items())
    return peak, kept


def simulate(model: nn.Module, layers: Sequence[nn.Module], layer_modes: Sequence[str], shape: StepShape,
             loss_fn: LossFn, extra_save_ops: Collection[Any] = (), price_ops: bool = False,
             layout: RankLayout | None = None) -> _Simulation:
    """One training step of `model` (meta device) on fake tensors with `layer_modes[i]` applied
    to `layers[i]`: peak activation bytes and each layer's kept bytes (`track_step`). `price_ops`:
    also price each layer's forward ops for full and selective recompute. `layout`: the step of one
    rank of it."""
    fake, fake_layers = _meta_copy(model, layers)
    shard = layout.sequence_shard if layout is not None else None
    if layout is not None:
        layout.parallelize(fake)
    # The sequence shard's index tensors and causal biases are real (built once, outside any step).
    with _fake_friendly_ops(), FakeTensorMode(allow_non_fake_inputs=shard is not None):
        _make_fake(fake, shape)
        apply_budget_plan(fake, fake_layers, layer_modes, extra_save_ops)
        seq_len = shape.seq_len if shard is None else shard.local_index.numel()
        input_ids = torch.zeros(shape.rows, seq_len, dtype=torch.long, device=shape.device_type)
        model_inputs = shard.model_inputs(shape.rows, None, input_ids.device) if shard is not None else {}
        recompute = _RecomputeCost(fake_layers, shape.device_type) if price_ops else None
        peak, kept = track_step(fake, fake_layers, input_ids, loss_fn, model_inputs,
                                recompute or contextlib.nullcontext())
    return _Simulation(peak_bytes=peak, kept_bytes=kept, recompute=recompute)


@dataclass(frozen=True)
class Measurement:
    layers: list[LayerCost]
    uniform_peak_bytes: dict[str, int]  # per mode: the simulated peak with every layer in that mode


def measure_layers(model: nn.Module, layers: Sequence[nn.Module], shape: StepShape, loss_fn: LossFn,
                   extra_save_ops: Collection[Any] = (), layout: RankLayout | None = None) -> Measurement:
    """Each layer's kept bytes and recompute cost under each of `BUDGET_MODES`, from one fake
    step per mode (every layer in that mode), on one rank of `layout`."""
    runs = {mode: simulate(model, layers, [mode] * len(layers), shape, loss_fn, extra_save_ops,
                           price_ops=mode == "none", layout=layout) for mode in BUDGET_MODES}
    prices = runs["none"].recompute
    costs = [LayerCost(kept_bytes={mode: runs[mode].kept_bytes[i] for mode in BUDGET_MODES},
                       recompute_cost={"none": 0.0, "selective": prices.selective[i], "full": prices.full[i]})
             for i in range(len(layers))]
    return Measurement(layers=costs, uniform_peak_bytes={mode: run.peak_bytes for mode, run in runs.items()})


def greedy_sequence(costs: Sequence[LayerCost]) -> list[tuple[str, ...]]:
    """Per-layer plans from all-none on: each next plan moves one layer to a mode that keeps less,
    the move with the most bytes saved per recompute cost added. Ties go to the earlier layer."""
    modes = ["none"] * len(costs)
    plans = [tuple(modes)]
    while True:
        best: tuple[float, int, str] | None = None
        for index, cost in enumerate(costs):
            current = modes[index]
            for target in BUDGET_MODES[BUDGET_MODES.index(current) + 1:]:
                saved = cost.kept_bytes[current] - cost.kept_bytes[target]
                if saved <= 0:
                    continue
                # A move that adds no cost (or a negative one, from rounding) is taken first.
                ratio = saved / max(cost.recompute_cost[target] - cost.recompute_cost[current], 1e-9)
                if best is None or ratio > best[0]:
                    best = (ratio, index, target)
        if best is None:
            return plans
        modes[best[1]] = best[2]
        plans.append(tuple(modes))


def choose_plan(model: nn.Module, layers: Sequence[nn.Module], budget_bytes: int, shape: StepShape,
                loss_fn: LossFn, extra_save_ops: Collection[Any] = (),
                measurement: Measurement | None = None, layout: RankLayout | None = None) -> BudgetPlan:
    """The cheapest plan along the greedy sequence whose simulated peak fits `budget_bytes`.

    The sequence is (nearly) monotone in memory, so a binary search over it needs only a few fake
    steps. Raises ValueError naming the smallest achievable peak when even its end does not fit.
    `measurement`: `measure_layers`' answer, when already at hand. `layout`: plan one rank of it.
    """
    measurement = measurement or measure_layers(model, layers, shape, loss_fn, extra_save_ops, layout)
    plans = greedy_sequence(measurement.layers)
    uniform = {(mode,) * len(layers): peak for mode, peak in measurement.uniform_peak_bytes.items()}
    peaks = {index: uniform[plan] for index, plan in enumerate(plans) if plan in uniform}

    def peak(index: int) -> int:
        if index not in peaks:
            peaks[index] = simulate(model, layers, plans[index], shape, loss_fn, extra_save_ops,
                                    layout=layout).peak_bytes
        return peaks[index]

    last = len(plans) - 1
    if peak(last) > budget_bytes:
        raise ValueError(f"the smallest predicted activation memory, every layer fully checkpointed, is "
                         f"{peak(last) / 2**20:.1f} MiB")
    low, high = 0, last  # plans[high] fits
    while low < high:
        middle = (low + high) // 2
        if peak(middle) <= budget_bytes:
            high = middle
        else:
            low = middle + 1
    return BudgetPlan(budget_bytes=budget_bytes, layer_modes=plans[high], predicted_bytes=peak(high))


def apply_budget_plan(model: nn.Module, layers: nn.ModuleList | nn.ModuleDict | list[nn.Module],
                      layer_modes: Sequence[str], extra_save_ops: Collection[Any] = ()) -> None:
    """Apply `layer_modes[i]` to the i-th of `layers`, in place (call before FSDP, like
    `apply_activation_checkpointing`)."""
    slots = _layer_slots(layers)
    if len(slots) != len(layer_modes):
        raise ValueError(f"the budget plan has {len(layer_modes)} layer modes for {len(slots)} layers")
    for mode in BUDGET_MODES:
        picked = [(key, layer) for (key, layer), m in zip(slots, layer_modes) if m == mode]
        group = [layer for _, layer in picked]
        apply_activation_checkpointing(model, group, mode, extra_save_ops=extra_save_ops)
        for (key, _), wrapped in zip(picked, group):
            layers[key] = wrapped
