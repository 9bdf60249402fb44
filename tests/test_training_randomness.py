"""Random draws in the training forward (dropout, router jitter) are per rank and microbatch, so
no two layouts draw alike: the start-up summary says so for every config that has them."""

from __future__ import annotations

from transformers import AutoConfig

from harness.config import load_config as load_recipe
from harness.model_parts import training_randomness
from harness.models import load_config
from harness.summary import startup_summary
from harness.validation import validate
from tests.multiproc import run_ranks


def test_random_fields_found_across_families() -> None:
    assert training_randomness(AutoConfig.for_model("phimoe")) == {"router_jitter_noise": 0.01}
    assert {"attn_pdrop", "resid_pdrop", "embd_pdrop"} <= set(training_randomness(AutoConfig.for_model("gpt2")))
    assert training_randomness(AutoConfig.for_model("qwen2", attention_dropout=0.1)) == {"attention_dropout": 0.1}
    assert training_randomness(AutoConfig.for_model("llama")) == {}


def _summary_lines(rank: int, world: int, overrides: dict) -> list[str]:
    cfg = load_recipe(None, ["--model.preset=llama", "--run.name=test_randomness"])
    model_config = load_config("llama", None, overrides)
    return startup_summary(cfg, validate(cfg, world), model_config, "LlamaForCausalLM", 0, [], 0, None)


def test_summary_names_the_random_draws() -> None:
    line = [l for l in run_ranks(_summary_lines, 1, {"attention_dropout": 0.1})[0] if l.startswith("randomness")]
    assert line == ["randomness: attention_dropout=0.1 drawn per rank and microbatch: another layout matches this "
                    "run in distribution, not bitwise"]
    assert not [l for l in run_ranks(_summary_lines, 1, {})[0] if l.startswith("randomness")]
