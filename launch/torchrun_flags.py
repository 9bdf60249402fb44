"""Which command-line flags belong to torchrun, read from torchrun's own argument parser, so a
flag that is neither a recipe override nor torchrun's is refused in one line, not passed on to
torchrun's usage text."""

from __future__ import annotations

import argparse
import difflib
import functools
import typing

import torch.distributed.elastic.rendezvous.registry  # noqa: F401 (registers torchrun's rendezvous backends)
from torch.distributed.elastic.rendezvous import rendezvous_handler_registry
from torch.distributed.run import get_args_parser

from harness.config import Config, ConfigError

# The launcher names the program torchrun runs (`--module launch`); these would replace it.
_LAUNCHER_OWNED = {"-m", "--module", "--no-python", "--no_python", "--run-path", "--run_path"}


@functools.cache
def torchrun_options() -> dict[str, bool]:
    """Every torchrun option string -> whether it takes a value."""
    options = {}
    for action in get_args_parser()._actions:  # argparse keeps no public list of options
        for name in action.option_strings:
            options[name] = action.nargs != 0
    return options


def check_torchrun_flag(arg: str) -> bool:
    """Whether `arg` (a torchrun flag) takes the next argument as its value; ConfigError if it
    is not a torchrun flag."""
    key = arg.split("=", 1)[0]
    options = torchrun_options()
    if key in _LAUNCHER_OWNED:
        raise ConfigError(f"{key}: the launcher runs its own module; drop this flag")
    if key in options:
        return options[key] and "=" not in arg
    name = key.lstrip("-")
    section = typing.get_type_hints(Config).get(name)
    if section is not None:
        example = f"--{name}.{next(iter(typing.get_type_hints(section)))}{arg[len(key):] or '=...'}"
        raise ConfigError(f"{arg}: {name} is a recipe section; set one of its fields, e.g. {example}")
    near = difflib.get_close_matches(key, [o for o in options if o.startswith("--") and o not in _LAUNCHER_OWNED],
                                     n=1, cutoff=0.8)
    guess = near[0].lstrip("-") if near else _recipe_guess(key.lstrip("-"))
    if guess is not None:
        raise ConfigError(f"{arg}: unknown flag; did you mean --{guess}{arg[len(key):]}?")
    raise ConfigError(f"{arg}: unknown flag; recipe overrides look like --section.field=value and torchrun "
                      "flags like --nproc-per-node=4 (python -m launch --help lists them)")


def check_torchrun_values(torchrun: list[str]) -> None:
    """torchrun's own parser reads the flags' values (`--max-restarts=abc`): a wrong one is one
    line here, not torchrun's usage text after the recipe was validated."""
    parser = get_args_parser()
    parser.exit_on_error = False

    def error(message: str) -> None:
        raise ConfigError(f"{message}; fix that torchrun flag")

    parser.error = error
    try:
        args = parser.parse_args([*torchrun, "launch"])  # `launch`: the program torchrun will run
    except argparse.ArgumentError as e:
        raise ConfigError(f"{e}; fix that torchrun flag") from None
    # torchrun checks these only after the recipe was validated, with a traceback.
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts={args.max_restarts}: must be >= 0")
    backends = getattr(rendezvous_handler_registry, "_registry", None)  # no public list of names
    if backends and args.rdzv_backend not in backends:
        raise ConfigError(f"--rdzv-backend={args.rdzv_backend}: not a rendezvous backend; use one of "
                          f"{', '.join(backends)}")


def _recipe_guess(name: str) -> str | None:
    """The recipe field a bare `--name` most likely meant (`--steps` -> `train.steps`)."""
    fields = [f"{section}.{field}" for section, cls in typing.get_type_hints(Config).items()
              for field in typing.get_type_hints(cls)]
    exact = [f for f in fields if f.split(".")[1] == name]
    close = exact or difflib.get_close_matches(name, [f.split(".")[1] for f in fields], n=1)
    if not close:
        return None
    return close[0] if "." in close[0] else next(f for f in fields if f.split(".")[1] == close[0])
