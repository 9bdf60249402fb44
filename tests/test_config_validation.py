"""Bad input: one line naming the field and the fix, before any process starts."""

import importlib.util
import os
import subprocess
import sys
import typing

import pytest
import torch

from harness.config import AcMode, ConfigError, DispatcherName, ParallelConfig, load_config
from harness.validation import validate

CASES = [
    # (overrides, world size, text the message must contain)
    (["--train.stpes=5"], 1, "did you mean train.steps"),
    (["--trian.steps=5"], 1, "did you mean train"),
    (["--train.steps=ten"], 1, "train.steps: expected int"),
    (["--train.steps=0"], 1, "train.steps=0"),
    (["--train.seq_len=0"], 1, "train.seq_len=0"),
    (["--train.seq_len=-4"], 1, "train.seq_len=-4"),
    (["--train.lr=-1"], 1, "train.lr=-1"),
    (["--train.lr=0"], 1, "train.lr=0"),
    (["--train.micro_batch_size=0"], 1, "train.micro_batch_size=0"),
    (["--train.global_batch_size=6", "--train.micro_batch_size=4"], 1, "train.global_batch_size=6"),
    (["--train.global_batch_size=8", "--train.micro_batch_size=4", "--parallel.dp_shard=4"], 4,
     "micro_batch_size*dp"),
    (["--train.min_lr_ratio=2"], 1, "train.min_lr_ratio=2"),
    (["--train.max_grad_norm=-1"], 1, "train.max_grad_norm=-1"),
    (["--train.seq_len=100000"], 1, "max_position_embeddings"),
    (["--parallel.dp_shard=3"], 4, "world size is 4"),
    (["--parallel.pp=3"], 4, "world size 4 is not divisible"),
    (["--parallel.dp_shard=0"], 1, "parallel.dp_shard=0"),
    (["--parallel.tp=2", "--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_layers_per_stage=[0,4]"], 4,
     "under parallel.tp=2 the first stage needs a decoder layer"),
    # The budget is measured on one rank of the layout (a fake process group, started and ended here).
    (["--parallel.tp=2", "--parallel.dp_shard=1", "--ac.mode=budget", "--ac.budget_mib=0.01"], 2,
     "ac.budget_mib=0.01: too small"),
    (["--parallel.cp=2", "--parallel.dp_shard=1", "--ac.mode=budget", "--ac.budget_mib=0.01"], 2,
     "ac.budget_mib=0.01: too small"),
    (["--model.preset=qwen3_moe", "--parallel.tp=2", "--parallel.dp_shard=1", "--ac.mode=budget",
      "--ac.budget_mib=64"], 2, "ac.mode=budget does not measure MoE blocks under tensor parallel"),
    (["--parallel.tp=4", "--parallel.dp_shard=1"], 4, "parallel.tp=4: must divide the model's num_key_value_heads=2"),
    (["--parallel.tp=2", "--parallel.dp_shard=1", "--train.seq_len=33"], 2, "must divide train.seq_len=33"),
    (["--parallel.tp=2", "--parallel.dp_shard=1", "--model.overrides.vocab_size=257"], 2, "vocab_size=257"),
    (["--parallel.cp=2", "--parallel.dp_shard=1", "--train.seq_len=30"], 2, "use a seq_len divisible by 4"),
    (["--parallel.ep=2", "--parallel.dp_shard=2"], 2, "the model has no experts"),
    (["--model.preset=qwen3_moe", "--parallel.ep=3", "--parallel.dp_shard=3", "--train.global_batch_size=6"], 3,
     "must divide the model's 8 experts"),
    (["--model.preset=qwen3_moe", "--parallel.ep=4", "--parallel.dp_shard=2"], 2, "must divide dp_shard"),
    (["--model.preset=gpt9"], 1, "model.preset='gpt9'"),
    (["--model.path=/no/such/model"], 1, "model.path=/no/such/model"),
    (["--model.overrides.hidden_sizee=8"], 1, "model.overrides.hidden_sizee"),
    (["--data.source=/no/such/corpus.txt"], 1, "data.source=/no/such/corpus.txt"),
    (["--data.tokenizer=/no/such/tokenizer"], 1, "data.tokenizer=/no/such/tokenizer"),
    (["--ac.mode=sometimes"], 1, "ac.mode='sometimes'"),
    (["--moe.dispatcher=nccl"], 1, "moe.dispatcher='nccl'"),
    (["--checkpoint.load_weights_only=true"], 1, "checkpoint.load_weights_only: set checkpoint.resume_from"),
    (["--run.name=../elsewhere"], 1, "run.name='../elsewhere'"),
    (["--checkpoint.resume_from=/no/such/ckpt"], 1, "checkpoint.resume_from=/no/such/ckpt"),
    (["--train.steps"], 1, "--section.field=value"),
    (["--logging.peak_tflops=0"], 1, "logging.peak_tflops=0"),
    (["--moe.bias_update_rate=0.01"], 1, "moe.bias_update_rate"),
    (["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_schedule=OneFOneB"], 2, "parallel.pp_schedule"),
    (["--parallel.pp_layers_per_stage=2"], 1, "parallel.pp_layers_per_stage: expected a list"),
    (["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_microbatches=0"], 2,
     "parallel.pp_microbatches=0: must be > 0, or null"),
    (["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_stages_per_rank=-1"], 2,
     "parallel.pp_stages_per_rank=-1"),
    (["--checkpoint.dir=ck", "--checkpoint.every=0"], 1, "checkpoint.every=0"),
    (["--checkpoint.keep=0"], 1, "checkpoint.keep=0"),
    (["--ac.mode=budget"], 1, "ac.budget_mib: ac.mode=budget needs"),
    (["--ac.mode=budget", "--ac.budget_mib=0"], 1, "ac.budget_mib=0: must be > 0"),
    (["--ac.mode=budget", "--ac.budget_mib=-5"], 1, "ac.budget_mib=-5: must be > 0"),
    (["--ac.mode=selective", "--ac.budget_mib=100"], 1, "ac.budget_mib=100: only ac.mode=budget reads it"),
    (["--ac.mode=budget", "--ac.budget_mib=100", "--parallel.pp=2", "--parallel.dp_shard=1"], 2,
     "ac.mode=budget: not supported under pipeline parallel"),
    (["--ac.mode=budget", "--ac.budget_mib=100", "--train.compile=true"], 1, "ac.mode=budget: the plan is predicted"),
    (["--ac.mode=budget", "--ac.budget_mib=0.01"], 1, "ac.budget_mib=0.01: too small"),
    (["--train.lr=nan"], 1, "train.lr=nan: must be a finite number"),
    (["--train.lr=1e400"], 1, "train.lr=inf: must be a finite number"),
    (["--train.max_grad_norm=.inf"], 1, "train.max_grad_norm=inf: must be a finite number"),
    (["--train.seed=-1"], 1, "train.seed=-1: must be in [0, 2**32)"),
    (["--model.overrides.hidden_size=0"], 1, "model.overrides.hidden_size=0: must be > 0"),
    (["--model.overrides.num_hidden_layers=0"], 1, "model.overrides.num_hidden_layers=0: must be > 0"),
    (["--model.overrides.num_attention_heads=0"], 1, "model.overrides.num_attention_heads=0: must be > 0"),
    (["--model.overrides.num_key_value_heads=3"], 1, "num_key_value_heads=3 must divide num_attention_heads=4"),
    (["--model.overrides.hidden_size=abc"], 1, "model.overrides.hidden_size='abc': TypeError: Field 'hidden_size'"),
    (["--model.overrides.num_hidden_layers.x=5"], 1, "model.overrides.num_hidden_layers={'x': 5}: TypeError"),
    (["--model.overrides.hidden_act=nonsense"], 1, "model: LlamaConfig cannot be built (KeyError: 'nonsense'); "
                                                   "check model.overrides (hidden_act='nonsense')"),
    (["--model.overrides.model_type=mistral"], 1, "model.overrides.model_type: the model's type comes from"),
    (["--model.preset=qwen3_moe", "--model.overrides.num_experts_per_tok=16"], 1,
     "model: each token is routed to 16 experts but the model has 8"),
]


