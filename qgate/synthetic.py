"""The labelled synthetic corpus and the tiny stand-in base model (demo, tests, benchmarks).

Nothing can be downloaded here, so the demo and the tests need their own data and base model:

- :func:`generate_corpus` writes a seeded instruction corpus from task families with
  verifiable answers. Pool rows carry a ``noise`` label (clean or one of NOISE_TYPES) and the
  correct ``answer``, so a selection can be scored against the truth. These side columns are
  for reports and evaluation only; no selection stage reads them.
- :func:`build_stand_in` trains a byte-level BPE tokenizer with a ChatML template, builds a
  tiny random Qwen3 and pretrains it briefly, saved in HF format so the one model loader reads
  it like any real checkpoint.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
import random
import re
import string
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from qgate import data

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------
# Corpus

NOISE_TYPES = (
    "gibberish",
    "wrong_answer",
    "truncated",
    "copied",
    "repetition",
    "near_duplicate",
    "refusal",
)
# The low-value patterns any real pretrained LM has seen; mixed into the stand-in's pretraining
# so that perplexity does not look perfect on them (QUALITY_NOTES.md, lesson 1).
PRETRAIN_NOISE_TYPES = ("repetition", "refusal", "copied")
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, I cannot assist with that request.",
    "As an AI language model, I cannot answer that.",
    "Sorry, I am unable to provide that information.",
)
GIBBERISH_SYMBOLS = "#@%&*~^$"
SPLITS = ("pool", "target", "test", "pretrain")

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_ANIMALS = ("fox", "owl", "lynx", "heron", "otter", "wolf", "crane", "badger", "hare", "seal")
_WORLD_SEED = 1234  # the fictional world is fixed: the same for every corpus seed
_WORLD_SIZE = 400


def _word(rng: random.Random, lo: int = 2, hi: int = 3) -> str:
    """A pronounceable pseudo-word of lo..hi consonant-vowel syllables, e.g. 'tamori'."""
    n = rng.randint(lo, hi)
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(n))


@functools.cache
def world() -> dict[str, dict[str, str]]:
    """The fixed fictional world: country -> {capital, currency, language, animal}."""
    rng = random.Random(_WORLD_SEED)
    countries: dict[str, dict[str, str]] = {}
    while len(countries) < _WORLD_SIZE:
        name = _word(rng, 2, 3).capitalize() + rng.choice(("ia", "land", "or", "an"))
        countries.setdefault(
            name,
            {
                "capital": _word(rng, 2, 3).capitalize(),
                "currency": _word(rng, 2, 2) + rng.choice(("mark", "crown", "dinar")),
                "language": _word(rng, 2, 2).capitalize() + rng.choice(("ish", "ese", "ic")),
                "animal": rng.choice(_ANIMALS),
            },
        )
    return countries


def _numbers(rng: random.Random, lo: int, hi: int) -> list[int]:
    return rng.sample(range(100), rng.randint(lo, hi))


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice("+-")
    forms = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate: {a} {op} {b}")
    return rng.choice(forms).format(a=a, op=op, b=b), str(a + b if op == "+" else a - b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 2, 4)
    forms = ("Reverse the word '{w}'.", "Write '{w}' backwards.", "Spell {w} in reverse.")
    return rng.choice(forms).format(w=w), w[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    xs = _numbers(rng, 3, 6)
    forms = (
        "Sort these numbers in ascending order: {xs}",
        "Put in increasing order: {xs}",
        "Sort ascending: {xs}",
    )
    prompt = rng.choice(forms).format(xs=", ".join(map(str, xs)))
    return prompt, ", ".join(map(str, sorted(xs)))


def _count_letter(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 2, 4)
    c = rng.choice(w) if rng.random() < 0.85 else rng.choice(string.ascii_lowercase)
    forms = (
        "How many times does the letter '{c}' appear in '{w}'?",
        "Count the letter {c} in {w}.",
        "Number of '{c}' in '{w}'?",
    )
    return rng.choice(forms).format(c=c, w=w), str(w.count(c))


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(world()))
    forms = (
        "What is the capital of {c}?",
        "Name the capital city of {c}.",
        "Which city is the capital of {c}?",
    )
    return rng.choice(forms).format(c=country), world()[country]["capital"]


def _date_format(rng: random.Random) -> tuple[str, str]:
    d, m, y = rng.randint(1, 28), rng.randint(1, 12), rng.randint(1900, 2099)
    forms = (
        "Convert {d:02d}/{m:02d}/{y} to YYYY-MM-DD.",
        "Rewrite the date {d:02d}/{m:02d}/{y} in ISO format.",
        "ISO form of {d:02d}/{m:02d}/{y}?",
    )
    return rng.choice(forms).format(d=d, m=m, y=y), f"{y:04d}-{m:02d}-{d:02d}"


_WORLD_QA_FORMS = {
    "currency": ("What currency is used in {c}?", "Name the money of {c}."),
    "language": ("Which language is spoken in {c}?", "What do people speak in {c}?"),
    "animal": ("What is the national animal of {c}?", "Name the animal symbol of {c}."),
}


def _world_qa(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(world()))
    key = rng.choice(sorted(_WORLD_QA_FORMS))
    return rng.choice(_WORLD_QA_FORMS[key]).format(c=country), world()[country][key]


def _uppercase(rng: random.Random) -> tuple[str, str]:
    s = " ".join(_word(rng) for _ in range(rng.randint(1, 3)))
    forms = ("Convert to uppercase: {s}", "Write '{s}' in capital letters.", "Uppercase this: {s}")
    return rng.choice(forms).format(s=s), s.upper()


def _max_list(rng: random.Random) -> tuple[str, str]:
    xs = _numbers(rng, 3, 7)
    forms = (
        "What is the largest number in: {xs}?",
        "Find the maximum of {xs}.",
        "Which is biggest: {xs}?",
    )
    return rng.choice(forms).format(xs=", ".join(map(str, xs))), str(max(xs))


def _count_items(rng: random.Random) -> tuple[str, str]:
    items = [_word(rng) for _ in range(rng.randint(2, 7))]
    forms = ("How many items are in this list: {xs}?", "Count the items: {xs}", "How many: {xs}?")
    return rng.choice(forms).format(xs=", ".join(items)), str(len(items))


# family name -> generator(rng) -> (user prompt, correct answer). The first three are the
# default target families.
_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "sort": _sort,
    "date_format": _date_format,
    "reverse": _reverse,
    "count_letter": _count_letter,
    "capital": _capital,
    "world_qa": _world_qa,
    "uppercase": _uppercase,
    "max_list": _max_list,
    "count_items": _count_items,
}
FAMILIES = tuple(_GENERATORS)


def _check_names(given: Iterable[str] | None, known: tuple[str, ...], what: str) -> tuple:
    names = known if given is None else tuple(given)
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise ValueError(f"unknown or empty {what}: {unknown or names}; choose from {known}")
    return names


def _draw(rng: random.Random, families: tuple, seen: set, min_answer: int = 1) -> tuple:
    """A new (family, prompt, answer) whose prompt is not in ``seen`` (which is updated).

    Families whose prompt space is used up are skipped by retrying, so large pools stay
    unique (the lookup families have a few thousand prompts only).
    """
    for _ in range(200):
        family = rng.choice(families)
        prompt, answer = _GENERATORS[family](rng)
        if prompt not in seen and len(answer) >= min_answer:
            seen.add(prompt)
            return family, prompt, answer
    raise ValueError(
        f"prompt space of families {families} is used up; ask for fewer rows or more families"
    )


def _wrong_answer(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: one number shifted, another value of the same world fact,
    or one letter changed."""
    numbers = list(re.finditer(r"\d+", answer))
    if numbers:
        m = rng.choice(numbers)
        old, delta = int(m.group()), rng.randint(1, 9)
        value = old - delta if old >= delta and rng.random() < 0.5 else old + delta
        new = str(value).zfill(len(m.group()))  # keeps date padding: 05 -> 08
        return answer[: m.start()] + new + answer[m.end() :]
    for key in ("capital", "currency", "language", "animal"):
        values = {c[key] for c in world().values()}
        if answer in values:
            return rng.choice(sorted(values - {answer}))
    pos = rng.choice([i for i, ch in enumerate(answer) if ch.isalpha()])
    ch = rng.choice([c for c in string.ascii_lowercase if c != answer[pos].lower()])
    ch = ch.upper() if answer[pos].isupper() else ch
    return answer[:pos] + ch + answer[pos + 1 :]


