"""Which modules each pipeline stage owns, by canonical name, in the order activations flow.

Stage modules keep the whole model's parameter names (`model.layers.5.mlp.up_proj.weight`,
`lm_head.weight`), so materialization and checkpoints do not depend on the pipeline layout;
building a stage from these names is the harness's job (harness/pipeline_stage.py).
"""

from __future__ import annotations

EMBEDDINGS = "model.embed_tokens"
FINAL_NORM = "model.norm"
LM_HEAD = "lm_head"
LAYER_PREFIX = "model.layers."

LayerSpec = list[int] | list[list[str]] | None


def layer_name(index: int) -> str:
    return f"{LAYER_PREFIX}{index}"


def model_order(num_layers: int) -> list[str]:
    """Every module a stage can own, in the order activations flow through them."""
    return [EMBEDDINGS, *(layer_name(i) for i in range(num_layers)), FINAL_NORM, LM_HEAD]


def stage_module_names(num_layers: int, num_stages: int, layers_per_stage: LayerSpec) -> list[list[str]]:
    """The module FQNs each stage owns (the rotary embedding is added to stages with layers).

    `layers_per_stage`: None spreads the layers evenly, the remainder going to the first
    stages; a list of ints gives each stage's layer count; a list of name lists is taken as is.
    Raises ValueError naming `parallel.pp_layers_per_stage` when a layout is impossible.
    """
    if layers_per_stage and isinstance(layers_per_stage[0], list):
        return _checked_explicit(num_layers, num_stages, layers_per_stage)
    counts = layers_per_stage or _even_counts(num_layers, num_stages)
    _check_counts(num_layers, num_stages, counts)
    stages, start = [], 0
    for count in counts:
        stages.append([layer_name(i) for i in range(start, start + count)])
        start += count
    stages[0].insert(0, EMBEDDINGS)
    stages[-1].extend([FINAL_NORM, LM_HEAD])
    return stages


def _even_counts(num_layers: int, num_stages: int) -> list[int]:
    if num_stages > num_layers:
        raise ValueError(f"parallel.pp: {num_stages} pipeline stages (pp x stages per rank) for {num_layers} "
                         f"decoder layers; lower parallel.pp or parallel.pp_stages_per_rank")
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


def _check_counts(num_layers: int, num_stages: int, counts: list[int]) -> None:
    field = "parallel.pp_layers_per_stage"
    if len(counts) != num_stages:
        raise ValueError(f"{field}={counts}: {len(counts)} entries for {num_stages} stages "
                         f"(pp x stages per rank); give one layer count per stage")
    if sum(counts) != num_layers:
        raise ValueError(f"{field}={counts}: sums to {sum(counts)} but the model has {num_layers} decoder "
                         f"layers; make the counts add up to {num_layers}")
    # A middle stage without layers would only pass its input through, which has no gradient
    # path of its own; the first and last stages still compute embeddings / norm + head.
    empty_middle = [s for s in range(1, num_stages - 1) if counts[s] < 1]
    if any(c < 0 for c in counts) or empty_middle:
        raise ValueError(f"{field}={counts}: every stage but the first and last needs at least one layer")


def _checked_explicit(num_layers: int, num_stages: int, names: list[list[str]]) -> list[list[str]]:
    field = "parallel.pp_layers_per_stage"
    if len(names) != num_stages:
        raise ValueError(f"{field}: {len(names)} module lists for {num_stages} stages (pp x stages per rank); "
                         f"give one list per stage")
    flat = [name for stage in names for name in stage]
    expected = model_order(num_layers)
    if flat != expected:
        unknown = sorted(set(flat) - set(expected))
        missing = [n for n in expected if n not in flat]
        detail = (f"unknown {unknown}" if unknown else f"missing {missing}" if missing
                  else "duplicated or out of order")
        raise ValueError(f"{field}: module lists must cover {EMBEDDINGS}, {LAYER_PREFIX}0..{num_layers - 1}, "
                         f"{FINAL_NORM}, {LM_HEAD} once each in model order ({detail})")
    empty_middle = [s for s in range(1, num_stages - 1) if not names[s]]
    if empty_middle or not names[0] or not names[-1]:
        raise ValueError(f"{field}: stage(s) {empty_middle or [0, num_stages - 1]} own no module; "
                         f"every stage needs at least one")
    return [list(stage) for stage in names]