@pytest.mark.parametrize("overrides, world_size, expected", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_input_names_the_field(overrides, world_size, expected, tmp_path):
    with pytest.raises(ConfigError) as error:
        validate(_recipe(tmp_path, *overrides), world_size)
    message = str(error.value)
    assert expected in message
    assert "\n" not in message


def test_checkpoint_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ConfigError, match="checkpoint.dir=.*not a directory"):
        validate(load_config(None, [f"--checkpoint.dir={path}"]), 1)


@pytest.mark.parametrize("field, under", [("run.dir", "a/run"), ("checkpoint.dir", "a/ck"), ("data.cache_dir", "a/data"),
                                          ("train.metrics_file", "a/m.jsonl")])
def test_output_path_under_a_file(tmp_path, field, under):
    (tmp_path / "a").write_text("x")
    with pytest.raises(ConfigError, match=f"{field}=.*: .*/a is a file, not a folder; choose another path"):
        validate(_recipe(tmp_path, f"--{field}={tmp_path / under}"), 1)


def test_output_paths_of_the_wrong_kind(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="data.cache_dir=.*: exists and is not a directory"):
        validate(_recipe(tmp_path, f"--data.cache_dir={tmp_path / 'file'}"), 1)
    with pytest.raises(ConfigError, match="train.metrics_file=.*: exists and is a directory; give a file path"):
        validate(_recipe(tmp_path, f"--train.metrics_file={tmp_path}"), 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="deep_ep may run here")
