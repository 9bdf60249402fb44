"""A step whose loss or gradient norm is not finite stops training before its optimizer step.

Every rank decides on the same world-reduced values (`harness.trainer.agree_after_backward`), so
all of them raise at the same step and none is left waiting in a collective. The launcher prints
a `TrainingStopped` message alone, without a rank or a traceback to point at (launch/spawn.py).
"""

from __future__ import annotations


class NonFiniteStep(Exception):
    """Step `step`'s global loss or gradient norm is not finite; its update was not applied."""

    def __init__(self, step: int, loss: float, grad_norm: float) -> None:
        super().__init__(f"step {step}: loss is {loss:.4g} (grad_norm {grad_norm:.4g})")
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


class TrainingStopped(RuntimeError):
    """Every rank stopped training for the same reason; the message is the one line for the user."""


def nonfinite_line(bad: NonFiniteStep, newest_checkpoint: str | None, first_step: int, start_checkpoint: str | None,
                   model_path: str | None) -> str:
    """What stopped the run and what to do. `first_step`: the first step of this start of the run,
    whose loss and gradients come from the weights it started from alone (`start_checkpoint`, else
    `model_path`, else a fresh initialisation); a later step's, from the updates since."""
    saved = f"the newest checkpoint is {newest_checkpoint}" if newest_checkpoint else "no checkpoint was saved"
    if bad.step != first_step:
        advice = ("lower train.lr and run the same command to resume from it" if newest_checkpoint
                  else "lower train.lr and start again")
    elif start_checkpoint is not None:
        advice = (f"the weights of {start_checkpoint} already give it; start from an earlier checkpoint "
                  "(--checkpoint.resume_from=PATH) with a lower train.lr")
    elif model_path is not None:
        advice = f"the weights at model.path={model_path} already give it: check them"
    else:
        advice = "freshly initialised weights already give it: check the model config (model.overrides)"
    return f"{bad}; training stopped without applying that step, {saved}: {advice}"