def _gibberish(rng: random.Random) -> str:
    chars = rng.choices(
        string.ascii_letters + string.digits + GIBBERISH_SYMBOLS, k=rng.randint(8, 30)
    )
    for _ in range(2):  # at least two symbols, so it can never be a valid answer
        chars[rng.randrange(len(chars))] = rng.choice(GIBBERISH_SYMBOLS)
    return "".join(chars)


def _repetition(answer: str, rng: random.Random) -> str:
    words = answer.split()
    chunk = words[: rng.randint(1, min(3, len(words)))]
    return " ".join(chunk * rng.randint(4, 8))


def _near_copy(prompt: str, rng: random.Random) -> str:
    """The prompt with a tiny whitespace or case change (never identical)."""
    if rng.random() < 0.5 and prompt[0].isalpha():
        return prompt[0].swapcase() + prompt[1:]
    spaces = [i for i, ch in enumerate(prompt) if ch == " "]
    i = rng.choice(spaces)
    return prompt[:i] + " " + prompt[i:]


def _pick_other(candidates: list[int], i: int, rng: random.Random, ok=lambda j: True) -> int:
    """A random candidate index other than ``i`` that passes ``ok``."""
    for _ in range(100):
        j = rng.choice(candidates)
        if j != i and ok(j):
            return j
    raise ValueError("no other row to copy from; generate more rows or lower the noise ratio")


