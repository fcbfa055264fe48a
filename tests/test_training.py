"""The shared training loop (qgate.training): micro-batches cut into length groups give the
gradient of the micro-batch padded as one, in finetune and in every warmup loss."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from qgate import losses
from qgate.chat import load_tokenizer, tokenize_messages
from qgate.config import FinetuneConfig, Lora, WarmupConfig
from qgate.synthetic import read_rows
from qgate.training import (
    _gated_step,
    _lm_sum,
    _micro_step,
    build_finetune,
    build_warmup,
    collate,
    length_groups,
)

CPU = torch.device("cpu")


def _rows(model_dir: str, pool: str) -> list[dict]:
    """16 tokenized pool rows, every other one marked as a target (or corrupted) row, and one
    made three times longer so that the groups differ in width."""
    tok = load_tokenizer(model_dir)
    rows = []
    for i, row in enumerate(read_rows(pool)[:16]):
        enc = tokenize_messages(tok, row["messages"], 128, "assistant")
        rows.append({**enc, "is_target": i % 2 == 1})
    rows[3] = {**rows[3], "input_ids": rows[3]["input_ids"] * 3, "labels": rows[3]["labels"] * 3}
    return rows


def _whole_batch_loss(model, batch, cfg, quality: bool) -> torch.Tensor:
    """The micro-batch's loss computed on one padded batch: what the groups must reproduce."""
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())
    if not quality:
        return _lm_sum(model, batch) / n_tokens
    lm_sum, gates, mask, weights = _gated_step(model, batch, cfg)
    ql = losses.quality_terms(
        gates, mask, cfg.loss, batch["is_target"], cfg.balance, weights
    ).mean()
    return lm_sum / n_tokens + cfg.quality_weight * ql


@pytest.mark.parametrize("stage", ["finetune", "linear", "target_balanced", "contrast"])
def test_length_groups_give_the_gradient_of_one_padded_batch(stage, tiny_model, corpus, tmp_path):
    """Guards against groups that weight their rows or tokens differently from the batch."""
    quality = stage != "finetune"
    if quality:
        cfg = WarmupConfig(
            run_dir=str(tmp_path),
            base_model=tiny_model,
            corpus=[corpus["pool"]],
            target=[corpus["target"]] if stage == "target_balanced" else [],
            loss=stage,
        )
        model, tok, trainable, _ = build_warmup(cfg, CPU)
    else:
        cfg = FinetuneConfig(run_dir=str(tmp_path), target_model=tiny_model, lora=Lora(dropout=0))
        model, tok, trainable, _ = build_finetune(cfg, CPU)
    with torch.no_grad():  # LoRA B and the gates start flat: give every weight a gradient
        for p in trainable.values():
            p.copy_(torch.randn_like(p) * 0.1)
    rows = _rows(tiny_model, corpus["pool"])
    assert len(length_groups(rows, CPU)) > 1

    _whole_batch_loss(model, collate(rows, tok.pad_token_id), cfg, quality).backward()
    whole = {n: p.grad.clone() for n, p in trainable.items()}
    model.zero_grad(set_to_none=True)
    window = SimpleNamespace(lm=0.0, q=0.0, gate=None, n=0, tokens=0)
    _micro_step(model, rows, tok.pad_token_id, CPU, cfg, False, window, quality)
    for name, p in trainable.items():
        torch.testing.assert_close(p.grad, whole[name], rtol=1e-4, atol=1e-6, msg=name)
    assert window.tokens == sum(len(r["input_ids"]) for r in rows)  # real tokens, no padding
