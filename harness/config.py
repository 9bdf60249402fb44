"""Recipes: typed sections, YAML files, `--section.field=value` overrides, whole-config checks.

Every check here runs before any process starts and fails with one line that names the field
and the fix (`ConfigError`, a ValueError).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from parallel.pipeline import ScheduleName

# The closed sets of values a recipe may name. parallel/ and moe/ keep their own tables of what
# they implement (they never import harness); tests/test_config_validation.py checks they agree.
AcMode = Literal["none", "full", "selective", "submodule", "budget"]
ModelPreset = Literal["llama", "qwen3_moe", "mixtral", "deepseek_v3"]
DispatcherName = Literal["alltoall", "deepep", "hybridep"]
CpRotation = Literal["allgather", "ring"]


def option(default: Any = None, help: str = "", *, factory: Any = None) -> Any:
    """A recipe field with its help text, shown by `python -m launch --help`."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A user error in the recipe or the command line."""


@dataclass
class RunConfig:
    name: str | None = option(None, "the run's name; null = the recipe file's name, or the model's without a recipe")
    dir: str | None = option(None, "the run's folder (metrics, plot, checkpoints, recipe.yaml); null = runs/<name>")


@dataclass
class ModelConfig:
    preset: ModelPreset = option("llama", "tiny built-in HF config")
    path: str | None = option(None, "local HF model directory or config.json; takes precedence over preset")
    overrides: dict[str, Any] = option(help="HF config fields, e.g. {num_hidden_layers: 4}", factory=dict)


@dataclass
class DataConfig:
    source: str = option("stdlib", "'stdlib' (this Python's standard-library sources), a local .txt / .jsonl / "
                                    ".parquet file, a folder of them, or a folder saved by datasets' save_to_disk")
    tokenizer: str | None = option(None, "local HF tokenizer directory; null = bytes (vocab 256)")
    text_field: str = option("text", "the field of each .jsonl record / .parquet or dataset column holding the text")
    max_bytes: int = option(4_000_000, "how much of the built-in corpus to read")
    cache_dir: str = option("runs/data", "where prepared token shards are cached, one folder per fingerprint")
    workers: int | None = option(None, "tokenizer processes for prepare; null = the CPU count (at most 8)")
    document_mask: bool = option(False, "attention and positions restart at each document of a packed sequence")


@dataclass
class EvalConfig:
    every: int = option(0, "steps between validation passes; 0 = never (the whole corpus trains)")
    steps: int = option(4, "global batches of held-out sequences per validation pass")
    held_out: float = option(0.05, "fraction of the corpus's sequences held out for validation when every > 0")