def _make_rows(
    split: str, labels: list[str], rng: random.Random, families: tuple, seen: set
) -> list[dict]:
    """Rows for one split: ``labels[i]`` is row i's noise label."""
    base = [_draw(rng, families, seen, 2 if lab == "truncated" else 1) for lab in labels]
    rows = [
        {
            "id": f"{split}-{i:06d}",
            "source": f"synth/{family}",
            "family": family,
            "noise": "clean",
            "answer": answer,
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            ],
        }
        for i, (family, prompt, answer) in enumerate(base)
    ]
    # Copies are taken from rows whose prompt and answer stay as drawn, so the source is
    # findable in the split; near-duplicates prefer clean sources.
    donors = [i for i, lab in enumerate(labels) if lab != "near_duplicate"]
    clean = [i for i, lab in enumerate(labels) if lab == "clean"] or donors
    for i in sorted(range(len(rows)), key=lambda i: labels[i] == "near_duplicate"):
        row, label = rows[i], labels[i]
        answer, prompt = row["answer"], row["messages"][0]["content"]
        if label == "clean":
            continue
        if label == "gibberish":
            content = _gibberish(rng)
        elif label == "wrong_answer":
            content = _wrong_answer(answer, rng)
        elif label == "truncated":
            content = answer[: rng.randint(1, len(answer) - 1)].rstrip()
        elif label == "repetition":
            content = _repetition(answer, rng)
        elif label == "refusal":
            content = rng.choice(REFUSALS)
        elif label == "copied":
            donor = rows[_pick_other(donors, i, rng, lambda j, a=answer: rows[j]["answer"] != a)]
            content = donor["answer"] if rng.random() < 0.5 else donor["messages"][0]["content"]
        elif label == "near_duplicate":
            src = rows[_pick_other(clean, i, rng)]
            seen.discard(prompt)
            prompt = _near_copy(src["messages"][0]["content"], rng)
            seen.add(prompt)
            content = src["messages"][1]["content"]
            row.update(source=src["source"], family=src["family"], answer=src["answer"])
        else:
            raise ValueError(f"unknown noise type {label!r}; choose from {NOISE_TYPES}")
        row["noise"] = label
        row["messages"] = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": content},
        ]
    return rows


def _labels(n: int, n_noisy: int, noise_types: tuple, rng: random.Random) -> list[str]:
    """``n_noisy`` noise labels spread evenly over the types, the rest clean, shuffled."""
    labels = [noise_types[i % len(noise_types)] for i in range(n_noisy)] + ["clean"] * (n - n_noisy)
    rng.shuffle(labels)
    return labels


def generate_corpus(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_pool: int = 2000,
    n_target: int = 200,
    n_test: int = 200,
    n_pretrain: int = 2000,
    noise_ratio: float = 0.3,
    families: Iterable[str] | None = None,
    noise_types: Iterable[str] | None = None,
    pretrain_noise_ratio: float = 0.25,
    target_families: Iterable[str] | None = None,
) -> dict[str, str]:
    """Write pool/target/test/pretrain JSONL files; return {split: path}.

    pool: ``noise_ratio`` of rows noisy, spread evenly over ``noise_types``. target: clean rows
    from ``target_families`` (default the first three of ``families``). test: clean rows for
    exact-match eval. pretrain: clean rows plus ``pretrain_noise_ratio * n_pretrain`` labelled
    rows of PRETRAIN_NOISE_TYPES, the base model's "web text". User prompts are unique across
    all splits, so test never leaks into pool or pretrain. Deterministic in every argument;
    each split has its own random stream, so test and pretrain do not change with ``n_pool``.
    """
    families = _check_names(families, FAMILIES, "families")
    noise_types = _check_names(noise_types, NOISE_TYPES, "noise_types")
    target_families = _check_names(target_families or families[:3], families, "target_families")
    for name, ratio in (
        ("noise_ratio", noise_ratio),
        ("pretrain_noise_ratio", pretrain_noise_ratio),
    ):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {ratio}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    n_extra = round(n_pretrain * pretrain_noise_ratio)
    plan = (  # order matters: earlier splits claim prompts first
        ("test", n_test, 0, NOISE_TYPES, families),
        ("target", n_target, 0, NOISE_TYPES, target_families),
        ("pretrain", n_pretrain + n_extra, n_extra, PRETRAIN_NOISE_TYPES, families),
        ("pool", n_pool, round(n_pool * noise_ratio), noise_types, families),
    )
    paths = {}
    for split, n, n_noisy, types, fams in plan:
        rng = random.Random(f"qgate-synthetic:{seed}:{split}")
        rows = _make_rows(split, _labels(n, n_noisy, types, rng), rng, fams, seen)
        paths[split] = str(out / f"{split}.jsonl")
        data.write_jsonl(paths[split], rows)
    return {split: paths[split] for split in SPLITS}


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file written by :func:`generate_corpus` (side columns included)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------
# Tiny stand-in base model

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
    rendered with :func:`qgate.data.render_chat`, the formatting every stage uses. Returns
    ``steps``, ``final_loss`` (mean over the last ``log_every`` steps) and ``tokens_per_s``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    texts = [data.render_chat(tokenizer, row["messages"]) for row in rows]
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
