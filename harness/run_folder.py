"""Where a run keeps its outputs: `runs/<run.name>/` unless the recipe says otherwise.

    runs/default/
        recipe.yaml        the resolved recipe (every default filled in) of the latest start
        metrics.jsonl      one row per step (train.metrics_file overrides)
        metrics.png        the plot drawn at the end
        checkpoints/       step_XXXXXXX folders (checkpoint.dir overrides)
        logs/              rank_XXXXX.log: the traceback of a worker that failed;
                           launch.log: what the libraries warned while the recipe was validated

The same command twice finds the same folder and resumes; a run with another model or data
that lands in it is refused before it starts (harness/run_identity.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import yaml

from harness.config import Config, ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class RunFolder:
    name: str
    dir: str
    metrics_file: str
    checkpoint_dir: str

    @property
    def recipe_file(self) -> str:
        return os.path.join(self.dir, "recipe.yaml")

    def log_file(self, rank: int) -> str:
        return os.path.join(self.dir, "logs", f"rank_{rank:05d}.log")

    @property
    def launch_log(self) -> str:
        return os.path.join(self.dir, "logs", "launch.log")


def run_folder(cfg: Config) -> RunFolder:
    """The run's folder and output paths; a ConfigError for a name that is not a plain folder name."""
    name = cfg.run.name
    assert name is not None, "load_config names every run"
    if not _NAME.match(name):
        raise ConfigError(f"run.name={name!r}: use letters, digits, '.', '_' or '-' (a folder name), "
                          "e.g. --run.name=llama-small")
    folder = cfg.run.dir or os.path.join("runs", name)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"run.dir={folder}: exists and is not a directory; choose another run.name or run.dir")
    return RunFolder(name=name, dir=folder,
                     metrics_file=cfg.train.metrics_file or os.path.join(folder, "metrics.jsonl"),
                     checkpoint_dir=cfg.checkpoint.dir or os.path.join(folder, "checkpoints"))


def save_recipe(folder: RunFolder, recipe: dict) -> None:
    """`recipe.yaml` in the run folder: what this start of the run resolved its recipe to."""
    os.makedirs(folder.dir, exist_ok=True)
    with open(folder.recipe_file, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