@dataclass
class TrainConfig:
    steps: int = option(100, "optimizer steps of the whole run (a resumed run continues to it)")
    seed: int = option(0, "seed of the initial weights and of the data order")
    global_batch_size: int = option(8, "sequences per optimizer step over all data-parallel ranks")
    micro_batch_size: int = option(2, "sequences per forward on one data-parallel rank")
    seq_len: int = option(128, "tokens per sequence")
    lr: float = option(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = option(0.1, "the cosine decay ends at lr * min_lr_ratio")
    warmup_steps: int = option(10, "linear warmup steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 disables clipping")
    metrics_file: str | None = option(None, "JSONL metrics, one row per step; null = <run folder>/metrics.jsonl")
    compile: bool = option(False, "torch.compile each transformer block (inductor; on CPU it needs a C++ compiler)")


@dataclass
class ParallelConfig:
    pp: int = option(1, "pipeline stages (ranks)")
    dp_replicate: int = option(1, "data-parallel replicas (HSDP when dp_shard > 1 too)")
    dp_shard: int = option(-1, "FSDP shards; -1 fills the world")
    cp: int = option(1, "context parallel: each sequence split over this many ranks (head-tail)")
    cp_rotate: CpRotation = option("allgather", "how context parallel brings each rank the other ranks' keys and "
                                                "values: allgather (any mask) or ring (plain causal attention on "
                                                "CPU: blocks passed around while attending)")
    tp: int = option(1, "tensor-parallel ranks (sequence parallel with them), from the family's TP plan; innermost")
    ep: int = option(1, "expert-parallel ranks, borrowed from dp_shard")
    pp_schedule: ScheduleName = option("1F1B", "pipeline schedule")
    pp_microbatches: int | None = option(None, "microbatches per micro batch under pipeline parallel; null = pp")
    pp_stages_per_rank: int | None = option(None, "pipeline stages per rank; null = what the schedule needs (1 or 2)")
    pp_layers_per_stage: list[int] | None = option(None, "decoder layers of each stage, e.g. [3, 1]; null = even")
    reshard_after_forward: bool | None = option(None, "FSDP reshard after forward; null = true, false under pp")


@dataclass
class ACConfig:
    mode: bool | AcMode = option("none", "activation checkpointing; true = full, false = none; budget = none, "
                                         "selective or full per layer to fit ac.budget_mib")
    budget_mib: float | None = option(None, "ac.mode=budget: per-rank activation memory (MiB) of one training "
                                            "forward and backward that the per-layer plan must fit")


@dataclass
class MoEConfig:
    dispatcher: DispatcherName = option("alltoall", "expert-parallel token dispatcher")
    dispatcher_strict: bool = option(False, "fail instead of falling back when the dispatcher is unavailable")
    bias_update_rate: float = option(0.0, "aux-loss-free balancing (routers with a correction bias, e.g. deepseek_v3): "
                                          "bias += rate * sign(mean load - load) per step; 0 = off")


@dataclass
class CheckpointConfig:
    dir: str | None = option(None, "where step_XXXXXXX checkpoints go; null = <run folder>/checkpoints")
    every: int | None = option(None, "steps between checkpoints; null = only at the end")
    keep: int = option(2, "how many of the newest checkpoints to keep")
    resume_from: str | None = option(None, "start from this checkpoint instead of the newest in dir")
    load_weights_only: bool = option(False, "take only the model weights from resume_from (fine-tuning another "
                                            "run's weights: fresh optimizer, schedule and step)")


@dataclass
class LoggingConfig:
    log_every: int = option(10, "steps between log lines when stdout is not a terminal")
    progress: bool = option(True, "a live progress bar on a terminal")
    tensorboard_dir: str | None = option(None, "also write scalars for TensorBoard (pip install tensorboard)")
    peak_tflops: float | None = option(None, "per-rank peak for MFU; null = the GPU's known peak, or a CPU estimate")
    plan_check: bool = option(False, "after the third step, print the layout planner's predicted peak memory and "
                                     "step time next to the measured ones")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ac: ACConfig = field(default_factory=ACConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(recipe: str | None, overrides: list[str] = ()) -> Config:
    """Recipe YAML (or defaults) plus `--section.field=value` overrides, type-checked."""
    raw: dict[str, Any] = {}
    if recipe is not None:
        if not os.path.isfile(recipe):
            raise ConfigError(f"--config {recipe}: no such file; pass a recipe YAML path")
        try:
            with open(recipe) as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise ConfigError(f"--config {recipe}: not valid YAML ({first}); fix the file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--config {recipe}: not a text file (not UTF-8); pass a recipe YAML path") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {recipe}: the top level must be a mapping of sections")
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(Config, raw, "")
    if cfg.run.name is None:
        cfg.run.name = _default_run_name(recipe, cfg.model)
    return cfg


def _default_run_name(recipe: str | None, model: ModelConfig) -> str:
    """`default` for default.yaml; without a recipe the model's folder name or preset."""
    if recipe is not None:
        return os.path.splitext(os.path.basename(recipe))[0]
    if model.path is not None:
        path = os.path.normpath(model.path)
        return os.path.basename(os.path.dirname(path) if os.path.isfile(path) else path)
    return model.preset


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if not item.startswith("--") or "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"{item}: overrides look like --section.field=value (e.g. --train.steps=20)")
    key, text = item[2:].split("=", 1)
    *path, last = key.split(".")
    node = raw
    for part in path:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{key}: {part} is a value, not a section")
        node = child
    node[last] = yaml.safe_load(text) if text != "" else None


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping of fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            guess = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{guess[0]}?" if guess else f"; valid: {', '.join(names)}"
            raise ConfigError(f"{prefix}{key}: unknown {'section' if not prefix else 'field'}{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for candidate in inner[:-1]:
            try:
                return _coerce(value, candidate, name)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], name)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list like [2, 2], got {value!r}")
        return [_coerce(v, args[0], name) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is Literal:
        return _choice(value, args, name)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-2" (no dot) as a string
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. pp_schedule: 1F1B typed bare
    if hint is Any or (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}")


def _choice(value: Any, choices: tuple[str, ...], name: str) -> str:
    """One of a closed set of names, matched regardless of case (`Selective`, `1f1b`)."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        for choice in choices:
            if str(value).lower() == choice.lower():
                return choice
    raise ConfigError(f"{name}={value!r}: must be one of {', '.join(choices)}")
