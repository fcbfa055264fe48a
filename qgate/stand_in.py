"""The tiny stand-in base model for the demo, tests and benchmarks (nothing can be
downloaded here): :func:`build_stand_in` trains a byte-level BPE tokenizer with a ChatML
template, builds a tiny random Qwen3 and pretrains it briefly, saved in HF format so the one
model loader reads it like any real checkpoint.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

from qgate import chat
from qgate.synthetic import read_rows

log = logging.getLogger(__name__)


SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML as Qwen uses it, without Qwen3's <think> blocks.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def row_texts(rows: Iterable[dict]) -> list[str]:
    """Plain "role\ncontent" texts of rows, to train a tokenizer on (before any template exists)."""
    return [f"{m['role']}\n{m['content']}" for row in rows for m in row["messages"]]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on ``texts`` with a ChatML chat template.

    As in Qwen's instruct tokenizers, eos is ``<|im_end|>`` (so generation stops at the end of
    the assistant turn) and pad is ``<|endoftext|>``. Byte-level means any text encodes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    out_dir: str | os.PathLike,
    texts: Iterable[str],
    *,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> str:
    """Build a random tiny Qwen3 plus a tokenizer trained on ``texts``; save both in HF format.

    ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(out_dir)`` then load it offline
    like any real checkpoint. ``intermediate_size`` defaults to 3 * hidden_size (Qwen3's ratio).
    Initialisation uses ``seed`` without touching torch's global RNG. Returns ``out_dir``.
    """
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must divide by num_heads ({num_heads}) and num_heads "
            f"by num_kv_heads ({num_kv_heads})"
        )
    tokenizer = build_tokenizer(texts, vocab_size)
    tokenizer.model_max_length = max_position_embeddings
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def pretrain(
    model_dir: str | os.PathLike,
    rows: Iterable[dict],
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int = 16,
    lr: float = 3e-3,
    max_length: int = 128,
    seed: int = 0,
    log_every: int = 50,
) -> dict:
    """Pretrain the stand-in in place: causal LM loss on every token of each rendered chat.

    Runs ``epochs`` passes or ``max_steps`` steps, whichever ends first. Single process, fp32
    (torch's thread count: all cores by default), AdamW, short warmup, cosine decay. Chats are
    rendered with :func:`qgate.chat.render_chat`, the formatting every stage uses. Returns
    ``steps``, ``final_loss`` (mean over the last ``log_every`` steps) and ``tokens_per_s``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    texts = [chat.render_chat(tokenizer, row["messages"]) for row in rows]
    if not texts:
        raise ValueError("pretrain got no rows")
    enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)
    ids = enc["input_ids"]
    per_epoch = math.ceil(len(ids) / batch_size)
    total = min(epochs * per_epoch, max_steps) if max_steps is not None else epochs * per_epoch
    warmup = max(1, total // 20)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / total, 1))),
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses, n_tokens, step, t0 = [], 0, 0, time.perf_counter()
    while step < total:
        order = torch.randperm(len(ids), generator=gen).tolist()
        for start in range(0, len(ids), batch_size):
            if step >= total:
                break
            batch = [ids[i] for i in order[start : start + batch_size]]
            width = max(map(len, batch))
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, seq in enumerate(batch):
                input_ids[b, : len(seq)] = torch.tensor(seq)
                mask[b, : len(seq)] = 1
            labels = input_ids.masked_fill(mask == 0, -100)  # (B, T); pad gets no loss
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            n_tokens += int(mask.sum())
            losses.append(loss.item())
            if log_every and step % log_every == 0:
                log.info("pretrain step %d/%d loss %.4f", step, total, loss.item())
    elapsed = time.perf_counter() - t0
    model.save_pretrained(model_dir)
    tail = losses[-max(1, log_every) :]
    return {
        "steps": step,
        "final_loss": sum(tail) / len(tail),
        "tokens_per_s": n_tokens / elapsed,
    }


def build_stand_in(
    out_dir: str | os.PathLike, pretrain_rows: Iterable[dict] | str | os.PathLike, **kw
) -> str:
    """Tokenizer + tiny Qwen3 + brief pretraining on ``pretrain_rows`` (rows or a JSONL path).

    Keyword arguments go to :func:`build_tiny_model` or :func:`pretrain` by name (``seed`` to
    both). Returns ``out_dir``; the pretrain stats are saved in ``pretrain_stats.json`` there.
    """
    if isinstance(pretrain_rows, str | os.PathLike):
        rows = read_rows(pretrain_rows)
    else:
        rows = list(pretrain_rows)
    model_keys = set(inspect.signature(build_tiny_model).parameters) - {"out_dir", "texts"}
    train_keys = set(inspect.signature(pretrain).parameters) - {"model_dir", "rows"}
    unknown = sorted(set(kw) - model_keys - train_keys)
    if unknown:
        raise TypeError(f"build_stand_in got unknown arguments {unknown}")
    build_tiny_model(out_dir, row_texts(rows), **{k: v for k, v in kw.items() if k in model_keys})
    stats = pretrain(out_dir, rows, **{k: v for k, v in kw.items() if k in train_keys})
    Path(out_dir, "pretrain_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return str(out_dir)
