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
from typing import Any

import yaml

AC_MODES = ("none", "full", "selective", "submodule")
MODEL_PRESETS = ("llama", "qwen3_moe", "mixtral", "deepseek_v3")
DISPATCHERS = ("alltoall", "deepep", "hybridep")


class ConfigError(ValueError):
    """A user error in the recipe or the command line."""


@dataclass
class ModelConfig:
    preset: str = "llama"
    path: str | None = None  # local HF model directory or config.json; takes precedence over preset
    overrides: dict[str, Any] = field(default_factory=dict)  # HF config fields, e.g. num_hidden_layers


@dataclass
class DataConfig:
    # 'stdlib' (this Python's standard-library sources), a local .txt / .jsonl / .parquet file, a folder
    # of them, or a folder saved by datasets' save_to_disk
    source: str = "stdlib"
    tokenizer: str | None = None  # local HF tokenizer directory; None = bytes (vocab 256)
    text_field: str = "text"  # the field of each .jsonl record / .parquet or dataset column holding the text
    max_bytes: int = 4_000_000  # how much of the built-in corpus to read
    cache_dir: str = "runs/data"  # where prepared token shards are cached, one folder per fingerprint
    workers: int | None = None  # tokenizer processes for prepare; None = the CPU count (at most 8)
    document_mask: bool = False  # attention and positions restart at each document of a packed sequence


@dataclass
class EvalConfig:
    every: int = 0  # steps between validation passes; 0 = never (the whole corpus trains)
    steps: int = 4  # global batches of held-out sequences per validation pass
    held_out: float = 0.05  # fraction of the corpus's sequences held out for validation when every > 0


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 0
    global_batch_size: int = 8  # sequences per optimizer step over all data-parallel ranks
    micro_batch_size: int = 2  # sequences per forward on one data-parallel rank
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    metrics_file: str | None = "runs/metrics.jsonl"


@dataclass
class ParallelConfig:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1  # -1 fills the world
    cp: int = 1
    tp: int = 1
    ep: int = 1
    pp_schedule: str = "1F1B"
    pp_microbatches: int | None = None  # per micro batch; None = pp
    pp_stages_per_rank: int | None = None  # None = what the schedule needs (1 or 2)
    pp_layers_per_stage: list[int] | None = None
    reshard_after_forward: bool | None = None  # None = True, or False under pipeline parallel


@dataclass
class ACConfig:
    mode: str | bool = "none"  # none | full | selective | submodule; true = full, false = none


@dataclass
class MoEConfig:
    dispatcher: str = "alltoall"
    dispatcher_strict: bool = False  # fail instead of falling back when the dispatcher is unavailable
    # Aux-loss-free balancing (DeepSeek-V3 routers): bias += rate * sign(mean load - load) per step.
    bias_update_rate: float = 0.0


@dataclass
class CheckpointConfig:
    dir: str | None = None
    every: int = 0  # steps between checkpoints; 0 = only at the end when dir is set
    keep: int = 2
    resume_from: str | None = None


@dataclass
class LoggingConfig:
    log_every: int = 10  # plain log lines when stdout is not a terminal
    progress: bool = True
    tensorboard_dir: str | None = None  # also write scalars for TensorBoard (needs `pip install tensorboard`)
    peak_tflops: float | None = None  # per-rank peak for MFU; None = the GPU's known peak, or a CPU estimate


@dataclass
class Config:
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
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {recipe}: the top level must be a mapping of sections")
    for item in overrides:
        _apply_override(raw, item)
    return _build(Config, raw, "")


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
