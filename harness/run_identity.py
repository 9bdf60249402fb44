"""What a checkpoint was trained as, so that a run never resumes another run's state.

Each checkpoint holds `run.json`: the identity (the HF model config, the data fields, seq_len
and seed: everything that makes two runs different runs, and nothing about the layout, which
checkpoints reshard across) and the resolved recipe that saved it. Before any process starts,
validation compares the checkpoint a run would resume with the run's own identity and names
the first difference.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import PretrainedConfig

from harness.config import Config

IDENTITY_FILE = "run.json"
# HF config fields that say how a model runs, not which model it is.
_MODEL_RUNTIME_FIELDS = {"transformers_version", "dtype", "torch_dtype", "use_cache", "output_router_logits",
                         "output_attentions", "output_hidden_states", "return_dict"}
# Data fields that say where prepared data is cached and how fast it is made, not what it is.
_DATA_RUNTIME_FIELDS = {"cache_dir", "workers"}


def run_identity(cfg: Config, model_config: PretrainedConfig) -> dict[str, Any]:
    """Flat `section.field -> value` (JSON values); model fields first."""
    model = json.loads(model_config.to_json_string(use_diff=False))
    # model_type first: when the families differ, that is the difference worth naming.
    keys = sorted(model, key=lambda k: (k != "model_type", k))
    identity = {f"model.{k}": model[k] for k in keys if not k.startswith("_") and k not in _MODEL_RUNTIME_FIELDS}
    identity.update({f"data.{k}": v for k, v in cfg.to_dict()["data"].items() if k not in _DATA_RUNTIME_FIELDS})
    identity.update({"train.seq_len": cfg.train.seq_len, "train.seed": cfg.train.seed})
    return json.loads(json.dumps(identity))


def identity_file_text(identity: dict[str, Any], recipe: dict[str, Any]) -> str:
    return json.dumps({"identity": identity, "recipe": recipe}, indent=1, sort_keys=False)


def read_identity(checkpoint: str) -> dict[str, Any] | None:
    """The identity a checkpoint recorded; None when it has no (readable) run.json."""
    try:
        with open(os.path.join(checkpoint, IDENTITY_FILE)) as f:
            return json.load(f)["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def first_difference(saved: dict[str, Any], current: dict[str, Any], model_only: bool = False) -> str | None:
    """`key: checkpoint A, this run B` for the first field that differs, or None."""
    keys = list(current) + [k for k in saved if k not in current]
    for key in keys:
        if model_only and not key.startswith("model."):
            continue
        if saved.get(key, "(unset)") != current.get(key, "(unset)"):
            return f"{key} is {_short(saved.get(key, '(unset)'))} there, {_short(current.get(key, '(unset)'))} here"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
