"""A fourth held-out corpus for bench/quality.py (corpus F): noise that lives in the prompt.

Written on 2026-12-08 to test what the shipped selection (ranking within prompt clusters)
was never measured on: a row whose question is broken while its answer is the right one.
Such rows ask nothing a model can learn from; ranked only against rows that look like them
(their own prompt cluster), some of them could be kept. The kinds were picked as failures
common in scraped and converted instruction data, not by how any ranking scores them.

Families, weights and sources are corpus E's (bench/heldout_corpus_e.py), so F differs from E
only in its noise. Noise kinds, four in the prompt (the assistant turn is the right answer):
- ``garbled_prompt``: a third of the prompt's letters and digits replaced at random, as by bad
  OCR or a broken encoding;
- ``truncated_prompt``: the prompt cut off before the part the answer depends on;
- ``placeholder_prompt``: an unfilled template or an empty cell instead of the question
  (``{instruction}``, ``nan``, ``<insert question here>``);
- ``missing_context``: a question about material that is not there (an image, a table, an
  earlier message);
and two in the answer, corpus E's hardest (no gate negative constructs them):
- ``wrong_rule``: the answer of a related but wrong procedure;
- ``unanswerable``: a claim that the question cannot be answered as asked.

Rows carry the columns bench/quality.py reads: ``id``, ``source``, ``family``, ``noise``,
``answer`` and ``messages``.
"""

from __future__ import annotations

import random

from bench.heldout_corpus import write_weighted_corpus
from bench.heldout_corpus_e import (
    GENERATORS,
    HELDOUT_E_FAMILIES,
    SOURCES,
    WEIGHTS,
    Item,
)
from bench.heldout_corpus_e import corrupt as corrupt_answer

HELDOUT_F_FAMILIES = HELDOUT_E_FAMILIES
PROMPT_NOISE = ("garbled_prompt", "truncated_prompt", "placeholder_prompt", "missing_context")
HELDOUT_F_NOISE = (*PROMPT_NOISE, "wrong_rule", "unanswerable")

_PLACEHOLDERS = (
    "{instruction}",
    "{{question}}",
    "<insert question here>",
    "[PROMPT]",
    "nan",
    "None",
    "Q: {input}\nA:",
    "$QUESTION",
)
_MISSING = (
    "What is the answer to the question in the image?",
    "Using the table above, what is the result?",
    "Solve the problem from my previous message.",
    "Answer question 3 from the attached worksheet.",
    "What does the file I uploaded say the answer is?",
    "Same as before, but for the second one.",
    "Can you do the one on page 12?",
)
_GARBLE = "abcdefghijklmnopqrstuvwxyz0123456789#%&*@?~^"


def _garble(prompt: str, rng: random.Random) -> str:
    """Replace a third of the letters and digits (at least two) with random characters."""
    spots = [i for i, c in enumerate(prompt) if c.isalnum()]
    chosen = rng.sample(spots, max(2, len(spots) // 3))
    chars = list(prompt)
    for i in chosen:
        chars[i] = rng.choice(_GARBLE.replace(chars[i].lower(), ""))
    return "".join(chars)


def _truncate(prompt: str, rng: random.Random) -> str:
    """Cut the prompt to its first words, dropping at least the last half of them (what the
    answer depends on: the number, the word, the numeral)."""
    words = prompt.split()
    keep = rng.randint(1, max(1, len(words) // 2))
    return " ".join(words[:keep])


def corrupt(kind: str, item: Item, rng: random.Random) -> tuple[str, str]:
    """The (user turn, assistant turn) of a row of noise ``kind`` for the drawn ``item``."""
    if kind == "garbled_prompt":
        return _garble(item.prompt, rng), item.answer
    if kind == "truncated_prompt":
        return _truncate(item.prompt, rng), item.answer
    if kind == "placeholder_prompt":
        return rng.choice(_PLACEHOLDERS), item.answer
    if kind == "missing_context":
        return rng.choice(_MISSING), item.answer
    if kind in HELDOUT_F_NOISE:
        return item.prompt, corrupt_answer(kind, item, rng)
    raise ValueError(f"unknown noise kind {kind!r}; choose from {HELDOUT_F_NOISE}")


def generate_heldout_f(
    out_dir: str,
    *,
    seed: int = 5,
    n_pool: int = 2000,
    n_target: int = 100,
    n_test: int = 200,
    noise_ratio: float = 0.3,
    families: tuple[str, ...] = HELDOUT_F_FAMILIES,
) -> dict[str, str]:
    """Write pool/target/test/pretrain JSONL files of corpus F; return {split: path}.

    Same contract as corpus E's generator (the clean prompts unique across splits, test and
    target clean, target from the first three families, pretrain empty); a prompt-noise row
    keeps the right answer and breaks its question. Deterministic in every argument.
    """
    sizes = {"n_test": n_test, "n_target": n_target, "n_pool": n_pool, "noise_ratio": noise_ratio}
    return write_weighted_corpus(
        out_dir,
        f"qgate-heldout-f:{seed}",
        families,
        HELDOUT_F_FAMILIES,
        sizes,
        noise=HELDOUT_F_NOISE,
        weights=WEIGHTS,
        sources=SOURCES,
        generators=GENERATORS,
        corrupt=corrupt,
    )