def test_strict_dispatcher_that_cannot_run_here(tmp_path):
    with pytest.raises(ConfigError, match="moe.dispatcher=deepep: unavailable here .* moe.dispatcher_strict=true"):
        validate(_recipe(tmp_path, "--model.preset=qwen3_moe", "--parallel.ep=2", "--parallel.dp_shard=2",
                         "--moe.dispatcher=deepep", "--moe.dispatcher_strict=true"), 2)


@pytest.mark.parametrize("dispatcher", ["deepep", "hybridep"])
def test_strict_dispatcher_with_rows_the_kernels_cannot_copy(tmp_path, dispatcher):
    # Known from the model before any process group, with or without deep_ep: exit 2 under strict.
    with pytest.raises(ConfigError, match=f"moe.dispatcher={dispatcher}: unavailable here \\(hidden size 60 makes "
                                          "rows of 120 bytes; .*\\) and moe.dispatcher_strict=true"):
        validate(_recipe(tmp_path, "--model.preset=qwen3_moe", "--model.overrides.hidden_size=60", "--parallel.ep=2",
                         "--parallel.dp_shard=2", f"--moe.dispatcher={dispatcher}", "--moe.dispatcher_strict=true"), 2)


def test_recipe_errors(tmp_path):
    with pytest.raises(ConfigError, match="--config .*no such file"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="did you mean train.steps"):
        load_config(str(unknown))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00train")
    with pytest.raises(ConfigError, match="not a text file"):
        load_config(str(binary))


def _recipe(tmp_path, *overrides: str):
    """Defaults plus `overrides`, in a run folder of the test's own: validation reads the run
    folder's checkpoints, and another run's in ./runs must not decide the outcome."""
    return load_config(None, [f"--run.dir={tmp_path / 'run'}", *overrides])


def test_true_false_and_case_select_ac_modes(tmp_path):
    for text, mode in [("true", "full"), ("false", "none"), ("Selective", "selective")]:
        assert validate(_recipe(tmp_path, f"--ac.mode={text}"), 1).ac_mode == mode


def test_launcher_exits_2_with_one_line_before_starting_processes(tmp_path):
    result = subprocess.run([sys.executable, "-m", "launch", "--train.seq_len=0", "--parallel.dp_shard=2"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: train.seq_len=0: must be > 0"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_dir_without_tensorboard_says_how_to_install(tmp_path):
    with pytest.raises(ConfigError, match="logging.tensorboard_dir=tb: tensorboard is not installed; pip install"):
        validate(_recipe(tmp_path, "--logging.tensorboard_dir=tb"), 1)


def test_recipe_choices_match_what_the_packages_implement():
    from moe.dispatch import DISPATCHERS
    from parallel.ac_budget import BUDGET_MODE
    from parallel.activation_checkpointing import AC_MODES
    from parallel.context_parallel import ROTATIONS
    from parallel.pipeline import SCHEDULES

    assert typing.get_args(AcMode) == (*AC_MODES, BUDGET_MODE)
    assert typing.get_args(DispatcherName) == DISPATCHERS
    assert typing.get_args(typing.get_type_hints(ParallelConfig)["pp_schedule"]) == SCHEDULES
    assert typing.get_args(typing.get_type_hints(ParallelConfig)["cp_rotate"]) == ROTATIONS


def test_validation_leaves_the_recipe_as_written(tmp_path):
    cfg = _recipe(tmp_path, "--ac.mode=true", "--parallel.pp=2", "--parallel.dp_shard=1")
    before = cfg.to_dict()
    plan = validate(cfg, 2)
    assert cfg.to_dict() == before
    assert (plan.ac_mode, plan.pp_microbatches, plan.pp_stages_per_rank, plan.reshard_after_forward) == ("full", 2, 1, False)
