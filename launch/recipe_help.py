"""`python -m launch --help`: the command line, then every recipe section and field with its
type, default and help text, read from the config dataclasses (one place to document a field)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from harness.config import Config

USAGE = """usage: python -m launch [torchrun flags] [--verbose] [--config RECIPE.yaml] [--section.field=value ...]

Validates the recipe for the world it will run on, then starts the workers through torchrun
(or trains in-process under torchrun). Dotted flags override the recipe (null asks for a
field's default); --nnodes, --nproc-per-node, --node-rank, --rdzv-*, --max-restarts,
--master-addr/--master-port and the other torchrun flags go to torchrun. What torch and
transformers warn during validation goes to the run's logs/launch.log; --verbose also prints
it after a validation error.

recipe fields:"""


def recipe_help() -> str:
    lines = [USAGE]
    for name, section in typing.get_type_hints(Config).items():
        lines.append(f"  {name}:")
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"    --{name}.{f.name}  ({_type_name(hints[f.name])}, default {_yaml(default)})")
            if f.metadata.get("help"):
                lines.append(f"        {f.metadata['help']}")
    return "\n".join(lines)


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(args)
    if origin is dict:
        return "mapping"
    if args:
        names = [_type_name(a) for a in args if a is not type(None)]
        name = " | ".join(names) if origin is not list else f"list of {names[0]}"
        return name + (" | null" if type(None) in args else "")
    return hint.__name__


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return "{}" if value == {} else str(value)
