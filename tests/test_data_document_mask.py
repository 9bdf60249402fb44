"""Document masking and evaluation: a token's loss ignores the documents before it; the trainer
passes document positions and logs held-out loss equal to a one-process computation."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from harness.config import load_config
from harness.data import BatchSampler, TokenCorpus, load_tokens
from harness.data.prepare import prepare_corpus
from harness.data.splits import samplers
from harness.loss import count_tokens, token_loss_sum
from harness.metrics import MetricsLog
from harness.models import load_config as load_model_config, reference_model
from harness.plot import plot
from harness.trainer import train
from harness.validation import validate
from tests.data_helpers import write_jsonl
from tests.multiproc import run_ranks


def _token_losses(model, corpus: TokenCorpus, document_mask: bool) -> torch.Tensor:
    sampler = BatchSampler(corpus, len(corpus) - 1, 1, seed=0, shuffle=False)
    inputs, labels = sampler.global_batch(0)
    extra = {"position_ids": sampler.position_ids(0)} if document_mask else {}
    with torch.no_grad():
        logits = model(input_ids=inputs, **extra).logits
    return F.cross_entropy(logits[0], labels[0], reduction="none")


def test_a_tokens_loss_ignores_the_previous_document(tmp_path):
    model = reference_model(load_model_config("llama", None), seed=0)
    first, replaced, second = "the first document", "another one, same size", "what the model predicts"
    assert len(first) < len(replaced)
    replaced = replaced[:len(first)]  # same length: the second document's tokens keep their places
    corpora = [TokenCorpus(prepare_corpus(write_jsonl(str(tmp_path / f"{i}.jsonl"), [text, second]), None, "text", 0,
                                          str(tmp_path / "cache"), workers=1, progress=False))
               for i, text in enumerate((first, replaced))]
    second_tokens = slice(len(first) + 1, None)  # inputs from the second document's first byte on
    masked = [_token_losses(model, c, document_mask=True)[second_tokens] for c in corpora]
    torch.testing.assert_close(masked[0], masked[1], atol=1e-6, rtol=0)
    unmasked = [_token_losses(model, c, document_mask=False)[second_tokens] for c in corpora]
    assert (unmasked[0] - unmasked[1]).abs().max() > 1e-3  # without the mask the first document leaks in


def _train_rows(rank: int, world_size: int, cfg) -> list[dict]:
    return train(cfg, validate(cfg, world_size))


def _mean_loss(model, sampler: BatchSampler, steps: range, document_mask: bool) -> float:
    total, tokens = 0.0, 0
    with torch.no_grad():
        for step in steps:
            inputs, labels = sampler.global_batch(step)
            extra = {"position_ids": sampler.position_ids(step)} if document_mask else {}
            total += token_loss_sum(model(input_ids=inputs, **extra).logits, labels).item()
            tokens += count_tokens(labels).item()
    return total / tokens


def test_trainer_masks_documents_and_logs_held_out_loss(tmp_path):
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{rng.integers(100)}" for _ in range(rng.integers(3, 12))) for _ in range(120)]
    source = write_jsonl(str(tmp_path / "d.jsonl"), texts)
    # A warmup of a million steps makes the first step's lr ~3e-9: the held-out loss after it is the
    # initial model's, which this process computes on its own.
    cfg = load_config(None, [
        "--model.preset=llama", "--parallel.dp_shard=2", "--train.steps=1", "--train.global_batch_size=4",
        "--train.micro_batch_size=2", "--train.seq_len=32", "--train.warmup_steps=1000000",
        f"--run.dir={tmp_path / 'run'}", "--logging.progress=false", f"--data.source={source}",
        f"--data.cache_dir={tmp_path / 'cache'}", "--data.document_mask=true", "--eval.every=1", "--eval.steps=2",
        "--eval.held_out=0.2"])
    rows = run_ranks(_train_rows, 2, cfg)
    model = reference_model(load_model_config("llama", None), seed=cfg.train.seed)
    train_sampler, held_out = samplers(load_tokens(cfg.data), cfg)
    expected_loss = _mean_loss(model, train_sampler, range(1), document_mask=True)
    expected_val = _mean_loss(model, held_out, range(2), document_mask=True)
    assert abs(expected_loss - _mean_loss(model, train_sampler, range(1), document_mask=False)) > 1e-3
    for rank_rows in rows:
        (row,) = rank_rows
        assert abs(row["loss"] - expected_loss) < 1e-5
        assert abs(row["val_loss"] - expected_val) < 1e-5
        assert abs(row["val_ppl"] - math.exp(expected_val)) < 1e-3
    assert f"| val_loss {row['val_loss']:.4f} | val_ppl" in MetricsLog._plain_line(row)
    unevaluated = {**{k: v for k, v in row.items() if not k.startswith("val_")}, "step": 2}
    plot([row, unevaluated], str(tmp_path / "metrics.png"))
    assert (tmp_path / "metrics.png").stat().st_size > 0
